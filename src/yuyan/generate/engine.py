"""The generation engine: prefill, cached incremental decode, batching, sampling, beams, streaming, long text.

Generation lives outside the model (STYLE principles 3-4). The engine owns a `KVCache`: prompts of different
lengths are prefilled together right-padded (junk written past a row's end is masked and later overwritten),
then each row decodes at its own position `cache.lengths[b]`. Logits are computed only for the positions
that need them (`model.hidden` then `model.lm_head` on gathered rows). When a row fills the context and the
sliding window is on, the most recent tokens are re-prefilled at positions 0.. (correct for learned and RoPE
positions alike), so generation runs to any length. Beam search follows Hugging Face transformers 5.x
(`_beam_search`) step for step, so the two agree token for token. `generate_naive` is the no-cache greedy
oracle the tests hold the engine to.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from yuyan.errors import UserError
from yuyan.generate.kernels import DecodeLinear, skinny_linear_op
from yuyan.generate.sampling import (
    SamplingParams,
    logprobs_topk,
    make_generator,
    process,
    sample,
    stack_params,
)
from yuyan.model.transformer import KVCache, Transformer
from yuyan.tokenizer import Tokenizer

WINDOW_KEEP = 0.75  # fraction of the context kept when the sliding window moves


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    num_beams: int = 1  # > 1: beam search (deterministic; temperature is ignored)
    length_penalty: float = 1.0  # beam score = sum logprob / generated_len ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never" (HF semantics)
    n: int = 1  # completions per prompt (samples, or the n best beams)
    seed: int | None = None  # sample j of every prompt draws from a generator seeded seed + j
    stop: list[str] = field(default_factory=list)  # stop strings: the text is cut before them
    stop_token_ids: list[int] | None = None  # None: the tokenizer's end-of-text token
    logprobs: int | None = None  # report each token's logprob and this many top alternatives
    context_overflow: str = "truncate"  # prompt longer than the context: "truncate" (left, warns) | "error"
    sliding_window: bool = True  # keep generating past the context by dropping the oldest tokens
    # > 0: greedy decoding drafts this many tokens per step with the model's int8 copy and keeps those the
    # model agrees with (same output, faster on CPU; generate/speculative.py). Ignored when not greedy.
    speculative: int = 0

    def sampling_params(self, seed: int | None = None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=seed,
            n=self.n,
        )

    def validate(self) -> GenerationConfig:
        self.sampling_params(self.seed).validate()
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (
                self.num_beams == 1 or self.n <= self.num_beams,
                f"n ({self.n}) must be <= num_beams ({self.num_beams}) in beam search",
            ),
            (
                self.early_stopping in (True, False, "never"),
                f"early_stopping must be true, false or never, got {self.early_stopping!r}",
            ),
            (
                self.context_overflow in ("truncate", "error"),
                f"context_overflow must be truncate or error, got {self.context_overflow!r}",
            ),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (0 <= self.speculative <= 16, f"speculative must be 0..16 draft tokens, got {self.speculative}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        if self.num_beams > 1:
            sp = self.sampling_params()
            checks.append(
                (
                    (
                        sp.top_k,
                        sp.top_p,
                        sp.min_p,
                        sp.repetition_penalty,
                        sp.frequency_penalty,
                        sp.presence_penalty,
                    )
                    == (0, 1.0, 0.0, 1.0, 0.0, 0.0),
                    "beam search does not combine with top_k/top_p/min_p or penalties; drop them or use num_beams 1",
                )
            )
        for ok, msg in checks:
            if not ok:
                raise UserError(f"invalid generation setting: {msg}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> GenerationConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown generation settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, logprob) of the most likely alternatives


@dataclass
class Completion:
    text: str  # generated text, cut before any stop string, without the stop token
    token_ids: list[int]  # generated tokens (without a final stop token id)
    finish_reason: str  # "stop" (stop token or string) | "length" (max_new_tokens or the context)
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0


# ------------------------------------------------------------------------------------------------ helpers
def _device(model: Transformer) -> torch.device:
    return next(model.parameters()).device


def _cache_dtype(model: Transformer) -> torch.dtype:
    return model.embed_tokens.weight.dtype


def decode_layout(model: nn.Module) -> nn.Module:
    """Lay a CPU model out for decoding, in place; idempotent. Values, parameters, state dict and training
    are unchanged.

    float32 linear layers become `kernels.DecodeLinear` (the same nn.Linear, whose skinny inference products
    run through the decode kernel compiled for this CPU). Where that kernel is off or cannot be built, every
    linear weight is stored column-major instead: the same (out, in) tensor kept in memory as its
    contiguous (in, out) transpose, so F.linear runs x @ W^T as a plain product with a contiguous (in, out)
    matrix, which MKL's small-M product streams faster (GPT-2's lm_head at 8 rows 21.7 -> 10.6 ms on the
    Intel VM of BENCHMARKS.md "## Generation"; Hugging Face GPT-2 keeps its Conv1D weights this way).
    Tied weights are re-laid once.
    """
    if _device(model).type != "cpu":
        return model
    linears = [m for m in model.modules() if type(m) in (nn.Linear, DecodeLinear) and m.weight.shape[0] > 1]
    op = skinny_linear_op() if any(m.weight.dtype == torch.float32 for m in linears) else None
    with torch.no_grad():
        for m in linears:
            if op is not None and m.weight.dtype == torch.float32:
                if not m.weight.is_contiguous():
                    m.weight.data = m.weight.data.contiguous()
                m.__class__ = DecodeLinear
            elif m.weight.is_contiguous():
                m.weight.data = m.weight.data.t().contiguous().t()
    return model


def _logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """lm_head on gathered hidden rows (B, d) -> float32 logits (B, V)."""
    return model.lm_head(h).float()


def prepare_prompts(
    tokenizer: Tokenizer | None, prompts, config: GenerationConfig, block_size: int, vocab_size: int
) -> list[list[int]]:
    """Encode, check and (by flag) left-truncate prompts to at most block_size tokens."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise UserError("text prompts need a tokenizer; pass token ids or the model's tokenizer")
            ids = tokenizer.encode(p)
        else:
            ids = [int(i) for i in p]
        if not ids:  # an empty prompt starts from the document separator
            start = tokenizer.eot_id if tokenizer is not None and tokenizer.eot_id is not None else None
            if start is None and tokenizer is not None:
                start = tokenizer.bos_id
            if start is None:
                raise UserError(
                    "empty prompt and the tokenizer has no end-of-text/bos token to start from; give some text"
                )
            ids = [start]
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise UserError(
                f"prompt token id {max(ids)} is outside the model's vocabulary of {vocab_size}; "
                "use the tokenizer that belongs to the model"
            )
        if len(ids) > block_size:
            if config.context_overflow == "error":
                raise UserError(
                    f"prompt of {len(ids)} tokens is longer than the context of {block_size}; "
                    "shorten it or set context_overflow to truncate"
                )
            warnings.warn(
                f"prompt of {len(ids)} tokens truncated from the left to the context of {block_size}",
                stacklevel=3,
            )
            ids = ids[-block_size:]
        out.append(ids)
    return out


