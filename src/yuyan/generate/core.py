"""The decode core: every way of generating (`generate()`, streaming, the server's scheduler, speculative
decoding) drives this one batch of rows.

`Decoder` owns a `KVCache` of `capacity` rows kept packed at the front (rows 0..B-1; a row that leaves is
replaced by the last one) and, for every live row, the logits of its next token. It admits prompts
(prefilled together, right-padded: junk written past a row's end is masked and later overwritten; a prompt
with n > 1 is prefilled once and copied to its n rows; with a `PrefixCache` a prompt starts from the cached
keys/values of its longest known prefix and only the rest is computed, prefix.py), and `step()` does one
round for every row: sample through `sampling.py` with each row's own settings and generator, record
logprobs, apply stop ids and stop
strings (`Row`), drop finished rows, slide the window of rows whose cache is full (their newest tokens are
re-prefilled at positions 0.., right for learned and RoPE positions alike), and run the forward pass that
gives the next logits. How that forward pass is run is the step strategy: one token per row (`forward`),
or a speculative round (`speculative.Speculator`) that may add several tokens per row.

Validation lives here too: `check_prompt` is the one place a prompt meets the context, for every caller.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig, TokenLogprob
from yuyan.generate.grammar import Constraint, MaskBuffer, compile_grammar
from yuyan.generate.prefix import PrefixCache
from yuyan.generate.rows import Row
from yuyan.generate.sampling import (
    SamplingTensors,
    logprobs_topk,
    make_generator,
    process,
    sample,
    stack_params,
)
from yuyan.model.kv_cache import KVCache
from yuyan.tokenizer import Tokenizer

WINDOW_KEEP = 0.75  # fraction of the context kept when the sliding window moves


class ContextLengthError(UserError):
    """A prompt (part "prompt") or prompt + max_new_tokens (part "total") does not fit the context."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


