"""Prompt logprobs: how likely the model finds each token of a prompt, given the tokens before it.

This is what evaluation harnesses score with (lm-evaluation-harness sends `echo` + `logprobs` with
`max_tokens` 0 or 1 and sums the continuation's logprobs) and what vLLM calls `prompt_logprobs`. Prompts
are scored together: sorted by length, right-padded into groups whose logits fit `LOGIT_BUDGET` floats
(padding sits after every real token, so causal attention never lets it reach them), one forward pass per
group without a cache, and one log-softmax, gather and top-k over every real position of the group. The
logprobs are of the model's raw distribution (no sampling settings), in float32, like the logprobs of
generated tokens and like transformers' `log_softmax(logits.float())`.
"""

from __future__ import annotations

import torch
from torch import nn

from yuyan.generate.config import TokenLogprob
from yuyan.tokenizer import Tokenizer

LOGIT_BUDGET = 1 << 25  # floats of logits per group (128 MiB): bounds memory whatever the prompts' sizes


def _groups(order: list[int], lengths: list[int], vocab: int) -> list[list[int]]:
    """Consecutive runs of `order` (sorted by length) whose padded logits fit the budget."""
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * lengths[i] * vocab <= LOGIT_BUDGET:
            g.append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def prompt_logprobs(
    model: nn.Module, tokenizer: Tokenizer | None, prompts: list[list[int]], tops: list[int]
) -> list[list[TokenLogprob | None]]:
    """For each prompt (token ids, within the model's context) one entry per token: None for the first
    (nothing predicts it), then the token's logprob given the ones before it and the `tops[i]` likeliest
    alternatives at that position."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    lengths = [len(p) for p in prompts]
    out: list[list[TokenLogprob | None]] = [[None] for _ in prompts]
    order = sorted((i for i in range(len(prompts)) if lengths[i] > 1), key=lambda i: lengths[i])
    texts: dict[int, str] = {}

    def text(t: int) -> str:
        if t not in texts:
            texts[t] = tokenizer.decode([t]) if tokenizer is not None else ""
        return texts[t]

    for group in _groups(order, lengths, vocab):
        T = max(lengths[i] for i in group)
        idx = torch.zeros(len(group), T, dtype=torch.long, device=device)
        for g, i in enumerate(group):
            idx[g, : lengths[i]] = torch.tensor(prompts[i], device=device)
        real = (
            torch.arange(T - 1, device=device)[None, :]
            < torch.tensor([lengths[i] - 1 for i in group], device=device)[:, None]
        )  # (G, T-1): position t predicts token t + 1
        h = model.hidden(idx)[:, :-1][real]  # (N, d): every position that predicts a real token
        lp = model.logits(h).float().log_softmax(-1)  # (N, V)
        targets = idx[:, 1:][real]
        chosen_t = lp.gather(1, targets[:, None])  # (N, 1)
        ranks = ((lp > chosen_t).sum(-1) + 1).tolist()
        chosen = chosen_t[:, 0].tolist()
        k = min(max(tops[i] for i in group), vocab)
        top = lp.topk(k, dim=-1) if k > 0 else None
        top_v = top.values.tolist() if top is not None else None
        top_i = top.indices.tolist() if top is not None else None
        at = 0
        for i in group:
            w = tops[i]
            for t in range(1, lengths[i]):
                tok = prompts[i][t]
                alts = [] if top_i is None else list(zip(top_i[at][:w], top_v[at][:w], strict=True))
                entry = TokenLogprob(
                    tok, text(tok), chosen[at], [(a, text(a), v) for a, v in alts], ranks[at]
                )
                out[i].append(entry)
                at += 1
    return out


__all__ = ["LOGIT_BUDGET", "prompt_logprobs"]
