"""Evaluation: perplexity by hand, sliding-window coverage, BLEU/ROUGE against the reference libraries,
Chinese ROUGE, reports and compare, classification metrics, speed, and every `yuyan eval` command."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tests.conftest import make_checkpoint, tiny_config

from yuyan.evaluate.perplexity import encode_for_scoring, perplexity, token_nll, windows
from yuyan.evaluate.report import compare, compare_markdown, read_result, write_result
from yuyan.evaluate.text_metrics import CJKTokenizer, bleu, detect_tokenize, rouge
from yuyan.model.transformer import Transformer

EN_PRED = ["the cat sat on the mat", "a quick brown fox jumped over the dog", "hello world, this is a test"]
EN_REF = [
    "the cat is sitting on the mat",
    "the quick brown fox jumps over the lazy dog",
    "hello world this was a test",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Width-32 models: one thread is fastest, and it does not stall when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_perplexity_equals_exp_mean_nll_by_hand(tiny_model, tokenizer):
    texts = ["def f(x):\n    return x + 1\n", "语言模型是一种概率模型。", "The quick brown fox."]
    r = perplexity(tiny_model, tokenizer, texts)
    nlls = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tokenizer.eot_id] + tokenizer.encode(t))
            assert len(ids) <= tiny_model.config.block_size
            logp = F.log_softmax(tiny_model(ids[None, :-1])[0].double(), -1)  # (T-1, V)
            nlls.append(-logp[torch.arange(len(ids) - 1), ids[1:]])
    nll = torch.cat(nlls)
    assert r["tokens"] == len(nll) == sum(len(tokenizer.encode(t)) for t in texts)
    assert r["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    nbytes = sum(len(t.encode()) for t in texts)
    assert r["bytes"] == nbytes
    assert r["bits_per_byte"] == pytest.approx(float(nll.sum()) / math.log(2) / nbytes, rel=1e-5)


@pytest.mark.parametrize(
    "n,block,stride", [(1, 8, 4), (2, 8, 4), (8, 8, 8), (9, 8, 8), (100, 16, 5), (37, 10, 1)]
)
def test_windows_partition_targets_with_enough_context(n, block, stride):
    seen = []
    for k, (b, e, s) in enumerate(windows(n, block, stride)):
        assert e - b <= block and b < s <= e
        if k > 0:  # every later-scored target p sees tokens b..p-1: at least block - stride of them
            assert s - 1 - b + 1 >= block - stride
        seen += list(range(s, e))
    assert seen == list(range(1, n))  # each target exactly once, in order


def test_sliding_window_scores_every_token_once(tiny_model, tokenizer, texts):
    long = tokenizer.encode(texts[0])[:300]
    short = long[:50]
    # text that fits: the sliding window with the full context equals one full-context forward
    full = F.cross_entropy(
        tiny_model(torch.tensor([short[:-1]]))[0], torch.tensor(short[1:]), reduction="none"
    )
    (got,) = token_nll(tiny_model, [short], block_size=64, stride=16)
    torch.testing.assert_close(got, full.detach(), rtol=1e-5, atol=1e-5)
    # long text: each target scored exactly once, each with the window that windows() assigns it
    seqs = [long, short, long[:70]]
    got = token_nll(tiny_model, seqs, block_size=32, stride=12, batch_size=3)
    assert [len(g) for g in got] == [len(s) - 1 for s in seqs]
    expect = torch.empty(len(long) - 1)
    for b, e, s in windows(len(long), 32, 12):
        x = torch.tensor([long[b:e]])
        nll = F.cross_entropy(tiny_model(x[:, :-1])[0], x[0, 1:], reduction="none").detach()
        expect[s - 1 : e - 1] = nll[s - b - 1 :]
    torch.testing.assert_close(got[0], expect, rtol=1e-5, atol=1e-5)
    # the first window's tokens have the same scores as a full-context forward of them
    torch.testing.assert_close(got[0][:31], token_nll(tiny_model, [long[:32]])[0], rtol=1e-5, atol=1e-5)
    # batching and padding change nothing
    one = token_nll(tiny_model, seqs, block_size=32, stride=12, batch_size=1)
    for a, b in zip(got, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_perplexity_bad_input(tiny_model, tokenizer):
    from yuyan.errors import UserError

    with pytest.raises(UserError, match="stride"):
        perplexity(tiny_model, tokenizer, ["some text here"], block_size=16, stride=32)
    with pytest.raises(UserError, match="empty"):
        perplexity(tiny_model, tokenizer, [])
    assert encode_for_scoring(tokenizer, "x")[0] == tokenizer.eot_id


def test_bleu_equals_sacrebleu():
    r = bleu(EN_PRED, EN_REF)
    ref = sacrebleu.corpus_bleu(EN_PRED, [EN_REF], tokenize="13a")
    assert r["tokenize"] == "13a" and r["bleu"] == pytest.approx(ref.score) and r["bleu"] > 0
    zh_pred, zh_ref = (
        ["今天天气很好，我们去公园。", "他喜欢读书"],
        ["今天天气不错，我们去公园吧。", "他很喜欢读书"],
    )
    assert detect_tokenize(zh_ref) == "zh"
    assert bleu(zh_pred, zh_ref)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(zh_pred, [zh_ref], tokenize="zh").score
    )
    assert (
        bleu(zh_pred, zh_ref)["bleu"] > bleu(zh_pred, zh_ref, tokenize="13a")["bleu"]
    )  # 13a sees whole sentences
    intl = bleu(EN_PRED, EN_REF, tokenize="intl")
    assert intl["bleu"] == pytest.approx(sacrebleu.corpus_bleu(EN_PRED, [EN_REF], tokenize="intl").score)
    # several references per prediction
    multi = bleu(EN_PRED, [[r, p] for r, p in zip(EN_REF, EN_PRED, strict=True)])
    assert multi["bleu"] == pytest.approx(100.0)


def test_rouge_equals_rouge_score_on_english():
    r = rouge(EN_PRED, EN_REF)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])  # its default tokenizer
    for t in ("rouge1", "rouge2", "rougeL"):
        f = [scorer.score(ref, p)[t].fmeasure for p, ref in zip(EN_PRED, EN_REF, strict=True)]
        assert r[t] == pytest.approx(100 * sum(f) / len(f))
    assert CJKTokenizer().tokenize("Hello, World_42 x") == ["hello", "world", "42", "x"]


def test_rouge_chinese_hand_made():
    pred, ref = "猫坐在垫子上", "猫在垫子上"
    # the default tokenizer drops CJK: everything scores 0
    assert rouge_scorer.RougeScorer(["rouge1"]).score(ref, pred)["rouge1"].fmeasure == 0.0
    r = rouge([pred], [ref])
    # unigrams: pred 6 chars, ref 5, all 5 of ref present -> P 5/6, R 1
    assert r["rouge1_precision"] == pytest.approx(100 * 5 / 6) and r["rouge1_recall"] == pytest.approx(100.0)
    assert r["rouge1"] == pytest.approx(100 * 10 / 11)
    # bigrams: pred {猫坐 坐在 在垫 垫子 子上}, ref {猫在 在垫 垫子 子上}: 3 shared -> P 3/5, R 3/4
    assert r["rouge2"] == pytest.approx(100 * 2 * 0.6 * 0.75 / 1.35)
    # LCS 猫在垫子上 = 5
    assert r["rougeL"] == pytest.approx(100 * 10 / 11)
    mixed = rouge(["GPT 模型 works"], ["GPT 模型 fails"])
    assert mixed["rouge1"] == pytest.approx(100 * 3 / 4)  # gpt 模 型 shared out of 4 tokens each


def test_report_and_compare(tmp_path):
    a = {
        "eval": "perplexity",
        "model": "A",
        "metrics": {"loss": 2.0, "tokens": 100, "note": "x"},
        "settings": {},
    }
    b = {
        "eval": "perplexity",
        "model": "B",
        "metrics": {"loss": 1.5, "tokens": 100, "extra": 3.0},
        "settings": {},
    }
    ja, ma = write_result(a, tmp_path / "a")
    jb, _ = write_result(b, tmp_path / "b")
    assert read_result(ja) == a and "| loss | 2.0000 |" in ma.read_text()
    assert not list((tmp_path / "a").glob(".*tmp*"))  # no temp file left behind
    rows = {r["metric"]: r for r in compare(ja, jb)["rows"]}
    assert rows["loss"]["diff"] == pytest.approx(-0.5) and rows["loss"]["rel"] == pytest.approx(-0.25)
    assert rows["tokens"]["diff"] == 0 and rows["extra"]["a"] is None and rows["note"]["diff"] is None
    assert "-25.00%" in compare_markdown(compare(a, b))


def _classifier_checkpoint(tmp_path, tokenizer):

    from yuyan.model.checkpoint import save_checkpoint
    from yuyan.model.heads import Classifier

    torch.manual_seed(0)
    clf = Classifier(
        Transformer(tiny_config(vocab_size=tokenizer.vocab_size)), ["neg", "pos"], tokenizer=tokenizer
    )
    path = save_checkpoint(
        tmp_path / "clf", clf.model, tokenizer, meta=clf.head_meta(), extra_tensors=clf.head_tensors()
    )
    return clf.eval(), path


def test_classify_metrics_match_predictions(tmp_path, tokenizer):
    from yuyan.evaluate.classify import evaluate_classifier, read_labelled

    clf, _ = _classifier_checkpoint(tmp_path, tokenizer)
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"sample {i} text", "label": ["neg", "pos"][i % 2]} for i in range(10)] + [
        {"text": "x", "label": "odd"}
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    ex = read_labelled(data)
    r = evaluate_classifier(clf, ex)
    preds = [lab for lab, _ in clf.predict([t for t, _ in ex])]
    assert r["accuracy"] == pytest.approx(sum(p == y for p, (_, y) in zip(preds, ex, strict=True)) / len(ex))
    assert sum(map(sum, r["confusion"])) == 10 and r["unknown_labels"] == ["odd"]


def test_speed_reports_everything(tiny_model):
    from yuyan.evaluate.speed import speed
    from yuyan.model.flops import flops_per_token, num_params

    r = speed(tiny_model, prompt_len=8, new_tokens=6, batch_sizes=(1, 2), repeats=1)
    assert r["params"] == num_params(tiny_model) and r["flops_per_token"] == flops_per_token(tiny_model, 14)
    for k in ("ttft_ms", "decode_tok_s_b1", "decode_tok_s_b2", "peak_rss_mb"):
        assert r[k] > 0


def test_cli_eval_commands(run_cli, tmp_path, tokenizer):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)  # the CLI runs once, on one family
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 20, encoding="utf-8")
    out = tmp_path / "out"
    r = run_cli(
        "eval",
        "perplexity",
        "--model",
        ckpt,
        "--corpus",
        corpus,
        "--stride",
        "16",
        "--out",
        out / "a",
        check=True,
    )
    res = json.loads((out / "a" / "perplexity.json").read_text())
    assert (
        res["metrics"]["tokens"] == len(tokenizer.encode(corpus.read_text())) and "bits_per_byte" in r.stdout
    )
    assert (out / "a" / "perplexity.md").read_text().startswith("# perplexity")
    write_result(
        {**res, "model": "B", "metrics": {**res["metrics"], "loss": res["metrics"]["loss"] / 2}},
        tmp_path / "b",  # beside the CLI's output folder: a folder yuyan's CLI did not write is not reused
    )
    r = run_cli(
        "eval",
        "compare",
        out / "a" / "perplexity.json",
        tmp_path / "b" / "perplexity.json",
        "--out",
        out,
        check=True,
    )
    assert "-50.00%" in r.stdout and "-50.00%" in (out / "compare.md").read_text()
    preds = tmp_path / "preds.jsonl"
    hyp, ref = EN_PRED + ["猫坐在垫子上"], EN_REF + ["猫在垫子上"]
    preds.write_text(
        "\n".join(
            json.dumps({"prediction": p, "reference": r}, ensure_ascii=False)
            for p, r in zip(hyp, ref, strict=True)
        )
    )
    run_cli(
        "eval", "bleu", "--predictions", preds, "--out", out, check=True
    )  # CJK in references: zh detected
    got = json.loads((out / "bleu.json").read_text())["metrics"]
    assert got["tokenize"] == "zh" and got["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hyp, [ref], tokenize="zh").score
    )
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": p, "reference": r}) for p, r in zip(EN_PRED, EN_REF, strict=True))
    )
    run_cli(
        "eval",
        "rouge",
        "--model",
        ckpt,
        "--data",
        data,
        "--max-new-tokens",
        "8",
        "--stop",
        "\n",
        "--out",
        out / "gen",
        check=True,
    )
    gen = json.loads((out / "gen" / "rouge.json").read_text())
    assert gen["metrics"]["examples"] == 3 and gen["settings"]["stop"] == ["\n"]
    run_cli("eval", "speed", "--model", ckpt, "--new-tokens", "4", "--repeats", "1", "--out", out, check=True)
    assert json.loads((out / "speed.json").read_text())["metrics"]["decode_tok_s_b8"] > 0
    bad = run_cli("eval", "rouge", "--predictions", tmp_path / "missing.jsonl")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_cli_eval_classify(run_cli, tmp_path, tokenizer):
    _, ckpt = _classifier_checkpoint(tmp_path, tokenizer)
    data = tmp_path / "test.csv"
    data.write_text("text,label\ngood film,pos\nbad film,neg\nfine,pos\n")
    r = run_cli("eval", "classify", "--model", ckpt, "--data", data, "--out", tmp_path / "o", check=True)
    res = json.loads((tmp_path / "o" / "classify.json").read_text())["metrics"]
    assert res["examples"] == 3 and 0 <= res["accuracy"] <= 1 and "confusion" in r.stdout
