"""`yuyan audit`: memorisation audits (yuyan.evaluate.memorization).

`audit canaries insert` writes a copy of a corpus with secret canaries; after training on that copy,
`audit canaries report` gives each canary's exposure and whether greedy decoding extracts it; `audit
extraction` measures verbatim training n-grams in the model's samples. Thin adapters; output is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from yuyan.cli.app import app
from yuyan.cli.common import FORCE, MODEL, load_model, output_dir
from yuyan.errors import UserError

audit = typer.Typer(
    help="Memorisation audits: secret canaries (exposure) and verbatim extraction.", no_args_is_help=True
)
canaries = typer.Typer(
    help="Secret canaries (Carlini et al., The Secret Sharer): insert, then report.", no_args_is_help=True
)
audit.add_typer(canaries, name="canaries")
app.add_typer(audit, name="audit")


def _repeats(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--repeats takes comma-separated counts, e.g. 1,10,100; got {text!r}") from None


@canaries.command(
    "insert",
    help="Copy a corpus into OUT/corpus.jsonl with canaries inserted; OUT/canaries.json describes them.\n\nExample:\n\n  yuyan audit canaries insert --corpus stdlib --out runs/canary-data --repeats 1,10,100",
)
def insert_cmd(
    corpus: str = typer.Option(..., "--corpus", help="a file, folder, glob, JSONL or stdlib"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    repeats: str = typer.Option(
        "1,10,100", "--repeats", help="one canary per count, inserted that many times"
    ),
    holdout: int = typer.Option(2, "--holdout", help="control canaries never inserted"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = FORCE,
) -> None:
    from yuyan.evaluate.memorization import insert_canaries

    counts = _repeats(repeats)
    output_dir(out, force, corpus, command="audit canaries insert")
    desc = insert_canaries(corpus, out, counts, seed=seed, holdout=holdout)
    typer.echo(
        json.dumps(
            {"corpus": desc["corpus"], "canaries": str(out / "canaries.json"), "documents": desc["documents"]}
        )
    )


@canaries.command(
    "report",
    help="Exposure of each canary and whether greedy decoding extracts it.\n\nExample:\n\n  yuyan audit canaries report --model runs/canary/final --canaries runs/canary-data/canaries.json",
)
def report_cmd(
    model: str = MODEL,
    canaries_json: Path = typer.Option(..., "--canaries", help="canaries.json from `audit canaries insert`"),
    candidates: int = typer.Option(1000, "--candidates", help="N: the secret ranked among N - 1 random ones"),
    seed: int = typer.Option(1, "--seed"),
) -> None:
    from yuyan.evaluate.memorization import canary_exposure

    rows = canary_exposure(load_model(model), canaries_json, candidates=candidates, seed=seed)
    for r in rows:
        typer.echo(json.dumps({k: v for k, v in r.items() if k != "greedy_text"}))


@audit.command(
    "extraction",
    help="Sample from the model; the fraction of sampled token n-grams found verbatim in the training corpus.\n\nExample:\n\n  yuyan audit extraction --model runs/demo/final --corpus stdlib --samples 100 --n 8",
)
def extraction_cmd(
    model: str = MODEL,
    corpus: str = typer.Option(..., "--corpus", help="the training corpus (its train split is read)"),
    samples: int = typer.Option(100, "--samples"),
    n: int = typer.Option(8, "--n", help="n-gram length in tokens"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature"),
    max_tokens: int = typer.Option(
        50_000_000, "--max-tokens", help="corpus tokens hashed at most (8 bytes each)"
    ),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    from yuyan.evaluate.memorization import extraction_overlap

    res = extraction_overlap(
        load_model(model), corpus, samples=samples, n=n, max_new_tokens=max_new_tokens,
        temperature=temperature, seed=seed, max_tokens=max_tokens,
    )  # fmt: skip
    typer.echo(json.dumps(res, ensure_ascii=False))
