"""The decode kernel (generate/kernels.py, csrc/skinny_linear.cpp): its products against F.linear and
float64, DecodeLinear's dispatch, decode_layout with and without the kernel, and the fallback when it
cannot be built."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_config
from torch import nn

from yuyan.generate import GenerationConfig, generate, generate_naive, kernels
from yuyan.generate.kernels import MAX_ROWS, DecodeLinear, decode_layout
from yuyan.model.transformer import Transformer


@pytest.fixture
def op(decode_kernel):
    return decode_kernel


@pytest.fixture
def no_kernel(monkeypatch):
    """Decode as on a machine where the kernel cannot be built."""
    monkeypatch.setattr(kernels, "_state", {"op": None})


@pytest.mark.parametrize("K,N", [(768, 2304), (40, 33), (16, 5), (3, 7), (130, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_linear_equals_f_linear(op, K, N, bias):
    torch.manual_seed(K + N)
    w, b = torch.randn(N, K), torch.randn(N) if bias else None
    for M in (1, 2, 3, 5, 8, 9, 17):  # 9 and 17: passes of 8 rows and a remainder
        x = torch.randn(M, K)
        ref64 = F.linear(x.double(), w.double(), None if b is None else b.double())
        ours, theirs = op(x, w, b).double(), F.linear(x, w, b).double()
        # as close to float64 as torch's own float32 product is (different summation order)
        err, ref_err = (ours - ref64).abs().max().item(), (theirs - ref64).abs().max().item()
        assert err <= 4 * ref_err + 1e-6 * K**0.5, (M, err, ref_err)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def test_skinny_linear_rejects_what_it_does_not_cover(op):
    with pytest.raises(RuntimeError, match="float32 only"):
        op(torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(2, 8), torch.randn(8, 3).t(), None)
    with pytest.raises(RuntimeError, match=r"x \(M, K\), w \(N, K\)"):
        op(torch.randn(2, 8), torch.randn(3, 9), None)


def test_decode_linear_uses_the_kernel_only_for_skinny_inference(op, monkeypatch):
    calls = []

    def spy(x, w, b):
        calls.append(x.shape[0])
        return op(x, w, b)

    monkeypatch.setattr(kernels, "_state", {"op": spy})
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    ref = nn.Linear(24, 10)
    ref.load_state_dict(lin.state_dict())
    lin.__class__ = DecodeLinear
    for shape in [(1, 24), (2, 3, 24), (MAX_ROWS, 24), (MAX_ROWS + 1, 24)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(lin(x), ref(x), atol=1e-5, rtol=1e-5)
    assert calls == [1, 6, MAX_ROWS]  # 9 rows: torch's product
    x = torch.randn(2, 24, requires_grad=True)
    lin(x).sum().backward()  # training: F.linear and its gradients
    ref(x).sum().backward()
    assert calls == [1, 6, MAX_ROWS] and torch.allclose(lin.weight.grad, ref.weight.grad)
    with torch.no_grad():  # no_grad serves as well as inference_mode
        lin(torch.randn(1, 24))
    assert calls[-1] == 1


def _pair(family: str):
    torch.manual_seed(0)
    model = Transformer(tiny_config(family, vocab_size=96, block_size=64)).eval()
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decode_layout_with_kernel_keeps_parameters_and_greedy_tokens(op, family):
    model, ref = _pair(family)
    decode_layout(model)
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert lins and all(type(m) is DecodeLinear and m.weight.is_contiguous() for m in lins)
    assert model.lm_head.weight is model.embed_tokens.weight or not model.config.tie_embeddings
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=24, temperature=0, stop_token_ids=[]))
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]  # batched rows of different lengths
    got = [c[0].token_ids for c in generate(model, None, prompts, cfg)]
    assert got == [generate_naive(ref, p, 24) for p in prompts]


def test_decode_layout_after_the_column_major_fallback_restores_row_major(op, monkeypatch):
    model, _ = _pair("gpt2")
    monkeypatch.setattr(kernels, "_state", {"op": None})
    decode_layout(model)
    w = model.layers[0].mlp.up_proj.weight
    assert w.stride() == (1, w.shape[0]) and type(model.layers[0].mlp.up_proj) is nn.Linear
    monkeypatch.setattr(kernels, "_state", {"op": op})
    decode_layout(model)
    assert model.layers[0].mlp.up_proj.weight.is_contiguous()
    assert type(model.layers[0].mlp.up_proj) is DecodeLinear


def test_without_the_kernel_decoding_uses_column_major_torch_products(no_kernel):
    model, ref = _pair("gpt2")
    decode_layout(model)
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())
    w = model.layers[0].self_attn.q_proj.weight
    assert w.stride() == (1, w.shape[0])
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=16, temperature=0, stop_token_ids=[]))
    assert generate(model, None, [[1, 2, 3]], cfg)[0][0].token_ids == generate_naive(ref, [1, 2, 3], 16)


def test_a_failed_build_warns_once_and_decoding_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'yuyan_skinny': g++: command not found")

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", broken)
    with pytest.warns(UserWarning, match="could not be built .*command not found.*torch's matmuls"):
        assert kernels.skinny_linear_op() is None
    assert kernels.skinny_linear_op() is None  # decided once per process: no second warning or build
    model, ref = _pair("llama")
    decode_layout(model)
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=8, temperature=0, stop_token_ids=[]))
    assert generate(model, None, [[3, 4]], cfg)[0][0].token_ids == generate_naive(ref, [3, 4], 8)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("YUYAN_DECODE_KERNEL", "0")
    assert kernels._build() is None


def test_the_op_traces_under_torch_compile(op):
    """The op has a fake (shape) implementation, so torch.compile can trace a decode step through it."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    ref = nn.Linear(40, 24)
    ref.load_state_dict(lin.state_dict())
    lin.__class__ = DecodeLinear
    traced = []

    def backend(gm, example_inputs):  # records the traced graph, then runs it as is
        traced.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    compiled = torch.compile(lin, backend=backend, fullgraph=True)
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)
    assert any("skinny_linear" in t for t in traced), traced


@pytest.mark.skipif(shutil.which("g++") is None or not kernels.SUPPORTED, reason="needs g++ on x86-64 Linux")
@pytest.mark.parametrize("march", ["haswell", "skylake-avx512", "sapphirerapids"])
def test_the_source_compiles_for_every_instruction_set(march):
    """The build is -march=native, so this machine compiles one branch of the source's #if's; the others
    (AVX2 without AVX-512, AVX-512 with and without BF16) are compiled here too, syntax only."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = ["g++", "-std=c++20", "-O3", f"-march={march}", "-fsyntax-only", *includes, str(kernels.SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
