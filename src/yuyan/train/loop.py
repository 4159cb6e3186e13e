"""One training loop for pre-training and fine-tuning, in one process or many (torchrun DDP/FSDP).

What is trained is described by a *task* (`Task` below): it draws batches, computes the loss and
evaluates. The tasks live in yuyan.data.tasks: `LMTask` is next-token prediction over token shards
(pre-training); the fine-tuning tasks (SFT, classification) implement the same methods. `fit()` owns
everything else: the optimizer over the trainable parameters (AdamW, or Muon + AdamW), warm-up +
cosine/WSD schedule (optionally fitted to a time budget: wall-clock or CPU seconds, train.clock), gradient accumulation and clipping, bf16
autocast where a timed matmul says it pays (train.precision), periodic evaluation, metrics.jsonl, a
loss-curve PNG, atomic checkpoints (keep-last-K + best), exact resume, SIGINT = save and
stop; with cfg.privacy.epsilon set, DP-SGD steps instead (yuyan.train.privacy: Poisson batches, per-example
clipping and noise, the epsilon spent logged, printed and saved in the checkpoint meta). `fit()` reads top
to bottom; the pieces it calls below it each own one concern (the counters, the time budget, the
checkpoints, the run's files).

Data order: every rank draws the *global* batch (batch_size x world_size rows) from one torch.Generator with
the same seed and keeps its own slice, so N processes with batch B see exactly the windows of one process
with batch N*B, and the generator state in the checkpoint makes a resumed run draw what the uninterrupted
run would have drawn, at any world size.

Checkpoint folder layout (`out_dir`; the step folders are managed by yuyan.model.checkpoint):
  checkpoints/step-00000500/  model + tokenizer + trainer_state.pt + state.json (the last `keep_last` kept)
  best/                       the checkpoint with the best periodic value of eval.best_metric (the val loss
                              by default; a classifier's accuracy or macro-F1), no trainer state; with
                              eval.patience P the run stops after P evaluations without a better one
  final/                      the model at the end of training (no trainer state)
  metrics.jsonl, loss_curve.png, train_config.toml
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from yuyan.errors import UserError
from yuyan.fsutil import FolderLock
from yuyan.model.checkpoint import (
    atomic_write_text,
    clean_temp,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    load_trainer_state,
    lock_run_dir,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
    verify_manifest,
)
from yuyan.model.precision import PrecisionChoice, attention_upcast, upcast_attention
from yuyan.model.precision import choose as choose_precision
from yuyan.progress import Progress
from yuyan.train import distributed as D
from yuyan.train.config import HIGHER_IS_BETTER, PRECISIONS, TrainConfig, TrainSection, config_to_toml
from yuyan.train.optim import MuonAdamW, build_optimizer, describe_optimizer, lr_at, set_lr
from yuyan.train.privacy import DPTrainer, describe, make_private

Export = Callable[[nn.Module], tuple[nn.Module, dict, dict]]


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
    Returns {"step", "tokens", "elapsed", "final": {val metrics}, "best": {"metric", "value", "step"},
    "best_val_loss" (None when best_metric is not loss), "early_stopped", "out_dir", "checkpoint", "final_dir",
    "metrics", "plot", "interrupted"}.
    """
    cfg.validate()
    tc, ec, cc = _train_section(cfg), cfg.eval, cfg.checkpoint
    out = Path(out_dir or cc.dir)
    info = D.init(cfg.distributed, tc.device)
    console = Console(stderr=True, quiet=not info.is_main)  # rank 0 speaks for the run

    # ---- resume: weights into the plain model before any wrapping, then optimizer, data order and counters
    # one run per folder: the lock is held until fit returns (or its frame is freed after an exception)
    tstate, run_lock = _load_for_resume(out, resume, model, export, info.is_main, console)
    parts = _prepare_model(model, tc, info, tstate, console, _Private(task, cfg))
    data_gen = torch.Generator().manual_seed(tc.seed)
    _restore_training_state(tstate, parts, data_gen, task, info, console)
    files = _RunFiles(out, info.is_main, config_to_toml(cfg), tstate)
    state = _TrainState.start(tc, tstate, ec.best_metric)  # the run's clock starts here
    saver = _Checkpointer(out, cfg, parts, tokenizer, task, data_gen, info, export, meta)
    budget = _TimeBudget(tc, state.step, info, console)
    running = _RunningLoss(info.device, state)
    progress, bar = _progress_bar(
        console, None if budget.seconds > 0 else state.total_steps, state.step, tc.progress_seconds
    )

    # ---- the loop: one optimizer step, then logging, evaluation, the stop checks and periodic checkpoints
    interrupted, last_val = False, None
    with _Interrupt() as stop, progress:
        while state.step < state.total_steps:
            if budget.before_step(state):  # the schedule's length was refitted to the time budget
                progress.update(bar, total=state.total_steps)
            lr = lr_at(state.step, state.total_steps, tc.lr, tc.min_lr, tc.warmup, tc.schedule, tc.decay_frac)
            step_tokens = _train_step(parts, task, data_gen, tc, info, lr, running.loss_sum)
            state.advance(step_tokens)

            if state.step % tc.log_every == 0 or state.step == state.total_steps:
                row = {**running.row(state, lr, info), **parts.privacy_row()}
                files.log(row)
                progress.update(bar, info=f"loss {row['loss']:.3f} lr {lr:.2e} {row['tok_per_s']:,.0f} tok/s")
            progress.update(bar, completed=state.step)

            if ec.every > 0 and state.step % ec.every == 0 and state.step < state.total_steps:
                last_val = _evaluate(task, parts.raw, state, files, console=console)
                saver.keep_if_best(state, last_val, console)  # may end the run here (eval.patience)

            if stop.requested(info):
                interrupted = True
                break
            if budget.out_of_time(state):  # the run is complete at this step (state.total_steps = state.step)
                break
            if saver.due(state):
                saver.save("step", state)

    # ---- the end: the last step is always resumable; then, unless interrupted, the final evaluation
    train_elapsed = state.elapsed()
    saver.save_last_step(state)
    final, final_dir = last_val or {}, None
    if interrupted:
        console.print(f"interrupted: saved {step_dir(out, state.step)}; continue with --resume")
    else:
        final = _evaluate(task, parts.raw, state, files, full=ec.final_full, final_elapsed=train_elapsed)
        final_dir = saver.save_final(state, final)
        console.print(
            f"done: step {state.step}, {state.tokens:,} tokens in {train_elapsed:.1f}s; "
            f"val loss {final['loss']:.4f}"
            + (f", {final['bpb']:.4f} bits/byte, perplexity {final['ppl']:.2f}" if "bpb" in final else "")
            + "".join(f", {k} {final[k]:.4f}" for k in HIGHER_IS_BETTER if k in final)
        )
    D.shutdown(info)
    return _close_private(
        parts, _summary(state, train_elapsed, out, files, final, final_dir, interrupted, parts), console
    )


