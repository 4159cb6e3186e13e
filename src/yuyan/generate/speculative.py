"""Greedy speculative decoding with the model's own int8 copy as the draft: a step strategy of the core.

Decoding one token on a CPU reads every weight once, so a step costs about the same for 1 token as for a few:
on the 124M shape 28 ms for one token and 44 ms for four (BENCHMARKS.md "## Generation"). The int8 copy
(`quantize_int8`) reads a quarter of the bytes and proposes `k` tokens one by one; the float model then scores
the newest token and the k proposals in a single forward pass and keeps the longest prefix it agrees with;
its logits after that prefix give the next token, chosen by the core like any other. Every emitted token is
the float model's own greedy choice, so the output is the plain greedy output (up to float rounding between
a 1-token and a (k+1)-token pass, the same tolerance as cached vs uncached decoding); only the speed
depends on how often the draft agrees.

The draft keeps its own cache, packed like the core's (the strategy hears of admitted, moved and
re-windowed rows). Row b's draft cache always holds a prefix of its window; the rest (`pending`, at least
the newest token) is fed at the start of the next round, so a new or re-windowed row simply starts empty.
A step in which some row samples, wants logprobs or penalties, or has no room for k more tokens runs the
plain forward pass instead, and the draft catches up later through `pending`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from yuyan.generate.config import GenerationConfig
from yuyan.generate.core import Decoder, Forward, cache_dtype, extend, forward, model_device
from yuyan.generate.kernels import DecodeLinear
from yuyan.model.kv_cache import KVCache
from yuyan.model.transformer import Transformer

_DRAFTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def int8_draft(model: Transformer) -> nn.Module:
    """The int8 weight-only copy of `model`, built once per model object and kept while the model lives.

    A draft that has gone stale (the model trained on since) only lowers the acceptance rate: verification
    by the float model keeps the output right."""
    from yuyan.model.quantize import quantize_int8

    draft = _DRAFTS.get(model)
    if draft is None:
        draft = Transformer(model.config).eval()
        draft.load_state_dict(model.state_dict())  # a plain Transformer (usable() checks)
        quantize_int8(draft)
        # the float tables are only looked up, never streamed: share them instead of keeping a copy
        draft.embed_tokens = model.embed_tokens
        if model.config.pos == "learned":
            draft.embed_positions = model.embed_positions
        _DRAFTS[model] = draft
    return draft


def usable(model: Transformer, prompts: list[list[int]], config: GenerationConfig) -> bool:
    """Speculation covers plain greedy decoding of a float32 CPU model (int8 drafts are fbgemm, CPU kernels)
    that fits the context; anything else decodes normally (with the same output)."""
    if config.speculative == 0 or not prompts:  # the common case: decided before looking at the model
        return False
    sp = config.sampling
    return (
        type(model) is Transformer  # no LoRA or int8 layers: an int8 copy can be made of it
        and all(
            type(m) in (nn.Linear, DecodeLinear)
            for m in model.modules()
            if type(m).__name__.endswith("Linear")
        )
        and model_device(model).type == "cpu"
        and cache_dtype(model) == torch.float32
        and (config.num_beams, sp.n, sp.temperature, config.logprobs) == (1, 1, 0, None)
        and (sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty) == (1.0, 0.0, 0.0)
        and not sp.logit_bias  # the verifier compares raw argmaxes: biased or constrained rows decode
        and config.grammar is None  # normally
        and max(len(p) for p in prompts) + config.max_new_tokens + config.speculative + 1
        <= model.config.block_size
    )


class Speculator(Forward):
    """Draft k tokens per row with `draft` and verify them in one pass of the core's model."""

    def __init__(self, draft: nn.Module, k: int):
        self.draft, self.k = draft, k
        self.cache: KVCache | None = None

    def _cache(self, core: Decoder) -> KVCache:
        if self.cache is None:
            self.cache = KVCache(
                core.model.config,
                core.max_rows,
                capacity=core.capacity,
                device=core.device,
                dtype=cache_dtype(core.model),
            )
        return self.cache

    def admitted(self, core: Decoder, first: int, count: int) -> None:
        self._cache(core).lengths[first : first + count] = 0

    def moved(self, core: Decoder, dst: int, src: int) -> None:
        self._cache(core).copy_row(dst, self._cache(core), src)

    def slid(self, core: Decoder, rows: list[int]) -> None:
        self._cache(core).lengths[torch.tensor(rows, device=core.device)] = 0

    def applies(self, core: Decoder) -> bool:
        return (
            all(
                r.config.sampling.temperature == 0
                and r.config.logprobs is None
                and len(r.tokens) - r.start + self.k <= core.capacity  # cached window + cur + k proposals
                for r in core.rows
            )
            and not core.sampling().use_penalties
        )

    def advance(self, core: Decoder, tokens: torch.Tensor) -> torch.Tensor:
        if not self.applies(core):
            return forward(core.model, core.cache, tokens)
        B, k, dc = len(core.rows), self.k, self._cache(core)
        # the draft proposes k tokens, one at a time, after feeding what it has not seen of each row
        pending = [r.tokens[r.start + d :] for r, d in zip(core.rows, dc.lengths[:B].tolist(), strict=True)]
        proposals = [extend(self.draft, dc, pending).max(-1).indices]
        for _ in range(k - 1):
            proposals.append(forward(self.draft, dc, proposals[-1]).max(-1).indices)
        d = torch.stack(proposals, 1)  # (B, k)
        # the model scores the newest token and the k proposals in one pass
        seq = torch.cat((tokens[:, None], d), 1)  # (B, k + 1)
        L = core.cache.lengths[:B].clone()
        pos = L[:, None] + torch.arange(k + 1, device=core.device)[None, :]
        logits = core.model.logits(core.model.hidden(seq, pos=pos, cache=core.cache)).float()  # (B, k+1, V)
        kept = (d == logits[:, :-1].max(-1).indices).long().cumprod(1).sum(1)  # (B,) agreeing proposals
        core.cache.lengths[:B] = L + kept + 1  # later slots are overwritten next round
        dc.lengths[:B] = torch.minimum(L + k, L + 1 + kept)  # the draft saw the newest and k - 1 proposals
        for row, props, a in zip(core.rows, d.tolist(), kept.tolist(), strict=True):
            for t in props[:a]:
                row.take(t, core.capacity)
        return logits[torch.arange(B, device=core.device), kept]


__all__ = ["Speculator", "int8_draft", "usable"]
