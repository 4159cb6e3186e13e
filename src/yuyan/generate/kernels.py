"""The decode kernel: float32 products of a few rows with a weight matrix, compiled for the host CPU.

A decoding step multiplies a few rows (one per sequence) by every weight matrix, which reads all the
weights from memory for little arithmetic. `csrc/skinny_linear.cpp` streams each thread's weight rows once,
front to back; on the AMD EPYC of BENCHMARKS.md "## Generation" it multiplies one row by 36 copies of a
3072x768 matrix in 7.5-11.5 ms where MKL takes 18-25 ms, and eight rows in 22.5-28 ms where MKL takes
44-57 ms. It is built on first use with torch.utils.cpp_extension (a C++ compiler and ninja;
~15 s, cached under TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) and named after the CPU's features,
so a cache shared between machines never runs code built for another instruction set. Where it cannot be
built (no compiler, not x86-64 Linux) decoding falls back to torch's matmuls with one warning;
YUYAN_DECODE_KERNEL=0 turns it off.

The kernel also takes bfloat16 rows and weights (half the bytes to read; float32 accumulation, AVX512-BF16
dot products where the CPU has them). `decode_layout(model, precision)` casts the model's parameters to
the decode precision, which "auto" chooses by timing one decode row through the model's own weights on
both paths (`decode_precision`, through `yuyan.model.precision.choose`), never by the CPU's name.

`DecodeLinear` is `nn.Linear` with the same parameters, state dict and training behaviour; only its
no-grad forward of float32 (at most `MAX_ROWS` rows) or bfloat16 (at most `BF16_ROWS` rows) CPU inputs
goes through the kernel.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from yuyan.errors import UserError
from yuyan.model.precision import PrecisionChoice, best_gflops, choose

# More rows than this go to torch's GEMM. The kernel takes 8 rows per pass over the weights; on the AMD VM
# of BENCHMARKS.md it beat MKL up to 32 rows (36 x 3072x768, ms: 16 rows 46 vs 65, 24 rows 55 vs 73, 32
# rows 84 vs 88, 64 rows 120 vs 107); 16 leaves margin for CPUs where MKL is stronger.
MAX_ROWS = 16
# More bf16 rows than this go to torch's bf16 GEMM (oneDNN, AMX tiles where the CPU has them). On the AMX
# Xeon of BENCHMARKS.md "## bf16 decoding (issue 21)" (24 x 3072x768, one thread, ms) the kernel took
# 14-16 at 1-3 rows where torch took 25-31, and torch won from 5 rows (8 rows: 20 vs 24).
BF16_ROWS = 4
# the kernel is written with GCC vector extensions and built with -march=native for x86-64 Linux
SUPPORTED = sys.platform == "linux" and platform.machine() == "x86_64"
SOURCE = Path(__file__).parent / "csrc" / "skinny_linear.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "op": the loaded op or None after a failed build


def _cpu_tag() -> str:
    """A short hash of the CPU's feature flags and torch's version: the build is -march=native."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{flags}|{torch.__version__}".encode()).hexdigest()[:12]


def _build() -> Callable | None:
    if os.environ.get("YUYAN_DECODE_KERNEL", "1") == "0" or not SUPPORTED:
        return None
    from torch.utils.cpp_extension import load

    venv_bin = str(Path(sys.executable).parent)  # ninja from the virtual environment, if not on PATH
    if shutil.which("ninja") is None and venv_bin not in os.environ.get("PATH", ""):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    name = f"yuyan_skinny_{_cpu_tag()}"
    try:  # say so before the one slow build (torch rebuilds only when the source changes)
        from torch.utils.cpp_extension import _get_build_directory

        built = (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:
        built = False
    if not built:
        print("yuyan: compiling the decode kernel for this CPU (once, ~15 s)...", file=sys.stderr, flush=True)
    load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],  # at::parallel_for; resolves to the libgomp torch has loaded
        is_python_module=False,
        verbose=False,
    )

    @torch.library.register_fake("yuyan::skinny_linear")
    def _(x, w, bias=None):  # shapes for torch.compile tracing
        return x.new_empty((x.shape[0], w.shape[0]))

    return torch.ops.yuyan.skinny_linear


def skinny_linear_op() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """The compiled `torch.ops.yuyan.skinny_linear(x (M, K), w (N, K), bias (N,) | None)`, or None when it is
    turned off or cannot be built (one warning says why). Built once per process."""
    if "op" not in _state:
        with _lock:
            if "op" not in _state:
                # no compiler, no ninja, a read-only cache: decode with torch's matmuls
                try:
                    _state["op"] = _build()
                except Exception as e:
                    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    warnings.warn(
                        f"yuyan: the decode kernel could not be built ({reason[:200]}); decoding uses torch's "
                        "matmuls (install a C++ compiler and ninja, or set YUYAN_DECODE_KERNEL=0 to skip this)",
                        stacklevel=2,
                    )
                    _state["op"] = None
    return _state["op"]


