"""Prefix caching (generate/prefix.py): prompts that share a prefix reuse its cached keys/values and get the
logits and tokens they get without the cache (learned and RoPE positions, fp32 and bf16 caches), in the
decode core, the scheduler and the server; the bound in tokens holds under eviction."""

from __future__ import annotations

import httpx
import pytest
import torch
from tests.conftest import tiny_config

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig
from yuyan.generate.core import Decoder
from yuyan.generate.prefix import BLOCK_TOKENS, PrefixCache
from yuyan.generate.scheduler import Scheduler, run_to_completion
from yuyan.model.transformer import Transformer
from yuyan.serve import ServeConfig

BS = BLOCK_TOKENS
# the suffix is computed as a shorter product than the whole prompt: rounding may differ (observed: 0 to
# 9e-8 in fp32, 0 in bf16, where the same prompts batched differently differ by 1e-7 and 2e-3)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _model(family: str, dtype: torch.dtype = torch.float32, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(family, **{"block_size": 128, **kw})).eval().to(dtype)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = _ids(2 * BS + 5, 1)  # a "system prompt" of 37 tokens: two full blocks and a partial one
PROMPTS = [
    SYSTEM + _ids(3, 2),  # shares the two blocks
    SYSTEM + _ids(20, 3),  # shares them too, and has a third block of its own
    SYSTEM[: BS + 7],  # partial overlap: one block
    SYSTEM[: 2 * BS],  # exactly two blocks: only the first may be reused (the last token is computed)
    _ids(30, 4),  # nothing in common
]


def _logits_by_row(core: Decoder) -> dict[int, torch.Tensor]:
    return {id(r): core.logits[i].clone() for i, r in enumerate(core.rows)}


def _admit(core: Decoder, prompts: list[list[int]], config: GenerationConfig) -> list[torch.Tensor]:
    """Each prompt's next-token logits (of its choice 0) after admitting them together."""
    rows = core.admit(prompts, [config] * len(prompts))
    by_row = _logits_by_row(core)
    return [by_row[id(rs[0])] for rs in rows]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _finish(core: Decoder) -> None:
    while core.rows:
        core.step()


# ------------------------------------------------------------------------------------------------ the core
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_with_and_without_the_cache(family, dtype):
    model, cfg = _model(family, dtype), GenerationConfig.from_dict(dict(max_new_tokens=4))
    ref = _admit(Decoder(model, None, 8), PROMPTS, cfg)
    alone = [_admit(Decoder(model, None, 1), [p], cfg)[0] for p in PROMPTS]  # no batch around them
    pc = PrefixCache(1024)
    first = _admit(Decoder(model, None, 8, prefix_cache=pc), PROMPTS, cfg)  # shared within the batch
    # the first prompt computed SYSTEM's two blocks before the others looked up; the exact two-block
    # prompt reuses one, since the block of its last token is computed
    assert (pc.hits, pc.hit_tokens) == (3, 2 * BS + BS + BS)
    again = _admit(Decoder(model, None, 8, prefix_cache=pc), PROMPTS, cfg)  # every prompt seen before
    assert (pc.hits, pc.hit_tokens - 4 * BS) == (3 + 5, 2 * BS + 3 * BS + BS + BS + BS)
    tol = TOL[dtype]
    assert _max_diff(first, ref) <= tol and _max_diff(again, ref) <= tol
    assert _max_diff(alone, ref) <= tol  # the reference's own spread across batches, for scale
    for logits in (first, again):  # the same next token
        assert [int(x.argmax()) for x in logits] == [int(x.argmax()) for x in ref]


def test_logits_match_a_whole_forward_pass(family):
    """Against the model itself, no cache of any kind: the last position's logits of the full prompt."""
    model, cfg, pc = _model(family), GenerationConfig.from_dict(dict(max_new_tokens=2)), PrefixCache(512)
    _admit(Decoder(model, None, 8, prefix_cache=pc), PROMPTS[:1], cfg)
    got = _admit(Decoder(model, None, 8, prefix_cache=pc), PROMPTS[1:2], cfg)[0]
    assert pc.hit_tokens == 2 * BS
    with torch.no_grad():
        want = model(torch.tensor([PROMPTS[1]]))[0, -1].float()
    assert float((got - want).abs().max()) < 1e-5


