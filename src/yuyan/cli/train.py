"""`yuyan train` (pre-training from a TOML config plus `--section.key value` overrides) and `yuyan demo`.

Both are thin adapters: `train` calls `yuyan.train.pretrain.train`, `demo` calls `yuyan.train.demo.run_demo`.
The settings a user may override are exactly the fields of the `TrainConfig` dataclasses; the help text
lists them, derived from the dataclasses, and an unknown key is a one-line error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from yuyan.cli import app
from yuyan.cli.common import FORCE, run_folder
from yuyan.train.config import TrainConfig


def settings_help(cfg: TrainConfig | None = None, sections: tuple[str, ...] | None = None) -> str:
    """Every overridable setting with its default (`cfg`'s values; by default the TrainConfig
    dataclasses'), derived from the dataclasses; only the top-level `sections` when given."""
    cfg = cfg or TrainConfig()
    lines = []
    for f in dataclasses.fields(cfg):
        if sections is not None and f.name not in sections:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys = ", ".join(f"{f.name}.{g.name}={getattr(value, g.name)}" for g in dataclasses.fields(value))
            lines.append(f"  {keys}")
        else:
            lines.append(f"  {f.name}={value}")
    return "\n\n".join(lines)


TRAIN_HELP = f"""Pre-train a model: tokenizer -> token shards -> model preset -> training loop (also under torchrun).

Settings come from a TOML file (see configs/) and --section.key value overrides; under
`torchrun --nproc_per_node=N` the same command trains with DDP (or FSDP with --distributed fsdp).

Example:

  yuyan train --config configs/demo.toml --train.max_time 600 --checkpoint.dir runs/mine

  torchrun --nproc_per_node=2 -m yuyan train --config configs/demo.toml --distributed ddp

  yuyan train --config configs/demo.toml --dp-epsilon 8 --dp-delta 1e-5 --checkpoint.dir runs/dp

Settings (--section.key value):

{settings_help()}
"""


@app.command(
    "train", help=TRAIN_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def train_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(
        None,
        "--config",
        "-c",
        help="TOML config file (configs/demo.toml, ...) (default: none, the settings above)",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue from the newest checkpoint in checkpoint.dir"
    ),
    dp_epsilon: float | None = typer.Option(
        None,
        "--dp-epsilon",
        help="differentially private training (Opacus DP-SGD) to this epsilon (default: none, no DP)",
    ),
    dp_delta: float | None = typer.Option(None, "--dp-delta", help="DP delta (privacy.delta, default 1e-5)"),
    dp_max_grad_norm: float | None = typer.Option(
        None, "--dp-max-grad-norm", help="DP per-example clipping bound (privacy.max_grad_norm, default 1.0)"
    ),
    force: bool = FORCE,
) -> None:
    from yuyan.config import parse_overrides
    from yuyan.train.pretrain import load_train_config, train

    overrides = parse_overrides(list(ctx.args))
    for key, val in (
        ("privacy.epsilon", dp_epsilon),
        ("privacy.delta", dp_delta),
        ("privacy.max_grad_norm", dp_max_grad_norm),
    ):
        if val is not None:
            overrides[key] = str(val)
    cfg = load_train_config(config, overrides)
    with run_folder(cfg.checkpoint.dir, force, cfg.data.corpus, command="train"):
        train(cfg, resume=resume)


DEMO_HELP = """The main job: pre-train a small GPT on Python's own standard library for a time budget, then
report held-out bits per byte and perplexity, complete three code prompts and draw a loss curve and an
attention heatmap. Nothing is downloaded. A re-run reuses the tokenizer and shards and resumes (or reuses)
the checkpoint; extra --section.key value settings override the demo's (see `yuyan train --help`).

Example:

  yuyan demo --minutes 5 --out runs/demo
"""


@app.command(
    "demo", help=DEMO_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def demo_cmd(
    ctx: typer.Context,
    minutes: float = typer.Option(
        5.0, "--minutes", help="training budget in minutes (set-up and evaluation excluded)"
    ),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="output folder"),
    corpus: str = typer.Option("stdlib", "--corpus", help="a file, folder, glob, JSONL or stdlib"),
    finetune: bool = typer.Option(
        False,
        "--finetune",
        help="then fine-tune the demo model on the embedded docstring task and report ROUGE-L and BLEU",
    ),
    finetune_minutes: float = typer.Option(2.0, "--finetune-minutes", help="fine-tuning budget in minutes"),
    force: bool = FORCE,
) -> None:
    import json

    from yuyan.config import parse_overrides
    from yuyan.train.demo import run_demo

    with run_folder(out, force, None if corpus == "stdlib" else corpus, command="demo"):
        run_demo(minutes, out, corpus, parse_overrides(list(ctx.args)))
    if not finetune:
        return
    from yuyan.train.finetune import run_docstring_finetune

    ft_dir = out / "finetune"
    scores_file = ft_dir / "docstring_scores.json"
    if scores_file.exists():  # a re-run reports the finished fine-tune instead of training again
        scores = json.loads(scores_file.read_text(encoding="utf-8"))
    else:
        scores = run_docstring_finetune(out / "final", ft_dir, finetune_minutes, spec=corpus)
    print(
        f"docstring task (function -> first docstring line), {scores['eval_pairs']} held-out pairs: "
        f"ROUGE-L {scores['rouge_l_before']:.1f} -> {scores['rouge_l_after']:.1f}, "
        f"BLEU {scores['bleu_before']:.1f} -> {scores['bleu_after']:.1f}  ({ft_dir})"
    )
