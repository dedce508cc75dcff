"""Our task metrics against their reference implementations: scikit-learn, seqeval, scipy and
the official SQuAD v2.0 evaluation script (its three functions copied below, unchanged in logic)."""

from __future__ import annotations

import collections
import re
import string
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scipy import stats as scipy_stats  # scikit-learn's dependency
from seqeval import metrics as seqeval_metrics
from sklearn import metrics as sklearn_metrics

from deltatune.train.metrics import accuracy, entity_scores, macro_f1, spearman, squad_exact, squad_f1

FAST = settings(max_examples=300, deadline=None)


# -- the SQuAD v2.0 reference (evaluate-v2.0.py, https://rajpurkar.github.io/SQuAD-explorer/) -------

def ref_normalize_answer(s: str) -> str:
    def remove_articles(text: str) -> str:
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def ref_compute_exact(a_gold: str, a_pred: str) -> int:
    return int(ref_normalize_answer(a_gold) == ref_normalize_answer(a_pred))


def ref_compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = ref_normalize_answer(a_gold).split() if a_gold else []
    pred_toks = ref_normalize_answer(a_pred).split() if a_pred else []
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


# -- strategies -------------------------------------------------------------------------------

labels = st.integers(0, 4)
label_pairs = st.integers(1, 12).flatmap(lambda n: st.tuples(st.lists(labels, min_size=n, max_size=n),
                                                            st.lists(labels, min_size=n, max_size=n)))
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-MISC", "B-MISC"]
sentence = st.lists(st.sampled_from(TAGS), min_size=1, max_size=7)
WORDS = ["the", "a", "an", "cat", "Cat", "sat", "on", "mat.", "Paris", "paris!", "", " ", "The", "3", "U.S."]
answer = st.lists(st.sampled_from(WORDS), max_size=5).map(" ".join)


@FAST
@given(label_pairs)
def test_accuracy_and_macro_f1_equal_scikit_learn(pair: tuple[list[int], list[int]]) -> None:
    predicted, gold = pair
    assert accuracy(predicted, gold) == pytest.approx(sklearn_metrics.accuracy_score(gold, predicted), abs=1e-12)
    expected = sklearn_metrics.f1_score(gold, predicted, average="macro", zero_division=0)
    assert macro_f1(predicted, gold) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_leaves_out_labels_absent_from_both_sides() -> None:
    # a 4-label task whose evaluation rows hold labels 0 and 1 only: two labels averaged, not four
    assert macro_f1([0, 1, 1], [0, 1, 0]) == pytest.approx((2 / 3 + 2 / 3) / 2)


@FAST
@given(st.integers(1, 3).flatmap(lambda n: st.lists(sentence, min_size=n, max_size=n)), st.randoms())
def test_entity_scores_equal_seqeval(gold: list[list[str]], rng: object) -> None:
    predicted = [[rng.choice(TAGS) for _ in s] for s in gold]  # type: ignore[attr-defined]
    ours = entity_scores(predicted, gold)
    with warnings.catch_warnings():  # seqeval warns when a side holds no entity; it then reports 0, as we do
        warnings.simplefilter("ignore")
        expected = {"precision": seqeval_metrics.precision_score(gold, predicted),
                    "recall": seqeval_metrics.recall_score(gold, predicted),
                    "f1": seqeval_metrics.f1_score(gold, predicted)}
    assert ours == pytest.approx(expected, abs=1e-12)


@FAST
@given(answer, answer)
def test_squad_exact_and_f1_equal_the_official_script(predicted: str, gold: str) -> None:
    assert squad_exact(predicted, gold) == ref_compute_exact(gold, predicted)
    assert squad_f1(predicted, gold) == pytest.approx(ref_compute_f1(gold, predicted), abs=1e-12)


@FAST
@given(st.integers(2, 10).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 3).map(float), min_size=n, max_size=n),
                                                        st.lists(st.integers(0, 5).map(float), min_size=n, max_size=n))))
def test_spearman_equals_scipy(pair: tuple[list[float], list[float]]) -> None:
    x, y = pair
    if len(set(x)) < 2 or len(set(y)) < 2:  # scipy returns nan for a constant side; ours 0.0 (documented)
        assert spearman(x, y) == 0.0
        return
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-9)
