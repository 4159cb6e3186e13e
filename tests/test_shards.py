"""Token shards: prepare writes exactly the documents' tokens joined by EOT, re-runs are no-ops, the dtype
rule, random windows are contiguous slices with y = x shifted, the sequential pass covers a split once,
tokenizer mismatch and damaged shards are clear errors, a SIGKILLed prepare leaves nothing visible and its
re-run equals a clean run byte for byte, and the `yuyan prepare` command."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from yuyan.data.corpus import iter_documents
from yuyan.data.shards import TokenShards, check_tokenizer, dtype_for, prepare
from yuyan.errors import UserError
from yuyan.tokenizer import EOT, Tokenizer


def _corpus(root, n_files: int, lines: int, seed: int = 0):
    rnd = random.Random(seed)
    words = ["def", "return", "value", "语言", "模型", "😀", "(x)", "==", "\t", "café", "import", "42"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = "\n".join(" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 10))) for _ in range(lines))
        (root / f"m{i:04d}.py").write_text(text + "\n")
    return root


def _decoded(tok: Tokenizer, shards: TokenShards, split: str) -> str:
    return tok.decode(shards.array(split).tolist())


def test_prepare_writes_documents_joined_by_eot(tmp_path, tokenizer):
    corpus = _corpus(tmp_path / "c", 60, 30)
    out = tmp_path / "data"
    meta = prepare(str(corpus), tokenizer, out, progress=False, batch_bytes=2000)
    sh = TokenShards(out)
    for split in ("train", "val"):
        docs = list(iter_documents(str(corpus), split))
        assert docs, split
        assert _decoded(tokenizer, sh, split) == "".join(d.text + EOT for d in docs)
        want = [t for d in docs for t in tokenizer.encode(d.text) + [tokenizer.eot_id]]
        assert sh.array(split).tolist() == want
        assert meta["splits"][split]["bytes"] == sum(len(d.text.encode()) for d in docs)
        assert sh.bytes_per_token(split) == meta["splits"][split]["bytes"] / len(want)
    assert meta["dtype"] == "uint16" and sh.array("train").dtype == np.uint16
    assert meta["tokenizer_fingerprint"] == tokenizer.fingerprint and meta["corpus_fingerprint"]
    assert sorted(p.name for p in out.iterdir()) == [".yuyan-output", "meta.json", "train.bin", "val.bin"]

    # same inputs: nothing is rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(str(corpus), tokenizer, out, progress=False)
    assert again["up_to_date"] and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # a changed corpus is re-tokenized
    (corpus / "m0000.py").write_text("changed\n")
    assert not prepare(str(corpus), tokenizer, out, progress=False).get("up_to_date")
    assert "changed\n" + EOT in _decoded(tokenizer, TokenShards(out), split_of_file(corpus, "m0000.py"))


def split_of_file(corpus, name: str) -> str:
    return next(d.split for d in iter_documents(str(corpus)) if d.name == name)


def test_long_document_pieces_get_one_eot(tmp_path, tokenizer, monkeypatch):
    import yuyan.data.corpus as C

    monkeypatch.setattr(C, "PIECE_CHARS", 300)
    corpus = _corpus(tmp_path / "c", 3, 200)
    out = tmp_path / "data"
    meta = prepare(str(corpus), tokenizer, out, progress=False, batch_bytes=1000)
    assert len(list(iter_documents(str(corpus)))) > 10  # the files really were cut into pieces
    sh = TokenShards(out)
    text = _decoded(tokenizer, sh, "train") + _decoded(tokenizer, sh, "val")
    assert text.count(EOT) == 3 and meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 3
    for f in sorted(corpus.iterdir()):
        assert f.read_text() + EOT in text


def test_uint32_when_vocab_exceeds_uint16(tmp_path, texts):
    small = Tokenizer.train(texts[:5], vocab_size=300)
    hf = HFTokenizer.from_str(small.to_str())
    hf.add_tokens([f"<x{i}>" for i in range(65600)])
    big = Tokenizer(hf)
    assert big.vocab_size > 65535 and dtype_for(65535) == np.uint16 and dtype_for(65536) == np.uint32
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(f"doc {i} <x65599> end")
    meta = prepare(str(corpus), big, tmp_path / "d", progress=False)
    sh = TokenShards(tmp_path / "d")
    assert meta["dtype"] == "uint32" and sh.array("train").dtype == np.uint32
    assert int(sh.array("train").max()) == big.token_to_id("<x65599>") > 65535
    assert _decoded(big, sh, "train") == "".join(d.text + EOT for d in iter_documents(str(corpus), "train"))


def _arange_shards(path, n_train: int, n_val: int) -> TokenShards:
    """Shards whose token at position i is i: windows reveal exactly where they were cut."""
    path.mkdir()
    np.arange(n_train, dtype=np.uint16).tofile(path / "train.bin")
    np.arange(n_val, dtype=np.uint16).tofile(path / "val.bin")
    splits = {
        "train": {"tokens": n_train, "bytes": 3 * n_train, "docs": 1},
        "val": {"tokens": n_val, "bytes": 2 * n_val, "docs": 1},
    }
    (path / "meta.json").write_text(
        json.dumps({"dtype": "uint16", "splits": splits, "tokenizer_fingerprint": "x"})
    )
    return TokenShards(path)


def test_get_batch_windows_are_contiguous_slices(tmp_path):
    sh = _arange_shards(tmp_path / "s", 1000, 20)
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        x, y = sh.get_batch("train", 8, 16, g)
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))  # contiguous
        assert torch.equal(y, x + 1)  # y is x shifted by one token
        starts |= set(x[:, 0].tolist())
    assert min(starts) >= 0 and max(starts) <= 1000 - 17
    # every start is reachable, the last one included
    x, _ = sh.get_batch("val", 400, 17, torch.Generator().manual_seed(1))
    assert set(x[:, 0].tolist()) == {0, 1, 2}
    # the same generator state gives the same batch
    a = sh.get_batch("train", 4, 8, torch.Generator().manual_seed(5))
    b = sh.get_batch("train", 4, 8, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0])
    with pytest.raises(UserError, match="fewer than"):
        sh.get_batch("val", 1, 20, g)


@pytest.mark.parametrize("n,block,batch", [(100, 7, 3), (22, 7, 3), (15, 7, 5), (2, 7, 2)])
def test_iter_sequential_covers_the_split_once(tmp_path, n, block, batch):
    sh = _arange_shards(tmp_path / "s", 50, n)
    batches = list(sh.iter_sequential("val", batch, block))
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert ys.tolist() == list(range(1, n))  # every target once, in order
    assert torch.equal(xs + 1, ys)
    assert all(x.shape == y.shape and x.shape[0] <= batch and x.shape[1] <= block for x, y in batches)
    assert sh.bytes_per_token("val") == 2.0


def test_errors_mismatch_and_damage(tmp_path, tokenizer, texts):
    corpus = _corpus(tmp_path / "c", 30, 5)
    out = tmp_path / "data"
    prepare(str(corpus), tokenizer, out, progress=False)
    sh = TokenShards(out)
    sh.check_tokenizer(tokenizer)
    other = Tokenizer.train(texts[:3], vocab_size=300)
    with pytest.raises(UserError, match="another|not this one"):
        check_tokenizer(out, other)
    with pytest.raises(UserError, match="meta.json missing"):
        TokenShards(tmp_path / "nothing")
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="re-run"):
        TokenShards(out)
    with pytest.raises(UserError, match="no such path"):
        prepare(str(tmp_path / "missing"), tokenizer, tmp_path / "d2", progress=False)
    assert not (tmp_path / "d2").exists() or not any((tmp_path / "d2").iterdir())


KILL_SCRIPT = """
import sys
from yuyan.data.shards import prepare
prepare(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, workers=1, batch_bytes=16384)
"""


def test_sigkill_mid_prepare_leaves_nothing_and_rerun_matches(tmp_path, tokenizer):
    corpus = _corpus(tmp_path / "c", 150, 400, seed=3)  # ~3 MB
    tok_dir = tmp_path / "tok"
    tokenizer.save(tok_dir)
    clean = tmp_path / "clean"
    prepare(str(corpus), tokenizer, clean, progress=False)

    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script), str(corpus), str(tok_dir), str(out)])
    killed = False
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        partial = list(out.glob(".prepare-tmp-*/train.bin")) if out.exists() else []
        if partial and partial[0].stat().st_size > 0:
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    p.wait()
    assert killed, "prepare finished before it could be killed mid-write; use a larger corpus"
    assert not [f for f in ("meta.json", "train.bin", "val.bin") if (out / f).exists()]
    with pytest.raises(UserError):
        TokenShards(out)

    prepare(str(corpus), tokenizer, out, progress=False)
    # temp dir removed; the marker says the folder is ours
    assert sorted(p.name for p in out.iterdir()) == [".yuyan-output", "meta.json", "train.bin", "val.bin"]
    for f in ("train.bin", "val.bin"):
        assert (out / f).read_bytes() == (clean / f).read_bytes()
    a, b = (json.loads((d / "meta.json").read_text()) for d in (out, clean))
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_prepare_cli(run_cli, tmp_path, tokenizer):
    corpus = _corpus(tmp_path / "c", 40, 20)
    (corpus / "bad.py").write_bytes(b"\xff\xfe not utf-8")
    tokenizer.save(tmp_path / "tok")
    out = tmp_path / "data"
    args = ("prepare", "--corpus", corpus, "--tokenizer", tmp_path / "tok", "--out", out)
    r = run_cli(*args, check=True)
    assert "1 non-UTF-8" in r.stdout and "train:" in r.stdout and "bytes/token" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert f"{meta['train_tokens']:,} tokens" in r.stdout
    r = run_cli(*args, check=True)
    assert "up to date" in r.stdout
    r = run_cli("prepare", "--corpus", "stdlb", "--tokenizer", tmp_path / "tok", "--out", out)
    assert r.returncode == 2 and r.stderr.startswith("error: corpus 'stdlb'") and "Traceback" not in r.stderr


def test_special_token_text_in_documents_stays_text(tmp_path, tokenizer):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i}.txt").write_text(f"doc {i} mentions {EOT} and <|user|> as text")
    meta = prepare(str(corpus), tokenizer, tmp_path / "d", progress=False)
    sh = TokenShards(tmp_path / "d")
    for s in ("train", "val"):
        ids = sh.array(s).tolist()
        assert ids.count(tokenizer.eot_id) == meta["splits"][s]["docs"]  # only the separators
        assert tokenizer.token_to_id("<|user|>") not in ids
        assert _decoded(tokenizer, sh, s) == "".join(d.text + EOT for d in iter_documents(str(corpus), s))
