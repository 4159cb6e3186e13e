"""Hugging Face interop: import a local HF model folder, export ours to one, download `hf:NAME`.

Import needs no transformers: config.json is mapped to our `ModelConfig` by one function per
`model_type` (gpt2, llama, qwen2, mistral, qwen3, phi3, olmo2, smollm3, gemma2, gemma3_text), and the weights
by one key table per family whose inverse is export. The families differ in our model by `ModelConfig`
switches (QK-norm and its scope, norm placement, (1 + w) norms, embedding scale, soft-capping, sliding-window
layers and their RoPE base, layers without RoPE), not by classes. Our parameter names already follow HF
Llama's (and OLMo 2's and Gemma's for their extra norms), so the Llama table is a prefix; GPT-2's table also
transposes Conv1D weights ((in, out) on disk) and splits the fused `c_attn` into q/k/v, and Phi-3's splits
its fused `qkv_proj` and `gate_up_proj`. Weights come from
model.safetensors, a sharded `*.index.json`, or pytorch_model.bin through `torch.load(weights_only=True)`
(never a full unpickle). Export writes config.json, model.safetensors, the tokenizer files and
generation_config.json atomically (a classifier adds its class names as id2label / label2id and its head as
classifier_head.safetensors, which import reads back), so `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` open the folder.

An export ends turns where `yuyan chat` and `yuyan serve` do: with our chat role tokens, `eos_token_id` in
config.json and generation_config.json lists both the end-of-turn token `<|end|>` and end-of-text (the
tokenizer's `chat_stop_ids`), so transformers' generate and chat pipeline, vLLM and TGI stop at the end of
the assistant's turn. The tokenizer config names its `eos_token` (end-of-turn for a model fine-tuned on
chats, `meta["task"] == "sft"`, as instruct models do; end-of-text otherwise, where documents end) and
lists the role markers as special tokens; its chat template renders what the server renders: `developer`
as `system`, content given as a list of text parts joined, tools, tool calls and tool results in the
format of apps/tools.py, any other role an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from yuyan.errors import UserError
from yuyan.model.checkpoint import (
    LanguageModel,
    atomic_write_dir,
    build_model,
    check_finite,
    check_tokenizer,
    read_config,
    unpickle_refusal,
    verify_manifest,
    write_json,
)
from yuyan.model.transformer import ModelConfig, Transformer
from yuyan.tokenizer import CALL_CLOSE, CALL_OPEN, CHAT_TOKENS, PAD, TOOLS_FOOTER, TOOLS_HEADER, Tokenizer

# --------------------------------------------------------------------------------------------- key tables


@dataclass(frozen=True)
class Key:
    """One HF tensor and the parameter(s) of ours it holds. `{i}` stands for the layer index."""

    hf: str
    ours: tuple[str, ...]  # more than one: HF fuses them along the output dimension (GPT-2's c_attn)
    conv1d: bool = False  # HF stores (in, out) (GPT-2's Conv1D); ours is nn.Linear's (out, in)


def _gpt2_table() -> list[Key]:
    h, ly = "transformer.h.{i}.", "layers.{i}."
    keys = [
        Key("transformer.wte.weight", ("embed_tokens.weight",)),
        Key("transformer.wpe.weight", ("embed_positions.weight",)),
    ]
    for w in ("weight", "bias"):
        keys += [
            Key(f"{h}ln_1.{w}", (f"{ly}input_layernorm.{w}",)),
            Key(f"{h}attn.c_attn.{w}", tuple(f"{ly}self_attn.{p}_proj.{w}" for p in "qkv"), w == "weight"),
            Key(f"{h}attn.c_proj.{w}", (f"{ly}self_attn.o_proj.{w}",), w == "weight"),
            Key(f"{h}ln_2.{w}", (f"{ly}post_attention_layernorm.{w}",)),
            Key(f"{h}mlp.c_fc.{w}", (f"{ly}mlp.up_proj.{w}",), w == "weight"),
            Key(f"{h}mlp.c_proj.{w}", (f"{ly}mlp.down_proj.{w}",), w == "weight"),
            Key(f"transformer.ln_f.{w}", (f"norm.{w}",)),
        ]
    return keys + [Key("lm_head.weight", ("lm_head.weight",))]


def _llama_table() -> list[Key]:
    # our names are HF Llama's without the "model." prefix; biases only exist when the config has them
    layer = [f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")]
    layer += [f"mlp.{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")]
    layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    # QK-norm (Qwen3, OLMo 2, Gemma 3) and the norms of the other placements (OLMo 2, Gemma 2/3)
    layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    layer += ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]
    keys = [Key("model.embed_tokens.weight", ("embed_tokens.weight",))]
    keys += [Key(f"model.layers.{{i}}.{n}", (f"layers.{{i}}.{n}",)) for n in layer]
    return keys + [Key("model.norm.weight", ("norm.weight",)), Key("lm_head.weight", ("lm_head.weight",))]


def _phi3_table() -> list[Key]:
    # Llama's, with q/k/v fused into qkv_proj and gate/up into gate_up_proj (split along the outputs)
    ly, ours = "model.layers.{i}.", "layers.{i}."
    fused = {
        f"{ly}self_attn.qkv_proj.weight": tuple(f"{ours}self_attn.{p}_proj.weight" for p in "qkv"),
        f"{ly}mlp.gate_up_proj.weight": (f"{ours}mlp.gate_proj.weight", f"{ours}mlp.up_proj.weight"),
    }
    inside = {n for names in fused.values() for n in names}
    keys = [k for k in _llama_table() if not set(k.ours) & inside]
    return keys + [Key(hf, names) for hf, names in fused.items()]


TABLES: dict[str, list[Key]] = {"gpt2": _gpt2_table(), "llama": _llama_table(), "phi3": _phi3_table()}
LLAMA_LIKE = ("llama", "qwen2", "mistral", "qwen3", "olmo2", "smollm3", "gemma2", "gemma3_text")
FAMILY = {"gpt2": "gpt2", "phi3": "phi3", **{t: "llama" for t in LLAMA_LIKE}}  # model_type -> key table
# tensors some HF files carry that are buffers, not weights: GPT-2's causal mask, old Llama's inv_freq
IGNORED = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


def _entries(table: list[Key], model: Transformer):
    """(hf name, our names, conv1d) for every table row this model has, layers expanded."""
    ours = model.state_dict()
    for key in table:
        layers = range(model.config.n_layer) if "{i}" in key.hf else [None]
        for i in layers:
            names = tuple(n.format(i=i) for n in key.ours)
            if all(n in ours for n in names):
                yield key.hf.format(i=i), names, key.conv1d


def _listing(label: str, names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{label} {names[:limit]}{more}" if names else ""


def hf_to_ours(sd: dict[str, torch.Tensor], model: Transformer, model_type: str, source: str) -> dict:
    """Map an HF state dict to ours (import); clear errors name missing and unexpected tensors."""
    table = TABLES[FAMILY[model_type]]
    prefix = "transformer." if FAMILY[model_type] == "gpt2" else "model."
    if not any(k.startswith(prefix) for k in sd):  # saved from the bare GPT2Model / LlamaModel
        sd = {(k if k == "lm_head.weight" else prefix + k): v for k, v in sd.items()}
    tied = model.lm_head_weight_tied()
    ours_sd = model.state_dict()
    out, used, missing = {}, set(), []
    for hf, names, conv1d in _entries(table, model):
        if tied and names == ("lm_head.weight",):
            used.add(hf)  # HF ties it to the embedding too; a stored copy is ignored like HF does
            continue
        if hf not in sd:
            missing.append(hf)
            continue
        if sd[hf].dim() != ours_sd[names[0]].dim():
            raise UserError(
                f"{source}: {hf} has shape {tuple(sd[hf].shape)}; config.json does not match the weights"
            )
        t = sd[hf].t() if conv1d else sd[hf]
        sizes = [ours_sd[n].shape[0] for n in names]
        if len(names) > 1 and t.shape[0] != sum(sizes):
            raise UserError(
                f"{source}: {hf} has shape {tuple(sd[hf].shape)}, the config implies {sum(sizes)} "
                "fused outputs: config.json does not match the weights"
            )
        out.update(zip(names, torch.split(t, sizes, dim=0) if len(names) > 1 else [t], strict=True))
        used.add(hf)
    unexpected = sorted(k for k in sd if k not in used and not IGNORED.search(k))
    if missing or unexpected:
        parts = [_listing("missing", missing), _listing("unexpected", unexpected)]
        raise UserError(
            f"weights in {source} do not fit a {model_type} model of its config.json: "
            + "; ".join(p for p in parts if p)
            + "; the folder is incomplete or from another model"
        )
    return out


def ours_to_hf(model: Transformer, family: str) -> dict[str, torch.Tensor]:
    """Our state dict in HF names (export): the inverse of `hf_to_ours`."""
    sd = model.state_dict()
    tied = model.lm_head_weight_tied()
    out = {}
    for hf, names, conv1d in _entries(TABLES[FAMILY[family]], model):
        if tied and names == ("lm_head.weight",):
            continue  # safetensors stores no aliases; HF ties it again from tie_word_embeddings
        t = torch.cat([sd[n] for n in names], dim=0) if len(names) > 1 else sd[names[0]]
        out[hf] = (t.t() if conv1d else t).detach().contiguous().cpu()
    return out


# --------------------------------------------------------------------------------------------- configs


class _Cfg:
    """config.json access with errors that say which key is missing or of the wrong type."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def __call__(self, key: str, default=..., kind: type = int):
        v = self.raw.get(key)
        if v is None:
            if default is ...:
                raise UserError(
                    f"{self.source}/config.json lacks {key!r}; the folder is not a complete HF model"
                )
            return default
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool) is not (kind is bool):
            raise UserError(f"{self.source}/config.json: {key} = {v!r} should be {kind.__name__}")
        return v


