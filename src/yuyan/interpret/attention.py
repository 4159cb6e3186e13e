"""Attention maps: per-layer weights from the model's explicit attention path, PNG head grids, an HTML browser.

`attention_weights` runs one forward pass with `attn_weights=[]`, which makes every layer take the explicit
softmax(QK^T/sqrt(d)) path and append its (B, H, T, T) weights. `render_attention` writes one PNG per layer (a
grid of heads, tokens on both axes; plotting in yuyan.plots) and `attention.html`: one self-contained page
(inline CSS, JS and data; no network) with a layer and head selector, a heatmap and a token view that shows,
for a clicked token, how much it attends to each earlier token.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import torch

from yuyan.errors import UserError
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes) back to the bytes."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTES = _byte_decoder()


def piece(tokenizer: Tokenizer, token_id: int) -> str:
    """Readable text of one vocabulary token; a partial UTF-8 character shows its bytes (e.g. "\\xe8\\xaf")."""
    text = tokenizer.id_to_piece(token_id)
    if "\ufffd" not in text:
        return text
    raw = tokenizer.tok.id_to_token(token_id) or ""
    if raw and all(c in _BYTES for c in raw):
        return bytes(_BYTES[c] for c in raw).decode("utf-8", errors="backslashreplace")
    return text


def token_pieces(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[str]]:
    """Token ids of the text and a readable piece per token, taken from the text itself (offsets).

    A byte-level token can hold part of a multi-byte character (a Chinese character often spans 2 tokens):
    consecutive tokens that map to the same characters are labelled "语[1/2]", "语[2/2]".
    """
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    ids, offs = list(enc.ids), list(enc.offsets)
    labels = [text[a:b] for a, b in offs]
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and offs[j + 1] == offs[i]:
            j += 1
        if j > i:
            for k in range(i, j + 1):
                labels[k] = f"{labels[k]}[{k - i + 1}/{j - i + 1}]"
        i = j + 1
    return ids, labels


def encode_text(tokenizer: Tokenizer, text: str, block_size: int) -> tuple[list[int], list[str]]:
    """Token ids of the text (the first block_size of them) and their readable pieces."""
    ids, labels = token_pieces(tokenizer, text)
    if not ids:
        raise UserError("the text is empty; pass --prompt/--text with at least one character")
    return ids[:block_size], labels[:block_size]


@torch.no_grad()
def attention_weights(
    model: Transformer, tokenizer: Tokenizer, text: str
) -> tuple[list[str], list[torch.Tensor]]:
    """(tokens, weights): weights[l] is layer l's attention (H, T, T), rows = queries, each row sums to 1."""
    ids, tokens = encode_text(tokenizer, text, model.config.block_size)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    att: list[torch.Tensor] = []
    model(torch.tensor([ids], device=device), attn_weights=att)
    model.train(was)
    return tokens, [a[0].float().cpu() for a in att]


def attention_html(tokens: list[str], weights: list[torch.Tensor], title: str = "attention") -> str:
    """A self-contained page to browse layers and heads (weights stored as integers 0..1000)."""
    data = {"tokens": tokens, "layers": [(w * 1000).round().to(torch.int32).tolist() for w in weights]}
    blob = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)


