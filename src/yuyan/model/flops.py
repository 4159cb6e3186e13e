"""Parameter and FLOP counts of a `Transformer`, for speed reports, MFU and compute-budget sweeps.

They read the model from outside (its parameters and config), so the model file holds only modules, init
and forward. FLOPs count the matmuls only, the usual convention (PaLM appendix B): 2 per parameter per token
forward plus the attention scores, three times that with the backward pass.
"""

from __future__ import annotations

from yuyan.model.transformer import Transformer


def num_params(model: Transformer, exclude_embeddings: bool = False) -> int:
    """Parameters of `model`, tied weights once; `exclude_embeddings` leaves out token and position tables."""
    n = sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()
    if exclude_embeddings:
        n -= model.embed_tokens.weight.numel()
        if model.config.pos == "learned":
            n -= model.embed_positions.weight.numel()
    return n


def flops_per_token(model: Transformer, seq_len: int | None = None, training: bool = False) -> float:
    """Matmul FLOPs per token at context `seq_len` (default block_size): 2N forward (+ attention scores),
    x3 with backward."""
    c = model.config
    T = seq_len or c.block_size
    n = num_params(model, exclude_embeddings=True)
    if model.lm_head_weight_tied():
        n += c.vocab_size * c.d_model  # the lm_head matmul runs even when its weight is the embedding
    fwd = 2 * n + 2 * c.n_layer * c.n_head * c.head_dim * T  # QK^T and AV over ~T/2 keys, x2
    return float(3 * fwd if training else fwd)


__all__ = ["num_params", "flops_per_token"]
