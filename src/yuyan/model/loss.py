"""Next-token cross-entropy fused with the output projection (lm_head), for training.

The plain path, `F.cross_entropy(lm_head(h), y)`, materialises the (N, V) logits, then a second (N, V)
log-softmax, and in backward a zero-filled (N, V) gradient and the log-softmax gradient: four or five
passes over a tensor that is the largest in a small model's step (GPT-2's vocabulary of 50,257 makes it
206 MB for 1,024 tokens). `linear_cross_entropy` instead computes the logits of a block of rows, turns
them into the loss and, in place, into d(loss)/d(logits) = (softmax - onehot) / n, and runs the two
gradient matmuls right away, so backward only scales the stored gradients by the incoming one. Same
matmuls, one (rows, V) buffer, two fewer softmax kernels (Liger-Kernel's FusedLinearCrossEntropy is the
GPU version of the idea). Measured in BENCHMARKS.md ("Model forward/backward", "Training throughput").
A soft cap (logits = cap * tanh(logits / cap)) is applied to each block in the same pass, its derivative
(1 - tanh²) folded into the block's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
BLOCK_BYTES = 256 * 2**20  # largest float32 logits block; a block's rows share one grad_weight update


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, block_rows: int, softcap: float | None):
        # h (N, d), weight (V, d), targets (N,). Matmuls run in the autocast dtype when autocast is on
        # (bf16 on CUDA), softmax and the loss always in float32.
        dev = h.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != ignore_index
        count = valid.sum()
        scale = valid.float() / count.clamp(min=1)  # (N,): mean over the counted rows; ignored rows get 0
        safe_t = torch.where(valid, targets, 0)[:, None]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(dev, enabled=False):
            w = weight.to(dt)
            for s in range(0, h.shape[0], block_rows):
                rows = slice(s, s + block_rows)
                hc, t, sc = h[rows].to(dt), safe_t[rows], scale[rows]
                z = (hc @ w.t()).float()  # (rows, V) logits, overwritten in place from here on
                if softcap is not None:
                    th = z.div_(softcap).tanh_()  # kept for the derivative
                    z = th * softcap
                m = z.amax(-1, keepdim=True)
                target_z = z.gather(1, t)
                sumexp = z.sub_(m).exp_().sum(-1, keepdim=True)
                loss += ((m + sumexp.log() - target_z)[:, 0] * sc).sum()
                if not (need_h or need_w):
                    continue
                z.mul_(sc[:, None] / sumexp).scatter_add_(1, t, -sc[:, None])  # (softmax - onehot) * scale
                if softcap is not None:
                    z.mul_(th.square_().neg_().add_(1.0))  # d(cap * tanh(z / cap))/dz = 1 - tanh²
                g = z.to(dt)
                if need_h:
                    grad_h[rows] = g @ w
                if need_w:
                    gw = (g.t() @ hc).float()  # float32 sum over blocks
                    grad_w = gw if grad_w is None else grad_w.add_(gw)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        ctx.grads = (grad_h, grad_w)
        # torch's mean cross-entropy over no counted target is nan; so is this
        return torch.where(count > 0, loss, torch.nan)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `lm_head(h)` (..., V), soft-capped when `softcap` is set, against `targets`
    (...), skipping `ignore_index`.

    Equal to `F.cross_entropy(z.flatten(0, -2), targets.flatten(), ignore_index=...)` with
    z = lm_head(h).float() (or softcap * tanh(z / softcap)), float32 rounding aside, and its gradients; the
    fused path runs for a bias-free `nn.Linear` head, any other head (a LoRA-wrapped or quantised one)
    takes the plain path.
    """
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if not isinstance(lm_head, nn.Linear) or lm_head.bias is not None:  # nn.Linear or its subclasses
        z = lm_head(h2).float()
        z = z if softcap is None else softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z, t, ignore_index=ignore_index)
    w = lm_head.weight
    if not torch.is_grad_enabled():  # no gradients to precompute
        h2, w = h2.detach(), w.detach()
    V = w.shape[0]
    block_rows = max(1, min(h2.shape[0], BLOCK_BYTES // (4 * V)))
    return _LinearCrossEntropy.apply(h2, w, t, ignore_index, block_rows, softcap)


__all__ = ["IGNORE_INDEX", "linear_cross_entropy"]
