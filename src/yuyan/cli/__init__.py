"""The `yuyan` command line: one typer app (cli/app.py) and `main()` (cli/entry.py).

Command groups live in their own modules (cli/tokenizer.py, cli/train.py, ...) and register on `app`;
cli/common.py holds what they share: the `--model` option and loader and the generation options derived
from `GenerationConfig`.
"""

from yuyan.cli.app import app
from yuyan.cli.entry import main

__all__ = ["app", "main"]
