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
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from yuyan.errors import UserError
from yuyan.fsutil import (
    FolderLock,
    check_output_dir,
    foreign_entries,
    hold_lock,
    is_os_failure,
    mark_ours,
    os_error_line,
    read_small_json,
)
from yuyan.model.flops import num_params
from yuyan.model.transformer import ModelConfig, Transformer
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


def atomic_write_dir(dest: str | os.PathLike, write, *, force: bool = False, sources: tuple = ()) -> Path:
    """Call write(tmp_dir) then swap tmp_dir into `dest` with renames; a manifest of sha256 is added.

    `dest` must pass the safe-output rule (yuyan.fsutil.check_output_dir: empty, missing or ours, or
    `force`; never one of `sources`). What the old folder held that we did not write is moved into the new
    one, never deleted. An OS failure (a full or read-only disk) becomes one UserError line naming the path;
    the previous folder stays whole."""
    dest = check_output_dir(dest, force=force, sources=sources)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != "manifest.json")
        manifest = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
        write_json(tmp / "manifest.json", {"format": FORMAT, "files": manifest})
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        keep = [p.name for p in foreign_entries(dest)] if dest.is_dir() else []
        if dest.exists():
            os.replace(dest, old)  # a kill here leaves `old` whole; load() falls back to it
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        for name in keep:  # the user's files: into the new folder (ours win a clash, as --force said)
            if not (dest / name).exists():
                os.replace(old / name, dest / name)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_os_failure(e):
            raise UserError(os_error_line(e, dest) + f" (the previous {dest.name} is unchanged)") from None
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
    force: bool = False,
    sources: tuple = (),
) -> Path:
    """Write the checkpoint folder atomically. `model` must be the plain (unwrapped, uncompiled) module.

    force, sources: the safe-output rule of atomic_write_dir (write into a folder that is not ours; the
    inputs the folder must not be, hold or lie in)."""
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

    return atomic_write_dir(path, write, force=force, sources=sources)


COVERED = (".safetensors", ".bin", ".pt", ".pth")  # weights a manifest must list when the folder holds them
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def manifest_file(folder: Path, name: object, manifest: Path) -> Path:
    """The one path resolver for a manifest entry: a regular file inside `folder`, or a UserError.

    Refused: a name that is not a plain relative path (absolute, `..`, empty), a symlink that leads out of
    the folder, and anything that is not a regular file (a FIFO or /dev/zero would hang the checksum)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\0" in name:
        raise UserError(
            f"{manifest} names {name!r}, not a file in the folder; the manifest is corrupt or hostile"
        )
    parts = Path(name).parts
    if ".." in parts or Path(name).is_absolute():
        raise UserError(f"{manifest} names {name!r} outside {folder}; the manifest is corrupt or hostile")
    f = folder / name
    try:
        real, root = f.resolve(strict=True), folder.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise UserError(
            f"checkpoint {folder} is missing {name} listed in its manifest; use an earlier checkpoint"
        ) from None
    if root not in real.parents:
        raise UserError(
            f"{manifest} entry {name!r} leads outside {folder} (a symlink); the folder is hostile"
        )
    if not stat.S_ISREG(mode):
        raise UserError(f"{manifest} entry {name!r} is not a regular file; the folder is corrupt or hostile")
    return f


def manifest_entries(path: Path) -> dict[Path, dict] | None:
    """The files a folder's manifest.json lists, each resolved by manifest_file and with a valid
    {"sha256", "bytes"}; None when the folder has no manifest. A manifest of the wrong shape, an empty one,
    or one that leaves out a weights file or config.json the folder holds is refused by name."""
    mf = path / "manifest.json"
    if not mf.exists() and not mf.is_symlink():
        return None  # folders made by hand or by other tools carry none
    raw = read_small_json(mf)
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not files:
        raise UserError(
            f'{mf} is corrupt (not a JSON object with a non-empty "files" map); the checkpoint cannot be '
            "trusted: restore it or use an earlier one"
        )
    out = {}
    for name, info in files.items():
        f = manifest_file(path, name, mf)
        ok = isinstance(info, dict) and isinstance(info.get("sha256"), str) and SHA256.match(info["sha256"])
        if not ok or not isinstance(info.get("bytes"), int) or isinstance(info["bytes"], bool):
            raise UserError(f"{mf} entry {name!r} has no valid sha256 and bytes; the manifest is corrupt")
        out[f] = info
    listed = {f.name for f in out}
    uncovered = sorted(
        p.name
        for p in path.iterdir()
        if (p.suffix in COVERED or p.name == "config.json") and p.name not in listed
    )
    if uncovered:
        raise UserError(
            f"{mf} does not cover {', '.join(uncovered[:4])}: those files cannot be verified (tampered or "
            "added by hand); restore the checkpoint or use an earlier one"
        )
    return out


def verify_manifest(path: Path) -> None:
    """Check every file a folder's manifest lists against its size and sha256 (nothing without a manifest)."""
    for f, info in (manifest_entries(path) or {}).items():
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise UserError(
                f"checkpoint file {f} does not match its checksum (corrupt or truncated); use an earlier checkpoint"
            )


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise UserError(f"{path} has no config.json: it is not a model folder")
    if not f.is_file():  # a FIFO or a device would block the read or never end
        raise UserError(f"{f} is not a regular file; the model folder is corrupt or hostile")
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
    m.init_rope()
    if cfg.tie_embeddings:
        m.lm_head.weight = m.embed_tokens.weight
    return m


def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor: a model with them generates
    garbage (or fails in sampling) far from the cause."""
    for k, v in sd.items():
        # one reduction per tensor: a sum is finite unless a value is NaN or inf (or the sum overflows,
        # which the exact check below then clears)
        if not v.is_floating_point() or bool(torch.isfinite(v.sum())):
            continue
        n = int((~torch.isfinite(v)).sum())
        if n:
            raise UserError(
                f"weights in {source}: tensor {k} holds {n} NaN or infinite values; the checkpoint is "
                "corrupt (or the run diverged): use an earlier checkpoint"
            )


def check_version(raw: dict, source: str) -> None:
    """Refuse a config.json version we do not know (newer than ours, or not a number)."""
    v = raw.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= VERSION:
        raise UserError(
            f"{source}/config.json has version {v!r}; this yuyan reads versions 1..{VERSION}: "
            "upgrade yuyan or re-save the checkpoint with this version"
        )


def load_state(model: Transformer, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load weights with a clear error that names missing, unexpected and mis-shaped tensors (and NaN)."""
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
    check_finite(sd, source)
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
    check_version(raw, str(p))
    meta = raw.pop("meta", {})
    if not isinstance(meta, dict):
        raise UserError(f'{p}/config.json: "meta" must be a JSON object; the config is corrupt')
    try:
        cfg = ModelConfig.from_dict(raw)
    except (TypeError, ValueError, ArithmeticError) as e:
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
    check_finite(extra, str(p))
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


def lock_run_dir(out_dir: str | os.PathLike, main: bool = True) -> FolderLock:
    """The advisory lock a training run holds on its folder for as long as it runs (rank 0 only): a second
    run on the same folder, resumed or not, fails at once naming the holder's pid (yuyan.fsutil.hold_lock)."""
    if not main:
        return FolderLock(None)
    lock = hold_lock(out_dir, "run folder")
    mark_ours(out_dir, "train")  # what a run writes there is ours: a re-run into it is allowed
    return lock


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
