"""Token shards: tokenize a corpus once into `train.bin` / `val.bin` + `meta.json`, then sample from a memmap.

`prepare` streams the corpus in bounded batches of documents (a few MB of text at a time, never the whole
corpus as a Python list of ints), tokenizes each batch with `encode_batch` on all cores (the `tokenizers`
library releases the GIL, so worker threads run in parallel and overlap with reading), puts one end-of-text
token after every document and appends the ids to the split's file (uint16 when the vocabulary has at most
65535 tokens, else uint32). Everything is written under a temp folder first and renamed into place, meta.json
last: a kill at any moment leaves either the previous complete shards or none, and a re-run writes the same
bytes as an uninterrupted run. Re-running with the same corpus and tokenizer fingerprints does nothing.

`TokenShards` opens the result: `get_batch` returns random (x, y) windows of block_size + 1 tokens straight
from the memmap; `iter_sequential` covers a split exactly once (every target token counted once), for exact
validation loss and bits per byte (`bytes_per_token`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from yuyan.data.corpus import SPLIT_RULE, CorpusStats, corpus_fingerprint, corpus_size, iter_documents
from yuyan.errors import UserError
from yuyan.fsutil import claim_output_dir
from yuyan.tokenizer import Tokenizer

FORMAT = "yuyan-token-shards"
VERSION = 1
SPLIT_NAMES = ("train", "val")
BATCH_BYTES = (
    4 << 20
)  # text per encode batch: big enough to keep all cores busy, small enough to bound memory
TMP_PREFIX = ".prepare-tmp-"
SCRUB_REPORT = "scrub_report.json"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _as_tokenizer(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)


def _ordinary(tokenizer: Tokenizer) -> Tokenizer:
    """A copy that encodes special-token strings found in documents as plain text (like tiktoken's
    encode_ordinary): a corpus that mentions "<|endoftext|>" must not inject real end-of-text tokens."""
    hf = HFTokenizer.from_str(tokenizer.to_str())
    hf.encode_special_tokens = True
    return Tokenizer(hf)


def _fingerprint(tokenizer: Tokenizer) -> str:
    fp = tokenizer.fingerprint
    return fp() if callable(fp) else fp


def _up_to_date(out: Path, want: dict) -> dict | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if any(meta.get(k) != v for k, v in want.items()):
        return None
    for s in SPLIT_NAMES:
        f = out / f"{s}.bin"
        if (
            not f.exists()
            or f.stat().st_size != meta["splits"][s]["tokens"] * np.dtype(meta["dtype"]).itemsize
        ):
            return None
    return meta


def prepare(
    spec: str,
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    text_field: str = "text",
    extensions: list[str] | tuple[str, ...] | None = None,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    batch_bytes: int | None = None,
    scrub: str | None = None,
) -> dict:
    """Tokenize corpus `spec` into `out_dir`/{train,val}.bin + meta.json; returns the meta dict.

    When meta.json already records the same corpus and tokenizer fingerprints (and the files are whole),
    nothing is done and the returned meta has `"up_to_date": True` (unless `force`). `scrub="pii"` replaces
    PII and secrets in every document before it is tokenized (yuyan.data.scrub), records that in meta.json
    (so a run with another setting rebuilds) and writes scrub_report.json beside the shards.
    """
    tok = _as_tokenizer(tokenizer)
    if tok.eot_id is None:
        raise UserError(
            "the tokenizer has no end-of-text token (<|endoftext|> or </s>); train one with `yuyan tokenizer train`"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for train.bin, val.bin and meta.json")
    dtype = dtype_for(tok.vocab_size)
    scrubber = _scrubber(scrub)
    want = {
        "format": FORMAT,
        "version": VERSION,
        "corpus": spec,
        "corpus_fingerprint": corpus_fingerprint(spec, text_field, extensions),
        "tokenizer_fingerprint": _fingerprint(tok),
        "text_field": text_field,
        "extensions": list(extensions) if extensions else None,
        "dtype": dtype.name,
        "scrub": scrubber.fingerprint if scrubber else None,
    }
    if not force and (meta := _up_to_date(out, want)) is not None:
        if progress:
            print(f"{out}: shards are up to date (same corpus and tokenizer fingerprints); nothing to do")
        return {**meta, "up_to_date": True}

    claim_output_dir(out, force=force, sources=(None if spec == "stdlib" else spec,), command="prepare")
    for stale in out.glob(TMP_PREFIX + "*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f"{TMP_PREFIX}{os.getpid()}"
    tmp.mkdir()
    t0 = time.perf_counter()
    stats = CorpusStats()
    try:
        counts = _tokenize_to(
            tmp,
            spec,
            _ordinary(tok),
            dtype,
            text_field,
            extensions,
            stats,
            workers,
            progress,
            batch_bytes,
            scrubber,
        )
        if counts["train"]["tokens"] == 0:
            raise UserError(
                f"corpus {spec!r} gave no training tokens (all {stats.docs} documents fell into the val "
                "split); use a corpus with more files"
            )
        meta = {
            **want,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "split_rule": SPLIT_RULE,
            "splits": counts,
            "train_tokens": counts["train"]["tokens"],
            "val_tokens": counts["val"]["tokens"],
            "train_bytes": counts["train"]["bytes"],
            "val_bytes": counts["val"]["bytes"],
            "corpus_stats": stats.to_dict(),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if scrubber is not None:
            meta["scrub_totals"] = scrubber.report.to_dict()["totals"]
        # publish: drop the old meta first (shards without meta.json are never used), then the bins, meta last
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / "meta.json")
        for s in SPLIT_NAMES:
            os.replace(tmp / f"{s}.bin", out / f"{s}.bin")
        if scrubber is not None:
            (tmp / SCRUB_REPORT).write_text(
                json.dumps(scrubber.report.to_dict(), indent=2, ensure_ascii=False)
            )
            os.replace(tmp / SCRUB_REPORT, out / SCRUB_REPORT)
        else:  # a report left by an earlier --scrub run would describe shards that are gone
            with contextlib.suppress(FileNotFoundError):
                os.remove(out / SCRUB_REPORT)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        os.replace(tmp / "meta.json", out / "meta.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _scrubber(scrub: str | None):
    """The yuyan.data.scrub.Scrubber for `scrub` ("pii"), None for no scrubbing; imported only when asked
    for, since its detectors are the optional `privacy` extra."""
    if scrub is None:
        return None
    from yuyan.data.scrub import Scrubber

    return Scrubber(scrub)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from yuyan.progress import Progress

    p = Progress(
        TextColumn("tokenizing"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        unit="bytes",
    )
    return p


def _tokenize_to(
    tmp, spec, tok, dtype, text_field, extensions, stats, workers, progress, batch_bytes, scrubber=None
) -> dict:
    """Writes tmp/{train,val}.bin for the corpus; returns the per-split token, byte and document counts."""
    workers = max(1, workers or os.cpu_count() or 1)
    batch_bytes = batch_bytes or min(16 << 20, max(BATCH_BYTES, workers << 20))
    total = corpus_size(spec, extensions)
    batches = _document_batches(spec, text_field, extensions, stats, batch_bytes, scrubber)
    writer = _ShardWriter(tmp, dtype, tok.eot_id)
    try:
        with _progress(progress) as bar, contextlib.closing(_encode_ahead(tok, batches, workers)) as encoded:
            task = bar.add_task("tokenizing", total=total)
            for meta, ids in encoded:
                bar.advance(task, writer.write(meta, ids))
            writer.finish()
            bar.update(task, completed=total)
    finally:
        writer.close()
    return writer.counts


# one document piece of a batch: (split, source, piece index, UTF-8 bytes)
PieceMeta = tuple[str, str, int, int]


def _document_batches(
    spec, text_field, extensions, stats, batch_bytes: int, scrubber=None
) -> Iterator[tuple[list[str], list[PieceMeta]]]:
    """The corpus's document pieces (texts and their metadata) in batches of at least `batch_bytes` of
    UTF-8 text; the last batch may be smaller. A `scrubber` (text, source) -> text is applied to each piece
    here, while the previous batch is being encoded, so the shards hold (and count) only scrubbed text."""
    texts: list[str] = []
    meta: list[PieceMeta] = []
    size = 0
    for doc in iter_documents(spec, "all", text_field, extensions, stats):
        text = doc.text if scrubber is None else scrubber(doc.text, doc.source)
        nbytes = len(text.encode("utf-8"))
        texts.append(text)
        meta.append((doc.split, doc.source, doc.piece, nbytes))
        size += nbytes
        if size >= batch_bytes:
            yield texts, meta
            texts, meta, size = [], [], 0
    if texts:
        yield texts, meta


def _encode_ahead(
    tok: Tokenizer, batches: Iterator[tuple[list[str], list[PieceMeta]]], workers: int
) -> Iterator[tuple[list[PieceMeta], list[list[int]]]]:
    """Each batch's metadata and token ids, in order. A batch is split across `workers` threads, and while
    the caller writes one batch the next is read and encoded: at most two batches are in memory."""
    pool = ThreadPoolExecutor(workers)
    inflight: deque = deque()  # (batch meta, [futures])
    try:
        for texts, meta in batches:
            step = -(-len(texts) // workers)
            futs = [pool.submit(tok.encode_batch, texts[i : i + step]) for i in range(0, len(texts), step)]
            inflight.append((meta, futs))
            while len(inflight) > 1:
                yield _encoded(*inflight.popleft())
        while inflight:
            yield _encoded(*inflight.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _encoded(meta: list[PieceMeta], futs: list) -> tuple[list[PieceMeta], list[list[int]]]:
    return meta, list(itertools.chain.from_iterable(f.result() for f in futs))


class _ShardWriter:
    """Appends each split's token ids to its .bin file, with one end-of-text token after every document.

    A long document arrives as consecutive pieces of one source; the end-of-text token goes in when the
    next piece of the split starts another document (or the split ends), never between pieces."""

    def __init__(self, folder: Path, dtype: np.dtype, eot_id: int):
        self.dtype = dtype
        self.eot = [eot_id]
        self.files = {s: open(folder / f"{s}.bin", "wb") for s in SPLIT_NAMES}  # noqa: SIM115 (closed in close())
        self.counts = {s: {"tokens": 0, "bytes": 0, "docs": 0} for s in SPLIT_NAMES}
        self.last: dict[str, tuple[str, int] | None] = dict.fromkeys(SPLIT_NAMES)  # (source, piece)

    def write(self, meta: list[PieceMeta], encoded: list[list[int]]) -> int:
        """Appends one batch; returns its UTF-8 bytes (for the progress bar)."""
        per_split: dict[str, list[list[int]]] = {s: [] for s in SPLIT_NAMES}
        done = 0
        for (split, source, piece, nbytes), ids in zip(meta, encoded, strict=True):
            prev = self.last[split]
            if prev is not None and not (prev[0] == source and piece == prev[1] + 1):
                per_split[split].append(self.eot)  # the previous document ended
            if piece == 0:
                self.counts[split]["docs"] += 1
            per_split[split].append(ids)
            self.last[split] = (source, piece)
            self.counts[split]["bytes"] += nbytes
            done += nbytes
        for s, lists in per_split.items():
            if lists:
                self._append(s, itertools.chain.from_iterable(lists))
        return done

    def _append(self, split: str, ids) -> None:
        arr = np.fromiter(ids, dtype=self.dtype)
        arr.tofile(self.files[split])
        self.counts[split]["tokens"] += len(arr)

    def finish(self) -> None:
        """Ends the last document of each split and makes the files durable."""
        for s in SPLIT_NAMES:
            if self.last[s] is not None:
                self._append(s, self.eot)
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class TokenShards:
    """Read side of `prepare`: memmapped train/val token arrays, random windows and sequential passes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / "meta.json"
        if not mf.exists():
            raise UserError(
                f"no token shards in {self.path} (meta.json missing); make them with `yuyan prepare`"
            )
        try:
            self.meta = json.loads(mf.read_text())
            self.dtype = np.dtype(self.meta["dtype"])
            self.splits = self.meta["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{mf} is not a yuyan shard meta.json ({e}); re-run `yuyan prepare`") from None
        for s in SPLIT_NAMES:
            f = self.path / f"{s}.bin"
            want = self.splits[s]["tokens"] * self.dtype.itemsize
            if not f.exists() or f.stat().st_size != want:
                raise UserError(
                    f"{f} is missing or not {want} bytes as meta.json says; re-run `yuyan prepare`"
                )
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only 1-D memmap (an empty array for an empty split)."""
        if split not in SPLIT_NAMES:
            raise UserError(f"unknown split {split!r}; choose train or val")
        if split not in self._arrays:
            n = self.splits[split]["tokens"]
            self._arrays[split] = (
                np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r", shape=(n,))
                if n
                else np.zeros(0, self.dtype)
            )
        return self._arrays[split]

    def num_tokens(self, split: str) -> int:
        return int(self.splits[split]["tokens"])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token (end-of-text tokens included) — converts nats/token to bits/byte."""
        t = self.num_tokens(split)
        if t == 0:
            raise UserError(f"the {split} split of {self.path} is empty; use a larger corpus")
        return self.splits[split]["bytes"] / t

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """UserError when these shards were made with a different tokenizer."""
        fp = _fingerprint(tokenizer)
        if self.meta.get("tokenizer_fingerprint") != fp:
            raise UserError(
                f"the shards in {self.path} were made with tokenizer {self.meta.get('tokenizer_fingerprint')}, "
                f"not this one ({fp}); re-run `yuyan prepare` with this tokenizer"
            )

    def _need(self, split: str, n: int) -> np.ndarray:
        data = self.array(split)
        if len(data) < n:
            raise UserError(
                f"the {split} split of {self.path} has {len(data)} tokens, fewer than the {n} needed; "
                "use a larger corpus or a smaller block size"
            )
        return data

    def get_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x, y int64 (batch_size, block_size) with y[b, t] = x[b, t + 1] in the corpus."""
        data = self._need(split, block_size + 1)
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
        w = torch.from_numpy(np.stack([data[i : i + block_size + 1] for i in ix]).astype(np.int64))
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T) each
        return _to(x, device), _to(y, device)

    def iter_sequential(
        self, split: str, batch_size: int, block_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows covering the split once: every token but the first is a target exactly once.
        Full windows come in (≤batch_size, block_size) batches; a last partial window as a (1, r) batch."""
        data = self._need(split, 2)
        n_targets = len(data) - 1
        full = n_targets // block_size
        for r0 in range(0, full, batch_size):
            rows = range(r0, min(r0 + batch_size, full))
            w = np.stack([data[r * block_size : (r + 1) * block_size + 1] for r in rows]).astype(np.int64)
            w = torch.from_numpy(w)
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()
        rest = n_targets - full * block_size
        if rest:
            w = torch.from_numpy(data[full * block_size :].astype(np.int64))[None]  # (1, rest + 1)
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def __repr__(self) -> str:
        return f"TokenShards({self.path}, train={self.num_tokens('train')}, val={self.num_tokens('val')} tokens, {self.dtype})"