def render_attention(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    out_dir: str | os.PathLike,
    layers: list[int] | None = None,
    title: str = "",
) -> dict:
    """Write attention_layer{l}.png for each layer (or the chosen ones) and attention.html; return the paths."""
    from yuyan.evaluate.report import atomic_write_text
    from yuyan.plots import plot_attention_heads

    tokens, weights = attention_weights(model, tokenizer, text)
    n = len(weights)
    chosen = list(range(n)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise UserError(f"layer {bad[0]} does not exist; the model has layers 0..{n - 1}")
    out = Path(out_dir)
    pngs = [
        plot_attention_heads(
            weights[i],
            tokens,
            out / f"attention_layer{i}.png",
            title=f"{title + ' — ' if title else ''}layer {i} attention (rows: queries)",
        )
        for i in chosen
    ]
    page = atomic_write_text(out / "attention.html", attention_html(tokens, weights, title or "attention"))
    return {"tokens": tokens, "pngs": pngs, "html": page}


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
#ctl{margin-bottom:10px} select,button{font-size:14px;margin-right:8px}
#wrap{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
canvas{border:1px solid #ccc;image-rendering:pixelated;cursor:crosshair}
#toks span{display:inline-block;padding:2px 3px;margin:1px;border-radius:3px;cursor:pointer;white-space:pre;
 font-family:ui-monospace,monospace;border:1px solid #ddd}
#toks span.q{outline:2px solid #e67e22}
#info{font-family:ui-monospace,monospace;min-height:1.4em;margin:6px 0}
</style></head><body>
<h2>__TITLE__</h2>
<div id="ctl">layer <select id="layer"></select> head <select id="head"></select>
<span>(hover the map; click a token below to see what it attends to)</span></div>
<div id="info"></div>
<div id="wrap"><canvas id="map"></canvas><div id="toks" style="max-width:640px"></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const T = D.tokens.length, L = D.layers.length, H = D.layers[0].length;
const show = s => s.replace(/\n/g,'\\n').replace(/\t/g,'\\t').replace(/ /g,'\u00b7') || '\u2205';
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
for (let l = 0; l < L; l++) layerSel.add(new Option(String(l), l));
headSel.add(new Option('mean', -1));
for (let h = 0; h < H; h++) headSel.add(new Option(String(h), h));
let query = T - 1;
function mat() {
  const l = +layerSel.value, h = +headSel.value;
  if (h >= 0) return D.layers[l][h];
  const m = [];
  for (let i = 0; i < T; i++) { m.push([]); for (let j = 0; j < T; j++) {
    let s = 0; for (let k = 0; k < H; k++) s += D.layers[l][k][i][j]; m[i].push(s / H); } }
  return m;
}
function color(v) { const t = Math.sqrt(v / 1000); const c = Math.round(255 * (1 - t));
  return `rgb(${c},${Math.round(255 - 150 * t)},255)`; }
const cv = document.getElementById('map'), ctx = cv.getContext('2d');
const px = Math.max(4, Math.min(14, Math.floor(560 / T)));
cv.width = cv.height = px * T;
function draw() {
  const m = mat();
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) {
    ctx.fillStyle = j > i ? '#f4f4f4' : color(m[i][j]); ctx.fillRect(j * px, i * px, px, px); }
  ctx.strokeStyle = '#e67e22'; ctx.strokeRect(0, query * px, T * px, px);
  const box = document.getElementById('toks'); box.innerHTML = '';
  D.tokens.forEach((t, j) => { const s = document.createElement('span'); s.textContent = show(t);
    const v = j <= query ? m[query][j] : 0; s.style.background = j <= query ? color(v) : '#fff';
    s.title = `${(v / 1000).toFixed(3)}`; if (j === query) s.className = 'q';
    s.onclick = () => { query = j; draw(); }; box.appendChild(s); });
}
cv.onmousemove = e => { const r = cv.getBoundingClientRect();
  const j = Math.floor((e.clientX - r.left) / px), i = Math.floor((e.clientY - r.top) / px);
  if (i < 0 || j < 0 || i >= T || j >= T) return;
  document.getElementById('info').textContent =
    `query ${i} "${show(D.tokens[i])}" -> key ${j} "${show(D.tokens[j])}": ${(mat()[i][j] / 1000).toFixed(3)}`; };
cv.onclick = e => { const r = cv.getBoundingClientRect(); query = Math.min(T - 1, Math.floor((e.clientY - r.top) / px)); draw(); };
layerSel.onchange = headSel.onchange = draw;
draw();
</script></body></html>
"""

__all__ = ["attention_weights", "attention_html", "render_attention", "encode_text", "token_pieces", "piece"]
