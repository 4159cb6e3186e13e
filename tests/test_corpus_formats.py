"""Corpus formats: Parquet, `datasets` save_to_disk folders and compressed JSONL against plain JSONL.

The reference is the same records in a plain `.jsonl` file of the same name: `prepare` must write the same
shard bytes (train.bin, val.bin) and the same counts for every format, so a corpus can be converted between
them without moving a record between train and val. Missing text columns are one clear line; FIFOs, bad
names and corrupt files are handled as for plain text corpora (a FIFO is opened only in a subprocess).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tests.conftest import cli_in_process

from yuyan.data.corpus import CorpusStats, iter_documents, split_of
from yuyan.data.shards import prepare
from yuyan.errors import UserError


def _texts() -> list[str]:
    """300 records: code, Chinese, emoji, a text that mentions <|endoftext|>, and one over 1 MB (cut into
    pieces); with 300 keys, about 15 records go to val."""
    out = []
    for i in range(300):
        out.append(
            [
                f"def f{i}(x):\n\treturn x * {i}  # 注释\n",
                f"语言模型 {i}：我们用它来生成文本。",
                f"emoji {i} 😀 café naïve <|endoftext|> fake end",
                "word " * (i % 7 + 1) + "\n\n",
            ][i % 4]
        )
    out[123] = "long line of text " * 70_000  # ~1.26 MB: more than one 1 MB piece
    return out


TEXTS = _texts()


def _jsonl_bytes(texts: list[str], extra: dict | None = None) -> bytes:
    return b"".join(
        json.dumps({"id": i, "text": t, **(extra or {})}, ensure_ascii=False).encode() + b"\n"
        for i, t in enumerate(texts)
    )


def _write(fmt: str, folder: Path, texts: list[str] = TEXTS, name: str = "corpus") -> Path:
    """`texts` as corpus `name` in format `fmt` under `folder`; returns the corpus path."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (p := folder / f"{name}.jsonl").write_bytes(_jsonl_bytes(texts))
    elif fmt == "jsonl.gz":
        (p := folder / f"{name}.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(texts)))
    elif fmt == "jsonl.zst":  # two frames: the reader must go on across them
        raw = _jsonl_bytes(texts)
        cut = raw.index(b"\n", len(raw) // 2) + 1
        z = zstandard.ZstdCompressor()
        (p := folder / f"{name}.jsonl.zst").write_bytes(z.compress(raw[:cut]) + z.compress(raw[cut:]))
    elif fmt == "parquet":
        p = folder / f"{name}.parquet"
        table = pa.table({"id": list(range(len(texts))), "text": texts})
        pq.write_table(table, p, row_group_size=37)
        assert pq.ParquetFile(p).metadata.num_row_groups == -(-len(texts) // 37)  # several row groups
    elif fmt == "datasets":
        import datasets

        p = folder / name
        ds = datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts})
        ds.save_to_disk(str(p), num_shards=3)  # three Arrow files: record numbers run on across them
        assert len(list(p.glob("*.arrow"))) == 3
    else:
        raise ValueError(fmt)
    return p


def _shards(spec: Path, tokenizer, out: Path, **kw) -> tuple[bytes, bytes, dict]:
    meta = prepare(str(spec), tokenizer, out, progress=False, **kw)
    return (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes(), meta


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("ref")
    train, val, meta = _shards(_write("jsonl", d / "src"), tokenizer, d / "out")
    assert meta["splits"]["val"]["docs"] > 0 and meta["splits"]["train"]["docs"] > 0
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == len(TEXTS)
    return train, val, meta


@pytest.mark.parametrize("fmt", ["parquet", "datasets", "jsonl.gz", "jsonl.zst"])
def test_each_format_gives_the_shards_of_the_same_records_in_plain_jsonl(tmp_path, tokenizer, reference, fmt):
    spec = _write(fmt, tmp_path / "src")
    train, val, meta = _shards(spec, tokenizer, tmp_path / "out")
    ref_train, ref_val, ref_meta = reference
    assert meta["splits"] == ref_meta["splits"]
    assert train == ref_train and val == ref_val
    st = CorpusStats(**meta["corpus_stats"])
    assert st.skipped == 0 and st.files == (3 if fmt == "datasets" else 1)
    # a second run with the same corpus and tokenizer does nothing
    assert prepare(str(spec), tokenizer, tmp_path / "out", progress=False)["up_to_date"]


def test_folders_of_parquet_and_compressed_jsonl_match_folders_of_jsonl(tmp_path, tokenizer):
    parts = [TEXTS[:100], TEXTS[100:200], TEXTS[200:]]
    for i, part in enumerate(parts):
        _write("jsonl", tmp_path / "plain", part, f"part-{i}")
        _write(["parquet", "jsonl.gz", "jsonl.zst"][i], tmp_path / "mixed", part, f"part-{i}")
    (tmp_path / "mixed" / "notes.gz").write_bytes(gzip.compress(b"not a corpus file"))  # not an extension
    ref = _shards(tmp_path / "plain", tokenizer, tmp_path / "out-plain")
    got = _shards(tmp_path / "mixed", tokenizer, tmp_path / "out-mixed")
    assert (
        got[:2] == ref[:2] and got[2]["splits"] == ref[2]["splits"] and got[2]["corpus_stats"]["files"] == 3
    )
    # and a glob over the Parquet file alone reads it as records
    docs = list(iter_documents(str(tmp_path / "mixed" / "*.parquet")))
    assert [d.text for d in docs if d.piece == 0] == [t for t in parts[0]]


def test_records_are_named_by_file_and_split_as_plain_jsonl(tmp_path):
    p = _write("parquet", tmp_path, TEXTS[:50])
    docs = list(iter_documents(str(p)))
    assert [d.name for d in docs] == [f"corpus.parquet:{i}" for i in range(1, 51)]
    assert all(d.split == split_of(f"corpus.jsonl:{i}") for i, d in enumerate(docs, 1))
    ds = _write("datasets", tmp_path, TEXTS[:50], "ds")
    names = [d.name for d in iter_documents(str(ds), "val")]
    assert names == [f"ds:{i}" for i in range(1, 51) if split_of(f"ds.jsonl:{i}") == "val"]


def test_a_datasets_dict_folder_reads_each_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a b", "c d"]}),
            "test": datasets.Dataset.from_dict({"text": ["e f"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = list(iter_documents(str(tmp_path / "dd")))
    assert [(d.name, d.text) for d in docs] == [
        ("dd/train:1", "a b"),
        ("dd/train:2", "c d"),
        ("dd/test:1", "e f"),
    ]


def test_nulls_and_empty_strings_are_counted_not_documents(tmp_path):
    pq.write_table(pa.table({"text": ["one", None, "", "two"]}), tmp_path / "n.parquet")
    st = CorpusStats()
    docs = list(iter_documents(str(tmp_path / "n.parquet"), stats=st))
    assert [(d.name, d.text) for d in docs] == [("n.parquet:1", "one"), ("n.parquet:4", "two")]
    assert st.skipped_empty == 2 and st.docs == 2


def test_a_missing_text_field_is_a_clear_error_naming_the_columns(tmp_path, tokenizer, capsys):
    p = _write("parquet", tmp_path / "pq", TEXTS[:10])
    with pytest.raises(UserError, match=r"corpus.parquet has no column 'body'; its columns are 'id', 'text'"):
        iter_documents(str(p), text_field="body")  # checked at once, before any file is read
    with pytest.raises(UserError, match=r"column 'id' of corpus.parquet holds int64, not text"):
        iter_documents(str(p), text_field="id")
    ds = _write("datasets", tmp_path / "ds", TEXTS[:10])
    with pytest.raises(UserError, match=r"has no column 'content'; its columns are 'id', 'text'"):
        iter_documents(str(ds), text_field="content")
    gz = _write("jsonl.gz", tmp_path / "gz", TEXTS[:10])
    with pytest.raises(
        UserError, match=r"has no string field 'content' \(its fields: id, text\).*--text-field"
    ):
        list(iter_documents(str(gz), text_field="content"))
    # the CLI: one line, exit status 2, no shards written
    code, out, err = cli_in_process(
        capsys, "prepare", "--corpus", p, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "o"
    )
    assert code == 2 and "tokenizer.json" in err  # (the tokenizer folder is checked first)
    tokenizer.save(tmp_path / "tok")
    code, out, err = cli_in_process(
        capsys, "prepare", "--corpus", p, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "o",
        "--text-field", "body",
    )  # fmt: skip
    assert code == 2 and "no column 'body'; its columns are 'id', 'text'" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "meta.json").exists()
    code, out, err = cli_in_process(
        capsys, "prepare", "--corpus", p, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "o"
    )
    assert code == 0 and "1 files, 10 documents" in out, err


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    p = _write("parquet", tmp_path, TEXTS[:5])
    z = _write("jsonl.zst", tmp_path, TEXTS[:5])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    with pytest.raises(UserError, match=r"needs pyarrow: pip install 'yuyan\[data\]'"):
        iter_documents(str(p))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(UserError, match=r"needs zstandard: pip install 'yuyan\[data\]'"):
        iter_documents(str(z))


def test_corrupt_and_truncated_files_are_counted_and_the_rest_is_read(tmp_path):
    d = tmp_path / "c"
    _write("jsonl", d, TEXTS[:3], "good")
    raw = gzip.compress(_jsonl_bytes(TEXTS[:40]))
    (d / "cut.jsonl.gz").write_bytes(raw[: len(raw) // 2])  # truncated: the first records, then an error
    (d / "junk.jsonl.gz").write_bytes(b"not gzip at all")
    (d / "junk.jsonl.zst").write_bytes(b"not zstd at all")
    (d / "junk.parquet").write_bytes(b"PAR1 not really")
    st = CorpusStats()
    docs = list(iter_documents(str(d), stats=st))
    assert [d.text for d in docs if d.source.startswith("good")] == TEXTS[:3]
    cut = [d for d in docs if d.source.startswith("cut")]
    assert 0 < len(cut) < 40 and [x.text for x in cut if x.piece == 0] == TEXTS[: len(cut)]
    assert st.skipped_unreadable == 4, st.summary()


_READ = """
import json, sys
from yuyan.data.corpus import CorpusStats, iter_documents
from yuyan.errors import UserError
st = CorpusStats()
try:
    docs = [d.name for d in iter_documents(sys.argv[1], stats=st)]
    print(json.dumps({"docs": docs, "special": st.skipped_special, "bad_name": st.skipped_bad_name}))
except UserError as e:
    print(json.dumps({"error": str(e)}))
"""


def _read_in_subprocess(spec: Path) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", _READ, os.fsencode(spec)], capture_output=True, text=True, timeout=120
    )  # a FIFO opened by mistake would hang here
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_fifos_and_non_utf8_names_are_skipped_and_a_fifo_corpus_is_refused(tmp_path):
    d = tmp_path / "c"
    _write("parquet", d, TEXTS[:2], "good")
    for name in ("pipe.parquet", "pipe.jsonl.gz", "pipe.jsonl.zst"):
        os.mkfifo(d / name)
    Path(os.fsdecode(bytes(d) + b"/caf\xe9.parquet")).write_bytes((d / "good.parquet").read_bytes())
    res = _read_in_subprocess(d)
    assert res == {"docs": ["good.parquet:1", "good.parquet:2"], "special": 3, "bad_name": 1}, res
    assert "not a regular file" in _read_in_subprocess(d / "pipe.parquet")["error"]
    # a datasets folder whose data file is a FIFO: skipped, never opened
    ds = _write("datasets", tmp_path, TEXTS[:4], "ds")
    arrow = sorted(ds.glob("*.arrow"))[1]
    with pa.OSFile(str(arrow)) as f:
        lost = pa.ipc.open_stream(f).read_all().num_rows
    arrow.unlink()
    os.mkfifo(arrow)
    res = _read_in_subprocess(ds)
    assert res["special"] == 1 and len(res["docs"]) == 4 - lost and lost > 0, res


def test_a_datasets_state_file_cannot_point_outside_its_folder(tmp_path):
    ds = _write("datasets", tmp_path, TEXTS[:4], "ds")
    state = json.loads((ds / "state.json").read_text())
    state["_data_files"] = [{"filename": "../secret.arrow"}]
    (ds / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="outside the folder"):
        iter_documents(str(ds))
    (ds / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="not a datasets state file"):
        iter_documents(str(ds))
