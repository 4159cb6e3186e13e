"""The optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the learning-rate
schedules (warm-up then cosine or WSD).

Only parameters with `requires_grad` are optimised, so a LoRA-wrapped or partly frozen model trains just its
adapters. Matrices (embeddings, linear weights) get weight decay; vectors (biases, norm gains) do not. With
`optimizer="muon"`, torch's Muon (momentum orthogonalised by Newton-Schulz, Keller Jordan's recipe) takes the
2-D weights of the linear layers inside the transformer blocks, the ones it was designed for; AdamW keeps
the embeddings, the lm_head (and any head over the model), norms, biases and LoRA's low-rank factors. The
two run as one `MuonAdamW` with one list of param_groups, so the loop's schedule, clipping, zero_grad and the
checkpoint's state dict see one optimizer; each group's `lr_scale` sets its peak relative to `lr` (Muon's
is muon_lr / lr), so one schedule drives both; each group's `optimizer` names its optimizer, so a resume
with another train.optimizer is refused. The schedule is a pure function of (step, total_steps), so it
needs no state of its own beyond `total_steps`, which the loop may refit to a wall-clock budget
(`max_time`) and stores in the trainer state.
"""

from __future__ import annotations

import math
from collections import ChainMap

import torch
from torch import nn

from yuyan.model.lora import LoRALinear
from yuyan.model.precision import DTYPES, PrecisionChoice
from yuyan.model.precision import choose as choose_precision
from yuyan.model.transformer import Block

OPTIMIZERS = ("adamw", "muon")


def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict]:
    """Two AdamW groups: tensors with >= 2 dims decay, the rest (biases, norms) do not. Parameters whose id
    is in `exclude` (the ones Muon takes) are left out."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad or id(p) in exclude:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay and not exclude:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    return [
        {"params": decay, "weight_decay": weight_decay, "optimizer": "adamw"},
        {"params": no_decay, "weight_decay": 0.0, "optimizer": "adamw"},
    ]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights Muon takes: those of the nn.Linear layers inside transformer blocks
    (attention and MLP projections), not LoRA's low-rank factors, in model order, each once."""
    seen, out = set(), []
    for block in (m for m in model.modules() if isinstance(m, Block)):
        lora_factors = {
            id(f) for m in block.modules() if isinstance(m, LoRALinear) for f in (m.lora_A, m.lora_B)
        }
        for m in block.modules():
            hidden = isinstance(m, nn.Linear) and id(m) not in lora_factors and m.weight.requires_grad
            if hidden and id(m.weight) not in seen:
                seen.add(id(m.weight))
                out.append(m.weight)
    return out


class Muon(torch.optim.Muon):
    """torch's Muon with its Newton-Schulz iterations in `ns_dtype`. torch runs them in bf16, which is
    right where bf16 matmuls are native (CUDA, AMX) and ruinous where they are emulated: on a Zen 3 CPU
    without AVX512-BF16 a bf16 matmul ran at 1 GFLOP/s against fp32's 70, and the demo's Muon step trained
    2,700 tokens/s where AdamW's trained 8,000. `ns_dtype` bf16 is torch's own step, unchanged; another
    dtype runs the same update (momentum, Nesterov, the quintic iteration, the shape-scaled lr, decoupled
    weight decay) with the iteration in that dtype. The state (one momentum buffer per matrix) is torch's."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mom = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.ndim != 2 or grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Muon takes dense real 2-D weights only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mom)
                update = grad.lerp(buf, mom) if group["nesterov"] else buf
                update = newton_schulz(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * muon_lr_ratio(group["adjust_lr_fn"], p.shape))
        return loss


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration that Muon uses to orthogonalise an update (Keller Jordan's, as in
    torch.optim.Muon), in `dtype`: X <- aX + (bA + cA^2)X with A = XX^T, on the wide orientation."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's Muon lr adjustment: sqrt(max(1, out/in)) by default, 0.2 sqrt(max(out, in)) to match AdamW's
    update RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def newton_schulz_precision(
    device: torch.device | str, hidden: list[nn.Parameter], requested: str = "auto"
) -> PrecisionChoice:
    """The dtype of Muon's Newton-Schulz iterations: bf16 on CUDA with bf16 support; on CPU timed at the
    largest hidden matrix's shape (its Gram product) in fp32 and bf16, bf16 where it wins by the training
    precision's margin (yuyan.model.precision.choose, cached per machine)."""
    rows, cols = max((tuple(p.shape) for p in hidden), key=lambda s: s[0] * s[1], default=(256, 256))
    small, big = (
        min(rows, cols, 512),
        min(max(rows, cols), 2048),
    )  # capped: a second or two where bf16 is slow
    choice = choose_precision(requested, device, small, big, small, label="newton-schulz")
    if choice.name not in ("fp32", "bf16"):
        raise ValueError(f"Muon's Newton-Schulz runs in fp32 or bf16, not {choice.name}")
    return choice


