"""`yuyan run TASK`: the task pipelines of `yuyan.apps` from the command line.

TASK is generate, chat, summarize, translate, qa, sentiment or code. The input is --prompt TEXT (or
--file PATH, or stdin when neither is given); `chat` without --prompt is the chat loop of `yuyan chat`
(`yuyan.apps.repl`) over stdin. Thin adapter: every option maps onto the pipeline's keyword of the same
name. The generation options are the `GenerationConfig` settings a pipeline takes (cli/common.py); those
left unset keep the task's defaults, and an option the task does not use is an error, never ignored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from yuyan.cli.app import app
from yuyan.cli.common import MODEL, generation_overrides, load_model, setting_flags
from yuyan.errors import UserError

EXAMPLE = """
Examples:

  yuyan run summarize --model runs/demo/final --prompt "Long text ..."

  yuyan run translate --model M --prompt "Good morning" --source English --target Chinese

  yuyan run qa --model M --prompt "Who wrote it?" --context "The book was written by Lu Xun."

  yuyan run sentiment --model runs/cls/final --prompt "这部电影很好看" --json

  yuyan run code --model M --prompt "def fibonacci(n):"

  printf 'hello\\n/reset\\nhi\\n/exit\\n' | yuyan run chat --model runs/sft

Generation settings left unset keep the task's defaults (yuyan.apps.DEFAULTS).
"""
# the options only some tasks read: given to another task they are an error
TASK_OPTIONS = {
    "context": "qa",
    "source": "translate",
    "target": "translate",
    "system": "chat",
    "labels": "sentiment",
}


def _read_input(prompt: str | None, file: Path | None) -> str | None:
    if prompt is not None:
        return prompt
    if file is not None:
        if not file.is_file():
            raise UserError(f"input file {file} not found")
        return file.read_text(encoding="utf-8")
    return None


def _check_options(task: str, given: dict, gen: dict) -> None:
    """An option the task does not read is an error naming it (nothing is silently ignored)."""
    from yuyan.apps import GENERATING

    wrong = [f"--{name}" for name, value in given.items() if value is not None and TASK_OPTIONS[name] != task]
    if wrong:
        owners = ", ".join(sorted({TASK_OPTIONS[w[2:]] for w in wrong}))
        raise UserError(f"{task} does not take {', '.join(wrong)}; those are for {owners}")
    if gen and task not in GENERATING:
        raise UserError(f"{task} scores label words and generates nothing; drop {setting_flags(set(gen))}")


def _emit(result, as_json: bool) -> None:
    typer.echo(json.dumps(result, ensure_ascii=False) if as_json or not isinstance(result, str) else result)


def _sentiment(lm, text: str, labels: str | None, as_json: bool) -> None:
    from yuyan import apps

    words = [w.strip() for w in labels.split(",")] if labels else None
    lines = [t for t in text.splitlines() if t.strip()] or [text]
    for t, (label, probs) in zip(lines, apps.sentiment(lm, lines, labels=words), strict=True):
        _emit({"text": t, "label": label, "probs": probs} if as_json else f"{label}\t{t}", as_json)


@app.command(
    "run", help="Run a task pipeline (generate, chat, summarize, translate, qa, sentiment, code).\n" + EXAMPLE
)
@generation_overrides(exclude=("n", "logprobs", "stop_token_ids", "context_overflow"))
def run_cmd(
    task: str = typer.Argument(..., help="generate | chat | summarize | translate | qa | sentiment | code"),
    model: str = MODEL,
    prompt: str | None = typer.Option(
        None, "--prompt", "-p", help="the input text (question for qa; default: --file or stdin)"
    ),
    file: Path | None = typer.Option(
        None, "--file", "-f", help="read the input text from a file (default: --prompt or stdin)"
    ),
    context: str | None = typer.Option(
        None,
        "--context",
        help="qa: the passage to answer from (default: none, the model answers from what it knows)",
    ),
    source: str | None = typer.Option(None, "--source", help="translate: source language (default: English)"),
    target: str | None = typer.Option(None, "--target", help="translate: target language (default: Chinese)"),
    system: str | None = typer.Option(None, "--system", help="chat: a system message (default: none)"),
    labels: str | None = typer.Option(
        None,
        "--labels",
        help="sentiment by prompting: comma-separated label words (default: positive,negative)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per result"),
    gen: dict = None,
) -> None:
    from yuyan import apps

    if task not in apps.TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(apps.TASKS)}")
    given = {"context": context, "source": source, "target": target, "system": system, "labels": labels}
    _check_options(task, given, gen)
    lm = load_model(model)
    text = _read_input(prompt, file)
    if task == "chat" and text is None:  # the chat loop: one user turn per stdin line
        apps.repl(apps.Conversation(lm, apps.task_config("chat", gen), system=system), as_json=as_json)
        return
    if text is None:
        text = sys.stdin.read()
    if task == "sentiment":
        _sentiment(lm, text, labels, as_json)
        return
    # each pipeline's own keywords: the ones given to it (the others were refused above)
    own = {k: v for k, v in given.items() if v is not None and k != "labels"}
    out = apps.PIPELINES[task](lm, text, **own, **gen)
    _emit({"task": task, "text": out} if as_json else out, as_json)
