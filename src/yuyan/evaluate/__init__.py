"""Evaluation: perplexity / bits per byte, BLEU / ROUGE, classification metrics, speed, JSON + Markdown reports."""

from yuyan.evaluate.perplexity import perplexity, token_nll
from yuyan.evaluate.report import compare, read_result, write_result
from yuyan.evaluate.speed import speed
from yuyan.evaluate.text_metrics import bleu, rouge

__all__ = ["perplexity", "token_nll", "bleu", "rouge", "speed", "compare", "read_result", "write_result"]