def decode_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias), through the decode kernel where it covers the product: no gradient, CPU, x and
    a contiguous w both float32 (at most MAX_ROWS rows) or both bfloat16 (at most BF16_ROWS rows)."""
    K = x.shape[-1]
    op = _state.get("op")
    rows = x.numel() // max(K, 1)
    if (
        op is not None
        and x.dtype == w.dtype
        and rows <= {torch.float32: MAX_ROWS, torch.bfloat16: BF16_ROWS}.get(x.dtype, 0)
        and x.device.type == "cpu"
        and w.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        return op(x.reshape(-1, K).contiguous(), w, bias).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)


class DecodeLinear(nn.Linear):
    """`nn.Linear` whose skinny float32 or bfloat16 CPU inference products run through the decode kernel.

    Same parameters, state dict, gradients and outputs (rounding aside); anything the kernel does not
    cover (gradients, other dtypes or devices, more rows) is `F.linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode_layout made the weight contiguous; decode_linear's checks cover later .to() / re-layouts
        return decode_linear(x, self.weight, self.bias)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) in (nn.Linear, DecodeLinear) and m.weight.shape[0] > 1]


def _decode_timers(model: nn.Module, rows: int) -> tuple[tuple, int, int]:
    """((fp32, bf16) timers of `rows` rows through every distinct linear weight of the model on the path
    decoding takes in that format, k, n) where (rows, k) @ (k, n) is the same work in one matrix."""
    skinny_linear_op()  # the kernel, where it can be built, is what decoding would run
    weights = list({id(m.weight): m.weight for m in _linears(model)}.values())
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(rows, w.shape[1], generator=g) for w in weights]
    params = sum(w.numel() for w in weights)

    def timer(dtype: torch.dtype):
        ws = [w.detach().to(dtype).contiguous() for w in weights]
        if _state.get("op") is None:  # decode_layout's column-major fallback
            ws = [w.t().contiguous().t() for w in ws]
        xd = [x.to(dtype) for x in xs]

        @torch.inference_mode()
        def run() -> None:
            for x, w in zip(xd, ws, strict=True):
                decode_linear(x, w, None)

        return lambda: best_gflops(run, 2 * rows * params)

    k = model.config.d_model if hasattr(model, "config") else weights[0].shape[1]
    return (timer(torch.float32), timer(torch.bfloat16)), k, params // max(k, 1)


def decode_precision(model: nn.Module, requested: str = "auto") -> PrecisionChoice:
    """The number format to decode `model` in: `requested` (fp32 | bf16), or for auto the one that runs one
    decode row through this model's weights faster by `precision.MARGIN`, timed on this machine (cached)."""
    if requested not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown decode dtype {requested!r}; use auto, fp32 or bf16")
    other = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")}
        - {"Linear", "DecodeLinear"}
    )
    if other and requested == "bf16":
        raise UserError(
            f"--dtype bf16 needs plain linear layers, this model has {', '.join(other)}; use fp32"
        )
    if other:
        return PrecisionChoice("fp32", f"{', '.join(other)} layers decode in float32")
    device = next(model.parameters()).device
    if requested != "auto" or device.type != "cpu":
        return choose(requested, device, 1, 1, 1)
    timers, k, n = _decode_timers(model, rows=1)
    return choose("auto", device, 1, k, n, timers=timers, label="decode")


def decode_layout(model: nn.Module, precision: str | None = None) -> nn.Module:
    """Lay a CPU model out for decoding, in place; idempotent. Values (up to the precision), parameter names,
    state dict keys and training are unchanged.

    precision: None keeps the parameters' dtype; fp32 or bf16 casts the floating-point parameters to it
    (buffers such as RoPE's frequencies stay float32; the KV cache follows the embedding's dtype); auto
    takes `decode_precision`'s measured choice. Logits reach sampling in float32 either way.

    Linear layers become `kernels.DecodeLinear` (the same nn.Linear, whose skinny inference products run
    through the decode kernel compiled for this CPU). Where that kernel is off or cannot be built, every
    linear weight is stored column-major instead: the same (out, in) tensor kept in memory as its
    contiguous (in, out) transpose, so F.linear runs x @ W^T as a plain product with a contiguous (in, out)
    matrix, which MKL's small-M product streams faster (GPT-2's lm_head at 8 rows 21.7 -> 10.6 ms on the
    Intel VM of BENCHMARKS.md "## Generation"; Hugging Face GPT-2 keeps its Conv1D weights this way).
    Tied weights are re-laid once.
    """
    if precision is not None:
        dtype = decode_precision(model, precision).dtype
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
    if next(model.parameters()).device.type != "cpu":
        return model
    linears = _linears(model)
    op = skinny_linear_op() if linears else None
    with torch.no_grad():
        for m in linears:
            if op is not None and m.weight.dtype in (torch.float32, torch.bfloat16):
                if not m.weight.is_contiguous():
                    m.weight.data = m.weight.data.contiguous()
                m.__class__ = DecodeLinear
            elif m.weight.is_contiguous():
                m.weight.data = m.weight.data.t().contiguous().t()
    return model


__all__ = [
    "decode_layout",
    "decode_precision",
    "decode_linear",
    "MAX_ROWS",
    "BF16_ROWS",
    "SUPPORTED",
    "DecodeLinear",
    "skinny_linear_op",
]
