"""Atomic save and verified load of yuyan's checkpoint folder.

Layout: config.json (ModelConfig + "format": "yuyan" + version + metadata), model.safetensors,
tokenizer.json, optional generation_config.json, optional trainer_state.pt + state.json, and manifest.json
with the sha256 of every other file. A folder is written to a temp sibling and renamed into place, so a kill
at any moment leaves either the old checkpoint or the new one whole, never a mix. Loading never unpickles
untrusted bytes: weights come from safetensors, trainer state through torch.load(weights_only=True).
A training run's folder keeps its resumable checkpoints in checkpoints/step-NNNNNNNN (`step_dir`); the
functions at the end list them, find the newest (recovering one caught between renames), prune all but the
last K and sweep away the temp folders a kill left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from yuyan.errors import UserError
from yuyan.model.flops import num_params
from yuyan.model.transformer import ModelConfig, Transformer, rope_inv_freq
from yuyan.tokenizer import Tokenizer

FORMAT, VERSION = "yuyan", 1
MAX_PARAMS = 200e9  # a config asking for more is refused before anything is allocated
MAX_LAYERS = 1024  # the deepest real models have ~130; a hostile n_layer would build millions of modules
MAX_CONTEXT = 1 << 21  # 2M positions (Llama 3.1 has 128k); a hostile block_size would size KV caches from it


@dataclass
class LanguageModel:
    """A model with its tokenizer: what `yuyan.load()` returns."""

    model: Transformer
    tokenizer: Tokenizer
    path: Path
    meta: dict = field(default_factory=dict)  # everything in config.json besides the model config
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. a classifier head


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def atomic_write_dir(dest: str | os.PathLike, write) -> Path:
    """Call write(tmp_dir) then swap tmp_dir into `dest` with renames; a manifest of sha256 is added."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != "manifest.json")
        manifest = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
        write_json(tmp / "manifest.json", {"format": FORMAT, "files": manifest})
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            os.replace(dest, old)  # a kill here leaves `old` whole; load() falls back to it
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder, or the whole previous one if a kill fell between the two renames."""
    p = Path(path)
    if p.exists():
        return p
    olds = (
        sorted(p.parent.glob(f".{p.name}.old-*"), key=lambda q: q.stat().st_mtime)
        if p.parent.exists()
        else []
    )
    if olds:
        os.replace(olds[-1], p)
        return p
    raise UserError(f"checkpoint {p} not found: pass a checkpoint folder, a Hugging Face folder or hf:NAME")


def save_checkpoint(
    path: str | os.PathLike,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    meta: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    trainer_state: dict | None = None,
    state: dict | None = None,
    generation_config: dict | None = None,
) -> Path:
    """Write the checkpoint folder atomically. `model` must be the plain (unwrapped, uncompiled) module."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.lm_head_weight_tied():
        sd.pop("lm_head.weight")  # safetensors stores no aliases; tie again on load
    for k, v in (extra_tensors or {}).items():
        sd[f"extra.{k}"] = v.detach().contiguous().cpu()
    cfg = {"format": FORMAT, "version": VERSION, **model.config.to_dict(), "meta": meta or {}}

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", cfg)
        tokenizer.save(tmp)
        if generation_config:
            write_json(tmp / "generation_config.json", generation_config)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        if state is not None:
            write_json(tmp / "state.json", state)

    return atomic_write_dir(path, write)


def verify_manifest(path: Path) -> None:
    mf = path / "manifest.json"
    if not mf.exists():
        return  # folders made by hand or by other tools carry none
    try:
        files = json.loads(mf.read_text())["files"]
    except (ValueError, KeyError):
        raise UserError(
            f"{mf} is corrupt; the checkpoint cannot be trusted: restore it or use an earlier one"
        ) from None
    for name, info in files.items():
        f = path / name
        if not f.exists():
            raise UserError(
                f"checkpoint {path} is missing {name} listed in its manifest; use an earlier checkpoint"
            )
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise UserError(
                f"checkpoint file {f} does not match its checksum (corrupt or truncated); use an earlier checkpoint"
            )


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise UserError(f"{path} has no config.json: it is not a model folder")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f} must hold a JSON object")
    return cfg


