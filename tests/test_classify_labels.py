"""Class names from `finetune --labels` through everything that shows them: the checkpoint, `eval classify`
(per-class report and PNG), `yuyan run sentiment`, and the Hugging Face export and import; plus the
non-terminal progress lines and the time budget without a hidden step cap, seen from the same runs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import tiny_config
from yuyan.evaluate.classify import per_class
from yuyan.model.checkpoint import save_checkpoint
from yuyan.model.heads import Classifier
from yuyan.model.transformer import Transformer

GOOD = ["good", "great", "fine", "nice", "lovely"]
BAD = ["bad", "awful", "poor", "dull", "ugly"]


def _tsv(path, n: int = 40):
    """A header-less TSV: text, then 1 (positive) or 0 (negative)."""
    rows = [f"the film was {(GOOD if i % 2 else BAD)[i % 5]} today\t{i % 2}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer, run_cli_module):
    d = tmp_path_factory.mktemp("labels")
    torch.manual_seed(0)
    base = save_checkpoint(d / "base", Transformer(tiny_config(vocab_size=tokenizer.vocab_size)), tokenizer)
    data = _tsv(d / "train.tsv")
    p = run_cli_module(
        "finetune",
        "--model",
        base,
        "--task",
        "classify",
        "--data",
        data,
        "--text-field",
        "0",
        "--label-field",
        "1",
        "--labels",
        "neg,pos",
        "--max-steps",
        "8",
        "--train.log_every",
        "2",
        "--train.progress_seconds",
        "0",
        "--train.device",
        "cpu",
        "--out",
        d / "run",
    )
    assert p.returncode == 0, p.stderr
    return d, data, p


@pytest.fixture(scope="module")
def run_cli_module():
    import os
    import subprocess
    import sys

    def run(*args, timeout: float = 300):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"}
        return subprocess.run(
            [sys.executable, "-m", "yuyan", *map(str, args)],
            capture_output=True,  # stderr is a pipe, not a terminal
            text=True,
            timeout=timeout,
            env=env,
        )

    return run


def test_names_are_saved_with_the_values_behind_them(trained):
    d, _, _ = trained
    meta = json.loads((d / "run" / "final" / "config.json").read_text())["meta"]
    assert meta["labels"] == ["neg", "pos"] and meta["label_values"] == ["0", "1"]
    clf = Classifier.from_pretrained(d / "run" / "final")
    assert clf.labels == ["neg", "pos"] and clf.name_of("1") == "pos" and clf.name_of("neg") == "neg"
    assert clf.name_of("2") is None
    assert {lab for lab, _ in clf.predict(["the film was good today", "bad"])} <= {"neg", "pos"}


def test_progress_is_logged_when_stderr_is_a_pipe(trained):
    _, _, p = trained
    lines = [ln for ln in p.stderr.splitlines() if re.match(r"train: \d+/8 steps \(\d+%\), ", ln)]
    assert len(lines) >= 4, p.stderr  # a line per step here (progress_seconds 0), not one bar at the end
    assert lines[-1].startswith("train: 8/8 steps (100%)") and "elapsed" in lines[-1] and "loss" in p.stderr


def test_eval_classify_reports_per_class_with_names(trained, run_cli_module):
    d, data, _ = trained
    out = d / "eval"
    r = run_cli_module(
        "eval", "classify", "--model", d / "run" / "final", "--data", data,
        "--text-field", "0", "--label-field", "1", "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "classify.json").read_text())["metrics"]
    assert res["labels"] == ["neg", "pos"] and res["unknown_labels"] == []  # gold 0/1 are neg/pos
    assert (
        set(res["per_class"]) == {"neg", "pos"} and sum(m["support"] for m in res["per_class"].values()) == 40
    )
    assert res["per_class"] == per_class(res["confusion"], ["neg", "pos"])
    assert re.search(r"^\s+neg\s+\d\.\d{3}\s+\d\.\d{3}\s+\d\.\d{3}\s+20$", r.stdout, re.M), r.stdout
    md = (out / "classify.md").read_text()
    assert "| neg |" in md and "## Confusion matrix" in md
    assert (out / "confusion_matrix.png").stat().st_size > 0 and res["confusion_png"].endswith(".png")


def test_run_sentiment_shows_names(trained, run_cli_module):
    d, _, _ = trained
    r = run_cli_module(
        "run", "sentiment", "--model", d / "run" / "final", "--prompt", "the film was good", "--json"
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["label"] in ("neg", "pos") and set(got["probs"]) == {"neg", "pos"}


def test_hf_export_and_import_keep_names(trained, run_cli_module):
    d, _, _ = trained
    hf, back = d / "hf", d / "back"
    assert run_cli_module("convert", "to-hf", d / "run" / "final", hf).returncode == 0
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoConfig.from_pretrained(hf)
    assert auto.id2label == {0: "neg", 1: "pos"} and auto.num_labels == 2
    r = run_cli_module("convert", "from-hf", hf, back)
    assert r.returncode == 0, r.stderr
    texts = ["the film was good today", "the film was awful today", "fine"]
    a, b = Classifier.from_pretrained(d / "run" / "final"), Classifier.from_pretrained(back)
    assert b.labels == ["neg", "pos"] and b.label_values == ["0", "1"] and b.pooling == a.pooling
    for (la, pa), (lb, pb) in zip(a.predict(texts), b.predict(texts), strict=True):
        assert la == lb and pa == pytest.approx(pb, abs=1e-5)
    assert Classifier.from_pretrained(hf).labels == ["neg", "pos"]  # the HF folder opens directly too


def test_time_budget_alone_is_not_capped(tmp_path, tokenizer, run_cli_module):
    torch.manual_seed(0)
    base = save_checkpoint(
        tmp_path / "b", Transformer(tiny_config(vocab_size=tokenizer.vocab_size)), tokenizer
    )
    common = ("finetune", "--model", base, "--task", "classify", "--data", _tsv(tmp_path / "t.tsv"))
    common += ("--text-field", "0", "--label-field", "1", "--train.device", "cpu", "--eval.every", "0")
    p = run_cli_module(*common, "--max-time", "4", "--out", tmp_path / "a")
    assert p.returncode == 0, p.stderr
    cfg = (tmp_path / "a" / "train_config.toml").read_text()
    assert "max_steps = 0" in cfg and "budget:" not in p.stderr  # no step cap behind the time budget
    p = run_cli_module(*common, "--max-time", "4", "--max-steps", "5", "--out", tmp_path / "b2")
    assert p.returncode == 0 and "or 5 steps (train.max_steps), whichever comes first" in p.stderr


def test_help_shows_defaults_and_settings(run_cli_module):
    r = run_cli_module("finetune", "--help")
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.stdout).split())  # rich's box, wrapped lines joined
    for needle in (
        "(default: 300; with --max-time alone: no step limit)",
        "(default: 0.0003)",
        "(default: 8)",
        "(default: 1e-05)",
        "train.max_steps=300",
        "eval.every=50",
        "train.progress_seconds=10.0",
        "--section.key value",
        "--labels",
    ):
        assert needle in text, needle
    assert "model.preset" not in text  # finetune loads its model: the [model] section is not its setting


def _options(command: str):
    import typer.main

    import yuyan.cli.entry  # noqa: F401 (registers every command)
    from yuyan.cli import app

    cmd = typer.main.get_group(app)
    for word in command.split():
        cmd = cmd.commands[word]
    return [p for p in cmd.params if p.param_type_name == "option" and p.name != "help"]


@pytest.mark.parametrize("command", ["finetune", "train", "eval classify", "eval robustness"])
def test_every_default_is_visible_in_help(command):
    """An option with a value shows it ([default: X]); one without says what happens (default ...)."""
    hidden = [
        p.opts[0]
        for p in _options(command)
        if not (p.required or p.is_flag)
        and (p.default in (None, "") or p.show_default is False)
        and "default" not in (p.help or "").lower()
    ]
    assert not hidden, f"{command}: {hidden} say nothing of their default"
    # rich reads [...] in help as markup and drops it: "[default: X]" written by hand would never show
    assert not [p.opts[0] for p in _options(command) if "[default" in (p.help or "")]


def test_robustness_compares_names_with_gold_values(trained):
    from yuyan.evaluate.robustness import evaluate_robustness

    d, _, _ = trained
    clf = Classifier.from_pretrained(d / "run" / "final")
    texts = ["the film was good today", "the film was awful today", "nice", "ugly"]
    preds = [lab for lab, _ in clf.predict(texts)]
    gold = ["1", "0", "1", "0"]  # the data's values; the model predicts names
    r = evaluate_robustness(clf, list(zip(texts, gold, strict=True)), ["typo"], 0.5, 0)
    expected = sum(p == {"0": "neg", "1": "pos"}[g] for p, g in zip(preds, gold, strict=True)) / 4
    assert r["accuracy_clean"] == expected


def test_server_classify_answers_with_names(trained, tokenizer):
    import httpx
    from tests._serve_util import running, tiny_lm

    from yuyan.model import load
    from yuyan.serve import ServeConfig, create_app

    d, _, _ = trained
    lm = load(d / "run" / "final")
    texts = ["the film was good today", "the film was awful today", "前台很好"]
    want = Classifier.from_pretrained(d / "run" / "final").predict(texts)
    app = create_app(lm, ServeConfig(model_name="cls"))
    with running(app) as base:
        r = httpx.post(base + "/v1/classify", json={"input": texts, "model": "cls"}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["labels"] == ["neg", "pos"] and [x["index"] for x in got["data"]] == [0, 1, 2]
        for x, (label, probs) in zip(got["data"], want, strict=True):
            assert x["label"] == label and x["probs"] == pytest.approx(probs, abs=1e-5)
        one = httpx.post(base + "/v1/classify", json={"input": texts[0]}, timeout=60).json()
        assert one["data"][0]["label"] == want[0][0] and one["usage"]["prompt_tokens"] > 0
        bad = httpx.post(base + "/v1/classify", json={"input": ["ok", " "]}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[1]"
    with running(create_app(tiny_lm(tokenizer), ServeConfig(model_name="lm"))) as base:
        r = httpx.post(base + "/v1/classify", json={"input": "hi"}, timeout=60)
        assert r.status_code == 400 and "no classification head" in r.json()["error"]["message"]
