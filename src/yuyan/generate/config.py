"""What to generate: `GenerationConfig`, one request's settings, and the result types.

A `GenerationConfig` holds one `SamplingParams` (temperature, top-k/p, min-p, penalties, seed, n: the
settings of the logits processors) and the settings of the search around them (length, beams, stops,
logprobs, what happens at the context). `validate()` is the one place these settings are checked:
`generate()`, the server's scheduler and the CLI all call it and never re-check. `from_dict` reads the
flat form that TOML files, command lines and HTTP bodies use (`{"temperature": 0, "max_new_tokens": 8}`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from yuyan.errors import UserError
from yuyan.generate.sampling import SamplingParams, bias_ids

CONTEXT_OVERFLOW = ("truncate", "error")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_beams: int = 1  # > 1: beam search (deterministic: sampling settings other than n must stay off)
    length_penalty: float = 1.0  # beam score = sum logprob / generated_len ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never" (Hugging Face semantics)
    stop: list[str] = field(default_factory=list)  # stop strings: the text is cut before them
    stop_token_ids: list[int] | None = None  # None: the tokenizer's end-of-text token
    logprobs: int | None = None  # report each token's logprob and this many top alternatives
    # "truncate": a prompt longer than the context loses its oldest tokens (with a warning), and without the
    # sliding window a row that fills the context ends with finish_reason "length". "error": both are
    # refused up front, so nothing is ever cut (the server's OpenAI contract).
    context_overflow: str = "truncate"
    sliding_window: bool = True  # keep generating past the context by dropping the oldest tokens
    # > 0: greedy rows draft this many tokens per step with the model's int8 copy and keep those the model
    # agrees with (the same output, faster on CPU; generate/speculative.py)
    speculative: int = 0
    # constrain the output to a grammar (generate/grammar.py): {"type": "json_object"},
    # {"type": "json_schema", "schema": {...}}, {"type": "regex", "pattern": "..."} or
    # {"type": "grammar", "grammar": "..."}; None: unconstrained
    grammar: dict | None = None
    # report each prompt token's logprob (the first has none) and this many top alternatives (vLLM's
    # prompt_logprobs; what `echo` with `logprobs` needs); None: off
    prompt_logprobs: int | None = None

    def validate(self) -> GenerationConfig:
        self.sampling.validate()
        sp = self.sampling
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (
                self.num_beams == 1 or sp.n <= self.num_beams,
                f"n ({sp.n}) must be <= num_beams ({self.num_beams}) in beam search",
            ),
            (
                self.early_stopping in (True, False, "never"),
                f"early_stopping must be true, false or never, got {self.early_stopping!r}",
            ),
            (
                self.context_overflow in CONTEXT_OVERFLOW,
                f"context_overflow must be truncate or error, got {self.context_overflow!r}",
            ),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}",
            ),
            (
                self.num_beams == 1 or not sp.logit_bias,
                "beam search does not combine with logit_bias; drop it or use num_beams 1",
            ),
            (
                self.num_beams == 1 or self.grammar is None,
                "beam search does not combine with a grammar; drop it or use num_beams 1",
            ),
            (0 <= self.speculative <= 16, f"speculative must be 0..16 draft tokens, got {self.speculative}"),
            (
                isinstance(self.stop, list | tuple) and all(isinstance(s, str) and s for s in self.stop),
                "stop strings must be non-empty strings",
            ),
            (
                self.stop_token_ids is None or all(isinstance(t, int) for t in self.stop_token_ids),
                "stop_token_ids must be integers",
            ),
            (
                self.num_beams == 1 or not (sp.top_k or sp.top_p < 1 or sp.min_p or _penalised(sp)),
                "beam search does not combine with top_k/top_p/min_p or penalties; drop them or use num_beams 1",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"invalid generation setting: {msg}")
        _check_grammar(self.grammar)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> GenerationConfig:
        """The flat form: every `SamplingParams` field sits beside the others (a nested `sampling` table is
        read too). An unknown key is an error naming the known ones."""
        own = {f.name for f in fields(cls)} - {"sampling"}
        sampling_names = {f.name for f in fields(SamplingParams)}
        unknown = set(d) - own - sampling_names - {"sampling"}
        if unknown:
            known = sorted(own | sampling_names)
            raise UserError(f"unknown generation settings {sorted(unknown)}; known: {known}")
        nested = d.get("sampling") or {}
        if isinstance(nested, SamplingParams):
            nested = {f.name: getattr(nested, f.name) for f in fields(SamplingParams)}
        flat = {**nested, **{k: v for k, v in d.items() if k in sampling_names}}
        if isinstance(flat.get("logit_bias"), dict):  # TOML and JSON keys are strings
            flat["logit_bias"] = bias_ids(flat["logit_bias"])
        sampling = SamplingParams(**flat)
        return cls(sampling=sampling, **{k: v for k, v in d.items() if k in own})

    def to_dict(self) -> dict:
        """The flat form `from_dict` reads."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sampling"}
        out.update({f.name: getattr(self.sampling, f.name) for f in fields(SamplingParams)})
        return out

    def with_sampling(self, **changes) -> GenerationConfig:
        """A copy with some sampling settings changed (`cfg.with_sampling(seed=3)`)."""
        return replace(self, sampling=replace(self.sampling, **changes))


GRAMMAR_KEYS = {"json_object": (), "json_schema": ("schema",), "regex": ("pattern",), "grammar": ("grammar",)}


def _check_grammar(g: object) -> None:
    """The shape of a grammar setting (whether its schema or pattern compiles is generate/grammar.py's)."""
    if g is None:
        return
    kinds = ", ".join(sorted(GRAMMAR_KEYS))
    if not isinstance(g, dict) or g.get("type") not in GRAMMAR_KEYS:
        raise UserError(f"invalid generation setting: grammar must be a table with type one of {kinds}")
    need = GRAMMAR_KEYS[g["type"]]
    extra = set(g) - {"type", *need, "strict", "name"}
    missing = [k for k in need if k not in g]
    if missing or extra:
        what = f"needs {missing}" if missing else f"has unknown keys {sorted(extra)}"
        raise UserError(f"invalid generation setting: a {g['type']} grammar {what}")
    value = g.get(need[0]) if need else None
    want = dict if g["type"] == "json_schema" else str
    if need and not (isinstance(value, want) and (value or want is dict)):
        raise UserError(f"invalid generation setting: the grammar's {need[0]} must be a {want.__name__}")


def _penalised(sp: SamplingParams) -> bool:
    return sp.repetition_penalty != 1 or sp.frequency_penalty != 0 or sp.presence_penalty != 0


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, logprob) of the most likely alternatives
    rank: int | None = None  # 1 + how many tokens are likelier (prompt logprobs report it, as vLLM does)


@dataclass
class Completion:
    text: str  # generated text, cut before any stop string, without the stop token
    token_ids: list[int]  # generated tokens (without a final stop token id)
    finish_reason: str  # "stop" (stop token or string) | "length" (max_new_tokens or the context)
    # one per sampled token, a final stop token id's included (so one more than token_ids when it stopped so)
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    # with prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[TokenLogprob | None] | None = None


__all__ = ["GenerationConfig", "TokenLogprob", "Completion", "CONTEXT_OVERFLOW"]
