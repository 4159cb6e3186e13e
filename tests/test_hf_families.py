"""Today's open families against transformers itself: Qwen3, Phi-3, OLMo 2, SmolLM3, Gemma 2, Gemma 3.

Each is a tiny random model built by transformers from a config (4 layers, GQA, a sliding window of 8 tokens
on the families that have one, so windows bind on 24-token inputs and 40-token generations) and saved with
save_pretrained; nothing is downloaded. Import: logits within 1e-4 (fp32) and greedy continuations equal to
transformers' `generate`, through our plain no-cache forward and through the decode core with its KV cache.
Export: the folder written from the imported model is the same family, transformers opens it, its logits
match, and importing it again gives the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tests.test_hf import _greedy, _randomize_vectors

from yuyan.generate import GenerationConfig, generate
from yuyan.model.hf import export_hf, load_hf

WINDOW = 8
BASE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LOCAL = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]

# model_type -> (config class, model class, config keywords, what our config must show)
FAMILIES = {
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
        dict(qk_norm=True, sliding_window=WINDOW, local_layers=[2, 3]),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW), dict(sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, dict(norm_placement="post", qk_norm_scope="proj")),
    "smollm3": (
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        dict(no_rope_layer_interval=2),
        dict(nope_layers=[1, 3]),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # caps small enough to bind on these activations
        dict(
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=3.0,
        ),
        dict(norm_placement="sandwich", attn_softcap=4.0, logit_softcap=3.0, local_layers=[0, 2]),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            sliding_window=WINDOW,
            layer_types=LOCAL,
            query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
        dict(qk_norm=True, local_rope_theta=10_000.0, local_layers=[0, 2, 3], embed_scale=True),
    ),
    # the larger Gemma 3 models scale their global layers' positions linearly (factor 8), not the local ones'
    "gemma3_text-linear": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            sliding_window=WINDOW,
            layer_types=LOCAL,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
        dict(rope_scaling={"rope_type": "linear", "factor": 8.0}, local_rope_theta=10_000.0),
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory, tokenizer):
    name = request.param
    config_cls, model_cls, kw, _ = FAMILIES[name]
    torch.manual_seed(1)
    config = getattr(transformers, config_cls)(vocab_size=tokenizer.vocab_size, **BASE, **kw)
    config._attn_implementation = "eager"
    name = name.split("-")[0]  # the model_type
    ref = getattr(transformers, model_cls)(config).eval()
    _randomize_vectors(ref)
    d = tmp_path_factory.mktemp(name)
    ref.save_pretrained(d)
    tokenizer.save(d)
    return request.param, d, ref


@torch.no_grad()
def test_import_parity_logits_and_greedy(family_dir, tokenizer):
    name, folder, ref = family_dir
    lm = load_hf(folder)
    cfg = lm.model.config
    for key, want in FAMILIES[name][3].items():
        assert getattr(cfg, key) == want, key
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tokenizer.vocab_size, (3, 24), generator=g)
    diff = (lm.model(x) - ref(x).logits).abs().max().item()
    print(f"{name}: max |logits diff| {diff:.2e}")
    assert diff < 1e-4
    prompt = x[:2, :8]
    want = ref.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32, pad_token_id=0
    )
    assert torch.equal(_greedy(lm.model, prompt, 32), want)  # the no-cache oracle
    cached = generate(
        lm.model,
        None,
        prompt.tolist(),
        GenerationConfig.from_dict(dict(max_new_tokens=32, temperature=0, stop_token_ids=[])),
    )
    assert [c[0].token_ids for c in cached] == want[:, 8:].tolist()  # the decode core, KV cache and all


@torch.no_grad()
def test_export_round_trip(family_dir, tokenizer, tmp_path):
    name, folder, ref = family_dir
    lm = load_hf(folder)
    out = export_hf(lm, None, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == name.split("-")[0]
    back_ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (back_ref(x).logits - ref(x).logits).abs().max().item() < 1e-4
    a, b = lm.model.state_dict(), load_hf(out).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the exported tensors are named as transformers names them for the family
    from safetensors.torch import load_file

    assert set(load_file(out / "model.safetensors")) == set(load_file(folder / "model.safetensors"))