@torch.inference_mode()
def extend(model: nn.Module, cache: KVCache, seqs: list[list[int]]) -> torch.Tensor:
    """Append seqs (one list per cache row, right-padded: junk past a row's end is masked and overwritten
    later) at each row's own length and advance each row by its count; return the float32 logits after each
    row's last token (R, V)."""
    dev = cache.k.device
    lens = torch.tensor([len(s) for s in seqs], device=dev)
    idx = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    h = model.hidden(idx, cache=cache)  # (R, T, d)
    cache.advance(lens)
    return _logits(model, h[torch.arange(len(seqs), device=dev), lens - 1])  # only last positions


@torch.inference_mode()
def prefill(model: nn.Module, cache: KVCache, rows: list[int], seqs: list[list[int]]) -> torch.Tensor:
    """Write seqs into cache rows `rows` from position 0; return the logits after each last token (R, V)."""
    if rows == list(range(cache.batch)):
        sub = cache
    else:  # prefill into a temporary cache, then copy into the rows
        sub = KVCache(
            model.config, len(rows), max_len=cache.max_len, device=cache.k.device, dtype=cache.k.dtype
        )
    sub.lengths.zero_()
    logits = extend(model, sub, seqs)
    if sub is not cache:
        T, r = max(len(s) for s in seqs), torch.tensor(rows, device=cache.k.device)
        cache.k[:, r, :, :T] = sub.k[:, :, :, :T]
        cache.v[:, r, :, :T] = sub.v[:, :, :, :T]
        cache.lengths[r] = sub.lengths
    return logits


