"""Managing the adapters on a model: which are active, switching them off, counting parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .inject import remove, trainable_biases
from .quant.model import packed_weight_values
from .registry import method_for
from .state import STATE_ATTR, ModelState, delta_layers, saved_modules, set_active, state_of


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return state_of(model).active


def adapter_names(model: nn.Module) -> list[str]:
    return list(state_of(model).configs)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and free its memory; layers left with no adapter are unwrapped."""
    remove(model, name)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: adapters are switched off (merged ones taken out
    of the weights) and restored on exit, merged ones merged again."""
    layers = [layer for _, layer in delta_layers(model)]
    merged = [tuple(layer.merged) for layer in layers]
    modules = [module for _, module in saved_modules(model)]
    state = model.__dict__.get(STATE_ATTR) or ModelState()  # a model without adapters runs as it is
    try:
        state.switch_model_deltas(model, ())
        for layer in layers:
            layer.unmerge()
            layer.enabled = False
        for module in modules:
            module.enabled = False
        yield model
    finally:
        for layer, names in zip(layers, merged):
            layer.enabled = True
            layer.merge(names)
        for module in modules:
            module.enabled = True
        state.switch_model_deltas(model, state.active)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters), each shared parameter counted once; a 4-bit
    layer's weight counts as the values it stores."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params) + packed_weight_values(model)
    return sum(p.numel() for p in params if p.requires_grad), total


def adapter_parameters(model: nn.Module, name: str) -> int:
    """How many parameters adapter ``name`` saves (deltas, saved module copies, trained biases)."""
    state_of(model).require(name)
    count = sum(p.numel() for _, layer in delta_layers(model) if name in layer.deltas
                for p in layer.deltas[name].parameters())
    copied = {id(p): p for _, module in saved_modules(model) if name in module.copies
              for p in module.copies[name].parameters()}  # a tensor tied between copies counts once
    count += sum(p.numel() for p in copied.values())
    part = state_of(model).model_deltas.get(name)
    count += sum(p.numel() for p in part.parameters()) if part is not None else 0
    return count + sum(p.numel() for p in trainable_biases(model, name).values())


def summary(model: nn.Module) -> str:
    """A readable table of the adapters on the model and the parameter counts."""
    state = state_of(model)
    rows = [("adapter", "method", "active", "modules", "params", "merged")]
    for name, config in state.configs.items():
        layers = [layer for _, layer in delta_layers(model) if name in layer.deltas]
        part = state.model_deltas.get(name)
        changed = len(layers) + (part.modules_changed() if part is not None else 0)
        rows.append((name, method_for(config).peft_type, "yes" if name in state.active else "no",
                     str(changed), f"{adapter_parameters(model, name):,}",
                     "yes" if any(name in layer.merged for layer in layers) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    trainable, total = trainable_parameters(model)
    lines.append(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.4f}%)")
    return "\n".join(lines)
