"""Structured output: the decode core's grammar masks (JSON, JSON Schema, regex, Lark/GBNF grammars).

A row whose `GenerationConfig.grammar` is set gets a `Constraint`: before each sampling step it writes the
bitmask of the tokens the grammar allows next (one bit per vocabulary id), the core sets every other logit
to -inf (before penalties, temperature, top-k/top-p, so those choose among allowed tokens, as in vLLM),
and the chosen token advances it. When the grammar is complete only the stop tokens stay allowed, so the
row ends with finish_reason "stop". At max_new_tokens a row ends where it is ("length"), possibly as
unfinished JSON, as OpenAI's API does: give enough tokens. The engine is llguidance, chosen by benchmarks/grammar.py (BENCHMARKS.md) over xgrammar and outlines-core:
every seeded JSON Schema sample it allowed validated (xgrammar let raw control characters and broken UTF-8
into strings, outlines-core ignored an integer's maximum), at 40-90 us a token on 4k-32k vocabularies.
"""

from __future__ import annotations

import json
import sys
import weakref
from functools import lru_cache

import numpy as np
import torch

from yuyan.errors import UserError
from yuyan.tokenizer import Tokenizer

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> {n_vocab: LLTokenizer}


@lru_cache(1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted (the character each byte is written as -> the byte): printable
    bytes stand for themselves, the others take the code points 256, 257, ... in byte order."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


def _decoder_kinds(tok: Tokenizer) -> set[str]:
    d = json.loads(tok.to_str()).get("decoder") or {}
    return {x.get("type") for x in d.get("decoders", [d])}


def token_bytes(tok: Tokenizer) -> tuple[list[bytes], list[int]]:
    """(the bytes of every vocabulary id, b"" for special tokens; the special ids), for a byte-level BPE
    tokenizer (ours, GPT-2's, Llama 3's) or a SentencePiece-style one with byte fallback (Llama 2's)."""
    kinds = _decoder_kinds(tok)
    special = sorted(t for t, a in tok.tok.get_added_tokens_decoder().items() if a.special)
    out: list[bytes] = []
    if "ByteLevel" in kinds:
        table = _byte_decoder()
        for i in range(tok.vocab_size):
            piece = tok.tok.id_to_token(i) or ""
            out.append(bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode())
    elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        for i in range(tok.vocab_size):
            piece = tok.tok.id_to_token(i) or ""
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode())
    else:
        raise UserError(
            f"structured output needs a byte-level or SentencePiece-style tokenizer; this one's decoder is "
            f"{sorted(k for k in kinds if k) or 'missing'}"
        )
    for i in special:
        out[i] = b""
    return out, special


def _lltokenizer(tok: Tokenizer, n_vocab: int):
    """llguidance's view of our tokenizer (built from its tokenizer.json, once per tokenizer and width)."""
    import llguidance

    per = _TOKENIZERS.setdefault(tok, {})
    if n_vocab not in per:
        eos = tok.eot_id if tok.eot_id is not None else None
        per[n_vocab] = llguidance.LLTokenizer(tok.to_str(), n_vocab=n_vocab, eos_token=eos)
    return per[n_vocab]


@lru_cache(256)
def _grammar_text(spec_json: str) -> str:
    """llguidance's grammar for a `GenerationConfig.grammar` spec (given as JSON, so it can be cached)."""
    import llguidance

    spec = json.loads(spec_json)
    kind = spec["type"]
    if kind == "json_object":  # any JSON object, as OpenAI's json_object mode
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps({"type": "object"}), defaults={"whitespace_flexible": False}
        )
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(spec["schema"]), defaults={"whitespace_flexible": False}
        )
    return llguidance.grammar_from(
        "regex" if kind == "regex" else "grammar", spec[{"regex": "pattern"}.get(kind, "grammar")]
    )