# ------------------------------------------------------------------------------------------------ prompts
def encode_prompt(tokenizer: Tokenizer | None, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a text or id prompt; an empty prompt starts from the document separator."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise UserError("text prompts need a tokenizer; pass token ids or the model's tokenizer")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(i) for i in prompt]
    if ids:
        return ids
    start = None
    if tokenizer is not None:
        start = tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.bos_id
    if start is None:
        raise UserError(
            "empty prompt and the tokenizer has no end-of-text/bos token to start from; give some text"
        )
    return [start]


def check_prompt(ids: list[int], config: GenerationConfig, block_size: int, vocab_size: int) -> list[int]:
    """Check prompt ids against the vocabulary and the context; left-truncate them when config allows."""
    if not ids:
        raise UserError("the prompt is empty; give at least one token")
    if min(ids) < 0 or max(ids) >= vocab_size:
        bad = max(ids) if max(ids) >= vocab_size else min(ids)
        raise UserError(
            f"prompt token id {bad} is outside the model's vocabulary of {vocab_size}; "
            "use the tokenizer that belongs to the model"
        )
    bias = config.sampling.logit_bias or {}
    if bias and max(bias) >= vocab_size:
        raise UserError(
            f"logit_bias names token {max(bias)}, outside the model's vocabulary of {vocab_size}; "
            "use ids of the model's tokenizer"
        )
    strict = config.context_overflow == "error"
    if len(ids) > block_size:
        if strict:
            raise ContextLengthError(
                f"the prompt of {len(ids)} tokens is longer than the context of {block_size} (this model's "
                "maximum context length); shorten the prompt or set context_overflow to truncate",
                "prompt",
            )
        warnings.warn(
            f"prompt of {len(ids)} tokens truncated from the left to the context of {block_size}",
            stacklevel=3,
        )
        ids = ids[-block_size:]
    total = len(ids) + config.max_new_tokens
    if strict and not config.sliding_window and total > block_size:
        raise ContextLengthError(
            f"this model's maximum context length is {block_size} tokens, but {total} were requested "
            f"({len(ids)} in the prompt, {config.max_new_tokens} for the completion); shorten the prompt, "
            "lower max_tokens or turn the sliding window on",
            "total",
        )
    return ids


def stop_ids(tokenizer: Tokenizer | None, config: GenerationConfig) -> set[int]:
    """The token ids that end a row: config's, else the tokenizer's end-of-text token."""
    if config.stop_token_ids is not None:
        return set(config.stop_token_ids)
    return {tokenizer.eot_id} if tokenizer is not None and tokenizer.eot_id is not None else set()


# ------------------------------------------------------------------------------------------------ forward
def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_dtype(model: nn.Module) -> torch.dtype:
    return model.embed_tokens.weight.dtype


@torch.inference_mode()
def extend(model: nn.Module, cache: KVCache, seqs: list[list[int]]) -> torch.Tensor:
    """Append seqs (one list per cache row 0..R-1, right-padded: junk past a row's end is masked and
    overwritten later) at each row's own length and advance each row by its count; return the float32
    logits after each row's last token (R, V)."""
    dev = cache.k.device
    lens = torch.tensor([len(s) for s in seqs], device=dev)
    idx = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    R = len(seqs)
    pos = cache.lengths[:R, None] + torch.arange(idx.shape[1], device=dev)[None, :]
    h = model.hidden(idx, pos=pos, cache=cache)  # (R, T, d)
    cache.lengths[:R] += lens
    return model.logits(h[torch.arange(R, device=dev), lens - 1]).float()  # only last positions


@torch.inference_mode()
def prefill(
    model: nn.Module,
    cache: KVCache,
    first: int,
    seqs: list[list[int]],
    prefix: PrefixCache | None = None,
) -> torch.Tensor:
    """Write seqs into cache rows first.. from position 0; return the logits after each last token (R, V).

    With a prefix cache, each row starts from the longest cached prefix of its prompt (copied in; never
    the last token, whose logits are needed), only the rest is computed, and the prompts' full blocks
    are stored for later prompts."""
    rows = cache.rows(first, first + len(seqs))
    rows.lengths.zero_()
    if prefix is None:
        return extend(model, rows, seqs)
    prefix.bind(model, cache.k.dtype)
    bs, chains = prefix.block_tokens, [prefix.lookup(s) for s in seqs]
    while True:  # a row's right-padding starts after its cached part and must stay inside the cache
        T = max(len(s) - bs * len(c) for s, c in zip(seqs, chains, strict=True))
        over = [i for i, c in enumerate(chains) if c and bs * len(c) + T > rows.capacity]
        if not over:
            break
        for i in over:  # shorter hits; terminates since hits only shrink
            chains[i] = chains[i][: max(0, (rows.capacity - T) // bs)]
    for i, (s, c) in enumerate(zip(seqs, chains, strict=True)):
        prefix.load(c, rows.k[:, i], rows.v[:, i], len(s))
        rows.lengths[i] = bs * len(c)
    logits = extend(model, rows, [s[bs * len(c) :] for s, c in zip(seqs, chains, strict=True)])
    for i, s in enumerate(seqs):
        prefix.store(s, rows.k[:, i], rows.v[:, i])
    return logits


@torch.inference_mode()
def forward(model: nn.Module, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) into cache rows 0..B-1 at each row's own position; return the
    next-token logits (B, V)."""
    B = tokens.shape[0]
    h = model.hidden(tokens[:, None], pos=cache.lengths[:B, None], cache=cache)  # (B, 1, d)
    cache.lengths[:B] += 1
    return model.logits(h[:, 0]).float()


@torch.inference_mode()
def refill(model: nn.Module, cache: KVCache, rows: list[int], seqs: list[list[int]]) -> None:
    """Rewrite cache rows `rows` (any indices) with seqs from position 0, through a temporary cache."""
    if min(len(s) for s in seqs) == 0:  # a window of one token: nothing before it to prefill
        cache.lengths[torch.tensor(rows, device=cache.lengths.device)] = 0
        return
    sub = KVCache(
        model.config, len(rows), capacity=cache.capacity, device=cache.k.device, dtype=cache.k.dtype
    )
    extend(model, sub, seqs)
    T, r = max(len(s) for s in seqs), torch.tensor(rows, device=cache.k.device)
    cache.k[:, r, :, :T] = sub.k[:, :, :, :T]
    cache.v[:, r, :, :T] = sub.v[:, :, :, :T]
    cache.lengths[r] = sub.lengths


# ------------------------------------------------------------------------------------------------ the core
class Forward:
    """The plain step strategy: every live row feeds its newest token through the model once. A strategy
    hears of admitted, moved and re-windowed rows, so one that keeps state per row (the speculative
    draft's cache) can follow the core's packing."""

    def admitted(self, core: Decoder, first: int, count: int) -> None:
        pass

    def moved(self, core: Decoder, dst: int, src: int) -> None:
        pass

    def slid(self, core: Decoder, rows: list[int]) -> None:
        pass

    def advance(self, core: Decoder, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B,), the rows' newest; return the next-token logits (B, V)."""
        return forward(core.model, core.cache, tokens)


OVERFLOW = (
    "the sampling settings overflowed the model's logits; use a temperature >= 0.01 and penalties of "
    "moderate size"
)
NONFINITE = (
    "the model produced non-finite logits (nan or inf) for this input: its weights or activations overflow"
)


class Decoder:
    """A batch of up to `max_rows` rows decoding together over one `KVCache` of `capacity` positions.

    `admit()` prefills checked prompts into free rows; `choose()` gives every live row its next token (one
    sampling pass over the batch); `advance()` retires finished rows, slides full windows and runs the
    strategy's forward pass; `step()` is both. `rows[i]` is cache row i; `logits[i]` its next-token logits.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None,
        max_rows: int,
        capacity: int | None = None,
        strategy: Forward | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.prefix_cache = prefix_cache  # None: every prompt is prefilled whole (prefix.py)
        self.block_size = model.config.block_size
        self.capacity = min(capacity or self.block_size, self.block_size)
        self.max_rows = max_rows
        self.device = model_device(model)
        self.cache = KVCache(
            model.config, max_rows, capacity=self.capacity, device=self.device, dtype=cache_dtype(model)
        )
        self.strategy = strategy or Forward()
        self.keep = max(1, int(self.block_size * WINDOW_KEEP))  # tokens a sliding window keeps
        self.rows: list[Row] = []
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the live rows
        self.tokens: torch.Tensor | None = None  # (B,) the tokens chosen last, to be fed next
        self._st: SamplingTensors | None = None  # the live rows' settings; None after rows changed
        self._counts: torch.Tensor | None = None  # (B, V) output token counts, while a row uses penalties
        self._prompt_mask: torch.Tensor | None = None  # (B, V) prompt tokens, likewise
        # a vocabulary padded past the tokenizer (GPT-2: 50304 rows for 50257 tokens): ids from here on
        # decode to nothing, so choose() never picks them; None when every id is the tokenizer's
        n_tok = tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size
        self._decodable = n_tok if n_tok < model.config.vocab_size else None
        self._masks: MaskBuffer | None = None  # grammar masks, allocated at the first constrained step

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    # ---------------------------------------------------------------- rows in and out
    @torch.inference_mode()
    def admit(
        self, prompts: list[list[int]], configs: list[GenerationConfig], owners: list | None = None
    ) -> list[list[Row]]:
        """Prefill prompts (already through `check_prompt`) together into free rows, config.sampling.n rows
        each (reusing cached prefixes when the decoder has a prefix cache); return each prompt's rows
        (choice 0..n-1)."""
        need = sum(c.sampling.n for c in configs)
        if need > self.free:
            raise UserError(f"{need} rows asked for but only {self.free} of {self.max_rows} are free")
        if max(len(p) for p in prompts) > self.capacity:
            raise UserError(f"a prompt is longer than this decoder's {self.capacity} positions")
        first = len(self.rows)
        order, logits = self._prefill(first, prompts)  # row first + i holds prompt order[i]
        at = {p: i for i, p in enumerate(order)}
        owners = owners or [None] * len(prompts)
        out = [[self._row(p, c, 0, o)] for p, c, o in zip(prompts, configs, owners, strict=True)]
        source = list(range(len(prompts)))  # which prefilled row (of logits) each new row copies
        for p, (ids, cfg, owner) in enumerate(zip(prompts, configs, owners, strict=True)):
            for j in range(1, cfg.sampling.n):  # the other choices copy the prefilled row
                self.cache.copy_row(first + len(source), self.cache, first + at[p])
                out[p].append(self._row(ids, cfg, j, owner))
                source.append(at[p])
        new_rows = [out[p][0] for p in order] + [r for rs in out for r in rs[1:]]
        self.rows.extend(new_rows)
        new_logits = (
            logits[torch.tensor(source, device=logits.device)] if len(source) > len(prompts) else logits
        )
        self.logits = new_logits if self.logits is None else torch.cat((self.logits, new_logits))
        self.tokens = None if self.tokens is None else self.tokens[:first]
        self.strategy.admitted(self, first, len(new_rows))
        self._changed()
        return out

    def _prefill(self, first: int, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        """Prefill prompts into rows first..; return which prompt each row holds and their logits (P, V).

        With a prefix cache, prompts that would compute the same not-yet-cached block go in waves: the
        first such prompt is prefilled (and stores its blocks) before the others look up, so a batch of
        prompts sharing a system prompt computes it once. A prompt waits again only while its cached part
        grew, so there are at most as many waves as prompts, and usually one or two."""
        pc = self.prefix_cache
        if pc is None:
            return list(range(len(prompts))), prefill(self.model, self.cache, first, prompts)
        pc.bind(self.model, self.cache.k.dtype)
        order: list[int] = []
        parts, pending, waited = [], list(range(len(prompts))), {}
        while pending:
            now, later, keys = [], [], set()
            for p in pending:
                held, key = pc.next_block(prompts[p])
                if key is not None and key in keys and waited.get(p, -1) < held:
                    later.append(p)
                    waited[p] = held
                else:
                    now.append(p)
                    keys.add(key)
            parts.append(prefill(self.model, self.cache, first + len(order), [prompts[p] for p in now], pc))
            order += now
            pending = later
        return order, torch.cat(parts) if len(parts) > 1 else parts[0]

    def _row(self, prompt: list[int], config: GenerationConfig, j: int, owner: object) -> Row:
        stops = stop_ids(self.tokenizer, config)
        if config.grammar is not None:  # a complete grammar allows only the end of text: it must stop the row
            V = self.model.config.vocab_size
            text = compile_grammar(self.tokenizer, config.grammar, V)
            if self.tokenizer.eot_id is not None:
                stops = stops | {self.tokenizer.eot_id}
        row = Row(prompt, self.tokenizer, config, stops, j, owner)
        if config.grammar is not None:
            row.constraint = Constraint(self.tokenizer, text, V)
        seed = config.sampling.seed
        row.generator = make_generator(None if seed is None else seed + j, self.device)
        return row

    @torch.inference_mode()
    def remove(self, rows: list[Row]) -> None:
        """Take rows out of the batch (cancelled, finished or failed)."""
        gone = {id(r) for r in rows}
        self._remove_at([i for i, r in enumerate(self.rows) if id(r) in gone])

    def _remove_at(self, idx: list[int]) -> None:
        """Remove rows idx, filling each hole with the last row, so rows 0..B-1 stay packed."""
        for i in sorted(idx, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.cache.copy_row(i, self.cache, last)
                self.rows[i] = self.rows[last]
                for t in (self.logits, self.tokens):
                    if t is not None:
                        t[i] = t[last]
                self.strategy.moved(self, i, last)
            self.rows.pop()
        B = len(self.rows)
        self.logits = None if self.logits is None or B == 0 else self.logits[:B]
        self.tokens = None if self.tokens is None or B == 0 else self.tokens[:B]
        if idx:
            self._changed()

    def _changed(self) -> None:
        self._st = self._counts = self._prompt_mask = None

    # ---------------------------------------------------------------- one step
    def step(self) -> list[Row]:
        """choose() then advance(); returns the rows that took tokens (every row live at the start)."""
        took = self.choose()
        self.advance()
        return took

    @torch.inference_mode()
    def choose(self) -> list[Row]:
        """Sample the next token of every live row with its own settings; record it (stops, logprobs).
        Returns the live rows; `row.new` holds what each took, `row.finish`/`row.error` say if it ended."""
        B = len(self.rows)
        for r in self.rows:
            r.new = []
        if B == 0:
            return []
        st = self.sampling()
        logits = self.logits
        if self._decodable is not None:
            logits[:, self._decodable :] = float("-inf")
        logits = self._fail_nonfinite(logits)
        masked = self._constrain(logits)  # grammar rows: tokens their grammar does not allow are -inf
        proc = process(masked, st, self._counts, self._prompt_mask)
        if proc is not logits:
            proc = self._fail_overflowed(masked, proc)
        tokens = sample(proc, st.greedy, st.generators)  # (B,)
        if self._counts is not None:
            self._counts.scatter_add_(1, tokens[:, None], torch.ones(B, 1, device=self.device))
        tok_list = tokens.tolist()
        entries = self._logprobs(logits, tokens, tok_list)
        for row, tok, lp in zip(self.rows, tok_list, entries, strict=True):
            row.take(tok, self.capacity, lp)
        self.tokens = tokens
        return list(self.rows)

    def _constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of the logits with each grammar row's disallowed tokens at -inf (the masks computed in
        one call for all of them); the logits themselves stay the model's, for logprobs. A grammar in an
        error state fails its row."""
        idx = [i for i, r in enumerate(self.rows) if r.constraint is not None and r.finish is None]
        if not idx:
            return logits
        cons = [self.rows[i].constraint for i in idx]
        V = logits.shape[-1]
        if self._masks is None or self._masks.V != V:
            self._masks = MaskBuffer(self.max_rows, V)
        bias = self._masks.bias(cons)  # a view of the buffer, used before the next step refills it
        for i, c in zip(idx, cons, strict=True):
            if c.error is not None:
                self.rows[i].error, self.rows[i].finish = f"the grammar failed: {c.error}", "error"
        if len(idx) < len(self.rows):  # unconstrained rows allow everything
            full = torch.zeros(len(self.rows), V)
            full[torch.tensor(idx)] = bias
            bias = full
        return logits + bias.to(logits.device, logits.dtype)  # a new tensor: the logits stay the model's

    def _fail_nonfinite(self, logits: torch.Tensor) -> torch.Tensor:
        """A row whose raw logits hold a nan or +inf (or nothing above -inf) fails as the model's fault, not
        the request's; it samples from zeros for its last step. One reduction per step."""
        bad = ~torch.isfinite(logits.amax(-1))
        if not bool(bad.any()):
            return logits
        for i in bad.nonzero().flatten().tolist():
            self.rows[i].error, self.rows[i].model_error, self.rows[i].finish = NONFINITE, True, "error"
        return torch.where(bad[:, None], torch.zeros_like(logits), logits)

    def _fail_overflowed(self, logits: torch.Tensor, proc: torch.Tensor) -> torch.Tensor:
        """Settings valid one by one can still overflow (temperature 1e-300, penalty 5e-324): such a row has
        no distribution to sample. It fails alone, never the batch. A row's max is nan or +-inf exactly when
        it holds a nan, a +inf or nothing but -inf: one reduction."""
        bad = ~torch.isfinite(proc.amax(-1))
        if not bool(bad.any()):
            return proc
        for i in bad.nonzero().flatten().tolist():
            if self.rows[i].error is None:  # a row the model already failed keeps that reason
                self.rows[i].error, self.rows[i].finish = OVERFLOW, "error"
        return torch.where(bad[:, None], logits, proc)

    def _logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, tok_list: list[int]
    ) -> list[TokenLogprob | None]:
        want = [r.config.logprobs for r in self.rows]
        if all(w is None for w in want):
            return [None] * len(want)
        lp, top_v, top_i = logprobs_topk(logits, max(w or 0 for w in want))
        chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        dec = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: "")
        return [
            None
            if w is None
            else TokenLogprob(
                t,
                dec([t]),
                chosen[i],
                [(a, dec([a]), v) for a, v in zip(top_i[i][:w], top_v[i][:w], strict=True)],
            )
            for i, (w, t) in enumerate(zip(want, tok_list, strict=True))
        ]

    def sampling(self) -> SamplingTensors:
        if self._st is None:
            self._st = stack_params(
                [r.config.sampling for r in self.rows],
                device=self.device,
                generators=[r.generator for r in self.rows],
                vocab_size=self.model.config.vocab_size,
            )
            if self._st.use_penalties:
                self._penalty_state()
        return self._st

    def _penalty_state(self) -> None:
        """Output counts and prompt masks of the live rows, rebuilt from their tokens after rows changed."""
        B, V = len(self.rows), self.model.config.vocab_size
        self._counts = torch.zeros(B, V, device=self.device)
        self._prompt_mask = torch.zeros(B, V, dtype=torch.bool, device=self.device)
        for i, r in enumerate(self.rows):
            out = torch.tensor(r.tokens[r.prompt_len :], dtype=torch.long, device=self.device)
            self._counts[i].scatter_add_(0, out, torch.ones(len(out), device=self.device))
            self._prompt_mask[i, torch.tensor(r.tokens[: r.prompt_len], device=self.device)] = True

    @torch.inference_mode()
    def advance(self) -> list[Row]:
        """Retire finished rows, slide the windows of full rows, and run the strategy's forward pass, which
        leaves the next logits of every live row. Returns the rows that took more tokens on the way (a
        speculative round); those that finished on the way are retired too."""
        self._retire()
        if not self.rows:
            return []
        self._slide()
        for r in self.rows:
            r.new = []
        self.logits = self.strategy.advance(self, self.tokens)
        took = [r for r in self.rows if r.new]
        self._retire()
        return took

    def _retire(self) -> None:
        self._remove_at([i for i, r in enumerate(self.rows) if r.finish is not None])

    def _slide(self) -> None:
        """Rows whose cache is full (the newest token has no slot) re-prefill their most recent tokens."""
        full = [i for i, r in enumerate(self.rows) if len(r.tokens) - 1 - r.start >= self.capacity]
        if not full:
            return
        for i in full:
            r = self.rows[i]
            r.start = len(r.tokens) - self.keep
        refill(self.model, self.cache, full, [self.rows[i].tokens[self.rows[i].start : -1] for i in full])
        self.strategy.slid(self, full)


__all__ = [
    "ContextLengthError",
    "WINDOW_KEEP",
    "encode_prompt",
    "check_prompt",
    "stop_ids",
    "extend",
    "prefill",
    "forward",
    "refill",
    "Forward",
    "Decoder",
    "Row",
    "model_device",
    "cache_dtype",
]
