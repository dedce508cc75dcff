"""AdapterHub's prefix-tuning and prompt-tuning folders, read and written: a part of the "adapters" folder format.

A prefix folder's weights sit in AdapterHub's prefix pool, ``<base>.prefix_tuning.prefix_tunings.<name>.self_prefix.``
+ ``control_trans`` (flat: the table, ``prefix_length * layers * 2 * kv_heads * head_dim`` long, laid out as
deltatune's) or ``wte.weight`` and ``control_trans.{0,2}.{weight,bias}`` (the MLP); AdapterHub's ``.bin`` also
stores the pool once per layer (``...prefix_tuning.pool.prefix_tunings...``), and those copies must be equal. A
frozen load keeps the table (an MLP's output is computed once, with the file's activation); a trainable one keeps
the flat table or, for a tanh MLP as wide as deltatune's, the MLP. A prompt folder holds
``<base>.prompt_tuning.prompt_tunings.<name>.prompt_embedding.weight``. Writing: a prefix with deltatune's MLP as
the MLP, any other as the flat table (only the pool's copy: safetensors cannot share memory, and AdapterHub loads
the pool from it); a prompt as its table. Config mapping and refusals: ``prompt_hub``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hf
from ..errors import AdapterFileError
from ..formats import FolderFiles, FolderFormat, register_format
from ..inject import AttachPlan, plan
from ..state import state_of
from .bottleneck_block import ACTIVATIONS
from .bottleneck_format import ADAPTERHUB, CONFIG, HubFolder, folder_files, folder_for, open_folder, with_folder
from .bottleneck_hub_files import head_pairs, legacy, read_json, without_prefix
from .prompt import FILE_KEY, PromptAdapter
from .prompt_config import PrefixTuningConfig, PromptTuningConfig
from .prompt_encoders import PrefixEncoder, PromptTable
from .prompt_hub import (PREFIX, HubPrefix, architecture_of, hub_fields, known, prefix_settings, prefix_to_hub,
                         prompt_place, prompt_to_hub)

PREFIX_KEY = re.compile(r"^(?:.*\.)?prefix_tuning\.(?:pool\.)?prefix_tunings\.(?P<name>[^.]+)\.(?P<location>[^.]+)\."
                        r"(?P<local>.+)$")
"""A key of the prefix pool (or of a layer's reference to it): the adapter name, AdapterHub's location, the local key."""
PROMPT_KEY = re.compile(r"^prompt_tuning\.prompt_tunings\.(?P<name>[^.]+)\.(?P<location>)(?P<local>.+)$")
"""A prompt key (its location group is empty: a prompt has one place)."""
LOCATION = "self_prefix"
"""AdapterHub's prefix location of an encoder's or a decoder's self-attention (the only one deltatune builds)."""
MLP = ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight", "control_trans.2.bias")
FLAT, PROMPT = ("control_trans",), ("prompt_embedding.weight",)


def claims(folder: Path) -> bool:
    """An AdapterHub folder (no ``peft_type``) whose config is a prefix or prompt tuning one."""
    try:
        data = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "peft_type" not in data and architecture_of(data.get("config")) is not None


def _by_local(opened: HubFolder, pattern: re.Pattern[str], expected: tuple[str, ...], prefix: str | None
              ) -> dict[str, Tensor]:
    """The file's tensors by local key; every key must be one of this adapter's, copies equal, nothing missing."""
    found: dict[str, list[tuple[str, Tensor]]] = {}
    for key, value in opened.tensors.items():
        match = pattern.match(without_prefix(legacy(key), prefix))
        if match is None or match["name"] != opened.hub_name or match["local"] not in expected:
            raise AdapterFileError(f"{opened.source}: tensor {key!r} is not one of adapter {opened.hub_name!r}'s "
                                   f"{list(expected)}; the file holds another adapter or method, or is damaged. "
                                   "The model was left unchanged.")
        if match["location"] not in ("", LOCATION):
            raise AdapterFileError(f"{opened.source}: tensor {key!r} is a prefix for AdapterHub's {match['location']!r} "
                                   f"(an encoder-decoder model); deltatune builds {LOCATION!r} prefixes only. "
                                   "The model was left unchanged.")
        found.setdefault(match["local"], []).append((key, value))
    missing = [k for k in expected if k not in found]
    if missing:
        raise AdapterFileError(f"{opened.source}: missing tensor(s) {missing} that the config needs. The model was left unchanged.")
    for local, copies in found.items():
        if any(v.shape != copies[0][1].shape or not torch.equal(v, copies[0][1]) for _, v in copies[1:]):
            raise AdapterFileError(f"{opened.source}: {[k for k, _ in copies][:3]} are copies of one pool tensor and must "
                                   "be equal; they differ, so the file is inconsistent. The model was left unchanged.")
    return {local: copies[0][1] for local, copies in found.items()}


def _mlp(encoder: nn.Module) -> tuple[Tensor, ...] | None:
    """A trainable prefix MLP's tensors in AdapterHub's order (``MLP``), or None for a table."""
    if not isinstance(encoder, PrefixEncoder) or encoder.transform is None:
        return None
    first, last = encoder.transform[0], encoder.transform[2]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    return encoder.embedding.weight, first.weight, first.bias, last.weight, last.bias


def _table(encoder: nn.Module) -> Tensor:
    """The trained table of a prefix or prompt encoder without an MLP (the embedding's weight)."""
    assert isinstance(encoder, (PrefixEncoder, PromptTable))
    return encoder.embedding.weight


def _shape_check(opened: HubFolder, tensors: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    for local, shape in shapes.items():
        if tuple(tensors[local].shape) != shape:
            raise AdapterFileError(f"{opened.source}: tensor {local!r} has shape {tuple(tensors[local].shape)} but this "
                                   f"model needs {shape} (check that the adapter was made for this model). "
                                   "The model was left unchanged.")


def _prefix_pairs(model: nn.Module, attach_plan: AttachPlan, opened: HubFolder, hub: HubPrefix) -> list[tuple[Tensor, Tensor]]:
    """(planned tensor, value) filling a prefix adapter's encoder from the file."""
    part = attach_plan.model_delta
    assert isinstance(part, PromptAdapter) and isinstance(attach_plan.config, PrefixTuningConfig)
    config = attach_plan.config
    assert config.num_layers is not None and config.token_dim is not None
    width, hidden = config.num_layers * 2 * config.token_dim, hf.hidden_size(model)
    tensors = _by_local(opened, PREFIX_KEY, FLAT if hub.flat else MLP, hf.base_model_prefix(model))
    if hub.flat:
        _shape_check(opened, tensors, {"control_trans": (hub.length * width,)})
        table = tensors["control_trans"].view(hub.length, width)
    else:
        _shape_check(opened, tensors, {"wte.weight": (hub.length, hidden), "control_trans.0.weight": (hub.bottleneck, hidden),
                                       "control_trans.0.bias": (hub.bottleneck,), "control_trans.2.weight": (width, hub.bottleneck),
                                       "control_trans.2.bias": (width,)})
        mlp = _mlp(part.encoder)
        if mlp is not None:  # trainable: the MLP itself
            if config.token_dim != hidden:
                raise AdapterFileError(
                    f"{opened.source}: AdapterHub's prefix MLP embeds the prefix at the hidden size ({hidden}), deltatune's "
                    f"trainable one at the key/value width ({config.token_dim}: grouped-query attention), so the MLP "
                    "cannot be kept. Fix: load it frozen (trainable=False). The model was left unchanged.")
            return [(target, tensors[local]) for target, local in zip(mlp, MLP)]
        with torch.no_grad():  # frozen: what AdapterHub's MLP computes at every call, once
            inner = F.linear(tensors["wte.weight"], tensors["control_trans.0.weight"], tensors["control_trans.0.bias"])
            table = F.linear(ACTIVATIONS[hub.non_linearity](inner), tensors["control_trans.2.weight"],
                             tensors["control_trans.2.bias"])
    return [(_table(part.encoder), table)]


def _config(model: nn.Module, fields: Mapping[str, Any], source: str, trainable: bool
            ) -> tuple[PrefixTuningConfig | PromptTuningConfig, HubPrefix | None]:
    """The deltatune config of a file's AdapterHub config (the head and model keys not yet added), and for a prefix
    the settings its weights are read with; everything deltatune cannot reproduce is refused here."""
    if fields["architecture"] == PREFIX:
        hub = prefix_settings(fields, source, trainable, bool(hf.config_value(model, "is_encoder_decoder")))
        projection = trainable and not hub.flat  # a frozen adapter keeps the table only
        return PrefixTuningConfig(num_virtual_tokens=hub.length, token_positions="from_zero", prefix_projection=projection,
                                  encoder_hidden_size=hub.bottleneck if projection else None), hub
    length, place = prompt_place(fields, source)
    width = hf.config_value(model, "embedding_size")  # AdapterHub's width for the prompt; else the hidden size
    return PromptTuningConfig(num_virtual_tokens=length, insert_at=place,
                              token_dim=width if isinstance(width, int) else None), None


def read(model: nn.Module, folder: Path, name: str, trainable: bool) -> AttachPlan:
    """An AdapterHub prefix or prompt tuning folder -> a filled attach plan for adapter ``name``; the model is not touched.
    The config is checked first: AdapterHub's head files of some models (T5) hold the adapter's other parts."""
    source = str(folder / CONFIG)
    fields = hub_fields(read_json(folder / CONFIG).get("config"), source)
    unknown = sorted(set(fields) - known(fields))
    if unknown:
        warnings.warn(f"{source}: ignoring keys unknown to deltatune's AdapterHub reader: {unknown}", stacklevel=3)
    config, hub = _config(model, fields, source, trainable)
    opened = open_folder(model, folder)
    attach_plan = plan(model, with_folder(config, opened, trainable), name)
    if hub is not None:
        pairs = _prefix_pairs(model, attach_plan, opened, hub)
    else:
        part = attach_plan.model_delta
        assert isinstance(part, PromptAdapter)
        tensors = _by_local(opened, PROMPT_KEY, PROMPT, hf.base_model_prefix(model))
        _shape_check(opened, tensors, {PROMPT[0]: tuple(_table(part.encoder).shape)})
        pairs = [(_table(part.encoder), tensors[PROMPT[0]])]
    pairs += head_pairs(attach_plan, opened.head, folder) if opened.head.modules else []
    with torch.no_grad():
        for target, value in pairs:  # planned tensors only: not yet in the model
            target.copy_(value)
    return attach_plan


def handles(model: nn.Module, name: str) -> bool:
    """This part writes prefix and prompt tuning adapters (and refuses those of peft's convention itself)."""
    return isinstance(state_of(model).require(name), (PrefixTuningConfig, PromptTuningConfig))


def _pool(model: nn.Module) -> str:
    """Where AdapterHub keeps its prefix pool and prompt layer: on the base model (a model key path)."""
    prefix = hf.base_model_prefix(model)
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def _convention_error(name: str, field: str, value: str, hub_value: str) -> AdapterFileError:
    return AdapterFileError(
        f"cannot save adapter {name!r} in AdapterHub's format: its {field}={value!r} is peft's convention, and "
        f"AdapterHub computes {field}={hub_value!r}, so AdapterHub would load another model. Fix: save it with "
        f"format='peft' (the default), or train an adapter with {field}={hub_value!r}. Nothing was written.")


def files(model: nn.Module, name: str, folder: Path) -> FolderFiles:
    """Adapter ``name``'s AdapterHub folder (``bottleneck_format.folder_files``)."""
    state = state_of(model)
    config, part = state.require(name), state.model_deltas[name]
    assert isinstance(part, PromptAdapter)
    if isinstance(config, PromptTuningConfig):
        if config.insert_at == "input":
            raise _convention_error(name, "insert_at", config.insert_at, "embeddings")
        key = f"{_pool(model)}prompt_tuning.prompt_tunings.{name}.{PROMPT[0]}"
        return folder_files(model, name, folder, prompt_to_hub(config), {key: part.table().detach()})
    assert isinstance(config, PrefixTuningConfig)
    if config.token_positions != "from_zero":
        raise _convention_error(name, "token_positions", config.token_positions, "from_zero")
    base = f"{_pool(model)}prefix_tuning.prefix_tunings.{name}.{LOCATION}."
    mlp = _mlp(part.encoder)
    if mlp is not None and mlp[0].shape[1] == hf.hidden_size(model):  # the MLP, as wide as AdapterHub builds it
        tensors = {base + local: value.detach() for local, value in zip(MLP, mlp)}
        return folder_files(model, name, folder, prefix_to_hub(config, False, int(mlp[1].shape[0])), tensors)
    table = part.tensors_to_save()[FILE_KEY]  # the table as evaluation computes it
    return folder_files(model, name, folder, prefix_to_hub(config, True, None), {base + FLAT[0]: table.reshape(-1)})


PROMPT_HUB = register_format(FolderFormat(ADAPTERHUB.name, claims, read, files, folder_for, handles))
