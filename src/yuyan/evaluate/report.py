"""Evaluation results on disk: one JSON file and one short Markdown report per run, and side-by-side compare.

A result is a dict {"eval": kind, "model": ..., "metrics": {name: number | str | list}, "settings": {...}}.
`write_result` writes `<name>.json` and `<name>.md` atomically (temp file + rename). `compare` lines up the
numeric metrics of two result files with absolute and relative differences.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

from yuyan.errors import UserError


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def make_result(kind: str, model: str | None, metrics: dict, settings: dict | None = None) -> dict:
    return {
        "eval": kind,
        "model": model,
        "metrics": metrics,
        "settings": settings or {},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_value(v: object) -> str:
    """A metric value as the reports print it: ints with thousands separators, floats to 4 decimals (4
    significant digits when tiny or huge), lists as JSON cut at 80 characters, text safe in a Markdown table."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        s = json.dumps(v, ensure_ascii=False)
        return s if len(s) <= 80 else s[:77] + "..."
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(result: dict) -> str:
    lines = [f"# {result.get('eval', 'eval')} — {result.get('model') or ''}".rstrip(" —"), ""]
    lines += ["| metric | value |", "|---|---|"]
    for k, v in result.get("metrics", {}).items():
        if isinstance(v, dict):  # nested tables (e.g. per-label scores) are summarised in the JSON
            continue
        lines.append(f"| {k} | {format_value(v)} |")
    settings = result.get("settings") or {}
    if settings:
        lines += ["", "Settings: " + ", ".join(f"`{k}={format_value(v)}`" for k, v in settings.items())]
    if result.get("time"):
        lines += ["", f"Written {result['time']}."]
    return "\n".join(lines) + "\n"


def write_result(
    result: dict, out_dir: str | os.PathLike, name: str | None = None, appendix: str = ""
) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` and `<name>.md` (name defaults to the eval kind; `appendix`, more
    Markdown such as per-class tables, ends the report); return both paths."""
    out = Path(out_dir)
    name = name or result.get("eval", "result")
    j = atomic_write_text(
        out / f"{name}.json", json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    m = atomic_write_text(out / f"{name}.md", to_markdown(result) + appendix)
    return j, m


def read_result(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"result file {p} not found; pass a JSON written by `yuyan eval ... --out DIR`")
    try:
        r = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{p} is not valid JSON ({e}); pass a result written by `yuyan eval`") from None
    if not isinstance(r, dict) or not isinstance(r.get("metrics"), dict):
        raise UserError(f'{p} has no "metrics" object; pass a result written by `yuyan eval`')
    return r


def compare(a: str | os.PathLike | dict, b: str | os.PathLike | dict) -> dict:
    """Line up two results: {a, b, rows: [{metric, a, b, diff, rel}]} over the union of their metrics.

    diff = b - a and rel = diff / |a| for numbers present in both; None otherwise.
    """
    ra = a if isinstance(a, dict) else read_result(a)
    rb = b if isinstance(b, dict) else read_result(b)
    ma, mb = ra["metrics"], rb["metrics"]
    rows = []
    for k in list(ma) + [k for k in mb if k not in ma]:
        va, vb = ma.get(k), mb.get(k)
        if isinstance(va, dict) or isinstance(vb, dict):
            continue
        num = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        diff = vb - va if num else None
        rel = diff / abs(va) if num and va != 0 and math.isfinite(va) else None
        rows.append({"metric": k, "a": va, "b": vb, "diff": diff, "rel": rel})
    return {
        "a": {"eval": ra.get("eval"), "model": ra.get("model")},
        "b": {"eval": rb.get("eval"), "model": rb.get("model")},
        "rows": rows,
    }


def compare_markdown(cmp: dict) -> str:
    a, b = cmp["a"], cmp["b"]
    lines = [
        f"# compare: {a.get('eval')} {a.get('model')} (A) vs {b.get('eval')} {b.get('model')} (B)",
        "",
        "| metric | A | B | B − A | relative |",
        "|---|---|---|---|---|",
    ]
    for r in cmp["rows"]:
        rel = f"{100 * r['rel']:+.2f}%" if r["rel"] is not None else ""
        diff = (
            (f"{r['diff']:+,}" if isinstance(r["diff"], int) else f"{r['diff']:+.4g}")
            if r["diff"] is not None
            else ""
        )
        lines.append(f"| {r['metric']} | {format_value(r['a'])} | {format_value(r['b'])} | {diff} | {rel} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "make_result",
    "format_value",
    "write_result",
    "read_result",
    "to_markdown",
    "compare",
    "compare_markdown",
    "atomic_write_text",
]
