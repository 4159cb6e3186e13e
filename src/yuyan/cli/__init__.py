"""The `yuyan` command: one typer app; each command is a thin call into the library.

Command groups live in their own modules (cli/tokenizer.py, cli/train.py, ...) and register themselves on
`app`; `main()` turns a `UserError` into one clear line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

from yuyan.errors import UserError

app = typer.Typer(
    name="yuyan",
    help="yuyan (语言): tokenizer, pre-training, fine-tuning, generation, evaluation, inspection and serving of GPT-style models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# each module adds its commands to `app` when imported
COMMAND_MODULES = [
    "tokenizer",
    "data",
    "model",
    "train",
    "generate",
    "finetune",
    "evaluate",
    "inspect",
    "serve",
    "apps",
]


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"yuyan.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"yuyan.cli.{name}":
                raise


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
