"""`main()`, the `yuyan` command: registers every command module on the app and runs it.

Each command is a thin call into the library. A `UserError` from anywhere becomes one clear line on
stderr (`error: ...`) and exit status 2, and so does an OS failure (ENOSPC, EACCES, EROFS, ... or torch's
and safetensors' wrapped write errors), through yuyan.fsutil's one mapper; warnings become `warning: ...`
lines as they happen.
"""

from __future__ import annotations

import sys

# each module adds its commands to `app` when imported, in this order in `yuyan --help`
# isort: off
from yuyan.cli import tokenizer, data, model, train, generate, finetune, evaluate, inspect, audit, serve, apps  # noqa: F401

# isort: on
from yuyan.cli.app import app
from yuyan.cli.common import warnings_as_lines
from yuyan.errors import UserError
from yuyan.fsutil import is_os_failure, os_error_line


def main(argv: list[str] | None = None) -> None:
    try:
        with warnings_as_lines():
            app(args=argv, standalone_mode=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `yuyan ... | head`: the reader left; nothing to report
        sys.stderr.close()
        sys.exit(1)
    except Exception as e:
        if not is_os_failure(e):
            raise
        # a full, read-only or missing disk outside the atomic writers (which map their own): one line
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


__all__ = ["main"]