class MuonAdamW:
    """Muon and AdamW as one optimizer: step, zero_grad, param_groups (AdamW's, then Muon's) and a state
    dict in torch's layout (parameters numbered across both, in param_groups order), so the loop, the
    schedule and the checkpoint code treat it like any torch optimizer and a resumed run is bitwise exact."""

    def __init__(
        self,
        muon: torch.optim.Muon,
        adamw: torch.optim.AdamW,
        newton_schulz: PrecisionChoice = PrecisionChoice("bf16", "torch's default"),
    ):
        self.optimizers = [adamw, muon]
        self.newton_schulz = newton_schulz  # the dtype of Muon's iterations and why (shown by the loop)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> ChainMap:
        return ChainMap(*(o.state for o in self.optimizers))

    @torch.no_grad()
    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({i + offset: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"the optimizer state has {len(sd['param_groups'])} parameter groups, muon+adamw has "
                f"{len(self.param_groups)}: it was saved by another train.optimizer"
            )
        start, offset = 0, 0
        for o in self.optimizers:
            groups = sd["param_groups"][start : start + len(o.param_groups)]
            n = sum(len(g["params"]) for g in o.param_groups)
            local = {
                "state": {i - offset: s for i, s in sd["state"].items() if offset <= i < offset + n},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in groups],
            }
            o.load_state_dict(local)
            start, offset = start + len(o.param_groups), offset + n
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]  # load replaces the dicts


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str = "cpu",
    eps: float = 1e-8,
    optimizer: str = "adamw",
    muon_lr: float = 0.02,
    newton_schulz: str = "auto",
) -> torch.optim.AdamW | MuonAdamW:
    """AdamW over the trainable parameters, or (optimizer="muon") Muon over the hidden matrices at peak
    `muon_lr` with AdamW over the rest at peak `lr`.

    AdamW runs the fused kernel on CPU and CUDA (one pass per tensor; on CPU a 124M-parameter step takes
    0.09 s fused vs 0.48 s foreach and 0.39 s torch's default loop), foreach elsewhere. Muon uses torch's
    defaults (momentum 0.95, Nesterov, 5 Newton-Schulz steps in bf16, the update scaled by
    sqrt(max(1, out/in))) and the same decoupled weight decay, with the Newton-Schulz iterations in bf16
    where a timed matmul says bf16 pays and fp32 where it does not (`newton_schulz`: auto | fp32 | bf16; see
    `Muon`). A model with no hidden matrix left to train (LoRA) gets plain AdamW.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    kwargs = {"fused": True} if device_type in ("cpu", "cuda") else {"foreach": True}
    hidden = hidden_matrices(model) if optimizer == "muon" else []
    groups = param_groups(model, weight_decay, frozenset(id(p) for p in hidden))
    groups = [g for g in groups if g["params"]] if hidden else groups
    adamw = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)
    if not hidden:
        return adamw
    muon_group = {"params": hidden, "lr": muon_lr, "lr_scale": muon_lr / lr, "optimizer": "muon"}
    ns = newton_schulz_precision(device_type, hidden, newton_schulz)
    muon = Muon([muon_group], lr=muon_lr, weight_decay=weight_decay, ns_dtype=DTYPES[ns.name])
    return MuonAdamW(muon, adamw, ns)


def describe_optimizer(optimizer) -> dict:
    """{"name": "adamw" | "muon + adamw", and for Muon "newton_schulz": its iterations' precision and why}."""
    if isinstance(optimizer, MuonAdamW):
        return {"name": "muon + adamw", "newton_schulz": optimizer.newton_schulz.to_dict()}
    return {"name": "adamw"}


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


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """The schedule's `lr` into every group, times the group's `lr_scale` (Muon's muon_lr / lr)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
