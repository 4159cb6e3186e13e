"""What the commands that take a model share: the `--model` option, one loader, and the generation options.

The generation options derive from `GenerationConfig`'s fields, with its `sampling` flattened beside the
others (the flat form `GenerationConfig.from_dict` reads), the way `yuyan train` derives its settings from
the config dataclasses: one option per field, named after it (`max_new_tokens` -> `--max-new-tokens`),
typed from its annotation, defaulting to the dataclass default or the command's own. `@generation_options`
adds them to a command and hands it one `GenerationConfig`, validated by `validate()` before any model is
loaded; `@generation_overrides` hands it only the settings given, for a command whose defaults depend on
its task (`yuyan run`). A command leaves out the fields it cannot honour, so no setting is taken and then
ignored.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any

import typer

from yuyan.errors import UserError
from yuyan.generate.config import GenerationConfig
from yuyan.generate.sampling import SamplingParams

MODEL_HELP = "checkpoint folder, Hugging Face folder or hf:NAME"
MODEL = typer.Option(..., "--model", "-m", help=MODEL_HELP)
QUANTIZE = typer.Option(None, "--quantize", help="int8: int8 weights for faster CPU decoding (default: off)")
QUANTIZE_CHOICES = ("int8",)
DTYPE_HELP = "decode weights auto|fp32|bf16 (auto: bf16 where a timed decode step here says it pays)"
DTYPE = typer.Option("auto", "--dtype", help=DTYPE_HELP)
DTYPE_CHOICES = ("auto", "fp32", "bf16")
FORCE_HELP = "write into a non-empty folder that yuyan did not write (nothing already in it is deleted)"
FORCE = typer.Option(False, "--force", help=FORCE_HELP)


def output_dir(out, force: bool, *sources, command: str = ""):
    """The one safe-output-folder check every command that writes a folder makes before any work
    (yuyan.fsutil.claim_output_dir): refused when not empty and not ours (unless --force) or when it is,
    holds or lies in one of the command's inputs; then created and marked ours."""
    from yuyan.fsutil import claim_output_dir

    return claim_output_dir(out, force=force, sources=tuple(s for s in sources if s), command=command)


def run_folder(out, force: bool, *sources, command: str = ""):
    """output_dir for a training run's folder, then its lock (yuyan.model.checkpoint.lock_run_dir), taken
    before the recipe writes anything there: a second run on the folder fails at once with the holder's pid.
    Under torchrun only rank 0 (RANK, which torchrun sets) holds it, as in fit(). Keep the returned lock
    alive for the command's duration; the kernel drops it when the process ends."""
    import os

    from yuyan.model.checkpoint import lock_run_dir

    output_dir(out, force, *sources, command=command)
    return lock_run_dir(out, main=os.environ.get("RANK", "0") == "0")


