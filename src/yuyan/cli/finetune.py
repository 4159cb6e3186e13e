"""`yuyan finetune`: full or LoRA fine-tuning of a checkpoint or Hugging Face folder for lm, sft or classify.

A thin adapter over `yuyan.train.finetune.finetune`; training settings come from the TrainConfig
dataclass (an optional --config TOML plus `--section.key value` overrides, e.g. `--train.lr 1e-4`), with
the most common ones (--max-steps, --max-time, --lr, --batch-size) and the DP ones (--dp-epsilon,
--dp-delta, --dp-max-grad-norm: the [privacy] section) as direct options. The classification recipe's
options (--pooling, --dropout, --class-weights, --bucket, --val-examples, --lm-weight: the [classify]
section; --best-metric, --patience: [eval]) are direct options too, and --pretrain-minutes pre-trains a
model and tokenizer on the classification data's own texts before fine-tuning (no --model then). --help lists
every setting with its fine-tuning default. A time budget given alone (--max-time, or train.max_time
without train.max_steps) is the run's only limit: the default step count does not cap it; --train.clock cpu
makes it (and --pretrain-minutes) CPU time, which load from other processes does not shrink.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from yuyan.cli.app import app
from yuyan.cli.common import FORCE, MODEL_HELP, run_folder
from yuyan.cli.train import settings_help
from yuyan.errors import UserError
from yuyan.train.finetune import default_train_config

DEFAULTS = default_train_config()  # the fine-tuning defaults, shown in --help
SECTIONS = (
    "train",
    "eval",
    "checkpoint",
    "privacy",
    "distributed",
    "classify",
)  # what a fine-tuning run reads

EXAMPLE = """
Example:

  yuyan finetune --model runs/demo/final --task sft --data chats.jsonl --lora-rank 8 --save-adapter --out runs/sft

  yuyan finetune --model runs/demo/final --task classify --data reviews.csv --text-field review --label-field stars --out runs/cls

  yuyan finetune --model runs/demo/final --task classify --data train.tsv --text-field 0 --label-field 1 --labels neg,pos --max-time 600 --eval.every 100 --out runs/cls

  yuyan finetune --task classify --data reviews.csv --pretrain-minutes 4 --max-time 150 --out runs/cls

Settings (--section.key value, e.g. --train.warmup 20; the fine-tuning defaults):

{settings}
"""

# the [classify] defaults (yuyan.train.config.ClassifySection; tests/test_classify_recipe.py holds these
# help texts to them), written out so that `--help` needs no torch import
CLASSIFY_HELP = {
    "pooling": "classify: last (last real token) | mean (over the real tokens) (default: last)",
    "dropout": "classify: dropout on the pooled state before the head (default: 0.0)",
    "class_weights": "classify: loss weights: none | balanced | LABEL=W,LABEL=W (others 1) (default: none)",
    "bucket": "classify: batches of similar length, every example once per epoch (default: bucket)",
    "val_examples": "classify: periodic evaluations score a fixed sample of this many val examples; "
    "the final one all (0: all) (default: 512)",
    "lm_weight": "classify: GPT-1's auxiliary objective, this weight times the next-token loss on the same "
    "texts added to the training loss; 0: off, GPT-1 used 0.5 (default: 0.0)",
}


def _check_recipe_flags(
    task: str, model: str | None, classify_flags: dict, pretrain_minutes: float, best_metric: str | None
) -> None:
    """The classification recipe's flags, refused (one line) where they cannot apply."""
    if task != "classify":
        given = [k for k, v in classify_flags.items() if v is not None]
        if given:
            raise UserError(f"{', '.join(given)} applies to --task classify only (this run is --task {task})")
    if pretrain_minutes < 0:
        raise UserError(f"--pretrain-minutes must be >= 0 (0: off), got {pretrain_minutes:g}")
    if model is None and not pretrain_minutes:
        raise UserError(
            "no model: pass --model M, or --pretrain-minutes M to pre-train one on the task's text"
        )
    if model is not None and pretrain_minutes:
        raise UserError(
            "--pretrain-minutes pre-trains a new model and tokenizer on the task's text; drop --model "
            "(or drop --pretrain-minutes to fine-tune --model)"
        )
    if best_metric is not None and best_metric not in ("accuracy", "macro_f1", "loss"):
        raise UserError(f"--best-metric must be accuracy, macro_f1 or loss, got {best_metric!r}")
    if best_metric in ("accuracy", "macro_f1") and task != "classify":
        raise UserError(f"--best-metric {best_metric} is a classification metric; --task {task} reports loss")


