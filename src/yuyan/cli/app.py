"""The `yuyan` typer app that every command module (cli/tokenizer.py, cli/generate.py, ...) registers on.

It lives apart from cli/entry.py, which imports the command modules, so that a command module importing
`app` never imports itself back.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="yuyan",
    help="yuyan (语言): tokenizer, pre-training, fine-tuning, generation, evaluation, inspection and serving of GPT-style models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

__all__ = ["app"]