@torch.inference_mode()
def _step(model: Transformer, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) at each row's own position; return next-token logits (B, V)."""
    h = model.hidden(tokens[:, None], cache=cache)  # (B, 1, d)
    cache.advance(1)
    return _logits(model, h[:, 0])


# ------------------------------------------------------------------------------------------------ rows
class Row:
    """Book-keeping of one output sequence: tokens, window start, streamed text, stop conditions."""

    def __init__(self, prompt: list[int], tokenizer: Tokenizer | None, stop: list[str]):
        self.tokens = list(prompt)  # the whole sequence, prompt included
        self.start = 0  # first token inside the model's window
        self.prompt_len = len(prompt)
        self.generated: list[int] = []
        self.decoder = tokenizer.stream() if tokenizer is not None else None
        self.text = ""
        self.emitted = 0  # chars of self.text already handed to a stream
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.finish: str | None = None
        self.cut = False  # a stop string ended the text
        self.logprobs: list[TokenLogprob] = []

    def add(self, tok: int) -> None:
        self.tokens.append(tok)
        self.generated.append(tok)
        if self.decoder is not None:
            self._add_text(self.decoder.push(tok))

    def _add_text(self, piece: str) -> None:
        if not piece:
            return
        old = len(self.text)
        self.text += piece
        if self.stop:
            lo = max(0, old - self.max_stop + 1)
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish = "stop"
                self.cut = True

    def close(self) -> None:
        """End of generation: flush undecoded bytes (unless a stop string cut the text) and release held text."""
        if self.decoder is not None and not self.cut:
            self._add_text(self.decoder.flush())
        self.finish = self.finish or "length"

    def safe_text(self) -> str:
        """New text that can no longer turn out to be the start of a stop string."""
        end = len(self.text)
        if self.finish is None:
            for s in self.stop:  # hold back a suffix that is a prefix of a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def completion(self, stop_ids: set[int]) -> Completion:
        ids = self.generated
        if ids and ids[-1] in stop_ids and self.finish == "stop":
            ids = ids[:-1]
        return Completion(
            self.text, list(ids), self.finish or "length", self.logprobs or None, self.prompt_len
        )


def _stop_ids(tokenizer: Tokenizer | None, config: GenerationConfig) -> set[int]:
    if config.stop_token_ids is not None:
        return set(config.stop_token_ids)
    return {tokenizer.eot_id} if tokenizer is not None and tokenizer.eot_id is not None else set()


