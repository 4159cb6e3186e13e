"""Corpus specs: turn a file, a folder, a glob, a JSONL file or `stdlib` into a stream of text documents.

A spec is resolved once into a sorted file list (deterministic order on every machine), then read lazily:
memory stays bounded whatever the corpus size, because long texts are cut into pieces of about 1 MB at a
boundary where the byte-level BPE pre-tokenizer would cut anyway (a non-space character followed by
whitespace), so tokenizing the pieces one by one gives exactly the tokens of the whole text. Files that
cannot be read, look binary (a NUL byte in their first 8 KB) or are not UTF-8, and JSONL lines that are not
JSON or lack the text field, are skipped and counted in `CorpusStats`; they never stop the run. Symlinked
folders are followed once (a symlink loop cannot hang the walk).

Split rule (train / val): a unit goes to val when `int(sha256(key).hexdigest(), 16) % 100 < 5`. The key is
the file's path relative to the corpus root (stdlib, folders, globs), `file:line` for JSONL records, and
`file#k` for the k-th ~16 KB section of a corpus that is one plain text file (so a single file still gets a
validation split; if no section hashes into val, the last section goes there).
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import os
import sysconfig
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
)
STDLIB_EXCLUDE = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__"}
VAL_PERCENT = 5
SPLIT_RULE = f"val if int(sha256(key).hexdigest(), 16) % 100 < {VAL_PERCENT}; key = path relative to the corpus root, file:line for JSONL, file#k for ~16 KB sections of a single-file corpus"
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
    kind: str  # stdlib | file | folder | glob
    root: Path
    files: list[tuple[str, Path]]  # (key relative to root, path), sorted by key
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (CorpusStats kind, label) found walking


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
        p = Path(os.path.expanduser(spec))
        if p.is_dir():
            root = p
            files = [
                (q.relative_to(root).as_posix(), q)
                for q in _walk(
                    root,
                    lambda q, is_dir: (is_dir and not q.name.startswith(".")) or q.suffix in exts,
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
    files.sort(key=lambda kp: kp[0])
    if not files:
        raise UserError(
            f"corpus {spec!r} is empty: no matching files"
            + (f" with extensions {', '.join(exts)}" if kind == "folder" else "")
            + "; point --corpus at text files (or pass --extensions)"
        )
    return _Resolved(kind, root, files, skipped)


def corpus_files(spec: str, extensions=None) -> list[Path]:
    """The files a spec resolves to, in corpus order."""
    return [p for _, p in _resolve(spec, extensions).files]


def _size(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, 0


def corpus_size(spec: str, extensions=None) -> int:
    """Total bytes of the files a spec resolves to (for progress bars)."""
    return sum(max(0, _size(p)[0]) for p in corpus_files(spec, extensions))


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


def _jsonl_docs(key: str, path: Path, split: str, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        stats.skip("unreadable", f"{key}: {e.strerror or e}")
        return
    stats.files += 1
    with f:
        for lineno, line in _jsonl_lines(key, f, stats):
            name = f"{key}:{lineno}"
            s = split_of(name)
            if split != "all" and s != split:
                continue  # the other split's lines are not even parsed
            text = _jsonl_text(name, line, text_field, stats)
            if text is None:
                continue
            for k, piece in enumerate(_pieces(iter([text]), PIECE_CHARS)):
                yield Document(name if k == 0 else f"{name}#{k}", piece, s, name, k)


def _jsonl_lines(key: str, f: BinaryIO, stats: CorpusStats) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of an open JSONL file with their 1-based numbers. A line longer than
    MAX_JSONL_LINE is skipped and counted without ever being held whole; a read error ends the file."""
    lineno = 0
    while True:
        try:
            line = f.readline(MAX_JSONL_LINE)
        except OSError as e:
            stats.skip("unreadable", f"{key}: {e.strerror or e}")
            return
        if not line:
            return
        lineno += 1
        if len(line) >= MAX_JSONL_LINE and not line.endswith(b"\n"):
            stats.skip("bad_json_lines", f"{key}:{lineno} longer than {MAX_JSONL_LINE >> 20} MB")
            while (rest := f.readline(MAX_JSONL_LINE)) and not rest.endswith(b"\n"):
                pass
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
        stats.skip("bad_json_lines", f"{name} has no string field {text_field!r}")
        return None
    if not text:
        stats.skipped_empty += 1
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
    return _iter(spec, resolved, split, text_field, stats if stats is not None else CorpusStats())


def _iter(spec: str, r: _Resolved, split: str, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    single = len(r.files) == 1 and r.files[0][1].suffix != ".jsonl"
    for kind, label in r.skipped:
        stats.skip(kind, label)
    n_docs = 0
    for key, path in r.files:
        if path.suffix == ".jsonl":
            docs = _jsonl_docs(key, path, split, text_field, stats)
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
        if n_docs == before and path.suffix != ".jsonl" and (split == "all" or not single):
            stats.skipped_empty += 1
    if n_docs == 0 and split != "val":
        raise UserError(
            f"corpus {spec!r} holds no {'training ' if split == 'train' else ''}text ({stats.summary()}); "
            "point --corpus at UTF-8 text files"
        )