def _gpt2_config(c: _Cfg) -> dict:
    act = c("activation_function", "gelu_new", str)
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(
            f"{c.source}: GPT-2 activation {act!r} is not supported (only gelu_new, the tanh GELU)"
        )
    if c("scale_attn_by_inverse_layer_idx", False, bool) or not c("scale_attn_weights", True, bool):
        raise UserError(f"{c.source}: GPT-2 attention scaling variants are not supported")
    d = c("n_embd")
    return dict(
        vocab_size=c("vocab_size"),
        block_size=c("n_positions"),
        n_layer=c("n_layer"),
        n_head=c("n_head"),
        d_model=d,
        d_ff=c("n_inner", 4 * d),
        norm_eps=c("layer_norm_epsilon", 1e-5, float),
        tie_embeddings=c("tie_word_embeddings", True, bool),
    )


def _rope(c: _Cfg) -> dict:
    # transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters {"rope_theta", "rope_type", ...}
    params = c("rope_parameters", {}, dict) or c("rope_scaling", {}, dict)
    theta = c("rope_theta", None, float) or float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UserError(
            f"{c.source}: rope scaling {kind!r} is not supported (default, linear and llama3 are)"
        )
    scaling = None
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(params["factor"])}
    if kind == "llama3":
        scaling = {
            k: params[k]
            for k in (
                "rope_type",
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            )
            if k in params
        }
        scaling["rope_type"] = "llama3"
    return dict(rope_theta=theta, rope_scaling=scaling)


