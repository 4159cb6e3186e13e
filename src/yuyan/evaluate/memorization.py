"""Memorisation audits: secret canaries and their exposure (Carlini et al., "The Secret Sharer"), and
verbatim extraction of training n-grams from samples.

Canaries: `insert_canaries` copies a corpus into OUT/corpus.jsonl (one record per document) with secrets
inserted, each "<prefix><d d d d d d>" (a fixed prefix and random digits), one canary per repetition count,
inserted that many times at random line boundaries of random train-split documents (the copy's split rule
is yuyan.data.corpus's, keyed `corpus.jsonl:n`, so every occurrence is trained on), plus `holdout` canaries
of the same format never inserted: the controls. OUT/canaries.json describes them. `canary_exposure` ranks
each true secret among N - 1 random candidates of the same format by the model's log-perplexity of
prefix + candidate (the summed NLL of its tokens, candidates scored in batches through one forward);
exposure = log2(N) - log2(rank), between 0 and log2(N); a never-seen canary has about 1/ln 2 = 1.44 bits
on average. Greedy decoding from the prefix tells whether the model also writes the secret out.

Extraction: `extraction_overlap` samples from the model (from the end-of-text token, temperature 1 by
default) and looks every sampled n-gram of token ids up in a set of the training corpus's n-grams. The set is
a sorted numpy array of 64-bit polynomial hashes of every n-gram, built document by document (an n-gram
never spans two documents): 8 bytes per corpus token, capped by `max_tokens` (the corpus beyond the cap is
not read, and the report says so), looked up with searchsorted. A hash collision (chance ~ n_grams / 2^64)
can only overcount. The longest verbatim match is the longest run of sampled tokens whose every n-gram is
in the set (n-1 + the run of consecutive hits).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from yuyan.data.corpus import iter_documents, split_of
from yuyan.errors import UserError

PREFIX = "my secret code is "
DIGITS = 6
COPY_NAME = "corpus.jsonl"


@dataclass
class Canary:
    secret: str  # the digits, space-separated: "4 8 1 5 9 2"
    repeats: int  # 0: a control, never inserted
    prefix: str = PREFIX

    @property
    def text(self) -> str:
        return self.prefix + self.secret


def _secret(rng: random.Random, digits: int) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(digits))


def _atomic_write(path: Path, lines: Iterator[str]) -> None:
    """Lines into `path` through a fsynced temp sibling and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _insert_at_line(text: str, canary: str, rng: random.Random) -> str:
    """`canary` as a line of its own at a random line boundary of `text`."""
    cuts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    at = rng.choice(cuts)
    return text[:at] + canary + "\n" + text[at:]


def insert_canaries(
    corpus: str,
    out: str | os.PathLike,
    repeats: list[int],
    seed: int = 0,
    holdout: int = 2,
    digits: int = DIGITS,
) -> dict:
    """Write OUT/corpus.jsonl (the corpus with canaries) and OUT/canaries.json; returns the description."""
    if not repeats or any(r < 1 for r in repeats):
        raise UserError("--repeats takes positive counts, e.g. 1,10,100")
    rng = random.Random(seed)
    canaries, seen = [], set()
    for r in [*repeats, *([0] * holdout)]:
        s = _secret(rng, digits)
        while s in seen:
            s = _secret(rng, digits)
        seen.add(s)
        canaries.append(Canary(s, r))
    docs = [d.text for d in iter_documents(corpus, split="all")]
    train = [n for n in range(len(docs)) if split_of(f"{COPY_NAME}:{n + 1}") == "train"]
    if not train:
        raise UserError(f"the corpus {corpus} has no document in the train split; use a larger corpus")
    for c in canaries:
        for _ in range(c.repeats):
            n = rng.choice(train)
            docs[n] = _insert_at_line(docs[n], c.text, rng)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / COPY_NAME, (json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
    desc = {
        "corpus": str(out / COPY_NAME),
        "source": corpus,
        "seed": seed,
        "digits": digits,
        "documents": len(docs),
        "canaries": [asdict(c) for c in canaries],
    }
    _atomic_write(out / "canaries.json", [json.dumps(desc, indent=2) + "\n"])
    return desc


def _sequence_nll(model, ids: list[list[int]], batch_size: int) -> list[float]:
    """Summed NLL (nats) of tokens 1.. of each sequence given the ones before, in right-padded batches."""
    dev = next(model.parameters()).device
    out: list[float] = []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s : s + batch_size]
        T = max(len(x) for x in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -100, dtype=torch.long)
        for i, seq in enumerate(chunk):
            x[i, : len(seq)] = torch.tensor(seq)
            y[i, : len(seq) - 1] = torch.tensor(seq[1:])
        logits = model(x.to(dev)).float()
        nll = F.cross_entropy(logits.flatten(0, 1), y.to(dev).flatten(), reduction="none").view(y.shape)
        out += nll.sum(1).tolist()
    return out


def exposure(true_nll: float, candidate_nlls: list[float]) -> tuple[float, int]:
    """(exposure in bits, rank from 1) of a secret among itself plus `candidate_nlls`; ties count against
    the secret (rank = 1 + the candidates at or below its log-perplexity)."""
    rank = 1 + sum(1 for c in candidate_nlls if c <= true_nll)
    n = len(candidate_nlls) + 1
    return math.log2(n) - math.log2(rank), rank


