"""Model: the transformer, checkpoints, Hugging Face interop, LoRA; `load(spec)` opens any of them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from yuyan.errors import UserError
from yuyan.model.checkpoint import LanguageModel, load_checkpoint, read_config
from yuyan.model.kv_cache import KVCache
from yuyan.model.presets import preset
from yuyan.model.transformer import ModelConfig, Transformer


def load(spec: str | os.PathLike, device: torch.device | str | None = None) -> LanguageModel:
    """Open a model: our checkpoint folder, a Hugging Face folder (gpt2/llama/qwen2/mistral), `hf:NAME`, or a
    LoRA adapter folder (its base model plus the adapter, merged)."""
    s = str(spec)
    if s.startswith("hf:"):
        from yuyan.model.hf import download

        s = str(download(s[3:]))
    p = Path(s)
    if not p.exists():
        from yuyan.model.checkpoint import resolve_dir

        p = resolve_dir(p)  # recovers a checkpoint caught between renames, or says clearly it is missing
    if p.is_file():
        raise UserError(f"{p} is a file; pass the model folder that holds config.json")
    if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        from yuyan.model.lora import adapter_base, attach_adapter

        return attach_adapter(load(adapter_base(p), device), p)  # a LoRA adapter: its base + the adapter
    if read_config(p).get("format") == "yuyan":
        return load_checkpoint(p, device)
    from yuyan.model.hf import load_hf

    return load_hf(p, device)


__all__ = ["load", "LanguageModel", "ModelConfig", "Transformer", "KVCache", "preset"]
