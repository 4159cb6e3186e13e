"""Corpus specs: turn a file, a folder, a glob, record files or `stdlib` into a stream of text documents.

A spec is resolved once into a sorted file list (deterministic order on every machine), then read lazily:
memory stays bounded whatever the corpus size, because long texts are cut into pieces of about 1 MB at a
boundary where the byte-level BPE pre-tokenizer would cut anyway (a non-space character followed by
whitespace), so tokenizing the pieces one by one gives exactly the tokens of the whole text. Files that
cannot be read, look binary (a NUL byte in their first 8 KB) or are not UTF-8, and JSONL lines that are not
JSON or lack the text field, are skipped and counted in `CorpusStats`; they never stop the run. Symlinked
folders are followed once (a symlink loop cannot hang the walk).

Record files hold one text per record, in the column or field `text_field`: JSONL (`.jsonl`, and compressed
`.jsonl.gz`, `.jsonl.zst`, read line by line through the decompressor), Parquet (`.parquet`, read one record
batch of the text column at a time) and a Hugging Face `datasets` folder written by `save_to_disk` (found by
its `state.json` + `dataset_info.json`, or `dataset_dict.json` for a DatasetDict; its Arrow files are read
one record batch at a time, never mapped whole). Memory is bounded by a batch, not by the file. A Parquet
file or dataset without the text column is an error naming the columns it has. pyarrow and zstandard are
the optional `data` extra.

Split rule (train / val): a unit goes to val when `int(sha256(key).hexdigest(), 16) % 100 < 5`. The key is
the file's path relative to the corpus root (stdlib, folders, globs), `file:line` for JSONL records, and
`file#k` for the k-th ~16 KB section of a corpus that is one plain text file (so a single file still gets a
validation split; if no section hashes into val, the last section goes there). Records in the other formats
are keyed as the same records in a plain JSONL file: record n (from 1) of `x.jsonl.gz`, `x.jsonl.zst`,
`x.parquet` or of a datasets folder `x` has the key `x.jsonl:n`, so converting a corpus between these
formats moves no record between train and val, and gives the same shards.
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import hashlib
import io
import itertools
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from yuyan.errors import UserError

DEFAULT_EXTENSIONS = (
    ".py",
    ".pyi",
    ".txt",
    ".md",
    ".rst",
    ".json",
    ".jsonl",
    ".toml",
    ".yaml",
    ".yml",
    ".cfg",
    ".ini",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".rs",
    ".go",
    ".java",
    ".js",
    ".ts",
    ".html",
    ".css",
    ".sh",
    ".tex",
    ".csv",
    ".tsv",
    ".xml",
    ".jsonl.gz",
    ".jsonl.zst",
    ".parquet",
)
# record files: one text per record (a JSONL line, a Parquet or Arrow row), keyed "base.jsonl:n" for the split
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
RECORD_BATCH = 1024  # Parquet rows decoded at a time, at most
RECORD_BATCH_BYTES = 4 << 20  # and about this much text (rows of 67 KB would make 1024 rows 69 MB)
DATA_EXTRA = "pip install 'yuyan[data]'"
STDLIB_EXCLUDE = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__"}
VAL_PERCENT = 5
SPLIT_RULE = (
    f"val if int(sha256(key).hexdigest(), 16) % 100 < {VAL_PERCENT}; key = path relative to the corpus root, "
    "file:line for JSONL (x.jsonl:n for record n of x.jsonl.gz, x.jsonl.zst, x.parquet or datasets folder x), "
    "file#k for ~16 KB sections of a single-file corpus"
)
PIECE_CHARS = 1 << 20  # long texts are cut into ~1 MB pieces (every stdlib file stays whole)
SECTION_CHARS = 1 << 14  # a single-file corpus is split train/val by ~16 KB sections
READ_BYTES = 1 << 20
MAX_JSONL_LINE = 256 << 20  # a longer JSONL line is skipped, never loaded whole
SPLITS = ("all", "train", "val")


@dataclass(frozen=True, slots=True)
class Document:
    """One text of a corpus. `source` names the file or record it comes from; `piece` numbers the
    consecutive pieces of a long text (piece k+1 continues piece k exactly, no separator between them)."""

    name: str
    text: str
    split: str = "train"
    source: str = ""
    piece: int = 0


@dataclass
class CorpusStats:
    """Counts of what was read and what was skipped (and why)."""

    files: int = 0
    docs: int = 0
    bytes: int = 0
    skipped_binary: int = 0
    skipped_non_utf8: int = 0
    skipped_unreadable: int = 0
    skipped_bad_json_lines: int = 0
    skipped_empty: int = 0
    skipped_special: int = 0  # FIFOs, devices, sockets inside a folder: opening one could block forever
    skipped_bad_name: int = 0  # file names that are not valid UTF-8 (they cannot be keys or be reported)
    examples: list[str] = field(default_factory=list)  # the first few skipped items, with the reason

    def skip(self, kind: str, what: str) -> None:
        setattr(self, f"skipped_{kind}", getattr(self, f"skipped_{kind}") + 1)
        if len(self.examples) < 5:
            self.examples.append(f"{what} ({kind.replace('_', ' ')})")

    @property
    def skipped(self) -> int:
        return (
            self.skipped_binary
            + self.skipped_non_utf8
            + self.skipped_unreadable
            + self.skipped_bad_json_lines
            + self.skipped_special
            + self.skipped_bad_name
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = f"{self.files} files, {self.docs} documents, {self.bytes / 1e6:.2f} MB"
        parts = [
            f"{n} {label}"
            for n, label in [
                (self.skipped_binary, "binary"),
                (self.skipped_non_utf8, "non-UTF-8"),
                (self.skipped_unreadable, "unreadable"),
                (self.skipped_bad_json_lines, "bad JSONL lines"),
                (self.skipped_empty, "empty"),
                (self.skipped_special, "not regular files"),
                (self.skipped_bad_name, "non-UTF-8 names"),
            ]
            if n
        ]
        if parts:
            s += "; skipped " + ", ".join(parts)
            if self.examples:
                s += " (e.g. " + "; ".join(self.examples[:3]) + ")"
        return s


def split_of(key: str) -> str:
    """'val' for about VAL_PERCENT% of keys, chosen by sha256 (the same on every machine), else 'train'."""
    return "val" if int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 100 < VAL_PERCENT else "train"


def stdlib_root() -> Path:
    """The running Python's standard library folder (the embedded default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