def _check_best_metric(task: Task, metric: str) -> None:
    """eval.best_metric must be one the task reports (its `metric_names`; loss for any task)."""
    names = tuple(getattr(task, "metric_names", ("loss",)))
    if metric not in names:
        raise UserError(
            f"eval.best_metric {metric!r} is not reported by this task (it reports {', '.join(names)}); "
            "accuracy and macro_f1 are classification metrics (--task classify)"
        )


def _val_line(val: dict) -> str:
    """'val loss 0.6931, accuracy 0.5000, macro_f1 0.3333' (and bits per byte where the task gives it)."""
    parts = [f"val loss {val['loss']:.4f}"]
    parts += [f"{k} {val[k]:.4f}" for k in HIGHER_IS_BETTER if k in val]
    if "bpb" in val:
        parts.append(f"{val['bpb']:.3f} bits/byte")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- the run


# train.clock -> the clock that train.max_time and the run's "elapsed" count: wall seconds, or this process's
# CPU seconds over all its threads (load from other processes on the machine does not eat into it)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class _TrainState:
    """The run's counters: written into every step checkpoint and restored on resume."""

    step: int = 0
    tokens: int = 0
    total_steps: int = 0  # the schedule's length; refitted to train.max_time when there is one
    elapsed_before: float = 0.0  # training seconds (of train.clock) of the runs this one resumes
    best_metric: str = "loss"  # eval.best_metric: what best_val holds
    best_val: float = math.inf  # the best periodic value of best_metric so far (-inf / inf: none yet)
    best_step: int = -1
    stale_evals: int = 0  # periodic evaluations since best_val last improved (for eval.patience)
    early_stopped: bool = False
    started: float = 0.0  # the clock's reading when this process started training
    clock: str = "wall"  # train.clock: the key of CLOCKS that elapsed() reads
    tokens_per_step: int = 0  # measured on this process's first step (tasks decide their sequence length)
    saved_step: int = -1  # the step of the newest step checkpoint (-1: none yet)

    @classmethod
    def start(cls, tc: TrainSection, tstate: dict | None, best_metric: str = "loss") -> _TrainState:
        """Fresh counters, or a resumed run's (from its trainer state); the clock starts now. A resumed run
        that chose another best_metric starts its best (and its patience) afresh."""
        total = tc.max_steps if tc.max_steps > 0 else 10**9
        state = cls(total_steps=total, started=CLOCKS[tc.clock](), clock=tc.clock)
        state.best_metric, state.best_val = (
            best_metric,
            -math.inf if best_metric in HIGHER_IS_BETTER else math.inf,
        )
        if tstate is not None:
            state.step, state.tokens = int(tstate["step"]), int(tstate["tokens"])
            state.total_steps, state.elapsed_before = int(tstate["total_steps"]), float(tstate["elapsed"])
            state.saved_step = state.step
            if tstate.get("best_metric", "loss") == best_metric:
                state.best_val = float(tstate["best_val"])
                state.best_step = int(tstate.get("best_step", -1))
                state.stale_evals = int(tstate.get("stale_evals", 0))
            if tc.max_steps > 0 and tc.max_time <= 0:  # a fixed-length run may be resumed with a new length
                state.total_steps = tc.max_steps
        if tc.max_time > 0 and state.elapsed_before >= tc.max_time:
            state.total_steps = state.step  # a resumed run whose time budget is spent: evaluate and save only
        return state

    def advance(self, step_tokens: int) -> None:
        """Count one optimizer step; every step counts the tokens of the first one."""
        self.tokens_per_step = self.tokens_per_step or step_tokens
        self.step += 1
        self.tokens += self.tokens_per_step

    def elapsed(self) -> float:
        """Training seconds so far on train.clock, the resumed runs' included."""
        return self.elapsed_before + CLOCKS[self.clock]() - self.started

    def out_of_patience(self, patience: int, console: Console) -> bool:
        """After an evaluation: with patience P > 0, P evaluations in a row without a better best_metric end
        the run here (complete at this step: total_steps = step, so the final evaluation and save follow)."""
        if patience <= 0 or self.stale_evals < patience:
            return False
        console.print(
            f"early stop at step {self.step}: no better val {self.best_metric} in {patience} evaluations "
            f"(best {self.best_val:.4f} at step {self.best_step})"
        )
        self.total_steps, self.early_stopped = self.step, True
        return True

    def best_info(self) -> dict:
        """{"best": {metric, value, step}, "best_val_loss"} (the loss key None when another metric picks best)."""
        value = self.best_val if math.isfinite(self.best_val) else None
        return {
            "best": {"metric": self.best_metric, "value": value, "step": self.best_step},
            "best_val_loss": value if self.best_metric == "loss" else None,
        }

    def counters(self, world_size: int) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "elapsed": self.elapsed(),
            "world_size": world_size,
        }


