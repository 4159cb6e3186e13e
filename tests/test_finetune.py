"""Fine-tuning: SFT loss masks, bad-data reports, classification accuracy on held-out words, an SFT format,
LoRA through the recipe, resume, the docstring task and the `yuyan finetune` command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_config

from yuyan.data.tasks import IGNORE, ClassifyTask, DataReport, SFTTask, collate_sft, render_sft, sft_examples
from yuyan.errors import UserError
from yuyan.model.checkpoint import load_checkpoint, save_checkpoint
from yuyan.model.heads import Classifier, classification_metrics
from yuyan.model.transformer import Transformer
from yuyan.train.finetune import FinetuneOptions, default_train_config, finetune


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def _cfg(steps: int, lr: float = 3e-3, batch: int = 16, every: int = 0):
    cfg = default_train_config()
    cfg.train.max_steps, cfg.train.lr, cfg.train.min_lr, cfg.train.batch_size = steps, lr, lr / 10, batch
    cfg.train.warmup, cfg.train.device, cfg.eval.every, cfg.checkpoint.every_minutes = 5, "cpu", every, 0.0
    cfg.train.log_every = 20
    return cfg


def _checkpoint(tmp_path, tokenizer, family="gpt2", seed=0, **kw) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(
        tmp_path / f"base-{family}",
        Transformer(tiny_config(family, vocab_size=tokenizer.vocab_size, **kw)),
        tokenizer,
    )


# ---------------------------------------------------------------------------------------------- SFT masks


def test_sft_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi!"},
        {"role": "user", "content": "语言?"},
        {"role": "assistant", "content": "模型 ok"},
    ]
    end = tokenizer.token_to_id("<|end|>")
    expected = tokenizer.encode("hi!") + [end] + tokenizer.encode("模型 ok") + [end]  # what must be learned
    ids, mask = render_sft(tokenizer, {"messages": msgs})
    short_ids, short_mask = render_sft(tokenizer, {"prompt": "2+2?", "completion": "4"}, template="plain")
    b = collate_sft([(ids, mask), (short_ids, short_mask)], pad_id=tokenizer.pad_id)
    x, y = b["input_ids"], b["labels"]
    assert x.shape == y.shape == (2, len(ids) - 1)
    row = y[0]
    assert row[row != IGNORE].tolist() == expected
    # each label is the next input token: the loss at t predicts token t+1
    for t in (row != IGNORE).nonzero().flatten().tolist()[:-1]:
        assert x[0, t + 1] == row[t]
    # the padded row: only its completion (+ EOT) is learned, pads carry no loss
    r1 = y[1]
    assert r1[r1 != IGNORE].tolist() == tokenizer.encode("4") + [tokenizer.eot_id]
    assert (x[1, len(short_ids) - 1 :] == tokenizer.pad_id).all()
    assert (r1[len(short_ids) - 1 :] == IGNORE).all()


def test_bad_sft_data_is_counted(tmp_path, tokenizer):
    long = "word " * 400
    path = _write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "",
            "{not json",
            {"messages": [{"role": "user", "content": "no answer here"}]},
            {"prompt": "p", "completion": "c"},
            {"prompt": "short", "completion": long},
            {"prompt": long, "completion": "lost"},
            {"text": "neither format"},
        ],
    )
    report = DataReport(str(path))
    from yuyan.data.tasks import read_records

    ex = sft_examples(read_records(path, report), tokenizer, 65, report)
    c = report.counts
    assert (c["empty_lines"], c["bad_json_lines"], c["no_assistant_turn"], c["missing_fields"]) == (
        1,
        1,
        1,
        1,
    )
    assert c["truncated"] == 2 and c["no_target_tokens_after_truncation"] == 1
    assert len(ex) == 3 and all(len(ids) <= 65 for ids, _ in ex)
    assert "1 no assistant turn" in report.summary()
    with pytest.raises(UserError, match="no usable training examples"):
        SFTTask.from_files(_write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}]), tokenizer, 64)


def test_bad_classification_data(tmp_path, tokenizer):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(
        "sentence,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\nnice,pos\n", encoding="utf-8"
    )
    with pytest.raises(UserError, match="no column 'text'.*--text-field"):
        ClassifyTask.from_files(csv_path, tokenizer, 64)
    ok = ClassifyTask.from_files(csv_path, tokenizer, 64, text_field="sentence")
    assert ok.labels == ["neg", "pos"]
    train = _write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"text": "a", "label": "x"},
            {"text": "b", "label": "y"},
            "",
            {"text": "", "label": "x"},
            {"text": "c " * 200, "label": "x"},
        ],
    )
    val = _write_jsonl(
        tmp_path / "v.jsonl", [{"text": "a", "label": "x"}, {"text": "z", "label": "never-seen"}]
    )
    t = ClassifyTask.from_files(train, tokenizer, 32, val_path=str(val))
    c = t.report.counts
    assert (c["empty_lines"], c["empty_text_or_label"], c["val_labels_unseen_in_train"], c["truncated"]) == (
        1,
        1,
        1,
        1,
    )
    assert len(t.val) == 1 and max(len(ids) for ids, _ in t.train) == 32
    single = _write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}] * 3)
    with pytest.raises(UserError, match="at least 2"):
        ClassifyTask.from_files(single, tokenizer, 32)


def test_classification_metrics_reference():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    # per-class F1: c0 p=1/2 r=1/2 -> .5; c1 p=2/3 r=1 -> .8; c2 p=0 r=0 -> 0
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------- sentiment

EN_TEMPLATES = [
    "the {s} was {a} .",
    "i found the {s} really {a}",
    "honestly this {s} is {a} !",
    "my friends said the {s} felt {a}",
    "overall , {s} : {a}",
]
ZH_TEMPLATES = ["这个{s}很{a}。", "我觉得{s}非常{a}", "大家都说{s}{a}！", "总的来说{s}{a}"]
EN_SUBJ = [
    "movie",
    "food",
    "service",
    "hotel",
    "book",
    "song",
    "game",
    "phone",
    "car",
    "class",
    "show",
    "coffee",
]
ZH_SUBJ = ["电影", "饭菜", "服务", "酒店", "小说", "手机", "课程", "音乐"]
EN_ADJ = {
    "positive": ["good", "great", "wonderful", "excellent", "lovely"],
    "negative": ["bad", "terrible", "awful", "boring", "horrible"],
}
ZH_ADJ = {"positive": ["好", "棒", "精彩", "出色"], "negative": ["差", "糟糕", "难看", "无聊"]}


def sentiment_data() -> tuple[list[dict], list[dict]]:
    """Train on most subjects and templates; hold out 4+2 subjects and one template per language entirely
    (the sentiment words themselves appear in training: they are what must be learned)."""
    train, held = [], []
    for templates, subjects, adjs, n_held_s in (
        (EN_TEMPLATES, EN_SUBJ, EN_ADJ, 4),
        (ZH_TEMPLATES, ZH_SUBJ, ZH_ADJ, 2),
    ):
        for ti, tpl in enumerate(templates):
            for si, s in enumerate(subjects):
                for label, words in adjs.items():
                    for a in words:
                        row = {"text": tpl.format(s=s, a=a), "label": label}
                        unseen = ti == len(templates) - 1 or si >= len(subjects) - n_held_s
                        (held if unseen else train).append(row)
    random.Random(0).shuffle(train)
    return train, held


def test_sentiment_classifier_reaches_90_percent_on_held_out_words(tmp_path, tokenizer):
    train, held = sentiment_data()
    data = _write_jsonl(tmp_path / "sent.jsonl", train)
    base = _checkpoint(tmp_path, tokenizer, "llama")
    res = finetune(
        base, tmp_path / "run", FinetuneOptions(task="classify", data=str(data)), _cfg(250), quiet=True
    )
    assert res["final"]["accuracy"] >= 0.9 and Path(res["confusion_png"]).stat().st_size > 0
    clf = Classifier.from_pretrained(res["final_dir"])
    # the recipe default; on these templates mean pooling generalises worse to unseen words (0.88)
    assert clf.labels == ["negative", "positive"] and clf.pooling == "last"
    preds = clf.predict([r["text"] for r in held])
    acc = sum(p == r["label"] for (p, _), r in zip(preds, held, strict=True)) / len(held)
    assert acc >= 0.9, acc
    assert all(abs(sum(probs.values()) - 1) < 1e-5 for _, probs in preds)
    # the checkpoint is a plain model plus head tensors: the LM side opens unchanged
    lm = load_checkpoint(res["final_dir"])
    assert lm.meta["task"] == "classify" and set(lm.extra_tensors) == {"score.weight", "score.bias"}


# ---------------------------------------------------------------------------------------------- SFT format


def _greedy(model, tokenizer, prompt_ids, n=8):
    ids = list(prompt_ids)
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tokenizer.decode(ids[len(prompt_ids) :])


def test_sft_teaches_a_response_format(tmp_path, tokenizer):
    words = [
        "cat",
        "dog",
        "sun",
        "tree",
        "milk",
        "rain",
        "book",
        "fish",
        "star",
        "road",
        "king",
        "song",
        "wind",
        "lamp",
        "door",
        "bird",
        "rock",
        "ship",
        "gold",
        "snow",
    ]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {w}?"},
                {"role": "assistant", "content": f"ANSWER: {w}"},
            ]
        }
        for w in words[:16]
    ]
    data = _write_jsonl(tmp_path / "sft.jsonl", rows)
    base = _checkpoint(tmp_path, tokenizer, "gpt2")
    lm = load_checkpoint(base)
    held = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"what is {w}?"}], add_generation_prompt=True
        )[0]
        for w in words[16:]
    ]
    assert not any(_greedy(lm.model, tokenizer, p).startswith("ANSWER:") for p in held)
    res = finetune(
        base,
        tmp_path / "run",
        FinetuneOptions(task="sft", data=str(data)),
        _cfg(200, lr=5e-3, batch=8),
        quiet=True,
    )
    tuned = load_checkpoint(res["final_dir"]).model
    outs = [_greedy(tuned, tokenizer, p) for p in held]
    assert all(o.startswith("ANSWER: ") for o in outs), outs


# ---------------------------------------------------------------------------------------------- LoRA recipe, resume


def test_lora_finetune_saves_adapter_and_merged_model_and_resumes(tmp_path, tokenizer):
    rows = [
        {"prompt": f"say {w}", "completion": f"{w} {w}"} for w in ["a", "b", "c", "d", "e", "f", "g", "h"]
    ]
    data = _write_jsonl(tmp_path / "pc.jsonl", rows)
    base = _checkpoint(tmp_path, tokenizer, "llama")
    from yuyan.model.lora import LoRAConfig, load_adapter

    opts = FinetuneOptions(
        task="sft",
        data=str(data),
        lora=LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]),
        save_adapter=True,
    )
    cfg = _cfg(12, lr=1e-2, batch=4)
    cfg.checkpoint.every_steps = 6
    res = finetune(base, tmp_path / "lora", opts, cfg, quiet=True)
    assert res["trainable_params"] < res["total_params"] / 10
    base_lm, merged = load_checkpoint(base), load_checkpoint(res["final_dir"])
    x = torch.randint(0, tokenizer.vocab_size, (2, 10))
    assert not torch.allclose(base_lm.model(x), merged.model(x))  # training changed the function
    # frozen base weights outside the LoRA targets are bitwise those of the base
    b, m = base_lm.model.state_dict(), merged.model.state_dict()
    assert all(torch.equal(b[k], m[k]) for k in b if "q_proj" not in k and "v_proj" not in k)
    load_adapter(base_lm.model, res["adapter_dir"])
    assert (base_lm.model(x) - merged.model(x)).abs().max() < 1e-5
    from yuyan.model import load

    via_load = load(res["adapter_dir"])  # an adapter folder opens as its base + the adapter
    assert (via_load.model(x) - merged.model(x)).abs().max() < 1e-5 and via_load.meta["task"] == "sft"
    # resume continues to a longer schedule from the newest checkpoint
    cfg2 = _cfg(18, lr=1e-2, batch=4)
    res2 = finetune(base, tmp_path / "lora", opts, cfg2, resume=True, quiet=True)
    assert res2["step"] == 18


def test_finetune_lm_task_on_a_text_file(tmp_path, tokenizer):
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 3000, encoding="utf-8")  # several 16 KB sections
    base = _checkpoint(tmp_path, tokenizer, "gpt2")
    res = finetune(
        base, tmp_path / "lm", FinetuneOptions(task="lm", data=str(text)), _cfg(30, batch=4), quiet=True
    )
    # an untrained model starts near ln(512) = 6.2 nats; 30 steps on a repeated snippet must cut that clearly
    assert res["final"]["loss"] < 4.5 and "bpb" in res["final"] and Path(res["final_dir"]).is_dir()


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_finetune_classify_lora_and_errors(tmp_path, tokenizer, run_cli, capsys):
    train, held = sentiment_data()
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(
        "sentence,sentiment\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in train[:120]),
        encoding="utf-8",
    )
    base = _checkpoint(tmp_path, tokenizer, "gpt2")
    out = tmp_path / "cls"
    p = run_cli(
        "finetune",
        "--model",
        base,
        "--task",
        "classify",
        "--data",
        csv_path,
        "--text-field",
        "sentence",
        "--label-field",
        "sentiment",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj,up_proj",
        "--save-adapter",
        "--pooling",
        "mean",
        "--max-steps",
        "20",
        "--out",
        out,
        "--train.device",
        "cpu",
        "--eval.every",
        "10",
    )
    assert p.returncode == 0, p.stderr
    assert "accuracy" in p.stdout and (out / "final" / "model.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "confusion_matrix.png").exists()
    clf = Classifier.from_pretrained(out / "final")
    assert clf.pooling == "mean" and clf.labels == ["negative", "positive"]
    via_adapter = Classifier.from_pretrained(out / "adapter")
    texts = [r["text"] for r in held[:6]]
    assert [p[0] for p in via_adapter.predict(texts)] == [p[0] for p in clf.predict(texts)]
    from tests.conftest import cli_in_process as _cli

    code, _, err = _cli(
        capsys, "finetune", "--model", base, "--task", "classify", "--data", csv_path, "--out", tmp_path / "x"
    )
    assert code == 2 and err.startswith("error: ") and "--text-field" in err and "Traceback" not in err
    code, _, err = _cli(
        capsys, "finetune", "--model", base, "--task", "nope", "--data", csv_path, "--out", tmp_path / "y"
    )
    assert code == 2 and "lm, sft, classify" in err
    code, out_text, _ = _cli(capsys, "finetune", "--help")
    assert code == 0 and "Example" in out_text


# ---------------------------------------------------------------------------------------------- docstring task

MODULE = '''
import os


def join_paths(a, b):
    """Join two paths with the separator.

    More text that is not the first line.
    """
    return os.path.join(a, b)


class Box:
    @staticmethod
    def area(w, h):
        """Return the area of a box {i}."""
        if w < 0:
            raise ValueError("negative")
        return w * h

    def only_doc(self):
        """Has nothing but a docstring."""
'''


def test_docstring_pairs_and_demo_recipe(tmp_path, tokenizer):
    from yuyan.data.corpus import split_of
    from yuyan.data.tasks import docstring_pairs
    from yuyan.train.finetune import run_docstring_finetune

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"mod_{i}.py").write_text(MODULE.replace("{i}", str(i)), encoding="utf-8")
    val_files = sorted(f"mod_{i}.py" for i in range(60) if split_of(f"mod_{i}.py") == "val")
    assert val_files  # the corpus split sends some files to val
    train, val = docstring_pairs("train", spec=str(corpus)), docstring_pairs("val", spec=str(corpus))
    assert len(train) == 2 * (60 - len(val_files)) and len(val) == 2 * len(val_files)
    p = train[0]
    assert p["completion"] == " Join two paths with the separator." and p["name"] == "join_paths"
    assert p["prompt"] == "def join_paths(a, b):\n    return os.path.join(a, b)\n# Summary:"
    area = train[1]
    assert (
        area["prompt"].startswith("@staticmethod\ndef area(w, h):\n    if w < 0:")
        and '"""' not in area["prompt"]
    )
    assert {int(q["completion"].split()[-1].rstrip(".")) for q in val if q["name"] == "area"} == {
        int(f[4:-3]) for f in val_files
    }
    torch.manual_seed(0)
    base = save_checkpoint(
        tmp_path / "base",
        Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size, block_size=128)),
        tokenizer,
    )
    s = run_docstring_finetune(base, tmp_path / "doc", minutes=0.05, eval_pairs=8, spec=str(corpus))
    assert set(s) >= {"rouge_l_before", "rouge_l_after", "bleu_before", "bleu_after"}
    assert 0 <= s["rouge_l_after"] <= 100 and s["eval_pairs"] == min(8, len(val)) and s["steps"] > 0
    assert json.loads((tmp_path / "doc" / "docstring_scores.json").read_text())["steps"] == s["steps"]


def test_demo_finetune_flag_reports_docstring_scores(run_cli, tmp_path):
    """`yuyan demo --finetune`: pre-train, fine-tune on the docstring task, print ROUGE-L/BLEU; a re-run reuses it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"mod_{i}.py").write_text(MODULE.replace("{i}", str(i)), encoding="utf-8")
    out = tmp_path / "demo"
    tiny = ["--data.vocab_size", "300", "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2",
            "--model.block_size", "96", "--train.batch_size", "4"]  # fmt: skip
    args = ["demo", "--minutes", "0.05", "--out", out, "--corpus", corpus,
            "--finetune", "--finetune-minutes", "0.05"]  # fmt: skip
    p = run_cli(*args, *tiny, check=True)
    line = next(x for x in p.stdout.splitlines() if x.startswith("docstring task"))
    scores = json.loads((out / "finetune" / "docstring_scores.json").read_text())
    assert f"ROUGE-L {scores['rouge_l_before']:.1f} -> {scores['rouge_l_after']:.1f}" in line
    assert scores["eval_pairs"] > 0 and (out / "finetune" / "final" / "model.safetensors").exists()
    again = run_cli(*args, *tiny, check=True)
    assert line in again.stdout
