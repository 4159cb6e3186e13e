"""Accuracy, macro-F1 and the confusion matrix of a fine-tuned classifier on a labelled file.

The file is CSV (header row) or JSONL with a text column and a label column (names configurable). The model
is a checkpoint with a classification head (`yuyan finetune --task classify`), opened with
`yuyan.model.heads.Classifier`; the metrics are `heads.classification_metrics`, so training-time
validation and this evaluation count the same way.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from yuyan.errors import UserError


def read_labelled(
    path: str | os.PathLike, text_field: str = "text", label_field: str = "label"
) -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV (with header) or JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"data file {p} not found; pass a CSV or JSONL with {text_field!r} and {label_field!r} columns"
        )
    rows: list[dict] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UserError(
                    f"{p}:{n} is not valid JSON; each line must be an object with "
                    f"{text_field!r} and {label_field!r}"
                ) from None
    else:
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    out = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or text_field not in r or label_field not in r:
            raise UserError(
                f"{p} row {n} lacks {text_field!r} or {label_field!r}; "
                "name the columns with --text-field/--label-field"
            )
        out.append((str(r[text_field]), str(r[label_field])))
    if not out:
        raise UserError(f"{p} holds no examples")
    return out


def evaluate_classifier(classifier, examples: list[tuple[str, str]], batch_size: int = 32) -> dict:
    """{accuracy, macro_f1, confusion (rows true, cols predicted), labels, examples, unknown_labels}.

    classifier: a `yuyan.model.heads.Classifier` with a tokenizer. Gold labels the head does not know count
    as errors and are listed.
    """
    from yuyan.model.heads import classification_metrics

    labels = list(classifier.labels)
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({y for _, y in examples if y not in index})
    preds = classifier.predict([t for t, _ in examples], batch_size=batch_size)
    y_pred = [index[lab] for lab, _ in preds]
    keep = [i for i, (_, y) in enumerate(examples) if y in index]
    m = classification_metrics([index[examples[i][1]] for i in keep], [y_pred[i] for i in keep], len(labels))
    n = len(examples)
    correct = sum(1 for i in keep if y_pred[i] == index[examples[i][1]])
    return {
        "accuracy": correct / n,
        "macro_f1": m["macro_f1"],
        "confusion": m["confusion"],
        "labels": labels,
        "examples": n,
        "unknown_labels": unknown,
    }


__all__ = ["read_labelled", "evaluate_classifier"]