@dataclass
class _TrainedModel:
    """The model as it trains: the plain module, its wrapped forms and the optimizer over its parameters."""

    raw: nn.Module  # the plain module: parameters, eval and saving go through it (FSDP shards it in place)
    wrapped: nn.Module  # DDP / FSDP around `raw` (or `raw` itself in one process)
    train_model: nn.Module  # `wrapped`, compiled when train.compile is set: what forward/backward run through
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # the trainable ones, for clipping
    save_copy: nn.Module | None  # FSDP on rank 0: a whole copy that the gathered weights are loaded into
    precision: PrecisionChoice = PrecisionChoice("fp32", "default")  # the autocast format of forward/backward
    dp: DPTrainer | None = None  # DP-SGD's hooks, noisy optimizer, sampler and accountant (cfg.privacy)

    def privacy_row(self) -> dict:
        """The metrics row's DP fields: the epsilon spent so far (none without DP)."""
        return {"epsilon": self.dp.epsilon()} if self.dp is not None else {}


@dataclass
class _Private:
    """What wrapping a run for DP needs besides the model (the task's examples, cfg.privacy)."""

    task: Task
    cfg: TrainConfig


def _prepare_model(
    model: nn.Module,
    tc: TrainSection,
    info: D.DistInfo,
    tstate: dict | None,
    console: Console,
    private: _Private,
) -> _TrainedModel:
    """Move `model` to this rank's device, wrap it for DDP/FSDP, compile it if asked, build the optimizer,
    resolve the precision (and say which, and why); with cfg.privacy on, wrap model and optimizer for DP-SGD
    (yuyan.train.privacy; a resumed run's accountant counts its steps so far)."""
    dev = info.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(dev)
    model.train()
    save_copy = copy.deepcopy(model).cpu() if info.strategy == "fsdp" and info.is_main else None
    wrapped = D.wrap(model, info)
    # a resumed Muon run keeps the format its Newton-Schulz iterations ran in, so resuming stays exact
    ns_saved = (tstate or {}).get("newton_schulz")
    optimizer = build_optimizer(
        model,
        tc.lr,
        tc.weight_decay,
        tuple(tc.betas),
        dev.type,
        optimizer=tc.optimizer,
        muon_lr=tc.muon_lr,
        newton_schulz=ns_saved if ns_saved in ("fp32", "bf16") else "auto",
    )
    train_model = torch.compile(wrapped) if tc.compile else wrapped
    params = [p for p in model.parameters() if p.requires_grad]
    precision = resolve_precision(tc, dev, model, tstate)
    opt = describe_optimizer(optimizer)
    ns = opt.get("newton_schulz")
    how = f" (Newton-Schulz in {ns['precision']}: {ns['reason']})" if ns else ""
    console.print(f"precision: {precision.name} ({precision.reason}); optimizer: {opt['name']}{how}")
    dp = None
    if private.cfg.privacy.enabled():
        steps_done = int(tstate["step"]) if tstate is not None else 0
        dp = make_private(model, optimizer, private.task, private.cfg, info.world_size, steps_done)
        console.print(describe(dp))
    return _TrainedModel(model, wrapped, train_model, optimizer, params, save_copy, precision, dp)


