"""One training loop for pre-training and fine-tuning, in one process or many (torchrun DDP/FSDP).

What is trained is described by a *task* (`Task` below): it draws batches, computes the loss and evaluates.
`LMTask` is next-token prediction over token shards (pre-training); fine-tuning tasks (SFT, classification)
implement the same four methods. `fit()` owns everything else: AdamW over the trainable parameters,
warm-up + cosine/WSD schedule (optionally fitted to a wall-clock budget), gradient accumulation and clipping,
bf16 autocast on CUDA, periodic evaluation, metrics.jsonl, a loss-curve PNG, atomic checkpoints
(keep-last-K + best), exact resume, SIGINT = save and stop.

Data order: every rank draws the *global* batch (batch_size x world_size rows) from one torch.Generator with
the same seed and keeps its own slice, so N processes with batch B see exactly the windows of one process
with batch N*B, and the generator state in the checkpoint makes a resumed run draw what the uninterrupted
run would have drawn, at any world size.

Checkpoint folder layout (`out_dir`):
  checkpoints/step-00000500/  model + tokenizer + trainer_state.pt + state.json (the last `keep_last` kept)
  best/                       the checkpoint with the lowest periodic val loss (no trainer state)
  final/                      the model at the end of training (no trainer state)
  metrics.jsonl, loss_curve.png, train_config.toml
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from yuyan.errors import UserError
from yuyan.train import distributed as D
from yuyan.train.optim import build_optimizer, lr_at, set_lr

# ---------------------------------------------------------------------------------------------- config


@dataclass
class ModelSection:
    """A preset plus optional overrides of any ModelConfig field (None: keep the preset's value)."""

    preset: str = "demo"
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    block_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    head_dim: int | None = None
    ffn: str | None = None
    norm: str | None = None
    pos: str | None = None
    rope_theta: float | None = None
    bias: bool | None = None
    tie_embeddings: bool | None = None
    dropout: float | None = None

    def overrides(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}


@dataclass
class DataSection:
    corpus: str = "stdlib"  # a file, folder, glob, JSONL or "stdlib" (the embedded corpus)
    tokenizer: str = ""  # a folder with tokenizer.json; "": <out>/tokenizer, trained if missing
    vocab_size: int = 4096  # when a tokenizer is trained
    shards: str = ""  # token shards folder; "": <out>/data, prepared if missing


@dataclass
class TrainSection:
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50  # optimizer steps of linear warm-up
    schedule: str = "cosine"  # cosine | wsd
    decay_frac: float = 0.2  # wsd: fraction of the run spent decaying
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0: off
    max_steps: int = 1000  # with max_time: an upper bound (0: none)
    max_time: float = 0.0  # seconds of training; >0 fits the schedule's length to this budget
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    autocast: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    compile: bool = False
    log_every: int = 10


@dataclass
class EvalSection:
    every: int = 200  # optimizer steps between evaluations (0: only at the end)
    batches: int = 20  # random val batches per periodic evaluation (a fixed set, the same each time)
    final_full: bool = True  # the final evaluation covers the whole validation split


@dataclass
class CheckpointSection:
    dir: str = "runs/train"
    every_steps: int = 0  # 0: off
    every_minutes: float = 10.0  # 0: off
    keep_last: int = 2
    save_best: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    distributed: str = "auto"  # auto (ddp under torchrun) | none | ddp | fsdp

    def validate(self) -> None:
        t = self.train
        checks = [
            (t.batch_size > 0 and t.grad_accum > 0, "train.batch_size and train.grad_accum must be positive"),
            (t.schedule in ("cosine", "wsd"), f"train.schedule must be cosine or wsd, got {t.schedule!r}"),
            (
                t.autocast in ("auto", "bf16", "fp16", "off"),
                f"train.autocast must be auto|bf16|fp16|off, got {t.autocast!r}",
            ),
            (t.max_steps > 0 or t.max_time > 0, "set train.max_steps or train.max_time (> 0)"),
            (len(t.betas) == 2, "train.betas takes two numbers, e.g. 0.9,0.95"),
            (t.lr > 0 and t.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0"),
            (self.distributed in D.STRATEGIES, f"distributed must be one of {', '.join(D.STRATEGIES)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"bad training config: {msg}")


def config_to_toml(cfg: Any) -> str:
    """A resolved dataclass config as TOML (None values are left out, meaning 'the default')."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v), ensure_ascii=False)

    d = asdict(cfg)
    lines = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    for k, sec in d.items():
        if isinstance(sec, dict):
            lines += ["", f"[{k}]"] + [
                f"{kk} = {val(vv)}" for kk, vv in sec.items() if vv is not None and not isinstance(vv, dict)
            ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- tasks


class Task(Protocol):
    """What `fit` trains. Batches are dicts of CPU tensors whose first dimension is the batch."""

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw `batch_size` examples using only `generator` for randomness (so resume is exact)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar mean loss of the (possibly wrapped) model on a batch already on the model's device."""

    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """Validation metrics, at least {"loss": ...}; `full` asks for the whole split (the final evaluation)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class LMTask:
    """Next-token prediction over token shards: loss, perplexity and bits per byte on the val split.

    `shards` is anything with `get_batch(split, batch_size, block_size, generator, device) -> (x, y)`,
    `iter_sequential(split, batch_size, block_size)` yielding (x, y) and `bytes_per_token(split)`
    (yuyan.data.shards.TokenShards).
    """

    def __init__(
        self,
        shards,
        block_size: int,
        eval_batches: int = 20,
        eval_batch_size: int = 16,
        eval_seed: int = 1234,
    ):
        self.shards, self.block_size = shards, block_size
        self.eval_batches, self.eval_batch_size, self.eval_seed = eval_batches, eval_batch_size, eval_seed

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = self.shards.get_batch(split, batch_size, self.block_size, generator, "cpu")
        return {"input_ids": x, "labels": y}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], targets=batch["labels"])  # fused lm_head + cross-entropy

    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        was_training = model.training
        model.eval()
        dev = model_device(model)
        if full:
            batches = self.shards.iter_sequential("val", self.eval_batch_size, self.block_size)
        else:  # the same fixed windows every time, so evaluations compare
            g = torch.Generator().manual_seed(self.eval_seed)
            batches = (
                self.shards.get_batch("val", self.eval_batch_size, self.block_size, g, "cpu")
                for _ in range(self.eval_batches)
            )
        nats, count = 0.0, 0
        for x, y in batches:
            logits = model(x.to(dev))
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(dev).flatten(), reduction="sum")
            nats += float(nll)
            count += y.numel()
        model.train(was_training)
        if count == 0:
            raise UserError(
                f"the validation split has fewer than {self.block_size + 1} tokens; use a larger corpus "
                "or a smaller --model.block_size"
            )
        loss = nats / count
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "bpb": loss / math.log(2) / self.shards.bytes_per_token("val"),
            "tokens": float(count),
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------- checkpoints

STEP_DIR = re.compile(r"^step-(\d{8})$")
Export = Callable[[nn.Module], tuple[nn.Module, dict, dict]]


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Step checkpoints in `out_dir/checkpoints`, oldest first (temp and trash folders are ignored)."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    from yuyan.model.checkpoint import resolve_dir

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


def _clean_temp(out_dir: Path) -> None:
    d = out_dir / "checkpoints"
    for p in list(d.glob(".step-*.trash-*")) + list(d.glob(".step-*.tmp-*")) if d.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def _rng_state(data_gen: torch.Generator) -> dict:
    st = {"data": data_gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, data_gen: torch.Generator) -> None:
    data_gen.set_state(st["data"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def _check_state_fits(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise UserError(
            f"the checkpoint {source} does not fit this model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape mismatch {sorted(shapes)[:3]}): it was saved for another config; "
            "use a new --checkpoint.dir or drop --resume"
        )


# ---------------------------------------------------------------------------------------------- fit


class _Interrupt:
    """SIGINT sets a flag; the loop saves a checkpoint at the next step boundary and stops."""

    def __init__(self):
        self.flag, self.prev = False, None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


def _autocast(device: torch.device, mode: str):
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def _read_metrics(path: Path, upto_step: int | None) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            if upto_step is None or r.get("step", 0) <= upto_step:
                rows.append(r)
    return rows


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def fit(
    model: nn.Module,
    tokenizer,
    task: Task,
    cfg: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    meta: dict | None = None,
    export: Export | None = None,
) -> dict:
    """Train `model` on `task` as `cfg` says; write checkpoints, metrics and plots under `out_dir`.

    model: a plain module (a Transformer, or one with LoRA / a head swapped in); only parameters with
    requires_grad are optimised. export(model) -> (Transformer, extra_tensors, meta) turns it into what a
    checkpoint holds (a merged LoRA model, a model plus a classifier head); by default the model itself.
    resume: continue from the newest checkpoint in out_dir (a fresh start when there is none).
    Returns {"step", "tokens", "elapsed", "final": {val metrics}, "best_val_loss", "out_dir", "checkpoint",
    "final_dir", "metrics", "plot", "interrupted"}.
    """
    from yuyan.model.checkpoint import load_trainer_state, save_checkpoint, verify_manifest

    cfg.validate()
    tc, ec, cc = cfg.train, cfg.eval, cfg.checkpoint
    out = Path(out_dir or cc.dir)
    info = D.init(cfg.distributed, tc.device)
    main = info.is_main
    dev = info.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- resume: weights into the plain model before any wrapping
    ckpt = latest_checkpoint(out) if resume else None
    if not resume and list_checkpoints(out):
        raise UserError(
            f"{out} already holds checkpoints; pass --resume to continue that run or choose another "
            "--checkpoint.dir"
        )
    tstate: dict | None = None
    if ckpt is not None:
        verify_manifest(ckpt)
        tstate = load_trainer_state(ckpt)
        if tstate is None:
            raise UserError(
                f"{ckpt} has no trainer_state.pt, so it cannot be resumed; delete it or start a new run"
            )
        if export is None:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            from yuyan.model.checkpoint import load_state

            try:
                sd = load_file(str(ckpt / "model.safetensors"))
            except (SafetensorError, OSError) as e:
                raise UserError(
                    f"{ckpt}/model.safetensors is corrupt ({e}); delete {ckpt} to resume from an earlier one"
                ) from None
            saved_cfg = json.loads((ckpt / "config.json").read_text())
            now = model.config.to_dict()
            diff = sorted(k for k in now if k in saved_cfg and saved_cfg[k] != now[k])
            if diff:
                raise UserError(
                    f"{ckpt} was trained with another model config ({', '.join(f'{k}: {saved_cfg[k]} vs {now[k]}' for k in diff[:3])}); "
                    "use a new --checkpoint.dir or the same settings"
                )
            load_state(model, sd, str(ckpt))
        else:
            if "model" not in tstate:
                raise UserError(f"{ckpt} holds no training-model state; it was not written by this task")
            _check_state_fits(model, tstate["model"], str(ckpt))
            model.load_state_dict(tstate["model"])
        if main:
            _clean_temp(out)

    model.to(dev)
    model.train()
    save_copy = copy.deepcopy(model).cpu() if info.strategy == "fsdp" and main else None
    wrapped = D.wrap(model, info)
    raw = model  # the plain module: named parameters, eval and saving go through it (FSDP shards it in place)
    optimizer = build_optimizer(raw, tc.lr, tc.weight_decay, tuple(tc.betas), dev.type)
    train_model = torch.compile(wrapped) if tc.compile else wrapped
    params = [p for p in raw.parameters() if p.requires_grad]

    data_gen = torch.Generator().manual_seed(tc.seed)
    total_steps = tc.max_steps if tc.max_steps > 0 else 10**9
    step, tokens, elapsed_before, best_val = 0, 0, 0.0, float("inf")
    if tstate is not None:
        D.load_optim_state(raw, optimizer, tstate["optimizer"], info)
        _set_rng_state(tstate["rng"], data_gen)
        task.load_state_dict(tstate.get("task", {}))
        step, tokens = int(tstate["step"]), int(tstate["tokens"])
        total_steps, elapsed_before = int(tstate["total_steps"]), float(tstate["elapsed"])
        best_val = float(tstate["best_val"])
        if tc.max_steps > 0 and tc.max_time <= 0:
            total_steps = tc.max_steps

    micro, world, accum = tc.batch_size, info.world_size, tc.grad_accum
    tokens_per_step = None  # measured from the first batch (tasks decide their sequence length)
    metrics_path, plot_path = out / "metrics.jsonl", out / "loss_curve.png"
    history = _read_metrics(metrics_path, step if tstate is not None else -1) if main else []
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        _write_text_atomic(out / "train_config.toml", config_to_toml(cfg))
    run_meta = {**(meta or {}), "train_config": asdict(cfg)}

    def log(row: dict) -> None:
        if main:
            history.append(row)
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def plot() -> Path | None:
        if not main:
            return None
        from yuyan.plots import plot_loss_curve

        tr = [r for r in history if r.get("split") == "train"]
        va = [r for r in history if r.get("split") == "val"]
        return plot_loss_curve(
            [r["step"] for r in tr],
            [r["loss"] for r in tr],
            [r["step"] for r in va],
            [r["loss"] for r in va],
            plot_path,
        )

    def export_model(sd_full: dict | None) -> tuple[nn.Module, dict, dict]:
        m = raw
        if info.strategy == "fsdp":
            save_copy.load_state_dict(sd_full)
            m = save_copy
        if export is None:
            return m, {}, {}
        return export(m)

    def save(kind: str, val: dict | None = None) -> Path | None:
        """kind: step (with trainer state) | best | final. Collective under FSDP; rank 0 writes."""
        sd_full = D.full_model_state(wrapped, info) if info.strategy == "fsdp" else None
        optim_sd = (
            D.full_optim_state(wrapped if info.strategy == "fsdp" else raw, optimizer, info)
            if kind == "step"
            else None
        )
        path = None
        if main:
            m, extra, emeta = export_model(sd_full)
            info_state = {
                "step": step,
                "total_steps": total_steps,
                "tokens": tokens,
                "elapsed": elapsed(),
                "best_val_loss": best_val,
                "val": val or {},
                "world_size": world,
            }
            trainer_state = None
            if kind == "step":
                trainer_state = {
                    "optimizer": optim_sd,
                    "rng": _rng_state(data_gen),
                    "task": task.state_dict(),
                    "step": step,
                    "total_steps": total_steps,
                    "tokens": tokens,
                    "elapsed": elapsed(),
                    "best_val": best_val,
                    "world_size": world,
                }
                if export is not None:
                    trainer_state["model"] = (
                        sd_full
                        if sd_full is not None
                        else {k: v.detach().cpu() for k, v in raw.state_dict().items()}
                    )
            path = out / ("checkpoints" / Path(f"step-{step:08d}") if kind == "step" else kind)
            save_checkpoint(
                path,
                m,
                tokenizer,
                meta={**run_meta, **emeta, "step": step, "val": val or {}},
                extra_tensors=extra,
                trainer_state=trainer_state,
                state=info_state,
            )
            if kind == "step" and cc.keep_last > 0:
                for old in list_checkpoints(out)[: -cc.keep_last]:
                    _remove_dir(old)
        D.barrier(info)
        return path

    # ---- time budget: fit total_steps to max_time from the measured step rate
    budget = tc.max_time
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    start_step = step
    measure_at = start_step + 3  # steps before this one warm caches (and compile)
    last_step_t = 0.0  # elapsed() at the end of the previous step, for the clock stop
    refit_at = measure_at if budget > 0 else None
    marks: list[tuple[int, float]] = []  # (step, elapsed) at each refit

    def refit() -> None:
        """total_steps = steps done + time left / recent seconds per step (evals and saves included).

        The rate comes from the last quarter of the run so far (at least 2 s), so it follows a machine whose
        speed drifts; refits come more often near the end, where an error matters most.
        """
        nonlocal total_steps, refit_at
        now = (step, elapsed())
        recent = (
            [m for m in marks if m[0] < now[0] and m[1] >= now[1] - max(2.0, 0.25 * (now[1] - marks[0][1]))]
            if marks
            else []
        )
        base = recent[0] if recent else (marks[-1] if marks and marks[-1][0] < now[0] else None)
        marks.append(now)
        if base is None:
            refit_at = step + 5  # first window: measure 5 steps
        else:
            rate = (now[1] - base[1]) / (now[0] - base[0])  # seconds per step
            fitted = step + max(int((budget - now[1]) / rate), 1)
            if tc.max_steps > 0:
                fitted = min(fitted, tc.max_steps)
            total_steps = max(fitted, step + 1)
            left = total_steps - step
            refit_at = step + max(1, min((total_steps - start_step) // 20, left // 4))
        total_steps, refit_at = D.broadcast_object((total_steps, refit_at), info)

    # ---- the loop
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not main,
        transient=False,
    )
    ptask = progress.add_task("train", total=total_steps if budget <= 0 else None, completed=step, info="")
    loss_sum, loss_n = torch.zeros((), device=dev), 0
    last_log_t, last_log_tokens = time.perf_counter(), tokens
    last_ckpt_t = time.perf_counter()
    interrupted, last_val = False, None
    saved_step = step if tstate is not None else -1  # the step of the newest step checkpoint
    if main and ckpt is not None:
        console.print(f"resumed from {ckpt} at step {step}")

    if budget > 0 and elapsed_before >= budget:
        total_steps = step  # a resumed run whose time budget is already spent: evaluate and save only
    with _Interrupt() as stop, progress:
        while step < total_steps:
            if refit_at is not None and step >= refit_at:
                refit()
                progress.update(ptask, total=total_steps)
            if step == measure_at:
                last_step_t = elapsed()
            lr = lr_at(step, total_steps, tc.lr, tc.min_lr, tc.warmup, tc.schedule, tc.decay_frac)
            set_lr(optimizer, lr)
            for i in range(accum):
                b = task.batch("train", micro * world, data_gen)
                if world > 1:
                    b = {k: v[info.rank * micro : (info.rank + 1) * micro] for k, v in b.items()}
                b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
                if tokens_per_step is None:
                    x = b.get("input_ids", next(iter(b.values())))
                    tokens_per_step = x.numel() * world * accum
                with D.set_grad_sync(wrapped, info, i == accum - 1), _autocast(dev, tc.autocast):
                    loss = task.loss(train_model, b) / accum
                loss.backward()
                loss_sum += loss.detach()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            loss_n += 1

            if step % tc.log_every == 0 or step == total_steps:
                train_loss = float(D.all_reduce_mean(loss_sum, info)) / loss_n
                now = time.perf_counter()
                tps = (tokens - last_log_tokens) / max(now - last_log_t, 1e-9)
                last_log_t, last_log_tokens = now, tokens
                loss_sum.zero_()
                loss_n = 0
                log(
                    {
                        "step": step,
                        "split": "train",
                        "loss": train_loss,
                        "lr": lr,
                        "tokens": tokens,
                        "tok_per_s": tps,
                        "elapsed": elapsed(),
                    }
                )
                progress.update(ptask, info=f"loss {train_loss:.3f} lr {lr:.2e} {tps:,.0f} tok/s")
            progress.update(ptask, completed=step)

            if ec.every > 0 and step % ec.every == 0 and step < total_steps:
                last_val = task.evaluate(raw, full=False)
                log({"step": step, "split": "val", **last_val, "elapsed": elapsed()})
                if main:
                    progress.console.print(
                        f"step {step}: val loss {last_val['loss']:.4f}"
                        + (f", {last_val['bpb']:.3f} bits/byte" if "bpb" in last_val else "")
                    )
                plot()
                if cc.save_best and last_val["loss"] < best_val:
                    best_val = last_val["loss"]
                    save("best", last_val)

            flag = torch.tensor(float(stop.flag))
            if info.world_size > 1:
                flag = D.all_reduce_mean(flag, info)
            if float(flag) > 0:
                interrupted = True
                break
            if budget > 0 and info.world_size == 1 and step > measure_at:
                # one process: also stop on the clock, when the next step would end further past the
                # budget than stopping now leaves before it (the step-count fit cannot see sudden slowdowns)
                now_t = elapsed()
                step_t = now_t - last_step_t
                last_step_t = now_t
                if now_t + 0.5 * step_t > budget:
                    total_steps = step  # the run is complete: a resume must not train past the budget
                    break
            due = (cc.every_steps > 0 and step % cc.every_steps == 0) or (
                cc.every_minutes > 0 and time.perf_counter() - last_ckpt_t > cc.every_minutes * 60
            )
            if info.world_size > 1 and cc.every_minutes > 0:  # clocks differ between ranks: rank 0 decides
                due = bool(D.broadcast_object(due, info))
            if due and step < total_steps:
                save("step")
                saved_step, last_ckpt_t = step, time.perf_counter()

    train_elapsed = elapsed()
    ckpt_path = out / "checkpoints" / f"step-{step:08d}"
    if saved_step != step:
        save("step")
    if interrupted:
        if main:
            console.print(f"interrupted: saved {ckpt_path}; continue with --resume")
        D.shutdown(info)
        return {
            "step": step,
            "tokens": tokens,
            "elapsed": train_elapsed,
            "final": last_val or {},
            "best_val_loss": best_val,
            "out_dir": str(out),
            "checkpoint": str(ckpt_path),
            "final_dir": None,
            "metrics": str(metrics_path),
            "plot": str(plot_path) if plot_path.exists() else None,
            "interrupted": True,
        }

    final = task.evaluate(raw, full=ec.final_full)
    log({"step": step, "split": "val", **final, "final": True, "elapsed": train_elapsed})
    plot()
    final_dir = save("final", final)
    if main:
        console.print(
            f"done: step {step}, {tokens:,} tokens in {train_elapsed:.1f}s; val loss {final['loss']:.4f}"
            + (f", {final['bpb']:.4f} bits/byte, perplexity {final['ppl']:.2f}" if "bpb" in final else "")
        )
    D.shutdown(info)
    return {
        "step": step,
        "tokens": tokens,
        "elapsed": train_elapsed,
        "final": final,
        "best_val_loss": best_val,
        "out_dir": str(out),
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "final_dir": str(final_dir) if final_dir else None,
        "metrics": str(metrics_path),
        "plot": str(plot_path) if plot_path.exists() else None,
        "interrupted": False,
    }
