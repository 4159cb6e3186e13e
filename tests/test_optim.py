"""The optimizers: Muon's and AdamW's parameter groups cover every trainable parameter exactly once (GPT-2 and
Llama layouts, tied and untied embeddings, LoRA), the schedule drives both learning rates, Muon trains a tiny
model, a Muon run resumes bitwise, and Muon under FSDP is refused with one line."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_config

from yuyan.errors import UserError
from yuyan.model.lora import apply_lora
from yuyan.model.transformer import Transformer
from yuyan.train.optim import MuonAdamW, build_optimizer, set_lr

sys.path.insert(0, str(Path(__file__).parent))
import _train_worker as W  # noqa: E402


def _groups_by_kind(opt) -> tuple[list, list]:
    """(Muon's parameters, AdamW's parameters) of what build_optimizer returned."""
    if isinstance(opt, MuonAdamW):
        adamw, muon = opt.optimizers
        return [p for g in muon.param_groups for p in g["params"]], [
            p for g in adamw.param_groups for p in g["params"]
        ]
    return [], [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize(
    "kind", ["gpt2-tied", "gpt2-untied", "llama-untied", "llama-tied", "llama-qknorm-relu2", "lora"]
)
def test_muon_groups_cover_every_trainable_parameter_once(kind):
    family = "gpt2" if kind.startswith("gpt2") else "llama"
    kw = {"tie_embeddings": kind.endswith("-tied")} if "tied" in kind else {}
    if kind == "llama-qknorm-relu2":
        kw = {"qk_norm": True, "ffn": "relu2_mlp"}
    model = Transformer(tiny_config(family, **kw))
    if kind == "lora":
        apply_lora(model, rank=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"])
    opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95), optimizer="muon", muon_lr=0.02)
    muon, adamw = _groups_by_kind(opt)
    trainable = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in trainable) and len(set(grouped)) == len(grouped)
    assert sorted(id(p) for p in muon + adamw) == sorted(grouped)
    names = {id(p): n for n, p in model.named_parameters()}
    if kind == "lora":  # only adapters train; LoRA's low-rank factors stay with AdamW
        assert not isinstance(opt, MuonAdamW) and all("lora_" in names[id(p)] for p in adamw)
        return
    # Muon: exactly the attention and MLP projection matrices
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    want = {
        n for n, p in model.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in projections
    }
    assert {names[id(p)] for p in muon} == want and all(p.dim() == 2 for p in muon)
    # AdamW: embeddings, the head (when untied), norms (the QK-norms too) and biases
    adamw_names = {names[id(p)] for p in adamw}
    assert "embed_tokens.weight" in adamw_names
    assert ("lm_head.weight" in adamw_names) == (not model.lm_head_weight_tied())
    if kind == "llama-qknorm-relu2":
        assert "layers.0.self_attn.q_norm.weight" in adamw_names


def test_schedule_drives_both_learning_rates_and_muon_trains():
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", qk_norm=True))
    opt = build_optimizer(model, 3e-3, 0.0, (0.9, 0.95), optimizer="muon", muon_lr=0.02)
    set_lr(opt, 1.5e-3)  # half the peak: both optimizers at half their peaks
    adamw, muon = opt.optimizers
    assert all(g["lr"] == pytest.approx(1.5e-3) for g in adamw.param_groups)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    x = torch.randint(0, 64, (8, 16))  # a fixed batch: the loss must fall well below its start
    first = None
    for _ in range(15):
        loss = model(x[:, :-1], targets=x[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < first - 1.0, (first, loss.item())


def test_muon_state_dict_round_trips_into_a_fresh_optimizer():
    torch.manual_seed(0)
    model = Transformer(tiny_config("gpt2"))
    opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95), optimizer="muon")
    x = torch.randint(0, 64, (4, 9))
    model(x[:, :-1], targets=x[:, 1:]).backward()
    opt.step()
    sd = opt.state_dict()
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert sorted(sd["state"]) == list(range(n))  # torch's layout: one numbering across both optimizers
    fresh = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95), optimizer="muon")
    fresh.load_state_dict(sd)
    for a, b in zip(fresh.optimizers, opt.optimizers, strict=True):
        for p in a.state:
            assert all(torch.equal(a.state[p][k], b.state[p][k]) for k in b.state[p])
    plain = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95))
    with pytest.raises(ValueError, match="another train.optimizer"):
        fresh.load_state_dict(plain.state_dict())


def test_muon_run_resumes_bitwise(tmp_path):
    ov = {
        "train.optimizer": "muon",
        "train.max_steps": "20",
        "checkpoint.every_steps": "5",
        "eval.every": "0",
        "dropout": "0",
    }
    W.run(str(tmp_path / "ref"), ov)
    run = tmp_path / "run"
    W.run(str(run), ov)
    # back to step 15: the last checkpoint and the end of the run removed, then resumed to step 20
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-00000020")
    assert W.run(str(run), ov, resume=True)["step"] == 20
    a, b = (
        load_file(str(run / "final" / "model.safetensors")),
        load_file(str(tmp_path / "ref/final/model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and Muon changed the result: an AdamW run of the same length ends elsewhere
    W.run(str(tmp_path / "adamw"), {**ov, "train.optimizer": "adamw"})
    c = load_file(str(tmp_path / "adamw/final/model.safetensors"))
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], c["layers.0.self_attn.q_proj.weight"])


def test_muon_with_fsdp_is_refused_in_one_line():
    from yuyan.config import apply_overrides
    from yuyan.train import TrainConfig

    cfg = apply_overrides(TrainConfig(), {"train.optimizer": "muon", "distributed": "fsdp"})
    with pytest.raises(UserError, match="muon is not supported with distributed = fsdp"):
        cfg.validate()
    apply_overrides(TrainConfig(), {"train.optimizer": "muon", "distributed": "ddp"}).validate()


def test_muon_under_ddp_matches_one_process(tmp_path):
    # DDP hands the optimizer whole tensors (gradients all-reduced), so Muon runs as in one process
    import json
    import os
    import socket
    import subprocess

    one = {"train.optimizer": "muon", "train.batch_size": "8", "train.max_steps": "8", "dropout": "0"}
    one["eval.every"] = "4"
    W.run(str(tmp_path / "one"), one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = str(Path(__file__).parent / "_train_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port)]
    cmd += [worker, str(tmp_path / "two"), json.dumps({**one, "train.batch_size": "4"})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) < 1e-3


@pytest.mark.parametrize(("first", "then"), [("adamw", "muon"), ("muon", "adamw")])
def test_resume_with_another_optimizer_is_refused(tmp_path, first, then):
    ov = {"train.max_steps": "6", "checkpoint.every_steps": "3", "eval.every": "0"}
    W.run(str(tmp_path), {**ov, "train.optimizer": first})
    shutil.rmtree(tmp_path / "final")
    with pytest.raises(UserError, match="resume with the same optimizer"):
        W.run(str(tmp_path), {**ov, "train.optimizer": then}, resume=True)


def test_resume_applies_this_runs_optimizer_settings_and_says_so(tmp_path, capsys):
    """A changed train.muon_lr (or weight decay) on resume takes effect, as a changed lr does through the
    schedule, and the run names it; it used to be silently replaced by the checkpoint's."""
    ov = {
        "train.optimizer": "muon",
        "train.max_steps": "6",
        "checkpoint.every_steps": "3",
        "eval.every": "0",
        "dropout": "0",
    }
    W.run(str(tmp_path / "a"), ov)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for d in ("a", "b"):
        shutil.rmtree(tmp_path / d / "final")
        shutil.rmtree(tmp_path / d / "checkpoints" / "step-00000006")
    W.run(str(tmp_path / "a"), ov, resume=True)
    capsys.readouterr()
    W.run(str(tmp_path / "b"), {**ov, "train.muon_lr": "0.05"}, resume=True)
    assert "muon lr_scale" in capsys.readouterr().err
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("a", "b"))
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], b["layers.0.self_attn.q_proj.weight"])


