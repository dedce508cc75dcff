"""The task types the trainer and the ``deltatune`` command know, by command-line name."""

from __future__ import annotations

from ...errors import DataError
from .base import Task
from .causal_lm import CausalLM
from .feature_extraction import FeatureExtraction
from .qa import QuestionAnswering
from .seq2seq import Seq2SeqLM
from .seq_cls import SequenceClassification
from .token_cls import TokenClassification

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    SequenceClassification, CausalLM, Seq2SeqLM, TokenClassification, QuestionAnswering, FeatureExtraction)}


def task_class(name: str) -> type[Task]:
    """The task type called ``name`` on the command line."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "task_class"]
