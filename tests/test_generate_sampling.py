"""Logits processors and sampling: known distributions, Hugging Face's processors as the reference."""

from __future__ import annotations

import pytest
import torch

from yuyan.errors import UserError
from yuyan.generate.sampling import (
    SamplingParams,
    apply_penalties,
    apply_temperature,
    logprobs_topk,
    min_p_mask,
    process,
    sample,
    stack_params,
    top_k_mask,
    top_p_mask,
)


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_top_k_known():
    x = _logits([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]])
    out = top_k_mask(x, torch.tensor([2, 0, 1]))
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True] * 4, [True] * 4]  # ties kept
    assert torch.equal(out[1], x[1])


def test_top_p_known():
    x = _logits([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]])
    out = top_p_mask(x, torch.tensor([0.5, 0.7, 0.35, 1.0]))
    # 0.4 alone < 0.5 -> needs 0.3 too; 0.7 reached by {0.4, 0.3}; 0.35 by 0.4 alone; 1.0 keeps all
    assert torch.isfinite(out).tolist() == [
        [False, True, False, True],
        [False, True, False, True],
        [False, True, False, False],
        [True] * 4,
    ]


def test_min_p_known():
    x = _logits([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]])
    out = min_p_mask(x, torch.tensor([0.45, 0.0]))  # threshold 0.18: keeps 0.4, 0.2, 0.3
    assert torch.isfinite(out).tolist() == [[False, True, True, True], [True] * 4]


def test_masks_match_transformers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    x = torch.randn(3, 50) * 3
    ids = torch.randint(0, 50, (3, 7))
    for k in (1, 5, 17):
        assert torch.equal(top_k_mask(x, torch.full((3,), k)), TopKLogitsWarper(k)(ids, x.clone()))
    for p in (0.05, 0.5, 0.9):
        assert torch.equal(top_p_mask(x, torch.full((3,), p)), TopPLogitsWarper(p)(ids, x.clone()))
    for p in (0.01, 0.2, 0.7):
        assert torch.equal(min_p_mask(x, torch.full((3,), p)), MinPLogitsWarper(p)(ids, x.clone()))
    assert torch.allclose(
        apply_temperature(x, torch.full((3,), 0.7)), TemperatureLogitsWarper(0.7)(ids, x.clone())
    )
    counts = torch.zeros(3, 50).scatter_add_(1, ids, torch.ones(3, 7))
    ours = apply_penalties(x, counts, torch.full((3,), 1.3), torch.zeros(3), torch.zeros(3))
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone()))


def test_penalties_known():
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    out = apply_penalties(x, counts, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # token 0: 2/2 - 0.5*2 - 0.25 = -0.25; token 1: -2*2 - 0.5 - 0.25 = -4.75; others unchanged
    assert torch.allclose(out, torch.tensor([[-0.25, -4.75, 1.0, 0.5]]))
    prompt = torch.tensor([[False, False, True, False]])
    out = apply_penalties(x, torch.zeros(1, 4), torch.tensor([2.0]), torch.zeros(1), torch.zeros(1), prompt)
    assert torch.allclose(out, torch.tensor([[2.0, -2.0, 0.5, 0.5]]))


def test_mixed_rows_and_greedy_identity():
    torch.manual_seed(1)
    x = torch.randn(4, 100)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_k=5, seed=1),
        SamplingParams(top_p=0.5, seed=2),
        SamplingParams(temperature=0, repetition_penalty=1.0),
    ]
    st = stack_params(params)
    out = process(x, st, torch.zeros(4, 100))
    tok = sample(out, st.greedy, st.generators)
    assert tok[0] == x[0].argmax() and tok[3] == x[3].argmax()
    assert tok[1] in x[1].topk(5).indices
    # greedy-only batch is exactly argmax of the untouched logits
    st0 = stack_params([SamplingParams(temperature=0)] * 4)
    assert torch.equal(process(x, st0, torch.zeros(4, 100)), x)
    assert torch.equal(sample(x, st0.greedy, st0.generators), x.argmax(-1))


def test_seeds_reproducible_and_independent_of_batch():
    torch.manual_seed(2)
    x = torch.randn(3, 1000)
    a = stack_params([SamplingParams(seed=7), SamplingParams(seed=8), SamplingParams(temperature=0)])
    b = stack_params([SamplingParams(seed=7)])
    draws_a = [sample(x, a.greedy, a.generators)[0].item() for _ in range(20)]
    draws_b = [sample(x[:1], b.greedy, b.generators)[0].item() for _ in range(20)]
    assert draws_a == draws_b and len(set(draws_a)) > 1


def test_sampling_follows_distribution():
    x = _logits([[0.1, 0.6, 0.3]])
    st = stack_params([SamplingParams(seed=0)])
    draws = torch.stack([sample(x, st.greedy, st.generators) for _ in range(3000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.04)


def test_logprobs_topk():
    x = _logits([[0.1, 0.6, 0.3]])
    lp, vals, ids = logprobs_topk(x, 2)
    assert ids.tolist() == [[1, 2]] and torch.allclose(vals.exp(), torch.tensor([[0.6, 0.3]]))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(1))


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(n=0),
        dict(min_p=1.5),
        dict(min_p=-0.1),
        dict(repetition_penalty=0.0),
        dict(temperature=float("nan")),
    ],
)
def test_invalid_settings_raise(kw):
    with pytest.raises(UserError, match="invalid sampling setting"):
        SamplingParams(**kw).validate()