def _muon_pair(ns_dtype):
    """Two copies of one matrix with the same gradients: torch's Muon on one, ours on the other."""
    from yuyan.train.optim import Muon

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 16))
    v = torch.nn.Parameter(w.detach().clone())
    ref = torch.optim.Muon([w], lr=0.02, weight_decay=0.1)
    ours = Muon([v], lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)
    return w, v, ref, ours


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_our_muon_is_torchs_update_with_the_iterations_in_its_dtype(ns_dtype):
    """bf16: torch's own step, bitwise. fp32: the same update (momentum, Nesterov, the lr scale for a tall
    matrix, weight decay) within bf16's rounding of the iteration, and exactly an explicit fp32 formula."""
    from yuyan.train.optim import newton_schulz

    w, v, ref, ours = _muon_pair(ns_dtype)
    buf = torch.zeros_like(w)
    expect = w.detach().clone()
    for step in range(3):
        g = torch.randn(48, 16, generator=torch.Generator().manual_seed(step))
        w.grad, v.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        buf.lerp_(g, 0.05)
        upd = g.lerp(buf, 0.95)
        x = upd.T / upd.T.norm()  # the wide orientation, spectral norm at most 1, then 5 quintic steps
        for _ in range(5):
            a = x @ x.T
            x = 3.4445 * x + (-4.775 * a + 2.0315 * a @ a) @ x
        expect = expect * (1 - 0.02 * 0.1) - 0.02 * (48 / 16) ** 0.5 * x.T
        assert torch.equal(ours.state[v]["momentum_buffer"], ref.state[w]["momentum_buffer"])
    if ns_dtype == torch.bfloat16:
        assert torch.equal(v, w)
    else:
        torch.testing.assert_close(v.detach(), expect, rtol=1e-4, atol=1e-5)
        assert (v - w).abs().max() < 0.02 * 3**0.5 * 3 * 0.05  # bf16's iterations round at ~1e-2 of an update
        assert not torch.equal(v, w)
        g = torch.randn(16, 48)
        assert newton_schulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32).dtype == torch.float32


def test_newton_schulz_precision_follows_the_measurement(monkeypatch):
    """build_optimizer takes the format the timed Gram matmul picks (cached per machine), or the one given,
    and says why; the loop prints it and a resumed run keeps it."""
    import yuyan.model.precision as P
    from yuyan.train.optim import describe_optimizer

    model = Transformer(tiny_config("gpt2"))
    for fp32, bf16, want in ((60.0, 1.0, torch.float32), (100.0, 1000.0, torch.bfloat16)):
        monkeypatch.setattr(P, "measure", lambda m, k, n, *a, _f=(fp32, bf16), **kw: _f)
        opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95), optimizer="muon")
        assert opt.optimizers[1].ns_dtype == want
        d = describe_optimizer(opt)
        assert d["name"] == "muon + adamw" and "newton-schulz" in d["newton_schulz"]["reason"]
    opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95), optimizer="muon", newton_schulz="fp32")
    assert opt.optimizers[1].ns_dtype == torch.float32 and opt.newton_schulz.reason == "requested"
    assert describe_optimizer(build_optimizer(model, 3e-3, 0.1, (0.9, 0.95))) == {"name": "adamw"}
