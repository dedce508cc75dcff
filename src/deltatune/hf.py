"""Everything that knows about Hugging Face transformers, which stays an optional dependency.

Nothing here imports transformers at module import time: a model can only contain a
transformers class if transformers is already imported, so ``sys.modules`` is enough to find
the classes we need to recognise.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "opt": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "bloom": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
}
"""The attention projections peft adapts when ``target_modules`` is not given."""


def conv1d_class() -> type[nn.Module] | None:
    """transformers' GPT-2 style ``Conv1D`` class, or None when transformers is not loaded."""
    module = sys.modules.get("transformers.pytorch_utils")
    if module is None and "transformers" not in sys.modules:
        return None
    if module is None:
        import transformers.pytorch_utils as module  # transformers is loaded: this is cheap
    return getattr(module, "Conv1D", None)


def model_type(model: nn.Module) -> str | None:
    """The transformers ``config.model_type`` of a model, if it has one."""
    return getattr(getattr(model, "config", None), "model_type", None)


def default_targets(model: nn.Module) -> tuple[str, ...] | None:
    """peft's default targets for this model's architecture, if known."""
    kind = model_type(model)
    return DEFAULT_TARGETS.get(kind) if kind else None


def output_head_name(model: nn.Module, task_type: str | None) -> str | None:
    """The module name of the output head that ``all-linear`` leaves alone (peft's rule)."""
    head: Any = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in ("score", "classifier") if getattr(model, n, None) is not None), None)
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The model's input and output embedding modules (as transformers reports them), if any."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        module = get() if callable(get) else None
        if module is not None:
            found.append(module)
    return found


def name_or_path(model: nn.Module) -> str | None:
    """Where the base model came from (``config._name_or_path``), or None for a model built in code."""
    value = getattr(getattr(model, "config", None), "_name_or_path", None)
    return value or None


def auto_mapping(model: nn.Module, task_type: str | None) -> dict[str, str] | None:
    """peft's ``auto_mapping`` entry: the base class, written only when no task type is set."""
    if task_type is not None or not type(model).__module__.startswith("transformers."):
        return None
    return {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}


def transformers_class(name: str) -> Any:
    """A public transformers class by name (``"AutoModelForCausalLM"``), imported on first use.

    Training code loads models and tokenizers through this, so this module stays the only one
    that imports transformers and the library still imports without it.
    """
    import transformers

    return getattr(transformers, name)


def quiet_transformers() -> None:
    """Silence transformers' progress bars and load reports (a new head is reported "MISSING")."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
