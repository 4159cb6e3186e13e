"""The web playground's side of the server: where its static files live, and the attention view it draws.

The page (static/) talks to the OpenAI endpoints like any client and to POST /v1/inspect/attention, whose
answer `attention_view` computes on the decoding side as a background call between decode steps (app.py):
each layer's per-head attention over the last tokens, as integers 0..1000.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
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
    """The view's JSON. The integers go through orjson's numpy path: 4 layers x 4 heads x 128^2 of them
    took 1.2 ms against the json module's 30 ms (byte-identical), time the decode thread spent holding
    the GIL."""
    head = json.dumps({"model": model_name, "tokens": tokens, "scale": SCALE}, ensure_ascii=False)[:-1]
    stacked = torch.stack(layers).numpy() if layers else None
    attention = orjson.dumps(stacked, option=orjson.OPT_SERIALIZE_NUMPY) if layers else b"[]"
    n_head = layers[0].shape[0] if layers else 0
    tail = f', "n_layer": {len(layers)}, "n_head": {n_head}}}'
    return head.encode() + b', "attention": ' + attention + tail.encode()


__all__ = ["STATIC", "SCALE", "attention_json", "attention_view"]