def load_model(spec: str, quantize: str | None = None, device: str | None = None, dtype: str | None = None):
    """The `LanguageModel` behind a --model spec (yuyan.model.load), with int8 weights for --quantize int8
    and, given --dtype, laid out for decoding in that number format (yuyan.generate.kernels.decode_layout).

    --quantize and --dtype are checked before the (slow) load; a bad spec is load()'s one-line UserError."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise UserError(f"unknown --quantize {quantize!r}; the only choice is int8")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise UserError(f"unknown --dtype {dtype!r}; use auto, fp32 or bf16")
    if quantize is not None and dtype == "bf16":
        raise UserError("--quantize int8 decodes with float32 activations: drop --dtype bf16 or --quantize")
    from yuyan.model import load

    lm = load(spec, device)
    if quantize == "int8":
        from yuyan.model.quantize import quantize_int8

        quantize_int8(lm.model)
    if dtype is not None:
        from yuyan.generate.kernels import decode_layout

        decode_layout(lm.model.eval(), dtype)
    return lm


@contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show each warning the library raises as one `warning: ...` line on stderr, when it happens."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# -------------------------------------------------------------------------------- generation options

# one line of --help per setting (tests/test_generate_cli.py checks every field has one)
HELP = {
    "max_new_tokens": "tokens to generate per completion",
    "temperature": "sampling temperature (0: greedy)",
    "top_k": "keep the k most likely tokens (0: off)",
    "top_p": "nucleus sampling: keep the likeliest tokens up to this probability mass (1: off)",
    "min_p": "drop tokens below min_p x the top token's probability (0: off)",
    "repetition_penalty": "> 1 discourages tokens already in the prompt or output (1: off)",
    "frequency_penalty": "subtracted from a token's logit once per earlier occurrence in the output",
    "presence_penalty": "subtracted from a token's logit once if it occurred in the output",
    "seed": "make sampling reproducible",
    "n": "completions per prompt",
    "num_beams": "beam search width (1: sampling or greedy)",
    "length_penalty": "beam search: a hypothesis scores sum logprob / length ** length_penalty",
    "early_stopping": "beam search: true, false or never (Hugging Face semantics)",
    "stop": "stop string (repeatable); the text is cut before it",
    "stop_token_ids": "token id that ends a completion (repeatable; default: the tokenizer's end of text)",
    "logprobs": "report each token's logprob and this many top alternatives",
    "context_overflow": "truncate: a prompt too long for the context loses its oldest tokens; error: refuse it",
    "sliding_window": "keep generating past the context by dropping the oldest tokens",
    "speculative": "greedy only: draft K tokens a step with an int8 copy (the same output, faster on CPU)",
    "logit_bias": 'JSON {"token id": bias} added to those logits, -100 (ban) .. 100 (force)',
    "grammar": 'constrain the output, JSON: {"type": "json_object"}, {"type": "json_schema", "schema": {..}},'
    ' {"type": "regex", "pattern": ".."} or {"type": "grammar", "grammar": "<EBNF>"}',
    "prompt_logprobs": "--json: each prompt token's logprob and this many top alternatives",
}
# spellings kept beside the derived name because scripts and README use them
ALIASES = {"num_beams": ("--beams",)}
SCALARS = (int, float, str)


@dataclass(frozen=True)
class Setting:
    """One flat generation setting: a field of GenerationConfig or of its SamplingParams."""

    name: str
    type: Any  # the field's annotation, resolved
    default: Any

    @property
    def flags(self) -> tuple[str, ...]:
        return ("--" + self.name.replace("_", "-"), *ALIASES.get(self.name, ()))


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def settings() -> list[Setting]:
    """Every flat generation setting in GenerationConfig's order, `sampling` expanded in place."""
    out = []
    hints = typing.get_type_hints(GenerationConfig)
    for f in fields(GenerationConfig):
        if f.name == "sampling":
            sampling_hints = typing.get_type_hints(SamplingParams)
            out += [Setting(g.name, sampling_hints[g.name], _default(g)) for g in fields(SamplingParams)]
        else:
            out.append(Setting(f.name, hints[f.name], _default(f)))
    return out


def _option_type(tp: Any) -> tuple[Any, bool]:
    """(the annotation typer parses the option as, whether the value is text to read as JSON).

    Scalars, optional scalars and lists of scalars are typer's own; any other type (`bool | str`, a dict)
    is taken as text that is read as JSON when it parses as JSON, else kept as the text."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) < len(
        typing.get_args(tp)
    )
    inner = args[0] if optional and len(args) == 1 else tp
    if inner is bool or inner in SCALARS:
        return inner | None, False
    if typing.get_origin(inner) is list and typing.get_args(inner)[0] in SCALARS:
        return list[typing.get_args(inner)[0]] | None, False
    return str | None, True


# what an unset setting means, where typer cannot show it (its option's default is None)
UNSET = {"seed": "a fresh random seed", "stop": "none", "logit_bias": "none"}


def _unset(s: Setting, default: Any) -> str:
    if s.name in UNSET:
        return UNSET[s.name]
    if default is None or default in ([], {}):
        return "off"
    return json.dumps(default)


def _parameter(s: Setting, default: Any, unset: str | None = None) -> inspect.Parameter:
    """The option of one setting; where its typer default is None, the help says what unset means
    (`unset`, else the setting's own default)."""
    tp, as_json = _option_type(s.type)
    flags = s.flags
    if s.type is bool:  # an on/off switch: --sliding-window / --no-sliding-window
        flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
    meaning = default
    if as_json or not isinstance(default, bool | int | float | str):
        default = None  # unset: the dataclass default (typer would turn False into the text "False")
    help_text = HELP.get(s.name, s.name.replace("_", " "))
    if default is None and "default" not in help_text:
        help_text += f" (default: {unset or _unset(s, meaning)})"
    option = typer.Option(default, *flags, help=help_text)
    return inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp)


