"""The classification recipe (issue 20): pooling against a manual computation, class weights against
F.cross_entropy(weight=...), length buckets (every example once per epoch), the bounded val sample, best/
by the chosen metric and early stopping (through fit with a scripted evaluation, so the expected step is
known), the [classify] settings in the checkpoint, the pretrain-then-finetune route, and the CLI's refusals
and --help defaults."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import cli_in_process, tiny_config

from yuyan.data.tasks import ClassifyTask, LengthBuckets, parse_class_weights
from yuyan.errors import UserError
from yuyan.model.checkpoint import load_checkpoint, save_checkpoint
from yuyan.model.heads import Classifier, pad_batch
from yuyan.model.transformer import Transformer
from yuyan.train.config import ClassifySection
from yuyan.train.finetune import FinetuneOptions, default_train_config, finetune
from yuyan.train.loop import fit


def _model(tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config("llama", vocab_size=tokenizer.vocab_size)).eval()


def _reviews(n: int = 80, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "bad", "poor"]
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        words = [rng.choice(good if i % 2 else bad)] + rng.choices(["the", "film", "was", "plot"], k=i % 9)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- the head


def test_mean_and_last_pooling_match_a_manual_computation(tokenizer):
    model = _model(tokenizer)
    seqs = [tokenizer.encode("a rather long review of the film") + [1], tokenizer.encode("short") + [1]]
    x, n = pad_batch(seqs, tokenizer.pad_id or 0)
    assert n[0] != n[1]
    last = Classifier(model, ["neg", "pos"], "last").eval()
    mean = Classifier(model, ["neg", "pos"], "mean").eval()
    mean.load_head(last.head_tensors())  # the same linear layer: only the pooling differs
    with torch.no_grad():
        h = model.hidden(x)  # (B, T, d)
        w, b = last.score.weight, last.score.bias
        want_last = torch.stack([h[i, n[i] - 1] for i in range(2)]) @ w.T + b
        want_mean = torch.stack([h[i, : n[i]].mean(0) for i in range(2)]) @ w.T + b
        got_last, got_mean = last(x, n), mean(x, n)
        # the padded row scores as it does alone (pads never enter either pooling)
        alone = mean(torch.tensor([seqs[1]]), torch.tensor([len(seqs[1])]))
    torch.testing.assert_close(got_last, want_last)
    torch.testing.assert_close(got_mean, want_mean)
    torch.testing.assert_close(alone, got_mean[1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_last, got_mean)


def test_head_dropout_only_while_training(tokenizer):
    clf = Classifier(_model(tokenizer), ["neg", "pos"], "mean", dropout=0.5)
    x, n = pad_batch([tokenizer.encode("some text here")], 0)
    torch.manual_seed(0)
    clf.train()
    a, b = clf(x, n), clf(x, n)
    clf.eval()
    c, d = clf(x, n), clf(x, n)
    assert not torch.allclose(a, b) and torch.equal(c, d)
    assert clf.head_meta()["dropout"] == 0.5
    with pytest.raises(UserError, match="dropout"):
        Classifier(_model(tokenizer), ["neg", "pos"], dropout=1.0)


# ---------------------------------------------------------------------------------------------- the task


def test_class_weights_change_the_loss_as_cross_entropy_weight_does(tokenizer):
    rows = _reviews(40)
    data = [(r["text"], r["label"]) for r in rows]
    labels = ["negative", "positive"]
    plain = ClassifyTask(tokenizer, data, data[:8], labels, 64)
    weighted = ClassifyTask(tokenizer, data, data[:8], labels, 64, class_weights=[1.0, 3.0])
    clf = Classifier(_model(tokenizer), labels, "mean").eval()
    g = torch.Generator().manual_seed(0)
    batch = weighted.batch("train", 16, g)
    with torch.no_grad():
        logits = clf(batch["input_ids"], batch["lengths"]).float()
        want = F.cross_entropy(logits, batch["labels"], weight=torch.tensor([1.0, 3.0]))
        got, unweighted = weighted.loss(clf, batch), plain.loss(clf, batch)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(unweighted, F.cross_entropy(logits, batch["labels"]))
    assert not torch.allclose(got, unweighted)


def test_parse_class_weights():
    from collections import Counter

    labels, counts = ["a", "b", "c"], Counter({"a": 6, "b": 3, "c": 1})
    assert parse_class_weights("none", labels, counts) is None
    assert parse_class_weights("balanced", labels, counts) == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert parse_class_weights("c=4, a=0.5", labels, counts) == [0.5, 1.0, 4.0]
    for bad, word in (("d=2", "LABEL=WEIGHT"), ("a=x", "not a number"), ("a=0", "> 0"), ("heavy", "LABEL")):
        with pytest.raises(UserError, match=word):
            parse_class_weights(bad, labels, counts)


def test_length_buckets_cover_every_example_once_per_epoch_and_pad_less():
    rng = random.Random(0)
    lengths = [rng.randint(2, 120) for _ in range(103)]
    b = LengthBuckets(lengths, window=4)
    g = torch.Generator().manual_seed(7)
    stream = [i for _ in range(40) for i in b.next(8, g)]  # 320 draws: three whole epochs and a part
    assert all(len(b2) == 8 for b2 in [stream[i : i + 8] for i in range(0, 320, 8)])
    for e in range(3):
        assert sorted(stream[e * 103 : (e + 1) * 103]) == list(range(103)), e
    assert stream[:103] != stream[103:206]  # a new order every epoch
    # little padding: the batches' longest-row tokens are well below uniform random batches'
    bw, gw = LengthBuckets(lengths, window=13), torch.Generator().manual_seed(7)  # one window: the epoch
    wide = [i for _ in range(12) for i in bw.next(8, gw)]
    padded = sum(8 * max(lengths[i] for i in wide[k : k + 8]) for k in range(0, 96, 8))
    rand = torch.randint(103, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    padded_rand = sum(8 * max(lengths[i] for i in rand[k : k + 8]) for k in range(0, 96, 8))
    assert padded < 0.7 * padded_rand, (padded, padded_rand)
    # a resumed sampler (its state + the generator's) draws what the uninterrupted one draws
    b1, g1 = LengthBuckets(lengths, window=4), torch.Generator().manual_seed(7)
    first = [b1.next(8, g1) for _ in range(15)]
    st, gs = json.loads(json.dumps(b1.state_dict())), g1.get_state()
    b2, g2 = LengthBuckets(lengths, window=4), torch.Generator()
    b2.load_state_dict(st)
    g2.set_state(gs)
    assert [b2.next(8, g2) for _ in range(10)] == [b1.next(8, g1) for _ in range(10)]
    assert [i for bb in first for i in bb] == stream[:120]


def test_bucketed_task_draws_every_training_example_and_bounds_the_periodic_val(tokenizer):
    rows = [(r["text"], r["label"]) for r in _reviews(60)]
    task = ClassifyTask(
        tokenizer, rows[:50], rows[50:], ["negative", "positive"], 64, bucket=True, val_examples=4
    )
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(5):  # 5 x 10 = one epoch of the 50 training examples
        b = task.batch("train", 10, g)
        seen += [(tuple(x[: int(n)].tolist()), int(y)) for x, n, y in zip(*b.values(), strict=True)]
    assert sorted(seen) == sorted((tuple(ids), y) for ids, y in task.train)
    clf = Classifier(_model(tokenizer), task.labels, "mean")
    assert task.evaluate(clf)["examples"] == 4 and task.evaluate(clf, full=True)["examples"] == 10


# ---------------------------------------------------------------------------------------------- the LM loss


def _aux_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    eot = [tokenizer.eot_id]
    texts = ["a rather long review of the film and its plot", "short", "the film was fine", "dull"]
    seqs = [tokenizer.encode(t) + eot for t in texts]
    x, n = pad_batch(seqs, tokenizer.pad_id or 0)
    assert len(set(n.tolist())) > 1  # rows of different lengths: there are pads
    return x, n, torch.tensor([1, 0, 1, 0]), seqs


def _lm_loss_by_hand(model: Transformer, seqs: list[list[int]]) -> torch.Tensor:
    """The mean of -log p(s[t + 1] | s[: t + 1]) over every real next token, each row run alone (no pads
    anywhere), from the full logits."""
    terms = []
    for s in seqs:
        logp = F.log_softmax(model(torch.tensor([s]))[0].float(), -1)  # (len, V)
        terms += [-logp[t, s[t + 1]] for t in range(len(s) - 1)]
    return torch.stack(terms).mean()


def test_lm_weight_zero_leaves_the_loss_bitwise_as_it_was(tokenizer):
    x, n, y, _ = _aux_batch(tokenizer)
    data = [("good film", "positive"), ("bad film", "negative")]
    task = ClassifyTask(tokenizer, data, data, ["negative", "positive"], 64, lm_weight=0.0)
    clf = Classifier(_model(tokenizer), task.labels, "mean").eval()
    batch = {"input_ids": x, "lengths": n, "labels": y}
    assert torch.equal(task.loss(clf, batch), F.cross_entropy(clf(x, n).float(), y))


@pytest.mark.parametrize(("arch", "pooling"), [("gpt2", "last"), ("llama", "mean")])  # tied, untied lm_head
def test_lm_weight_adds_the_next_token_loss_on_the_real_tokens(tokenizer, arch, pooling):
    x, n, y, seqs = _aux_batch(tokenizer)
    data = [("good film", "positive"), ("bad film", "negative")]
    task = ClassifyTask(tokenizer, data, data, ["negative", "positive"], 64, lm_weight=0.5)
    torch.manual_seed(0)
    clf = Classifier(Transformer(tiny_config(arch, vocab_size=tokenizer.vocab_size)), task.labels, pooling)
    clf.eval()  # no dropout: the two computations see the same network
    want = F.cross_entropy(clf(x, n).float(), y) + 0.5 * _lm_loss_by_hand(clf.model, seqs)
    want.backward()
    want_grads = {k: p.grad.clone() for k, p in clf.named_parameters()}
    clf.zero_grad(set_to_none=True)
    got = task.loss(clf, {"input_ids": x, "lengths": n, "labels": y})
    got.backward()  # through the fused loss (and, tied, its shared-weight gradient)
    torch.testing.assert_close(got, want)
    for k, p in clf.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[k], atol=1e-6, rtol=1e-4, msg=k)
    # what the pads hold is neither input nor target
    other = x.clone()
    other[torch.arange(x.shape[1])[None, :] >= n[:, None]] = 7
    with torch.no_grad():
        torch.testing.assert_close(task.loss(clf, {"input_ids": other, "lengths": n, "labels": y}), got)
        # a batch with no next token at all (lone EOTs) has an LM loss of 0, not the nan of an empty mean
        logits, lm = clf.forward_with_lm(torch.full((2, 1), tokenizer.eot_id), torch.tensor([1, 1]))
    assert float(lm) == 0.0 and logits.shape == (2, 2)


def test_a_negative_lm_weight_is_refused():
    from yuyan.train.config import FinetuneConfig

    with pytest.raises(UserError, match=r"classify\.lm_weight must be >= 0"):
        FinetuneConfig(classify=ClassifySection(lm_weight=-1.0)).validate()
    FinetuneConfig(classify=ClassifySection(lm_weight=0.5)).validate()


# ---------------------------------------------------------------------------------------------- the loop


class ScriptedTask:
    """Next-token batches of random ids for a tiny model; evaluate() returns the scripted metrics in turn
    (then the last one again), so which step is best, and when patience runs out, is known in advance."""

    metric_names = ("loss", "accuracy", "macro_f1")

    def __init__(self, vocab: int, script: list[dict]):
        self.vocab, self.script, self.calls = vocab, script, 0

    def batch(self, split, batch_size, generator):
        x = torch.randint(self.vocab, (batch_size, 9), generator=generator)
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def loss(self, model, batch):
        return model(batch["input_ids"], targets=batch["labels"])

    def evaluate(self, model, full=False):
        row = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return dict(row)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


# evaluations at steps 5, 10, 15, 20, 25: the loss is best at step 10, the accuracy at step 15
SCRIPT = [
    {"loss": 1.0, "accuracy": 0.50, "macro_f1": 0.50},
    {"loss": 0.5, "accuracy": 0.55, "macro_f1": 0.40},
    {"loss": 0.8, "accuracy": 0.90, "macro_f1": 0.60},
    {"loss": 0.9, "accuracy": 0.60, "macro_f1": 0.70},
    {"loss": 0.7, "accuracy": 0.70, "macro_f1": 0.65},
]


def _fit_scripted(tmp_path, tokenizer, metric: str, patience: int = 0, steps: int = 25, script=SCRIPT):
    cfg = default_train_config()
    cfg.train.max_steps, cfg.train.device, cfg.train.precision, cfg.train.log_every = steps, "cpu", "fp32", 5
    cfg.eval.every, cfg.eval.best_metric, cfg.eval.patience = 5, metric, patience
    cfg.checkpoint.every_minutes = 0.0
    out = tmp_path / f"{metric}-{patience}"
    task = ScriptedTask(tokenizer.vocab_size, script)
    return fit(_model(tokenizer).train(), tokenizer, task, cfg, out), out


@pytest.mark.parametrize(("metric", "step"), [("loss", 10), ("accuracy", 15), ("macro_f1", 20)])
def test_best_follows_the_chosen_metric(tmp_path, tokenizer, metric, step):
    res, out = _fit_scripted(tmp_path, tokenizer, metric)
    assert res["best"] == {"metric": metric, "value": SCRIPT[step // 5 - 1][metric], "step": step}
    assert load_checkpoint(out / "best").meta["step"] == step
    assert json.loads((out / "best" / "state.json").read_text())["best"]["step"] == step
    assert res["step"] == 25 and not res["early_stopped"]
    assert (res["best_val_loss"] is None) == (metric != "loss")


def test_a_final_evaluation_better_than_every_periodic_one_becomes_best(tmp_path, tokenizer):
    # periodic evaluations at steps 5, 10, 15, 20; the final one (step 25, the whole split) is the best
    script = [*SCRIPT[:4], {"loss": 0.2, "accuracy": 0.95, "macro_f1": 0.9}]
    res, out = _fit_scripted(tmp_path, tokenizer, "accuracy", script=script)
    assert res["best"] == {"metric": "accuracy", "value": 0.95, "step": 25}
    assert load_checkpoint(out / "best").meta["step"] == 25


def test_early_stopping_stops_after_patience_evaluations_without_a_better_metric(tmp_path, tokenizer):
    # accuracy best at step 15; steps 20 and 25 are no better: patience 2 stops at step 25 of 50
    script = [*SCRIPT[:4], {"loss": 0.1, "accuracy": 0.85, "macro_f1": 0.9}, *SCRIPT]
    res, out = _fit_scripted(tmp_path, tokenizer, "accuracy", patience=2, steps=50, script=script)
    assert res["early_stopped"] and res["step"] == 25 and res["best"]["step"] == 15
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["split"] == "train") == 25
    assert (out / "final" / "model.safetensors").exists()
    # patience 3: the stale evaluations are steps 20, 25 and 30
    res3, _ = _fit_scripted(tmp_path, tokenizer, "accuracy", patience=3, steps=50, script=script)
    assert res3["early_stopped"] and res3["step"] == 30
    res0, _ = _fit_scripted(tmp_path, tokenizer, "accuracy", patience=0, steps=50, script=script)
    assert not res0["early_stopped"] and res0["step"] == 50


def test_a_classification_metric_is_refused_for_a_task_that_does_not_report_it(tmp_path, tokenizer):
    task = ScriptedTask(tokenizer.vocab_size, SCRIPT)
    task.metric_names = ("loss",)
    cfg = default_train_config()
    cfg.train.max_steps, cfg.train.device, cfg.eval.best_metric = 5, "cpu", "accuracy"
    with pytest.raises(UserError, match="best_metric 'accuracy' is not reported"):
        fit(_model(tokenizer), tokenizer, task, cfg, tmp_path / "x")


# ---------------------------------------------------------------------------------------------- the recipe


def test_recipe_settings_are_kept_in_the_checkpoint(tmp_path, tokenizer):
    data = _csv(tmp_path / "train.csv", _reviews(80))
    base = save_checkpoint(tmp_path / "base", _model(tokenizer), tokenizer)
    cfg = default_train_config("classify")
    cfg.train.max_steps, cfg.train.device, cfg.eval.every, cfg.checkpoint.every_minutes = 12, "cpu", 6, 0.0
    cfg.classify = ClassifySection(pooling="mean", dropout=0.2, class_weights="balanced", val_examples=5)
    res = finetune(base, tmp_path / "run", FinetuneOptions(task="classify", data=str(data)), cfg, quiet=True)
    assert res["best"]["metric"] == "accuracy" and res["final"]["examples"] == 8  # the whole val split
    for d in ("best", "final"):
        lm = load_checkpoint(tmp_path / "run" / d)
        assert lm.meta["pooling"] == "mean" and lm.meta["dropout"] == 0.2
        assert lm.meta["finetune"]["classify"] == asdict(cfg.classify)
        clf = Classifier.from_language_model(lm)
        assert clf.pooling == "mean" and clf.drop.p == 0.2
    val_rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["examples"] for r in val_rows if r["split"] == "val"] == [5, 8]  # periodic sample, then all


def test_finetune_with_lm_weight_saves_a_classifier_like_one_trained_without(tmp_path, tokenizer, capsys):
    data = _csv(tmp_path / "train.csv", _reviews(80))
    base = save_checkpoint(tmp_path / "base", _model(tokenizer), tokenizer)  # llama: an untied lm_head
    runs = {}
    for name, extra in (("plain", ()), ("aux", ("--lm-weight", "0.5")), ("aux-lora", ("--lm-weight", "0.5"))):
        lora = ("--lora-rank", "4") if name == "aux-lora" else ()
        code, _, err = cli_in_process(
            capsys,
            *("finetune", "--model", str(base), "--task", "classify", "--data", str(data)),
            *(
                "--max-steps",
                "8",
                "--out",
                str(tmp_path / name),
                "--train.device",
                "cpu",
                "--eval.every",
                "4",
            ),
            *extra,
            *lora,
        )
        assert code == 0, err
        runs[name] = load_checkpoint(tmp_path / name / "final")
    plain = runs["plain"]
    for name in ("aux", "aux-lora"):
        lm = runs[name]
        assert lm.meta["finetune"]["classify"]["lm_weight"] == 0.5
        assert "lm_weight = 0.5" in (tmp_path / name / "train_config.toml").read_text()
        # training-only: the head's tensors and meta are those of a run without it
        assert {k: tuple(v.shape) for k, v in lm.extra_tensors.items()} == {
            k: tuple(v.shape) for k, v in plain.extra_tensors.items()
        }
        assert {k: lm.meta[k] for k in ("task", "labels", "pooling", "dropout")} == {
            k: plain.meta[k] for k in ("task", "labels", "pooling", "dropout")
        }
        clf = Classifier.from_pretrained(tmp_path / name / "final")
        ((label, probs),) = clf.predict(["great film"])
        assert (
            clf.labels == ["negative", "positive"] and label in probs and abs(sum(probs.values()) - 1) < 1e-5
        )
    assert plain.meta["finetune"]["classify"]["lm_weight"] == 0.0
    # the LM loss trains the untied lm_head, which a run without it leaves as it was
    head0 = load_checkpoint(base).model.lm_head.weight
    assert torch.equal(plain.model.lm_head.weight, head0)
    assert not torch.equal(runs["aux"].model.lm_head.weight, head0)


def test_lm_weight_under_dp_is_refused_as_dp_classification_is(tmp_path, tokenizer):
    data = _csv(tmp_path / "train.csv", _reviews(80))
    base = save_checkpoint(tmp_path / "base", _model(tokenizer), tokenizer)
    cfg = default_train_config("classify")
    cfg.train.max_steps, cfg.train.device, cfg.train.precision, cfg.privacy.epsilon = 4, "cpu", "fp32", 8.0
    cfg.classify.lm_weight = 0.5
    with pytest.raises(UserError, match="not classify"):
        finetune(base, tmp_path / "dp", FinetuneOptions(task="classify", data=str(data)), cfg, quiet=True)


def test_classify_settings_are_refused_for_other_tasks(tmp_path, tokenizer):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n", encoding="utf-8")
    base = save_checkpoint(tmp_path / "base", _model(tokenizer), tokenizer)
    cfg = default_train_config("sft")
    cfg.classify.pooling = "mean"  # not the default
    with pytest.raises(UserError, match=r"classify\.pooling applies to --task classify only"):
        finetune(base, tmp_path / "o", FinetuneOptions(task="sft", data=str(data)), cfg, quiet=True)
    cfg = default_train_config("sft")
    cfg.eval.best_metric = "macro_f1"
    with pytest.raises(UserError, match="classification metric"):
        finetune(base, tmp_path / "o", FinetuneOptions(task="sft", data=str(data)), cfg, quiet=True)


def test_pretrain_on_the_task_text_then_finetune_gives_a_loadable_classifier(tmp_path):
    rows = _reviews(700, seed=1)
    data = _csv(tmp_path / "train.csv", rows)
    cfg = default_train_config("classify")
    cfg.train.max_steps, cfg.train.device, cfg.eval.every, cfg.checkpoint.every_minutes = 30, "cpu", 15, 0.0
    opts = FinetuneOptions(task="classify", data=str(data), pretrain_minutes=0.05)
    res = finetune(None, tmp_path / "run", opts, cfg, quiet=True)
    pre = res["pretrain"]
    assert pre["steps"] > 0 and pre["texts"] == 630  # the 10% held out for validation stays unseen
    corpus = [json.loads(r)["text"] for r in Path(pre["corpus"]).read_text(encoding="utf-8").splitlines()]
    assert len(corpus) == 630 and set(corpus) <= {r["text"] for r in rows}
    clf = Classifier.from_pretrained(tmp_path / "run" / "best")
    assert clf.labels == ["negative", "positive"]
    assert clf.tokenizer.fingerprint == load_checkpoint(pre["model_dir"]).tokenizer.fingerprint
    ((label, probs),) = clf.predict(["great film"])
    assert label in probs and abs(sum(probs.values()) - 1) < 1e-5
    assert load_checkpoint(tmp_path / "run" / "final").meta["finetune"]["pretrain"]["steps"] == pre["steps"]


def test_pretrain_corpus_adds_unlabelled_text_to_the_pretraining(tmp_path):
    rows = _reviews(200, seed=2)
    data = _csv(tmp_path / "train.csv", rows)
    extra = [f"an unlabelled review number {i} about a film" for i in range(40)]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in extra))
    cfg = default_train_config("classify")
    cfg.train.max_steps, cfg.train.device, cfg.eval.every, cfg.checkpoint.every_minutes = 4, "cpu", 0, 0.0
    cfg.eval.patience = 0
    cfg.train.clock, cfg.train.seed = "cpu", 7  # the pre-training takes both from the fine-tuning's settings
    opts = FinetuneOptions(
        task="classify", data=str(data), pretrain_minutes=0.02, pretrain_corpus=str(tmp_path / "extra.jsonl")
    )
    pre = finetune(None, tmp_path / "run", opts, cfg, quiet=True)["pretrain"]
    pre_cfg = (tmp_path / "run" / "pretrain" / "train_config.toml").read_text()
    assert 'clock = "cpu"' in pre_cfg and "seed = 7" in pre_cfg
    corpus = [json.loads(r)["text"] for r in Path(pre["corpus"]).read_text(encoding="utf-8").splitlines()]
    n = pre["texts"]
    assert 150 < n < 200 and pre["extra_documents"] == 40 and len(corpus) == n + 40
    assert corpus[n:] == extra and set(corpus[:n]) <= {r["text"] for r in rows}


# ---------------------------------------------------------------------------------------------- the CLI


def test_finetune_help_shows_the_recipe_defaults():
    from yuyan.cli.finetune import CLASSIFY_HELP

    d = ClassifySection()
    assert CLASSIFY_HELP["pooling"].endswith(f"(default: {d.pooling})")
    assert CLASSIFY_HELP["dropout"].endswith(f"(default: {d.dropout})")
    assert CLASSIFY_HELP["class_weights"].endswith(f"(default: {d.class_weights})")
    assert CLASSIFY_HELP["bucket"].endswith(f"(default: {'bucket' if d.bucket else 'no-bucket'})")
    assert CLASSIFY_HELP["val_examples"].endswith(f"(default: {d.val_examples})")
    assert CLASSIFY_HELP["lm_weight"].endswith(f"(default: {d.lm_weight})")
    cfg = default_train_config("classify")
    assert (cfg.eval.best_metric, cfg.eval.patience) == ("accuracy", 8)


def test_finetune_help_lists_the_recipe_flags(capsys):
    code, out, _ = cli_in_process(capsys, "finetune", "--help")
    assert code == 0
    out = " ".join(out.replace("│", " ").split())  # rich's box and line wrapping
    flags = ("--pooling", "--dropout", "--class-weights", "--bucket", "--val-examples", "--lm-weight")
    for flag in (*flags, "--best-metric", "classify.lm_weight=0.0"):
        assert flag in out, flag
    assert "--patience" in out and "--pretrain-minutes" in out and "(default: accuracy for classify" in out
    assert "(default: last)" in out and "(default: 512)" in out


def test_finetune_cli_pretrains_and_finetunes_in_one_command(tmp_path, capsys):
    data = _csv(tmp_path / "train.csv", _reviews(700, seed=2))
    out = tmp_path / "cls"
    code, stdout, err = cli_in_process(
        capsys,
        *("finetune", "--task", "classify", "--data", str(data), "--pretrain-minutes", "0.05"),
        *("--max-steps", "20", "--out", str(out), "--train.device", "cpu", "--eval.every", "10"),
        *("--pooling", "last", "--no-bucket", "--best-metric", "macro_f1", "--class-weights", "balanced"),
    )
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["best"]["metric"] == "macro_f1" and summary["pretrain"]["steps"] > 0
    meta = load_checkpoint(out / "final").meta
    assert meta["pooling"] == "last" and meta["finetune"]["classify"]["bucket"] is False
    assert meta["finetune"]["classify"]["class_weights"] == "balanced"
    assert "[classify]" in (out / "train_config.toml").read_text()
