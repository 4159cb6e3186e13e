"""GGUF export: one file that llama.cpp (and what runs on it: Ollama, LM Studio, llama-cpp-python) opens.

Written with the `gguf` package's GGUFWriter (the optional extra `yuyan[gguf]`), under llama.cpp's own
architecture and tensor names: "gpt2" for the GPT-2 family (q/k/v fused into `attn_qkv` as llama.cpp's
gpt2 graph wants) and "llama" for the Llama family. Which family a model is comes from `hf_family`, the
rule the Hugging Face export uses. Our q/k weights are in Hugging Face's rotate-half RoPE layout and
llama.cpp's llama graph rotates interleaved pairs, so q_proj/k_proj rows are permuted exactly as llama.cpp's
convert_hf_to_gguf.py does for HF Llama checkpoints (`permute_rope`). A tied model writes no
`output.weight`: llama.cpp then reuses `token_embd`.

Tensor types follow convert_hf_to_gguf.py: 1-D tensors (norms, biases) and GPT-2's position embedding stay
float32; the other matrices take --outtype (f32, f16, bf16, or q8_0 through gguf.quants.quantize, with
float16 for a matrix whose rows are not a multiple of Q8_0's 32-value block).

The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) model: tokens, token types (special tokens as
CONTROL, so they are never produced from plain text), merges, bos/eos/eot/pad ids, add_bos false (we never
add BOS) and, for a tokenizer with our chat role tokens, the chat template the HF export writes.
llama.cpp does not read the tokenizer's pre-tokeniser; it picks a hard-coded one by the name in
`tokenizer.ggml.pre`. Ours (tokenizers' ByteLevel with its regex and no prefix space, also GPT-2's own
tokenizer.json) is GPT-2's: llama.cpp's "gpt-2" splits text by the same regex
(`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`), so that is the
name written. A tokenizer with any other pre-tokeniser, normaliser or model is refused rather than written
under a name that would tokenise differently.

The file is written to a temp sibling, fsynced and renamed into place; an existing file is replaced only
with `force`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from yuyan.errors import UserError
from yuyan.fsutil import is_os_failure, os_error_line
from yuyan.model.checkpoint import LanguageModel, check_tokenizer
from yuyan.model.hf import chat_template, eos_ids, hf_family
from yuyan.model.transformer import ModelConfig, Transformer
from yuyan.tokenizer import CHAT_TOKENS, Tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's name for GPT-2's pre-tokeniser regex (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2)
GPT2_PRE = "gpt-2"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'yuyan[gguf]'") from None
    return gguf


# --------------------------------------------------------------------------------------------- tokenizer


def gguf_pre_tokenizer(tokenizer: Tokenizer) -> str:
    """The `tokenizer.ggml.pre` name under which llama.cpp splits text exactly as `tokenizer` does, or a
    UserError naming what differs."""
    spec = json.loads(tokenizer.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    byte_level = (
        pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    )
    plain_bpe = (
        model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and not model.get("ignore_merges")
        and model.get("dropout") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
    )
    if byte_level and plain_bpe and spec.get("normalizer") is None:
        return GPT2_PRE
    raise UserError(
        "this tokenizer cannot be written to GGUF exactly: llama.cpp knows byte-level BPE pre-tokenisers by "
        f"name and yuyan writes only GPT-2's (ByteLevel with its regex, no prefix space, no normaliser); this "
        f"one has pre_tokenizer {json.dumps(pre)[:120]}, normalizer {json.dumps(spec.get('normalizer'))[:60]}, "
        f"model {model.get('type')}; convert the Hugging Face original with llama.cpp's convert_hf_to_gguf.py"
    )


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for `vocab_size` ids; ids the tokenizer lacks (a model vocabulary
    padded past the tokenizer's) are "[PADi]" tokens of type UNUSED, as convert_hf_to_gguf.py writes them."""
    tt = _gguf().TokenType
    spec = json.loads(tokenizer.to_str())
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    inv = {i: t for t, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in inv:
            tokens.append(f"[PAD{i}]")
            types.append(tt.UNUSED)
        elif i in added:
            tokens.append(inv[i])
            types.append(tt.CONTROL if added[i].get("special") else tt.USER_DEFINED)
        else:
            tokens.append(inv[i])
            types.append(tt.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _write_tokenizer(w, tokenizer: Tokenizer, vocab_size: int, chat: bool) -> None:
    tokens, types, merges = gguf_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(gguf_pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = eos_ids(tokenizer, chat)
    eos = eos[0] if isinstance(eos, list) else eos
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    has_chat = len(tokenizer.chat_ids) == len(CHAT_TOKENS)
    if has_chat:
        w.add_eot_token_id(tokenizer.chat_ids["<|end|>"])  # llama.cpp stops on eos and eot alike
        w.add_chat_template(chat_template())
    if tokenizer.pad_id is not None:
        w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


# --------------------------------------------------------------------------------------------- tensors


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q_proj/k_proj rows (weight or bias) from HF's rotate-half layout to llama.cpp's interleaved pairs:
    within each head, row j of the first half and row j of the second half become rows 2j and 2j+1
    (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layer_tensors(sd: dict, c: ModelConfig, family: str, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    p, b = f"layers.{i}.", f"blk.{i}."
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    if family == "llama":
        names.update({"self_attn.v_proj": "attn_v", "mlp.gate_proj": "ffn_gate"})
    for kind in ("weight", "bias"):
        for ours, theirs in names.items():
            if f"{p}{ours}.{kind}" in sd:
                yield f"{b}{theirs}.{kind}", sd[f"{p}{ours}.{kind}"]
        q, k, v = (sd.get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv")
        if q is None:
            continue
        if family == "gpt2":  # llama.cpp's gpt2 graph reads one fused (q; k; v) projection
            yield f"{b}attn_qkv.{kind}", torch.cat([q, k, v], dim=0)
        else:
            yield f"{b}attn_q.{kind}", permute_rope(q, c.n_head)
            yield f"{b}attn_k.{kind}", permute_rope(k, c.n_kv_head)


def gguf_tensors(model: Transformer, family: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp tensor name, tensor in our (out, in) layout) for every weight, arch "gpt2" or "llama"."""
    c: ModelConfig = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["embed_tokens.weight"]
    if family == "gpt2":
        yield "position_embd.weight", sd["embed_positions.weight"]
    for i in range(c.n_layer):
        yield from _layer_tensors(sd, c, family, i)
    for kind in ("weight", "bias"):
        if f"norm.{kind}" in sd:
            yield f"output_norm.{kind}", sd[f"norm.{kind}"]
    if not c.tie_embeddings:  # tied: llama.cpp uses token_embd for the output
        yield "output.weight", sd["lm_head.weight"]


def _encode(name: str, t: torch.Tensor, outtype: str) -> tuple[np.ndarray, object]:
    """(data, GGML type) for one tensor under --outtype, by convert_hf_to_gguf.py's rules."""
    g = _gguf()
    q = g.GGMLQuantizationType
    a = t.numpy().astype(np.float32)
    if a.ndim == 1 or name == "position_embd.weight" or outtype == "f32":
        return a, q.F32
    if outtype == "bf16":
        return g.quants.quantize(a, q.BF16), q.BF16
    if outtype == "q8_0":
        try:
            return g.quants.quantize(a, q.Q8_0), q.Q8_0
        except g.QuantError:  # rows not a multiple of 32 values
            pass
    return a.astype(np.float16), q.F16


# --------------------------------------------------------------------------------------------- writer


def _write_hparams(w, c: ModelConfig, family: str) -> None:
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    if family == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_vocab_size(c.vocab_size)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)


def gguf_family(config: ModelConfig) -> str:
    """ "gpt2" or "llama": the llama.cpp architecture that runs this config exactly, or a UserError."""
    family = hf_family(config)
    if family not in ("gpt2", "llama"):
        raise UserError(
            f"GGUF export covers the gpt2 and llama families; this model is HF {family}: export it with "
            "`yuyan convert to-hf` and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    if config.rope_scaling:
        raise UserError(
            f"GGUF export does not write rope_scaling ({config.rope_scaling}) yet; export a model without it"
        )
    return family


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    return outtype


def check_gguf_output(
    out: str | os.PathLike, force: bool = False, source: str | os.PathLike | None = None
) -> Path:
    """Refuse an output that is a folder, lies inside the model's folder, or exists (unless `force`)."""
    out, source = Path(out), (Path(source) if source is not None else None)
    if out.is_dir():
        raise UserError(f"output {out} is a folder; name the .gguf file to write")
    if source is not None and source.exists() and out.resolve().is_relative_to(source.resolve()):
        raise UserError(f"output {out} is inside the model folder {source}; write it somewhere else")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    return out


def export_gguf(lm: LanguageModel, out: str | os.PathLike, outtype: str = "f32", force: bool = False) -> Path:
    """Write `lm` (model + tokenizer) to the GGUF file `out`, atomically; see the module docstring.
    A model fine-tuned on chats (`meta["task"] == "sft"`) gets end-of-turn as its eos, as in export_hf."""
    check_outtype(outtype)
    g = _gguf()
    out = check_gguf_output(out, force, lm.path)
    model, tokenizer, c = lm.model, lm.tokenizer, lm.model.config
    family = gguf_family(c)
    check_tokenizer(tokenizer, c, "the GGUF export")
    gguf_pre_tokenizer(tokenizer)  # refuse before writing anything
    w = g.GGUFWriter(None, family)
    w.add_name(Path(lm.path).name if lm.path is not None else "yuyan")
    w.add_file_type(
        {
            "f32": g.LlamaFileType.ALL_F32,
            "f16": g.LlamaFileType.MOSTLY_F16,
            "bf16": g.LlamaFileType.MOSTLY_BF16,
            "q8_0": g.LlamaFileType.MOSTLY_Q8_0,
        }[outtype]
    )
    _write_hparams(w, c, family)
    _write_tokenizer(w, tokenizer, c.vocab_size, lm.meta.get("task") == "sft")
    for name, t in gguf_tensors(model, family):
        data, qtype = _encode(name, t, outtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    _atomic_write(w, out)
    return out


def _atomic_write(w, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if is_os_failure(e):
            raise UserError(os_error_line(e, out) + " (an existing file is unchanged)") from None
        raise


__all__ = [
    "OUTTYPES",
    "check_gguf_output",
    "check_outtype",
    "export_gguf",
    "gguf_family",
    "gguf_pre_tokenizer",
    "gguf_tensors",
    "gguf_vocab",
    "permute_rope",
]