# ------------------------------------------------------------------------------------------ resolution
@dataclass
class _Resolved:
    kind: str  # stdlib | file | folder | glob | datasets
    root: Path
    files: list[tuple[str, Path]]  # (key relative to root, path), sorted by key (a dataset's in its order)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (CorpusStats kind, label) found walking
    datasets: dict[str, str] = field(default_factory=dict)  # Arrow file key -> its dataset's key


def record_suffix(name: str) -> str | None:
    """The record-file suffix of a file name (".jsonl", ".jsonl.gz", ".parquet", ...), None for text."""
    return next((x for x in RECORD_SUFFIXES if name.endswith(x) and len(name) > len(x)), None)


def _has_extension(name: str, exts: tuple[str, ...]) -> bool:
    return Path(name).suffix in exts or any(e.count(".") > 1 and name.endswith(e) for e in exts)


def _datasets_files(folder: Path, key: str, skipped: list[tuple[str, str]]) -> list[tuple[str, Path]] | None:
    """The Arrow files of a `save_to_disk` folder in its state.json order, keyed `key/name` (a DatasetDict:
    each split's, `key/split/name`); None when `folder` is not a datasets folder."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            assert isinstance(splits, list) and all(isinstance(x, str) for x in splits)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise UserError(
                f"{folder}/dataset_dict.json is not a datasets DatasetDict file (no list of splits); "
                "save the dataset again with save_to_disk"
            ) from None
        out: list[tuple[str, Path]] = []
        for split in splits:
            if not _plain_name(split):
                raise UserError(f"{folder}/dataset_dict.json names a split {split!r} outside the folder")
            got = _datasets_files(folder / split, f"{key}/{split}", skipped)
            if got is None:
                raise UserError(
                    f"{folder}/{split} has no state.json; save the dataset again with save_to_disk"
                )
            out += got
        return out
    if not ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()):
        return None
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
        assert all(isinstance(n, str) for n in names)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(
            f"{folder}/state.json is not a datasets state file (no _data_files list); "
            "save the dataset again with save_to_disk"
        ) from None
    files = []
    for name in names:
        f = folder / name
        if not _plain_name(name):
            raise UserError(f"{folder}/state.json names a data file {name!r} outside the folder")
        if f.exists() and not f.is_file():  # a FIFO or device in a dataset's place is never opened
            skipped.append(("special", f"{key}/{name}"))
        else:
            files.append((f"{key}/{name}", f))
    return files


def _plain_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and not _bad_name(name)
    )


def _bad_name(name: str) -> bool:
    """A name holding bytes that are not UTF-8 (os.fsdecode turned them into lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _walk(root: Path, keep, skipped: list[tuple[str, str]]) -> Iterator[Path]:
    """Regular files under root (symlinked folders followed once: a symlink loop is visited a single time).

    The one reader of folder entries: a FIFO, device or socket (which would block or never end) and a name
    that is not UTF-8 are skipped and recorded in `skipped` (kind, label), never opened."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows symlinks; a looping or broken link is not a dir
                # a FIFO, device or socket (or a link to one); a broken link is left to the reader to count
                special = not is_dir and not e.is_file() and os.path.exists(e.path)
            except OSError:
                is_dir, special = False, False
            if not keep(Path(e.path), is_dir):
                continue
            if _bad_name(e.name):
                skipped.append(("bad_name", ascii(os.fsencode(e.path))))
            elif is_dir:
                subdirs.append(Path(e.path))
            elif special:
                skipped.append(("special", e.path))
            else:
                yield Path(e.path)
        stack.extend(reversed(subdirs))


def _glob_parts(pattern: str) -> tuple[Path, list[str]]:
    parts = Path(pattern).parts
    i = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    return Path(*parts[:i]) if i else Path("."), list(parts[i:])


def _glob_match(segs: list[str], pat: list[str]) -> bool:
    if not pat:
        return not segs
    if pat[0] == "**":
        return any(_glob_match(segs[i:], pat[1:]) for i in range(len(segs) + 1))
    return bool(segs) and fnmatch.fnmatchcase(segs[0], pat[0]) and _glob_match(segs[1:], pat[1:])


def _resolve_path(spec: str, exts: tuple[str, ...], skipped: list[tuple[str, str]]):
    """(root, files, kind) of a spec that names one path: a datasets folder, a folder or a file."""
    p = Path(os.path.expanduser(spec))
    if p.is_dir() and (ds := _datasets_files(p, _folder_name(p), skipped)) is not None:
        root, files, kind = Path(os.path.abspath(p)).parent, ds, "datasets"
    elif p.is_dir():
        root = p
        files = [
            (q.relative_to(root).as_posix(), q)
            for q in _walk(
                root,
                lambda q, is_dir: (
                    (is_dir and not q.name.startswith(".")) or (not is_dir and _has_extension(q.name, exts))
                ),
                skipped,
            )
        ]
        kind = "folder"
    elif p.exists() and not p.is_file():
        raise UserError(
            f"corpus {spec!r} is not a regular file (a FIFO, a device or a socket would block or never "
            "end); pass a text file, a folder, a glob or 'stdlib'"
        )
    elif p.exists() or p.is_symlink():
        root, files, kind = p.parent, [(p.name, p)], "file"
    else:
        hint = (
            " (the embedded corpus is spelled 'stdlib')"
            if spec.lower() in ("std", "stdlib", "builtin")
            else ""
        )
        raise UserError(
            f"corpus {spec!r} is not a file, folder, glob or 'stdlib' (no such path){hint}; fix --corpus"
        )
    return root, files, kind


def _resolve(spec: str, extensions: tuple[str, ...] | list[str] | None) -> _Resolved:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty corpus spec; pass a file, a folder, a glob, a .jsonl file or 'stdlib'")
    exts = tuple(e if e.startswith(".") else "." + e for e in (extensions or DEFAULT_EXTENSIONS))
    skipped: list[tuple[str, str]] = []
    if spec == "stdlib":
        root = stdlib_root()

        def keep(p: Path, is_dir: bool) -> bool:
            return p.name not in STDLIB_EXCLUDE if is_dir else p.suffix == ".py"

        files = [(p.relative_to(root).as_posix(), p) for p in _walk(root, keep, skipped)]
        kind = "stdlib"
    elif any(c in spec for c in "*?["):
        root, pat = _glob_parts(os.path.expanduser(spec))
        if not root.is_dir():
            raise UserError(f"corpus glob {spec!r}: folder {root} does not exist; fix the path")
        files = []
        for p in _walk(root, lambda p, is_dir: True, skipped):
            rel = p.relative_to(root)
            if _glob_match(list(rel.parts), pat):
                files.append((rel.as_posix(), p))
        kind = "glob"
    else:
        root, files, kind = _resolve_path(spec, exts, skipped)
    if kind != "datasets":
        files.sort(key=lambda kp: kp[0])
    if not files:
        raise UserError(
            f"corpus {spec!r} is empty: no matching files"
            + (f" with extensions {', '.join(exts)}" if kind == "folder" else "")
            + "; point --corpus at text files (or pass --extensions)"
        )
    datasets = {k: k.rsplit("/", 1)[0] for k, _ in files} if kind == "datasets" else {}
    return _Resolved(kind, root, files, skipped, datasets)


def _folder_name(p: Path) -> str:
    return Path(os.path.abspath(p)).name or "dataset"


def corpus_files(spec: str, extensions=None) -> list[Path]:
    """The files a spec resolves to, in corpus order."""
    return [p for _, p in _resolve(spec, extensions).files]


def _size(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, 0


def corpus_size(spec: str, extensions=None) -> int | None:
    """Total bytes of the files a spec resolves to (for progress bars); None when some are compressed or
    columnar (Parquet, Arrow), whose size on disk is not the size of their text."""
    r = _resolve(spec, extensions)
    if any(record_suffix(k) not in (None, ".jsonl") for k, _ in r.files):
        return None
    return sum(max(0, _size(p)[0]) for _, p in r.files)


def corpus_fingerprint(spec: str, text_field: str = "text", extensions=None) -> str:
    """sha256 of the file list and sizes (plus modification times, except for the stdlib corpus whose
    fingerprint must be the same on every install of the same Python); 16 hex digits."""
    r = _resolve(spec, extensions)
    h = hashlib.sha256(f"{r.kind}\n{text_field}\n".encode())
    for key, p in r.files:
        size, mtime = _size(p)
        h.update(f"{key}\t{size}\t{0 if r.kind == 'stdlib' else mtime}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ reading
def _cut_point(buf: str, start: int, limit: int) -> int:
    """An index in (start, limit] (in its upper half when possible) where buf[i-1] is not whitespace and
    buf[i] is a newline or a space: cutting there gives the same byte-level BPE tokens as the uncut text
    (no pre-token spans such a point)."""
    lo = start + (limit - start) // 2
    for ch in ("\n", " "):
        p = buf.rfind(ch, lo, limit)
        while p > lo and buf[p - 1].isspace():
            p = buf.rfind(ch, lo, p)
        if p > lo:
            return p
    return limit  # no safe boundary (one giant word): cut anyway, on a character boundary


def _pieces(chunks: Iterator[str], size: int) -> Iterator[str]:
    """Re-cut a stream of strings into pieces of about `size` characters at safe boundaries."""
    buf = ""
    for c in chunks:
        buf = buf + c if buf else c
        start = 0
        while len(buf) - start >= 2 * size:
            k = _cut_point(buf, start, start + size)
            yield buf[start:k]
            start = k
        buf = buf[start:] if start else buf
    start = 0
    while len(buf) - start > size:
        k = _cut_point(buf, start, start + size)
        yield buf[start:k]
        start = k
    if len(buf) > start:
        yield buf[start:]


def _read_text(path: Path, stats: CorpusStats, label: str) -> Iterator[str] | None:
    """A validated UTF-8 file as a stream of decoded chunks; None (and counted) when it is unreadable,
    binary or not UTF-8. Files over one chunk are validated in a first pass, so no half file is emitted."""
    try:
        with open(path, "rb") as f:
            head = f.read(READ_BYTES)
            more = bool(f.read(1))
    except OSError as e:
        stats.skip("unreadable", f"{label}: {e.strerror or e}")
        return None
    if b"\0" in head[:8192]:
        stats.skip("binary", label)
        return None
    if not more:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("non_utf8", label)
            return None
        return iter([text])
    try:  # a large file: validate first, stream afterwards
        dec = codecs.getincrementaldecoder("utf-8")()
        with open(path, "rb") as f:
            while b := f.read(READ_BYTES):
                dec.decode(b)
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        stats.skip("non_utf8", label)
        return None
    except OSError as e:
        stats.skip("unreadable", f"{label}: {e.strerror or e}")
        return None

    def gen() -> Iterator[str]:
        dec = codecs.getincrementaldecoder("utf-8")()
        with open(path, "rb") as f:
            while b := f.read(READ_BYTES):
                yield dec.decode(b)
        yield dec.decode(b"", final=True)

    return gen()


def _split_base(key: str, r: _Resolved) -> tuple[str, str]:
    """(name base, split base) of a record file: its records are named `name:n` and split by `split:n`."""
    if key in r.datasets:
        return r.datasets[key], r.datasets[key] + ".jsonl"
    suffix = record_suffix(key) or ""
    return key, key[: len(key) - len(suffix)] + ".jsonl"


def _record_docs(
    key: str,
    path: Path,
    r: _Resolved,
    split: str,
    text_field: str,
    stats: CorpusStats,
    rows: dict[str, int],
) -> Iterator[Document]:
    """The documents of one record file. `rows` counts the records read so far per name base, so the Arrow
    files of one dataset number their records on from each other."""
    base, split_base = _split_base(key, r)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        stats.skip("unreadable", f"{key}: {e.strerror or e}")
        return
    stats.files += 1
    first = rows.get(base, 0)
    with f:
        for n, text in _records(key, f, text_field, stats, first):
            rows[base] = n
            name = f"{base}:{n}"
            s = split_of(f"{split_base}:{n}")
            if split != "all" and s != split:
                continue
            text = text(name) if callable(text) else text
            if text is None:
                continue
            if not text:
                stats.skipped_empty += 1
                continue
            for k, piece in enumerate(_pieces(iter([text]), PIECE_CHARS)):
                yield Document(name if k == 0 else f"{name}#{k}", piece, s, name, k)


def _records(key: str, f: BinaryIO, text_field: str, stats: CorpusStats, first: int):
    """(record number, text) of an open record file, numbered on from `first`. The text is a str or, for
    JSONL, a function of the record's name that parses the line, None for a bad line (so the lines of the
    other split are never parsed). A file that breaks while read is counted unreadable and ends there."""
    suffix = record_suffix(key)
    if suffix in (".parquet", ".arrow"):
        pa = _pyarrow()
        try:
            for n, text in enumerate(_column(key, f, suffix, text_field), first + 1):
                yield n, "" if text is None else text  # a null counts as an empty text
        except (OSError, pa.ArrowException) as e:
            stats.skip("unreadable", f"{key}: {(str(e).strip().splitlines() or [type(e).__name__])[0][:120]}")
        return
    stream, errors = _decompressed(f, suffix)
    try:
        for lineno, line in _jsonl_lines(key, stream, stats, errors):
            yield first + lineno, lambda name, line=line: _jsonl_text(name, line, text_field, stats)
    finally:
        stream.close()


def _decompressed(f: BinaryIO, suffix: str | None) -> tuple[BinaryIO, tuple[type[BaseException], ...]]:
    """A JSONL file's lines as a binary stream with readline, and the errors its decompressor raises on a
    corrupt or truncated file."""
    if suffix == ".jsonl.gz":
        return gzip.GzipFile(fileobj=f, mode="rb"), (OSError, EOFError, zlib.error)
    if suffix == ".jsonl.zst":
        zstd = _zstandard()
        reader = zstd.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)
        return io.BufferedReader(reader, READ_BYTES), (OSError, EOFError, zstd.ZstdError)
    return f, (OSError,)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401 (pyarrow.parquet.ParquetFile below)
    except ImportError:
        raise UserError(f"reading Parquet files and datasets folders needs pyarrow: {DATA_EXTRA}") from None
    return pyarrow


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise UserError(f"reading .jsonl.zst files needs zstandard: {DATA_EXTRA}") from None
    return zstandard


def _text_column(key: str, schema, text_field: str) -> None:
    """UserError when a Parquet/Arrow schema has no text column `text_field`, naming the columns it has."""
    pa = _pyarrow()
    names = list(schema.names)
    if text_field not in names:
        shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise UserError(
            f"{key} has no column {text_field!r}; its columns are {shown or '(none)'}: pass --text-field NAME"
        )
    t = schema.field(text_field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise UserError(
            f"column {text_field!r} of {key} holds {t}, not text; pass --text-field with a string column "
            f"(columns: {', '.join(names[:20])})"
        )


def _column(key: str, f: BinaryIO, suffix: str, text_field: str) -> Iterator[str | None]:
    """The values of a text column, one record batch at a time: a Parquet file's rows of that column only,
    `RECORD_BATCH_BYTES` of text a batch by the footer's sizes (at most `RECORD_BATCH` rows; pages read
    through a 1 MB buffer), an Arrow file's batches as written (a datasets folder writes 1000 rows per
    batch). Each value becomes a Python string only when it is taken, so a batch is held once, as Arrow."""
    pa = _pyarrow()
    if suffix == ".parquet":
        pf = pa.parquet.ParquetFile(f, buffer_size=READ_BYTES, pre_buffer=False)
        _text_column(key, pf.schema_arrow, text_field)
        md = pf.metadata
        size = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
        rows = max(1, min(RECORD_BATCH, RECORD_BATCH_BYTES * md.num_rows // max(1, size)))
        batches = pf.iter_batches(batch_size=rows, columns=[text_field], use_threads=False)
    else:
        batches = _arrow_batches(f)
        first = next(batches, None)
        if first is None:
            return
        _text_column(key, first.schema, text_field)
        batches = itertools.chain([first], batches)
    for batch in batches:
        col = batch.column(text_field)
        for i in range(len(col)):
            yield col[i].as_py()


def _arrow_batches(f: BinaryIO):
    """Record batches of an Arrow IPC stream (what datasets writes) or file."""
    pa = _pyarrow()
    try:
        reader = pa.ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def _check_columns(r: _Resolved, text_field: str) -> None:
    """Fail now, before any work, when a Parquet or Arrow file lacks the text column (or pyarrow or
    zstandard is missing). Only schemas are read: a Parquet footer, an Arrow stream's first message."""
    suffixes = {record_suffix(k) for k, _ in r.files}
    if ".jsonl.zst" in suffixes:
        _zstandard()
    if not suffixes & {".parquet", ".arrow"}:
        return
    pa = _pyarrow()
    for key, path in r.files:
        suffix = record_suffix(key)
        if suffix not in (".parquet", ".arrow"):
            continue
        try:
            with open(path, "rb") as f:
                if suffix == ".parquet":
                    schema = pa.parquet.ParquetFile(f).schema_arrow
                else:
                    try:
                        schema = pa.ipc.open_stream(f).schema
                    except pa.ArrowInvalid:
                        f.seek(0)
                        schema = pa.ipc.open_file(f).schema
        except (OSError, pa.ArrowException):
            continue  # counted as unreadable when read
        _text_column(key, schema, text_field)


