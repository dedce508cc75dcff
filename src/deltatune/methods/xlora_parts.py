"""X-LoRA's pieces: the classifier (peft's module layout) and the frozen LoRA experts, read from
the folders peft or deltatune saved them in (``io.read_config`` / ``io.read_tensors``, the readers
``dt.load`` uses)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn

from ..errors import AdapterFileError
from ..files import recover
from ..io import CONFIG_NAME, WEIGHTS_NAME, read_config, read_tensors
from .lora_config import LoraConfig


class XLoraClassifier(nn.Module):
    """``xlora_depth`` linear layers over the last hidden state (ReLU and dropout between them);
    ``layers.<i>`` are peft's module names, so the state dict keys match its ``internal_xlora_classifier``."""

    def __init__(self, hidden_size: int, n_experts: int, n_layers: int, depth: int, size: int, dropout: float,
                 layerwise: bool) -> None:
        super().__init__()
        outputs = n_experts * n_layers if layerwise else n_experts
        modules: list[nn.Module] = []
        width = hidden_size
        for _ in range(depth - 1):
            modules += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            width = size
        self.layers = nn.Sequential(*modules, nn.Linear(width, outputs))
        self.n_experts, self.n_layers, self.layerwise = n_experts, n_layers, layerwise

    def forward(self, hidden: Tensor, temperature: float, softmax: bool) -> Tensor:
        """``(batch, tokens, n_layers, n_experts)`` scalings from ``hidden: (batch, tokens, hidden_size)``."""
        logits = self.layers(hidden)
        if not self.layerwise:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(*hidden.shape[:2], self.n_layers, self.n_experts)
        return torch.softmax(scalings / temperature, dim=-1) if softmax else scalings


class ExpertLayer(nn.Module):
    """The experts' LoRA factors at one layer: ``A_<e>: (r_e, in)``, ``B_<e>: (out, r_e)`` for each
    expert ``e`` that adapts it. Buffers (frozen) unless the experts train."""

    def __init__(self, factors: Mapping[int, tuple[Tensor, Tensor, float]], trainable: bool) -> None:
        super().__init__()
        self.scalings = {e: s for e, (_, _, s) in factors.items()}
        for e, (a, b, _) in factors.items():
            for side, value in (("A", a), ("B", b)):
                if trainable:
                    self.register_parameter(f"{side}_{e}", nn.Parameter(value.clone()))
                else:
                    self.register_buffer(f"{side}_{e}", value.clone())

    def change(self, x: Tensor, gates: Tensor, weight: float) -> Tensor:
        """``Σ_e B_e A_e (x * gates[..., e]) * scaling_e * weight`` (peft's order of operations)."""
        total: Tensor | None = None
        for e, scaling in self.scalings.items():
            a, b = getattr(self, f"A_{e}"), getattr(self, f"B_{e}")
            part = (x.to(a.dtype) * gates[..., e:e + 1].to(a.dtype)) @ a.T @ b.T * scaling * weight
            total = part if total is None else total + part
        assert total is not None
        return total


PLAIN: Mapping[str, tuple[object, str]] = MappingProxyType({
    "use_dora": (False, "DoRA rescales each weight by a trained magnitude"),
    "use_qalora": (False, "QA-LoRA pools the input in groups before lora_A"),
    "rank_pattern": ({}, "the ranks differ per module"),
    "alpha_pattern": ({}, "the alphas differ per module"),
    "bias": ("none", "the adapter trains the base model's biases too"),
    "target_parameters": (None, "it adapts parameters (expert stacks), not modules"),
})
"""The LoRA fields an expert must leave off (value, what it would add): X-LoRA mixes ``B A x`` times
the LoRA scaling, nothing else, so an expert with any of these would compute something else."""
FIX = "pass plain LoRA adapters as experts (e.g. the --output-dir of a `deltatune train --method lora` run)"


def _is_plain(value: object, off: object) -> bool:
    return value == off or (not value and not off)


def read_expert(label: str, folder: Path) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Expert ``label``'s config and tensors, refused unless it is a plain LoRA adapter of linear layers
    (the one check both the command line's recipe and the attach run, so a bad expert stops early)."""
    recover(folder)  # a save of this copy killed past its commit point is finished first, as dt.load does
    config = read_config(folder)
    where = f"X-LoRA expert {label!r} ({folder / CONFIG_NAME})"
    if not isinstance(config, LoraConfig):
        raise AdapterFileError(f"{where} sets peft_type={config.peft_type!r}; experts must be LoRA adapters "
                               f"(peft_type 'LORA'): {FIX}")
    for field, (off, why) in PLAIN.items():
        value = getattr(config, field)
        if not _is_plain(value, off):
            raise AdapterFileError(f"{where} sets {field}={value!r}: {why}, which an X-LoRA expert cannot carry "
                                   f"(experts are plain LoRA); {FIX}")
    tensors = read_tensors(folder)
    odd = [k for k in tensors if ".lora_" in k and not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise AdapterFileError(f"{where}: its {WEIGHTS_NAME} holds {odd[:2]}, not the lora_A/lora_B weights of "
                               f"linear layers (an embedding LoRA?); {FIX}")
    return config, tensors


def _scaling(config: LoraConfig) -> float:
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def read_experts(paths: Mapping[str, str], prefix: str) -> dict[str, dict[int, tuple[Tensor, Tensor, float]]]:
    """Each adapted module key -> {expert index: (A, B, scaling)}, from the experts' folders in order."""
    out: dict[str, dict[int, tuple[Tensor, Tensor, float]]] = {}
    for index, (label, path) in enumerate(paths.items()):
        folder = Path(path)
        config, tensors = read_expert(label, folder)
        scaling = _scaling(config)
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            if not key.startswith(prefix):
                raise AdapterFileError(f"{folder}: unexpected tensor key {key!r} for a LoRA expert")
            module = key[len(prefix):].split(".lora_A.")[0]
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise AdapterFileError(f"{folder}: {key!r} has no matching lora_B tensor")
            out.setdefault(module, {})[index] = (a, b, scaling)
        if not any(index in v for v in out.values()):
            raise AdapterFileError(f"X-LoRA expert {label!r} ({folder}) holds no LoRA tensors")
    return out
