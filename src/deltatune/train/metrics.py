"""Task metrics, written out so that their definitions are plain to read (no metric library)."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of exact matches."""
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / max(1, len(gold))


def macro_f1(predicted: Sequence[int], gold: Sequence[int], num_labels: int) -> float:
    """Unweighted mean over labels of per-label F1 (a label absent from both counts as F1 = 0)."""
    scores = []
    for label in range(num_labels):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold, strict=True))
        scores.append(f1_from_counts(tp, fp, fn))
    return sum(scores) / max(1, num_labels)


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 = 2TP / (2TP + FP + FN); 0 when there is nothing to count."""
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