def _jsonl_lines(
    key: str, f: BinaryIO, stats: CorpusStats, errors: tuple[type[BaseException], ...] = (OSError,)
) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of an open JSONL file with their 1-based numbers. A line longer than
    MAX_JSONL_LINE is skipped and counted without ever being held whole; a read error (one of `errors`: a
    corrupt or truncated compressed file too) ends the file."""
    lineno = 0
    while True:
        try:
            line = f.readline(MAX_JSONL_LINE)
        except errors as e:
            stats.skip("unreadable", f"{key}: {getattr(e, 'strerror', None) or e}")
            return
        if not line:
            return
        lineno += 1
        if len(line) >= MAX_JSONL_LINE and not line.endswith(b"\n"):
            stats.skip("bad_json_lines", f"{key}:{lineno} longer than {MAX_JSONL_LINE >> 20} MB")
            try:
                while (rest := f.readline(MAX_JSONL_LINE)) and not rest.endswith(b"\n"):
                    pass
            except errors as e:
                stats.skip("unreadable", f"{key}: {getattr(e, 'strerror', None) or e}")
                return
            continue
        if line.strip():
            yield lineno, line


def _jsonl_text(name: str, line: bytes, text_field: str, stats: CorpusStats) -> str | None:
    """The text field of one JSONL record; None (and counted) when the line is not JSON, lacks a string
    field of that name, or holds an empty one."""
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        stats.skip("bad_json_lines", f"{name} is not JSON")
        return None
    text = rec.get(text_field) if isinstance(rec, dict) else None
    if not isinstance(text, str):
        fields = f" (its fields: {', '.join(list(rec)[:10])})" if isinstance(rec, dict) and rec else ""
        stats.skip("bad_json_lines", f"{name} has no string field {text_field!r}{fields}")
        return None
    return text


def _sections(key: str, chunks: Iterator[str], split: str) -> Iterator[Document]:
    """A single-file corpus: ~16 KB sections, each assigned by the split rule on `key#k`. If none lands in
    val, the last one goes there (held back one step so the train stream can leave it out)."""
    have_val = False
    prev: Document | None = None
    for k, text in enumerate(_pieces(chunks, SECTION_CHARS)):
        name = f"{key}#{k}"
        doc = Document(name, text, split_of(name), key, k)
        have_val |= doc.split == "val"
        if prev is not None and split in ("all", prev.split):
            yield prev
        prev = doc
    if prev is not None:
        if not have_val and prev.piece > 0:
            prev = Document(prev.name, prev.text, "val", prev.source, prev.piece)
        if split in ("all", prev.split):
            yield prev


def iter_documents(
    spec: str,
    split: str = "all",
    text_field: str = "text",
    extensions: tuple[str, ...] | list[str] | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Documents of a corpus spec, in a deterministic order, restricted to `split` (all | train | val).

    The spec is checked now (a missing path, unknown spec or empty file list raises UserError at once);
    the files are read lazily. Pass a `CorpusStats` to collect counts of files, bytes and skips. When the
    whole corpus yields no text at all, iteration ends with a UserError.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose all, train or val")
    resolved = _resolve(spec, extensions)
    _check_columns(resolved, text_field)
    return _iter(spec, resolved, split, text_field, stats if stats is not None else CorpusStats())


def _iter(spec: str, r: _Resolved, split: str, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    single = len(r.files) == 1 and record_suffix(r.files[0][0]) is None
    for kind, label in r.skipped:
        stats.skip(kind, label)
    n_docs = 0
    rows: dict[str, int] = {}  # records read per name base (a dataset's Arrow files number on)
    for key, path in r.files:
        records = record_suffix(key) is not None
        if records:
            docs = _record_docs(key, path, r, split, text_field, stats, rows)
        else:
            file_split = None if single else split_of(key)
            if split != "all" and file_split is not None and file_split != split:
                continue
            chunks = _read_text(path, stats, key)
            if chunks is None:
                continue
            stats.files += 1
            if single:
                docs = _sections(key, chunks, split)
            else:
                docs = (
                    Document(key if k == 0 else f"{key}#{k}", t, file_split, key, k)
                    for k, t in enumerate(_pieces(chunks, PIECE_CHARS))
                )
        before = n_docs
        for doc in docs:
            stats.docs += 1
            stats.bytes += len(doc.text.encode("utf-8"))
            n_docs += 1
            yield doc
        if n_docs == before and not records and (split == "all" or not single):
            stats.skipped_empty += 1
    if n_docs == 0 and split != "val":
        fix = (
            f"pass --text-field with the records' text field (not {text_field!r})"
            if stats.skipped_bad_json_lines
            else "point --corpus at UTF-8 text files"
        )
        raise UserError(
            f"corpus {spec!r} holds no {'training ' if split == 'train' else ''}text ({stats.summary()}); {fix}"
        )