def test_n_choices_prefill_once_and_share_the_logits(family):
    model, pc = _model(family), PrefixCache(512)
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=3, n=3))
    core = Decoder(model, None, 8, prefix_cache=pc)
    rows = core.admit(PROMPTS[:2], [cfg, cfg])
    assert pc.lookups == 2  # one prefill per prompt, not per choice
    by_row = _logits_by_row(core)
    ref = _admit(Decoder(model, None, 2), PROMPTS[:2], GenerationConfig.from_dict(dict(max_new_tokens=3)))
    for rs, want in zip(rows, ref, strict=True):
        for r in rs:
            assert float((by_row[id(r)] - want).abs().max()) <= TOL[torch.float32]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_seeded_sampling_gives_the_same_tokens(family, temperature):
    model = _model(family)
    cfg = GenerationConfig.from_dict(
        dict(max_new_tokens=12, temperature=temperature, seed=7, n=2, stop_token_ids=[])
    )

    def run(pc: PrefixCache | None, prompts: list[list[int]]) -> list[list[int]]:
        core = Decoder(model, None, 2 * len(prompts), prefix_cache=pc)
        rows = core.admit(prompts, [cfg] * len(prompts))
        _finish(core)
        return [r.generated for rs in rows for r in rs]

    pc = PrefixCache(512)
    run(pc, PROMPTS[:1])  # warm the cache with the shared system prompt
    assert run(pc, PROMPTS[1:4]) == run(None, PROMPTS[1:4])
    assert pc.hits >= 3


def test_rows_admitted_together_compute_a_shared_prefix_once(family):
    model, pc = _model(family), PrefixCache(512)
    prompts = [SYSTEM + _ids(4, 10 + i) for i in range(4)]
    core = Decoder(model, None, 4, prefix_cache=pc)
    got = _admit(core, prompts, GenerationConfig.from_dict(dict(max_new_tokens=2)))
    assert (pc.lookups, pc.hits, pc.hit_tokens) == (4, 3, 3 * 2 * BS)
    assert pc.stored == 2  # SYSTEM's two blocks, once
    ref = _admit(Decoder(model, None, 4), prompts, GenerationConfig.from_dict(dict(max_new_tokens=2)))
    assert _max_diff(got, ref) <= TOL[torch.float32]


def test_eviction_keeps_the_bound_and_evicts_leaves_first():
    model, cfg = _model("gpt2"), GenerationConfig.from_dict(dict(max_new_tokens=1))
    pc = PrefixCache(3 * BS)  # three blocks
    core = Decoder(model, None, 1, prefix_cache=pc)

    def admit(p: list[int]) -> None:
        core.admit([p], [cfg])
        core.remove(list(core.rows))
        assert pc.tokens <= 3 * BS
        held = set(pc._blocks.values())
        assert all(b.parent is None or b.parent in held for b in held)  # no unreachable block

    a, b = _ids(4 * BS + 1, 20), _ids(2 * BS + 1, 21)
    admit(a)  # four blocks do not fit: the chain stops at three rather than evict its own blocks
    assert pc.stored == 3 and pc.evicted == 0
    admit(b)  # two new blocks: a's two deepest go (leaves first), a's first block stays
    assert pc.evicted == 2 and pc.tokens == 3 * BS
    assert len(pc.match(a)) == 1 and len(pc.match(b)) == 2
    admit(a)  # a's first block is a hit (and now the most recent); b's leaf, then b's root make room
    assert pc.hit_tokens == BS and pc.evicted == 4
    assert len(pc.match(b)) == 0 and len(pc.match(a)) == 3
    ref = _admit(Decoder(model, None, 1), [a], cfg)
    got = _admit(Decoder(model, None, 1, prefix_cache=pc), [a], cfg)
    assert _max_diff(got, ref) <= TOL[torch.float32]


def test_changed_weights_and_dtype_invalidate(family):
    model, cfg, pc = _model(family), GenerationConfig.from_dict(dict(max_new_tokens=1)), PrefixCache(512)
    _admit(Decoder(model, None, 1, prefix_cache=pc), PROMPTS[:1], cfg)
    with torch.no_grad():  # an optimizer step: in place, under no_grad
        for p in model.parameters():
            p.mul_(1.5)
    got = _admit(Decoder(model, None, 1, prefix_cache=pc), PROMPTS[1:2], cfg)
    ref = _admit(Decoder(model, None, 1), PROMPTS[1:2], cfg)
    assert pc.invalidations == 1 and pc.hit_tokens == 0
    assert _max_diff(got, ref) <= TOL[torch.float32]
    model.to(torch.bfloat16)
    _admit(Decoder(model, None, 1, prefix_cache=pc), PROMPTS[1:2], cfg)
    assert pc.invalidations == 2 and pc.hit_tokens == 0


