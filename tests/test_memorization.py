"""Memorisation audits (yuyan.evaluate.memorization): exposure against a hand-computed rank, canary exposure
after a tiny training run (high for a canary repeated 100x, low for controls), and extraction overlap 1.0 for
a model that reproduces its training text."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from yuyan.data.corpus import iter_documents
from yuyan.evaluate.memorization import (
    canary_exposure,
    exposure,
    extraction_overlap,
    insert_canaries,
    ngram_hashes,
)
from yuyan.model import load
from yuyan.train.pretrain import train


def test_exposure_matches_a_hand_computed_rank():
    # the secret at 2.0 nats; candidates below it: 1.0 and 1.5 (and one tie at 2.0, counted against it)
    exp, rank = exposure(2.0, [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert rank == 4  # 1 + three candidates at or below 2.0
    assert exp == pytest.approx(math.log2(8) - math.log2(4)) == 1.0
    assert exposure(0.1, [1.0] * 1023) == (pytest.approx(10.0), 1)  # first of 1024: log2(1024) bits


def test_ngram_hashes_find_exactly_the_shared_ngrams():
    a = np.array([1, 2, 3, 4, 5, 6])
    b = np.array([9, 3, 4, 5, 7])
    ha, hb = set(ngram_hashes(a, 3).tolist()), ngram_hashes(b, 3).tolist()
    assert [h in ha for h in hb] == [False, True, False]  # only (3, 4, 5) is shared


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "river",
        "stone",
        "cloud",
        "paper",
        "light",
        "north",
        "green",
        "quiet",
        "table",
        "window",
    ]
    return "".join(" ".join(rng.choice(vocab) for _ in range(10)) + "\n" for _ in range(n))


def _train(tmp_path, corpus: str, steps: int) -> str:
    over = {
        "data.corpus": corpus, "data.vocab_size": "300", "model.n_layer": "2", "model.n_head": "4",
        "model.d_model": "64", "model.d_ff": "256", "model.block_size": "64", "model.dropout": "0.0",
        "train.max_steps": str(steps), "train.batch_size": "16", "train.lr": "3e-3", "train.warmup": "20",
        "train.device": "cpu", "train.precision": "fp32", "eval.every": "0", "eval.batches": "1",
        "eval.final_full": "false", "checkpoint.every_minutes": "0", "checkpoint.dir": str(tmp_path / "run"),
    }  # fmt: skip
    res = train(None, over)
    return res["final_dir"]


def test_canary_exposure_high_when_repeated_low_when_never_seen(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_text(_words(30, seed=i), encoding="utf-8")
    desc = insert_canaries(str(src), tmp_path / "data", [100], seed=0, holdout=2)
    text = "".join(d.text for d in iter_documents(desc["corpus"], split="train"))
    secret = desc["canaries"][0]["secret"]
    assert text.count("my secret code is " + secret) == 100  # every occurrence is in the train split
    assert all(c["secret"] not in text for c in desc["canaries"][1:])  # the controls never are
    final = _train(tmp_path, desc["corpus"], steps=300)
    rows = canary_exposure(load(final), tmp_path / "data" / "canaries.json", candidates=256)
    by = {r["secret"]: r for r in rows}
    seen, controls = by[secret], [r for r in rows if r["repeats"] == 0]
    assert seen["exposure"] > 6.0, rows  # of log2(256) = 8 bits
    assert all(r["exposure"] < 4.0 for r in controls), rows
    assert json.loads((tmp_path / "data" / "canaries.json").read_text())["canaries"][0]["repeats"] == 100


def test_extraction_overlap_is_one_for_a_model_that_reproduces_its_text(tmp_path):
    line = "the quick brown fox jumps over the lazy dog and runs away\n"
    (tmp_path / "fox.txt").write_text(line * 400, encoding="utf-8")
    final = _train(tmp_path, str(tmp_path / "fox.txt"), steps=100)
    res = extraction_overlap(
        load(final), str(tmp_path / "fox.txt"), samples=4, n=4, max_new_tokens=32, temperature=0.0
    )
    assert res["overlap"] == 1.0 and res["longest_match_tokens"] == res["sampled_ngrams"] // 4 + 3
    assert res["examples"] and res["examples"][0] in line * 3
