"""The key/value cache of incremental decoding: a small explicit object the caller owns.

The model writes each new token's keys and values into it during `forward` but never advances it; the
decoding code allocates it, advances `lengths`, reorders and copies rows, and resets it. Keeping it outside
the model's modules means a model holds no hidden decoding state, and one model can serve many caches.
"""

from __future__ import annotations

from typing import Protocol

import torch


class CacheShape(Protocol):
    """What the cache reads of a model config (`ModelConfig` has these)."""

    n_layer: int
    n_kv_head: int
    head_dim: int
    block_size: int


class KVCache:
    """Preallocated keys/values for every layer, with a per-row length.

    k, v: (n_layer, batch, n_kv_head, capacity, head_dim). `lengths[b]` is how many positions of row b are
    filled; a forward pass with T new tokens writes them at lengths[b] .. lengths[b]+T-1 and its queries see
    exactly the slots < lengths[b]+t+1. The caller advances `lengths` after the forward pass.
    """

    def __init__(
        self,
        config: CacheShape,
        batch: int,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.capacity = capacity or config.block_size
        shape = (config.n_layer, batch, config.n_kv_head, self.capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.lengths.zero_()

    def advance(self, n: int | torch.Tensor) -> None:
        self.lengths += n

    def rows(self, start: int, end: int) -> KVCache:
        """Rows start..end-1 as a cache of their own that shares this one's storage (writes go through)."""
        view = object.__new__(KVCache)
        view.capacity = self.capacity
        view.k, view.v = self.k[:, start:end], self.v[:, start:end]
        view.lengths = self.lengths[start:end]
        return view

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search reordering, or dropping finished rows)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.lengths = self.lengths.index_select(0, index)

    def copy_row(self, dst: int, src: KVCache, src_row: int = 0) -> None:
        n = int(src.lengths[src_row])
        self.k[:, dst, :, :n] = src.k[:, src_row, :, :n]
        self.v[:, dst, :, :n] = src.v[:, src_row, :, :n]
        self.lengths[dst] = n

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, S: int):
        """Write k, v (B, Hkv, T, D) at positions pos (B, T); return this layer's first S slots (B, Hkv, S, D)."""
        B, H, T, D = k.shape
        idx = pos[:, None, :, None].expand(B, H, T, D)
        kc, vc, k, v = self.k[layer, :B], self.v[layer, :B], k.to(self.k.dtype), v.to(self.v.dtype)
        if kc.element_size() == 2:  # bf16/fp16: move the bits (CPU scatter_ of bf16 took 39 us, of int16 4)
            kc, vc, k, v = (t.view(torch.int16) for t in (kc, vc, k, v))
        kc.scatter_(2, idx, k)
        vc.scatter_(2, idx, v)
        return self.k[layer, :B, :, :S], self.v[layer, :B, :, :S]


__all__ = ["KVCache"]