def _llama_config(c: _Cfg) -> dict:
    act = c("hidden_act", "silu", str)
    if act != "silu":
        raise UserError(
            f"{c.source}: hidden_act {act!r} is not supported for {c.raw.get('model_type')} (only silu)"
        )
    attn_bias, mlp_bias = c("attention_bias", False, bool), c("mlp_bias", False, bool)
    if attn_bias != mlp_bias:
        raise UserError(
            f"{c.source}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
            "(biases must be on all linear layers or on none)"
        )
    heads = c("num_attention_heads")
    return dict(
        vocab_size=c("vocab_size"),
        block_size=c("max_position_embeddings", 2048),
        n_layer=c("num_hidden_layers"),
        n_head=heads,
        n_kv_head=c("num_key_value_heads", heads),
        d_model=c("hidden_size"),
        d_ff=c("intermediate_size"),
        head_dim=c("head_dim", None),
        ffn="swiglu",
        norm="rmsnorm",
        norm_eps=c("rms_norm_eps", 1e-6, float),
        pos="rope",
        bias=attn_bias,
        tie_embeddings=c("tie_word_embeddings", False, bool),
        **_rope(c),
    )


def _windows(c: _Cfg, default: Callable[[int], bool]) -> dict:
    """The sliding-window layers: config.json's `layer_types` where it has them (transformers 5 writes
    them), else the family's rule `default(layer)`; nothing without a `sliding_window`."""
    n, win = c("num_hidden_layers"), c("sliding_window", None)
    types = c("layer_types", None, list)
    if types is not None and len(types) != n:
        raise UserError(f"{c.source}/config.json: layer_types has {len(types)} entries for {n} layers")
    local = [i for i in range(n) if (types[i] == "sliding_attention" if types is not None else default(i))]
    if win is None or not local:
        return {}
    return dict(sliding_window=win, local_layers=None if len(local) == n else local)


def _qwen2_config(c: _Cfg) -> dict:
    # Qwen2: Llama with biases on q/k/v only; its window (when used) on the layers from max_window_layers on
    on, start = c("use_sliding_window", False, bool), c("max_window_layers", 0)
    return {**_llama_config(c), "bias": False, "qkv_bias": True, **_windows(c, lambda i: on and i >= start)}


def _mistral_config(c: _Cfg) -> dict:
    return {**_llama_config(c), **_windows(c, lambda i: True)}


def _qwen3_config(c: _Cfg) -> dict:
    # Qwen3: Llama with RMSNorm over each head's q and k before RoPE
    if c("attention_bias", False, bool):
        raise UserError(f"{c.source}: Qwen3 with attention_bias is not supported (biases on attention only)")
    on, start = c("use_sliding_window", False, bool), c("max_window_layers", 0)
    return {**_llama_config(c), "qk_norm": True, **_windows(c, lambda i: on and i >= start)}


def _phi3_config(c: _Cfg) -> dict:
    # Phi-3: Llama with fused projections (split by the key table), full rotary, a window on every layer
    rope = c("rope_parameters", {}, dict) or c("rope_scaling", {}, dict)
    if float(rope.get("partial_rotary_factor", c("partial_rotary_factor", 1.0, float))) != 1.0:
        raise UserError(f"{c.source}: Phi-3 with partial_rotary_factor != 1 is not supported")
    return {**_llama_config(c), **_windows(c, lambda i: True)}


def _olmo2_config(c: _Cfg) -> dict:
    # OLMo 2: norms after attention and MLP (none before), RMSNorm over the whole q and k projections
    return {**_llama_config(c), "norm_placement": "post", "qk_norm": True, "qk_norm_scope": "proj"}


def _smollm3_config(c: _Cfg) -> dict:
    # SmolLM3: Llama where no_rope_layers[i] == 0 marks a layer without RoPE (every 4th by default)
    n, every = c("num_hidden_layers"), c("no_rope_layer_interval", 4)
    use = c("no_rope_layers", None, list) or [int((i + 1) % every != 0) for i in range(n)]
    if len(use) != n:
        raise UserError(f"{c.source}/config.json: no_rope_layers has {len(use)} entries for {n} layers")
    on = c("use_sliding_window", False, bool)
    nope = [i for i, r in enumerate(use) if not r]
    return {**_llama_config(c), "nope_layers": nope or None, **_windows(c, lambda i: on and not use[i])}