def _train_section(cfg: TrainConfig) -> TrainSection:
    """cfg.train, with precision fp32 under DP (its steps run without autocast)."""
    return dataclasses.replace(cfg.train, precision="fp32") if cfg.privacy.enabled() else cfg.train


def _close_private(parts: _TrainedModel, summary: dict, console: Console) -> dict:
    """Under DP: the epsilon spent into fit's summary and printed, and Opacus' hooks off the model."""
    dp = parts.dp
    if dp is not None:
        summary["privacy"] = dp.report()
        console.print(
            f"privacy: epsilon {dp.epsilon():.3f} spent at delta {dp.settings.delta:g} ({dp.steps} steps)"
        )
        dp.close()
    return summary


def _train_step(
    parts: _TrainedModel,
    task: Task,
    data_gen: torch.Generator,
    tc: TrainSection,
    info: D.DistInfo,
    lr: float,
    loss_sum: torch.Tensor,
) -> int:
    """One optimizer step at learning rate `lr` over `grad_accum` micro-batches, each this rank's slice of
    the global batch (under DP, DP-SGD's step on a Poisson batch instead: yuyan.train.privacy).

    Adds each micro-batch's loss (divided by grad_accum) into `loss_sum` in place, and returns the tokens
    the step trained on across all ranks, as the shape of its first micro-batch says.
    """
    if parts.dp is not None:
        return parts.dp.train_step(parts.raw, data_gen, info.device, lr, loss_sum)
    micro, world, accum, dev = tc.batch_size, info.world_size, tc.grad_accum, info.device
    set_lr(parts.optimizer, lr)
    tokens = 0
    for i in range(accum):
        b = task.batch("train", micro * world, data_gen)
        if world > 1:
            b = {k: v[info.rank * micro : (info.rank + 1) * micro] for k, v in b.items()}
        b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
        if i == 0:
            tokens = b.get("input_ids", next(iter(b.values()))).numel() * world * accum
        with (
            D.set_grad_sync(parts.wrapped, info, i == accum - 1),
            autocast_context(dev, parts.precision.name),
        ):
            loss = task.loss(parts.train_model, b) / accum
        loss.backward()
        loss_sum += loss.detach()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parts.params, tc.grad_clip)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return tokens


def resolve_precision(
    tc: TrainSection, device: torch.device, model: nn.Module, tstate: dict | None
) -> PrecisionChoice:
    """train.precision for this run: a resumed run keeps the format it was trained in (so resuming is exact
    whatever a new measurement would say) unless the config names another one; `auto` otherwise times a
    matmul of this model's training shape (batch x context tokens by d_model x d_ff) in fp32 and bf16.
    Under bf16 on CPU, attention runs in fp32 where a timed SDPA at the model's shape says that is faster."""
    saved, saved_choice = (tstate or {}).get("precision"), None
    if saved in PRECISIONS and tc.precision == "auto":
        saved_choice = PrecisionChoice(saved, "the resumed run's precision")
    cfg = getattr(model, "config", None)
    d, ff, t = (cfg.d_model, cfg.d_ff, cfg.block_size) if cfg is not None else (256, 1024, 256)
    choice = saved_choice or choose_precision(tc.precision, device, min(tc.batch_size * t, 4096), d, ff)
    if choice.name == "bf16" and device.type == "cpu" and cfg is not None:  # and attention where it pays
        upcast, why = attention_upcast(tc.batch_size, cfg.n_head, t, cfg.head_dim)
        upcast_attention(model, upcast)
        choice = dataclasses.replace(choice, reason=f"{choice.reason}; {why}")
    return choice


