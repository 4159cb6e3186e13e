"""Number formats chosen by measurement: bfloat16 where this machine's matrix units make it pay, float32 elsewhere.

CPUs differ more than their names say: on an Intel Xeon with AMX a bf16 matmul runs ~10x an fp32 one, on an
AMD Zen 4 (AVX-512, no matrix unit) about the same, and on CPUs without bf16 instructions it is emulated and
slower. So `choose` never looks at the CPU's name: it times a matmul of the shape the work will run (training:
tokens x d_model by d_model x d_ff) in float32 and in bfloat16, or the work's own paths where it passes
`timers` (decoding: one row through every weight matrix of the model, on the paths decoding takes in each
format; `yuyan.generate.kernels.decode_precision`), interleaved, best of several repetitions within a
fraction of a second, on one thread (see `alternate`), and takes bf16 when it wins by `MARGIN`. The
figures are cached per machine (CPU flags, torch version, shape) in `$YUYAN_CACHE_DIR/precision.json`
(default ~/.cache/yuyan), so a second run pays nothing; figures timed
while the machine was busy (load average above half its cores) are used but not cached. On CUDA, auto is
bf16 where the GPU supports it. The choice carries its reason, which `yuyan demo` and the training log print.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from yuyan.model.transformer import Attention

MARGIN = 1.3  # bf16 must be this much faster than fp32 on the timed matmul to be chosen
Timers = tuple[Callable[[], float], Callable[[], float]]  # (fp32, bf16) -> GFLOP/s of one timed run
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The number format to use, and why: `fp32_gflops`/`bf16_gflops` are 0 when nothing was timed."""

    name: str  # fp32 | bf16 | fp16
    reason: str
    fp32_gflops: float = 0.0
    bf16_gflops: float = 0.0

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def to_dict(self) -> dict:
        return {
            "precision": self.name,
            "reason": self.reason,
            "fp32_gflops": round(self.fp32_gflops, 1),
            "bf16_gflops": round(self.bf16_gflops, 1),
        }


def cache_path() -> Path:
    root = os.environ.get("YUYAN_CACHE_DIR") or Path.home() / ".cache" / "yuyan"
    return Path(root) / "precision.json"


def machine_key() -> str:
    """CPU feature flags and torch version: what a timed matmul's ratio depends on besides load."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), ""
        )
    text = f"{flags}|{torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def best_seconds(fn: Callable[[], object], reps: int = 3) -> float:
    """Seconds of the fastest of `reps` timed calls of `fn` after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return max(best, 1e-9)


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 5) -> float:
    """GFLOP/s of an (m, k) @ (k, n) CPU matmul in `dtype`: the best of `reps` timed runs after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    return best_gflops(lambda: torch.mm(a, b), 2 * m * k * n, reps)


def best_gflops(fn: Callable[[], object], flops: float, reps: int = 3) -> float:
    """GFLOP/s of `fn` (work of `flops`): the best of `reps` timed calls after one warm-up."""
    return flops / best_seconds(fn, reps) / 1e9


def busy() -> bool:
    """Whether other processes keep this machine's cores busy (the 1-minute load average above half of them)."""
    try:
        return os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    except OSError:
        return False


def cached(key: str, compute) -> list[float]:
    """The figures cached under `key` for this machine, or `compute()`'s (a list of floats), stored."""
    path, key = cache_path(), f"{machine_key()}:{key}"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    table = table if isinstance(table, dict) else {}
    if isinstance(table.get(key), list) and all(isinstance(v, (int, float)) for v in table[key]):
        return [float(v) for v in table[key]]
    figures = [float(v) for v in compute()]
    if busy():  # timed while other work held the cores: good for this run, not the machine's figure
        return figures
    table[key] = figures
    try:  # a cache we cannot write only costs the next run another measurement
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0))
        os.replace(tmp, path)
    except OSError:
        pass
    return figures


def alternate(a, b, budget_s: float, rounds: int = 8) -> tuple[float, float]:
    """The best of alternating calls of `a` and `b` (each returns a figure, higher is better) until
    `budget_s` is spent, on one thread: the ratio of the two is what the instructions give, a burst of load
    costs both alike, and one thread is not thrown off by another process holding a core, where OpenMP's
    barriers made 2-thread figures 10x worse (bf16/fp32 at 4096x128x512 on a busy AMX Xeon: 7.1x on one
    thread, 0.8x on two)."""
    fa = fb = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for _ in range(rounds):
            fa, fb = max(fa, a()), max(fb, b())
            if time.perf_counter() - start > budget_s:
                break
    finally:
        torch.set_num_threads(threads)
    return fa, fb