def estimate_params(cfg: ModelConfig) -> int:
    """Parameter count from the config alone (weights of every matrix; biases and norms are negligible)."""
    d, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    attn = d * cfg.head_dim * 2 * (cfg.n_head + cfg.n_kv_head)
    mlp = d * cfg.d_ff * (3 if cfg.ffn == "swiglu" else 2)
    pos = cfg.block_size * d if cfg.pos == "learned" else 0
    return V * d * (1 if cfg.tie_embeddings else 2) + pos + L * (attn + mlp)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> Transformer:
    """Instantiate a model on the meta device first so absurd configs fail before any allocation."""
    est = estimate_params(cfg)
    if est > MAX_PARAMS or cfg.n_layer > MAX_LAYERS:
        raise UserError(
            f"config asks for {est:.3g} parameters in {cfg.n_layer} layers (limits {MAX_PARAMS:.0e}, "
            f"{MAX_LAYERS} layers); the config is corrupt or absurd"
        )
    if cfg.block_size > MAX_CONTEXT:
        raise UserError(
            f"config asks for a context of {cfg.block_size} positions (limit {MAX_CONTEXT}); the config is corrupt or absurd"
        )
    with torch.device("meta"):
        m = Transformer(cfg)
    n = num_params(m)
    if n > MAX_PARAMS:
        raise UserError(
            f"config asks for {n:.3g} parameters (over the {MAX_PARAMS:.0e} limit); the config is corrupt or absurd"
        )
    m = m.to_empty(device=device or "cpu")
    if cfg.pos == "rope":
        m.inv_freq = rope_inv_freq(cfg).to(m.inv_freq.device)
    if cfg.tie_embeddings:
        m.lm_head.weight = m.embed_tokens.weight
    return m


def load_state(model: Transformer, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load weights with a clear error that names missing, unexpected and mis-shaped tensors."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.lm_head_weight_tied():
        expected.pop("lm_head.weight")
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k} {tuple(sd[k].shape)} vs config {tuple(expected[k])}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing[:8]}" if missing else "",
            f"unexpected {unexpected[:8]}" if unexpected else "",
            f"shape mismatch {shapes[:4]}" if shapes else "",
        ]
        raise UserError(
            f"weights in {source} do not fit the model config: " + "; ".join(p for p in parts if p)
        )
    model.load_state_dict(sd, strict=False, assign=False)


def check_tokenizer(tokenizer: Tokenizer, cfg: ModelConfig, source: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"tokenizer in {source} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}: "
            "they do not belong together; use the tokenizer saved with the model"
        )


def load_checkpoint(
    path: str | os.PathLike, device: torch.device | str | None = None, verify: bool = True
) -> LanguageModel:
    p = resolve_dir(path)
    if verify:
        verify_manifest(p)
    raw = read_config(p)
    if raw.get("format") != FORMAT:
        raise UserError(f'{p} is not a yuyan checkpoint (no "format": "yuyan" in config.json)')
    meta = raw.pop("meta", {})
    try:
        cfg = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise UserError(f"{p}/config.json: {e}") from None
    model = build_model(cfg, device)
    try:
        sd = load_file(str(p / "model.safetensors"), device=str(device or "cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{p}/model.safetensors is corrupt or truncated ({e}); use an earlier checkpoint"
        ) from None
    extra = {k.removeprefix("extra."): v for k, v in sd.items() if k.startswith("extra.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("extra.")}
    load_state(model, sd, str(p))
    tokenizer = Tokenizer.load(p)
    check_tokenizer(tokenizer, cfg, str(p))
    model.eval()
    return LanguageModel(model, tokenizer, p, meta, extra)


def unpickle_refusal(e: Exception) -> str:
    """The one useful line of torch.load(weights_only=True)'s long error, e.g. "Unsupported global: exec"."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\.\s|$)", msg, re.M)
    line = m.group(1) if m else re.split(r"\.\s", (msg.strip().splitlines() or [type(e).__name__])[0])[0]
    return line[:160]


def load_trainer_state(path: str | os.PathLike) -> dict | None:
    f = Path(path) / "trainer_state.pt"
    if not f.exists():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{f} cannot be loaded safely ({unpickle_refusal(e)}); it is corrupt or not ours"
        ) from None


# ---------------------------------------------------------------------------------------------- run folders

STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(out_dir: str | os.PathLike, step: int) -> Path:
    """Where a run in `out_dir` keeps its resumable checkpoint of optimizer step `step`."""
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Step checkpoints in `out_dir/checkpoints`, oldest first (temp and trash folders are ignored)."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest step checkpoint, or None; one caught between the two renames of a rewrite is recovered."""
    ckpts = list_checkpoints(out_dir)
    if not ckpts:
        # a kill between the two renames of a rewrite leaves only a .step-N.old-* sibling
        d = Path(out_dir) / "checkpoints"
        olds = sorted(d.glob(".step-*.old-*")) if d.is_dir() else []
        for o in olds:
            with contextlib.suppress(UserError, OSError):
                resolve_dir(d / o.name.split(".old-")[0].lstrip("."))
        ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def _remove_dir(p: Path) -> None:
    """Rename first, then delete: a kill never leaves a half-deleted checkpoint under its real name."""
    trash = p.parent / f".{p.name}.trash-{uuid.uuid4().hex[:8]}"
    os.replace(p, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (0: keep every one)."""
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            _remove_dir(old)


def clean_temp(out_dir: str | os.PathLike) -> None:
    """Remove the temp and trash folders that a kill in the middle of a write or a prune left behind."""
    d = Path(out_dir) / "checkpoints"
    for p in list(d.glob(".step-*.trash-*")) + list(d.glob(".step-*.tmp-*")) if d.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temp sibling and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
