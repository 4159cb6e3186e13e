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

With tied embeddings (GPT-2) the (V, d) matrix gets two gradients: the loss's, dense, and the token lookup's,
nonzero in the looked-up rows only. Autograd would make the lookup's a second zero-filled dense (V, d) tensor
and add the two (GPT-2's 154 MB each, a tenth of a bf16 124M step on CPU). `tied_lookup` instead makes the
lookup an autograd Function whose backward adds its few rows into the loss's gradient, which the loss leaves
in a `TiedGrad`, and returns that as the weight's one gradient: the same sums in the same order, so the
result is bitwise autograd's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
BLOCK_BYTES = 256 * 2**20  # largest float32 logits block; a block's rows share one grad_weight update
CHUNK_ROWS = 2048  # vocab rows per bf16 grad_weight product cast into float32 (3 MB at d 768: in cache)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, block_rows, softcap, tie: TiedGrad | None):
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
        cast_w = weight.dtype == torch.float32 and dt != torch.float32  # bf16 matmuls, float32 gradient
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
                if need_w and cast_w:  # each vocab chunk's product goes into the float32 sum while in cache
                    grad_w = torch.empty_like(weight) if grad_w is None else grad_w
                    for c in range(0, w.shape[0], CHUNK_ROWS):
                        part, out = g[:, c : c + CHUNK_ROWS].t() @ hc, grad_w[c : c + CHUNK_ROWS]
                        if s == 0:
                            out.copy_(part)
                        else:
                            out.add_(part)
                elif need_w:
                    gw = (g.t() @ hc).float()  # float32 sum over blocks
                    grad_w = gw if grad_w is None else grad_w.add_(gw)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        ctx.grads, ctx.tie = (grad_h, grad_w), tie
        # torch's mean cross-entropy over no counted target is nan; so is this
        return torch.where(count > 0, loss, torch.nan)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # loss.backward() sends 1: multiplying by it is exact and, for a (V, d) gradient, a pass over memory
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
            if grad_h is not None:
                grad_h.mul_(grad_loss.to(grad_h.dtype))
            if grad_w is not None:
                grad_w.mul_(grad_loss.to(grad_w.dtype))
        if (
            ctx.tie is not None
        ):  # the lookup's backward, which runs after this one, adds its rows and returns it
            ctx.tie.grad, grad_w, ctx.tie = grad_w, None, None
        return grad_h, grad_w, None, None, None, None, None


class TiedGrad:
    """The hand-over between one forward's fused loss and its tied token lookup (`tied_lookup`): the loss's
    backward leaves its float32 gradient of the shared weight in `grad`, the lookup's backward takes it."""

    grad: torch.Tensor | None = None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, idx, tie: TiedGrad):
        ctx.save_for_backward(idx)
        ctx.tie, ctx.num_rows = tie, weight.shape[0]
        return F.embedding(idx, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        tie, ctx.tie = ctx.tie, None
        grad, tie.grad = tie.grad, None
        idx, g = idx.reshape(-1), g.reshape(-1, g.shape[-1])
        if grad is None:  # the loss was not differentiated (or not fused): torch's embedding gradient
            return torch.ops.aten.embedding_dense_backward(g, idx, ctx.num_rows, -1, False), None, None
        # each looked-up row's gradients summed from zero in the order they occur, as torch's embedding
        # backward sums them, then added to the loss's gradient, as autograd adds the two: (n, d), n <= N
        rows, where = torch.unique(idx, return_inverse=True)
        grad.index_add_(0, rows, g.new_zeros(rows.numel(), g.shape[1]).index_add_(0, where, g))
        return grad, None, None


def tied_lookup(
    idx: torch.Tensor, embedding: nn.Module, lm_head: nn.Module
) -> tuple[torch.Tensor, TiedGrad] | None:
    """`embedding(idx)` and the `TiedGrad` to pass to `linear_cross_entropy` with `lm_head`, where the two share
    their weight, the loss takes the fused path and its gradient is wanted; None otherwise (look up as usual).
    A plain nn.Embedding only (no padding_idx, max_norm, sparse or hooks), and not under torch.compile."""
    w = getattr(embedding, "weight", None)
    plain = (
        type(embedding) is nn.Embedding
        and embedding.padding_idx is None
        and embedding.max_norm is None
        and not embedding.sparse
        and not embedding.scale_grad_by_freq
        and not (embedding._forward_hooks or embedding._forward_pre_hooks)
    )
    fused = isinstance(lm_head, nn.Linear) and lm_head.bias is None and lm_head.weight is w
    if not (plain and fused and w.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return None
    tie = TiedGrad()
    return _TiedLookup.apply(w, idx, tie), tie


def linear_cross_entropy(
    h: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    tie: TiedGrad | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `lm_head(h)` (..., V), soft-capped when `softcap` is set, against `targets`
    (...), skipping `ignore_index`.

    Equal to `F.cross_entropy(z.flatten(0, -2), targets.flatten(), ignore_index=...)` with
    z = lm_head(h).float() (or softcap * tanh(z / softcap)), float32 rounding aside, and its gradients; the
    fused path runs for a bias-free `nn.Linear` head, any other head (a LoRA-wrapped or quantised one)
    takes the plain path. `tie`: from `tied_lookup`, whose backward then returns the shared weight's gradient.
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
    return _LinearCrossEntropy.apply(h2, w, t, ignore_index, block_rows, softcap, tie)


__all__ = ["IGNORE_INDEX", "TiedGrad", "linear_cross_entropy", "tied_lookup"]