def autocast_context(device: torch.device, mode: str):
    """A resolved train.precision (fp32 | bf16 | fp16) as a context manager: autocast for bf16 and fp16, the
    weights and optimizer state staying fp32."""
    if mode == "auto":
        raise ValueError("resolve train.precision 'auto' first (resolve_precision)")
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


class _RunningLoss:
    """The train loss summed over the steps since the last log row, and the token rate between rows."""

    def __init__(self, device: torch.device, state: _TrainState):
        self.loss_sum = torch.zeros((), device=device)  # on the device: no sync per step
        self.last_step, self.last_tokens, self.last_t = state.step, state.tokens, time.perf_counter()

    def row(self, state: _TrainState, lr: float, info: D.DistInfo) -> dict:
        """The metrics row of the steps since the last one (mean loss over all ranks); starts a new window."""
        loss = float(D.all_reduce_mean(self.loss_sum, info)) / (state.step - self.last_step)
        now = time.perf_counter()
        tps = (state.tokens - self.last_tokens) / max(now - self.last_t, 1e-9)
        self.last_step, self.last_tokens, self.last_t = state.step, state.tokens, now
        self.loss_sum.zero_()
        return {
            "step": state.step,
            "split": "train",
            "loss": loss,
            "lr": lr,
            "tokens": state.tokens,
            "tok_per_s": tps,
            "elapsed": state.elapsed(),
        }


