"""Shared fixtures: tiny tokenizers, models and checkpoints built in-process (nothing is downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from yuyan.model.checkpoint import save_checkpoint
from yuyan.model.transformer import ModelConfig, Transformer
from yuyan.tokenizer import Tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]


def small_texts() -> list[str]:
    """A few hundred KB of real text: stdlib sources plus Chinese and mixed-script lines."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[:40]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    texts.append("语言模型是一种概率模型。我们用它来生成文本、翻译和回答问题。\n" * 50)
    texts.append("The quick brown fox jumps over the lazy dog. 😀 café naïve\n" * 50)
    return texts


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return small_texts()


@pytest.fixture(scope="session")
def tokenizer(texts) -> Tokenizer:
    return Tokenizer.train(texts, vocab_size=512, min_frequency=2)


def tiny_config(family: str = "gpt2", vocab_size: int = 512, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, d_model=32)
    if family == "llama":
        base.update(
            n_kv_head=2, d_ff=64, ffn="swiglu", norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False
        )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(params=["gpt2", "llama"])
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(family)).eval()


def make_checkpoint(path: Path, tokenizer: Tokenizer, family: str = "gpt2") -> Path:
    """A tiny seeded model of `family` saved with `tokenizer` as a checkpoint folder at `path`."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(family, vocab_size=tokenizer.vocab_size))
    return save_checkpoint(path, model, tokenizer)


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer, family) -> Path:
    return make_checkpoint(tmp_path / f"ckpt-{family}", tokenizer, family)


@pytest.fixture
def run_cli():
    """Run `yuyan ARGS` in a subprocess; returns CompletedProcess (text mode)."""
    import subprocess

    def run(*args: str, input: str | None = None, timeout: float = 300, check: bool = False):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"}
        p = subprocess.run(
            [sys.executable, "-m", "yuyan", *map(str, args)],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            env=env,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"yuyan {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
            )
        return p

    return run


@pytest.fixture
def decode_kernel():
    """The compiled decode op (yuyan.generate.kernels). It must build on x86-64 Linux: a failed build fails
    the test instead of skipping it; elsewhere, or with YUYAN_DECODE_KERNEL=0, the test is skipped."""
    import os

    from yuyan.generate import kernels

    if not kernels.SUPPORTED:
        pytest.skip("the decode kernel is x86-64 Linux only")
    if os.environ.get("YUYAN_DECODE_KERNEL") == "0":
        pytest.skip("YUYAN_DECODE_KERNEL=0")
    op = kernels.skinny_linear_op()
    assert op is not None, "the decode kernel did not build (see the warning above)"
    return op


def cli_in_process(capsys, *args, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """`yuyan ARGS` in this process (no interpreter start-up); returns (status, stdout, stderr)."""
    from yuyan.cli import main

    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
