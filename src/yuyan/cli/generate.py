"""`yuyan generate` and `yuyan chat`: thin commands over `yuyan.generate` and `yuyan.apps.Conversation`.

`generate` takes one prompt, a file of prompts (one per line, or JSONL with a "prompt" field) or stdin, and
prints completions as text, streams them, or writes JSON lines (with each token's logprobs under
--logprobs). Its generation options are every `GenerationConfig` setting (cli/common.py). `chat` is the
chat loop of `yuyan.apps.repl`, the same as `yuyan run chat`: it keeps the history, streams each answer,
and understands /reset and /exit; it reads stdin line by line, so piped input works as a script.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer

from yuyan.apps.conversation import CHAT_DEFAULTS, CHAT_FIXED
from yuyan.cli.app import app
from yuyan.cli.common import DTYPE, MODEL, QUANTIZE, generation_options, load_model
from yuyan.errors import UserError
from yuyan.generate import Completion, GenerationConfig

GENERATE_DEFAULTS = {"max_new_tokens": 128, "temperature": 0.8}


def _read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    if prompt is not None and prompts_file is not None:
        raise UserError("give --prompt or --prompts-file, not both")
    if prompt is not None:
        return [prompt]
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UserError(
                f"prompts file {prompts_file} does not exist; give a text file with one prompt per line"
            )
        lines = [ln for ln in prompts_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if prompts_file.suffix == ".jsonl":
            try:
                return [json.loads(ln)["prompt"] for ln in lines]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f'{prompts_file}: each JSONL line needs a "prompt" field') from None
        return [ln.replace("\\n", "\n") for ln in lines]
    if sys.stdin.isatty():
        raise UserError("no prompt: pass --prompt TEXT, --prompts-file FILE, or pipe text on stdin")
    text = sys.stdin.read()
    return [text]


@app.command("generate")
@generation_options(GENERATE_DEFAULTS)
def generate_cmd(
    model: str = MODEL,
    prompt: str = typer.Option(None, "--prompt", "-p", help="prompt text (default: --prompts-file or stdin)"),
    prompts_file: Path = typer.Option(
        None,
        "--prompts-file",
        help='one prompt per line (\\n for newlines), or JSONL with "prompt" (default: --prompt or stdin)',
    ),
    stream: bool = typer.Option(False, "--stream", help="print text as it is generated (one prompt, n 1)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per prompt on stdout"),
    quantize: str = QUANTIZE,
    dtype: str = DTYPE,
    gen: GenerationConfig = None,
) -> None:
    """Continue a prompt with a model.

    Example: yuyan generate --model runs/demo --prompt "def fib(n):" --max-new-tokens 64 --temperature 0.7
    """
    from yuyan.generate import generate
    from yuyan.generate import stream as stream_fn

    if stream and as_json:
        raise UserError("--stream prints one prompt's text: drop --json, or --stream for JSON lines")
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(gen, name) is not None and not as_json:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} are written in the --json output: add --json (without --stream)")
    prompts = _read_prompts(prompt, prompts_file)
    if stream and len(prompts) != 1:
        raise UserError("--stream prints one prompt's text: give a single prompt")
    lm = load_model(model, quantize, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # one warning per prompt that is cut to the context
        if stream:
            sys.stdout.write(prompts[0])
            for piece in stream_fn(lm.model, lm.tokenizer, prompts[0], gen):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return
        results = generate(lm.model, lm.tokenizer, prompts, gen)
    for p, comps in zip(prompts, results, strict=True):
        if as_json:
            print(json.dumps({"prompt": p, "completions": [_record(c) for c in comps]}, ensure_ascii=False))
            continue
        for c in comps:
            print(p + c.text)
            if len(prompts) > 1 or len(comps) > 1:
                print("-" * 40)


def _logprob(t) -> dict | None:
    if t is None:  # the first prompt token: nothing predicts it
        return None
    return {"token_id": t.token_id, "token": t.token, "logprob": t.logprob, "top": [list(x) for x in t.top]}


def _record(c: Completion) -> dict:
    rec = {"text": c.text, "finish_reason": c.finish_reason, "token_ids": c.token_ids}
    if c.logprobs is not None:
        rec["logprobs"] = [_logprob(t) for t in c.logprobs]
    if c.prompt_logprobs is not None:
        rec["prompt_logprobs"] = [_logprob(t) for t in c.prompt_logprobs]
    return rec


# a chat streams one reply a turn: beam search and the settings the conversation sets itself are not offered
CHAT_EXCLUDE = ("num_beams", "length_penalty", "early_stopping")


@app.command("chat")
@generation_options(CHAT_DEFAULTS, exclude=CHAT_FIXED + CHAT_EXCLUDE)
def chat_cmd(
    model: str = MODEL,
    system: str = typer.Option(
        None, "--system", help="system message that opens the conversation (default: none)"
    ),
    quantize: str = QUANTIZE,
    dtype: str = DTYPE,
    gen: GenerationConfig = None,
) -> None:
    """Chat with a model over its chat template; /reset clears the history, /exit (or end of input) quits.

    Example: yuyan chat --model runs/sft      (or: printf 'hello\\n/exit\\n' | yuyan chat --model runs/sft)
    """
    from yuyan.apps import Conversation, repl

    repl(Conversation(load_model(model, quantize, dtype=dtype), gen, system=system))
