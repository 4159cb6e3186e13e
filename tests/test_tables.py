"""yuyan.data.tables: CSV, TSV and JSONL read alike, with and without a header, or refused saying why.

Every reader of a labelled table (finetune classify and sft, eval classify, eval robustness) goes through
read_table, so these cases hold for all of them; test_eval_reads_what_finetune_reads checks two of them
read the same file the same way.
"""

from __future__ import annotations

import json

import pytest

from yuyan.data.tables import header_evidence, read_table
from yuyan.data.tasks import ClassifyTask, DataReport, label_order, name_labels, read_classification
from yuyan.errors import UserError
from yuyan.evaluate.classify import read_labelled

ROWS = [
    ("good film, really", "pos"),
    ("bad film", "neg"),
    ("nice one", "pos"),
    ("awful", "neg"),
    ("ok", "pos"),
]


def write(path, kind: str, header: bool, rows=ROWS, names=("text", "label")):
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(dict(zip(names, r, strict=True))) for r in rows) + "\n")
        return path
    sep = "\t" if kind == "tsv" else ","
    quote = (lambda c: f'"{c}"' if "," in c else c) if kind == "csv" else (lambda c: c)
    lines = ([sep.join(names)] if header else []) + [sep.join(quote(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read(path, text="text", label="label"):
    report = DataReport(str(path))
    return [(t, lab) for _, t, lab in read_classification(path, text, label, report)], report


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_every_format_with_header_reads_alike(tmp_path, kind):
    rows, report = read(write(tmp_path / f"d.{kind}", kind, header=True))
    assert rows == ROWS and not report.counts


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_headerless_file_reads_by_index_and_names_are_refused_saying_why(tmp_path, kind):
    path = write(tmp_path / f"d.{kind}", kind, header=False)
    assert read(path, "0", "1")[0] == ROWS  # columns by index: the first row is data
    with pytest.raises(UserError) as e:
        read(path)
    msg = str(e.value)
    assert "has no header row" in msg and "--text-field 0 --label-field 1" in msg
    assert "'pos' is one of that column's values" in msg  # why: the first row looks like data
    assert "columns: [" not in msg and "good film" not in msg  # the first data row is never called names


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_header_read_by_index_skips_the_header(tmp_path, kind):
    path = write(tmp_path / f"d.{kind}", kind, header=True, names=("sentence", "label"))
    assert read(path, "0", "1")[0] == ROWS
    with pytest.raises(UserError, match=r"has no column 'text' \(its header names \['sentence', 'label'\]\)"):
        read(path)


def test_numeric_labels_decide_the_header(tmp_path):
    numeric = [(t, "1" if lab == "pos" else "0") for t, lab in ROWS]
    with_header = write(tmp_path / "h.tsv", "tsv", header=True, rows=numeric, names=("sentence", "label"))
    header, data = header_evidence([line.split("\t") for line in with_header.read_text().splitlines()])
    assert header and not data  # 'label' is not a number like the 0/1 below
    without = write(tmp_path / "n.tsv", "tsv", header=False, rows=numeric)
    assert read(without, "0", "1")[0] == numeric
    with pytest.raises(UserError, match="no header row.*is a number like the cells below"):
        read(without)


def test_undecidable_first_row_says_both_ways(tmp_path):
    path = tmp_path / "free.csv"  # free text in every column: nothing tells a header from data
    path.write_text("a b,c d\ne f,g h\ni j,k l\nm n,o p\n")
    with pytest.raises(
        UserError, match="if that line is a header.*if the file has no header.*--text-field 0"
    ):
        read(path)


def test_bad_rows_are_counted_and_bad_files_refused(tmp_path):
    path = tmp_path / "ragged.tsv"
    path.write_text("text\tlabel\ngood\tpos\nbad\tneg\textra\n\nfine\tpos\n")
    rows, report = read(path)
    assert rows == [("good", "pos"), ("fine", "pos")]
    assert report.counts == {"rows_with_wrong_number_of_cells": 1, "empty_lines": 1}
    assert report.where["rows_with_wrong_number_of_cells"] == ["ragged.tsv:3"]
    with pytest.raises(UserError, match="no column 2"):
        read(path, "0", "2")
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        read(tmp_path / "empty.csv")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read(tmp_path / "latin1.csv")
    with pytest.raises(UserError, match="JSONL.*name them"):
        read(write(tmp_path / "d.jsonl", "jsonl", header=True), "0", "1")
    with pytest.raises(UserError, match="not found"):
        read(tmp_path / "missing.tsv")


def test_tsv_keeps_quotes_as_text(tmp_path):
    path = tmp_path / "q.tsv"  # IANA TSV has no quoting: a quote is part of the text
    path.write_text('text\tlabel\n"great" film\tpos\nit said "no\tneg\n')
    assert read(path)[0] == [('"great" film', "pos"), ('it said "no', "neg")]


def test_bom_and_multiline_csv(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes('\ufefftext,label\n"two\nlines",pos\nx,neg\n'.encode())
    assert read(path)[0] == [("two\nlines", "pos"), ("x", "neg")]


def test_eval_reads_what_finetune_reads(tmp_path, tokenizer):
    path = write(tmp_path / "train.tsv", "tsv", header=False, rows=ROWS * 4)
    task = ClassifyTask.from_files(path, tokenizer, 64, text_field="0", label_field="1", val_frac=0.0)
    assert read_labelled(path, "0", "1") == ROWS * 4 and task.labels == ["neg", "pos"]
    # refused alike, with the same advice; the reason is the label column's (the texts repeat too)
    with pytest.raises(UserError, match=r"no header row.*\(column 1: 'pos' is one of"):
        read_labelled(path)
    with pytest.raises(UserError, match="no header row"):
        ClassifyTask.from_files(path, tokenizer, 64)


def test_sft_csv_goes_through_the_same_reader(tmp_path):
    path = tmp_path / "sft.csv"
    path.write_text("hello,world\nhi,there\n")  # no header: prompt/completion names cannot be found
    with pytest.raises(UserError, match="first line does not name the column 'prompt'"):
        read_table(path, DataReport("x"), ("prompt", "completion"))
    path.write_text("prompt,completion\nhello,world\n")
    assert read_table(path, DataReport("x"), ("prompt", "completion"))[0][1]["completion"] == "world"


def test_label_order_and_names():
    assert label_order(["10", "2", "1"]) == ["1", "2", "10"]  # numbers by number
    assert label_order(["pos", "neg"]) == ["neg", "pos"]
    assert name_labels(["0", "1"], ["neg", "pos"]) == (["neg", "pos"], {"0": "neg", "1": "pos"})
    assert name_labels(["neg", "pos"], ["pos", "neg"]) == (["pos", "neg"], {"neg": "neg", "pos": "pos"})
    assert name_labels(["1", "2"], ["1=bad", "2=good"]) == (["bad", "good"], {"1": "bad", "2": "good"})
    with pytest.raises(UserError, match="neither those names nor integers 0..1.*--labels 1=neg,2=pos"):
        name_labels(["1", "2"], ["neg", "pos"])
    with pytest.raises(UserError, match="also has label '3'"):
        name_labels(["1", "3"], ["1=a"])
    with pytest.raises(UserError, match="twice"):
        name_labels(["0", "1"], ["a", "a"])


def test_truncation_report_names_rows_and_says_what_to_do(tmp_path, tokenizer):
    long = " ".join(["word"] * 200)
    path = tmp_path / "long.tsv"
    path.write_text(f"text\tlabel\nshort one\tpos\n{long}\tneg\nok\tpos\n{long} again\tneg\n")
    task = ClassifyTask.from_files(path, tokenizer, 16, val_frac=0.0)
    assert task.report.counts["truncated"] == 2
    assert task.report.where["truncated"] == ["long.tsv:3", "long.tsv:5"]  # the rows, not "longer than"
    summary = task.report.summary()
    assert "2 of 4 texts are longer than the model's context of 16 tokens" in summary
    assert "use a model with a longer context" in summary and "yuyan tokenizer train" in summary
    assert summary.count("longer than") == 1  # said once, not once per row