class _TimeBudget:
    """Fits the schedule's length (total_steps) to train.max_time from the measured step rate (seconds of
    train.clock: wall, or the process's CPU time).

    total_steps = steps done + time left / recent seconds per step (evaluations and saves included). The
    rate comes from the last quarter of the run so far (at least 2 s), so it follows a machine whose speed
    drifts; refits come more often near the end, where an error matters most. One process also stops on the
    clock (`out_of_time`), which sees the sudden slowdowns that the step-count fit cannot.
    """

    def __init__(self, tc: TrainSection, start_step: int, info: D.DistInfo, console: Console | None = None):
        self.seconds, self.max_steps, self.info = tc.max_time, tc.max_steps, info
        self.unit = "CPU s" if tc.clock == "cpu" else "s"
        if console is not None:
            self.announce(console)
        self.start_step = start_step
        self.measure_at = start_step + 3  # steps before this one warm caches (and compile)
        self.refit_at = self.measure_at if self.seconds > 0 else None
        self.marks: list[tuple[int, float]] = []  # (step, elapsed) at each refit
        self.last_step_t = 0.0  # elapsed() at the end of the previous step, for the clock stop

    def announce(self, console: Console) -> None:
        """No hidden cap: with both a time budget and a step limit, say that either may end the run; and
        say when the budget is CPU time (train.clock cpu)."""
        if self.seconds > 0 and self.max_steps > 0:
            console.print(
                f"budget: {self.seconds:g} {self.unit} of training or {self.max_steps} steps (train.max_steps), "
                "whichever comes first; set train.max_steps 0 for the time budget alone"
            )
        elif self.seconds > 0 and self.unit != "s":
            console.print(f"budget: {self.seconds:g} {self.unit} of training (train.clock cpu)")

    def before_step(self, state: _TrainState) -> bool:
        """Refit state.total_steps when due (True when that fitted a length) and start the step clock once
        caches are warm."""
        refitted = self.refit_at is not None and state.step >= self.refit_at
        if refitted:
            state.total_steps = self._refit(state)
        if state.step == self.measure_at:
            self.last_step_t = state.elapsed()
        return refitted and len(self.marks) > 1  # the first refit only starts measuring: no length yet

    def _refit(self, state: _TrainState) -> int:
        """The new total_steps (the same on every rank), and when to refit next."""
        step, total_steps = state.step, state.total_steps
        now = (step, state.elapsed())
        marks = self.marks
        window = max(2.0, 0.25 * (now[1] - marks[0][1])) if marks else 0.0
        recent = [m for m in marks if m[0] < now[0] and m[1] >= now[1] - window]
        base = recent[0] if recent else (marks[-1] if marks and marks[-1][0] < now[0] else None)
        marks.append(now)
        if base is None:
            self.refit_at = step + 5  # first window: measure 5 steps
        else:
            rate = (now[1] - base[1]) / (now[0] - base[0])  # seconds per step
            fitted = step + max(int((self.seconds - now[1]) / rate), 1)
            if self.max_steps > 0:
                fitted = min(fitted, self.max_steps)
            total_steps = max(fitted, step + 1)
            left = total_steps - step
            self.refit_at = step + max(1, min((total_steps - self.start_step) // 20, left // 4))
        total_steps, self.refit_at = D.broadcast_object((total_steps, self.refit_at), self.info)
        return total_steps

    def out_of_time(self, state: _TrainState) -> bool:
        """One process: stop when the next step would end further past the budget than stopping now leaves
        before it. (Ranks' clocks differ, so a distributed run relies on the step-count fit alone.) The run
        is then complete at this step: state.total_steps = state.step, so a resume trains no further."""
        if self.seconds <= 0 or self.info.world_size > 1 or state.step <= self.measure_at:
            return False
        now_t = state.elapsed()
        step_t = now_t - self.last_step_t
        self.last_step_t = now_t
        if now_t + 0.5 * step_t <= self.seconds:
            return False
        state.total_steps = state.step
        return True


class _Checkpointer:
    """Writes the run's checkpoints: step (resumable, the last `keep_last` kept), best and final.

    Saving is collective under FSDP (the weights and optimizer state are gathered); rank 0 writes.
    """

    def __init__(
        self,
        out: Path,
        cfg: TrainConfig,
        parts: _TrainedModel,
        tokenizer,
        task: Task,
        data_gen: torch.Generator,
        info: D.DistInfo,
        export: Export | None,
        meta: dict | None,
    ):
        self.out, self.parts, self.tokenizer, self.task, self.data_gen = out, parts, tokenizer, task, data_gen
        self.cc, self.info, self.export = cfg.checkpoint, info, export
        self.patience = cfg.eval.patience
        _check_best_metric(task, cfg.eval.best_metric)
        self.meta = {**(meta or {}), "train_config": asdict(cfg)}  # recorded in every checkpoint
        self.last_t = time.perf_counter()

    def due(self, state: _TrainState) -> bool:
        """A periodic step checkpoint is due (never at the last step: the end of the run saves one)."""
        cc = self.cc
        due = (cc.every_steps > 0 and state.step % cc.every_steps == 0) or (
            cc.every_minutes > 0 and time.perf_counter() - self.last_t > cc.every_minutes * 60
        )
        if self.info.world_size > 1 and cc.every_minutes > 0:  # clocks differ between ranks: rank 0 decides
            due = bool(D.broadcast_object(due, self.info))
        return due and state.step < state.total_steps

    def keep_if_best(self, state: _TrainState, val: dict, console: Console) -> None:
        """A value of eval.best_metric better than the best so far becomes the best (saved as best/ with
        checkpoint.save_best); otherwise the evaluation counts towards eval.patience, which may end the run
        at this step (state.out_of_patience)."""
        value = float(val[state.best_metric])
        higher = state.best_metric in HIGHER_IS_BETTER
        if not (value > state.best_val if higher else value < state.best_val):
            state.stale_evals += 1
            state.out_of_patience(self.patience, console)
            return
        state.best_val, state.best_step, state.stale_evals = value, state.step, 0
        if self.cc.save_best:
            self.save("best", state, val)

    def save_final(self, state: _TrainState, val: dict) -> Path | None:
        """final/, and best/ too when the final evaluation beats every periodic one (it scores the whole val
        split: a short run's last steps would otherwise never be kept as best). Only a run that evaluated
        periodically has a best/."""
        value = float(val[state.best_metric])
        higher = state.best_metric in HIGHER_IS_BETTER
        if state.best_step >= 0 and (value > state.best_val if higher else value < state.best_val):
            state.best_val, state.best_step = value, state.step
            if self.cc.save_best:
                self.save("best", state, val)
        return self.save("final", state, val)

    def save_last_step(self, state: _TrainState) -> None:
        """A step checkpoint of where the run stopped, unless the loop has just written it."""
        if state.saved_step != state.step:
            self.save("step", state)

    def save(self, kind: str, state: _TrainState, val: dict | None = None) -> Path | None:
        """kind: step (with trainer state) | best | final. Returns the folder written (None off rank 0)."""
        parts, info = self.parts, self.info
        fsdp = info.strategy == "fsdp"
        sd_full = D.full_model_state(parts.wrapped, info) if fsdp else None
        optim_sd = None
        if kind == "step":
            optim_sd = D.full_optim_state(parts.wrapped if fsdp else parts.raw, parts.optimizer, info)
        path = None
        if info.is_main:
            path = step_dir(self.out, state.step) if kind == "step" else self.out / kind
            self._write(path, state, val, sd_full, optim_sd)
            if kind == "step":
                prune_checkpoints(self.out, self.cc.keep_last)
        D.barrier(info)
        if kind == "step":
            state.saved_step, self.last_t = state.step, time.perf_counter()
        return path

    def _privacy_meta(self) -> dict:
        """Under DP, the epsilon spent up to this checkpoint and how (yuyan.train.privacy)."""
        return {"privacy": self.parts.dp.report()} if self.parts.dp is not None else {}

    def _write(
        self, path: Path, state: _TrainState, val, sd_full: dict | None, optim_sd: dict | None
    ) -> None:
        m = self.parts.raw
        if sd_full is not None:  # FSDP: the gathered weights go into the whole copy
            self.parts.save_copy.load_state_dict(sd_full)
            m = self.parts.save_copy
        m, extra, emeta = self.export(m) if self.export is not None else (m, {}, {})
        counters = state.counters(self.info.world_size)
        info_state = {**counters, **state.best_info(), "val": val or {}}
        trainer_state = None
        if optim_sd is not None:
            trainer_state = {
                "optimizer": optim_sd,
                "rng": _rng_state(self.data_gen),
                "task": self.task.state_dict(),
                **counters,
                "best_metric": state.best_metric,
                "best_val": state.best_val,
                "best_step": state.best_step,
                "stale_evals": state.stale_evals,
                "precision": self.parts.precision.name,
                **(
                    {"newton_schulz": self.parts.optimizer.newton_schulz.name}
                    if isinstance(self.parts.optimizer, MuonAdamW)
                    else {}
                ),
            }
            if self.export is not None:  # the training module differs from what the checkpoint holds
                raw_sd = {k: v.detach().cpu() for k, v in self.parts.raw.state_dict().items()}
                trainer_state["model"] = sd_full if sd_full is not None else raw_sd
        save_checkpoint(
            path,
            m,
            self.tokenizer,
            meta={
                **self.meta,
                **self._privacy_meta(),
                **emeta,
                "step": state.step,
                "val": val or {},
            },
            extra_tensors=extra,
            trainer_state=trainer_state,
            state=info_state,
        )


class _RunFiles:
    """What a run writes beside its checkpoints: train_config.toml, metrics.jsonl (one JSON row per line,
    appended as the run goes) and the loss curve drawn from it.

    Only rank 0 writes. A resumed run first drops the rows past its checkpoint, so steps never repeat.
    """

    def __init__(self, out: Path, main: bool, config_toml: str, tstate: dict | None):
        self.path, self.plot_path, self.main = out / "metrics.jsonl", out / "loss_curve.png", main
        upto_step = int(tstate["step"]) if tstate is not None else -1  # a fresh run starts empty
        self.rows = _read_metrics(self.path, upto_step) if main else []
        if main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
            atomic_write_text(out / "train_config.toml", config_toml)

    def log(self, row: dict) -> None:
        if self.main:
            self.rows.append(row)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self) -> Path | None:
        if not self.main:
            return None
        from yuyan.plots import plot_loss_curve

        tr = [r for r in self.rows if r.get("split") == "train"]
        va = [r for r in self.rows if r.get("split") == "val"]
        return plot_loss_curve(
            [r["step"] for r in tr],
            [r["loss"] for r in tr],
            [r["step"] for r in va],
            [r["loss"] for r in va],
            self.plot_path,
        )


def _evaluate(
    task: Task,
    model: nn.Module,
    state: _TrainState,
    files: _RunFiles,
    full: bool = False,
    final_elapsed: float | None = None,
    console: Console | None = None,
) -> dict:
    """Evaluate, log the val row (and print it to `console`) and redraw the loss curve. The final
    evaluation's row is marked as such and carries the training time (`final_elapsed`, the evaluation
    excluded)."""
    val = task.evaluate(model, full=full)
    if console is not None:
        console.print(f"step {state.step}: {_val_line(val)}")
    if final_elapsed is None:
        row = {"step": state.step, "split": "val", **val, "elapsed": state.elapsed()}
    else:
        row = {"step": state.step, "split": "val", **val, "final": True, "elapsed": final_elapsed}
    files.log(row)
    files.plot()
    return val


def _read_metrics(path: Path, upto_step: int | None) -> list[dict]:
    """The rows of a metrics.jsonl up to `upto_step` (None: all); unreadable lines, and rows whose step
    goes backwards (left by an older, overlapping run), are skipped."""
    if not path.exists():
        return []
    rows: list[dict] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            r = json.loads(line)
            step = r.get("step", 0)
            if (upto_step is None or step <= upto_step) and step >= (rows[-1].get("step", 0) if rows else 0):
                rows.append(r)
    return rows


def _summary(
    state: _TrainState,
    elapsed: float,
    out: Path,
    files: _RunFiles,
    final: dict,
    final_dir: Path | None,
    interrupted: bool,
    parts: _TrainedModel,
) -> dict:
    """What `fit` returns."""
    return {
        "step": state.step,
        "tokens": state.tokens,
        "elapsed": elapsed,
        "final": final,
        **state.best_info(),
        "early_stopped": state.early_stopped,
        "out_dir": str(out),
        "checkpoint": str(step_dir(out, state.step)),
        "final_dir": str(final_dir) if final_dir else None,
        "metrics": str(files.path),
        "plot": str(files.plot_path) if files.plot_path.exists() else None,
        "interrupted": interrupted,
        "precision": parts.precision.to_dict(),
        "optimizer": describe_optimizer(parts.optimizer),
    }


def _progress_bar(
    console: Console, total: int | None, completed: int, log_seconds: float
) -> tuple[Progress, TaskID]:
    """The training progress bar (steps, loss, rate, ETA) and its task; `total` None: not known yet. Off a
    terminal, a log line every `log_seconds` instead (yuyan.progress)."""
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=console.quiet,
        transient=False,
        log_seconds=log_seconds,
        unit="steps",
    )
    return progress, progress.add_task("train", total=total, completed=completed, info="")


