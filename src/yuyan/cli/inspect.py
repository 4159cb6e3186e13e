"""`yuyan inspect ...`: attention maps, logit lens, per-token surprise and input attribution.

Thin calls into `yuyan.interpret`; every command writes PNG/HTML/JSON files into `--out DIR` and prints
their paths and a short summary.
"""

from __future__ import annotations

from pathlib import Path

import typer

from yuyan.cli.app import app
from yuyan.cli.common import FORCE, MODEL, load_model, output_dir
from yuyan.errors import UserError

inspect_app = typer.Typer(
    help="Look inside a model: attention, logit-lens, surprise, attribution.", no_args_is_help=True
)
app.add_typer(inspect_app, name="inspect")

TEXT = typer.Option(..., "--prompt", "--text", "-p", help="the input text")
OUT = typer.Option(Path("inspect"), "--out", help="folder for the PNG/HTML/JSON files")


@inspect_app.command("attention")
def attention_cmd(
    model: str = MODEL,
    text: str = TEXT,
    out: Path = OUT,
    force: bool = FORCE,
    layers: str = typer.Option(None, help="comma-separated layers to plot (default: all)"),
) -> None:
    """Attention heatmaps: one PNG per layer (a grid of heads) and attention.html to browse them.

    Example: yuyan inspect attention --model runs/demo/final --prompt "def add(a, b):" --out runs/inspect
    """
    from yuyan.interpret.attention import render_attention

    try:
        chosen = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise UserError(f"--layers {layers!r} must be comma-separated integers, e.g. 0,3") from None
    output_dir(out, force, model, command="inspect")
    lm = load_model(model)
    r = render_attention(lm.model, lm.tokenizer, text, out, chosen, title=str(model))
    print(f"{len(r['tokens'])} tokens, {len(r['pngs'])} layer maps")
    for p in [*r["pngs"], r["html"]]:
        print(f"wrote {p}")


@inspect_app.command("logit-lens")
def logit_lens_cmd(
    model: str = MODEL,
    text: str = TEXT,
    out: Path = OUT,
    force: bool = FORCE,
    positions: int = typer.Option(32, help="plot the last N positions"),
    top_k: int = typer.Option(5, help="predictions kept per cell in logit_lens.json"),
) -> None:
    """Top next-token prediction of every layer at every position (logit_lens.png, logit_lens.json).

    Example: yuyan inspect logit-lens --model runs/demo/final --prompt "import os" --out runs/inspect
    """
    from yuyan.interpret.logit_lens import render_logit_lens

    output_dir(out, force, model, command="inspect")
    lm = load_model(model)
    r = render_logit_lens(lm.model, lm.tokenizer, text, out, positions, top_k)
    last = [row[-1][0] for row in r["top_tokens"]]
    print(
        "prediction after the last token, by layer: "
        + " | ".join(f"{name}: {tok!r}" for name, tok in zip(r["rows"], last, strict=True))
    )
    print(f"wrote {r['png']}\nwrote {r['json']}")


@inspect_app.command("surprise")
def surprise_cmd(
    model: str = MODEL,
    text: str = TEXT,
    out: Path = OUT,
    force: bool = FORCE,
    top: int = typer.Option(10, help="how many of the hardest tokens to list"),
) -> None:
    """The text coloured by per-token loss (surprise.html) and the hardest tokens.

    Example: yuyan inspect surprise --model runs/demo/final --text "for i in range(10):" --out runs/inspect
    """
    from yuyan.interpret.surprise import render_surprise

    output_dir(out, force, model, command="inspect")
    lm = load_model(model)
    r = render_surprise(lm.model, lm.tokenizer, text, out, top)
    print(f"mean loss {r['mean_loss']:.3f} nats/token, {r['bits_per_byte']:.3f} bits/byte; hardest tokens:")
    for h in r["hardest"]:
        print(f"  #{h['index']:<4} {h['token']!r:<20} {h['loss']:.2f} nats")
    print(f"wrote {r['html']}")


@inspect_app.command("attribution")
def attribution_cmd(
    model: str = MODEL,
    text: str = TEXT,
    out: Path = OUT,
    force: bool = FORCE,
    target: str = typer.Option(
        None, help="label (classifier) or next token (language model); default: the prediction"
    ),
    steps: int = typer.Option(64, help="integrated-gradient steps (trapezoid rule)"),
    baseline: str = typer.Option("zeros", help="integrated-gradient baseline: zeros | pad"),
    mode: str = typer.Option("drop", help="occlusion: drop each token | replace it with the pad token"),
) -> None:
    """Which input tokens drove the decision: integrated gradients and occlusion (HTML + bar-chart PNGs).

    A checkpoint with a classification head explains its label; any other model its next token.
    Example: yuyan inspect attribution --model runs/sentiment/final --text "a dull, tedious film" --target negative
    """
    from yuyan.interpret.attribution import Decision, render_attribution

    output_dir(out, force, model, command="inspect")
    lm = load_model(model)
    if lm.meta.get("task") == "classify":
        from yuyan.model.heads import Classifier

        decision = Decision.classifier(Classifier.from_language_model(lm), text, target)
    else:
        decision = Decision.next_token(lm.model, lm.tokenizer, text, target)
    r = render_attribution(decision, lm.tokenizer, out, steps, baseline, mode)
    ig = r["ig"]
    print(
        f"{decision.kind} target {r['target']!r}: f(input) {ig['f_input']:.4f}, f(baseline) {ig['f_baseline']:.4f}, "
        f"completeness gap {ig['delta']:+.2e}"
    )
    order = sorted(range(len(r["tokens"])), key=lambda i: -abs(float(r["occlusion"]["effects"][i])))[:5]
    print(
        "largest occlusion effects: "
        + ", ".join(f"{r['tokens'][i]!r} {float(r['occlusion']['effects'][i]):+.3f}" for i in order)
    )
    for p in [r["html"], *r["pngs"], r["json"]]:
        print(f"wrote {p}")
