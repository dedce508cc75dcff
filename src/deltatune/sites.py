"""Module-output sites: where a change attaches to a sub-block's output rather than to a layer.

A site (``hf.SiteSpec``) is the step where a transformer layer adds a sub-block's output ``h`` to
the residual ``x`` (and, in post-LN models, normalises the sum). ``SiteHooks`` hands ``(h, x,
norm)`` to a function and puts its result where the model continues: post-LN, as the output of
the module that computed ``LN(h + x)`` (that output is handed over too: the function need not compute
it again); pre-LN, as the sub-block's output, to which the layer then adds ``x`` itself (the function
is told so, and leaves ``x`` out). Hooks keep every module and
parameter name as it was. Names no method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import hf
from .config import FILE_PREFIX, TargetedConfig
from .errors import TargetError
from .layer import ModelDelta

Norm = Callable[[Tensor], Tensor]
SiteFunction = Callable[[Tensor, Tensor, "Norm | None", bool, "Tensor | None"], "Tensor | None"]
"""(h, x, the site's layer norm or None, whether the model adds x afterwards, the model's own
``LN(h + x)`` at a post-LN site or None) -> the site's output (without x when the model adds it), or
None to leave the model's own."""


class SiteConfig(TargetedConfig):
    """A config whose adapter attaches at the architecture's sites rather than at named layers: of
    the targeting fields only ``modules_to_save`` (task heads trained with the adapter) applies."""

    def validate(self) -> None:
        super().validate()
        for field_name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            self.check(getattr(self, field_name) is None, field_name, "this adapter attaches at the architecture's sites",
                       "leave it unset; the config's own fields choose its sites")


@dataclass
class Site:
    """One site of one layer of a model."""

    name: str
    """``<layer path>.<location>``: unique in the model."""
    layer: int
    """The layer's number (AdapterHub's: T5's decoder blocks after the encoder's)."""
    location: str
    key_path: str
    """Where AdapterHub's files keep this site's adapters (``<key path>.adapters.<name>.``)."""
    hidden: nn.Module
    residual: nn.Module
    residual_arg: int
    owner: nn.Module | None
    norm: nn.Module | None


def _module_at(root: nn.Module, path: str) -> nn.Module | None:
    module: Any = root
    for part in [p for p in path.split(".") if p]:
        if part.lstrip("-").isdigit():
            if not isinstance(module, (nn.ModuleList, nn.Sequential)) or not -len(module) <= int(part) < len(module):
                return None
            module = module[int(part)]
        else:
            module = getattr(module, part, None)
            if not isinstance(module, nn.Module):
                return None
    return module


def _resolved(layer: nn.Module, path: str) -> str:
    """``path`` with a negative list index written as the real one (``layer.-1`` -> ``layer.2``)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.startswith("-") and part[1:].isdigit():
            owner = _module_at(layer, ".".join(parts[:i]))
            parts[i] = str(len(owner) + int(part)) if isinstance(owner, nn.ModuleList) else part
    return ".".join(parts)


def model_sites(model: nn.Module) -> list[Site]:
    """Every site of the model, layer by layer (a clear TargetError for a model type without a table)."""
    layers, specs = hf.site_table(model)
    sites = []
    for index, (path, layer) in enumerate(layers):
        for spec in specs:
            if spec.needs is not None and _module_at(layer, spec.needs) is None:
                continue
            hidden, residual = _module_at(layer, spec.hidden), _module_at(layer, spec.residual)
            if hidden is None or residual is None:
                continue
            owner = _module_at(layer, spec.owner) if spec.owner else None
            norm = _module_at(layer, spec.norm) if spec.norm else None
            sites.append(Site(f"{path}.{spec.location}", index, spec.location, f"{path}.{_resolved(layer, spec.key)}",
                              hidden, residual, spec.residual_arg, owner, norm))
    return sites


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


def _with_first(value: Any, first: Tensor) -> Any:
    return (first, *value[1:]) if isinstance(value, tuple) else first


@dataclass
class SiteHooks:
    """The hooks that run ``compute`` at one site; ``remove()`` takes them all off."""

    site: Site
    compute: SiteFunction
    handles: list[RemovableHandle] = field(default_factory=list)
    _seen: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        site = self.site
        self.handles.append(site.residual.register_forward_pre_hook(self._take_residual, with_kwargs=True))
        self.handles.append(site.hidden.register_forward_hook(self._on_hidden))
        if site.owner is not None:
            self.handles.append(site.owner.register_forward_hook(self._on_owner))

    def _take_residual(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        index = self.site.residual_arg
        if len(args) > index:
            self._seen["x"] = args[index]
        else:  # passed by keyword: the name forward gives that position
            name = list(inspect.signature(module.forward).parameters)[index]
            self._seen["x"] = kwargs[name]

    def _on_hidden(self, module: nn.Module, args: Any, output: Any) -> Any:
        h = _first(output)
        if self.site.owner is not None:  # post-LN: the owner's hook computes the site
            self._seen["h"] = h
            return None
        result = self.compute(h, self._seen.pop("x"), None, True, None)
        return None if result is None else _with_first(output, result)

    def _on_owner(self, module: nn.Module, args: Any, output: Any) -> Any:
        norm = self.site.norm
        result = self.compute(self._seen.pop("h"), self._seen.pop("x"), None if norm is None else norm.forward, False,
                              _first(output))
        return None if result is None else _with_first(output, result)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._seen.clear()


HOLDER = "site_adapters"
"""The child (a ModuleDict by adapter name) that holds a site's blocks in the model's module tree."""


class SiteContainer(nn.Module):
    """A module made only to hold ``site_adapters`` where the model has no module at a site's key path."""