@app.command(
    "finetune",
    help="Fine-tune a model (ours or a Hugging Face folder) on lm, sft or classify data, fully or with LoRA.\n"
    + EXAMPLE.format(settings=settings_help(DEFAULTS, SECTIONS)),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def finetune_cmd(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None, "--model", "-m", help=MODEL_HELP + " (required unless --pretrain-minutes; default: none)"
    ),
    task: str = typer.Option("sft", "--task", help="lm | sft | classify"),
    data: str = typer.Option(
        ...,
        "--data",
        help="sft: JSONL (messages or prompt/completion) or CSV/TSV with prompt,completion columns; "
        "classify: CSV, TSV or JSONL; lm: a text file, folder, glob, JSONL or stdlib",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (checkpoints, final/, best/, adapter/)"),
    val_data: str = typer.Option(
        "",
        "--val-data",
        help="sft/classify validation file (default: a deterministic 10% of --data; lm uses the corpus split)",
    ),
    lora_rank: int = typer.Option(0, "--lora-rank", help="LoRA rank; 0 = full fine-tuning"),
    lora_alpha: float = typer.Option(
        16.0, "--lora-alpha", help="LoRA scaling numerator (scale = alpha / rank)"
    ),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
    lora_targets: str = typer.Option(
        "q_proj,v_proj",
        "--lora-targets",
        help="comma-separated module-name suffixes, e.g. q_proj,k_proj,v_proj,o_proj",
    ),
    save_adapter: bool = typer.Option(
        False,
        "--save-adapter",
        help="also write the LoRA adapter alone to OUT/adapter (final/ is always merged)",
    ),
    text_field: str = typer.Option(
        "text",
        "--text-field",
        help="classify: the text column, by name or 0-based index (a file without header)",
    ),
    label_field: str = typer.Option(
        "label", "--label-field", help="classify: the label column, by name or 0-based index"
    ),
    labels: str | None = typer.Option(
        None,
        "--labels",
        help="classify: class names, e.g. neg,pos (the data's labels are those names, or 0,1 for neg,pos), "
        "or VALUE=NAME pairs, e.g. 1=neg,2=pos (default: the data's label values)",
    ),
    pooling: str | None = typer.Option(None, "--pooling", help=CLASSIFY_HELP["pooling"]),
    dropout: float | None = typer.Option(None, "--dropout", help=CLASSIFY_HELP["dropout"]),
    class_weights: str | None = typer.Option(None, "--class-weights", help=CLASSIFY_HELP["class_weights"]),
    bucket: bool | None = typer.Option(None, "--bucket/--no-bucket", help=CLASSIFY_HELP["bucket"]),
    val_examples: int | None = typer.Option(None, "--val-examples", help=CLASSIFY_HELP["val_examples"]),
    lm_weight: float | None = typer.Option(None, "--lm-weight", help=CLASSIFY_HELP["lm_weight"]),
    best_metric: str | None = typer.Option(
        None,
        "--best-metric",
        help="the val metric that picks best/ and drives --patience: accuracy | macro_f1 | loss "
        "(default: accuracy for classify, loss otherwise)",
    ),
    patience: int | None = typer.Option(
        None,
        "--patience",
        help="stop after this many evaluations (every --eval.every steps) without a better --best-metric; "
        "0: never (default: 8 for classify, 0 otherwise)",
    ),
    pretrain_minutes: float = typer.Option(
        0.0,
        "--pretrain-minutes",
        help="classify: first train a tokenizer and pre-train the demo model on the training texts for "
        "this many minutes (of --train.clock: wall, or CPU with cpu) (in OUT/pretrain), then fine-tune it; "
        "no --model (default: 0, off)",
    ),
    pretrain_corpus: str | None = typer.Option(
        None,
        "--pretrain-corpus",
        help="classify with --pretrain-minutes: more unlabelled text to pre-train on besides the training "
        "texts, any --corpus spec (files, folder, glob, JSONL, Parquet); keep the test rows out of it "
        "(default: none)",
    ),
    template: str = typer.Option(
        "chat", "--template", help="sft prompt/completion: chat (role tokens) | plain"
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="TrainConfig TOML (train/eval/checkpoint sections) (default: none, the settings below)",
    ),
    max_steps: int | None = typer.Option(
        None,
        "--max-steps",
        help=f"optimizer steps (train.max_steps) (default: {DEFAULTS.train.max_steps}; "
        "with --max-time alone: no step limit)",
    ),
    max_time: float | None = typer.Option(
        None,
        "--max-time",
        help="seconds of training (train.max_time), counted on --train.clock: wall | cpu (this process's "
        f"CPU time, all threads) (default: none; clock {DEFAULTS.train.clock}); alone, it is the only limit",
    ),
    lr: float | None = typer.Option(
        None, "--lr", help=f"peak learning rate (train.lr) (default: {DEFAULTS.train.lr})"
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help=f"examples per micro-batch (train.batch_size) (default: {DEFAULTS.train.batch_size})",
    ),
    dp_epsilon: float | None = typer.Option(
        None,
        "--dp-epsilon",
        help="differentially private training (Opacus DP-SGD) to this epsilon (default: none, no DP)",
    ),
    dp_delta: float | None = typer.Option(
        None, "--dp-delta", help=f"DP delta (default: {DEFAULTS.privacy.delta})"
    ),
    dp_max_grad_norm: float | None = typer.Option(
        None,
        "--dp-max-grad-norm",
        help=f"DP per-example gradient clipping bound (default: {DEFAULTS.privacy.max_grad_norm})",
    ),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in OUT"),
    force: bool = FORCE,
) -> None:
    from yuyan.config import apply_overrides, from_dict, load_toml, parse_overrides
    from yuyan.model.lora import LoRAConfig
    from yuyan.train.config import FinetuneConfig
    from yuyan.train.finetune import TASKS, FinetuneOptions, default_train_config, finetune

    if task not in TASKS:
        raise UserError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    classify_flags = {
        "--pooling": pooling,
        "--dropout": dropout,
        "--class-weights": class_weights,
        "--bucket/--no-bucket": bucket,
        "--val-examples": val_examples,
        "--lm-weight": lm_weight,
        "--pretrain-minutes": pretrain_minutes or None,
    }
    _check_recipe_flags(task, model, classify_flags, pretrain_minutes, best_metric)
    if pretrain_corpus is not None and not pretrain_minutes:
        raise UserError("--pretrain-corpus adds text to the pre-training of --pretrain-minutes; give both")
    lock = run_folder(out, force, *([model] if model else []), data, val_data, command="finetune")
    overrides = parse_overrides(list(ctx.args))
    for key, val in (
        ("train.max_steps", max_steps),
        ("train.max_time", max_time),
        ("train.lr", lr),
        ("train.batch_size", batch_size),
        ("privacy.epsilon", dp_epsilon),
        ("privacy.delta", dp_delta),
        ("privacy.max_grad_norm", dp_max_grad_norm),
        ("classify.pooling", pooling),
        ("classify.dropout", dropout),
        ("classify.class_weights", class_weights),
        ("classify.bucket", bucket),
        ("classify.val_examples", val_examples),
        ("classify.lm_weight", lm_weight),
        ("eval.best_metric", best_metric),
        ("eval.patience", patience),
    ):
        if val is not None:
            overrides[key] = str(val)
    toml = load_toml(config) if config else {}
    cfg = from_dict(FinetuneConfig, toml, str(config)) if config else default_train_config(task)
    steps_given = "train.max_steps" in overrides or "max_steps" in toml.get("train", {})
    if "train.max_time" in overrides and not steps_given:
        overrides["train.max_steps"] = "0"  # a time budget alone: no step limit besides it
    cfg = apply_overrides(cfg, overrides)
    patience_given = "eval.patience" in overrides or "patience" in toml.get("eval", {})
    if cfg.eval.every == 0 and not patience_given:
        cfg.eval.patience = 0  # the classify default's early stopping needs periodic evaluations: none asked
    cfg.validate()  # bad settings (a DP epsilon <= 0, ...) before the model is loaded
    lora = None
    if lora_rank > 0:
        lora = LoRAConfig(
            lora_rank, lora_alpha, lora_dropout, [t.strip() for t in lora_targets.split(",") if t.strip()]
        )
    opts = FinetuneOptions(
        task=task,
        data=data,
        val_data=val_data,
        lora=lora,
        save_adapter=save_adapter,
        text_field=text_field,
        label_field=label_field,
        pretrain_minutes=pretrain_minutes,
        pretrain_corpus=pretrain_corpus,
        template=template,
        labels=labels.split(",") if labels is not None else None,
    )
    with lock:
        res = finetune(model, out, opts, cfg, resume=resume)
    summary = {
        k: res.get(k)
        for k in (
            "step",
            "final",
            "final_dir",
            "adapter_dir",
            "confusion_png",
            "data",
            "trainable_params",
            "total_params",
            "interrupted",
            "early_stopped",
            "best",
            "pretrain",
            "privacy",
        )
    }
    typer.echo(json.dumps(summary, ensure_ascii=False, default=str))
