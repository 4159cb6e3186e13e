"""Named model shapes: `preset("gpt2")` is GPT-2 124M's `ModelConfig`, with any field overridden by keyword.

The shapes are plain dicts of `ModelConfig` fields, so a preset is nothing but a starting config; `yuyan
train`'s [model] section names one and overrides its fields, and tests build every preset on the meta device.
"""

from __future__ import annotations

from yuyan.model.transformer import ModelConfig

_LLAMA = dict(ffn="swiglu", norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False, norm_eps=1e-5)
PRESETS: dict[str, dict] = {
    # sized for the 5-minute, 2-core CPU budget of `yuyan demo` (see BENCHMARKS.md for the sweep)
    "demo": dict(vocab_size=4096, block_size=128, n_layer=4, n_head=4, d_model=128),
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, d_model=1024),
    "llama-tiny": dict(
        vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, d_model=128, **_LLAMA
    ),
    # Llama-3.2-1B shape
    "llama-1b": dict(
        vocab_size=128256,
        block_size=8192,
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        d_model=2048,
        d_ff=8192,
        rope_theta=500000.0,
        **{**_LLAMA, "tie_embeddings": True},
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The config of preset `name` with `overrides` (ModelConfig fields) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "preset"]
