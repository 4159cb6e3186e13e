"""`yuyan generate` and `yuyan chat`: thin commands over `yuyan.generate`.

`generate` takes one prompt, a file of prompts (one per line, or JSONL with a "prompt" field) or stdin, and
prints completions as text, streams them, or writes JSON lines. `chat` is a REPL over the tokenizer's chat
template that keeps the history, streams each answer as it is produced, and understands /reset and /exit;
it reads stdin line by line, so piped input works as a script.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer

from yuyan.cli import app
from yuyan.errors import UserError

MODEL = typer.Option(..., "--model", "-m", help="checkpoint folder, Hugging Face folder or hf:NAME")


def _load(model: str, quantize: str | None):
    from yuyan.model import load

    lm = load(model)
    if quantize:
        if quantize != "int8":
            raise UserError(f"unknown --quantize {quantize!r}; the only choice is int8")
        from yuyan.model.quantize import quantize_int8

        quantize_int8(lm.model)
    return lm


def _config(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, beams, n, seed, stop):
    from yuyan.generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if beams > 1 else temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        num_beams=beams,
        n=n,
        seed=seed,
        stop=list(stop or []),
    ).validate()


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
def generate_cmd(
    model: str = MODEL,
    prompt: str = typer.Option(None, "--prompt", "-p", help="prompt text (default: --prompts-file or stdin)"),
    prompts_file: Path = typer.Option(
        None, "--prompts-file", help='one prompt per line (\\n for newlines), or JSONL with "prompt"'
    ),
    max_new_tokens: int = typer.Option(
        128, "--max-new-tokens", "-n", help="tokens to generate per completion"
    ),
    temperature: float = typer.Option(0.8, help="sampling temperature (0: greedy)"),
    top_k: int = typer.Option(0, "--top-k", help="keep the k most likely tokens (0: off)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (1: off)"),
    min_p: float = typer.Option(
        0.0, "--min-p", help="drop tokens below min_p x the top probability (0: off)"
    ),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="> 1 discourages repeats (1: off)"
    ),
    beams: int = typer.Option(1, "--beams", help="beam search width (1: sampling/greedy)"),
    n: int = typer.Option(1, "--n", help="completions per prompt"),
    seed: int = typer.Option(None, "--seed", help="make sampling reproducible"),
    stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable); never printed"),
    stream: bool = typer.Option(False, "--stream", help="print text as it is generated (one prompt, n 1)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per prompt on stdout"),
    quantize: str = typer.Option(None, "--quantize", help="int8: int8 weights for faster CPU decoding"),
    speculative: int = typer.Option(
        0, "--speculative", help="greedy only: draft K tokens a step with an int8 copy (same output, faster)"
    ),
) -> None:
    """Continue a prompt with a model.

    Example: yuyan generate --model runs/demo --prompt "def fib(n):" --max-new-tokens 64 --temperature 0.7
    """
    from yuyan.generate import generate
    from yuyan.generate import stream as stream_fn

    cfg = _config(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, beams, n, seed, stop)
    cfg.speculative = speculative
    cfg.validate()
    prompts = _read_prompts(prompt, prompts_file)
    lm = _load(model, quantize)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if stream:
            if len(prompts) != 1 or as_json:
                raise UserError("--stream prints one prompt's text: give a single prompt and no --json")
            sys.stdout.write(prompts[0])
            for piece in stream_fn(lm.model, lm.tokenizer, prompts[0], cfg):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            results = generate(lm.model, lm.tokenizer, prompts, cfg)
            for p, comps in zip(prompts, results, strict=True):
                if as_json:
                    print(
                        json.dumps(
                            {
                                "prompt": p,
                                "completions": [
                                    {
                                        "text": c.text,
                                        "finish_reason": c.finish_reason,
                                        "token_ids": c.token_ids,
                                    }
                                    for c in comps
                                ],
                            },
                            ensure_ascii=False,
                        )
                    )
                else:
                    for c in comps:
                        print(p + c.text)
                        if len(prompts) > 1 or len(comps) > 1:
                            print("-" * 40)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


@app.command("chat")
def chat_cmd(
    model: str = MODEL,
    system: str = typer.Option(None, "--system", help="system message that opens the conversation"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="longest answer in tokens"),
    temperature: float = typer.Option(0.7, help="sampling temperature (0: greedy)"),
    top_p: float = typer.Option(0.95, "--top-p", help="nucleus sampling mass (1: off)"),
    seed: int = typer.Option(None, "--seed", help="make sampling reproducible"),
    quantize: str = typer.Option(None, "--quantize", help="int8: int8 weights for faster CPU decoding"),
) -> None:
    """Chat with a model over its chat template; /reset clears the history, /exit (or end of input) quits.

    Example: yuyan chat --model runs/sft      (or: printf 'hello\\n/exit\\n' | yuyan chat --model runs/sft)
    """
    from yuyan.generate import GenerationConfig, stream

    lm = _load(model, quantize)
    tok, block = lm.tokenizer, lm.model.config.block_size
    plain = len(tok.chat_ids) < 4  # no role tokens: the template writes "User: ..." lines
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_token_ids=tok.chat_stop_ids,
        stop=["\nUser:"] if plain else [],
    ).validate()
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    print("chat: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(base)
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        ids, _ = tok.apply_chat_template(history, add_generation_prompt=True)
        # drop the oldest turns (keeping the system message) until the prompt leaves room for an answer
        while len(ids) > max(1, block - max_new_tokens) and len(history) > len(base) + 1:
            history = base + history[len(base) + 1 :]
            ids, _ = tok.apply_chat_template(history, add_generation_prompt=True)
        answer = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a still-too-long prompt is truncated from the left
            for piece in stream(lm.model, tok, ids, cfg):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(answer)})
