"""LoRA: low-rank adapters swapped into a model's linear layers, trained while the base stays frozen.

`apply_lora(model, rank, alpha, dropout, targets)` replaces every `nn.Linear` whose module name ends with one
of `targets` (PEFT's rule: "q_proj" matches `layers.3.self_attn.q_proj`) by a `LoRALinear` that keeps the
base `weight`/`bias` under the same names, so a base checkpoint's state dict loads unchanged, and adds
`lora_A` (rank x in, Kaiming-uniform) and `lora_B` (out x rank, zeros): y = x W^T + b + (alpha/rank) B A x.
B starts at zero, so a fresh adapter leaves the outputs exactly unchanged. `merge_lora` folds B A into W
and swaps plain `nn.Linear`s back (exact up to float rounding); `save_adapter` writes only the adapter
(PEFT-like adapter_config.json + adapter_model.safetensors, atomically) and `load_adapter` re-applies it to
a base model. Module swapping, not subclassing (as in torchtune's peft/lora.py): the model class stays one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from yuyan.errors import UserError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DEFAULT_TARGETS = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {self.rank}; pass --lora-rank 8 for example")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UserError("LoRA needs at least one target module name, e.g. --lora-targets q_proj,v_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; `weight`/`bias` keep the base names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: a tied lm_head would stay tied
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)  # (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self) -> None:
        # PEFT's init: A like nn.Linear's default, B zero -> the adapter starts as an exact no-op
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shaped like weight (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in). The low-rank path costs 2 r (in + out) FLOPs per token instead of merging W + BA.
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: list[str] | None = None,
    freeze_base: bool = True,
) -> nn.Module:
    """Swap LoRALinear into every nn.Linear whose name ends with a target; freeze everything else.

    Returns the same model object (modified in place). Raises UserError when no module matches.
    """
    cfg = LoRAConfig(rank, alpha, dropout, list(targets or DEFAULT_TARGETS))
    if lora_modules(model):
        raise UserError("the model already has LoRA adapters; merge them (--merge) before adding new ones")
    tied = getattr(model, "lm_head_weight_tied", lambda: False)()
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in cfg.targets)
    ]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"no linear layer matches LoRA targets {cfg.targets}; this model has {linear}")
    if tied and any(n.endswith("lm_head") for n in names):
        raise UserError(
            "lm_head shares its weight with the token embedding; LoRA on it would change both: "
            "drop lm_head from --lora-targets"
        )
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:
        _replace(model, n, LoRALinear(model.get_submodule(n), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg  # read by save_adapter; a plain attribute, not state
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling B A) and swap plain nn.Linear back in place."""
    for name, m in lora_modules(model).items():
        lin = nn.Linear(
            m.in_features,
            m.out_features,
            bias=m.bias is not None,
            device=m.weight.device,
            dtype=m.weight.dtype,
        )
        lin.weight = m.weight
        lin.bias = m.bias
        lin.weight.add_(m.delta_weight().to(lin.weight.dtype))
        _replace(model, name, lin)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed like the model's state dict (`layers.0.self_attn.q_proj.lora_A.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without adapter tensors: the names a base checkpoint has."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    base_model: str = "",
    extra_tensors: dict[str, torch.Tensor] | None = None,
    meta: dict | None = None,
) -> Path:
    """Write the adapter alone: adapter_config.json + adapter_model.safetensors (atomic folder swap).

    `extra_tensors` (e.g. a classifier head's score.weight/bias) are stored beside the adapter with an
    `extra.` prefix; `meta` goes into adapter_config.json under "meta".
    """
    from yuyan.model.checkpoint import atomic_write_dir, write_json

    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None:
        raise UserError("the model has no LoRA adapters to save; train with --lora-rank R first")
    sd = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    for k, v in (extra_tensors or {}).items():
        sd[f"extra.{k}"] = v.detach().contiguous().cpu()
    doc = {
        "peft_type": "LORA",
        "format": "yuyan-lora",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets,
        "base_model_name_or_path": str(base_model),
        "meta": meta or {},
    }

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, doc)

    return atomic_write_dir(path, write)


def read_adapter_config(path: str | os.PathLike) -> dict:
    f = Path(path) / ADAPTER_CONFIG
    if not f.exists():
        raise UserError(
            f"{path} has no {ADAPTER_CONFIG}: it is not a LoRA adapter folder (save one with --save-adapter)"
        )
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{f} is not valid JSON ({e}); re-save the adapter") from None


def load_adapter(
    model: nn.Module, path: str | os.PathLike
) -> tuple[nn.Module, dict, dict[str, torch.Tensor]]:
    """Apply the adapter saved in `path` to a base model; returns (model, adapter config, extra tensors)."""
    from yuyan.model.checkpoint import verify_manifest

    p = Path(path)
    doc = read_adapter_config(p)
    verify_manifest(p)
    apply_lora(
        model,
        int(doc["r"]),
        float(doc["lora_alpha"]),
        float(doc.get("lora_dropout", 0.0)),
        list(doc["target_modules"]),
    )
    try:
        sd = load_file(str(p / ADAPTER_WEIGHTS), device=str(next(model.parameters()).device))
    except Exception as e:
        raise UserError(
            f"{p / ADAPTER_WEIGHTS} cannot be read ({str(e)[:160]}); re-save the adapter"
        ) from None
    extra = {k.removeprefix("extra."): v for k, v in sd.items() if k.startswith("extra.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("extra.")}
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    bad = [k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise UserError(
            f"adapter {p} does not fit this model (missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"mis-shaped {bad[:4]}); load it onto the base model it was trained from"
        )
    model.load_state_dict(sd, strict=False)
    return model, doc, extra


def adapter_base(path: str | os.PathLike) -> str:
    """The model spec of the base an adapter folder was trained from (`base_model_name_or_path`)."""
    base = read_adapter_config(path).get("base_model_name_or_path") or ""
    if not base:
        raise UserError(
            f"{path}/{ADAPTER_CONFIG} names no base model; load the base with yuyan.load and "
            "apply the adapter with yuyan.model.lora.load_adapter"
        )
    return base


def attach_adapter(lm, path: str | os.PathLike, merge: bool = True):
    """The LanguageModel `lm` (the adapter's base, loaded by the caller: `yuyan.load` does it for an adapter
    folder) with the adapter in `path` applied, merged by default (plain modules, full speed); the adapter's
    head tensors and meta (e.g. a classifier) come along."""
    doc = read_adapter_config(path)
    _, _, extra = load_adapter(lm.model, path)
    if merge:
        merge_lora(lm.model)
    lm.model.eval()
    lm.meta = {**lm.meta, **doc.get("meta", {}), "adapter": str(path)}
    lm.extra_tensors = {**lm.extra_tensors, **extra}
    return lm


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied tensors counted once."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "merge_lora",
    "lora_state_dict",
    "base_state_dict",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "adapter_base",
    "attach_adapter",
    "lora_modules",
    "count_params",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_TARGETS",
    "ALL_LINEAR",
]
