"""Hugging Face import/export against transformers itself: logits, greedy continuations, round trips, errors.

Tiny random HF models (GPT-2, Llama with GQA and llama3 rope scaling, Qwen2 with qkv bias and MQA) are
built from configs and saved with save_pretrained into tmp folders; nothing is downloaded.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import tiny_config
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import yuyan
from yuyan.errors import UserError
from yuyan.model.checkpoint import load_checkpoint, save_checkpoint
from yuyan.model.hf import download, export_hf, load_hf
from yuyan.model.transformer import Transformer

# initializer_range 0.2 spreads the logits so greedy choices are far from ties
_SMALL = dict(initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def hf_model(arch: str, vocab: int):
    torch.manual_seed(1)
    if arch == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, **_SMALL)
        )
    llama = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **_SMALL,
    )
    if arch == "llama":  # GQA, Llama-3 rope with scaling, head_dim given explicitly
        return LlamaForCausalLM(
            LlamaConfig(
                **llama,
                num_key_value_heads=2,
                head_dim=8,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )
        )
    return Qwen2ForCausalLM(
        Qwen2Config(**llama, num_key_value_heads=1, tie_word_embeddings=True)
    )  # MQA, qkv bias


def _randomize_vectors(m: torch.nn.Module) -> None:
    # HF initialises biases to 0 and norm weights to 1; random values make them count in the comparison
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                was_norm = bool((p == 1).all())
                p.normal_(0.0, 0.3).add_(1.0 if was_norm else 0.0)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer):
    out = {}
    for arch in ("gpt2", "llama", "qwen2"):
        m = hf_model(arch, tokenizer.vocab_size).eval()
        _randomize_vectors(m)
        d = tmp_path_factory.mktemp(arch)
        m.save_pretrained(d)
        tokenizer.save(d)
        out[arch] = (d, m)
    return out


def _greedy(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The plain no-cache oracle: re-run the whole sequence for each new token."""
    x = prompt
    for _ in range(n):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@torch.no_grad()
def test_import_parity_logits_and_greedy(hf_dirs, tokenizer, arch):
    folder, ref = hf_dirs[arch]
    lm = load_hf(folder)
    assert lm.model.config.vocab_size == tokenizer.vocab_size and lm.meta["hf_model_type"] == arch
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tokenizer.vocab_size, (4, 24), generator=g)
    ours, theirs = lm.model(x), ref(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = x[:2, :8]
    want = ref.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32, pad_token_id=0
    )
    got = _greedy(lm.model, prompt, 32)
    assert torch.equal(got, want)


@torch.no_grad()
def test_sharded_safetensors_and_pytorch_bin(hf_dirs, tmp_path, tokenizer):
    folder, ref = hf_dirs["gpt2"]
    x = torch.randint(0, tokenizer.vocab_size, (2, 16))
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="20KB")
    tokenizer.save(sharded)
    assert (sharded / "model.safetensors.index.json").exists() and not (
        sharded / "model.safetensors"
    ).exists()
    assert (load_hf(sharded).model(x) - ref(x).logits).abs().max() < 1e-4

    folder, ref = hf_dirs["llama"]
    binary = tmp_path / "bin"
    binary.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (binary / name).write_bytes((folder / name).read_bytes())
    torch.save({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}, binary / "pytorch_model.bin")
    lm = load_hf(binary)
    # bf16 file: our float32 weights are exactly the bf16 values
    assert torch.equal(
        lm.model.layers[0].self_attn.k_proj.weight,
        ref.model.layers[0].self_attn.k_proj.weight.to(torch.bfloat16).float(),
    )