def measure(
    m: int, k: int, n: int, budget_s: float = 0.6, timers: Timers | None = None, label: str = ""
) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s on this machine, from the cache or timed now: of an (m, k) @ (k, n) matmul, or
    of the work's own `timers` (fp32, bf16), cached under `label` and the shape."""
    if timers is None:
        timers = (
            lambda: time_matmul(m, k, n, torch.float32, reps=3),
            lambda: time_matmul(m, k, n, torch.bfloat16, reps=3),
        )
    key = f"{label}:{m}x{k}x{n}" if label else f"{m}x{k}x{n}"
    fp32, bf16 = cached(key, lambda: alternate(*timers, budget_s))
    return fp32, bf16


def time_attention(b: int, h: int, t: int, d: int, upcast: bool, reps: int = 3) -> float:
    """Calls per second of causal SDPA forward + backward on bf16 (b, h, t, d) q/k/v, computed in bf16 or
    (upcast) in float32 with the casts included: the best of `reps` after one warm-up."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g).bfloat16().requires_grad_() for _ in range(3))

    def run() -> None:
        args = (q.float(), k.float(), v.float()) if upcast else (q, k, v)
        y = torch.nn.functional.scaled_dot_product_attention(*args, is_causal=True).to(torch.bfloat16)
        y.sum().backward()

    return 1.0 / best_seconds(run, reps)


def attention_upcast(b: int, h: int, t: int, d: int, budget_s: float = 0.5) -> tuple[bool, str]:
    """Whether bf16 training on this CPU should run attention in float32 at this shape, and why: CPU flash
    attention in bf16 can be slower than in fp32 (3x at head_dim 32 on an Intel Xeon with AMX, even at 64)."""
    b = max(1, min(b, 4096 // max(t, 1)))  # a few thousand query rows show the kernel's speed
    bf16, fp32 = cached(
        f"sdpa:{b}x{h}x{t}x{d}",
        lambda: alternate(
            lambda: time_attention(b, h, t, d, upcast=False),
            lambda: time_attention(b, h, t, d, True),
            budget_s,
        ),
    )
    upcast = fp32 > bf16
    why = f"attention in {'fp32' if upcast else 'bf16'} (timed {b}x{h}x{t}x{d}: fp32 {fp32 / bf16:.2f}x bf16)"
    return upcast, why


def upcast_attention(model: torch.nn.Module, on: bool) -> None:
    """Run the attention of every layer of `model` in float32 on bf16 inputs (on) or in their dtype."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.sdpa_fp32 = on


def choose(
    requested: str,
    device: torch.device | str,
    m: int,
    k: int,
    n: int,
    timers: Timers | None = None,
    label: str = "",
) -> PrecisionChoice:
    """The precision for work whose matmuls look like (m, k) @ (k, n): `requested` unless it is auto.

    `timers` and `label` (see `measure`) replace the plain matmul by the work's own timed paths: decoding
    times its kernels over a model's weights (yuyan.generate.kernels.decode_precision)."""
    device = torch.device(device)
    if requested not in ("auto", *DTYPES):
        raise ValueError(f"precision must be auto, {', '.join(DTYPES)}; got {requested!r}")
    if requested != "auto":
        return PrecisionChoice(requested, "requested")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return PrecisionChoice("bf16" if ok else "fp32", "CUDA" + ("" if ok else " without bf16 support"))
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"auto on {device.type}: no measurement, fp32")
    m, k, n = max(m, 1), max(k, 1), max(n, 1)
    fp32, bf16 = measure(m, k, n) if timers is None else measure(m, k, n, timers=timers, label=label)
    ratio = bf16 / max(fp32, 1e-9)
    name = "bf16" if ratio >= MARGIN else "fp32"
    how = ">=" if name == "bf16" else "<"
    reason = (
        f"timed {m}x{k}x{n} {label or 'matmul'}: bf16 {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s = {ratio:.2f}x "
        f"({how} the {MARGIN}x margin)"
    )
    return PrecisionChoice(name, reason, fp32, bf16)


__all__ = [
    "MARGIN",
    "PrecisionChoice",
    "Timers",
    "choose",
    "measure",
    "best_gflops",
    "time_matmul",
    "cache_path",
]
