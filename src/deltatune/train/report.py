"""A classification report: per-class precision, recall, F1 and support, and the confusion matrix.

The definitions are scikit-learn's ``classification_report`` / ``confusion_matrix`` ones: precision
is correct / predicted as the class, recall correct / truly of the class, F1 their harmonic mean,
each 0 where its denominator is 0; the matrix's row is the true class, its column the predicted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .metrics import f1_from_counts


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """``matrix[i][j]``: rows of true class ``labels[i]`` predicted as ``labels[j]``."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for true, guess in zip(gold, predicted, strict=True):
        matrix[index[true]][index[guess]] += 1
    return matrix


def classification_report(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Per-class scores, their unweighted (macro) means, accuracy and the confusion matrix, as JSON-able data.

    ``labels`` lists every class (the run's label set); labels seen only in ``gold`` or ``predicted``
    are appended, so no row is left out of the matrix.
    """
    labels = [*labels, *sorted((set(gold) | set(predicted)) - set(labels))]
    matrix = confusion_matrix(gold, predicted, labels)
    classes = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted_as = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        classes[label] = {"precision": tp / predicted_as if predicted_as else 0.0,
                          "recall": tp / support if support else 0.0,
                          "f1": f1_from_counts(tp, predicted_as - tp, support - tp), "support": support}
    macro = {key: sum(c[key] for c in classes.values()) / max(1, len(classes)) for key in ("precision", "recall", "f1")}
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {"classes": classes, "macro": macro, "accuracy": correct / max(1, len(gold)), "rows": len(gold),
            "labels": labels, "confusion_matrix": matrix}


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned text: one line per class, the macro means, then the confusion matrix."""
    labels: list[str] = report["labels"]
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for label, c in report["classes"].items():
        lines.append(f"{label:<{width}} {c['precision']:>9.4f} {c['recall']:>9.4f} {c['f1']:>9.4f} {c['support']:>8}")
    m = report["macro"]
    lines.append(f"{'macro avg':<{width}} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} "
                 f"{report['rows']:>8}")
    lines.append(f"{'accuracy':<{width}} {report['accuracy']:>29.4f} {report['rows']:>8}")
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    cell = max(6, *(len(label) for label in labels))
    lines.append(" " * width + " " + " ".join(f"{label:>{cell}}" for label in labels))
    for label, row in zip(labels, report["confusion_matrix"], strict=True):
        lines.append(f"{label:<{width}} " + " ".join(f"{n:>{cell}}" for n in row))
    return "\n".join(lines)