def compile_grammar(tok: Tokenizer | None, spec: dict, n_vocab: int) -> str:
    """The checked grammar of a spec, ready for `Constraint`; raises UserError naming what is wrong with it
    (an invalid regex, schema or grammar, or no tokenizer to map its text to tokens)."""
    if tok is None:
        raise UserError("a grammar constrains text: it needs the model's tokenizer")
    try:
        import llguidance
    except ImportError:
        raise UserError("structured output needs llguidance: pip install llguidance") from None
    try:
        text = _grammar_text(json.dumps(spec, sort_keys=True))
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid {spec['type']} grammar: {str(e).strip().splitlines()[0]}") from None
    err = llguidance.LLMatcher.validate_grammar(text, _lltokenizer(tok, n_vocab))
    if err:
        raise UserError(f"invalid {spec['type']} grammar: {' '.join(err.split())[:300]}")
    return text


class Constraint:
    """One row's grammar state: the mask of its next token, advanced by each token it takes."""

    def __init__(self, tok: Tokenizer, grammar: str, n_vocab: int):
        import llguidance

        self.matcher = llguidance.LLMatcher(_lltokenizer(tok, n_vocab), grammar)

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (not even its end token)."""
        return self.matcher.is_stopped()

    def take(self, tok: int) -> None:
        self.matcher.consume_token(tok)


class MaskBuffer:
    """The decode core's per-step masks for up to `rows` constrained rows, in arrays allocated once (their
    addresses taken once): `bias(constraints)` is (C, V) float32 0/-inf, the same as `mask_bias` of their
    bitmasks, with no allocation or pointer lookup per step. llguidance writes constraint i's allowed next
    tokens (bit j of word w is token 32w + j) straight into row i of `bits` (several constraints at once
    in its threads, outside the GIL); no torch wrapper: in a decode step each library call runs with cold
    caches after the forward pass, so calls, not arithmetic, are much of the cost."""

    def __init__(self, rows: int, vocab_size: int):
        self.V, self.words = vocab_size, (vocab_size + 31) // 32
        self.bits = np.empty((rows, self.words), np.int32)
        self.ptr = self.bits.ctypes.data
        self.out = np.empty((rows, self.words * 4, 8), np.float32)

    def bias(self, constraints: list[Constraint]) -> torch.Tensor:
        C = len(constraints)
        if C == 1:
            constraints[0].matcher.unsafe_compute_mask_ptr(self.ptr, self.words * 4)
        else:
            pairs = [(c.matcher, i) for i, c in enumerate(constraints)]
            _executor().unsafe_compute_mask_ptr(pairs, self.ptr, self.words * 4, C)
        if sys.byteorder != "little":
            return mask_bias(self.bits[:C], self.V)
        np.take(_BYTE_BIAS, self.bits[:C].view(np.uint8), axis=0, out=self.out[:C])
        return torch.from_numpy(self.out[:C].reshape(C, -1)[:, : self.V])


@lru_cache(1)
def _executor():
    import llguidance

    return llguidance.LLExecutor()


# every byte's 8 bits (least significant first) as float32 0 (set) or -inf (clear): one table lookup per
# byte turns a bitmask into the additive mask, branch-free, in one numpy call
_BYTE_BIAS = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"), 0.0, -np.inf
).astype(np.float32)


def mask_bias(bitmask: torch.Tensor | np.ndarray, vocab_size: int) -> torch.Tensor:
    """(C, W) int32 bitmask -> (C, vocab_size) float32: 0 where the grammar allows the token, -inf where not
    (bit j of word w is token 32w + j). Added to the logits, it masks them.

    Branch-free, so its cost does not depend on the mask (a select such as torch.where mispredicts on
    ragged masks: 100 us at 32k tokens): on a little-endian host a word's bytes are its bits 0-7, 8-15, ...,
    so one lookup of each byte in a 256 x 8 table gives the floats; other hosts shift."""
    if isinstance(bitmask, torch.Tensor):
        bitmask = bitmask.contiguous().numpy()
    C = bitmask.shape[0]
    if sys.byteorder == "little":
        return torch.from_numpy(_BYTE_BIAS[bitmask.view(np.uint8)].reshape(C, -1)[:, :vocab_size])
    bits = (bitmask[:, :, None] >> np.arange(32, dtype=np.int32)) & 1
    return torch.from_numpy(np.where(bits.reshape(C, -1)[:, :vocab_size], 0.0, -np.inf).astype(np.float32))


__all__ = [
    "token_bytes",
    "compile_grammar",
    "Constraint",
    "mask_bias",
    "MaskBuffer",
]