def _to(t: torch.Tensor, device) -> torch.Tensor:
    if device is None or torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)  # async host-to-GPU copy


def check_tokenizer(shards: str | os.PathLike | TokenShards, tokenizer: Tokenizer) -> None:
    """UserError when the shards in `shards` were made with another tokenizer."""
    (shards if isinstance(shards, TokenShards) else TokenShards(shards)).check_tokenizer(tokenizer)


def corpus_bytes_per_token(
    tokenizer: Tokenizer,
    spec: str,
    split: str = "val",
    text_field: str = "text",
    extensions: list[str] | tuple[str, ...] | None = None,
    max_bytes: int | None = 8 << 20,
) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of a corpus split (its first `max_bytes` of documents), encoded in batches."""
    nbytes = ntok = 0
    batch: list[str] = []
    tokenizer = _ordinary(tokenizer)

    def flush() -> int:
        n = sum(len(ids) for ids in tokenizer.encode_batch(batch)) if batch else 0
        batch.clear()
        return n

    for doc in iter_documents(spec, split, text_field, extensions):
        batch.append(doc.text)
        nbytes += len(doc.text.encode("utf-8"))
        if len(batch) >= 256:
            ntok += flush()
        if max_bytes is not None and nbytes >= max_bytes:
            break
    ntok += flush()
    return nbytes, ntok
