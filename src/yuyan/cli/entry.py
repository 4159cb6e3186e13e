"""`main()`, the `yuyan` command: registers every command module on the app and runs it.

Each command is a thin call into the library. A `UserError` from anywhere becomes one clear line on
stderr (`error: ...`) and exit status 2; warnings become `warning: ...` lines as they happen.
"""

from __future__ import annotations

import sys

# each module adds its commands to `app` when imported, in this order in `yuyan --help`
# isort: off
from yuyan.cli import tokenizer, data, model, train, generate, finetune, evaluate, inspect, serve, apps  # noqa: F401

# isort: on
from yuyan.cli.app import app
from yuyan.cli.common import warnings_as_lines
from yuyan.errors import UserError


def main(argv: list[str] | None = None) -> None:
    try:
        with warnings_as_lines():
            app(args=argv, standalone_mode=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


__all__ = ["main"]
