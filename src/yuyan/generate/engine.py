"""`generate()` and `stream()`: the decode core driven to the end for a list of prompts.

Generation lives outside the model. `generate` checks the settings and prompts (the core's `check_prompt`),
admits every prompt's n rows into one `Decoder` sized for the run, and steps it until every row finished;
greedy runs that `speculative.usable` accepts step with the speculative strategy, beam search runs its own
search (`beams.py`) over the core's forward step. `stream` yields one row's text as the core produces it.
`generate_naive` is the no-cache greedy oracle the tests hold the core to.

The number format is the model's: `generate` and `stream` lay the model out for decoding in its own dtype
(`kernels.decode_layout(model)`). To decode in bf16, or in what a timed decode step says pays on this
machine, lay it out once first: `decode_layout(model, "bf16" | "auto")` (the CLI's `--dtype`); the KV
cache follows the weights and logits reach sampling in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from yuyan.errors import UserError
from yuyan.generate import speculative
from yuyan.generate.beams import beam_search
from yuyan.generate.config import Completion, GenerationConfig
from yuyan.generate.core import WINDOW_KEEP, Decoder, Row, check_prompt, encode_prompt, model_device, stop_ids
from yuyan.generate.kernels import decode_layout
from yuyan.generate.scoring import prompt_logprobs
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import Tokenizer


def prepare_prompts(
    tokenizer: Tokenizer | None, prompts, config: GenerationConfig, block_size: int, vocab_size: int
) -> list[list[int]]:
    """Encode and check prompts (text or ids; one prompt or a list) against the vocabulary and context."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    return [check_prompt(encode_prompt(tokenizer, p), config, block_size, vocab_size) for p in prompts]


def decoder(
    model: Transformer, tokenizer: Tokenizer | None, prompts: list[list[int]], config: GenerationConfig
) -> tuple[Decoder, list[list[Row]]]:
    """A decoder sized for this run with every prompt admitted; returns it and each prompt's rows."""
    room = config.speculative + 1 if speculative.usable(model, prompts, config) else 0
    strategy = speculative.Speculator(speculative.int8_draft(model), config.speculative) if room else None
    capacity = min(model.config.block_size, max(len(p) for p in prompts) + config.max_new_tokens + room)
    core = Decoder(model, tokenizer, len(prompts) * config.sampling.n, capacity, strategy)
    return core, core.admit(prompts, [config] * len(prompts))


def _run(core: Decoder) -> Iterator[None]:
    """Step the core until every row finished; yields after every phase that may have added tokens."""
    while core.rows:
        core.choose()
        failed = next((r.error for r in core.rows if r.error), None)
        if failed:  # settings that overflow the logits, or a model whose logits are not finite
            raise UserError(failed)
        yield
        if core.advance():
            yield


def generate(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompts: list[str] | list[list[int]],
    config: GenerationConfig | None = None,
) -> list[list[Completion]]:
    """Generate config.sampling.n completions for each prompt (text or token ids); one list per prompt."""
    config = (config or GenerationConfig()).validate()
    decode_layout(model.eval())
    ids = prepare_prompts(tokenizer, prompts, config, model.config.block_size, model.config.vocab_size)
    if config.num_beams > 1:
        out = _beams(model, tokenizer, ids, config)
    elif config.max_new_tokens == 0 or not ids:
        out = [[Completion("", [], "length", None, len(p)) for _ in range(config.sampling.n)] for p in ids]
    else:
        core, rows = decoder(model, tokenizer, ids, config)
        for _ in _run(core):
            pass
        out = [[r.completion() for r in rs] for rs in rows]
    if config.prompt_logprobs is not None:
        scores = prompt_logprobs(model, tokenizer, ids, [config.prompt_logprobs] * len(ids))
        for comps, lp in zip(out, scores, strict=True):
            for c in comps:
                c.prompt_logprobs = lp
    return out


def _beams(model, tokenizer, ids: list[list[int]], config: GenerationConfig) -> list[list[Completion]]:
    ends = stop_ids(tokenizer, config)
    out = []
    n_tok = tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size
    decodable = n_tok if n_tok < model.config.vocab_size else None
    for p, res in zip(ids, beam_search(model, ids, config, ends, decodable), strict=True):
        comps = []
        for toks, ended in res:
            row = Row(p, tokenizer, config, ends)
            for t in toks:
                row.take(t, model.config.block_size)
            if ended and row.finish is None:
                row.take(next(iter(sorted(ends))), model.config.block_size)
            row.close()
            comps.append(row.completion())
        out.append(comps)
    return out


def stream(
    model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], config: GenerationConfig | None = None
) -> Iterator[str]:
    """Yield the completion's text in pieces as soon as they are whole UTF-8 characters and can no longer be
    the start of a stop string; the pieces join to generate()'s text."""
    config = (config or GenerationConfig()).validate()
    if config.num_beams > 1 or config.sampling.n > 1:
        raise UserError("streaming gives one completion: use num_beams 1 and n 1, or call generate()")
    decode_layout(model.eval())
    ids = prepare_prompts(tokenizer, [prompt], config, model.config.block_size, model.config.vocab_size)
    if config.max_new_tokens == 0:
        return
    core, ((row,),) = decoder(model, tokenizer, ids, config)
    for _ in _run(core):
        piece = row.safe_text()
        if piece:
            yield piece
    piece = row.safe_text()
    if piece:
        yield piece


@torch.inference_mode()
def generate_naive(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    stop_token_ids: set[int] | None = None,
    sliding_window: bool = True,
) -> list[int]:
    """The oracle: greedy decoding with a full forward pass over the window at every step, no cache.

    Window rule (the engine's): the model sees tokens[start:]; when that would exceed the context, start
    jumps so that the newest int(context * WINDOW_KEEP) tokens remain.
    """
    block_size = model.config.block_size
    keep_n = max(1, int(block_size * WINDOW_KEEP))
    tokens = list(prompt[-block_size:])
    start, out = 0, []
    dev = model_device(model)
    for _ in range(max_new_tokens):
        if len(tokens) - start > block_size:
            if not sliding_window:
                break
            start = len(tokens) - keep_n
        logits = model(torch.tensor([tokens[start:]], device=dev))[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if stop_token_ids and t in stop_token_ids:
            break
        tokens.append(t)
    return out


__all__ = ["generate", "stream", "generate_naive", "prepare_prompts", "decoder"]
