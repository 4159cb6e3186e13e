"""Surprise: the text coloured by how hard each token was for the model to predict (per-token loss).

Each token's negative log-likelihood comes from `yuyan.evaluate.perplexity.token_nll` (end-of-text prepended
so the first token is scored; sliding window past the context), so these numbers add up to what
`eval perplexity` reports. The HTML page shows the original text with each piece shaded by its loss (hover for
nats and bits) and lists the hardest tokens. A token that holds part of a multi-byte character is shown merged
with the rest of that character (their losses add).
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

from yuyan.errors import UserError
from yuyan.evaluate.perplexity import token_nll
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer


def surprise(
    model: Transformer, tokenizer: Tokenizer, text: str, top: int = 10, stride: int | None = None
) -> dict:
    """{tokens, offsets, losses (nats per token), mean_loss, bits_per_byte, hardest: [{index, token, loss}]}."""
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if not ids:
        raise UserError("the text is empty; pass --text with at least one character")
    prefix = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    nll = token_nll(model, [prefix + ids], stride=stride)[0]
    if not prefix:  # without an end-of-text token the first token cannot be scored
        offsets, ids = offsets[1:], ids[1:]
    losses = [float(x) for x in nll]
    from yuyan.interpret.attention import piece

    tokens = [piece(tokenizer, i) for i in ids]
    order = sorted(range(len(losses)), key=lambda i: -losses[i])[:top]
    return {
        "tokens": tokens,
        "offsets": offsets,
        "losses": losses,
        "mean_loss": sum(losses) / max(len(losses), 1),
        "bits_per_byte": sum(losses) / math.log(2) / max(len(text.encode("utf-8")), 1),
        "hardest": [{"index": i, "token": tokens[i], "loss": losses[i]} for i in order],
        "text": text,
    }


def segments(text: str, offsets: list[tuple[int, int]], losses: list[float]) -> list[tuple[str, float]]:
    """Non-overlapping pieces of the text with their summed losses, in order (partial characters merged)."""
    out: list[tuple[str, float]] = []
    cursor = 0
    for (a, b), loss in zip(offsets, losses, strict=True):
        if b <= cursor and out:  # the rest of a character already shown: its loss joins that piece
            out[-1] = (out[-1][0], out[-1][1] + loss)
            continue
        start = max(a, cursor)
        if start > cursor:  # text no token covers (never with byte-level BPE)
            out.append((text[cursor:start], 0.0))
        out.append((text[start:b], loss))
        cursor = b
    if cursor < len(text):
        out.append((text[cursor:], 0.0))
    return out


def surprise_html(result: dict, title: str = "surprise") -> str:
    segs = segments(result["text"], result["offsets"], result["losses"])
    scale = max(4.0, max((loss for _, loss in segs), default=1.0))
    spans = []
    for s, loss in segs:
        a = min(1.0, loss / scale)
        spans.append(
            f'<span style="background:rgba(220,40,40,{a:.3f})" title="{loss:.2f} nats = '
            f'{loss / math.log(2):.2f} bits">{html.escape(s)}</span>'
        )
    rows = "".join(
        f"<tr><td>{h['index']}</td><td><code>{html.escape(repr(h['token']))}</code></td>"
        f"<td>{h['loss']:.2f}</td><td>{h['loss'] / math.log(2):.2f}</td></tr>"
        for h in result["hardest"]
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:16px}} #text{{white-space:pre-wrap;font-family:ui-monospace,monospace;
line-height:1.6;border:1px solid #ddd;padding:10px}} td,th{{padding:2px 10px;text-align:left}}</style></head><body>
<h2>{html.escape(title)}</h2>
<p>Mean loss {result["mean_loss"]:.3f} nats/token, {result["bits_per_byte"]:.3f} bits/byte over {len(result["losses"])}
tokens. Darker red = more surprising (scale 0 .. {scale:.1f} nats); hover a piece for its loss.</p>
<div id="text">{"".join(spans)}</div>
<h3>Hardest tokens</h3><table><tr><th>#</th><th>token</th><th>nats</th><th>bits</th></tr>{rows}</table>
</body></html>
"""


def render_surprise(
    model: Transformer, tokenizer: Tokenizer, text: str, out_dir: str | os.PathLike, top: int = 10
) -> dict:
    """Write surprise.html; return the result with its path."""
    from yuyan.evaluate.report import atomic_write_text

    r = surprise(model, tokenizer, text, top)
    page = atomic_write_text(Path(out_dir) / "surprise.html", surprise_html(r))
    return {**r, "html": page}


__all__ = ["surprise", "surprise_html", "render_surprise", "segments"]
