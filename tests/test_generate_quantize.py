"""int8 weight-only quantisation: per-channel rounding, the kernel against a float reference, decoding."""

from __future__ import annotations

import torch
from tests.conftest import tiny_config

from yuyan.generate import GenerationConfig, generate
from yuyan.model.quantize import Int8Linear, quantize_int8
from yuyan.model.transformer import Transformer


def test_int8_linear_matches_dequantized_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin)
    w = lin.weight.detach()
    # per-channel symmetric rounding: error at most half a step of that row's scale
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.weight - w).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(3, 7, 64)
    ref = torch.nn.functional.linear(x, q.weight, lin.bias)
    y = q(x)
    assert y.shape == (3, 7, 48)
    # the CPU kernel also quantises activations (8 bits per call): relative error ~1%
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


def test_quantized_model_decodes_close_to_float(family):
    torch.manual_seed(0)
    model = Transformer(tiny_config(family)).eval()
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(idx).log_softmax(-1)
        quantize_int8(model)
        out = model(idx).log_softmax(-1)
    assert all(isinstance(m, Int8Linear) for m in (model.lm_head, model.layers[0].self_attn.q_proj))
    kl = (ref.exp() * (ref - out)).sum(-1).mean()
    assert kl < 1e-3
    got = generate(
        model,
        None,
        [[1, 2, 3]],
        GenerationConfig.from_dict(dict(max_new_tokens=5, temperature=0, stop_token_ids=[])),
    )
    assert len(got[0][0].token_ids) == 5
