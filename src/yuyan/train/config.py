"""The training config: one dataclass per TOML section ([model], [data], [train], [eval], [checkpoint],
[privacy]); fine-tuning adds [classify] (`FinetuneConfig`).

`TrainConfig` is what `yuyan train --config FILE.toml --section.key value` fills (through yuyan.config);
`config_to_toml` writes the resolved config beside the checkpoints as train_config.toml, which loads back
into the same config. The [model] section is derived from `ModelConfig`: a preset name plus every
ModelConfig field, None meaning "the preset's value", so a field added to the model is settable from TOML
and the command line without an edit here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from yuyan.errors import UserError
from yuyan.model.heads import POOLINGS
from yuyan.model.transformer import ModelConfig
from yuyan.train import distributed as D

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CLOCKS = ("wall", "cpu")  # what train.max_time counts (yuyan.train.loop.CLOCKS holds the functions)
# the val metrics eval.best_metric may name: lower is better for the first group, higher for the second
LOWER_IS_BETTER = ("loss", "ppl", "bpb")
HIGHER_IS_BETTER = ("accuracy", "macro_f1")


def _model_overrides(self) -> dict:
    """The ModelConfig fields this section sets (those not None), to apply over the preset."""
    return {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}


def _model_section() -> type:
    hints = typing.get_type_hints(ModelConfig)
    fields = [("preset", str, field(default="demo"))]
    fields += [(f.name, hints[f.name] | None, field(default=None)) for f in dataclasses.fields(ModelConfig)]
    doc = (
        "A model preset plus optional overrides of every ModelConfig field (None: the preset's value; "
        "vocab_size None: the tokenizer's vocabulary size)."
    )
    namespace = {"__doc__": doc, "__module__": __name__, "overrides": _model_overrides}
    return dataclasses.make_dataclass("ModelSection", fields, namespace=namespace)


ModelSection = _model_section()


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
    # what max_time counts: wall (time.perf_counter) | cpu (this process's CPU seconds over all threads,
    # time.process_time: a budget that load on a shared machine does not shrink)
    clock: str = "wall"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast on CUDA; on CPU when a timed bf16 matmul beats fp32 by a margin (yuyan.precision)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; weights and optimizer state stay fp32)
    optimizer: str = "adamw"  # adamw | muon (Muon for 2-D hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's learning rate at the schedule's peak (scaled by the schedule like lr)
    compile: bool = False
    log_every: int = 10
    progress_seconds: float = 10.0  # off a terminal (a log file, a pipe): seconds between progress lines


@dataclass
class EvalSection:
    every: int = 200  # optimizer steps between evaluations (0: only at the end)
    batches: int = 20  # random val batches per periodic evaluation (a fixed set, the same each time)
    final_full: bool = True  # the final evaluation covers the whole validation split
    # the val metric that picks best/ and drives patience: loss | ppl | bpb (lower is better) or, for a
    # task that reports them (classify), accuracy | macro_f1 (higher is better)
    best_metric: str = "loss"
    patience: int = 0  # stop after this many evaluations without a better best_metric (0: never stop early)


@dataclass
class CheckpointSection:
    dir: str = "runs/train"
    every_steps: int = 0  # 0: off
    every_minutes: float = 10.0  # 0: off
    keep_last: int = 2
    save_best: bool = True


@dataclass
class PrivacySection:
    """Differentially private training (yuyan.train.privacy, through Opacus); off while epsilon is None."""

    epsilon: float | None = None  # the target epsilon; the noise is calibrated to reach it at train.max_steps
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # the per-example gradient clipping bound C
    accountant: str = "rdp"  # rdp | prv (Opacus' accountants)

    def enabled(self) -> bool:
        return self.epsilon is not None

    def problems(self, cfg: TrainConfig) -> list[tuple[bool, str]]:
        """(ok, message) checks of the DP settings and of the training settings DP cannot honour."""
        if self.epsilon is None:
            return []
        t = cfg.train
        return [
            (math.isfinite(self.epsilon) and self.epsilon > 0, "privacy.epsilon (--dp-epsilon) must be > 0"),
            (0 < self.delta < 1, "privacy.delta (--dp-delta) must be in (0, 1), e.g. 1e-5"),
            (self.max_grad_norm > 0, "privacy.max_grad_norm (--dp-max-grad-norm) must be > 0"),
            (self.accountant in ("rdp", "prv"), "privacy.accountant must be rdp or prv"),
            (
                t.grad_accum == 1,
                "DP trains on one Poisson-sampled batch per step: set train.grad_accum 1 and raise "
                "train.batch_size (the expected batch) instead",
            ),
            (cfg.distributed in ("auto", "none"), "DP training runs in one process: set distributed none"),
            (t.precision in ("auto", "fp32"), "DP training runs in fp32: set train.precision fp32 (or auto)"),
            (t.optimizer == "adamw", "DP training supports train.optimizer adamw only"),
            (not t.compile, "DP training does not support train.compile"),
            (t.max_steps > 0, "DP needs train.max_steps > 0: the noise is calibrated to the number of steps"),
        ]


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    distributed: str = "auto"  # auto (ddp under torchrun) | none | ddp | fsdp

    def validate(self) -> None:
        t = self.train
        checks = [
            (t.batch_size > 0 and t.grad_accum > 0, "train.batch_size and train.grad_accum must be positive"),
            (t.schedule in ("cosine", "wsd"), f"train.schedule must be cosine or wsd, got {t.schedule!r}"),
            (
                t.precision in PRECISIONS,
                f"train.precision must be {'|'.join(PRECISIONS)}, got {t.precision!r}",
            ),
            (t.optimizer in ("adamw", "muon"), f"train.optimizer must be adamw or muon, got {t.optimizer!r}"),
            (t.muon_lr > 0, "train.muon_lr must be > 0"),
            (
                t.optimizer != "muon" or self.distributed != "fsdp",
                "train.optimizer muon is not supported with distributed = fsdp (Muon orthogonalises whole "
                "matrices, FSDP2 gives each rank a shard of them): use distributed = ddp or train.optimizer adamw",
            ),
            (t.max_steps > 0 or t.max_time > 0, "set train.max_steps or train.max_time (> 0)"),
            (t.clock in CLOCKS, f"train.clock must be {' or '.join(CLOCKS)}, got {t.clock!r}"),
            (t.progress_seconds >= 0, "train.progress_seconds must be >= 0"),
            (len(t.betas) == 2, "train.betas takes two numbers, e.g. 0.9,0.95"),
            (t.lr > 0 and t.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0"),
            (self.distributed in D.STRATEGIES, f"distributed must be one of {', '.join(D.STRATEGIES)}"),
            (
                self.eval.best_metric in LOWER_IS_BETTER + HIGHER_IS_BETTER,
                f"eval.best_metric must be one of {'|'.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)}, "
                f"got {self.eval.best_metric!r}",
            ),
            (self.eval.patience >= 0, "eval.patience must be >= 0 (0: no early stopping)"),
            (
                self.eval.patience == 0 or self.eval.every > 0,
                "eval.patience needs periodic evaluations: set eval.every > 0",
            ),
            *self.privacy.problems(self),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"bad training config: {msg}")


@dataclass
class ClassifySection:
    """The classification recipe (`yuyan finetune --task classify`); defaults from the sweep in BENCHMARKS.md,
    "Classification vs TF-IDF (issue 20)"."""

    pooling: str = "last"  # last (the last real token's hidden state) | mean (over the real tokens)
    dropout: float = 0.0  # on the pooled state, before the linear head (training only)
    class_weights: str = "none"  # none | balanced (n / (k * n_label)) | LABEL=W,LABEL=W (others 1)
    bucket: bool = True  # batches of similar length (less padding); every example once per epoch
    val_examples: int = 512  # periodic evaluations score a fixed sample of this many val examples (0: all)
    # GPT-1's auxiliary objective (Radford et al. 2018, sec. 3.2): loss = CE(labels) + lm_weight * the
    # next-token loss on the same texts, from the same forward pass (0: off; GPT-1 used 0.5). Training only
    lm_weight: float = 0.0

    def problems(self) -> list[tuple[bool, str]]:
        return [
            (
                self.pooling in POOLINGS,
                f"classify.pooling must be {'|'.join(POOLINGS)}, got {self.pooling!r}",
            ),
            (0.0 <= self.dropout < 1.0, "classify.dropout must be in [0, 1)"),
            (self.val_examples >= 0, "classify.val_examples must be >= 0 (0: the whole val split)"),
            (
                math.isfinite(self.lm_weight) and self.lm_weight >= 0,
                f"classify.lm_weight must be >= 0 (0: off; GPT-1 used 0.5), got {self.lm_weight}",
            ),
        ]


@dataclass
class FinetuneConfig(TrainConfig):
    """What `yuyan finetune` reads: the training sections plus [classify]."""

    classify: ClassifySection = field(default_factory=ClassifySection)

    def validate(self) -> None:
        super().validate()
        for ok, msg in self.classify.problems():
            if not ok:
                raise UserError(f"bad training config: {msg}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table, e.g. rope_scaling = {"rope_type" = "llama3", "factor" = 8.0}
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v), ensure_ascii=False)


def config_to_toml(cfg: Any) -> str:
    """A resolved dataclass config as TOML: top-level keys, then one table per dataclass section (None values
    are left out, meaning 'the default')."""

    def lines(obj: Any) -> list[str]:
        return [
            f"{f.name} = {_toml_value(v)}"
            for f in dataclasses.fields(obj)
            if (v := getattr(obj, f.name)) is not None and not dataclasses.is_dataclass(v)
        ]

    out = lines(cfg)
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            out += ["", f"[{f.name}]", *lines(section)]
    return "\n".join(out) + "\n"
