"""Scrubbing benchmark: `prepare --corpus stdlib` with and without `--scrub pii` (yuyan/data/scrub.py),
alternating between the two in the same run so machine drift hits both, plus the scrubber's own
throughput on the same documents. Prints one JSON line: prepare seconds plain and scrubbed (median of
`--repeats`), the slowdown, and the scrub throughput in MB/s beside prepare's.

    python benchmarks/scrub.py               # ~1 minute on 2 cores
    python benchmarks/scrub.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="prepare runs of each kind, alternating")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary of the tokenizer trained first")
    args = ap.parse_args()

    from yuyan.data.corpus import iter_documents
    from yuyan.data.scrub import scrub_text
    from yuyan.data.shards import prepare
    from yuyan.tokenizer import Tokenizer

    tok = Tokenizer.train(iter_documents("stdlib", "train"), vocab_size=args.vocab)
    times: dict[str, list[float]] = {"plain": [], "scrub": []}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeats):
            for kind in ("plain", "scrub"):
                t0 = time.perf_counter()
                meta = prepare(
                    "stdlib",
                    tok,
                    Path(d) / kind,
                    progress=False,
                    force=True,
                    scrub="pii" if kind == "scrub" else None,
                )
                times[kind].append(time.perf_counter() - t0)
    mb = meta["corpus_stats"]["bytes"] / 1e6
    texts = [doc.text for doc in iter_documents("stdlib")]
    t0 = time.perf_counter()
    found = sum(sum(scrub_text(t)[1].values()) for t in texts)
    scrub_s = time.perf_counter() - t0
    plain, scrub = statistics.median(times["plain"]), statistics.median(times["scrub"])
    print(
        json.dumps(
            {
                "corpus_mb": round(mb, 2),
                "prepare_s": round(plain, 3),
                "prepare_scrub_s": round(scrub, 3),
                "slowdown": round(scrub / plain - 1, 3),
                "prepare_mb_s": round(mb / plain, 2),
                "scrub_alone_mb_s": round(mb / scrub_s, 2),
                "items_found": found,
                "runs": times,
            }
        )
    )


if __name__ == "__main__":
    main()
