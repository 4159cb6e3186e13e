"""AdamW with decay/no-decay parameter groups, and the learning-rate schedules (warm-up then cosine or WSD).

Only parameters with `requires_grad` are optimised, so a LoRA-wrapped or partly frozen model trains just its
adapters. Matrices (embeddings, linear weights) get weight decay; vectors (biases, norm gains) do not. The
schedule is a pure function of (step, total_steps), so it needs no state of its own beyond `total_steps`,
which the loop may refit to a wall-clock budget (`max_time`) and stores in the trainer state.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: tensors with >= 2 dims decay, the rest (biases, norms) do not."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str = "cpu",
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the fused kernel on CPU and CUDA (one pass per tensor; on CPU a
    124M-parameter step takes 0.09 s fused vs 0.48 s foreach and 0.39 s torch's default loop), foreach elsewhere."""
    kwargs = {"fused": True} if device_type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def lr_at(
    step: int,
    total_steps: int,
    lr: float,
    min_lr: float,
    warmup: int,
    schedule: str = "cosine",
    decay_frac: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    cosine: linear warm-up over `warmup` steps, then a half cosine from lr to min_lr at the last step.
    wsd: warm-up, a stable phase at lr, then a linear decay to min_lr over the last `decay_frac` of the run.
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    last = max(total_steps - 1, 1)
    if schedule == "cosine":
        t = min(max((step - warmup) / max(last - warmup, 1), 0.0), 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_start = max(warmup, int(round(total_steps * (1.0 - decay_frac))))
        if step < decay_start:
            return lr
        t = min((step - decay_start) / max(last - decay_start, 1), 1.0)
        return lr + (min_lr - lr) * t
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine or wsd")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
