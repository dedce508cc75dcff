"""Task metrics, written out so that their definitions are plain to read (no metric library).

Each one equals its reference implementation, which the tests use as the oracle: accuracy and
macro-F1 scikit-learn's, entity scores seqeval's (default mode), exact match and F1 the official
SQuAD v2.0 evaluation script's.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of exact matches."""
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / max(1, len(gold))


def macro_f1(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Unweighted mean of per-label F1 over the labels that occur in ``gold`` or ``predicted``.

    scikit-learn's ``f1_score(gold, predicted, average="macro")`` (what Hugging Face's ``evaluate``
    reports): a label absent from both sides has no F1 and is left out, not counted as 0.
    """
    pairs = list(zip(predicted, gold, strict=True))
    labels = sorted(set(predicted) | set(gold))
    scores = [f1_from_counts(sum(p == label == g for p, g in pairs),
                             sum(p == label != g for p, g in pairs),
                             sum(g == label != p for p, g in pairs)) for label in labels]
    return sum(scores) / max(1, len(scores))


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 = 2TP / (2TP + FP + FN); 0 when there is nothing to count."""
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# -- token classification: entity-level scores ----------------------------------------------

Span = tuple[int, int, str]
"""An entity: first word, last word (inclusive), type."""


def _split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER"; ("O", "") for "O"; a tag without a B-/I- prefix is ("I", tag)."""
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
        return tag[0], tag[2:]
    return "I", tag


def entity_spans(tags: Sequence[str]) -> list[Span]:
    """The entities of one BIO-tagged sentence.

    Follows conlleval / seqeval's default (non-strict) reading: an entity starts at ``B-X``, or
    at ``I-X`` when the previous word is not part of an ``X`` entity (a stray ``I-`` is a
    start, not an error), and continues over the ``I-X`` words that follow.
    """
    spans: list[Span] = []
    start, kind = -1, ""
    for i, tag in enumerate(tags):
        prefix, label = _split_tag(tag)
        continues = prefix == "I" and label == kind and start >= 0
        if not continues and start >= 0:
            spans.append((start, i - 1, kind))
            start, kind = -1, ""
        if prefix != "O" and not continues:
            start, kind = i, label
    if start >= 0:
        spans.append((start, len(tags) - 1, kind))
    return spans


def entity_scores(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities; an entity counts only on an exact span and type match."""
    tp = fp = fn = 0
    for p_tags, g_tags in zip(predicted, gold, strict=True):
        p_spans, g_spans = set(entity_spans(p_tags)), set(entity_spans(g_tags))
        tp += len(p_spans & g_spans)
        fp += len(p_spans - g_spans)
        fn += len(g_spans - p_spans)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1_from_counts(tp, fp, fn)}


# -- extractive QA: SQuAD's answer comparison ------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(predicted: str, gold: str) -> float:
    """1.0 when the normalised answers are equal."""
    return float(squad_normalize(predicted) == squad_normalize(gold))


def squad_f1(predicted: str, gold: str) -> float:
    """F1 of the bag of normalised words; two empty answers (no answer) match with 1.0."""
    p_words, g_words = squad_normalize(predicted).split(), squad_normalize(gold).split()
    if not p_words or not g_words:
        return float(p_words == g_words)
    common = sum((Counter(p_words) & Counter(g_words)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p_words), common / len(g_words)
    return 2 * precision * recall / (precision + recall)


# -- embeddings: rank correlation -----------------------------------------------------------

def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span ([5, 1, 5] -> [2.5, 1, 2.5])."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (no linear relation to measure)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {n} values against {len(y)}")
    mx, my = sum(x) / max(1, n), sum(y) / max(1, n)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson of the tie-averaged ranks."""
    return pearson(average_ranks(x), average_ranks(y))