def _gemma_config(c: _Cfg, pattern: int) -> dict:
    """Gemma 2 / 3: (1 + w) RMSNorms before and after each sublayer, embeddings times sqrt(d_model), the
    tanh-GELU gated MLP, scores scaled by query_pre_attn_scalar, sliding-window layers (every `pattern`th
    layer global)."""
    act = c("hidden_activation", None, str) or c("hidden_act", "gelu_pytorch_tanh", str)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"{c.source}: Gemma activation {act!r} is not supported (only gelu_pytorch_tanh)")
    if c("use_bidirectional_attention", False, bool):
        raise UserError(f"{c.source}: Gemma with bidirectional attention is not a causal language model")
    base = _llama_config(
        _Cfg(
            {**c.raw, "hidden_act": "silu", "tie_word_embeddings": c("tie_word_embeddings", True, bool)},
            c.source,
        )
    )
    return {
        **base,
        "ffn": "geglu",
        "norm_placement": "sandwich",
        "norm_offset": True,
        "embed_scale": True,
        "attn_scale": c(
            "query_pre_attn_scalar", base["head_dim"] or base["d_model"] // base["n_head"], float
        ),
        "attn_softcap": c("attn_logit_softcapping", None, float),
        "logit_softcap": c("final_logit_softcapping", None, float),
        **_windows(c, lambda i: bool((i + 1) % pattern)),
    }


def _gemma2_config(c: _Cfg) -> dict:
    return _gemma_config(c, 2)


