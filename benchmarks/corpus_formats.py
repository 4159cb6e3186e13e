"""Peak memory of `yuyan prepare` on a ~1 GB Parquet file vs the same text as plain text files.

Generates (seeded) web-like records — Zipf-distributed words from a 50k-word vocabulary, one record in ten
Chinese, records of 100 to 20,000 words — and writes them twice while generating, never holding them all:
a Parquet file (snappy, row groups of `--row-group-mb` of text, like a FineWeb shard) of about `--gb` GB on
disk, and a folder of ~1 MB plain .txt files holding the same records one after another (the reference).
A byte-level BPE tokenizer (vocab 4096) is trained in-process on the first records. Then each corpus is
prepared by `python -m yuyan prepare` in its own child process; its peak RSS is that child's `ru_maxrss`
from `os.wait4`, forked by a small intermediate Python (forked from this process, a child would report at
least this process's RSS: Linux keeps the high-water mark across exec), so nothing of this process or of
the other run is counted. A third run on one 1 MB file
gives the floor (the interpreter, torch and the tokenizer threads). Prints one JSON line.

    nice -n 10 .venv/bin/python benchmarks/corpus_formats.py --gb 1 --work /tmp/yuyan-corpus-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _vocab(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lens = rng.integers(1, 11, 50_000)
    latin = np.array(["".join(rng.choice(letters, n)) for n in lens], dtype=object)
    cjk = np.array([chr(c) for c in rng.integers(0x4E00, 0x9FA5, 4_000)], dtype=object)
    return latin, cjk


def records(seed: int = 0):
    """An endless stream of generated records (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    latin, cjk = _vocab(rng)
    p = 1.0 / np.arange(1, len(latin) + 1)  # Zipf: a few words are most of the text, as in real prose
    p /= p.sum()
    punct = np.array([" ", " ", " ", " ", " ", " ", " ", ", ", ". ", ".\n\n"], dtype=object)
    while True:
        n = int(rng.integers(100, 20_000))
        if rng.random() < 0.1:
            yield "".join(cjk[rng.integers(0, len(cjk), n)]) + "。"
        else:
            w = latin[rng.choice(len(latin), n, p=p)]
            sep = punct[rng.integers(0, len(punct), n)]
            out = np.empty(2 * n, dtype=object)
            out[0::2], out[1::2] = w, sep
            yield "".join(out).strip()


def write_corpora(work: Path, gb: float, row_group_mb: int) -> dict:
    """Writes work/corpus.parquet (about `gb` GB on disk) and work/plain/*.txt with the same records."""
    pq_path, plain = work / "corpus.parquet", work / "plain"
    plain.mkdir(parents=True)
    schema = pa.schema([("id", pa.int64()), ("url", pa.string()), ("text", pa.string())])
    writer = pq.ParquetWriter(pq_path, schema, compression="snappy")
    gen = records()
    n = text_bytes = 0
    txt, txt_size, txt_no = open(plain / "00000.txt", "w", encoding="utf-8"), 0, 0  # noqa: SIM115
    group: list[str] = []
    group_bytes = 0
    while True:
        t = next(gen)
        b = len(t.encode("utf-8"))
        group.append(t)
        group_bytes += b
        n += 1
        text_bytes += b
        txt.write(t + "\n\n")
        txt_size += b + 2
        if txt_size >= 1 << 20:
            txt.close()
            txt_no += 1
            txt, txt_size = open(plain / f"{txt_no:05d}.txt", "w", encoding="utf-8"), 0  # noqa: SIM115
        if group_bytes >= row_group_mb << 20:
            ids = list(range(n - len(group), n))
            writer.write_table(
                pa.table(
                    {"id": ids, "url": [f"https://example.org/{i}" for i in ids], "text": group}, schema
                ),
                row_group_size=len(group),
            )
            group, group_bytes = [], 0
            if pq_path.stat().st_size >= gb * 1e9:
                break
    writer.close()
    txt.close()
    return {
        "records": n,
        "text_bytes": text_bytes,
        "parquet_bytes": pq_path.stat().st_size,
        "row_groups": pq.ParquetFile(pq_path).metadata.num_row_groups,
        "plain_files": txt_no + 1,
    }


def peak_rss_of(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, last output line) of a child process."""
    t0 = time.perf_counter()
    # through a small Python that forks the command itself: Linux carries the RSS high-water mark of the
    # image a process exec()s from into its ru_maxrss, so a child forked straight from this process (which
    # holds the generator's arrays) would report at least this process's size
    p = subprocess.run(
        [sys.executable, "-c", _PEAK, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    secs = time.perf_counter() - t0
    out, _, peak = p.stdout.rpartition("PEAK_KB ")
    if p.returncode != 0 or not peak.strip().isdigit():
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}")
    return int(peak) / 1024, secs, out


_PEAK = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "code = os.waitstatus_to_exitcode(status)\n"
    "print(f'PEAK_KB {usage.ru_maxrss}', flush=True)\n"
    "sys.exit(code)\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="Parquet file size on disk, GB")
    ap.add_argument("--row-group-mb", type=int, default=64, help="text per Parquet row group, MB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/yuyan-corpus-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated corpora and shards")
    args = ap.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    from yuyan.tokenizer import Tokenizer

    t0 = time.perf_counter()
    gen = records()
    Tokenizer.train((next(gen) for _ in range(300)), vocab_size=4096, show_progress=False).save(
        args.work / "tok"
    )
    data = write_corpora(args.work, args.gb, args.row_group_mb)
    data["generate_seconds"] = round(time.perf_counter() - t0, 1)
    yuyan = [sys.executable, "-m", "yuyan", "prepare", "--tokenizer", str(args.work / "tok")]
    res = {}
    (args.work / "floor").mkdir()  # the same command on one 1 MB file: what start-up alone costs
    shutil.copy(args.work / "plain" / "00000.txt", args.work / "floor" / "00000.txt")
    runs = {
        "floor": args.work / "floor",
        "parquet": args.work / "corpus.parquet",
        "plain": args.work / "plain",
    }
    for name, spec in runs.items():
        rss, secs, out = peak_rss_of([*yuyan, "--corpus", str(spec), "--out", str(args.work / f"out-{name}")])
        meta = json.loads((args.work / f"out-{name}" / "meta.json").read_text())
        res[name] = {
            "peak_rss_mb": round(rss, 1),
            "seconds": round(secs, 1),
            "tokens": meta["train_tokens"] + meta["val_tokens"],
            "text_bytes": meta["corpus_stats"]["bytes"],
        }
    print(
        json.dumps(
            {
                "benchmark": "corpus_formats",
                **data,
                "parquet": res["parquet"],
                "plain": res["plain"],
                "floor_1mb_file": res["floor"],
                "peak_rss_ratio_parquet_over_plain": round(
                    res["parquet"]["peak_rss_mb"] / res["plain"]["peak_rss_mb"], 3
                ),
                "under_1gb": res["parquet"]["peak_rss_mb"] < 1000,
                "cpu_count": os.cpu_count(),
            }
        )
    )
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
