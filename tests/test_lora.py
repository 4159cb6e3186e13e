"""LoRA: adapter-only gradients, a frozen base, exact merge, zero-init no-op, base checkpoints load unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import tiny_config

from yuyan.errors import UserError
from yuyan.model.checkpoint import load_checkpoint, save_checkpoint
from yuyan.model.lora import (
    ALL_LINEAR,
    LoRALinear,
    apply_lora,
    count_params,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from yuyan.model.transformer import Transformer


def _model(family: str, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(family, **kw))


def _train_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 512, (2, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def test_only_adapters_train_and_base_is_bitwise_unchanged(family):
    model = _model(family)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, targets=ALL_LINEAR)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    x = torch.randint(0, 512, (2, 12))
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    model.zero_grad()
    _train_steps(model)
    after = model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), f"base tensor {k} changed"
    assert any(
        not torch.equal(v, torch.zeros_like(v)) for k, v in lora_state_dict(model).items() if "lora_B" in k
    )
    n_train, n_total = count_params(model)
    assert n_train == sum(v.numel() for v in lora_state_dict(model).values()) and n_train < n_total


def test_zero_initialised_adapter_is_a_no_op(family):
    model = _model(family).eval()
    x = torch.randint(0, 512, (2, 10))
    ref = model(x)
    apply_lora(model, rank=8, alpha=16, targets=ALL_LINEAR)
    assert torch.equal(model(x), ref)


def test_merge_matches_unmerged_and_w_plus_ba(family):
    model = _model(family)
    apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    _train_steps(model, steps=4)
    model.eval()
    x = torch.randint(0, 512, (3, 20))
    unmerged = model(x)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear)
    expected_w = q.weight + q.scaling * q.lora_B.weight @ q.lora_A.weight  # the reference W + (alpha/r) B A
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model.layers[0].self_attn.q_proj.weight, expected_w, atol=1e-6)
    merged = model(x)
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert set(model.state_dict()) == set(_model(family).state_dict())


def test_base_checkpoint_loads_into_lora_model(tmp_path, tokenizer, family):
    base = _model(family, vocab_size=tokenizer.vocab_size)
    ckpt = save_checkpoint(tmp_path / "base", base, tokenizer)
    torch.manual_seed(123)  # different base weights: equal outputs below prove the load
    fresh = apply_lora(
        Transformer(tiny_config(family, vocab_size=tokenizer.vocab_size)), rank=2, targets=["q_proj"]
    )
    from safetensors.torch import load_file

    result = fresh.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    assert result.unexpected_keys == []
    # only the adapters are missing (and the tied lm_head, which the checkpoint stores once as the embedding)
    assert set(result.missing_keys) - {"lm_head.weight"} == set(lora_state_dict(fresh))
    x = torch.randint(0, tokenizer.vocab_size, (1, 9))
    assert torch.allclose(fresh.eval()(x), base.eval()(x), atol=1e-6)


def test_adapter_save_load_roundtrip_and_merged_checkpoint(tmp_path, tokenizer):
    model = _model("llama", vocab_size=tokenizer.vocab_size)
    base_sd = copy.deepcopy(model.state_dict())
    apply_lora(model, rank=4, alpha=4, targets=["q_proj", "v_proj"])
    _train_steps(model)
    model.eval()
    x = torch.randint(0, tokenizer.vocab_size, (2, 11))
    ref = model(x)
    out = save_adapter(model, tmp_path / "adapter", base_model="base")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    other = _model("llama", vocab_size=tokenizer.vocab_size)
    other.load_state_dict(base_sd)
    load_adapter(other, out)
    assert torch.allclose(other.eval()(x), ref, atol=1e-6)
    merge_lora(other)
    ck = load_checkpoint(save_checkpoint(tmp_path / "merged", other, tokenizer))
    assert (ck.model(x) - ref).abs().max().item() < 1e-5
    with pytest.raises(UserError, match="does not fit"):
        load_adapter(_model("gpt2", vocab_size=tokenizer.vocab_size), out)


def test_bad_targets_are_clear():
    with pytest.raises(UserError, match="no linear layer matches"):
        apply_lora(_model("gpt2"), targets=["qkv"])
    with pytest.raises(UserError, match="lm_head"):
        apply_lora(_model("gpt2"), targets=["lm_head"])
    with pytest.raises(UserError, match="rank"):
        apply_lora(_model("gpt2"), rank=0)


def test_lora_on_a_switched_model_is_a_no_op_then_merges_exactly():
    """QK-norm, the ReLU² MLP and soft-capped logits leave LoRA as it is: a fresh adapter changes nothing,
    the merged model equals the unmerged one, and the QK-norm gains stay frozen."""
    model = _model("llama", qk_norm=True, ffn="relu2_mlp", logit_softcap=2.0).eval()
    x = torch.randint(0, 512, (2, 12))
    ref = model(x)
    apply_lora(model, rank=4, alpha=8, targets=ALL_LINEAR)
    assert torch.equal(model(x), ref)
    assert not model.layers[0].self_attn.q_norm.weight.requires_grad
    model.train()
    _train_steps(model, steps=3)
    model.eval()
    unmerged = model(x)
    assert (unmerged - ref).abs().max().item() > 1e-4  # the adapters trained
    merge_lora(model)
    assert (model(x) - unmerged).abs().max().item() < 1e-5