def _gemma3_config(c: _Cfg) -> dict:
    # Gemma 3 adds per-head QK-norm and a second RoPE base for the local layers; rope_parameters per layer
    # type (transformers 5) or rope_theta + rope_local_base_freq (4.x)
    params = c("rope_parameters", {}, dict)
    full, local = params.get("full_attention", {}), params.get("sliding_attention", {})
    if not params:  # 4.x: rope_scaling (linear, on the global layers) beside rope_theta
        full = {**c("rope_scaling", {}, dict), "rope_theta": c("rope_theta", 1_000_000.0, float)}
    if local.get("rope_type", "default") != "default":
        raise UserError(f"{c.source}: Gemma 3 local rope scaling {local.get('rope_type')!r} is not supported")
    local_theta = local.get("rope_theta", c("rope_local_base_freq", 10_000.0, float))
    plain = {k: v for k, v in c.raw.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    cfg = _gemma_config(_Cfg({**plain, "rope_parameters": full}, c.source), c("sliding_window_pattern", 6))
    return {**cfg, "qk_norm": True, "local_rope_theta": float(local_theta)}


CONFIG_FROM_HF: dict[str, Callable[[_Cfg], dict]] = {
    "gpt2": _gpt2_config,
    "llama": _llama_config,
    "qwen2": _qwen2_config,
    "mistral": _mistral_config,
    "qwen3": _qwen3_config,
    "phi3": _phi3_config,
    "olmo2": _olmo2_config,
    "smollm3": _smollm3_config,
    "gemma2": _gemma2_config,
    "gemma3_text": _gemma3_config,
}


def hf_config_to_ours(raw: dict, source: str = "model") -> ModelConfig:
    mt = raw.get("model_type")
    if mt not in CONFIG_FROM_HF:
        raise UserError(f"{source}: model_type {mt!r} is not supported; supported: {sorted(CONFIG_FROM_HF)}")
    try:
        return ModelConfig(**CONFIG_FROM_HF[mt](_Cfg(raw, source)))
    except (TypeError, ValueError, ArithmeticError) as e:
        raise UserError(f"{source}/config.json: {e}") from None


# --------------------------------------------------------------------------------------------- import


def _safe_name(folder: Path, name: object, index: Path) -> Path:
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise UserError(f"{index} names shard {name!r} outside the folder; the index is corrupt or hostile")
    return folder / name


def _load_torch_bin(f: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap needs the zip format of torch.save; files from torch < 1.6 are plain (restricted) pickles
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
    except Exception as e:  # UnpicklingError for code-running pickles, RuntimeError for bad zips
        raise UserError(
            f"{f} was refused by the safe (weights-only) loader ({unpickle_refusal(e)}); "
            "it is corrupt or carries code: use a model.safetensors copy"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{f} does not hold a flat dict of tensors; it is not a Hugging Face weights file")
    return sd


def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{f} is corrupt or truncated ({str(e)[:160]}); download or copy it again") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: safetensors (single or sharded) first, else pytorch_model.bin."""
    for single, index, loader in (
        ("model.safetensors", "model.safetensors.index.json", _load_safetensors),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", _load_torch_bin),
    ):
        if (folder / single).exists():
            return loader(folder / single)
        if (folder / index).exists():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(
                    f"{folder / index} is not a valid shard index (JSON with a weight_map)"
                ) from None
            sd: dict[str, torch.Tensor] = {}
            for name in shards:
                shard = _safe_name(folder, name, folder / index)
                if not shard.exists():
                    raise UserError(
                        f"{folder} lacks shard {name} listed in {index}; the download is incomplete"
                    )
                sd.update(loader(shard))
            return sd
    raise UserError(f"{folder} has no weights (model.safetensors, its sharded index, or pytorch_model.bin)")


def load_hf(folder: str | os.PathLike, device: torch.device | str | None = None) -> LanguageModel:
    """Open a Hugging Face model folder (any model_type of CONFIG_FROM_HF) as our model, in float32."""
    p = Path(folder)
    if not p.is_dir():
        raise UserError(
            f"model folder {p} not found: pass a Hugging Face folder with config.json, or hf:NAME"
        )
    verify_manifest(p)  # folders we exported carry one
    raw = read_config(p)
    if raw.get("format") == "yuyan":
        raise UserError(f"{p} is already a yuyan checkpoint; open it with yuyan.load or `convert to-hf` it")
    cfg = hf_config_to_ours(raw, str(p))
    if not (p / "tokenizer.json").exists():
        raise UserError(
            f"{p} has no tokenizer.json (only a slow tokenizer?): re-save it with "
            "transformers' AutoTokenizer.from_pretrained(dir).save_pretrained(dir), then retry"
        )
    tokenizer = Tokenizer.load(p)
    check_tokenizer(tokenizer, cfg, str(p))
    model = build_model(cfg, device)
    sd = hf_to_ours(read_hf_weights(p), model, raw["model_type"], str(p))
    bad = sorted(
        f"{k} {tuple(v.shape)} vs config {tuple(model.state_dict()[k].shape)}"
        for k, v in sd.items()
        if tuple(v.shape) != tuple(model.state_dict()[k].shape)
    )
    if bad:
        raise UserError(f"weights in {p} do not fit its config.json: shape mismatch {bad[:4]}")
    check_finite(sd, str(p))
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)  # copies, converting fp16/bf16 files to float32
    model.eval()
    head_meta, head = classifier_head_from_hf(p, raw)
    check_finite(head, str(p))
    meta = {"source": "huggingface", "hf_model_type": raw["model_type"], **head_meta}
    gen = p / "generation_config.json"
    if gen.exists():
        with contextlib.suppress(ValueError, AttributeError):  # optional; a broken one does not stop the load
            meta["generation_config"] = {
                k: v for k, v in json.loads(gen.read_text(encoding="utf-8")).items() if k in GENERATION_KEYS
            }
    return LanguageModel(model, tokenizer, p, meta, head)


GENERATION_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "max_new_tokens",
)


# --------------------------------------------------------------------------------------------- export


def _odd_switches(c: ModelConfig, allowed: set[str]) -> list[str]:
    """The family-specific switches this config turns on, outside `allowed`."""
    on = {
        "qk_norm": c.qk_norm,
        "qk_norm_scope=proj": c.qk_norm and c.qk_norm_scope == "proj",
        "logit_softcap": c.logit_softcap is not None,
        "attn_softcap": c.attn_softcap is not None,
        "attn_scale": c.attn_scale is not None,
        "norm_offset": c.norm_offset,
        "embed_scale": c.embed_scale,
        f"norm_placement={c.norm_placement}": c.norm_placement != "pre",
        "sliding_window": c.sliding_window is not None,
        "local_layers": c.local_layers is not None,
        "local_rope_theta": c.local_rope_theta is not None,
        "nope_layers": bool(c.nope_layers),
        "ffn=relu2_mlp": c.ffn == "relu2_mlp",
    }
    return [k for k, v in on.items() if v and k not in allowed]


def hf_family(config: ModelConfig) -> str:
    """The HF model_type that expresses this config exactly, or a clear error naming what none can."""
    c = config
    if c.norm == "layernorm" and c.pos == "learned" and c.ffn == "gelu_mlp":
        odd = _odd_switches(c, set())
        if odd:
            raise UserError(f"HF gpt2 has none of {', '.join(odd)}; export a model trained without them")
        if c.bias and c.qkv_bias and c.n_kv_head == c.n_head and c.head_dim * c.n_head == c.d_model:
            return "gpt2"
        raise UserError(
            "a GPT-2-style model needs biases everywhere, n_kv_head = n_head and head_dim = "
            "d_model / n_head to export as HF gpt2; this config differs"
        )
    if c.norm != "rmsnorm" or c.pos != "rope" or c.ffn not in ("swiglu", "geglu"):
        raise UserError(
            f"no Hugging Face architecture expresses norm={c.norm}, pos={c.pos}, ffn={c.ffn}: export needs "
            "layernorm+learned+gelu_mlp (gpt2) or rmsnorm+rope with swiglu (llama, qwen2, qwen3, mistral, "
            "phi3, olmo2, smollm3) or geglu (gemma2, gemma3_text)"
        )
    window = {"sliding_window", "local_layers"}
    gemma = {"norm_offset", "embed_scale", "norm_placement=sandwich", "attn_scale", "logit_softcap"} | window
    # (family, the switches it expresses, whether it needs qk_norm, biases (all, qkv) it allows)
    candidates = [
        ("gemma3_text", gemma | {"qk_norm", "local_rope_theta"}, "geglu", True, False),
        ("gemma2", gemma | {"attn_softcap"}, "geglu", False, False),
        ("olmo2", {"qk_norm", "qk_norm_scope=proj", "norm_placement=post"}, "swiglu", True, False),
        ("qwen3", {"qk_norm"} | window, "swiglu", True, False),
        ("smollm3", {"nope_layers"} | window, "swiglu", False, False),
        ("qwen2", window, "swiglu", False, "qkv"),
        ("llama", set(), "swiglu", False, True),
        ("mistral", {"sliding_window"}, "swiglu", False, False),
    ]
    for family, allowed, ffn, qk, biases in candidates:
        if c.ffn != ffn or qk != c.qk_norm or _odd_switches(c, allowed):
            continue
        if family == "gemma2" and not (c.norm_offset and c.embed_scale and c.norm_placement == "sandwich"):
            continue
        if family == "gemma3_text" and not (
            c.norm_offset and c.embed_scale and c.norm_placement == "sandwich"
        ):
            continue
        if family == "olmo2" and (c.norm_placement != "post" or c.qk_norm_scope != "proj"):
            continue
        if family == "smollm3" and not c.nope_layers:
            continue
        bias_ok = {
            False: not c.bias and not c.qkv_bias,
            "qkv": c.qkv_bias and not c.bias,
            True: c.qkv_bias == c.bias,
        }[biases]
        if bias_ok:
            return family
    odd = _odd_switches(c, set())
    raise UserError(
        f"no Hugging Face architecture expresses this combination (ffn={c.ffn}, bias={c.bias}, "
        f"qkv_bias={c.qkv_bias}{', ' + ', '.join(odd) if odd else ''}); see `yuyan.model.hf.hf_family` for "
        "the families and their switches"
    )


def _int_if_whole(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def _layer_types(c: ModelConfig) -> list[str]:
    return ["sliding_attention" if c.is_local(i) else "full_attention" for i in range(c.n_layer)]


def _chat_model(tokenizer: Tokenizer) -> bool:
    return len(tokenizer.chat_ids) == len(CHAT_TOKENS)


def eos_ids(tokenizer: Tokenizer, chat: bool = False) -> int | list[int] | None:
    """`eos_token_id` for an export: every token that ends a reply in `yuyan chat` (end-of-turn and
    end-of-text), the tokenizer config's eos_token first; one id when there is one."""
    ids = list(tokenizer.chat_stop_ids) if _chat_model(tokenizer) else [tokenizer.eot_id]
    ids = [i for i in ids if i is not None]
    if not chat:
        ids.sort(key=lambda i: i != tokenizer.eot_id)  # end-of-text first
    return ids[0] if len(ids) == 1 else (ids or None)


def ours_config_to_hf(
    c: ModelConfig,
    family: str,
    tokenizer: Tokenizer,
    model_dtype: torch.dtype = torch.float32,
    chat: bool = False,
) -> dict:
    dtype = str(model_dtype).removeprefix("torch.")
    ids = dict(
        bos_token_id=tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id,
        eos_token_id=eos_ids(tokenizer, chat),
        pad_token_id=tokenizer.pad_id,
    )
    if family == "gpt2":
        return dict(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            vocab_size=c.vocab_size,
            n_positions=c.block_size,
            n_embd=c.d_model,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.d_ff,
            activation_function="gelu_new",
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
            layer_norm_epsilon=c.norm_eps,
            initializer_range=0.02,
            scale_attn_weights=True,
            tie_word_embeddings=c.tie_embeddings,
            torch_dtype=dtype,
            **ids,
        )
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "phi3": "Phi3ForCausalLM",
        "olmo2": "Olmo2ForCausalLM",
        "smollm3": "SmolLM3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM",
    }[family]
    out = dict(
        architectures=[arch],
        model_type=family,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.block_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim,
        hidden_act="silu",
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        rope_scaling=c.rope_scaling,
        attention_dropout=c.dropout,
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=0.02,
        torch_dtype=dtype,
        **ids,
    )
    windowed = c.sliding_window is not None
    if family == "llama":
        out.update(attention_bias=c.bias, mlp_bias=c.bias)
    elif family in ("qwen2", "qwen3"):
        # the window on the layers from max_window_layers on; layer_types says exactly which
        local = [i for i in range(c.n_layer) if c.is_local(i)]
        out.update(
            use_sliding_window=windowed,
            sliding_window=c.sliding_window,
            max_window_layers=local[0] if windowed else c.n_layer,
            layer_types=_layer_types(c),
        )
        if family == "qwen3":
            out.update(attention_bias=False)
    elif family in ("mistral", "phi3"):
        out.update(sliding_window=c.sliding_window)
    elif family == "olmo2":
        out.update(attention_bias=False)
    elif family == "smollm3":
        nope = set(c.nope_layers or [])
        out.update(
            no_rope_layers=[int(i not in nope) for i in range(c.n_layer)],
            use_sliding_window=windowed,
            sliding_window=c.sliding_window,
            layer_types=_layer_types(c),
            attention_bias=False,
            mlp_bias=False,
        )
    elif family in ("gemma2", "gemma3_text"):
        del out["hidden_act"]
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=_int_if_whole(c.attn_scale or c.head_dim),  # transformers wants an int
            attn_logit_softcapping=c.attn_softcap,
            final_logit_softcapping=c.logit_softcap,
            sliding_window=c.sliding_window,
            layer_types=_layer_types(c),
            attention_bias=False,
        )
        if family == "gemma3_text":
            local_theta = c.local_rope_theta or c.rope_theta
            out.update(
                rope_local_base_freq=local_theta,  # transformers 4.x; 5.x reads rope_parameters
                rope_scaling=c.rope_scaling,
                rope_parameters={
                    "full_attention": {
                        "rope_type": "default",
                        "rope_theta": c.rope_theta,
                        **(c.rope_scaling or {}),
                    },
                    "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                },
            )
    return out


# The ids the server's chat route builds (serve/protocol.py chat_messages, then Tokenizer.apply_chat_template):
# <|role|>content<|end|> per message, then <|assistant|>; developer turns are system ones, OpenAI content parts
# are joined, and tools go the way apps/tools.py renders them: their JSON in the system turn between the
# tools header and footer, an assistant's calls as <tool_call> JSON lines after its text, consecutive tool
# results in one user turn as <tool_response> blocks. `tojson` is transformers' (json.dumps, ensure_ascii
# off), the server's json.dumps; string arguments of a call are written as given (the server re-dumps them).
_TEMPLATE = """
{%- set header = HEADER -%}{%- set footer = FOOTER -%}
{%- if tools -%}
  {%- set ns = namespace(tools='') -%}
  {%- for t in tools -%}{%- set ns.tools = ns.tools ~ ('' if loop.first else '\\n') ~ (t | tojson) -%}{%- endfor -%}
  {%- set tools_text = header ~ ns.tools ~ footer -%}
{%- endif -%}
{%- for m in messages -%}
  {%- set role = 'system' if m['role'] == 'developer' else m['role'] -%}
  {%- if role not in ['system', 'user', 'assistant', 'tool'] -%}
    {{- raise_exception('chat roles are system, developer, user, assistant and tool, not ' ~ m['role']) -}}
  {%- endif -%}
  {%- if m['content'] is not defined or m['content'] is none -%}{%- set text = '' -%}
  {%- elif m['content'] is string -%}{%- set text = m['content'] -%}
  {%- else -%}{%- set text = m['content'] | map(attribute='text') | join('') -%}{%- endif -%}
  {%- if tools and loop.first -%}
    {%- if role == 'system' -%}{%- set text = text ~ '\\n\\n' ~ tools_text -%}
    {%- else -%}{{- '<|system|>' ~ tools_text ~ '<|end|>' -}}{%- endif -%}
  {%- endif -%}
  {%- if role == 'tool' -%}
    {%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|user|>' -}}{%- else -%}{{- '\\n' -}}{%- endif -%}
    {{- '<tool_response>\\n' ~ text ~ '\\n</tool_response>' -}}
    {%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|end|>' -}}{%- endif -%}
  {%- else -%}
    {%- set calls = namespace(text=text) -%}
    {%- for c in (m['tool_calls'] if m['tool_calls'] is defined and m['tool_calls'] else []) -%}
      {%- set f = c['function'] if c['function'] is defined else c -%}
      {%- set args = f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) -%}
      {%- set call = CALL_OPEN ~ '\\n{"name": ' ~ (f['name'] | tojson) ~ ', "arguments": ' ~ args
                  ~ '}\\n' ~ CALL_CLOSE -%}
      {%- set calls.text = (calls.text ~ '\\n' if calls.text else '') ~ call -%}
    {%- endfor -%}
    {{- '<|' ~ role ~ '|>' ~ calls.text ~ '<|end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}
"""


def chat_template() -> str:
    """The exported chat template (Jinja, as transformers runs it); see the comment above."""
    consts = {
        "HEADER": TOOLS_HEADER,
        "FOOTER": TOOLS_FOOTER,
        "CALL_OPEN": CALL_OPEN,
        "CALL_CLOSE": CALL_CLOSE,
    }
    out = _TEMPLATE.strip()
    for name, value in consts.items():  # as Jinja string literals (JSON escapes are Jinja's too)
        out = out.replace(name, json.dumps(value))
    return out


def _chat_template(tokenizer: Tokenizer) -> str | None:
    return chat_template() if _chat_model(tokenizer) else None


def _tokenizer_files(tokenizer: Tokenizer, block_size: int, chat: bool = False) -> tuple[dict, dict]:
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    inv = {i: t for t, i in vocab.items()}
    eos = eos_ids(tokenizer, chat)
    special = {}
    for role, i in (
        ("bos_token", tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id),
        ("eos_token", eos[0] if isinstance(eos, list) else eos),
        ("pad_token", tokenizer.pad_id),
    ):
        if i is not None:
            special[role] = inv[i]
    if tokenizer.token_to_id(PAD) is None and tokenizer.eot_id is not None:
        special["pad_token"] = inv[tokenizer.eot_id]  # never the end-of-turn token: padding is not a turn
    if _chat_model(tokenizer):
        special["additional_special_tokens"] = list(
            CHAT_TOKENS
        )  # never split, dropped by skip_special_tokens
    if tokenizer.token_to_id("<unk>") is not None:
        special["unk_token"] = "<unk>"
    cfg = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=block_size,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
        **special,
    )
    template = _chat_template(tokenizer)
    if template:
        cfg["chat_template"] = template
    return cfg, special


