"""`yuyan prepare`: tokenize a corpus into token shards (train.bin, val.bin, meta.json); `yuyan scrub`:
scrubbed copies of a corpus (yuyan.data.scrub), which `prepare --scrub pii` also applies on the fly.

A thin call into `yuyan.data.shards.prepare`; prints the corpus summary (with skipped files counted), token
counts, shard sizes and bytes per token. Re-running with the same corpus and tokenizer does nothing.
"""

from __future__ import annotations

from pathlib import Path

import typer

from yuyan.cli.app import app


@app.command("prepare")
def prepare_cmd(
    corpus: str = typer.Option(
        ...,
        "--corpus",
        "-c",
        help="file, folder, glob, JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, a datasets save_to_disk "
        "folder, or 'stdlib'",
    ),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="folder with tokenizer.json"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for train.bin, val.bin and meta.json"),
    text_field: str = typer.Option(
        "text", "--text-field", help="JSONL field or Parquet/datasets column that holds the text"
    ),
    extensions: str = typer.Option(
        None,
        "--extensions",
        help="comma list of file extensions for folders (default: common text and code extensions, yuyan.data.corpus.DEFAULT_EXTENSIONS)",
    ),
    workers: int = typer.Option(None, "--workers", help="tokenizer threads (default: all cores)"),
    force: bool = typer.Option(
        False,
        "--force",
        help="rebuild even when the shards are up to date, and write into a non-empty folder yuyan did not "
        "write (nothing already in it is deleted)",
    ),
    scrub: str = typer.Option(
        None,
        "--scrub",
        help="pii: replace e-mails, phones, IDs, cards, IPs, IBANs and secrets with placeholders before "
        "tokenizing (yuyan scrub --help); writes scrub_report.json beside the shards (default: off)",
    ),
) -> None:
    """Tokenize a corpus into memmapped token shards for training.

    Example: yuyan prepare --corpus stdlib --tokenizer runs/tok --out runs/data

    Example: yuyan prepare --corpus data/fineweb/ --text-field text --tokenizer runs/tok --out runs/data
    """
    import sys

    from yuyan.data.shards import prepare

    exts = [e.strip() for e in extensions.split(",") if e.strip()] if extensions else None
    meta = prepare(
        corpus,
        str(tokenizer),
        out,
        text_field=text_field,
        extensions=exts,
        workers=workers,
        progress=sys.stderr.isatty(),
        force=force,
        scrub=scrub,
    )
    if meta.get("up_to_date"):
        print(
            f"{out}: up to date (corpus {meta['corpus_fingerprint']}, tokenizer {meta['tokenizer_fingerprint']}); nothing to do"
        )
    else:
        from yuyan.data.corpus import CorpusStats

        st = CorpusStats(**meta["corpus_stats"])
        secs = meta["seconds"]
        print(f"corpus {corpus}: {st.summary()}")
        print(f"tokenized in {secs:.1f} s ({st.bytes / 1e6 / max(secs, 1e-9):.2f} MB/s)")
    item = 2 if meta["dtype"] == "uint16" else 4
    for s in ("train", "val"):
        sp = meta["splits"][s]
        bpt = sp["bytes"] / sp["tokens"] if sp["tokens"] else float("nan")
        print(
            f"{s}: {sp['docs']} docs, {sp['tokens']:,} tokens, {sp['bytes'] / 1e6:.2f} MB text, "
            f"{out / (s + '.bin')} {sp['tokens'] * item / 1e6:.2f} MB ({meta['dtype']}), {bpt:.3f} bytes/token"
        )
    if scrub and not meta.get("up_to_date"):
        totals = ", ".join(f"{n} {kind}" for kind, n in meta["scrub_totals"].items() if n) or "nothing"
        print(f"scrubbed: {totals} ({out / 'scrub_report.json'})")
    if meta["splits"]["val"]["tokens"] == 0:
        print("warning: the val split is empty; validation needs a larger corpus")


@app.command("scrub")
def scrub_cmd(
    corpus: str = typer.Option(
        ..., "--corpus", "-c", help="file, folder, glob, JSONL, Parquet, ... or 'stdlib'"
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="folder for corpus/ (the scrubbed copies) and scrub_report.json"
    ),
    text_field: str = typer.Option("text", "--text-field", help="JSONL field or column that holds the text"),
    extensions: str = typer.Option(
        None,
        "--extensions",
        help="comma list of file extensions for folders (default: common text and code extensions, yuyan.data.corpus.DEFAULT_EXTENSIONS)",
    ),
    force: bool = typer.Option(
        False, "--force", help="write into a non-empty folder yuyan did not write (nothing in it is deleted)"
    ),
) -> None:
    """Scrubbed copies of a corpus: e-mails, phones, Chinese IDs, cards, IPs, IBANs and secrets replaced by
    <EMAIL>, <PHONE>, <CN_ID>, <CARD>, <IP>, <IBAN>, <SECRET>.

    Example: yuyan scrub --corpus data/raw/ --out runs/clean  (then: yuyan prepare --corpus runs/clean/corpus ...)
    """
    from rich.console import Console

    from yuyan.data.scrub import COPY_DIR, REPORT, scrub_corpus

    exts = [e.strip() for e in extensions.split(",") if e.strip()] if extensions else None
    report = scrub_corpus(corpus, out, text_field=text_field, extensions=exts, force=force)
    Console(soft_wrap=True).print(report.table())
    print(f"wrote {out / COPY_DIR} and {out / REPORT}")
