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

On CPU the loss's largest tensors (the weight's bf16 copy, a block of logits, the (V, d) gradient) are kept
with the weight from step to step (`kept`) instead of allocated fresh: fresh pages fault in from the kernel
on first touch, which cost the 124M bf16 step ~8% (BENCHMARKS.md, "Training precision chosen by measurement").
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

IGNORE_INDEX = -100
BLOCK_BYTES = 256 * 2**20  # largest float32 logits block; a block's rows share one grad_weight update
CHUNK_ROWS = 2048  # vocab rows per bf16 grad_weight product cast into float32 (3 MB at d 768: in cache)


KEEP_BUFFERS = True  # CPU: keep the loss's large buffers with the weight across steps (see `kept`)
_kept = WeakIdKeyDictionary()  # weight -> {name: buffer}
_kept_lock = threading.Lock()
# torch's count of a storage's owners (a private binding): without it no buffer is kept
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def kept(weight: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised `shape` buffer of `dtype`, on CPU the one kept under `name` with `weight` since the
    last step wherever nothing else still holds it.

    The fused loss's largest tensors (the weight's dt copy, a block of logits, the (V, d) gradient of a
    GPT-2 head: 77-154 MB each) are fresh allocations otherwise, and on CPU each step's first writes into
    fresh pages fault them in from the kernel, zeroed. The buffer is handed out as a view of its own, so
    autograd takes the gradient as the weight's .grad without a copy; its storage stays referenced here, so
    the next step reuses it once .grad is gone (zero_grad(set_to_none=True)). Anything still holding it (a
    .grad being accumulated into, a caller that kept the tensor) shows in the storage's use count (2: the
    kept tensor and the count's own storage object), and then this call gets a fresh tensor.
    Freed with the weight. CUDA's caching allocator already reuses memory; torch.compile traces plain code."""
    if not KEEP_BUFFERS or _use_count is None or weight.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=weight.device)
    numel = math.prod(shape)
    with _kept_lock:
        bufs = _kept.setdefault(weight, {})
        buf = bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = bufs[name] = torch.empty(numel, dtype=dtype)
        elif _use_count(buf.untyped_storage()._cdata) != 2:  # in use: a fresh one this time
            return torch.empty(shape, dtype=dtype)
        return buf[:numel].view(shape)


def _weight_grad(grad_w: torch.Tensor | None, g: torch.Tensor, hc: torch.Tensor, weight: torch.Tensor):
    """`grad_w` (None before the first block) plus this block's g.T @ hc (V, d), summed in float32. Where the
    weight is float32 the sum lives in its kept buffer; a bf16 product goes into it by vocab chunks, each
    chunk cast while in cache instead of through a (V, d) bf16 intermediate."""
    if weight.dtype != torch.float32:
        gw = (g.t() @ hc).float()
        return gw if grad_w is None else grad_w.add_(gw)
    first = grad_w is None
    if g.dtype == torch.float32:
        if first:
            return torch.mm(g.t(), hc, out=kept(weight, "grad", weight.shape, weight.dtype))
        return grad_w.add_(g.t() @ hc)
    grad_w = kept(weight, "grad", weight.shape, weight.dtype) if first else grad_w
    for c in range(0, weight.shape[0], CHUNK_ROWS):
        part, out = g[:, c : c + CHUNK_ROWS].t() @ hc, grad_w[c : c + CHUNK_ROWS]
        if first:
            out.copy_(part)
        else:
            out.add_(part)
    return grad_w


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
        low = dt != torch.float32  # logits computed in dt, then made float32
        n_max = min(block_rows, h.shape[0])
        with torch.autocast(dev, enabled=False):
            w = kept(weight, "weight", weight.shape, dt).copy_(weight) if cast_w else weight.to(dt)
            z_buf = kept(weight, "logits", (n_max, weight.shape[0]), torch.float32)
            # the dt product, then (after the float32 softmax) the dt gradient: one buffer serves both
            low_buf = kept(weight, "logits_dt", (n_max, weight.shape[0]), dt) if low else None
            for s in range(0, h.shape[0], block_rows):
                rows = slice(s, s + block_rows)
                hc, t, sc = h[rows].to(dt), safe_t[rows], scale[rows]
                n = hc.shape[0]
                # (rows, V) float32 logits, overwritten in place from here on
                if low:
                    z = z_buf[:n].copy_(torch.mm(hc, w.t(), out=low_buf[:n]))
                else:
                    z = torch.mm(hc, w.t(), out=z_buf[:n])
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
                g = low_buf[:n].copy_(z) if low else z
                if need_h:
                    grad_h[rows] = g @ w
                if need_w:
                    grad_w = _weight_grad(grad_w, g, hc, weight)
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
