"""The one reader of labelled tables: CSV, TSV and JSONL, for every command that reads one.

`finetune --task classify`, `finetune --task sft` (its CSV form), `eval classify` and `eval robustness` all
read through `read_table`, so a file one of them accepts the others accept too. JSONL (`.jsonl`, `.json`)
is one object per line. CSV (`.csv`, or any other name) is comma-separated with RFC 4180 quoting; TSV
(`.tsv`) is tab-separated without quoting (IANA's TSV: a cell holds no tab or newline, so a `"` is text).

A CSV/TSV file may or may not start with a header. The first row is a header when it holds the column names
the caller asked for; otherwise it is judged by whether its cells look like the rows below it, column by
column: in a column of few distinct values (a label column), a first cell that is not among them is a name;
in a numeric column, a first cell that is not a number is a name; a first cell that fits is data. A file
with no header is read when the columns are given as 0-based indices (`--text-field 0 --label-field 1`) and
refused, with that advice, when they are given as names. Columns may always be named by index. Bad lines
(empty, bad JSON, a row with the wrong number of cells) are counted in the caller's report and skipped.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from yuyan.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json")
SAMPLE_ROWS = 200  # rows below the first one that the header judgement compares it with


def table_kind(path: str | os.PathLike) -> str:
    """jsonl | tsv | csv, from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "tsv" if suffix == ".tsv" else "csv"


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def header_evidence(rows: list[list[str]]) -> tuple[list[str], list[str]]:
    """(reasons the first row is a header, reasons it is data), one per column that tells.

    A column tells when the rows below are all numbers (the first cell is a number or not) or hold few
    distinct values, like a label column (the first cell is one of them or not). Free-text columns don't."""
    first, rest = rows[0], rows[1 : 1 + SAMPLE_ROWS]
    header, data = [], []  # (distinct values below, reason): the most label-like column's reason first
    for j, cell in enumerate(first):
        below = [r[j].strip() for r in rest if len(r) == len(first) and r[j].strip()]
        if len(below) < 2:
            continue
        cell, values = cell.strip(), set(below)
        if all(_is_number(v) for v in below):
            (data if _is_number(cell) else header).append(
                (
                    len(values),
                    f"column {j}: {_short(cell)} {'is' if _is_number(cell) else 'is not'} a number like "
                    "the cells below",
                )
            )
            continue
        if len(values) <= max(2, min(50, len(below) // 2)):  # categorical: a label column
            shown = ", ".join(_short(v) for v in sorted(values)[:6]) + (", ..." if len(values) > 6 else "")
            if cell in values:
                data.append(
                    (len(values), f"column {j}: {_short(cell)} is one of that column's values [{shown}]")
                )
            else:
                header.append(
                    (len(values), f"column {j}: {_short(cell)} is not among that column's values [{shown}]")
                )
    return [m for _, m in sorted(header)], [m for _, m in sorted(data)]


def _short(cell: str, n: int = 24) -> str:
    """A cell as a message shows it: quoted, cut to n characters."""
    return repr(cell if len(cell) <= n else cell[: n - 1] + "…")


def _index(name: str) -> int | None:
    return int(name) if name.isdigit() else None


def _read_text(p: Path) -> str:
    if not p.is_file():
        raise UserError(f"data file {p} not found; pass a .csv, .tsv or .jsonl file")
    try:
        return p.read_text(encoding="utf-8-sig")  # a UTF-8 BOM (Excel's CSV) is not part of the first cell
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None


def _read_jsonl(p: Path, text: str, columns: Sequence[str], report) -> list[tuple[str, dict]]:
    if any(_index(c) is not None for c in columns):
        raise UserError(
            f"{p} is JSONL: its records are objects with named fields, so name them "
            f"(e.g. --text-field text --label-field label), not column numbers {list(columns)}"
        )
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            report.add("empty_lines", f"{p.name}:{i}")
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            report.add("bad_json_lines", f"{p.name}:{i}")
            continue
        if not isinstance(rec, dict):
            report.add("bad_json_lines", f"{p.name}:{i}")
            continue
        out.append((f"{p.name}:{i}", rec))
    return out


def _has_header(p: Path, kind: str, rows: list[list[str]], columns: Sequence[str]) -> bool:
    """Whether the first row is a header (see the module docstring); a UserError when columns are named
    and the first row does not name them."""
    first = [c.strip() for c in rows[0]]
    by_name = [c for c in columns if _index(c) is None]
    if by_name and all(c in first for c in by_name):
        return True
    header, data = header_evidence(rows)
    if not by_name:  # columns by index: skip a first row only when it looks like a header
        return bool(header) and not data
    missing = [c for c in by_name if c not in first]
    how = (
        f"pass the columns by 0-based index instead, e.g. --text-field 0 --label-field "
        f"{min(1, len(first) - 1)} (this file has {len(first)} columns)"
    )
    if data and not header:
        raise UserError(
            f"{p} has no header row: its first line looks like data ({data[0]}), so it names no "
            f"columns and {missing[0]!r} is not one; {how}, or add a header line such as "
            f"{(',' if kind == 'csv' else chr(9)).join(columns)!r}"
        )
    if header and not data:
        raise UserError(
            f"{p} has no column {missing[0]!r} (its header names {first}); name the columns with "
            "--text-field / --label-field"
        )
    raise UserError(
        f"{p}: its first line does not name the column {missing[0]!r}; if that line is a header, "
        f"pass its names with --text-field / --label-field; if the file has no header, {how}"
    )


def _read_delimited(p: Path, text: str, kind: str, columns: Sequence[str], report) -> list[tuple[str, dict]]:
    if kind == "tsv":
        reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:  # quoted cells may hold newlines
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=",")
    try:
        lines = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise UserError(f"{p} is not valid {kind.upper()} ({e}); check its quoting") from None
    rows = [(n, row) for n, row in lines if any(c.strip() for c in row)]
    for n, row in lines:
        if not any(c.strip() for c in row):
            report.add("empty_lines", f"{p.name}:{n}")
    if not rows:
        raise UserError(
            f"{p} is empty; it needs rows of {kind.upper()} (a header row naming the columns first)"
        )
    first = [c.strip() for c in rows[0][1]]
    indices = [c for c in columns if _index(c) is not None]
    has_header = _has_header(p, kind, [r for _, r in rows], columns)
    width = len(first)
    for c in indices:
        if int(c) >= width:
            raise UserError(f"{p} has {width} columns (0..{width - 1}); there is no column {c}")
    names = first if has_header else [str(j) for j in range(width)]
    out = []
    for n, row in rows[1:] if has_header else rows:
        if len(row) != width:
            report.add("rows_with_wrong_number_of_cells", f"{p.name}:{n}")
            continue
        rec = dict(zip(names, row, strict=True))
        if has_header:  # columns by index work with a header too
            rec.update({str(j): v for j, v in enumerate(row)})
        out.append((f"{p.name}:{n}", rec))
    return out


def read_table(path: str | os.PathLike, report, columns: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """(location "file:line", record) pairs from a CSV, TSV or JSONL file.

    columns: the names (or 0-based indices, as strings) of the columns the caller reads; they decide
    whether a CSV/TSV's first row is a header (see the module docstring). report: anything with
    `add(problem, location)` (yuyan.data.tasks.DataReport), which counts the lines skipped."""
    p = Path(path)
    text = _read_text(p)
    kind = table_kind(p)
    if kind == "jsonl":
        return _read_jsonl(p, text, columns, report)
    return _read_delimited(p, text, kind, columns, report)


__all__ = ["read_table", "table_kind", "header_evidence", "JSONL_SUFFIXES"]