def _read(s: Setting, value: Any) -> Any:
    if _option_type(s.type)[1] and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _decorate(
    build: Callable[[dict[str, Any]], Any], offered: list[Setting], params: list[inspect.Parameter]
) -> Callable:
    """Replace the command's `gen` parameter by one option per offered setting; call it with build(given)."""

    def decorator(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        if "gen" not in sig.parameters:
            raise TypeError(f"{fn.__name__} needs a `gen` parameter to receive the generation settings")
        own = [p for p in sig.parameters.values() if p.name != "gen"]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {}
            for s in offered:
                value = kwargs.pop(s.name)
                if value is not None and value != []:  # None / no list items: not given on the command line
                    given[s.name] = _read(s, value)
            return fn(gen=build(given), **kwargs)

        command.__signature__ = sig.replace(parameters=own + params)
        # typer reads the types from the annotations: the command's own ones plus the settings'
        command.__annotations__ = {
            **{k: v for k, v in fn.__annotations__.items() if k != "gen"},
            **{p.name: p.annotation for p in params},
        }
        return command

    return decorator


def _offered(exclude: tuple[str, ...]) -> list[Setting]:
    every = settings()
    unknown = set(exclude) - {s.name for s in every}
    if unknown:
        raise ValueError(f"exclude names no generation setting: {sorted(unknown)}")
    return [s for s in every if s.name not in exclude]


def generation_options(defaults: Mapping[str, Any] | None = None, exclude: tuple[str, ...] = ()) -> Callable:
    """Add one option per generation setting (but `exclude`) to a command, with `defaults` over the
    dataclass defaults; the command's `gen` parameter receives the validated GenerationConfig.

    Example: `@generation_options({"temperature": 0.7}, exclude=("logprobs",))` above `def cmd(..., gen)`."""
    defaults = dict(defaults or {})
    offered = _offered(exclude)
    params = [_parameter(s, defaults.get(s.name, s.default)) for s in offered]

    def build(given: dict[str, Any]) -> GenerationConfig:
        return GenerationConfig.from_dict({**defaults, **given}).validate()

    return _decorate(build, offered, params)


def generation_overrides(exclude: tuple[str, ...] = ()) -> Callable:
    """Like `generation_options`, but every option starts unset and the command's `gen` receives only the
    settings given (a flat dict), to lay over defaults it picks later (a task's, in `yuyan run`)."""
    offered = _offered(exclude)
    params = [_parameter(s, None, "the task's") for s in offered]
    return _decorate(dict, offered, params)


def setting_flags(names: list[str] | set[str]) -> str:
    """`--top-p, --seed`: the options of some settings, for messages."""
    return ", ".join("--" + n.replace("_", "-") for n in sorted(names))


__all__ = [
    "MODEL",
    "MODEL_HELP",
    "QUANTIZE",
    "DTYPE",
    "DTYPE_HELP",
    "FORCE",
    "output_dir",
    "run_folder",
    "HELP",
    "Setting",
    "settings",
    "load_model",
    "warnings_as_lines",
    "generation_options",
    "generation_overrides",
    "setting_flags",
]