def site_holder(model: nn.Module, key_path: str, create: bool) -> nn.ModuleDict | None:
    """The ModuleDict of blocks at ``key_path`` ("" for the model itself; made, with a container where
    needed, if ``create``)."""
    parent_path, _, child = key_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    owner = getattr(parent, child, None) if key_path else model
    if owner is None:
        if not create:
            return None
        owner = SiteContainer().train(parent.training)  # new modules follow the model's mode (dropout)
        setattr(parent, child, owner)
    holder = getattr(owner, HOLDER, None)
    if holder is None and create:
        holder = nn.ModuleDict().train(owner.training)
        setattr(owner, HOLDER, holder)
    return holder


def check_room(model: nn.Module, sites: Sequence[Site]) -> None:
    """Every site's holder can be made or reused: checked while planning, so placing cannot fail."""
    for site in sites:
        parent_path, _, child = site.key_path.rpartition(".")
        owner = getattr(model.get_submodule(parent_path), child, None)
        if owner is not None and not isinstance(owner, nn.Module):
            raise TargetError(f"cannot place adapters at {site.key_path!r}: the model has a non-module attribute there")
        holder = getattr(owner, HOLDER, None) if owner is not None else None
        if holder is not None and not isinstance(holder, nn.ModuleDict):
            raise TargetError(f"cannot place adapters at {site.key_path!r}: its {HOLDER!r} attribute is not ours")


def place_blocks(model: nn.Module, blocks: Sequence[tuple[Site, nn.Module]], name: str) -> None:
    """Register each block in the module tree under ``<site key path>.site_adapters.<name>``."""
    for site, block in blocks:
        holder = site_holder(model, site.key_path, create=True)
        assert holder is not None
        holder[name] = block.train(holder.training)  # eval model, eval block: its dropout stays off


def remove_blocks(model: nn.Module, sites: Sequence[Site], name: str) -> None:
    """Take ``name``'s blocks out again; holders and containers left empty go too."""
    for site in sites:
        holder = site_holder(model, site.key_path, create=False)
        if holder is not None and name in holder:
            del holder[name]
        if holder is not None and not len(holder):
            owner = model.get_submodule(site.key_path)
            delattr(owner, HOLDER)
            parent_path, _, child = site.key_path.rpartition(".")
            if isinstance(owner, SiteContainer) and not len(owner._modules):
                delattr(model.get_submodule(parent_path), child)


class SiteBlocks(ModelDelta):
    """An adapter's model-level part made of one block per site: its blocks live in the module tree
    under each site's ``site_adapters.<adapter>``, and its file keys are
    ``base_model.model.<site key path>.<file_part>.<block key>``."""

    file_part: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False

    def __init__(self, sites: Sequence[Site], blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.sites = {f"{site.layer}_{site.location}": site for site in sites}
        self.blocks = nn.ModuleDict(dict(zip(self.sites, blocks)))

    def tensors(self) -> dict[str, Tensor]:
        return {f"{FILE_PREFIX}{site.key_path}.{self.file_part}.{k}": t for key, site in self.sites.items()
                for k, t in self.blocks[key].state_dict(keep_vars=True).items()}

    def modules_changed(self) -> int:
        return len(self.sites)

    def place(self, model: nn.Module, name: str) -> None:
        place_blocks(model, [(site, self.blocks[key]) for key, site in self.sites.items()], name)

    def unplace(self, model: nn.Module, name: str) -> None:
        remove_blocks(model, list(self.sites.values()), name)
