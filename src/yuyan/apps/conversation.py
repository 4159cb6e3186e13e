"""One chat: a `Conversation` (history, system message, turns trimmed to fit the context) and `repl`, the
loop behind both `yuyan chat` and `yuyan run chat`.

A conversation renders its history through the tokenizer's chat template. A model whose tokenizer has the
chat role tokens stops at the end of its turn; a base model gets the template's plain "User: ..." lines and
stops where it starts writing the next role's line. Before each reply the oldest turns are dropped (the
system message stays) until the prompt leaves `max_new_tokens` of room in the context; a single turn that
still does not fit is refused, not cut. `repl` reads one user turn per line of its input, so piped text
works as a script, and understands /reset and /exit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TextIO

from yuyan.errors import UserError
from yuyan.generate import GenerationConfig, generate, stream
from yuyan.model.checkpoint import LanguageModel

CHAT_DEFAULTS = {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.95}
PLAIN_STOPS = ["\nUser:", "\nSystem:"]  # a base model's next role line, in the plain-text template
# a chat sets these itself (one reply, the turn's stop tokens, the context it trims to): not the caller's
CHAT_FIXED = ("n", "logprobs", "stop_token_ids", "context_overflow")


def has_chat(lm: LanguageModel) -> bool:
    """Whether the tokenizer has the chat role tokens (else the chat template writes plain text)."""
    from yuyan.tokenizer import CHAT_TOKENS

    return all(t in lm.tokenizer.chat_ids for t in CHAT_TOKENS)


class Conversation:
    """A chat history with one model and one GenerationConfig; `send` adds a user turn and streams the reply."""

    def __init__(
        self,
        lm: LanguageModel,
        config: GenerationConfig,
        system: str | None = None,
        messages: Sequence[dict] = (),
    ):
        self.lm = lm
        self.base = [{"role": "system", "content": system}] if system else []
        self.messages = [*self.base, *messages]
        # a turn too long for the context alone is an error: cutting it would answer a message nobody wrote
        self.config = replace(
            config,
            stop=[*config.stop, *([] if has_chat(lm) else PLAIN_STOPS)],
            stop_token_ids=lm.tokenizer.chat_stop_ids,
            context_overflow="error",
        ).validate()

    def reset(self) -> None:
        self.messages = list(self.base)

    def prompt(self) -> list[int]:
        """The history as prompt ids, the oldest turns dropped until the reply has room in the context."""
        tok, room = self.lm.tokenizer, max(1, self.lm.model.config.block_size - self.config.max_new_tokens)
        ids = tok.apply_chat_template(self.messages, add_generation_prompt=True)[0]
        start = len(self.base)
        while len(ids) > room and len(self.messages) > start + 1:
            del self.messages[start]  # one turn: a message and what answers it, up to the next user message
            while len(self.messages) > start + 1 and self.messages[start]["role"] != "user":
                del self.messages[start]
            ids = tok.apply_chat_template(self.messages, add_generation_prompt=True)[0]
        return ids

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply (its leading whitespace dropped); the reply joins the history
        when it is complete. A turn that fails (too long for the context) leaves the history as it was."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in stream(self.lm.model, self.lm.tokenizer, self.prompt(), self.config):
                piece = piece if pieces else piece.lstrip()
                if piece:
                    pieces.append(piece)
                    yield piece
        except UserError:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def reply(self) -> str:
        """The reply to the history as it stands (ending with a user turn), not streamed, so beam search
        works here; it is not added to the history."""
        if len(self.messages) == len(self.base) or self.messages[-1].get("role") != "user":
            raise UserError('a chat must end with a user message; add {"role": "user", "content": ...}')
        out = generate(self.lm.model, self.lm.tokenizer, [self.prompt()], self.config)
        return out[0][0].text.strip()


def _answer(conv: Conversation, text: str, out: TextIO, as_json: bool) -> None:
    if as_json:
        reply = "".join(conv.send(text))
        out.write(json.dumps({"role": "assistant", "content": reply}, ensure_ascii=False) + "\n")
        return
    out.write("assistant: ")
    for piece in conv.send(text):
        out.write(piece)
        out.flush()
    out.write("\n")


def repl(
    conv: Conversation, lines: TextIO | None = None, out: TextIO | None = None, as_json: bool = False
) -> None:
    """Chat over `lines` (default stdin) until /exit or their end: one user turn per non-empty line, each
    reply streamed to `out` (default stdout) as `assistant: ...`, or one JSON object per reply. /reset
    clears the history back to the system message; a turn that fails prints `error: ...` and the chat goes on.
    """
    lines, out = lines or sys.stdin, out or sys.stdout
    interactive = lines.isatty()
    print("chat: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = lines.readline()
        command = line.strip()
        if not line or command == "/exit":
            break
        if command == "/reset":
            conv.reset()
            out.write("(history cleared)\n")
        elif command:
            try:
                _answer(conv, line.rstrip("\n"), out, as_json)
            except UserError as e:
                out.write("" if as_json else "\n")  # end the "assistant: " line
                print(f"error: {e}", file=sys.stderr)
        out.flush()


__all__ = ["Conversation", "repl", "has_chat", "CHAT_DEFAULTS", "CHAT_FIXED", "PLAIN_STOPS"]
