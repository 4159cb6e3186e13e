"""`yuyan run TASK`: the task pipelines of `yuyan.apps` from the command line.

TASK is generate, chat, summarize, translate, qa, sentiment or code. The input is --prompt TEXT (or
--file PATH, or stdin when neither is given); `chat` without --prompt is an interactive conversation read
line by line from stdin. Thin adapter: every option maps onto the pipeline's keyword of the same name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from yuyan.cli import app
from yuyan.errors import UserError

EXAMPLE = """
Examples:

  yuyan run summarize --model runs/demo/final --prompt "Long text ..."

  yuyan run translate --model M --prompt "Good morning" --source English --target Chinese

  yuyan run qa --model M --prompt "Who wrote it?" --context "The book was written by Lu Xun."

  yuyan run sentiment --model runs/cls/final --prompt "这部电影很好看" --json

  yuyan run code --model M --prompt "def fibonacci(n):"
"""


def _read_input(prompt: str | None, file: Path | None) -> str | None:
    if prompt is not None:
        return prompt
    if file is not None:
        if not file.is_file():
            raise UserError(f"input file {file} not found")
        return file.read_text(encoding="utf-8")
    return None


@app.command(
    "run", help="Run a task pipeline (generate, chat, summarize, translate, qa, sentiment, code).\n" + EXAMPLE
)
def run_cmd(
    task: str = typer.Argument(..., help="generate | chat | summarize | translate | qa | sentiment | code"),
    model: str = typer.Option(..., "--model", "-m", help="checkpoint folder, Hugging Face folder or hf:NAME"),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="the input text (question for qa)"),
    file: Path | None = typer.Option(None, "--file", "-f", help="read the input text from a file"),
    context: str | None = typer.Option(None, "--context", help="qa: the passage to answer from"),
    source: str = typer.Option("English", "--source", help="translate: source language"),
    target: str = typer.Option("Chinese", "--target", help="translate: target language"),
    system: str | None = typer.Option(None, "--system", help="chat: a system message"),
    labels: str | None = typer.Option(
        None, "--labels", help="sentiment by prompting: comma-separated label words"
    ),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens"),
    temperature: float | None = typer.Option(None, "--temperature", help="0 = greedy"),
    top_p: float | None = typer.Option(None, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per result"),
) -> None:
    from yuyan import apps

    if task not in apps.TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(apps.TASKS)}")
    lm = apps.as_model(model)
    gen = {
        k: v
        for k, v in (
            ("max_new_tokens", max_new_tokens),
            ("temperature", temperature),
            ("top_p", top_p),
            ("seed", seed),
        )
        if v is not None
    }
    text = _read_input(prompt, file)

    def emit(result) -> None:
        if as_json:
            typer.echo(json.dumps(result, ensure_ascii=False))
        else:
            typer.echo(result if isinstance(result, str) else json.dumps(result, ensure_ascii=False))

    if task == "chat" and text is None:  # interactive: one user turn per stdin line
        history: list[dict] = []
        for line in sys.stdin:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            reply = apps.chat(lm, history, system=system, **gen)
            history.append({"role": "assistant", "content": reply})
            emit({"role": "assistant", "content": reply} if as_json else f"assistant: {reply}")
        return
    if text is None:
        text = sys.stdin.read()
    if task == "sentiment":
        words = [w.strip() for w in labels.split(",")] if labels else None
        lines = [t for t in text.splitlines() if t.strip()] or [text]
        for t, (label, probs) in zip(lines, apps.sentiment(lm, lines, labels=words), strict=True):
            emit({"text": t, "label": label, "probs": probs} if as_json else f"{label}\t{t}")
        return
    if task == "qa":
        out = apps.qa(lm, text, context=context, **gen)
    elif task == "translate":
        out = apps.translate(lm, text, target=target, source=source, **gen)
    elif task == "chat":
        out = apps.chat(lm, text, system=system, **gen)
    else:
        out = apps.PIPELINES[task](lm, text, **gen)
    emit({"task": task, "text": out} if as_json else out)
