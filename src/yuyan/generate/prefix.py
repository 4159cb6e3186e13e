"""Prefix caching: prompts that start alike reuse the keys/values already computed for that start.

A causal model's keys and values at position t depend only on tokens 0..t, so the K/V a prefill wrote for
one prompt serve every later prompt that begins with the same tokens. `PrefixCache` keeps them in
fixed-size blocks of `block_tokens` tokens (vLLM's design): block j of a prompt is keyed by its parent
block and its own token ids, `(parent.serial, ids[j*bs:(j+1)*bs])`, so a lookup walks the chain from the
first block and stops at the first block not held. Keys are the token ids themselves (no hash of them):
two different prefixes can never share an entry. A block holds `(2, n_layer, n_kv_head, block_tokens,
head_dim)` in the decode cache's dtype, copied out of the row that computed it; a hit copies the chain back
into a new row, and the decode core prefills only the rest of the prompt (`core.prefill`).

What the keys must include beside the ids:
- the position start: every block is written and read by a prefill that starts at position 0 (a chain
  starts at the prompt's first token), so a sliding window's re-prefill, whose tokens are not a prompt's
  start, never stores or reads blocks;
- the model and the cache dtype: `bind()` fingerprints the model (its object, every parameter's and
  buffer's storage address, dtype, device and in-place version counter) and the cache dtype; a different
  fingerprint (new weights, an optimizer step, `decode_layout` to bf16) empties the cache. Weights changed
  in place through `.data` bypass torch's version counter: call `clear()` after such a change.

Bounds: at most `max_tokens // block_tokens` blocks, so memory is at most `max_tokens` positions of K/V
(`bytes_per_token` = 2 * n_layer * n_kv_head * head_dim * dtype size; GPT-2 124M in fp32: 72 KiB). When
full, the least recently used block with no child is evicted (leaf first: a block is looked up only
through its parent, so a parent is always touched after its children and never evicted before them); a
chain that would have to evict its own blocks stops storing. Only full blocks inside a prompt are stored,
and a lookup never covers a prompt's last token, so its logits are always computed.

Exactness: the reused K/V are the very numbers a prefill of the same prefix computed, but the suffix is
then computed as a shorter matrix product than the whole prompt would be, so logits agree to float
rounding (the cached-vs-uncached figures are in tests/test_prefix_cache.py), like any change of batch.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from yuyan.errors import UserError

BLOCK_TOKENS = 16  # tokens per block (vLLM's default): smaller reuses more, at more copies per hit


class Block:
    """One cached block: its key, K/V (2, n_layer, n_kv_head, block_tokens, head_dim) and tree links."""

    __slots__ = ("key", "kv", "serial", "parent", "children")

    def __init__(self, key: tuple, kv: torch.Tensor, serial: int, parent: Block | None):
        self.key, self.kv, self.serial, self.parent = key, kv, serial, parent
        self.children = 0


class PrefixCache:
    """K/V of prompt prefixes in blocks of `block_tokens`, LRU-evicted to at most `max_tokens` positions.

    The decode core calls `bind()` before a prefill, `lookup()` for each prompt, `load()` to copy a hit
    into its row and `store()` after the prefill. One cache serves one model at a time (see `bind`); it is
    not thread-safe: the thread that decodes owns it (`stats()` may be read from any thread).
    """

    def __init__(self, max_tokens: int, block_tokens: int = BLOCK_TOKENS):
        if block_tokens < 1:
            raise UserError(f"prefix cache block_tokens must be >= 1, got {block_tokens}")
        if max_tokens < block_tokens:
            raise UserError(
                f"a prefix cache of {max_tokens} tokens holds no block of {block_tokens} tokens; "
                f"give at least {block_tokens} tokens (or no prefix cache)"
            )
        self.block_tokens, self.max_blocks = block_tokens, max_tokens // block_tokens
        self.max_tokens = self.max_blocks * block_tokens
        self._blocks: OrderedDict[tuple, Block] = OrderedDict()  # least recently used first
        self._serial = itertools.count(1)  # 0 is the root (the empty prefix)
        self._bound: tuple | None = None
        self.bytes_per_block = 0
        # counters (read by stats())
        self.lookups = self.hits = self.prompt_tokens = self.hit_tokens = 0
        self.stored = self.evicted = self.invalidations = 0

    # ---------------------------------------------------------------- what the entries belong to
    def bind(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Tie the cache to `model` with a decode cache of `dtype`; entries of anything else are dropped."""
        tensors = itertools.chain(model.parameters(), model.buffers())
        key = (id(model), dtype, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
        if key != self._bound:
            if self._blocks:
                self.invalidations += 1
            self.clear()
            self._bound = key

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._blocks.clear()
        self._bound = None

    # ---------------------------------------------------------------- lookups
    def match(self, ids: Sequence[int], max_blocks: int | None = None) -> list[Block]:
        """The longest chain of held blocks that `ids` starts with (at most max_blocks); no side effects."""
        bs, chain, serial = self.block_tokens, [], 0
        n = len(ids) // bs if max_blocks is None else min(max_blocks, len(ids) // bs)
        for j in range(n):
            block = self._blocks.get((serial, tuple(ids[j * bs : (j + 1) * bs])))
            if block is None:
                break
            chain.append(block)
            serial = block.serial
        return chain

    def lookup(self, ids: Sequence[int]) -> list[Block]:
        """The cached chain a prefill of `ids` may reuse: never the last token (its logits are needed)."""
        chain = self.match(ids, (len(ids) - 1) // self.block_tokens)
        self._touch(chain)
        return chain

    def load(self, chain: list[Block], k: torch.Tensor, v: torch.Tensor, prompt_len: int) -> None:
        """Copy a chain into one row's k, v (n_layer, n_kv_head, capacity, head_dim) from position 0, for a
        prompt of prompt_len tokens (counted in the stats; an empty chain is a miss)."""
        bs = self.block_tokens
        for j, block in enumerate(chain):
            k[:, :, j * bs : (j + 1) * bs] = block.kv[0]
            v[:, :, j * bs : (j + 1) * bs] = block.kv[1]
        self.lookups += 1
        self.hits += bool(chain)
        self.prompt_tokens += prompt_len
        self.hit_tokens += len(chain) * bs

    def next_block(self, ids: Sequence[int]) -> tuple[int, tuple | None]:
        """(blocks of `ids` held, the key of the first one not held when a later prompt could reuse it, i.e.
        it lies before the last token, else None). Prompts with the same key would compute that block."""
        chain, bs = self.match(ids), self.block_tokens
        j = len(chain)
        if (j + 1) * bs > len(ids) - 1:
            return j, None
        return j, (chain[-1].serial if chain else 0, tuple(ids[j * bs : (j + 1) * bs]))

    # ---------------------------------------------------------------- stores and eviction
    def store(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the full blocks of `ids` whose K/V are in k, v (n_layer, n_kv_head, >= len(ids), head_dim),
        positions 0.. of the row that was just prefilled with them."""
        bs, chain, parent = self.block_tokens, [], None
        for j in range(len(ids) // bs):
            key = (parent.serial if parent else 0, tuple(ids[j * bs : (j + 1) * bs]))
            block = self._blocks.get(key)
            if block is None:
                if len(self._blocks) >= self.max_blocks and not self._evict(protect=chain):
                    break  # the bound is full of this very chain
                kv = torch.stack((k[:, :, j * bs : (j + 1) * bs], v[:, :, j * bs : (j + 1) * bs]))
                block = Block(key, kv, next(self._serial), parent)
                self.bytes_per_block = kv.numel() * kv.element_size()
                if parent is not None:
                    parent.children += 1
                self._blocks[key] = block
                self.stored += 1
            chain.append(block)
            parent = block
        self._touch(chain)

    def _touch(self, chain: list[Block]) -> None:
        # deepest first, so every parent is more recently used than its children (leaves are evicted first)
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _evict(self, protect: list[Block]) -> bool:
        """Drop the least recently used leaf outside `protect`; False when there is none."""
        keep = {id(b) for b in protect}
        for key, block in self._blocks.items():
            if block.children == 0 and id(block) not in keep:
                del self._blocks[key]
                if block.parent is not None:
                    block.parent.children -= 1
                self.evicted += 1
                return True
        return False

    # ---------------------------------------------------------------- reporting
    @property
    def tokens(self) -> int:
        """Positions held now."""
        return len(self._blocks) * self.block_tokens

    def stats(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "block_tokens": self.block_tokens,
            "tokens": self.tokens,
            "bytes": len(self._blocks) * self.bytes_per_block,
            "lookups": self.lookups,
            "hits": self.hits,
            "misses": self.lookups - self.hits,
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
            "stored_blocks": self.stored,
            "evicted_blocks": self.evicted,
            "invalidations": self.invalidations,
        }


__all__ = ["BLOCK_TOKENS", "Block", "PrefixCache"]