# A classifier's head beside the causal LM: HF's *ForSequenceClassification heads have no bias and pool
# the last non-pad token of an input without our end-of-text token, so ours is not theirs; its tensors go
# in their own file and its class names in config.json's id2label / label2id, which transformers reads.
CLASSIFIER_HEAD_FILE = "classifier_head.safetensors"


def classifier_head_to_hf(lm: LanguageModel) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(config.json keys, head tensors) of a classifier checkpoint (meta task classify), else None."""
    if lm.meta.get("task") != "classify" or "score.weight" not in lm.extra_tensors:
        return None
    labels = [str(x) for x in lm.meta["labels"]]
    keys = {
        "id2label": {str(i): lab for i, lab in enumerate(labels)},
        "label2id": {lab: i for i, lab in enumerate(labels)},
        "yuyan_classifier": {
            "pooling": lm.meta.get("pooling", "last"),
            "file": CLASSIFIER_HEAD_FILE,
            **({"label_values": lm.meta["label_values"]} if "label_values" in lm.meta else {}),
        },
    }
    tensors = {
        k: v.detach().contiguous().cpu() for k, v in lm.extra_tensors.items() if k.startswith("score.")
    }
    return keys, tensors


def classifier_head_from_hf(folder: Path, raw: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, extra tensors) of the classifier head an export wrote (classifier_head_to_hf); ({}, {})
    when the folder has none. The class names come from config.json's id2label."""
    spec = raw.get("yuyan_classifier")
    if not isinstance(spec, dict):
        return {}, {}
    f = folder / CLASSIFIER_HEAD_FILE
    id2label = raw.get("id2label")
    if not f.is_file() or not isinstance(id2label, dict):
        raise UserError(
            f"{folder}/config.json describes a classifier head but {CLASSIFIER_HEAD_FILE} or id2label is "
            "missing; export the classifier again with `yuyan convert to-hf`"
        )
    try:
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except ValueError:
        raise UserError(f"{folder}/config.json: id2label keys must be class numbers 0..K-1") from None
    try:
        tensors = load_file(str(f))
    except SafetensorError as e:
        raise UserError(f"{f} is not a readable safetensors file ({e})") from None
    meta = {"task": "classify", "labels": labels, "pooling": spec.get("pooling", "last")}
    if isinstance(spec.get("label_values"), list):
        meta["label_values"] = [str(v) for v in spec["label_values"]]
    return meta, tensors


