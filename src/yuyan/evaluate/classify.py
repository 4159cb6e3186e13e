"""Accuracy, macro-F1, per-class precision / recall / F1 and the confusion matrix of a fine-tuned classifier
on a labelled file.

The file is CSV, TSV or JSONL with a text column and a label column (names, or 0-based indices for a file
without header), read by the same reader as `finetune --task classify` (yuyan.data.tasks.read_classification
over yuyan.data.tables), so a file that trains also evaluates. Gold labels may be written as the model's
class names or as the data values behind them (`finetune --labels neg,pos` over 0/1 labels: "0" and "neg"
are the same class). The model is a checkpoint with a classification head, opened with
`yuyan.model.heads.Classifier`; accuracy, macro-F1 and the confusion matrix are
`heads.classification_metrics`, so training-time validation and this evaluation count the same way.
"""

from __future__ import annotations

import os
import sys

from yuyan.errors import UserError


def read_labelled(
    path: str | os.PathLike, text_field: str = "text", label_field: str = "label"
) -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV, TSV or JSONL file; skipped lines are reported on stderr."""
    from yuyan.data.tasks import DataReport, read_classification

    report = DataReport(str(path))
    rows = read_classification(path, text_field, label_field, report)
    report.examples = len(rows)
    if report.counts:
        print(f"data: {report.summary()}", file=sys.stderr)
    if not rows:
        raise UserError(f"{path} holds no examples ({report.summary()})")
    return [(t, lab) for _, t, lab in rows]


def per_class(confusion: list[list[int]], labels: list[str]) -> dict[str, dict[str, float]]:
    """{label: {precision, recall, f1, support}} from a confusion matrix (rows true, columns predicted);
    a precision or recall with nothing to divide by is 0."""
    out = {}
    for i, lab in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        out[lab] = {
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "support": support,
        }
    return out


def evaluate_classifier(classifier, examples: list[tuple[str, str]], batch_size: int = 32) -> dict:
    """{accuracy, macro_f1, per_class, confusion (rows true, cols predicted), labels, examples,
    unknown_labels}.

    classifier: a `yuyan.model.heads.Classifier` with a tokenizer. A gold label is a class name or the data
    value behind one (`Classifier.name_of`); gold labels the head does not know count as errors and are
    listed."""
    from yuyan.model.heads import classification_metrics

    labels = list(classifier.labels)
    index = {lab: i for i, lab in enumerate(labels)}
    name_of = getattr(classifier, "name_of", lambda y: y if y in index else None)
    gold = [name_of(y) for _, y in examples]
    unknown = sorted({y for (_, y), g in zip(examples, gold, strict=True) if g is None})
    preds = classifier.predict([t for t, _ in examples], batch_size=batch_size)
    y_pred = [index[lab] for lab, _ in preds]
    keep = [i for i, g in enumerate(gold) if g is not None]
    m = classification_metrics([index[gold[i]] for i in keep], [y_pred[i] for i in keep], len(labels))
    n = len(examples)
    correct = sum(1 for i in keep if y_pred[i] == index[gold[i]])
    return {
        "accuracy": correct / n,
        "macro_f1": m["macro_f1"],
        "per_class": per_class(m["confusion"], labels),
        "confusion": m["confusion"],
        "labels": labels,
        "examples": n,
        "unknown_labels": unknown,
    }


def report_lines(result: dict) -> list[str]:
    """The per-class table and the confusion matrix as text lines, labelled with the class names."""
    labels = result["labels"]
    w = max(12, *(len(lab) for lab in labels))
    lines = [f"{'class':>{w}} precision    recall        f1   support"]
    for lab, m in result["per_class"].items():
        lines.append(f"{lab:>{w}} {m['precision']:9.3f} {m['recall']:9.3f} {m['f1']:9.3f} {m['support']:9d}")
    lines.append(f"{'macro avg':>{w}} {'':9} {'':9} {result['macro_f1']:9.3f} {result['examples']:9d}")
    lines.append("confusion (rows: true, columns: predicted; order " + ", ".join(labels) + ")")
    for lab, row in zip(labels, result["confusion"], strict=True):
        lines.append(f"  {lab:>{w}} " + " ".join(f"{v:6d}" for v in row))
    return lines


def report_markdown(result: dict) -> str:
    """Per-class precision / recall / F1 and the confusion matrix as Markdown tables."""
    labels = result["labels"]
    out = [
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for lab, m in result["per_class"].items():
        out.append(f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    out.append(f"| macro avg | | | {result['macro_f1']:.3f} | {result['examples']} |")
    out += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
    out.append("| true \\ predicted | " + " | ".join(labels) + " |")
    out.append("|---|" + "---:|" * len(labels))
    for lab, row in zip(labels, result["confusion"], strict=True):
        out.append(f"| {lab} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(out) + "\n"


__all__ = ["read_labelled", "evaluate_classifier", "per_class", "report_lines", "report_markdown"]