@pytest.mark.parametrize("variant", ["gpt2", "gpt2-untied", "llama", "llama-tied-mqa-rope-scaled", "qwen2"])
def test_round_trip_ours_to_hf_to_ours(tmp_path, tokenizer, variant):
    kw = {
        "gpt2-untied": dict(tie_embeddings=False),
        "qwen2": dict(qkv_bias=True),
        "llama-tied-mqa-rope-scaled": dict(
            tie_embeddings=True,
            n_kv_head=1,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    }.get(variant, {})
    torch.manual_seed(0)
    model = Transformer(
        tiny_config(variant.split("-")[0].replace("qwen2", "llama"), tokenizer.vocab_size, **kw)
    )
    _randomize_vectors(model)
    model.eval()
    out = export_hf(model, tokenizer, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == variant.split("-")[0]
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, tokenizer.vocab_size, (3, 40))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() < 1e-4
    back = load_hf(out).model
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.lm_head_weight_tied() == model.lm_head_weight_tied()


def test_exported_tokenizer_matches_ours(tmp_path, tokenizer, tiny_model):
    export_hf(tiny_model, tokenizer, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["def f(x):\n\treturn x  # 注释\r\n", "语言模型 😀 café", "<|endoftext|>a<|user|>", ""]:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        assert hf_tok.decode(tokenizer.encode(text)) == text
    assert hf_tok.eos_token_id == tokenizer.eot_id and hf_tok.pad_token_id == tokenizer.pad_id
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]
    ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer.apply_chat_template(msgs)[0]


# ------------------------------------------------------------------------------------------------ errors


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unsupported_architecture(hf_dirs, tmp_path):
    d = _copy(hf_dirs["gpt2"][0], tmp_path / "bert")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(
        UserError, match=r"model_type 'bert' is not supported; supported: \[.*'gpt2', 'llama'"
    ):
        yuyan.load(d)


def test_missing_and_unexpected_tensors_are_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama"][0], tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(UserError) as e:
        load_hf(d)
    msg = str(e.value)
    assert "missing ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected ['model.layers.0.self_attn.extra.weight']" in msg and "\n" not in msg


def test_bad_folders_are_clear_errors(hf_dirs, tmp_path):
    d = _copy(hf_dirs["gpt2"][0], tmp_path / "notok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        load_hf(d)
    d = _copy(hf_dirs["gpt2"][0], tmp_path / "evilindex")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(UserError, match="outside the folder"):
        load_hf(d)
    d = _copy(hf_dirs["gpt2"][0], tmp_path / "badtype")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "n_embd": "32"}))
    with pytest.raises(UserError, match="n_embd = '32' should be int"):
        load_hf(d)
    d = _copy(hf_dirs["gpt2"][0], tmp_path / "shape")
    (d / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(UserError, match="fused outputs|shape mismatch"):
        load_hf(d)


def test_export_refuses_what_hf_cannot_express(tmp_path, tokenizer):
    odd = Transformer(tiny_config("gpt2", tokenizer.vocab_size, pos="rope"))
    with pytest.raises(UserError, match="no Hugging Face architecture expresses norm=layernorm, pos=rope"):
        export_hf(odd, tokenizer, tmp_path / "x")
    mqa_gpt2 = Transformer(tiny_config("gpt2", tokenizer.vocab_size, n_kv_head=1))
    with pytest.raises(UserError, match="n_kv_head = n_head"):
        export_hf(mqa_gpt2, tokenizer, tmp_path / "x")
    with pytest.raises(UserError, match="exports as HF 'gpt2', not 'llama'"):
        export_hf(
            Transformer(tiny_config("gpt2", tokenizer.vocab_size)), tokenizer, tmp_path / "x", family="llama"
        )
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ hf:NAME


def test_download_offline_and_missing_hub(monkeypatch, tmp_path, hf_dirs):
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    with pytest.raises(UserError, match=r"could not fetch hf:org/some-model .*HF_HUB_OFFLINE"):
        yuyan.load("hf:org/some-model")
    with pytest.raises(UserError, match="is not a model name"):
        download("../etc")
    calls = []

    def fake_snapshot(name, allow_patterns=None, **kw):
        calls.append((name, allow_patterns))
        return str(hf_dirs["gpt2"][0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    lm = yuyan.load("hf:openai-community/gpt2")
    assert lm.meta["hf_model_type"] == "gpt2"
    assert calls == [("openai-community/gpt2", ["*.safetensors", "*.json"])]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(UserError, match="needs huggingface_hub"):
        download("gpt2")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_convert_both_ways(run_cli, hf_dirs, tmp_path, tokenizer):
    folder, ref = hf_dirs["qwen2"]
    p = run_cli("convert", "from-hf", folder, tmp_path / "ours", check=True)
    assert "qwen2" in p.stdout
    lm = load_checkpoint(tmp_path / "ours")
    x = torch.randint(0, tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        assert (lm.model(x) - ref(x).logits).abs().max() < 1e-4
    run_cli("convert", "to-hf", tmp_path / "ours", tmp_path / "back", check=True)
    back = load_file(tmp_path / "back" / "model.safetensors")
    orig = load_file(folder / "model.safetensors")
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)


def _main_error(capsys, *argv: str) -> str:
    """Run the CLI in-process (saves a subprocess start) and return its one-line error."""
    from yuyan.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_cli_convert_errors(capsys, tmp_path, tokenizer):
    assert "not found" in _main_error(capsys, "convert", "from-hf", tmp_path / "nowhere", tmp_path / "x")
    ck = save_checkpoint(
        tmp_path / "rope-ln", Transformer(tiny_config("gpt2", tokenizer.vocab_size, pos="rope")), tokenizer
    )
    assert "no Hugging Face architecture" in _main_error(capsys, "convert", "to-hf", ck, tmp_path / "y")
