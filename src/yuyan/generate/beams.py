"""Beam search: its own search over the decode core's forward step (`prefill`, `forward`).

It follows Hugging Face transformers 5.x (`_beam_search`) step for step, so the two agree token for token:
each step keeps the `2 * num_beams` (more with several stop ids) best continuations over all beams, the
best num_beams that did not stop keep running, those that stopped among the top num_beams become finished
hypotheses scored with the length penalty, and HF's early-stopping heuristic ends the search. Beams need
the whole search inside the context (there is no sliding window for a set of beams).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig
from yuyan.generate.core import cache_dtype, forward, model_device, prefill
from yuyan.model.kv_cache import KVCache

NEG = -1e9  # the score of a slot that must never be chosen


@dataclass
class _Beams:
    """The search state of P prompts x K beams over N steps."""

    running: torch.Tensor  # (P, K, N) tokens of the running beams
    run_scores: torch.Tensor  # (P, K) their summed logprobs
    seqs: torch.Tensor  # (P, K, N) tokens of the finished hypotheses
    scores: torch.Tensor  # (P, K) their length-penalised scores
    seq_len: torch.Tensor  # (P, K) their lengths
    finished: torch.Tensor  # (P, K) bool: the slot holds a finished hypothesis
    unsat: torch.Tensor  # (P, 1) bool: "a running beam may still beat a finished one"


def _start(P: int, K: int, N: int, dev: torch.device) -> _Beams:
    running = torch.zeros(P, K, N, dtype=torch.long, device=dev)
    run_scores = torch.zeros(P, K, device=dev)
    run_scores[:, 1:] = NEG  # the first step expands the first beam only
    return _Beams(
        running=running,
        run_scores=run_scores,
        seqs=running.clone(),
        scores=torch.full((P, K), NEG, device=dev),
        seq_len=torch.zeros(P, K, dtype=torch.long, device=dev),
        finished=torch.zeros(P, K, dtype=torch.bool, device=dev),
        unsat=torch.ones(P, 1, dtype=torch.bool, device=dev),
    )


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (P, M, N) rows idx (P, K) -> (P, K, N)."""
    return x.gather(1, idx[:, :, None].expand(*idx.shape, x.shape[2]))


def _expand(b: _Beams, logits: torch.Tensor, step: int, eos: torch.Tensor, keep: int):
    """The `keep` best continuations over all beams: (their logprobs, source beams, sequences, hits)."""
    P, K, N = b.running.shape
    V = logits.shape[-1]
    lp = logits.float().log_softmax(-1).view(P, K, V) + b.run_scores[:, :, None]
    topk_lp, topk_idx = lp.view(P, K * V).topk(keep)  # (P, keep)
    src, tok = topk_idx // V, topk_idx % V
    topk_seq = _gather(b.running, src).clone()
    topk_seq[:, :, step] = tok
    hits = torch.isin(tok, eos) | (step + 1 >= N)  # eos, or max length reached
    return topk_lp, src, topk_seq, hits


def _finish(b: _Beams, topk_lp, topk_seq, hits, step: int, config: GenerationConfig) -> None:
    """The stopped continuations among the top num_beams join the finished hypotheses (best K kept)."""
    K = b.running.shape[1]
    just = hits & (torch.arange(hits.shape[1], device=hits.device) < K)[None, :]
    fin_lp = topk_lp / ((step + 1) ** config.length_penalty)
    full = b.finished.all(-1, keepdim=True) & (config.early_stopping is True)
    fin_lp = fin_lp + full.float() * NEG + (~b.unsat).float() * NEG + (~just).float() * NEG
    m_scores = torch.cat((b.scores, fin_lp), 1)
    best = m_scores.topk(K).indices
    b.seqs = _gather(torch.cat((b.seqs, topk_seq), 1), best)
    b.scores = m_scores.gather(1, best)
    b.finished = torch.cat((b.finished, just), 1).gather(1, best)
    m_len = torch.cat((b.seq_len, torch.full_like(just, step + 1, dtype=torch.long)), 1)
    b.seq_len = m_len.gather(1, best)


def _more(b: _Beams, hits: torch.Tensor, step: int, config: GenerationConfig) -> bool:
    """HF's _check_early_stop_heuristic with the generated length so far: is another step worth it?"""
    N, lp_pen, early = b.running.shape[2], config.length_penalty, config.early_stopping
    cur = N if (early == "never" and lp_pen > 0) else step + 1
    best_possible = b.run_scores[:, :1] / (cur**lp_pen)
    worst = torch.where(b.finished, b.scores.min(1, keepdim=True).values, torch.full_like(b.scores, NEG))
    b.unsat = b.unsat & (best_possible > worst).any(-1, keepdim=True)
    return bool(b.unsat.any()) and not (bool(b.finished.all()) and early is True) and not bool(hits.all())


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    stop_ids: set[int],
    decodable: int | None = None,
) -> list[list[tuple[list[int], bool]]]:
    """Returns per prompt the config.sampling.n best (token ids, ended by a stop id). `decodable`: the
    tokenizer's size when the model's vocabulary is padded past it (ids from there decode to nothing and
    are never chosen, as in the decode core)."""
    block_size, dev = model.config.block_size, model_device(model)
    P, K, N = len(prompts), config.num_beams, config.max_new_tokens
    longest = max(len(p) for p in prompts)
    if longest + N > block_size:
        raise UserError(
            f"beam search needs prompt + max_new_tokens <= the context of {block_size} tokens; "
            "lower max_new_tokens or use num_beams 1 (which slides its window)"
        )
    cache = KVCache(model.config, P, capacity=longest + N, device=dev, dtype=cache_dtype(model))
    expand = torch.arange(P, device=dev).repeat_interleave(K)
    logits = prefill(model, cache, 0, prompts).index_select(0, expand)  # (P*K, V)
    cache.reorder(expand)
    eos = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    keep = max(2, 1 + len(stop_ids)) * K
    offset = torch.arange(P, device=dev)[:, None] * K
    b = _start(P, K, N, dev)
    for step in range(N):
        if decodable is not None:
            logits[:, decodable:] = float("-inf")
        topk_lp, src, topk_seq, hits = _expand(b, logits, step, eos, keep)
        # the best num_beams continuations that did not stop keep running
        run_lp = topk_lp + hits.float() * NEG
        nxt = run_lp.topk(K).indices
        b.running, b.run_scores = _gather(topk_seq, nxt), run_lp.gather(1, nxt)
        _finish(b, topk_lp, topk_seq, hits, step, config)
        cache.reorder((src.gather(1, nxt) + offset).flatten())
        if not _more(b, hits, step, config):
            break
        logits = forward(model, cache, b.running[:, :, step].flatten())
    out = []
    for p in range(P):
        res = []
        for j in range(config.sampling.n):
            ids = b.seqs[p, j, : int(b.seq_len[p, j])].tolist()
            ended = bool(ids) and ids[-1] in stop_ids
            res.append((ids[:-1] if ended else ids, ended))
        out.append(res)
    return out


__all__ = ["beam_search"]