def _decode(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompts: list[list[int]],
    config: GenerationConfig,
    on_logits: Callable[[list[int], torch.Tensor], None] | None = None,
) -> Iterator[list[Row]]:
    """Sampling/greedy decode of prompts x n rows; yields the row list after every step (for streaming).

    on_logits(row ids, logits (B, V)) sees the raw next-token logits of the live rows before each choice.
    """
    C = model.config.block_size
    V = model.config.vocab_size
    dev = _device(model)
    n = config.n
    stop_ids = _stop_ids(tokenizer, config)
    stop_t = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    rows = [Row(p, tokenizer, config.stop) for p in prompts for _ in range(n)]
    R = len(rows)
    params = [config.sampling_params() for _ in rows]
    gens = [
        make_generator(None if config.seed is None else config.seed + j, dev)
        for _ in prompts
        for j in range(n)
    ]
    st = stack_params(params, device=dev, generators=gens)
    yield rows
    if config.max_new_tokens == 0 or R == 0:
        return
    max_len = min(C, max(len(p) for p in prompts) + config.max_new_tokens)
    cache = KVCache(model.config, R, max_len=max_len, device=dev, dtype=_cache_dtype(model))
    # prefill each prompt once, then copy it to its n rows
    pcache = (
        cache
        if n == 1
        else KVCache(model.config, len(prompts), max_len=max_len, device=dev, dtype=cache.k.dtype)
    )
    logits = prefill(model, pcache, list(range(len(prompts))), prompts)
    if n > 1:
        expand = torch.arange(len(prompts), device=dev).repeat_interleave(n)
        pcache.reorder(expand)
        cache = pcache
        logits = logits.index_select(0, expand)
    counts = prompt_mask = None
    if st.use_penalties:
        counts = torch.zeros(R, V, device=dev)
        prompt_mask = torch.zeros(R, V, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            prompt_mask[i, torch.tensor(r.tokens, device=dev)] = True
    live = list(range(R))  # row ids of the cache's rows, in order
    keep_n = max(1, int(C * WINDOW_KEEP))
    for step in range(config.max_new_tokens):
        if on_logits is not None:
            on_logits(live, logits)
        tokens = sample(process(logits, st, counts, prompt_mask), st.greedy, st.generators)  # (B,)
        if counts is not None:
            counts.scatter_add_(1, tokens[:, None], torch.ones(len(live), 1, device=dev))
        if config.logprobs is not None:
            lp, top_v, top_i = logprobs_topk(logits, config.logprobs)
            chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
            top_v, top_i = top_v.tolist(), top_i.tolist()
        is_stop = torch.isin(tokens, stop_t) if len(stop_ids) else torch.zeros_like(tokens, dtype=torch.bool)
        tok_list, stop_list = tokens.tolist(), is_stop.tolist()
        finished = []
        for i, rid in enumerate(live):
            row = rows[rid]
            if stop_list[i]:
                row.generated.append(tok_list[i])
                row.finish = "stop"
            else:
                row.add(tok_list[i])
                if config.logprobs is not None:
                    dec = tokenizer.decode if tokenizer is not None else (lambda ids: "")
                    row.logprobs.append(
                        TokenLogprob(
                            tok_list[i],
                            dec([tok_list[i]]),
                            chosen[i],
                            [(t, dec([t]), v) for t, v in zip(top_i[i], top_v[i], strict=True)],
                        )
                    )
                if row.finish is None and len(row.tokens) - row.start > C and not config.sliding_window:
                    row.finish = "length"  # the context is full and the window may not move
            if row.finish is not None or step == config.max_new_tokens - 1:
                finished.append(i)
        yield rows
        if step == config.max_new_tokens - 1:
            break
        if finished:  # drop finished rows from the batch
            keep = [i for i in range(len(live)) if i not in set(finished)]
            if not keep:
                break
            keep_t = torch.tensor(keep, device=dev)
            cache.reorder(keep_t)
            st = st.select(keep)
            tokens = tokens.index_select(0, keep_t)
            if counts is not None:
                counts, prompt_mask = counts.index_select(0, keep_t), prompt_mask.index_select(0, keep_t)
            live = [live[i] for i in keep]
        # slide the window of rows whose cache is full: re-prefill their most recent tokens
        full = [
            i for i, rid in enumerate(live) if len(rows[rid].tokens) - 1 - rows[rid].start >= cache.max_len
        ]
        if full:
            seqs = []
            for i in full:
                r = rows[live[i]]
                r.start = len(r.tokens) - keep_n
                seqs.append(r.tokens[r.start : -1])  # the newest token is fed by the step below
            _prefill_rows(model, cache, full, seqs)
        logits = _step(model, cache, tokens)
    for r in rows:
        r.close()
    yield rows


def _prefill_rows(model: Transformer, cache: KVCache, rows: list[int], seqs: list[list[int]]) -> None:
    if seqs and min(len(s) for s in seqs) > 0:
        prefill(model, cache, rows, seqs)
    else:  # a window of one token: nothing before it to prefill
        cache.lengths[torch.tensor(rows, device=cache.lengths.device)] = 0


# ------------------------------------------------------------------------------------------------ beams
@torch.inference_mode()
def _beam_search(
    model: Transformer, prompts: list[list[int]], config: GenerationConfig, stop_ids: set[int]
) -> list[list[tuple[list[int], bool]]]:
    """Hugging Face transformers 5.x beam search. Returns per prompt the n best (token ids, ended by a stop id)."""
    C = model.config.block_size
    dev = _device(model)
    P, K, N = len(prompts), config.num_beams, config.max_new_tokens
    if max(len(p) for p in prompts) + N > C:
        raise UserError(
            f"beam search needs prompt + max_new_tokens <= the context of {C} tokens; "
            "lower max_new_tokens or use num_beams 1 (which slides its window)"
        )
    lp_pen, early = config.length_penalty, config.early_stopping
    cache = KVCache(
        model.config, P, max_len=max(len(p) for p in prompts) + N, device=dev, dtype=_cache_dtype(model)
    )
    logits = prefill(model, cache, list(range(P)), prompts)
    expand = torch.arange(P, device=dev).repeat_interleave(K)
    cache.reorder(expand)
    logits = logits.index_select(0, expand)  # (P*K, V)
    V = logits.shape[-1]
    eos = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    keep = max(2, 1 + len(stop_ids)) * K
    top_mask = torch.arange(keep, device=dev) < K
    running = torch.zeros(P, K, N, dtype=torch.long, device=dev)
    run_scores = torch.zeros(P, K, device=dev)
    run_scores[:, 1:] = -1e9  # the first step expands the first beam only
    seqs = running.clone()
    scores = torch.full((P, K), -1e9, device=dev)
    seq_len = torch.zeros(P, K, dtype=torch.long, device=dev)
    finished = torch.zeros(P, K, dtype=torch.bool, device=dev)
    unsat = torch.ones(P, 1, dtype=torch.bool, device=dev)  # "a running beam may still beat a finished one"
    offset = torch.arange(P, device=dev)[:, None] * K
    for step in range(N):
        lp = logits.float().log_softmax(-1).view(P, K, V) + run_scores[:, :, None]
        topk_lp, topk_idx = lp.view(P, K * V).topk(keep)  # (P, keep)
        src, tok = topk_idx // V, topk_idx % V
        topk_seq = running.gather(1, src[:, :, None].expand(P, keep, N)).clone()
        topk_seq[:, :, step] = tok
        hits = torch.isin(tok, eos) | (step + 1 >= N)  # eos, or max length reached
        # the best num_beams continuations that did not stop keep running
        run_lp = topk_lp + hits.float() * -1e9
        nxt = run_lp.topk(K).indices
        running = topk_seq.gather(1, nxt[:, :, None].expand(P, K, N))
        run_scores = run_lp.gather(1, nxt)
        run_src = src.gather(1, nxt)
        # finished hypotheses: the stopped ones among the top num_beams, scored with the length penalty
        just = hits & top_mask[None, :]
        fin_lp = topk_lp / ((step + 1) ** lp_pen)
        full = finished.all(-1, keepdim=True) & (early is True)
        fin_lp = fin_lp + full.float() * -1e9 + (~unsat).float() * -1e9 + (~just).float() * -1e9
        m_seq = torch.cat((seqs, topk_seq), 1)
        m_scores = torch.cat((scores, fin_lp), 1)
        m_fin = torch.cat((finished, just), 1)
        m_len = torch.cat((seq_len, torch.full_like(just, step + 1, dtype=torch.long)), 1)
        best = m_scores.topk(K).indices
        seqs = m_seq.gather(1, best[:, :, None].expand(P, K, N))
        scores, finished, seq_len = m_scores.gather(1, best), m_fin.gather(1, best), m_len.gather(1, best)
        cache.reorder((run_src + offset).flatten())
        # early-stop heuristic (HF _check_early_stop_heuristic) with the generated length so far
        cur = N if (early == "never" and lp_pen > 0) else step + 1
        best_possible = run_scores[:, :1] / (cur**lp_pen)
        worst = torch.where(finished, scores.min(1, keepdim=True).values, torch.full_like(scores, -1e9))
        unsat = unsat & (best_possible > worst).any(-1, keepdim=True)
        if not (bool(unsat.any()) and not (bool(finished.all()) and early is True) and not bool(hits.all())):
            break
        logits = _step(model, cache, running[:, :, step].flatten())
    out = []
    for b in range(P):
        res = []
        for j in range(config.n):
            ids = seqs[b, j, : int(seq_len[b, j])].tolist()
            ended = bool(ids) and ids[-1] in stop_ids
            res.append((ids[:-1] if ended else ids, ended))
        out.append(res)
    return out


# ------------------------------------------------------------------------------------------------ public API
def _rows(model: Transformer, tokenizer: Tokenizer | None, ids: list[list[int]], config: GenerationConfig):
    """The decode iterator: speculative when asked for and applicable (greedy, fits the context), else plain."""
    from yuyan.generate import speculative

    if speculative.usable(model, ids, config):
        return speculative.decode(model, speculative.int8_draft(model), tokenizer, ids, config)
    return _decode(model, tokenizer, ids, config)


def generate(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompts: list[str] | list[list[int]],
    config: GenerationConfig | None = None,
) -> list[list[Completion]]:
    """Generate config.n completions for each prompt (text or token ids). Returns one list per prompt."""
    config = (config or GenerationConfig()).validate()
    decode_layout(model.eval())
    ids = prepare_prompts(tokenizer, prompts, config, model.config.block_size, model.config.vocab_size)
    if config.num_beams > 1:
        stop_ids = _stop_ids(tokenizer, config)
        out = []
        for p, res in zip(ids, _beam_search(model, ids, config, stop_ids), strict=True):
            comps = []
            for toks, ended in res:
                row = Row(p, tokenizer, config.stop)
                for t in toks:
                    if row.finish is None:
                        row.add(t)
                if ended and row.finish is None:
                    row.finish = "stop"
                row.close()
                comps.append(row.completion(stop_ids))
            out.append(comps)
        return out
    *_, rows = _rows(model, tokenizer, ids, config)  # run to the end; the last yield holds the rows
    stop_ids = _stop_ids(tokenizer, config)
    comps = [r.completion(stop_ids) for r in rows]
    return [comps[i * config.n : (i + 1) * config.n] for i in range(len(ids))]


def stream(
    model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], config: GenerationConfig | None = None
) -> Iterator[str]:
    """Yield the completion's text in pieces as soon as they are whole UTF-8 characters and can no longer be
    the start of a stop string; the pieces join to generate()'s text."""
    config = (config or GenerationConfig()).validate()
    if config.num_beams > 1 or config.n > 1:
        raise UserError("streaming gives one completion: use num_beams 1 and n 1, or call generate()")
    decode_layout(model.eval())
    ids = prepare_prompts(tokenizer, [prompt], config, model.config.block_size, model.config.vocab_size)
    for rows in _rows(model, tokenizer, ids, config):
        piece = rows[0].safe_text()
        if piece:
            yield piece
    piece = rows[0].safe_text()
    if piece:
        yield piece


@torch.inference_mode()
def generate_naive(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    stop_token_ids: set[int] | None = None,
    sliding_window: bool = True,
) -> list[int]:
    """The oracle: greedy decoding with a full forward pass over the window at every step, no cache.

    Window rule (the engine's): the model sees tokens[start:]; when that would exceed the context, start
    jumps so that the newest int(context * WINDOW_KEEP) tokens remain.
    """
    C = model.config.block_size
    keep_n = max(1, int(C * WINDOW_KEEP))
    tokens = list(prompt[-C:])
    start, out = 0, []
    dev = _device(model)
    for _ in range(max_new_tokens):
        if len(tokens) - start > C:
            if not sliding_window:
                break
            start = len(tokens) - keep_n
        logits = model(torch.tensor([tokens[start:]], device=dev))[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if stop_token_ids and t in stop_token_ids:
            break
        tokens.append(t)
    return out


__all__ = [
    "GenerationConfig",
    "Completion",
    "TokenLogprob",
    "generate",
    "stream",
    "generate_naive",
    "prepare_prompts",
]