class _Interrupt:
    """SIGINT sets a flag; the loop saves a checkpoint at the next step boundary and stops."""

    def __init__(self):
        self.flag, self.prev = False, None

    def __enter__(self):
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

    def requested(self, info: D.DistInfo) -> bool:
        """Whether any rank was interrupted (a collective when distributed: every rank stops together)."""
        flag = torch.tensor(float(self.flag))
        if info.world_size > 1:
            flag = D.all_reduce_mean(flag, info)
        return float(flag) > 0


# ---------------------------------------------------------------------------------------------- resume


def _load_for_resume(
    out: Path, resume: bool, model: nn.Module, export: Export | None, main: bool, console: Console
) -> tuple[dict | None, FolderLock]:
    """The run folder's lock (a second run on it fails at once), then the newest checkpoint's trainer state,
    with its weights loaded into the plain `model` and the temp folders of killed writes removed (rank 0);
    None for a fresh start. A fresh start into a folder that holds checkpoints is refused."""
    lock = lock_run_dir(out, main)
    ckpt = latest_checkpoint(out) if resume else None
    if not resume and list_checkpoints(out):
        raise UserError(
            f"{out} already holds checkpoints; pass --resume to continue that run or choose another "
            "--checkpoint.dir"
        )
    if ckpt is None:
        return None, lock
    verify_manifest(ckpt)
    tstate = load_trainer_state(ckpt)
    if tstate is None:
        raise UserError(
            f"{ckpt} has no trainer_state.pt, so it cannot be resumed; delete it or start a new run"
        )
    if export is None:
        _load_checkpoint_weights(model, ckpt)
    else:  # the training module (LoRA, a head) is saved whole in the trainer state
        if "model" not in tstate:
            raise UserError(f"{ckpt} holds no training-model state; it was not written by this task")
        _check_state_fits(model, tstate["model"], str(ckpt))
        model.load_state_dict(tstate["model"])
    if main:
        clean_temp(out)
    console.print(f"resumed from {ckpt} at step {tstate['step']}")
    return tstate, lock


def _restore_training_state(
    tstate: dict | None,
    parts: _TrainedModel,
    data_gen: torch.Generator,
    task: Task,
    info: D.DistInfo,
    console: Console,
) -> None:
    """A resumed run's optimizer, RNG (the data order) and task states; nothing on a fresh start."""
    if tstate is not None:
        changed = D.load_optim_state(parts.raw, parts.optimizer, tstate["optimizer"], info)
        if changed:
            console.print(f"resume: this run's optimizer settings apply: {'; '.join(changed)}")
        _set_rng_state(tstate["rng"], data_gen)
        task.load_state_dict(tstate.get("task", {}))


def _load_checkpoint_weights(model: nn.Module, ckpt: Path) -> None:
    """The checkpoint's model.safetensors into `model`, refused when it was trained with another config."""
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
        changes = ", ".join(f"{k}: {saved_cfg[k]} vs {now[k]}" for k in diff[:3])
        raise UserError(
            f"{ckpt} was trained with another model config ({changes}); "
            "use a new --checkpoint.dir or the same settings"
        )
    load_state(model, sd, str(ckpt))


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
