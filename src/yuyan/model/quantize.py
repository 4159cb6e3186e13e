"""int8 weight-only quantisation of the linear layers, for faster CPU decoding.

`quantize_int8(model)` swaps every `nn.Linear` for an `Int8Linear` (compose by swapping modules, not by
subclassing the model): weights become int8 with one float scale per output channel (symmetric,
absmax / 127). Decoding is a matrix-vector product bounded by memory bandwidth, so reading a quarter of the bytes is the point.
Measured on our 2-core Zen 4 VMs (BENCHMARKS.md "## Generation"): fbgemm's dynamic int8 kernel
(`torch.ops.quantized.linear_dynamic`, activations quantised per call) runs GPT-2's lm_head in ~4 ms
against ~24 ms fp32, while `aten._weight_int8pack_mm` (~65 ms) and dequantising to bf16 per call were
slower than fp32; so the fbgemm kernel is used where it exists (CPU) and a dequantising matmul elsewhere.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def reduce_range() -> bool:
    """Whether fbgemm must quantise activations to 7 bits on this CPU, decided by measuring once.

    Without VNNI (AVX2-only CPUs such as AMD Zen 3) fbgemm multiplies u8 x s8 pairs into saturating int16
    sums, which overflow with full-range activations: a probe product measured 41% off its reference on
    such a CPU, 1.7% with 7-bit activations. Where the 8-bit product is right (AVX-512 VNNI, AMX) it keeps
    the extra bit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    scale = w.abs().amax(1) / 127.0
    w8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    x = torch.randn(8, 256, generator=g)
    ref = x @ (w8.float() * scale[:, None]).T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "fbgemm"
        q = torch._make_per_channel_quantized_tensor(w8, scale.double(), torch.zeros(64, dtype=torch.long), 0)
        y = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(q, None), False)
    return bool((y - ref).abs().max() > 0.05 * ref.abs().max())


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic"
    )


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * per-channel scale).T + bias. Buffers: weight_int8 (out, in), scale (out,)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        self._packed = None
        if self.weight_int8.device.type == "cpu" and _fbgemm_available():
            with (
                warnings.catch_warnings()
            ):  # quantized-tensor constructors are marked deprecated in torch 2.13
                warnings.simplefilter("ignore")
                torch.backends.quantized.engine = "fbgemm"
                q = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(q, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised float weight (out, in), for inspection and tests; forward never builds it on CPU."""
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).contiguous()
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, reduce_range())
            return y.view(*shape[:-1], self.out_features)
        w = self.weight_int8.to(x.dtype) * self.scale[:, None].to(x.dtype)  # other devices: dequantise
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every nn.Linear (names not in `skip`) for an Int8Linear, in place; returns the model.

    A tied lm_head gets its own int8 copy; the embedding it shares stays in float.
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(lin))
    return model


__all__ = ["Int8Linear", "quantize_int8"]
