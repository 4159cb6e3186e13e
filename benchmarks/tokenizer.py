"""Tokenizer and data benchmark: BPE training time, encode throughput of our path vs the `tokenizers`
library's own `encode_batch`, bytes/token on the stdlib val split, and `yuyan prepare --corpus stdlib` time.

With `--big-gb N` it also generates an N GB corpus under /tmp (90-odd ~11 MB files, each the stdlib
concatenated: exercises the 1 MB piece path), runs `yuyan prepare` on it under `/usr/bin/time -v` for peak
memory, and deletes it afterwards. Prints one JSON line.

    python benchmarks/tokenizer.py                 # stdlib figures (~1 minute on 2 cores)
    python benchmarks/tokenizer.py --big-gb 1      # plus the 1 GB prepare (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _yuyan() -> list[str]:
    return [sys.executable, "-m", "yuyan"]


def stdlib_figures(vocab: int, reps: int) -> dict:
    from yuyan.data.corpus import CorpusStats, iter_documents
    from yuyan.data.shards import corpus_bytes_per_token
    from yuyan.tokenizer import Tokenizer

    st = CorpusStats()
    t0 = time.perf_counter()
    tok = Tokenizer.train(iter_documents("stdlib", "train", stats=st), vocab_size=vocab)
    train_s = time.perf_counter() - t0

    texts = [d.text for d in iter_documents("stdlib")]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    ours, ref, ref_fast = [], [], []
    for _ in range(reps):  # interleaved so drift hits both alike; best of reps
        t0 = time.perf_counter()
        ids = tok.encode_batch(texts)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        enc = tok.tok.encode_batch(texts, add_special_tokens=False)
        ref.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok.tok.encode_batch_fast(texts, add_special_tokens=False)
        ref_fast.append(time.perf_counter() - t0)
    assert ids == [e.ids for e in enc]  # the same tokens
    nbytes, ntok = corpus_bytes_per_token(tok, "stdlib", "val", max_bytes=None)

    with tempfile.TemporaryDirectory() as d:
        tok.save(Path(d) / "tok")
        t0 = time.perf_counter()
        subprocess.run(
            [*_yuyan(), "prepare", "--corpus", "stdlib", "--tokenizer", f"{d}/tok", "--out", f"{d}/data"],
            check=True,
            capture_output=True,
        )
        prepare_s = time.perf_counter() - t0
    return {
        "corpus_mb": round(mb, 2),
        "train_mb": round(st.bytes / 1e6, 2),
        "vocab_size": tok.vocab_size,
        "train_seconds": round(train_s, 2),
        "encode_mb_s_ours": round(mb / min(ours), 2),
        "encode_mb_s_tokenizers_encode_batch": round(mb / min(ref), 2),
        "encode_mb_s_tokenizers_encode_batch_fast": round(mb / min(ref_fast), 2),
        "encode_ratio_ours_vs_encode_batch": round(min(ref) / min(ours), 3),
        "val_bytes_per_token": round(nbytes / ntok, 3),
        "prepare_stdlib_seconds": round(prepare_s, 1),
    }, tok


def big_figures(tok, gb: float, workdir: Path) -> dict:
    from yuyan.data.corpus import iter_documents

    free = shutil.disk_usage(workdir).free
    if free < 3 * gb * 1e9:
        raise SystemExit(f"only {free / 1e9:.1f} GB free in {workdir}; need {3 * gb:.0f} GB")
    root = Path(tempfile.mkdtemp(prefix="yuyan-big-", dir=workdir))
    try:
        blob = "".join(d.text for d in iter_documents("stdlib")).encode("utf-8")
        n = int(gb * 1e9 // len(blob)) + 1
        corpus = root / "corpus"
        corpus.mkdir()
        for i in range(n):  # a distinct header per copy so files differ
            (corpus / f"part{i:03d}.txt").write_bytes(f"# copy {i}\n".encode() + blob)
        size = sum(p.stat().st_size for p in corpus.iterdir())
        tok.save(root / "tok")
        cmd = [
            "/usr/bin/time",
            "-v",
            *_yuyan(),
            "prepare",
            "--corpus",
            str(corpus),
            "--tokenizer",
            str(root / "tok"),
            "--out",
            str(root / "data"),
        ]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if p.returncode:
            raise SystemExit(p.stdout + p.stderr)
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
        meta = json.loads((root / "data" / "meta.json").read_text())
        return {
            "big_corpus_gb": round(size / 1e9, 3),
            "big_prepare_seconds": round(secs, 1),
            "big_prepare_mb_s": round(size / 1e6 / secs, 2),
            "big_prepare_peak_rss_mb": round(rss_kb / 1024, 1),
            "big_tokens": meta["train_tokens"] + meta["val_tokens"],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big-gb", type=float, default=0.0, help="also prepare a generated corpus of this size")
    ap.add_argument("--workdir", default="/tmp")
    args = ap.parse_args()
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    res, tok = stdlib_figures(args.vocab_size, args.reps)
    if args.big_gb:
        res.update(big_figures(tok, args.big_gb, Path(args.workdir)))
    res["cpus"] = os.cpu_count()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