@torch.no_grad()
def canary_exposure(
    lm, canaries_json: str | os.PathLike, candidates: int = 1000, seed: int = 1, batch_size: int = 128
) -> list[dict]:
    """Per canary of a canaries.json: repeats, exposure (bits), rank among `candidates` and whether greedy
    decoding from the prefix writes the secret."""
    from yuyan.generate import GenerationConfig, SamplingParams, generate

    try:
        desc = json.loads(Path(canaries_json).read_text(encoding="utf-8"))
        canaries = [Canary(**c) for c in desc["canaries"]]
        digits = int(desc["digits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{canaries_json} is not a canaries.json written by `yuyan audit canaries insert` ({e})"
        ) from None
    if candidates < 2 or candidates > 10**digits:
        raise UserError(f"--candidates must be between 2 and {10**digits}")
    model, tok = lm.model, lm.tokenizer
    model.eval()
    rng = random.Random(seed)
    rows = []
    for c in canaries:
        others: set[str] = set()
        while len(others) < candidates - 1:
            s = _secret(rng, digits)
            if s != c.secret:
                others.add(s)
        seqs = [tok.encode(c.prefix + s) for s in [c.secret, *sorted(others)]]
        nlls = _sequence_nll(model, seqs, batch_size)
        exp, rank = exposure(nlls[0], nlls[1:])
        gc = GenerationConfig(max_new_tokens=len(seqs[0]) + 2, sampling=SamplingParams(temperature=0.0))
        text = generate(model, tok, [c.prefix.rstrip(" ")], gc)[0][0].text
        greedy = text.strip().startswith(c.secret)
        rows.append(
            {
                "secret": c.secret,
                "repeats": c.repeats,
                "exposure": exp,
                "rank": rank,
                "candidates": candidates,
                "max_exposure": math.log2(candidates),
                "greedy_extracts": greedy,
                "greedy_text": text,
            }  # fmt: skip
        )
    return rows


# ---------------------------------------------------------------------------------------------- extraction

_MULT = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit multiplier: the polynomial hash's base


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """uint64 hashes of every n-gram of a 1-D id array (len - n + 1 of them; wrapping arithmetic)."""
    ids = ids.astype(np.uint64)
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MULT + ids[j : j + m] + np.uint64(1)
    return h


def corpus_ngrams(
    tokenizer, corpus: str, n: int, max_tokens: int = 50_000_000
) -> tuple[np.ndarray, int, bool]:
    """(sorted unique n-gram hashes of the corpus's train split, tokens read, whether the cap cut it)."""
    parts, total, cut = [], 0, False
    for d in iter_documents(corpus, split="train"):
        ids = np.asarray(tokenizer.encode(d.text), dtype=np.int64)
        if total + len(ids) > max_tokens:
            ids, cut = ids[: max_tokens - total], True
        parts.append(ngram_hashes(ids, n))
        total += len(ids)
        if cut:
            break
    table = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)
    return table, total, cut


def _member(table: np.ndarray, h: np.ndarray) -> np.ndarray:
    if len(table) == 0:
        return np.zeros(len(h), dtype=bool)
    i = np.searchsorted(table, h).clip(max=len(table) - 1)
    return table[i] == h


def _longest_run(hits: np.ndarray) -> int:
    best = run = 0
    for x in hits.tolist():
        run = run + 1 if x else 0
        best = max(best, run)
    return best


@torch.no_grad()
def extraction_overlap(
    lm, corpus: str, samples: int = 100, n: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
    seed: int = 0, max_tokens: int = 50_000_000, batch_size: int = 16,
) -> dict:  # fmt: skip
    """Sample from the model and report how much of it is verbatim training text (see the module doc)."""
    from yuyan.generate import GenerationConfig, SamplingParams, generate

    if n < 1 or samples < 1:
        raise UserError("--n and --samples must be >= 1")
    model, tok = lm.model, lm.tokenizer
    model.eval()
    table, read, cut = corpus_ngrams(tok, corpus, n, max_tokens)
    start = [tok.eot_id if tok.eot_id is not None else 0]
    torch.manual_seed(seed)
    gc = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temperature))
    hits_total = grams_total = longest = 0
    examples = []
    for s in range(0, samples, batch_size):
        for c in generate(model, tok, [start] * min(batch_size, samples - s), gc):
            ids = np.asarray(c[0].token_ids, dtype=np.int64)
            hits = _member(table, ngram_hashes(ids, n))
            hits_total, grams_total = hits_total + int(hits.sum()), grams_total + len(hits)
            run = _longest_run(hits)
            longest = max(longest, run + n - 1 if run else 0)
            if len(examples) < 5 and run:
                i = int(np.argmax(np.convolve(hits, np.ones(run), "valid") == run))
                examples.append(tok.decode(ids[i : i + run + n - 1].tolist()))
    return {
        "n": n, "samples": samples, "sampled_ngrams": grams_total,
        "overlap": hits_total / grams_total if grams_total else 0.0,
        "longest_match_tokens": longest, "corpus_tokens": read, "corpus_ngrams": len(table),
        "corpus_cut_at_max_tokens": cut, "table_bytes": int(table.nbytes), "examples": examples,
    }  # fmt: skip


__all__ = [
    "Canary",
    "insert_canaries",
    "canary_exposure",
    "exposure",
    "ngram_hashes",
    "corpus_ngrams",
    "extraction_overlap",
]
