"""Logit lens: what each layer would predict if the network stopped there.

One forward pass with `hidden_states=[]` collects the residual stream entering every layer plus the final
normed output. The final norm and `lm_head` are applied to the stream after the embeddings and after each
layer, giving every layer's next-token distribution at every position (nostalgebraist, 2020). The last row is
exactly the model's own prediction (it is the model's own final hidden state through lm_head).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from yuyan.interpret.attention import encode_text, piece
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer


@torch.no_grad()
def logit_lens(model: Transformer, tokenizer: Tokenizer, text: str, top_k: int = 5) -> dict:
    """{tokens, rows, top_ids (R, T, k), top_probs (R, T, k), top_tokens [R][T][k]}.

    Rows R = n_layer + 1: "embed" (the input embeddings), then "layer 0" .. "layer n-1" (the output of each
    block); top_* are the top_k next-token predictions (ids, probabilities, pieces) at each position.
    """
    ids, tokens = encode_text(tokenizer, text, model.config.block_size)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    hs: list[torch.Tensor] = []
    model.hidden(torch.tensor([ids], device=device), hidden_states=hs)
    model.train(was)
    n = model.config.n_layer
    # hs[0]: embeddings, hs[i]: output of block i-1 (pre-norm residual), hs[n]: final normed output
    streams = [model.norm(hs[i]) for i in range(n)] + [hs[n]]
    logits = torch.stack([model.logits(s[0]).float() for s in streams])  # (n+1, T, V)
    probs = logits.softmax(-1)
    top_probs, top_ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    top_tokens = [[[piece(tokenizer, int(i)) for i in pos] for pos in row] for row in top_ids]
    return {
        "tokens": tokens,
        "rows": ["embed"] + [f"layer {i}" for i in range(n)],
        "top_ids": top_ids.cpu(),
        "top_probs": top_probs.cpu(),
        "top_tokens": top_tokens,
        "logits": logits.cpu(),
    }


def render_logit_lens(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    out_dir: str | os.PathLike,
    max_positions: int = 32,
    top_k: int = 5,
) -> dict:
    """Write logit_lens.png (the last max_positions positions) and logit_lens.json (top-k per cell)."""
    import json

    from yuyan.evaluate.report import atomic_write_text
    from yuyan.plots import plot_logit_lens

    r = logit_lens(model, tokenizer, text, top_k)
    T = len(r["tokens"])
    s = max(0, T - max_positions)
    top1 = [[row[t][0] for t in range(s, T)] for row in r["top_tokens"]]
    out = Path(out_dir)
    png = plot_logit_lens(
        r["rows"],
        r["tokens"][s:],
        top1,
        r["top_probs"][:, s:, 0],
        out / "logit_lens.png",
        title="logit lens: top next-token prediction of each layer",
    )
    table = {
        "tokens": r["tokens"],
        "rows": r["rows"],
        "top": [
            [
                [{"token": tok, "p": round(float(p), 4)} for tok, p in zip(cell_t, cell_p, strict=True)]
                for cell_t, cell_p in zip(row_t, row_p, strict=True)
            ]
            for row_t, row_p in zip(r["top_tokens"], r["top_probs"].tolist(), strict=True)
        ],
    }
    js = atomic_write_text(out / "logit_lens.json", json.dumps(table, ensure_ascii=False) + "\n")
    return {**r, "png": png, "json": js}


__all__ = ["logit_lens", "render_logit_lens"]
