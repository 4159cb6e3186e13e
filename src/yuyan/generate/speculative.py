"""Greedy speculative decoding with the model's own int8 copy as the draft (self-speculation).

Decoding one token on a CPU reads every weight once, so a step costs about the same for 1 token as for a few:
on the 124M shape 28 ms for one token and 44 ms for four (BENCHMARKS.md "## Generation"). The int8 copy
(`quantize_int8`) reads a quarter of the bytes and proposes `k` tokens one by one; the float model then scores
the current token and the k proposals in a single forward pass and keeps the longest prefix it agrees with
plus its own next token. Every emitted token is the float model's own greedy choice, so the output is the
plain greedy output (up to float rounding between a 1-token and a (k+1)-token pass, the same tolerance as
cached vs uncached decoding); only the speed depends on how often the draft agrees.

Both caches hold every token of a row except the newest (`cur`). After a round in which all k proposals were
kept, the draft has not yet seen the last one, so that row feeds two tokens to the draft next time; rows are
right-padded to the longest pending feed (junk slots lie past a row's length and are overwritten later).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import nn

from yuyan.generate.engine import GenerationConfig, Row, _cache_dtype, _device, _stop_ids, extend, prefill
from yuyan.generate.kernels import DecodeLinear
from yuyan.model.transformer import KVCache, Transformer
from yuyan.tokenizer import Tokenizer

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
    that fits the context; anything else decodes normally."""
    if config.speculative == 0 or not prompts:  # the common case: decided before looking at the model
        return False
    sp = config.sampling_params()
    return (
        type(model) is Transformer  # no LoRA or int8 layers: an int8 copy can be made of it
        and all(
            type(m) in (nn.Linear, DecodeLinear)
            for m in model.modules()
            if type(m).__name__.endswith("Linear")
        )
        and _device(model).type == "cpu"
        and _cache_dtype(model) == torch.float32
        and (config.num_beams, config.n, config.temperature, config.logprobs) == (1, 1, 0, None)
        and (sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty) == (1.0, 0.0, 0.0)
        and max(len(p) for p in prompts) + config.max_new_tokens + config.speculative + 1
        <= model.config.block_size
    )


@torch.inference_mode()
def decode(
    model: Transformer,
    draft: nn.Module,
    tokenizer: Tokenizer | None,
    prompts: list[list[int]],
    config: GenerationConfig,
) -> Iterator[list[Row]]:
    """Greedy decode of `prompts` with k = config.speculative draft tokens per round; yields the rows after
    every round (for streaming), as the engine's `_decode` does after every step."""
    k, dev, most = config.speculative, _device(model), config.max_new_tokens
    stop_ids = _stop_ids(tokenizer, config)
    rows = [Row(p, tokenizer, config.stop) for p in prompts]
    yield rows
    if most == 0:
        return

    def emit(row: Row, tok: int) -> None:
        if row.finish is not None or len(row.generated) >= most:
            return
        if tok in stop_ids:
            row.generated.append(tok)
            row.finish = "stop"
        else:
            row.add(tok)

    R, dt = len(rows), _cache_dtype(model)
    max_len = max(len(p) for p in prompts) + most + k + 1
    cache = KVCache(model.config, R, max_len=max_len, device=dev, dtype=dt)
    dcache = KVCache(model.config, R, max_len=max_len, device=dev, dtype=dt)
    cur = prefill(model, cache, list(range(R)), prompts).max(-1).indices.tolist()  # first greedy token
    prefill(draft, dcache, list(range(R)), prompts)
    pending = [[c] for c in cur]  # tokens the draft has not seen yet, per live row
    live = list(range(R))
    while True:
        for i, rid in enumerate(live):  # the float model's own next token is always right
            emit(rows[rid], cur[i])
        done = {
            i
            for i, rid in enumerate(live)
            if rows[rid].finish is not None or len(rows[rid].generated) >= most
        }
        if len(done) == len(live):
            break
        if done:  # drop finished rows from both caches
            keep = [i for i in range(len(live)) if i not in done]
            keep_t = torch.tensor(keep, device=dev)
            cache.reorder(keep_t)
            dcache.reorder(keep_t)
            live, cur, pending = [live[i] for i in keep], [cur[i] for i in keep], [pending[i] for i in keep]
        # the draft proposes k tokens, one at a time
        proposals = [extend(draft, dcache, pending).max(-1).indices]
        for _ in range(k - 1):
            proposals.append(extend(draft, dcache, [[t] for t in proposals[-1].tolist()]).max(-1).indices)
        d = torch.stack(proposals, 1)  # (B, k)
        # the float model scores cur and the k proposals in one pass
        seq = torch.cat((torch.tensor(cur, device=dev)[:, None], d), 1)  # (B, k + 1)
        g = model.lm_head(model.hidden(seq, cache=cache)).float().max(-1).indices  # (B, k + 1)
        kept = (d == g[:, :-1]).long().cumprod(1).sum(1)  # (B,) leading proposals it agrees with
        cache.advance(kept + 1)  # cur and the kept proposals; later slots are overwritten next round
        a, d_list, g_list = kept.tolist(), d.tolist(), g.tolist()
        for i, rid in enumerate(live):
            for t in d_list[i][: a[i]]:
                emit(rows[rid], t)
        cur = [g_list[i][a[i]] for i in range(len(live))]
        # the draft saw cur and proposals 1..k-1: when all k were kept it still owes the k-th
        pending = [[d_list[i][k - 1], cur[i]] if a[i] == k else [cur[i]] for i in range(len(live))]
        dcache.lengths = cache.lengths - torch.tensor([len(p) - 1 for p in pending], device=dev)
        yield rows
    for r in rows:
        r.close()
    yield rows


__all__ = ["decode", "int8_draft", "usable"]
