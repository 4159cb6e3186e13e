"""Loss, perplexity and bits per byte of a causal language model over a list of texts.

Each text is encoded on its own and preceded by the end-of-text token (when the tokenizer has one), so every
token of the text — the first included — is predicted and scored, and bits per byte divides by all of the
text's UTF-8 bytes. A text longer than the context is scored with a sliding window (HF's "strided perplexity"):
windows of `block_size` tokens start every `stride` tokens; the first window scores all its tokens, each later
window scores only the tokens the previous one did not reach, so every token is scored exactly once and with at
least `block_size - stride` tokens of context. Windows from all texts are batched together; logits are computed
only at scored positions, a chunk at a time, so a 50k vocabulary never materialises (B, T, V) at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from yuyan.errors import UserError
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n tokens whose targets are positions 1..n-1.

    Returns (begin, end, first_scored): the window feeds ids[begin:end] and scores the predictions of
    targets first_scored..end-1 (absolute positions). The targets of all windows partition 1..n-1.
    """
    if block_size < 2:
        raise UserError(f"block size {block_size} is too small; windows need at least 2 tokens")
    if not 0 < stride <= block_size:
        raise UserError(
            f"stride {stride} must be between 1 and the block size {block_size}; pass a smaller --stride"
        )
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        end = min(begin + block_size, n)
        out.append((begin, end, prev_end))
        prev_end = end
        # the next window must hold the input (prev_end - 1) that predicts its first target prev_end
        begin = min(begin + stride, prev_end - 1)
    return out


def _autocast(device: torch.device):
    if device.type == "cuda":  # bf16 matmuls on GPU; the loss itself is taken in float32 below
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def progress_bar(enabled: bool = True):
    """A rich progress bar with count, rate and ETA (shared by the evaluators), log lines on stderr when it
    is not a terminal (yuyan.progress); silent when disabled."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from yuyan.progress import Progress

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f}/s" if task.speed else "?/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
        unit="items",
    )


@torch.inference_mode()
def token_nll(
    model: Transformer,
    sequences: list[list[int]],
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    chunk: int = 2048,
) -> list[torch.Tensor]:
    """Per-token negative log-likelihood (nats, float32) of each sequence's targets 1..n-1.

    sequences: token ids, each of length >= 1 (a length-1 sequence has no target). Returns one tensor of
    length n-1 per sequence, in order. block_size defaults to the model's context; stride to block_size // 2.
    """
    block = block_size or model.config.block_size
    if block > model.config.block_size or block < 2:
        raise UserError(
            f"block size {block} must be between 2 and the model's context {model.config.block_size}"
        )
    stride = stride or max(1, block // 2)
    device = next(model.parameters()).device
    # (sequence index, begin, end, first scored target)
    jobs = [(i, b, e, s) for i, seq in enumerate(sequences) for b, e, s in windows(len(seq), block, stride)]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)  # similar lengths share a batch: little padding
    out = [torch.empty(max(len(s) - 1, 0)) for s in sequences]
    was_training = model.training
    model.eval()
    with progress_bar(progress) as bar:
        task = bar.add_task("scoring windows", total=len(jobs))
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            T = max(e - b for _, b, e, _ in batch)
            x = torch.zeros(len(batch), T, dtype=torch.long)  # right padding: causal attention ignores it
            y = torch.full(
                (len(batch), T), -1, dtype=torch.long
            )  # target of input position t; -1: not scored
            for r, (i, b, e, s) in enumerate(batch):
                ids = torch.tensor(sequences[i][b:e])
                x[r, : e - b] = ids
                # input position t (absolute b+t) predicts target b+t+1; score targets s..e-1
                y[r, s - b - 1 : e - b - 1] = ids[s - b :]
            x, y = x.to(device), y.to(device)
            keep = y >= 0
            ys = y[keep]  # (N,) targets in row-major order
            parts = []
            with _autocast(device):
                hs = model.hidden(x)[keep]  # (N, d_model): only the scored positions reach lm_head
                for k in range(0, len(ys), chunk):  # (chunk, V) logits at a time, loss in float32
                    logits = model.logits(hs[k : k + chunk]).float()
                    parts.append(F.cross_entropy(logits, ys[k : k + chunk], reduction="none"))
            nll = torch.cat(parts) if parts else torch.empty(0)
            nll = nll.cpu()
            offset = 0
            for i, _b, e, s in batch:
                out[i][s - 1 : e - 1] = nll[offset : offset + e - s]
                offset += e - s
            bar.advance(task, len(batch))
    model.train(was_training)
    return out


def encode_for_scoring(tokenizer: Tokenizer, text: str) -> list[int]:
    """The text's ids preceded by end-of-text (if any), so that its first token is scored too."""
    ids = tokenizer.encode(text)
    return ([tokenizer.eot_id] if tokenizer.eot_id is not None else []) + ids


def perplexity(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Iterable[str] | str,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Score texts: {loss (nats/token), perplexity, bits_per_byte, tokens, bytes, texts, block_size, stride}.

    Every token is scored exactly once. bits_per_byte = total NLL (nats) / ln 2 / UTF-8 bytes of the texts
    (all bytes when the tokenizer has an end-of-text token to condition the first token on).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if t]
    if not texts:
        raise UserError("no text to score: the corpus is empty; pass a file, folder, glob or JSONL with text")
    block = block_size or model.config.block_size
    stride = stride or max(1, block // 2)
    seqs = [encode_for_scoring(tokenizer, t) for t in texts]
    nll = token_nll(model, seqs, block, stride, batch_size, progress)
    total = float(sum(float(n.double().sum()) for n in nll))
    tokens = sum(len(n) for n in nll)
    if tokens == 0:
        raise UserError("the texts hold no token to score (each is a single token); pass longer texts")
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    loss = total / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total / math.log(2) / nbytes,
        "tokens": tokens,
        "bytes": nbytes,
        "texts": len(texts),
        "block_size": block,
        "stride": stride,
    }


__all__ = ["perplexity", "token_nll", "windows", "encode_for_scoring"]
