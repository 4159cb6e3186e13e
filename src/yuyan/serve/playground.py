"""The web playground's side of the server: where its static files live, and the attention view it draws.

The page (static/) talks to the OpenAI endpoints like any client and to POST /v1/inspect/attention, whose
answer `attention_view` computes on the server's prepare thread, beside the decode loop (a forward pass
without a KV cache only reads the weights, so it runs alongside a batch's step instead of stalling it):
each layer's per-head attention over the last tokens, as integers 0..1000.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from yuyan.interpret.attention import attention_weights
from yuyan.tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"
SCALE = 1000  # attention weights are sent as integers 0..SCALE (a third of the JSON of floats)


def attention_view(
    model: nn.Module, tokenizer: Tokenizer, ids: list[int]
) -> tuple[list[str], list[torch.Tensor]]:
    """(token pieces, per layer an int32 (heads, queries, keys) tensor of weights x SCALE) of ids."""
    text = tokenizer.decode(ids)
    if tokenizer.encode(text) == ids:  # the interpret module's pieces name split characters
        tokens, weights = attention_weights(model, tokenizer, text)
    else:  # the last tokens of a text may start mid-character: the model's explicit attention path directly
        att: list = []
        with torch.no_grad():
            model(torch.tensor([ids], device=next(model.parameters()).device), attn_weights=att)
        tokens, weights = [tokenizer.id_to_piece(i) for i in ids], [a[0].float().cpu() for a in att]
    return tokens, [(w * SCALE).round().to(torch.int32) for w in weights]


def attention_json(model_name: str, tokens: list[str], layers: list[torch.Tensor]) -> bytes:
    """The view's JSON, written one head at a time: json.dumps and tolist hold the GIL for the whole of
    a call (layers x heads x T^2 integers at once held it ~20 ms, a stall of every stream); a head at a
    time lets the decode thread in between."""
    parts = [
        json.dumps({"model": model_name, "tokens": tokens, "scale": SCALE}, ensure_ascii=False)[:-1],
        ', "attention": [',
    ]
    for li, layer in enumerate(layers):
        heads = [json.dumps(layer[h].tolist(), separators=(",", ":")) for h in range(layer.shape[0])]
        parts.append(("," if li else "") + "[" + ",".join(heads) + "]")
    n_head = layers[0].shape[0] if layers else 0
    parts.append(f'], "n_layer": {len(layers)}, "n_head": {n_head}}}')
    return "".join(parts).encode()


__all__ = ["STATIC", "SCALE", "attention_json", "attention_view"]
