"""Checkpoint save/load, and hostile or damaged files (issue 9 item 2): each is refused with one clear
UserError line, never runs code, never allocates unbounded memory; a kill between the two renames of an
atomic write leaves a loadable checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import resource

import pytest
import torch
from tests.conftest import tiny_config

import yuyan
import yuyan.model.checkpoint as ckpt_mod
from yuyan.errors import UserError
from yuyan.model.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from yuyan.model.hf import export_hf, load_hf
from yuyan.model.transformer import Transformer


class Evil:
    """Unpickling this runs code: it creates `marker`. The loaders must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _model(family="gpt2", vocab=512, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_config(family, vocab, **kw))


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **changes}))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg and e.type is UserError
    return msg


def test_save_load_round_trip(tmp_path, tokenizer, family):
    model = _model(family, tokenizer.vocab_size)
    head = torch.randn(3, 32)
    p = save_checkpoint(
        tmp_path / "c",
        model,
        tokenizer,
        meta={"step": 7},
        extra_tensors={"head": head},
        trainer_state={"step": 7, "rng": torch.get_rng_state()},
        state={"step": 7},
        generation_config={"temperature": 0.5},
    )
    assert sorted(f.name for f in p.iterdir()) == [
        "config.json",
        "generation_config.json",
        "manifest.json",
        "model.safetensors",
        "state.json",
        "tokenizer.json",
        "trainer_state.pt",
    ]
    lm = yuyan.load(p)
    a, b = model.state_dict(), lm.model.state_dict()
    assert (
        all(torch.equal(a[k], b[k]) for k in a)
        and lm.model.lm_head_weight_tied() == model.lm_head_weight_tied()
    )
    assert lm.meta == {"step": 7} and torch.equal(lm.extra_tensors["head"], head)
    assert lm.tokenizer.to_str() == tokenizer.to_str()
    assert load_trainer_state(p)["step"] == 7
    assert not list(tmp_path.glob(".c.*"))  # no temp or old folder left behind


