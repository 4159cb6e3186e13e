"""Corpus specs: folders, globs, JSONL, single files and stdlib; skips counted (binary, non-UTF-8,
unreadable, bad JSONL lines); symlink loops; bounded pieces that tokenize exactly like the whole text;
the deterministic split rule; clear errors on bad specs."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest

import yuyan.data.corpus as C
from yuyan.data.corpus import CorpusStats, corpus_fingerprint, iter_documents, split_of, stdlib_root
from yuyan.errors import UserError


def _rule(key: str) -> str:
    return "val" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < 5 else "train"


@pytest.fixture
def messy(tmp_path):
    """A folder with good files, a binary, a non-UTF-8 file, a dangling link, a symlink loop and an
    ignored extension."""
    d = tmp_path / "messy"
    (d / "sub").mkdir(parents=True)
    (d / "a.py").write_text("print('a')\n")
    (d / "b.txt").write_text("文本 b\n")
    (d / "sub" / "c.md").write_text("# c\n")
    (d / "empty.txt").write_text("")
    (d / "image.bin").write_bytes(bytes(range(256)))  # not a listed extension: ignored
    (d / "bin.txt").write_bytes(b"GIF89a\x00\x01\x02")
    (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    os.symlink(d / "missing.txt", d / "dangling.txt")
    os.symlink(d / "loop2.txt", d / "loop1.txt")
    os.symlink(d / "loop1.txt", d / "loop2.txt")
    os.symlink(d, d / "sub" / "back")  # a folder loop: must not hang or read a file twice
    return d


def test_folder_skips_are_counted_never_fatal(messy):
    st = CorpusStats()
    docs = list(iter_documents(str(messy), stats=st))
    assert [d.name for d in docs] == ["a.py", "b.txt", "sub/c.md"]
    assert [d.text for d in docs] == ["print('a')\n", "文本 b\n", "# c\n"]
    assert (st.skipped_binary, st.skipped_non_utf8, st.skipped_unreadable, st.skipped_empty) == (1, 1, 3, 1)
    assert st.files == 4 and st.docs == 3  # files read (empty.txt included)
    assert st.bytes == sum(len(d.text.encode()) for d in docs)
    s = st.summary()
    assert "1 binary" in s and "1 non-UTF-8" in s and "3 unreadable" in s
    assert all(d.split == _rule(d.name) for d in docs)
    # extensions are configurable (one file left: split by sections like a single-file corpus)
    assert [d.name for d in iter_documents(str(messy), extensions=[".md"])] == ["sub/c.md#0"]


def test_glob_and_jsonl(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "one.py").write_text("1\n")
    (tmp_path / "x" / "y" / "two.py").write_text("2\n")
    (tmp_path / "x" / "y" / "skip.txt").write_text("no\n")
    names = [d.name for d in iter_documents(str(tmp_path / "x" / "**" / "*.py"))]
    assert names == ["one.py", "y/two.py"]
    assert [d.source for d in iter_documents(str(tmp_path / "x" / "*" / "*.py"))] == ["y/two.py"]

    f = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "first 第一"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 5}),
        "",
        json.dumps({"text": "second", "body": "b"}),
        json.dumps(["a list"]),
    ]
    f.write_text("\n".join(lines) + "\n")
    st = CorpusStats()
    docs = list(iter_documents(str(f), stats=st))
    assert [(d.name, d.text) for d in docs] == [("data.jsonl:1", "first 第一"), ("data.jsonl:6", "second")]
    assert st.skipped_bad_json_lines == 4 and st.docs == 2
    assert [d.text for d in iter_documents(str(f), text_field="body")] == ["no text field", "b"]
    # the split rule per record
    val = {d.name for d in iter_documents(str(f), "val")}
    assert val == {d.name for d in docs if _rule(d.name) == "val"}


def test_bad_specs_are_clear_errors(tmp_path, messy):
    with pytest.raises(UserError, match="no such path"):
        iter_documents(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="'stdlib'"):
        iter_documents("std")  # an unknown spec
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        iter_documents(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="is empty"):
        iter_documents(str(tmp_path / "empty" / "*.txt"))
    with pytest.raises(UserError, match="unknown split"):
        iter_documents(str(messy), split="test")
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.txt").write_bytes(b"\xff\xfe\x00bin")
    with pytest.raises(UserError, match="holds no text"):
        list(iter_documents(str(only_bad)))


def test_stdlib_corpus_split_is_deterministic():
    root = stdlib_root()
    files = C.corpus_files("stdlib")
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 300 and "os.py" in rel and "json/__init__.py" in rel
    bad = {"test", "tests", "site-packages", "idlelib"}
    assert not any(bad & set(r.split("/")[:-1]) for r in rel)
    assert all(r.endswith(".py") for r in rel)
    val = [d.name for d in iter_documents("stdlib", "val")]
    assert val == [r for r in rel if _rule(r) == "val"] and 0 < len(val) < len(rel) * 0.1
    assert val == [d.name for d in iter_documents("stdlib", "val")]
    h = hashlib.sha256(b"stdlib\ntext\n")
    for r, p in zip(rel, files, strict=True):
        h.update(f"{r}\t{p.stat().st_size}\t0\n".encode())
    assert corpus_fingerprint("stdlib") == h.hexdigest()[:16]


def test_fingerprint_tracks_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    fp = corpus_fingerprint(str(tmp_path))
    assert corpus_fingerprint(str(tmp_path)) == fp
    (tmp_path / "a.txt").write_text("one two")
    assert corpus_fingerprint(str(tmp_path)) != fp
    assert corpus_fingerprint(str(tmp_path), text_field="body") != corpus_fingerprint(str(tmp_path))


def _random_code(n_lines: int, seed: int = 0) -> str:
    rnd = random.Random(seed)
    words = ["def", "return", "x", "语言", "😀", "(", ")", "==", "  ", "\t", "0x1f", "café", "'s"]
    lines = []
    for _ in range(n_lines):
        indent = " " * rnd.choice([0, 0, 4, 8])
        lines.append(
            indent
            + " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 12)))
            + rnd.choice(["", " ", "\r"])
        )
    return "\n".join(lines)


def test_long_text_pieces_tokenize_exactly(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(C, "PIECE_CHARS", 700)
    monkeypatch.setattr(C, "READ_BYTES", 1000)  # several read chunks, multi-byte characters across them
    text = _random_code(600)
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    (tmp_path / "small.txt").write_text("small\n")
    docs = [d for d in iter_documents(str(tmp_path)) if d.source == "big.txt"]
    assert len(docs) > 5 and all(len(d.text) <= 1400 for d in docs)
    assert [d.piece for d in docs] == list(range(len(docs)))
    assert len({d.split for d in docs}) == 1  # the whole file goes to one split
    assert "".join(d.text for d in docs) == text
    pieces = tokenizer.encode_batch([d.text for d in docs])
    assert [i for p in pieces for i in p] == tokenizer.encode(text)


def test_large_non_utf8_file_emits_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "READ_BYTES", 100)
    (tmp_path / "ok.txt").write_text("ok\n")
    (tmp_path / "late.txt").write_bytes(b"good text\n" * 100 + b"\xff")
    st = CorpusStats()
    assert [d.name for d in iter_documents(str(tmp_path), stats=st)] == ["ok.txt"]
    assert st.skipped_non_utf8 == 1


def test_single_file_is_split_into_sections(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "SECTION_CHARS", 300)
    text = _random_code(2000, seed=1)
    f = tmp_path / "one.txt"
    f.write_text(text)
    docs = list(iter_documents(str(f)))
    assert "".join(d.text for d in docs) == text
    train = list(iter_documents(str(f), "train"))
    val = list(iter_documents(str(f), "val"))
    assert val and train
    assert [d.name for d in val] == [d.name for d in docs if d.split == "val"]
    assert sorted(d.name for d in train + val) == sorted(d.name for d in docs)
    assert all(d.split == split_of(d.name) for d in docs[:-1])
    # a small file: one section, in train
    (tmp_path / "tiny.txt").write_text("tiny")
    assert [(d.text, d.split) for d in iter_documents(str(tmp_path / "tiny.txt"))] == [("tiny", "train")]


def test_huge_single_line_file_is_read_in_bounded_memory(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(C, "READ_BYTES", 1 << 16)
    f = tmp_path / "line.txt"
    word = "语言 model token "
    with open(f, "w", encoding="utf-8") as fh:
        for _ in range(500):
            fh.write(word * 1000)  # ~10 MB, no newline at all
    size = f.stat().st_size
    tracemalloc.start()
    n = total = 0
    for d in iter_documents(str(f)):
        n += 1
        total += len(d.text.encode())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == size and n > 100
    assert peak < size / 10  # never the whole file in memory (the peak does not grow with the file)
