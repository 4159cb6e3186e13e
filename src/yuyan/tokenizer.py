"""Byte-level BPE tokenizer: training, loading, exact round trip, streaming decode and the chat template.

A thin wrapper over the `tokenizers` library (Rust speed; its tokenizer.json is the ecosystem's format).
Byte-level pre-tokenisation with the full 256-byte initial alphabet means every Unicode string — Chinese,
emoji, code with tabs, "\\r\\n", NUL — encodes and decodes back exactly. Hugging Face tokenizer.json files
(GPT-2 or Llama style) load as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from yuyan.errors import UserError

EOT = "<|endoftext|>"
# chat role markers: <|system|>content<|end|><|user|>content<|end|><|assistant|>content<|end|>
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, *CHAT_TOKENS, PAD]
# the tool-call format inside chat turns (Hermes/Qwen 2.5; apps/tools.py renders and parses it, the
# exported chat template writes it): one home for its strings, below both
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


def _not_text(text: object) -> str:
    """Why `text` cannot be encoded: not a string, or a lone surrogate (bytes that were not UTF-8, e.g. a
    command-line argument decoded with surrogateescape); "" when it is fine."""
    if not isinstance(text, str):
        return f"text to encode must be a string, not {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"the text holds bytes that are not valid UTF-8 (a lone surrogate {text[e.start]!r} at character "
            f"{e.start}); pass UTF-8 text (check the terminal's or the file's encoding)"
        )
    return ""


class Tokenizer:
    """yuyan's tokenizer: `encode`, `decode`, `encode_batch`, `stream()`, `apply_chat_template`."""

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = vocab.get(EOT, vocab.get("</s>", vocab.get("<|end_of_text|>")))
        self.bos_id = vocab.get("<s>", vocab.get("<|begin_of_text|>"))
        self.pad_id = vocab.get(PAD, self.eot_id)
        self.chat_ids = {t: vocab[t] for t in CHAT_TOKENS if t in vocab}

    # ---------------------------------------------------------------- construction
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        min_frequency: int = 2,
        special_tokens: list[str] | None = None,
        show_progress: bool = False,
    ) -> Tokenizer:
        special = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if vocab_size < 256 + len(special) + 1:
            raise UserError(
                f"vocab size {vocab_size} is too small: the 256 byte tokens and {len(special)} special tokens "
                f"need at least {256 + len(special) + 1}; pass --vocab-size {max(512, 256 + len(special) + 1)} or more"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        # strings or yuyan.data.corpus.Document objects (their .text), streamed: never held as one list
        tok.train_from_iterator((t if isinstance(t, str) else t.text for t in texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json from a file or a folder (ours or a Hugging Face model folder)."""
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.exists():
            raise UserError(
                f"no tokenizer.json in {p}: train one with `yuyan tokenizer train` or point at a model folder"
            )
        if not f.is_file():  # a FIFO or a device would block the read or never end
            raise UserError(f"{f} is not a regular file; point at a real tokenizer.json")
        try:
            return cls(HFTokenizer.from_file(str(f)))
        except Exception as e:  # the Rust loader raises a bare Exception on bad JSON
            raise UserError(
                f"{f} is not a valid tokenizer.json ({str(e).splitlines()[0][:200]}); re-create it"
            ) from None

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "tokenizer.json"
        tmp = folder / ".tokenizer.json.tmp"
        tmp.write_text(self.tok.to_str(pretty=False), encoding="utf-8")
        os.replace(tmp, out)
        return out

    def to_str(self) -> str:
        return self.tok.to_str(pretty=False)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side refuses lone surrogates with a bare "must be str"
            raise UserError(_not_text(text) or "text to encode must be a string") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
        except TypeError:
            raise UserError(
                next((_not_text(t) for t in texts if _not_text(t)), "texts must be strings")
            ) from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; an id outside the vocabulary is an error (the library would drop it)."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise UserError(
                f"token id {bad} is not in the tokenizer's vocabulary (0..{self.vocab_size - 1}); "
                "the ids come from another tokenizer or a model with a larger vocabulary"
            )
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_piece(self, i: int) -> str:
        """Readable text of one token (for plot labels): its bytes decoded with replacement."""
        return self.decode([i])

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """messages -> (ids, assistant_mask): mask is 1 on the tokens the model must learn to produce
        (assistant content and its end marker), 0 elsewhere.

        With our role tokens: <|user|>content<|end|><|assistant|>content<|end|>. A tokenizer without them
        (e.g. GPT-2's) gets plain-text markers "User: ...\\n" and ends assistant turns with its EOT token.
        """
        ids: list[int] = []
        mask: list[int] = []
        plain = len(self.chat_ids) < len(CHAT_TOKENS)
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise UserError(
                    f"bad chat message {str(m)[:80]!r}: need role system|user|assistant and string content"
                )
            head, body, tail = self._chat_parts(role, content, plain)
            ids += head
            mask += [0] * len(head)
            learn = 1 if role == "assistant" else 0
            ids += body + tail
            mask += [learn] * (len(body) + len(tail))
        if add_generation_prompt:
            head, _, _ = self._chat_parts("assistant", "", plain)
            ids += head
            mask += [0] * len(head)
        return ids, mask

    def _chat_parts(self, role: str, content: str, plain: bool) -> tuple[list[int], list[int], list[int]]:
        if plain:
            head = self.encode(f"{role.capitalize()}: ")
            tail = self.encode("\n") + (
                [self.eot_id] if role == "assistant" and self.eot_id is not None else []
            )
        else:
            head = [self.chat_ids[f"<|{role}|>"]]
            tail = [self.chat_ids["<|end|>"]]
        # encode_batch releases the GIL (encode holds it ~0.7 s per MB): the server tokenises beside decoding
        return head, self.encode_batch([content])[0], tail

    @property
    def chat_stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn."""
        ids = [self.chat_ids["<|end|>"]] if "<|end|>" in self.chat_ids else []
        return ids + ([self.eot_id] if self.eot_id is not None else [])

    def __len__(self) -> int:
        return self.vocab_size

    def info(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
            "chat_tokens": self.chat_ids,
            "fingerprint": self.fingerprint,
            "model": json.loads(self.to_str())["model"]["type"],
        }


class StreamDecoder:
    """Incremental decoding that never emits a broken character.

    Each step decodes a short window of recent tokens twice — the already-emitted context alone and the
    context plus the new tokens — and emits the difference once it no longer ends in a replacement character
    (a UTF-8 sequence split across tokens). Decoding with context keeps decoders that strip a leading space
    per call (Llama's Metaspace/Strip) exact: the joined pieces equal `decode(all ids)`. After 8 tokens
    that still end broken (invalid bytes), the text is emitted as it is. `flush()` returns whatever remains.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # context tokens (already emitted) followed by pending ones
        self.read = 0  # ids[:read] are emitted context

    @property
    def pending(self) -> list[int]:
        return self.ids[self.read :]

    def _new_text(self) -> str:
        prefix = self.tokenizer.decode(self.ids[: self.read]) if self.read else ""
        return self.tokenizer.decode(self.ids)[len(prefix) :]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._new_text()
        if (text.endswith("\ufffd") or not text) and len(self.ids) - self.read < 8:
            return ""  # wait for the rest of the character
        self.ids = self.ids[self.read :]  # the new tokens become the context of the next step
        self.read = len(self.ids)
        return text

    def flush(self) -> str:
        text = self._new_text() if len(self.ids) > self.read else ""
        self.ids, self.read = [], 0
        return text

    def __call__(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            piece = self.push(i)
            if piece:
                yield piece
        tail = self.flush()
        if tail:
            yield tail