# ------------------------------------------------------------------------------------------------ pickles


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_running_pickles_never_run(tmp_path, tokenizer):
    live = tmp_path / "proof-the-payload-works"
    pickle.loads(pickle.dumps(Evil(live)))  # an ordinary unpickle runs it ...
    assert live.exists()

    marker = tmp_path / "pwned"
    hf = export_hf(_model("llama", tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    (hf / "manifest.json").unlink()
    (hf / "model.safetensors").unlink()
    for name, write in [
        ("torch.save", lambda f: torch.save({"w": Evil(marker)}, f)),
        ("raw pickle", lambda f: f.write_bytes(pickle.dumps({"w": Evil(marker)}))),
    ]:
        write(hf / "pytorch_model.bin")
        with pytest.raises(UserError) as e:
            yuyan.load(hf)
        assert "refused by the safe (weights-only) loader" in _one_line(e), name
        assert not marker.exists(), name  # ... ours never does

    ck = save_checkpoint(tmp_path / "c", _model(), tokenizer, trainer_state={"step": 1})
    torch.save({"optimizer": Evil(marker)}, ck / "trainer_state.pt")
    with pytest.raises(UserError) as e:
        load_trainer_state(ck)
    assert "cannot be loaded safely" in _one_line(e)
    assert not marker.exists()


def test_cli_refuses_pickle_without_traceback(run_cli, tmp_path, tokenizer):
    marker = tmp_path / "pwned"
    hf = export_hf(_model("gpt2", tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    (hf / "manifest.json").unlink()
    (hf / "model.safetensors").unlink()
    torch.save({"w": Evil(marker)}, hf / "pytorch_model.bin")
    p = run_cli("convert", "from-hf", hf, tmp_path / "out")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr and "weights-only" in p.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ damage


@pytest.mark.parametrize("damage", ["truncate", "bitflip-data"])
def test_damaged_safetensors_caught_by_manifest(tmp_path, tokenizer, damage):
    p = save_checkpoint(tmp_path / "c", _model(), tokenizer)
    f = p / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0x10  # one bit of one weight: only the checksum can see this
    f.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        yuyan.load(p)
    assert "does not match its checksum" in _one_line(e)


@pytest.mark.parametrize("damage", ["truncate", "bitflip-header"])
def test_damaged_safetensors_without_manifest(tmp_path, tokenizer, damage):
    p = save_checkpoint(tmp_path / "c", _model(), tokenizer)
    (p / "manifest.json").unlink()  # as in a folder made by hand or by another tool
    f = p / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 1000]
    else:
        data[8] ^= 0x01  # the header's opening "{" becomes "z": not JSON
    f.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        yuyan.load(p)
    assert "model.safetensors is corrupt or truncated" in _one_line(e)
    hf = export_hf(_model(), tokenizer, tmp_path / "hf")  # the HF import path says the same
    (hf / "manifest.json").unlink()
    (hf / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="is corrupt or truncated"):
        load_hf(hf)


def test_corrupt_manifest(tmp_path, tokenizer):
    p = save_checkpoint(tmp_path / "c", _model(), tokenizer)
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        yuyan.load(p)
    assert "manifest.json is corrupt" in _one_line(e)


def test_tokenizer_json_that_is_not_json(tmp_path, tokenizer):
    p = save_checkpoint(tmp_path / "c", _model(), tokenizer)
    (p / "tokenizer.json").write_text("this is not JSON {")
    with pytest.raises(UserError, match="does not match its checksum"):
        yuyan.load(p)
    (p / "manifest.json").unlink()
    with pytest.raises(UserError) as e:
        yuyan.load(p)
    assert "is not a valid tokenizer.json" in _one_line(e)


def test_tokenizer_larger_than_model(tmp_path, tokenizer):
    p = save_checkpoint(tmp_path / "c", _model(vocab=300), tokenizer)
    with pytest.raises(UserError) as e:
        yuyan.load(p)
    assert f"has {tokenizer.vocab_size} tokens but the model only 300" in _one_line(e)


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        (dict(d_model=64), "shape mismatch"),
        (dict(n_layer=3), "missing"),
        (dict(n_layer=1), "unexpected"),
        (dict(vocab_size="big"), "sizes must be positive integers"),
        (dict(n_embd=3), "unknown model config keys"),
    ],
)
def test_config_that_does_not_match_weights(tmp_path, tokenizer, change, msg):
    p = save_checkpoint(tmp_path / "c", _model(vocab=tokenizer.vocab_size), tokenizer)
    (p / "manifest.json").unlink()
    _edit_json(p / "config.json", **change)
    with pytest.raises(UserError) as e:
        yuyan.load(p)
    assert msg in _one_line(e)


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_absurd_config_refused_before_allocation(tmp_path, tokenizer, monkeypatch, kind):
    m = _model(vocab=tokenizer.vocab_size)
    if kind == "ours":
        p = save_checkpoint(tmp_path / "c", m, tokenizer)
        (p / "manifest.json").unlink()
        _edit_json(p / "config.json", vocab_size=10**12)
    else:
        p = export_hf(m, tokenizer, tmp_path / "hf")
        (p / "manifest.json").unlink()
        _edit_json(p / "config.json", vocab_size=10**12)

    def no_build(*a, **k):
        raise AssertionError("the model was built (even on meta) for an absurd config")

    monkeypatch.setattr(ckpt_mod, "Transformer", no_build)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError) as e:
        yuyan.load(p)
    assert "parameters" in _one_line(e) and "corrupt or absurd" in str(e.value)
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000
    )  # KiB: nothing large allocated
    # very deep but thin: few parameters, yet millions of modules to build; refused by the layer limit
    _edit_json(p / "config.json", vocab_size=tokenizer.vocab_size, n_layer=10**7)
    with pytest.raises(UserError, match="layers"):
        yuyan.load(p)
    if kind == "ours":  # rotary positions have no parameters, but a KV cache would be sized from block_size
        _edit_json(p / "config.json", n_layer=2, pos="rope", block_size=10**9)
        with pytest.raises(UserError, match="context of 1000000000 positions"):
            yuyan.load(p)


# ------------------------------------------------------------------------------------------------ kills


def test_kill_between_the_two_renames_leaves_a_loadable_checkpoint(tmp_path, tokenizer, monkeypatch):
    first, second = _model(seed=0), _model(seed=1)
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, first, tokenizer, state={"step": 1})
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        if os.path.basename(src).startswith(".ckpt.tmp-"):  # the second rename: tmp -> dest
            raise KeyboardInterrupt("simulated kill")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(dest, second, tokenizer, state={"step": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert not dest.exists() and len(list(tmp_path.glob(".ckpt.old-*"))) == 1  # the state a kill leaves
    lm = yuyan.load(dest)  # recovers the whole previous checkpoint
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in lm.model.state_dict().items())
    assert json.loads((dest / "state.json").read_text()) == {"step": 1}
    assert not list(tmp_path.glob(".ckpt.*"))
    save_checkpoint(dest, second, tokenizer)  # and the next save works normally
    assert torch.equal(load_checkpoint(dest).model.norm.weight, second.norm.weight)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as e:
        yuyan.load(tmp_path / "nothing-here")
    assert "not found" in _one_line(e)
