"""`yuyan finetune`: full or LoRA fine-tuning of a checkpoint or Hugging Face folder for lm, sft or classify.

A thin adapter over `yuyan.train.finetune.finetune`; training settings come from the TrainConfig
dataclass (an optional --config TOML plus `--section.key value` overrides, e.g. `--train.lr 1e-4`), with
the most common ones (--max-steps, --max-time, --lr, --batch-size) and the DP ones (--dp-epsilon,
--dp-delta, --dp-max-grad-norm: the [privacy] section) as direct options. --help lists every setting with
its fine-tuning default. A time budget given alone (--max-time, or train.max_time without train.max_steps)
is the run's only limit: the default step count does not cap it.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from yuyan.cli.app import app
from yuyan.cli.common import FORCE, MODEL, run_folder
from yuyan.cli.train import settings_help
from yuyan.errors import UserError
from yuyan.train.finetune import default_train_config

DEFAULTS = default_train_config()  # the fine-tuning defaults, shown in --help
SECTIONS = ("train", "eval", "checkpoint", "privacy", "distributed")  # what a fine-tuning run reads

EXAMPLE = """
Example:

  yuyan finetune --model runs/demo/final --task sft --data chats.jsonl --lora-rank 8 --save-adapter --out runs/sft

  yuyan finetune --model runs/demo/final --task classify --data reviews.csv --text-field review --label-field stars --out runs/cls

  yuyan finetune --model runs/demo/final --task classify --data train.tsv --text-field 0 --label-field 1 --labels neg,pos --max-time 600 --eval.every 100 --out runs/cls

Settings (--section.key value, e.g. --train.warmup 20; the fine-tuning defaults):

{settings}
"""


@app.command(
    "finetune",
    help="Fine-tune a model (ours or a Hugging Face folder) on lm, sft or classify data, fully or with LoRA.\n"
    + EXAMPLE.format(settings=settings_help(DEFAULTS, SECTIONS)),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def finetune_cmd(
    ctx: typer.Context,
    model: str = MODEL,
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
    pooling: str = typer.Option("last", "--pooling", help="classify: last (last real token) | mean"),
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
        help="seconds of training (train.max_time); alone, it is the only limit (default: none)",
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
    from yuyan.train.config import TrainConfig
    from yuyan.train.finetune import TASKS, FinetuneOptions, finetune

    if task not in TASKS:
        raise UserError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    lock = run_folder(out, force, model, data, val_data, command="finetune")
    overrides = parse_overrides(list(ctx.args))
    for key, val in (
        ("train.max_steps", max_steps),
        ("train.max_time", max_time),
        ("train.lr", lr),
        ("train.batch_size", batch_size),
        ("privacy.epsilon", dp_epsilon),
        ("privacy.delta", dp_delta),
        ("privacy.max_grad_norm", dp_max_grad_norm),
    ):
        if val is not None:
            overrides[key] = str(val)
    toml = load_toml(config) if config else {}
    cfg = from_dict(TrainConfig, toml, str(config)) if config else default_train_config()
    steps_given = "train.max_steps" in overrides or "max_steps" in toml.get("train", {})
    if "train.max_time" in overrides and not steps_given:
        overrides["train.max_steps"] = "0"  # a time budget alone: no step limit besides it
    cfg = apply_overrides(cfg, overrides)
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
        pooling=pooling,
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
            "privacy",
        )
    }
    typer.echo(json.dumps(summary, ensure_ascii=False, default=str))