def export_hf(
    lm_or_model: LanguageModel | Transformer,
    tokenizer: Tokenizer | None,
    out_dir: str | os.PathLike,
    family: str | None = None,
    force: bool = False,
) -> Path:
    """Write a Hugging Face folder (config, model.safetensors, tokenizer, generation config) atomically.
    A LanguageModel fine-tuned on chats (`meta["task"] == "sft"`) gets end-of-turn as its eos_token.

    The folder follows the safe-output rule (yuyan.fsutil): never the model's own folder (or inside or
    around it), and a non-empty folder that is not ours only with `force`."""
    sources: tuple = ()
    if isinstance(lm_or_model, LanguageModel):
        model, tokenizer = lm_or_model.model, tokenizer or lm_or_model.tokenizer
        sources = (lm_or_model.path,)
    else:
        model = lm_or_model
    if tokenizer is None:
        raise UserError("export_hf needs the model's tokenizer (pass a LanguageModel or a Tokenizer)")
    auto = hf_family(model.config)
    # Phi-3 computes what Llama (or Mistral, with a window) does, its projections fused: an explicit choice,
    # or where the model came from
    came = lm_or_model.meta.get("hf_model_type") if isinstance(lm_or_model, LanguageModel) else None
    phi3_ok = auto in ("llama", "mistral") and not model.config.bias and model.config.local_layers is None
    if phi3_ok and (family == "phi3" or (family is None and came == "phi3")):
        auto = "phi3"
    if family is not None and family != auto:
        raise UserError(
            f"this model exports as HF {auto!r}, not {family!r}: its config fixes the architecture"
        )
    kind = (model.config.rope_scaling or {}).get("rope_type")
    if kind and not (auto == "llama" or (auto == "gemma3_text" and kind == "linear")):
        raise UserError(f"{kind} rope_scaling is exported for llama (and linear for gemma3_text), not {auto}")
    check_tokenizer(tokenizer, model.config, "the export")
    sd = ours_to_hf(model, auto)
    chat = isinstance(lm_or_model, LanguageModel) and lm_or_model.meta.get("task") == "sft"
    config = ours_config_to_hf(model.config, auto, tokenizer, model.embed_tokens.weight.dtype, chat)
    tok_cfg, special = _tokenizer_files(tokenizer, model.config.block_size, chat)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    head = classifier_head_to_hf(lm_or_model) if isinstance(lm_or_model, LanguageModel) else None
    if head is not None:
        config.update(head[0])

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if head is not None:
            save_file(head[1], str(tmp / CLASSIFIER_HEAD_FILE), metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        tokenizer.save(tmp)
        write_json(tmp / "tokenizer_config.json", tok_cfg)
        write_json(tmp / "special_tokens_map.json", special)
        write_json(tmp / "generation_config.json", gen)

    return atomic_write_dir(out_dir, write, force=force, sources=sources)


# --------------------------------------------------------------------------------------------- download


def download(name: str) -> Path:
    """`hf:NAME` -> a local folder: huggingface_hub's snapshot_download (safetensors and JSON files only)."""
    if not re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name or "") or ".." in name:
        raise UserError(f"hf:{name} is not a model name; write hf:ORG/NAME, e.g. hf:openai-community/gpt2")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"hf:{name} needs huggingface_hub (pip install 'yuyan[hub]'); "
            "or download the model yourself and pass its folder"
        ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # offline mode, no network, unknown or gated repo: all one clear line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"could not fetch hf:{name} ({type(e).__name__}: {first}); check the name and your "
            "network (HF_HUB_OFFLINE must be unset), or pass a local folder"
        ) from None


__all__ = [
    "load_hf",
    "export_hf",
    "classifier_head_to_hf",
    "classifier_head_from_hf",
    "CLASSIFIER_HEAD_FILE",
    "download",
    "hf_config_to_ours",
    "hf_to_ours",
    "ours_to_hf",
    "hf_family",
    "read_hf_weights",
    "TABLES",
]
