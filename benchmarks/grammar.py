"""Grammar engines for structured output: xgrammar, llguidance and outlines-core on our vocabularies.

The decode core masks each constrained row's logits with its grammar's allowed tokens every step, so the
engine's cost per token (computing the mask of the next token, then advancing by the chosen one) is paid at
every step of every constrained row. This script measures, for each engine and each vocabulary (byte-level
BPE trained here on the running Python's standard library, at --vocab-sizes): the compile time of a few
JSON schemas, the mean mask + advance time per token while sampling from random logits under the mask,
and correctness: of --samples seeded samples per schema, how many finished inside --max-tokens and how many
of those parse as JSON and validate against the schema (jsonschema). The reference is one decode step at
batch 1 of the demo-preset model here (our decode core, fp32); the ratio is the engine's per-token cost
over it (goal: <= 0.10). Prints one JSON line per vocabulary.

    .venv/bin/python benchmarks/grammar.py [--vocab-sizes 4096,32000] [--samples 50] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema
import torch

from yuyan.data.corpus import iter_documents
from yuyan.generate import GenerationConfig
from yuyan.generate.core import Decoder, check_prompt
from yuyan.generate.grammar import token_bytes
from yuyan.model.presets import preset
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer

# strings and arrays are bounded so a random sampler can finish; each exercises a different construct
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "ok": {"type": "boolean"},
            "kind": {"enum": ["a", "b", "cc"]},
        },
        "required": ["name", "ok", "kind"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "tag": {"type": "null"},
                },
                "required": ["id", "tag"],
                "additionalProperties": False,
            },
            "items": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        },
        "required": ["user", "items"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
        "required": ["date"],
        "additionalProperties": False,
    },
}


def train_tokenizer(vocab_size: int, mb: float) -> Tokenizer:
    def texts():
        n = 0
        for d in iter_documents("stdlib"):
            yield d.text
            n += len(d.text)
            if n > mb * 2**20:
                return

    return Tokenizer.train(texts(), vocab_size=vocab_size)


# ------------------------------------------------------------------------------------------ engines
class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer):
        import xgrammar as xgr

        self.xgr = xgr
        vocab, _ = token_bytes(tok)
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[tok.eot_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def start(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m, bitmask: torch.Tensor) -> None:
        m.fill_next_token_bitmask(bitmask, 0)

    def advance(self, m, t: int) -> bool:
        assert m.accept_token(t), t
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer):
        import llguidance as llg
        import llguidance.torch as llt

        self.llg, self.llt = llg, llt
        self.tok = llg.LLTokenizer(tok.to_str())

    def compile(self, schema: dict):
        g = self.llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        m = self.llg.LLMatcher(self.tok, g)  # checking the grammar is its compile step
        assert not m.is_error(), m.get_error()
        return g

    def start(self, compiled):
        return self.llg.LLMatcher(self.tok, compiled)

    def mask(self, m, bitmask: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask(m, bitmask, 0)

    def advance(self, m, t: int) -> bool:
        assert m.consume_token(t), m.get_error()
        return m.is_stopped()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Tokenizer):
        import outlines_core as oc

        self.oc = oc
        vocab, _ = token_bytes(tok)
        ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b and i != tok.eot_id:
                ids.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(tok.eot_id, ids)
        self.V = len(vocab)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def start(self, compiled):
        return self.oc.Guide(compiled)

    def mask(self, m, bitmask: torch.Tensor) -> None:
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def advance(self, m, t: int) -> bool:
        m.advance(t)
        return m.is_finished()


ENGINES = (XGrammar, LLGuidance, OutlinesCore)


def unpack(bitmask: torch.Tensor, V: int) -> torch.Tensor:
    """(1, ceil(V/32)) int32 words, bit j of word w = token 32w + j -> (V,) bool."""
    bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:V].bool()


def run_engine(engine, tok: Tokenizer, samples: int, max_tokens: int, seed: int = 0) -> dict:
    V = tok.vocab_size
    words = (V + 31) // 32
    out = {"compile_ms": {}, "finished": 0, "valid": 0, "tokens": 0}
    mask_s = 0.0
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        compiled = engine.compile(schema)
        out["compile_ms"][name] = round(1000 * (time.perf_counter() - t), 2)
        for s in range(samples):
            g = torch.Generator().manual_seed(seed + s)
            m = engine.start(compiled)
            bitmask = torch.zeros(1, words, dtype=torch.int32)
            ids: list[int] = []
            done = False
            for _ in range(max_tokens):
                logits = torch.randn(V, generator=g)
                t = time.perf_counter()
                engine.mask(m, bitmask)
                allowed = unpack(bitmask, V)
                mask_s += time.perf_counter() - t
                tok_id = int(
                    torch.multinomial(logits.masked_fill(~allowed, -1e9).softmax(-1), 1, generator=g)
                )
                t = time.perf_counter()
                done = engine.advance(m, tok_id)
                mask_s += time.perf_counter() - t
                out["tokens"] += 1
                if tok_id == tok.eot_id:
                    break
                ids.append(tok_id)
                if done:  # the grammar ended on this token (llguidance, outlines-core): no stop token follows
                    break
            if not done:
                continue
            out["finished"] += 1
            try:
                jsonschema.validate(json.loads(tok.decode(ids)), schema)
                out["valid"] += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    out["per_token_us"] = round(1e6 * mask_s / max(1, out["tokens"]), 1)
    return out


def decode_step_s(tok: Tokenizer, steps: int = 64) -> float:
    """Seconds per decode step at batch 1 of the demo-preset model with this vocabulary (our decode core)."""
    cfg = preset("demo", vocab_size=tok.vocab_size)
    model = Transformer(cfg).eval()
    gen = GenerationConfig.from_dict({"max_new_tokens": steps + 8, "temperature": 0.0})
    best = float("inf")
    for _ in range(3):
        core = Decoder(model, tok, 1)
        core.admit([check_prompt(list(range(300, 332)), gen, cfg.block_size, cfg.vocab_size)], [gen])
        core.step()
        t = time.perf_counter()
        for _ in range(steps):
            core.step()
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-sizes", default="4096,32000")
    ap.add_argument("--corpus-mb", type=float, default=8, help="stdlib text the tokenizers are trained on")
    ap.add_argument("--samples", type=int, default=50, help="seeded samples per schema and engine")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for vs in (int(v) for v in args.vocab_sizes.split(",")):
        tok = train_tokenizer(vs, args.corpus_mb)
        step = decode_step_s(tok)
        rec = {"bench": "grammar", "vocab_size": tok.vocab_size, "decode_step_ms": round(1000 * step, 3)}
        for cls in ENGINES:
            try:
                engine = cls(tok)
            except ImportError as e:  # xgrammar and outlines-core are the `bench` extra
                rec[cls.name] = f"not installed ({e.name}): pip install -e '.[bench]'"
                continue
            r = run_engine(engine, tok, args.samples, args.max_tokens)
            r["ratio"] = round(r["per_token_us"] / 1e6 / step, 4)
            rec[cls.name] = r
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
