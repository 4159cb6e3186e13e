"""`Row`: the book-keeping of one output sequence in the decode core.

A row holds the whole token sequence (prompt included), where the model's window starts, the text decoded
so far (through the tokenizer's streaming decoder, so a character split across tokens appears once whole),
and the stop conditions of its request: stop ids, stop strings (the text is cut before the first one),
max_new_tokens and the context. `safe_text()` hands a stream the new text that can no longer turn out to
be the start of a stop string. The core creates, feeds and retires rows; callers read them.
"""

from __future__ import annotations

import torch

from yuyan.generate.config import Completion, GenerationConfig, TokenLogprob
from yuyan.tokenizer import Tokenizer


class Row:
    """One output sequence: tokens, window start, streamed text, stop conditions and its settings."""

    def __init__(
        self,
        prompt: list[int],
        tokenizer: Tokenizer | None,
        config: GenerationConfig,
        stop_ids: set[int],
        index: int = 0,
        owner: object = None,
    ):
        self.tokens = list(prompt)  # the whole sequence, prompt included
        self.start = 0  # first token inside the model's window
        self.prompt_len = len(prompt)
        self.generated: list[int] = []  # generated tokens, a final stop id included
        self.decoder = tokenizer.stream() if tokenizer is not None else None
        self.config, self.stop_ids = config, stop_ids
        self.stop = list(config.stop)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.index = index  # choice j (0..n-1) of its prompt
        self.owner = owner  # whatever the caller tagged it with (the scheduler's request)
        self.generator: torch.Generator | None = None  # its own sampling stream (seed + index)
        self.text = ""
        self.emitted = 0  # chars of self.text already handed to a stream
        self.finish: str | None = None  # "stop" | "length"
        self.error: str | None = None  # set when the row failed (its settings overflowed the logits)
        self.model_error = False  # the failure was the model's (non-finite logits), not the request's
        self.cut = False  # a stop string ended the text
        self.logprobs: list[TokenLogprob] = []
        self.new: list[int] = []  # tokens taken in the current step (the core clears it)
        self.constraint = None  # its grammar state (generate/grammar.py Constraint) when config.grammar

    def take(self, tok: int, capacity: int, logprob: TokenLogprob | None = None) -> None:
        """Record one generated token of a live row: a stop id ends it, any other token adds its text and
        may end it through a stop string, max_new_tokens, or a full context without the sliding window."""
        if self.finish is not None:
            return
        self.new.append(tok)
        self.generated.append(tok)
        if (
            logprob is not None
        ):  # a stop id's too: it was sampled (vLLM and OpenAI report it; harnesses count on it)
            self.logprobs.append(logprob)
        if tok in self.stop_ids:
            self.finish = "stop"
            self.close()
            return
        self.tokens.append(tok)
        if self.decoder is not None:
            self._add_text(self.decoder.push(tok))
        if self.constraint is not None:
            self.constraint.take(tok)
            if self.constraint.stopped and self.finish is None:  # complete: it allows nothing more
                self.finish = "stop"
        if self.finish is None and (
            len(self.generated) >= self.config.max_new_tokens
            or (not self.config.sliding_window and len(self.tokens) - self.start > capacity)
        ):
            self.finish = "length"
        if self.finish is not None:
            self.close()

    def _add_text(self, piece: str) -> None:
        if not piece:
            return
        old = len(self.text)
        self.text += piece
        if self.stop:
            lo = max(0, old - self.max_stop + 1)
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish = "stop"
                self.cut = True

    def close(self) -> None:
        """End of generation: flush undecoded bytes (unless a stop string cut the text)."""
        if self.decoder is not None and not self.cut:
            self._add_text(self.decoder.flush())
            self.decoder = None
        self.finish = self.finish or "length"

    def safe_text(self) -> str:
        """New text that can no longer turn out to be the start of a stop string."""
        end = len(self.text)
        if self.finish is None:
            for s in self.stop:  # hold back a suffix that is a prefix of a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    @property
    def completion_tokens(self) -> int:
        ended_by_id = bool(self.generated) and self.generated[-1] in self.stop_ids and self.finish == "stop"
        return len(self.generated) - ended_by_id

    def completion(self) -> Completion:
        ids = self.generated[: self.completion_tokens]
        return Completion(
            self.text, list(ids), self.finish or "length", self.logprobs or None, self.prompt_len
        )


__all__ = ["Row"]
