"""Number formats chosen by measurement: bfloat16 where this machine's matrix units make it pay, float32 elsewhere.

CPUs differ more than their names say: on an Intel Xeon with AMX a bf16 matmul runs ~10x an fp32 one, on an
AMD Zen 4 (AVX-512, no matrix unit) about the same, and on CPUs without bf16 instructions it is emulated and
slower. So `choose` never looks at the CPU's name: it times a matmul of the shape the work will run (training:
tokens x d_model by d_model x d_ff) in float32 and in bfloat16, or the work's own paths where it passes
`timers` (decoding: one row through every weight matrix of the model, on the paths decoding takes in each
format; `yuyan.generate.kernels.decode_precision`), interleaved, best of several repetitions within a
fraction of a second, and takes bf16 when it wins by `MARGIN`. The figures are cached per machine (CPU flags, torch version, threads, shape) in
`$YUYAN_CACHE_DIR/precision.json` (default ~/.cache/yuyan), so a second run pays nothing. On CUDA, auto is
bf16 where the GPU supports it. The choice carries its reason, which `yuyan demo` and the training log print.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

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
    """CPU feature flags, torch version and thread count: what a timed matmul depends on besides load."""
    flags = ""
    try:
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), ""
        )
    except OSError:
        pass
    text = f"{flags}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 5) -> float:
    """GFLOP/s of an (m, k) @ (k, n) CPU matmul in `dtype`: the best of `reps` timed runs after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / max(best, 1e-9) / 1e9


def best_gflops(fn: Callable[[], object], flops: float, reps: int = 3) -> float:
    """GFLOP/s of `fn` (work of `flops`): the best of `reps` timed calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return flops / max(best, 1e-9) / 1e9


def measure(
    m: int, k: int, n: int, budget_s: float = 0.6, timers: Timers | None = None, label: str = ""
) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s for this work on this machine, from the cache or timed now.

    The work is an (m, k) @ (k, n) matmul, or what `timers` (fp32, bf16: each returns GFLOP/s of one timed
    run, e.g. through `best_gflops`) time, cached under `label` and the shape. The two formats are timed in
    alternating rounds until `budget_s` is spent and each keeps its best, so a burst of load from another
    process costs both alike instead of deciding the choice.
    """
    path, key = cache_path(), f"{machine_key()}:{label + ':' if label else ''}{m}x{k}x{n}"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), list) and len(cached[key]) == 2:
        return float(cached[key][0]), float(cached[key][1])
    time_fp32, time_bf16 = timers or (
        lambda: time_matmul(m, k, n, torch.float32, reps=3),
        lambda: time_matmul(m, k, n, torch.bfloat16, reps=3),
    )
    fp32 = bf16 = 0.0
    start = time.perf_counter()
    for _ in range(8):
        fp32 = max(fp32, time_fp32())
        bf16 = max(bf16, time_bf16())
        if time.perf_counter() - start > budget_s:
            break
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = [fp32, bf16]
    try:  # a cache we cannot write only costs the next run another measurement
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=0))
        os.replace(tmp, path)
    except OSError:
        pass
    return fp32, bf16


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
