"""Precision chosen by measurement: the choice rule and its cache, bf16 autocast training and its exact resume.

The training runs are the tiny GPT of tests/_train_worker.py on its synthetic token stream (a few seconds
each), in-process so that `yuyan.model.precision.measure` can be replaced to force either outcome of `auto`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from yuyan.model import precision as P
from yuyan.train.loop import autocast_context

sys.path.insert(0, str(Path(__file__).parent))
import _train_worker as W  # noqa: E402


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("YUYAN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "busy", lambda: False)  # the suite's own load must not change what is cached


def test_auto_takes_bf16_only_when_it_wins_by_the_margin(monkeypatch):
    monkeypatch.setattr(P, "measure", lambda m, k, n: (100.0, 100.0 * P.MARGIN))
    c = P.choose("auto", "cpu", 512, 128, 512)
    assert c.name == "bf16" and c.dtype == torch.bfloat16
    assert "512x128x512" in c.reason and f"{P.MARGIN:.2f}x" in c.reason
    monkeypatch.setattr(P, "measure", lambda m, k, n: (100.0, 100.0 * P.MARGIN * 0.99))
    assert P.choose("auto", "cpu", 512, 128, 512).name == "fp32"
    # a forced format is taken as it is, with nothing timed
    monkeypatch.setattr(P, "measure", lambda *a: pytest.fail("a forced precision must not measure"))
    assert P.choose("bf16", "cpu", 1, 1, 1) == P.PrecisionChoice("bf16", "requested")
    with pytest.raises(ValueError, match="precision must be"):
        P.choose("int8", "cpu", 1, 1, 1)


def test_measurement_is_real_and_cached_per_machine_and_shape(monkeypatch):
    fp32, bf16 = P.measure(64, 32, 48, budget_s=0.05)
    assert fp32 > 0 and bf16 > 0
    cached = json.loads(P.cache_path().read_text())
    assert cached == {f"{P.machine_key()}:64x32x48": [fp32, bf16]}
    # the second call for the same shape reads the cache; another shape times again
    monkeypatch.setattr(P, "time_matmul", lambda *a, **k: pytest.fail("the cached shape was timed again"))
    assert P.measure(64, 32, 48) == (fp32, bf16)
    monkeypatch.setattr(P, "time_matmul", lambda *a, **k: 7.0)
    assert P.measure(16, 16, 16) == (7.0, 7.0)
    # figures timed on a busy machine are used but not kept
    monkeypatch.setattr(P, "busy", lambda: True)
    assert P.measure(8, 8, 8) == (7.0, 7.0) and "8x8x8" not in P.cache_path().read_text()
    # a corrupt cache file is only a cache miss
    P.cache_path().write_text("{not json")
    assert P.measure(64, 32, 48) == (7.0, 7.0)


def test_autocast_context_needs_a_resolved_precision():
    with autocast_context(torch.device("cpu"), "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), "fp32"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="resolve"):
        autocast_context(torch.device("cpu"), "auto")


def _first_train_loss(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["split"] == "train")["loss"]


def test_bf16_training_reduces_loss_like_fp32_and_keeps_fp32_weights(tmp_path):
    ov = {"train.max_steps": "60", "eval.every": "0", "checkpoint.every_minutes": "0"}
    res = {p: W.run(str(tmp_path / p), {**ov, "train.precision": p}) for p in ("fp32", "bf16")}
    for p in ("fp32", "bf16"):
        assert res[p]["precision"]["precision"] == p
        assert res[p]["final"]["loss"] < 0.6 * _first_train_loss(tmp_path / p)
    assert res["bf16"]["final"]["loss"] == pytest.approx(res["fp32"]["final"]["loss"], rel=0.1)
    # master weights and optimizer state stay float32; the runs did differ (autocast was on)
    w = {p: load_file(str(tmp_path / p / "final" / "model.safetensors")) for p in ("fp32", "bf16")}
    assert all(t.dtype == torch.float32 for t in w["bf16"].values())
    assert any(not torch.equal(w["fp32"][k], w["bf16"][k]) for k in w["fp32"])
    st = torch.load(
        tmp_path / "bf16" / "checkpoints" / "step-00000060" / "trainer_state.pt", weights_only=True
    )
    assert st["precision"] == "bf16"
    moments = [v for s in st["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert all(m.dtype == torch.float32 for m in moments if m.dim() > 0)


def test_bf16_resume_is_bitwise_and_auto_keeps_the_resumed_runs_precision(tmp_path, monkeypatch):
    ov = {
        "train.max_steps": "40",
        "eval.every": "0",
        "checkpoint.every_steps": "20",
        "checkpoint.keep_last": "5",
    }
    monkeypatch.setattr(P, "measure", lambda m, k, n: (1.0, 100.0))  # auto measures bf16 the winner
    ref = W.run(str(tmp_path / "ref"), {**ov, "train.precision": "auto"})
    assert ref["precision"]["precision"] == "bf16" and "100.00x" in ref["precision"]["reason"]
    # a copy of the run as it stood at step 20, resumed on a machine where auto would now say fp32
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-00000020", run / "checkpoints" / "step-00000020")
    monkeypatch.setattr(P, "measure", lambda m, k, n: (100.0, 1.0))
    res = W.run(str(run), {**ov, "train.precision": "auto"}, resume=True)
    assert res["precision"]["precision"] == "bf16"
    assert res["precision"]["reason"].startswith("the resumed run's precision; attention in")
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_attention_upcast_follows_the_timing_and_matches_bf16_attention(monkeypatch):
    from tests.conftest import tiny_config

    from yuyan.model.transformer import Attention, Transformer

    monkeypatch.setattr(P, "time_attention", lambda b, h, t, d, upcast, reps=3: 2.0 if upcast else 1.0)
    upcast, why = P.attention_upcast(4, 4, 32, 8)
    assert upcast and "attention in fp32" in why and "2.00x" in why
    monkeypatch.setattr(P, "time_attention", lambda b, h, t, d, upcast, reps=3: 1.0 if upcast else 2.0)
    assert P.attention_upcast(4, 4, 32, 16) == (False, "attention in bf16 (timed 4x4x32x16: fp32 0.50x bf16)")
    # the float32 path computes the same attention as the bf16 one, to bf16 rounding
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama")).eval()
    x = torch.randint(0, 512, (2, 16))
    seen = []
    sdpa = Attention.sdpa

    def spy(self, q, *args):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(self, q, *args)

    monkeypatch.setattr(Attention, "sdpa", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x).float()
        P.upcast_attention(model, True)
        upcast = model(x).float()
    # two layers each way: autocast's bf16 attention (q is float32 from RoPE), then float32 without autocast
    assert seen == [(torch.float32, True)] * 2 + [(torch.float32, False)] * 2
    torch.testing.assert_close(upcast, plain, atol=0.1, rtol=0.05)
