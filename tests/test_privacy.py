"""DP training (yuyan.train.privacy): per-example gradients against an explicit loop, the epsilon against
Opacus' own accountant, LoRA + DP changing only the adapters, and the refusals."""

from __future__ import annotations

import json

import opacus  # the `privacy` extra (make venv installs it)
import pytest
import torch

from conftest import tiny_config
from yuyan.data.tasks import IGNORE
from yuyan.errors import UserError
from yuyan.model.checkpoint import save_checkpoint
from yuyan.model.lora import LoRAConfig
from yuyan.model.transformer import Transformer
from yuyan.train.config import TrainConfig
from yuyan.train.finetune import FinetuneOptions, default_train_config, finetune
from yuyan.train.privacy import per_example_loss


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # LayerNorm + tied embeddings; RMSNorm + untied
def test_per_example_gradients_match_an_explicit_loop(family):
    torch.manual_seed(0)
    m = Transformer(tiny_config(family, dropout=0.0)).train()
    B, T = 4, 12
    x, y = torch.randint(0, 512, (B, T)), torch.randint(0, 512, (B, T))
    y[1, :5] = IGNORE  # examples with different numbers of counted tokens
    ref: dict[str, list[torch.Tensor]] = {}
    for i in range(B):  # one example at a time: its own gradient
        m.zero_grad()
        per_example_loss(m, {"input_ids": x[i : i + 1], "labels": y[i : i + 1]}).backward()
        for n, p in m.named_parameters():
            ref.setdefault(n, []).append(p.grad.clone())
    gsm = opacus.GradSampleModule(m, loss_reduction="mean", strict=False)
    m.zero_grad()
    per_example_loss(m, {"input_ids": x, "labels": y}).backward()
    names = [n for n, _ in m.named_parameters()]
    assert any("layernorm" in n for n in names) and "norm.weight" in names
    for n, p in m.named_parameters():
        want = torch.stack(ref[n])
        assert p.grad_sample.shape == want.shape, n
        torch.testing.assert_close(p.grad_sample, want, atol=1e-6, rtol=1e-4, msg=n)
    gsm._close()


def _sft_data(path, n=64):
    rows = [{"prompt": f"add {i} and {i + 1}:", "completion": f" {2 * i + 1}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(steps=12, **privacy) -> TrainConfig:
    cfg = default_train_config()
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.warmup, cfg.train.device = steps, 8, 2, "cpu"
    cfg.train.lr, cfg.train.log_every = 1e-2, 4
    cfg.eval.every, cfg.checkpoint.every_minutes = 0, 0.0
    for k, v in privacy.items():
        setattr(cfg.privacy, k, v)
    return cfg


def test_dp_finetune_reports_the_accountants_epsilon(tmp_path, tokenizer):
    from opacus.accountants import RDPAccountant

    base = save_checkpoint(tmp_path / "base", Transformer(tiny_config("llama")), tokenizer)
    data = _sft_data(tmp_path / "d.jsonl")
    cfg = _cfg(steps=12, epsilon=4.0, delta=1e-3)
    res = finetune(base, tmp_path / "out", FinetuneOptions(task="sft", data=str(data)), cfg, quiet=True)
    pr = res["privacy"]
    assert pr["steps"] == 12 and pr["sampling"] == "poisson" and pr["unit"] == "SFT example"
    n_train = pr["examples"]
    assert pr["sample_rate"] == pytest.approx(8 / n_train)
    acc = RDPAccountant()  # independently: the same noise, sample rate and steps
    acc.history = [(pr["noise_multiplier"], 8 / n_train, 12)]
    want = acc.get_epsilon(delta=1e-3)
    assert pr["epsilon"] == pytest.approx(want, rel=1e-9)
    assert want == pytest.approx(4.0, rel=0.02)  # calibrated to the target over max_steps
    meta = json.loads((tmp_path / "out" / "final" / "config.json").read_text())["meta"]
    assert meta["privacy"]["epsilon"] == pytest.approx(want, rel=1e-9)
    rows = [json.loads(r) for r in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows if r.get("split") == "train"]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(want, rel=1e-9)


def test_lora_dp_changes_only_the_adapters(tmp_path, tokenizer):
    torch.manual_seed(1)
    model = Transformer(tiny_config("gpt2"))
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    data = _sft_data(tmp_path / "d.jsonl")
    cfg = _cfg(steps=6, epsilon=8.0)
    base = save_checkpoint(tmp_path / "base", model, tokenizer)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    res = finetune(
        base, tmp_path / "out", FinetuneOptions(task="sft", data=str(data), lora=lora), cfg, quiet=True
    )
    assert res["privacy"]["steps"] == 6 and res["trainable_params"] < res["total_params"] / 5
    # the trained module itself: the trainer state holds it (base weights and adapters)
    tstate = torch.load(
        next((tmp_path / "out" / "checkpoints").iterdir()) / "trainer_state.pt", weights_only=True
    )
    trained = tstate["model"]
    changed = {k for k, v in trained.items() if k in base_sd and not torch.equal(v, base_sd[k])}
    assert changed == set(), f"base weights moved: {sorted(changed)[:3]}"
    lora_b = [k for k in trained if "lora_B" in k]  # initialised to zero: nonzero means trained
    assert lora_b and all(trained[k].abs().sum() > 0 for k in lora_b)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"epsilon": 0.0}, "privacy.epsilon (--dp-epsilon) must be > 0"),
        ({"epsilon": -1.0}, "privacy.epsilon (--dp-epsilon) must be > 0"),
        ({"epsilon": 8.0, "delta": 1.0}, "privacy.delta (--dp-delta) must be in (0, 1)"),
        ({"epsilon": 8.0, "max_grad_norm": 0.0}, "privacy.max_grad_norm"),
    ],
)
def test_bad_privacy_settings_are_one_clear_error(setting, message):
    cfg = _cfg(**setting)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate()


def test_dp_refuses_what_it_cannot_honour():
    cfg = _cfg(epsilon=8.0)
    cfg.train.grad_accum = 2
    with pytest.raises(UserError, match="grad_accum 1"):
        cfg.validate()
    cfg = _cfg(epsilon=8.0)
    cfg.distributed = "ddp"
    with pytest.raises(UserError, match="one process"):
        cfg.validate()
