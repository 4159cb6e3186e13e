"""`yuyan tokenizer train|encode|decode|info`: byte-level BPE tokenizers as tokenizer.json folders.

Thin calls into `yuyan.tokenizer.Tokenizer` and `yuyan.data.corpus`: training streams the corpus's train
split (never loaded whole) into the `tokenizers` library's trainer and reports bytes per token on the
validation split.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from yuyan.cli.app import app
from yuyan.cli.common import FORCE, output_dir
from yuyan.errors import UserError

tok_app = typer.Typer(help="Train, inspect and use byte-level BPE tokenizers.", no_args_is_help=True)
app.add_typer(tok_app, name="tokenizer")

TOKENIZER = typer.Option(
    ..., "--tokenizer", "-t", help="folder with tokenizer.json (ours or a Hugging Face model's)"
)
CORPUS_HELP = "file, folder, glob, JSONL file or 'stdlib' (the running Python's standard library)"


def _exts(extensions: str | None) -> list[str] | None:
    return [e.strip() for e in extensions.split(",") if e.strip()] if extensions else None


def _bpt_line(
    tok, corpus: str, split: str, text_field: str, extensions: list[str] | None, max_mb: float
) -> str:
    from yuyan.data.shards import corpus_bytes_per_token

    nbytes, ntok = corpus_bytes_per_token(tok, corpus, split, text_field, extensions, int(max_mb * 1e6))
    if ntok == 0:
        return f"bytes/token on {corpus} ({split}): no text in this split"
    return f"bytes/token on {corpus} ({split}, {nbytes / 1e6:.2f} MB): {nbytes / ntok:.3f}"


@tok_app.command("train")
def train_cmd(
    corpus: str = typer.Option(..., "--corpus", "-c", help=CORPUS_HELP),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="vocabulary size, special tokens included"),
    min_frequency: int = typer.Option(2, "--min-frequency", help="a pair must occur this often to be merged"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write tokenizer.json into"),
    text_field: str = typer.Option("text", "--text-field", help="JSONL field that holds the text"),
    extensions: str = typer.Option(
        None,
        "--extensions",
        help="comma list of file extensions for folders, e.g. .py,.md (default: common text and code extensions)",
    ),
    force: bool = FORCE,
) -> None:
    """Train a byte-level BPE tokenizer on a corpus's train split and save tokenizer.json.

    Example: yuyan tokenizer train --corpus stdlib --vocab-size 8192 --out runs/tok
    """
    from yuyan.data.corpus import CorpusStats, iter_documents
    from yuyan.tokenizer import Tokenizer

    output_dir(out, force, corpus, command="tokenizer train")
    stats = CorpusStats()
    exts = _exts(extensions)
    docs = iter_documents(corpus, "train", text_field, exts, stats)
    t0 = time.perf_counter()
    tok = Tokenizer.train(
        docs, vocab_size=vocab_size, min_frequency=min_frequency, show_progress=sys.stderr.isatty()
    )
    secs = time.perf_counter() - t0
    path = tok.save(out)
    print(f"corpus (train split): {stats.summary()}")
    print(
        f"trained vocab {tok.vocab_size} in {secs:.1f} s ({stats.bytes / 1e6 / max(secs, 1e-9):.2f} MB/s); wrote {path}"
    )
    print(_bpt_line(tok, corpus, "val", text_field, exts, 8))


def _load(path: Path):
    from yuyan.tokenizer import Tokenizer

    return Tokenizer.load(path)


@tok_app.command("encode")
def encode_cmd(
    tokenizer: Path = TOKENIZER,
    text: str = typer.Argument(None, help="text to encode (default: read standard input)"),
    pieces: bool = typer.Option(False, "--pieces", help="also print each token's text"),
) -> None:
    """Print the token ids of TEXT (or of standard input), separated by spaces.

    Example: yuyan tokenizer encode --tokenizer runs/tok "def hello(): 你好"
    """
    tok = _load(tokenizer)
    ids = tok.encode(sys.stdin.read() if text is None else text)
    print(" ".join(map(str, ids)))
    if pieces:
        for i in ids:
            print(f"{i}\t{tok.id_to_piece(i)!r}")


@tok_app.command("decode")
def decode_cmd(
    tokenizer: Path = TOKENIZER,
    ids: list[str] = typer.Argument(None, help="token ids (default: read them from standard input)"),
) -> None:
    """Print the text of token ids (exactly: no newline is added).

    Example: yuyan tokenizer decode --tokenizer runs/tok 412 85 1203
    """
    tok = _load(tokenizer)
    words = ids if ids else sys.stdin.read().split()
    try:
        nums = [int(w) for w in words]
    except ValueError:
        raise UserError(
            f"token ids must be integers, got {' '.join(words)[:60]!r}; pass e.g. 412 85 1203"
        ) from None
    bad = [i for i in nums if not 0 <= i < tok.vocab_size]
    if bad:
        raise UserError(
            f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1}); check the ids"
        )
    sys.stdout.write(tok.decode(nums))
    sys.stdout.flush()


@tok_app.command("info")
def info_cmd(
    tokenizer: Path = TOKENIZER,
    corpus: str = typer.Option(
        None, "--corpus", "-c", help="also measure bytes per token on this corpus (default: not measured)"
    ),
    split: str = typer.Option("val", "--split", help="corpus split to measure: all, train or val"),
    text_field: str = typer.Option("text", "--text-field", help="JSONL field that holds the text"),
    max_mb: float = typer.Option(8.0, "--max-mb", help="measure on at most this many MB of text"),
) -> None:
    """Vocabulary size, model type, special tokens and fingerprint (and bytes/token on a corpus).

    Example: yuyan tokenizer info --tokenizer runs/tok --corpus stdlib
    """
    tok = _load(tokenizer)
    info = tok.info()
    fp = info["fingerprint"]
    print(f"tokenizer: {tokenizer} ({info['model']}, fingerprint {fp() if callable(fp) else fp})")
    print(f"vocab size: {info['vocab_size']}")
    print(f"end-of-text id: {info['eot_id']}  pad id: {info['pad_id']}")
    chat = info["chat_tokens"]
    print(
        "chat tokens: "
        + (", ".join(f"{k}={v}" for k, v in chat.items()) if chat else "none (plain-text chat markers)")
    )
    if corpus:
        print(_bpt_line(tok, corpus, split, text_field, None, max_mb))
