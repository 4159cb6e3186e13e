"""BLEU and ROUGE of generated text against references, through the reference implementations.

BLEU is sacrebleu's corpus BLEU; its tokenizer is `13a` (the WMT default), `zh` (Chinese: each Han character
split off) or `intl` (Unicode punctuation), chosen by the caller or detected: `zh` when any reference holds a
CJK character. ROUGE-1/2/L come from Google's rouge-score, whose default tokenizer keeps only [a-z0-9] and so
silently scores Chinese as empty; `CJKTokenizer` keeps every CJK character as its own token (the usual
practice for Chinese ROUGE) and, on ASCII text, yields exactly the default tokenizer's tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from yuyan.errors import UserError

# Han (with extensions A and compatibility), kana, Hangul syllables
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_CJK_RE = re.compile(f"[{CJK}]")
# one CJK character, or a run of other letters/digits (underscore and punctuation separate, as in rouge-score)
_TOKEN_RE = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")
TOKENIZE_CHOICES = ("13a", "zh", "intl")


def has_cjk(text: str) -> bool:
    return bool(_CJK_RE.search(text))


def _refs_streams(references: Sequence[str] | Sequence[Sequence[str]], n: int) -> list[list[str]]:
    """references: one string per prediction, or a list of strings (several references) per prediction."""
    if len(references) != n:
        raise UserError(
            f"{n} predictions but {len(references)} references; give one reference (or list) per prediction"
        )
    multi = [[r] if isinstance(r, str) else list(r) for r in references]
    k = max((len(r) for r in multi), default=1)
    # sacrebleu wants k reference streams; a missing reference of a row is None
    return [[r[j] if j < len(r) else None for r in multi] for j in range(k)]


def detect_tokenize(references: Sequence[str] | Sequence[Sequence[str]]) -> str:
    """'zh' when any reference contains CJK characters, else '13a'."""
    flat = (x for r in references for x in ([r] if isinstance(r, str) else r))
    return "zh" if any(has_cjk(x) for x in flat) else "13a"


def bleu(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    tokenize: str | None = None,
) -> dict:
    """Corpus BLEU (0-100) with sacrebleu: {bleu, precisions, bp, sys_len, ref_len, tokenize, signature}."""
    import sacrebleu

    tokenize = tokenize or detect_tokenize(references)
    if tokenize not in TOKENIZE_CHOICES:
        raise UserError(f"unknown BLEU tokenize {tokenize!r}; choose one of {', '.join(TOKENIZE_CHOICES)}")
    if not predictions:
        raise UserError("no predictions to score; the data file is empty")
    metric = sacrebleu.BLEU(tokenize=tokenize)
    res = metric.corpus_score(list(predictions), _refs_streams(references, len(predictions)))
    return {
        "bleu": res.score,
        "precisions": list(res.precisions),
        "bp": res.bp,
        "sys_len": res.sys_len,
        "ref_len": res.ref_len,
        "tokenize": tokenize,
        "signature": str(metric.get_signature()),
    }


class CJKTokenizer:
    """rouge-score tokenizer: lowercase; each CJK character a token; other letter/digit runs a token."""

    def __init__(self, use_stemmer: bool = False):
        self.stemmer = None
        if use_stemmer:
            from nltk.stem import porter

            self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        toks = _TOKEN_RE.findall(text.lower())
        if self.stemmer is not None:  # rouge-score stems only tokens longer than 3
            toks = [self.stemmer.stem(t) if len(t) > 3 and not has_cjk(t) else t for t in toks]
        return toks


def rouge(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], use_stemmer: bool = False
) -> dict:
    """Mean ROUGE-1/2/L precision, recall and F1 (0-100) over the pairs, CJK-aware.

    With several references per prediction, each pair takes rouge-score's best-F1 reference (score_multi).
    """
    from rouge_score import rouge_scorer

    if not predictions:
        raise UserError("no predictions to score; the data file is empty")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(predictions):
        raise UserError(f"{len(predictions)} predictions but {len(refs)} references; give one per prediction")
    types = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(types, tokenizer=CJKTokenizer(use_stemmer))
    sums = {t: [0.0, 0.0, 0.0] for t in types}
    for p, r in zip(predictions, refs, strict=True):
        s = scorer.score_multi(r, p) if len(r) > 1 else scorer.score(r[0], p)
        for t in types:
            sums[t][0] += s[t].precision
            sums[t][1] += s[t].recall
            sums[t][2] += s[t].fmeasure
    n = len(predictions)
    out: dict = {}
    for t in types:
        out[t] = 100 * sums[t][2] / n
        out[f"{t}_precision"] = 100 * sums[t][0] / n
        out[f"{t}_recall"] = 100 * sums[t][1] / n
    out["pairs"] = n
    return out


__all__ = ["bleu", "rouge", "CJKTokenizer", "detect_tokenize", "has_cjk", "TOKENIZE_CHOICES"]
