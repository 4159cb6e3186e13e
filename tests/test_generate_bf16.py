"""bf16 decoding: the kernel's bf16 products, `decode_layout(model, precision)`, and decoding in bf16 held to
the no-cache oracle run in the same dtype (generate, batched rows, the server's scheduler), with the logits'
distance from fp32 bounded. Tiny models; the decode kernel is built once per machine (skips only where it
cannot be, as in test_generate_kernels.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import cli_in_process, tiny_config
from torch import nn

import yuyan.model.precision as P
from yuyan.errors import UserError
from yuyan.generate import GenerationConfig, generate, generate_naive, kernels
from yuyan.generate.core import cache_dtype
from yuyan.generate.kernels import BF16_ROWS, DecodeLinear, decode_layout, decode_precision
from yuyan.generate.scheduler import Scheduler, run_to_completion
from yuyan.model.quantize import quantize_int8
from yuyan.model.transformer import Transformer


@pytest.fixture(scope="module")
def op():
    if not kernels.SUPPORTED:
        pytest.skip("the decode kernel is built for x86-64 Linux only")
    op = kernels.skinny_linear_op()
    if op is None:
        pytest.fail("the decode kernel did not build on a platform it supports")
    return op


def _model(family: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(family, vocab_size=96, block_size=64)).eval()


@pytest.mark.parametrize("K", [32, 40, 100])  # 40, 100: tails past the 32- and 16-wide steps
def test_bf16_kernel_equals_the_float32_product_of_the_bf16_values(op, K):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, K, generator=g).bfloat16()
    b = torch.randn(37, generator=g).bfloat16()
    for M in (1, 3, 8, 9, 17):
        x = torch.randn(M, K, generator=g).bfloat16()
        ref = F.linear(x.float(), w.float(), b.float())  # exact inputs, float32 sums
        got = op(x, w, b)
        assert got.dtype == torch.bfloat16
        # one rounding of the output to bf16 (2^-8 relative) plus float32 summation order
        torch.testing.assert_close(got.float(), ref, atol=1e-4 * K, rtol=2**-8)
    with pytest.raises(RuntimeError, match="x and w alike"):
        op(torch.randn(2, K), w, None)


def test_bf16_decode_linear_uses_the_kernel_up_to_bf16_rows(op, monkeypatch):
    calls = []

    def spy(x, w, b):
        calls.append((x.shape[0], x.dtype))
        return op(x, w, b)

    monkeypatch.setattr(kernels, "_state", {"op": spy})
    lin = nn.Linear(32, 10).bfloat16()
    lin.__class__ = DecodeLinear
    with torch.inference_mode():
        for rows in (1, BF16_ROWS, BF16_ROWS + 1):
            lin(torch.randn(rows, 32).bfloat16())
    assert calls == [(1, torch.bfloat16), (BF16_ROWS, torch.bfloat16)]  # more rows: torch's bf16 GEMM


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_cached_greedy_equals_the_bf16_oracle_and_logits_stay_close_to_fp32(op, family):
    model, fp32 = _model(family), _model(family)
    decode_layout(model, "bf16")
    decode_layout(fp32, "fp32")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert cache_dtype(model) == torch.bfloat16
    assert model.config.tie_embeddings is False or model.lm_head.weight is model.embed_tokens.weight
    if family == "llama":  # RoPE's frequencies stay float32: bf16 would move the angles at long positions
        assert model.inv_freq.dtype == torch.float32
    assert all(type(m) is DecodeLinear for m in model.modules() if isinstance(m, nn.Linear))
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=24, temperature=0, stop_token_ids=[], logprobs=2))
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]  # batched rows of different lengths
    out = generate(model, None, prompts, cfg)
    assert [c[0].token_ids for c in out] == [generate_naive(model, p, 24) for p in prompts]
    assert all(isinstance(e.logprob, float) for c in out for e in c[0].logprobs)  # float32 logprobs
    # bf16 keeps 8 bits of mantissa: each logit moves by a few 2^-8 of the logits' scale
    x = torch.tensor([list(range(1, 40))])
    with torch.inference_mode():
        lb, lf = model(x).float(), fp32(x)
    scale = lf.abs().max()
    assert lb.dtype == torch.float32 and (lb - lf).abs().max() <= 0.05 * scale, float((lb - lf).abs().max())


def test_scheduler_decodes_a_bf16_model_like_generate(op, tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=tokenizer.vocab_size)).eval()
    decode_layout(model, "bf16")
    ids = [tokenizer.encode(t) for t in ("import os", "def f(x):", "语言模型")]
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=12, temperature=0))
    with Scheduler(model, tokenizer, max_batch=4) as s:
        got = [run_to_completion(s.submit(p, cfg), timeout=60)[0].text for p in ids]
    assert model.embed_tokens.weight.dtype == torch.bfloat16  # the scheduler kept the dtype
    assert got == [c[0].text for c in generate(model, tokenizer, ids, cfg)]


def test_auto_follows_the_measurement_and_forcing_does_not_measure(monkeypatch, tmp_path):
    monkeypatch.setenv("YUYAN_CACHE_DIR", str(tmp_path))
    seen = []

    def fake(m, k, n, timers=None, label=""):
        seen.append((label, m, k, n, timers[0]() > 0 and timers[1]() > 0))
        return 100.0, 100.0 * P.MARGIN

    monkeypatch.setattr(P, "measure", fake)
    model = _model("gpt2")
    c = decode_precision(model, "auto")
    assert c.name == "bf16" and "decode" in c.reason and seen[0][:3] == ("decode", 1, 32)
    assert seen[0][4]  # both timers really ran the model's products
    monkeypatch.setattr(P, "measure", lambda *a, **k: (100.0, 100.0 * P.MARGIN * 0.99))
    assert decode_precision(model, "auto").name == "fp32"
    decode_layout(model, "auto")
    assert model.embed_tokens.weight.dtype == torch.float32
    monkeypatch.setattr(P, "measure", lambda *a, **k: pytest.fail("a forced dtype must not measure"))
    assert decode_precision(model, "bf16").reason == "requested"


def test_bad_dtypes_and_int8_models_are_refused_by_name(monkeypatch):
    model = _model("gpt2")
    with pytest.raises(UserError, match="unknown decode dtype 'fp16'"):
        decode_layout(model, "fp16")
    quantize_int8(model)
    monkeypatch.setattr(P, "measure", lambda *a, **k: pytest.fail("int8 layers decide without measuring"))
    assert decode_precision(model, "auto").name == "fp32"
    with pytest.raises(UserError, match="Int8Linear"):
        decode_layout(model, "bf16")


def test_the_real_measurement_is_cached(op, monkeypatch, tmp_path):
    monkeypatch.setenv("YUYAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(P, "busy", lambda: False)  # figures timed on a busy machine are not cached
    model = _model("gpt2")
    first = decode_precision(model, "auto")
    assert first.fp32_gflops > 0 and first.bf16_gflops > 0 and (tmp_path / "precision.json").exists()
    monkeypatch.setattr(P, "time_matmul", lambda *a, **k: pytest.fail("cached: nothing is timed again"))
    monkeypatch.setattr(kernels, "best_gflops", lambda *a, **k: pytest.fail("cached: nothing is timed"))
    assert decode_precision(model, "auto") == first


@pytest.mark.parametrize("family", ["llama"])
def test_dtype_option_of_generate_and_perplexity(op, capsys, tiny_checkpoint, tokenizer):
    from yuyan.model import load

    args = ["generate", "-m", tiny_checkpoint, "-p", "def f", "--max-new-tokens", "8", "--temperature", "0"]
    code, out, err = cli_in_process(capsys, *args, "--dtype", "bf16", "--json")
    assert code == 0, err
    lm = load(tiny_checkpoint)
    decode_layout(lm.model, "bf16")
    ref = generate(
        lm.model, lm.tokenizer, ["def f"], GenerationConfig.from_dict(dict(max_new_tokens=8, temperature=0))
    )
    assert json.loads(out)["completions"][0]["token_ids"] == ref[0][0].token_ids
    code, out, err = cli_in_process(capsys, *args, "--dtype", "fp16")
    assert code == 2 and err.strip() == "error: unknown --dtype 'fp16'; use auto, fp32 or bf16"
    code, out, err = cli_in_process(capsys, *args, "--dtype", "bf16", "--quantize", "int8")
    assert code == 2 and "drop --dtype bf16 or --quantize" in err
    ppl = {}
    for dt in ("fp32", "bf16"):
        ev = ["eval", "perplexity", "-m", tiny_checkpoint, "--corpus", "stdlib", "--max-bytes", "3000"]
        code, out, err = cli_in_process(capsys, *ev, "--dtype", dt, "--device", "cpu")
        assert code == 0, err
        ppl[dt] = out
    assert ppl["fp32"] != ppl["bf16"]  # the bf16 weights were really scored