def test_hits_shorten_where_padding_would_leave_the_cache(family):
    """A row that starts deep in its cached prefix is right-padded to the longest suffix of the batch; when
    that would run past the decoder's capacity (or a learned position table), the hit is shortened."""
    model, cfg = (
        _model(family),
        GenerationConfig.from_dict(dict(max_new_tokens=1, context_overflow="truncate")),
    )
    pc = PrefixCache(512)
    long_shared = _ids(3 * BS + 2, 30)
    _admit(Decoder(model, None, 2, 3 * BS + 4, prefix_cache=pc), [long_shared], cfg)
    # the first row has 48 tokens cached and a suffix of 3; the second's suffix of 20 pads it to 68 > 52
    prompts = [long_shared + [5], _ids(20, 31)]
    got = _admit(Decoder(model, None, 2, 3 * BS + 4, prefix_cache=pc), prompts, cfg)
    assert pc.hit_tokens == 2 * BS  # two blocks: 32 + 20 fits the 52 positions
    ref = _admit(Decoder(model, None, 2, 3 * BS + 4), prompts, cfg)
    assert _max_diff(got, ref) <= TOL[torch.float32]


def test_sliding_window_rows_with_the_cache(family):
    model = _model(family, block_size=48)
    cfg = GenerationConfig.from_dict(
        dict(max_new_tokens=40, temperature=0, sliding_window=True, stop_token_ids=[])
    )

    def run(pc: PrefixCache | None) -> list[int]:
        core = Decoder(model, None, 1, prefix_cache=pc)
        ((row,),) = core.admit([SYSTEM], [cfg])
        _finish(core)
        return row.generated

    pc = PrefixCache(512)
    run(pc)
    assert run(pc) == run(None) and pc.hits == 1


def test_settings_are_checked():
    with pytest.raises(UserError, match="no block of 16"):
        PrefixCache(BS - 1)
    with pytest.raises(UserError, match="--prefix-cache-tokens"):
        ServeConfig(prefix_cache_tokens=3).validate()
    with pytest.raises(UserError, match="prefix_cache_tokens"):
        Scheduler(_model("gpt2"), None, prefix_cache_tokens=-1)
    assert ServeConfig(prefix_cache_tokens=0).validate().prefix_cache_tokens == 0


# ------------------------------------------------------------------------------------------------ drivers
def test_scheduler_reuses_prefixes_with_the_same_tokens(tokenizer, family):
    torch.manual_seed(0)
    model = Transformer(tiny_config(family, vocab_size=tokenizer.vocab_size, block_size=128)).eval()
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=6, temperature=0.8, seed=3))
    prompts = [[t % tokenizer.vocab_size for t in p] for p in PROMPTS[:3]]

    def run(tokens: int) -> tuple[list[list[int]], dict | None]:
        with Scheduler(model, tokenizer, max_batch=4, prefix_cache_tokens=tokens) as s:
            out = []
            for p in prompts:  # one after another: each finds the blocks of the ones before
                (fin,) = run_to_completion(s.submit(p, cfg), timeout=60)
                out.append(fin.text)
            return out, s.stats()["prefix_cache"]

    with_cache, stats = run(256)
    without, none = run(0)
    assert with_cache == without and none is None
    assert stats["hits"] == 2 and stats["hit_tokens"] == 2 * BS + BS and stats["tokens"] <= 256


def test_server_reports_prefix_cache_hits(tokenizer):
    from tests._serve_util import serve

    prompt = " ".join(f"w{i}" for i in range(14))
    with serve(tokenizer, prefix_cache_tokens=256) as (base, _lm, _app):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0}
        texts = [httpx.post(base + "/v1/completions", json=body, timeout=30).json() for _ in range(2)]
        health = httpx.get(base + "/health", timeout=10).json()
    assert texts[0]["choices"][0]["text"] == texts[1]["choices"][0]["text"]
    assert health["prefix_cache"]["hits"] == 1 and health["prefix_cache"]["hit_tokens"] > 0
