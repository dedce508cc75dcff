"""LoRA's part in hot-swapping (``dt.hotswap``): a rank slot padded with zeros and a scale held in a tensor.

``LoraDelta`` (and so DoRA's) inherits ``RankSlot``, which gives it ``hotswap``'s two capabilities
(the logic lives in ``FactorSlot``, which ``lora_param_slot.ParamRankSlot`` shares; the subclasses say
where the rank axis is):

- ``PaddedRank``: the change ``s * B @ A`` is the same when A gets zero rows and B zero columns (they
  add only zero products), so a slot of rank R takes an adapter of any rank r <= R: its factors go to
  the top-left and the rest is zero. ``pad_rank`` grows a slot; the adapter's own rank is kept
  (``true_rank``) so that a save writes rank-r factors, which peft reads.
- ``Retunable``: the scale ``s`` is a Python float, a constant to compiled code; after
  ``hold_settings_in_tensors`` it is a 0-dim buffer in the factors' dtype and device (moved by
  ``model.to`` with them), so a swap to another alpha or r changes a value, not the code. The float
  and the tensor give the same bits in every use (a multiplication in the factors' dtype, the fused
  kernel, DoRA's ``alpha=``), which is why ``scaling`` stays annotated as the float it stands for.

What may differ in a swap: the rank (``r``, ``rank_pattern``), the scale (``lora_alpha``,
``alpha_pattern``, ``use_rslora``), ``init_lora_weights`` (it acts only when an adapter is created) and
``lora_dropout`` between two non-zero rates (the rate is a constant of the dropout module: a compiled
model in training recompiles once for a new one). Nothing may when either adapter's init took part
of the base weight (PiSSA, OLoRA): the base then holds a residual that depends on those settings.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DeltaConfig
from ..errors import AdapterFileError
from ..layer import Delta
from .lora_init import takes_weight

RANK_FIELDS = frozenset({"r", "rank_pattern"})
SCALE_FIELDS = frozenset({"lora_alpha", "alpha_pattern", "use_rslora"})


def scale_for(r: int, alpha: float, rslora: bool) -> float:
    """LoRA's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@runtime_checkable
class FactorSettings(Protocol):
    """What a LoRA-family config says about the factors of one layer (``LoraConfig`` has all of it)."""

    use_rslora: bool
    lora_dropout: float
    init_lora_weights: bool | str

    def rank_and_alpha(self, key: str) -> tuple[int, float]: ...


_SETTINGS_CLASSES: set[type] = set()
"""Config classes seen to have ``FactorSettings`` (a protocol check inspects every member each time: a
swap asks it several times per layer)."""


def _settings(config: DeltaConfig) -> FactorSettings:
    if type(config) not in _SETTINGS_CLASSES:
        assert isinstance(config, FactorSettings), type(config).__name__
        _SETTINGS_CLASSES.add(type(config))
    return config  # type: ignore[return-value]


def _padded(t: Tensor, size: int, dim: int) -> Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size`` (one allocation, one copy)."""
    extra = size - t.shape[dim]
    return t if extra == 0 else F.pad(t, (0, 0) * (t.dim() - dim - 1) + (0, extra))


def hold_scaling_in_tensor(delta: nn.Module, like: Tensor) -> None:
    """Make ``delta.scaling`` a 0-dim buffer (dtype and device of ``like``) instead of a float, so a hot
    swap can change it in place without a compiled graph seeing a new constant."""
    if isinstance(delta.scaling, Tensor):
        return
    value = torch.tensor(delta.scaling, dtype=like.dtype, device=like.device)
    del delta.scaling  # a plain attribute until now; a buffer from here on
    delta.register_buffer("scaling", value, persistent=False)


class FactorSlot(Delta):
    """The hot-swap side shared by every LoRA delta ``s * B @ A`` whose factors are a rank slot: the
    checks of ``fit_rank``, padding, saving and scale retuning. A subclass says where the rank axis
    is (``_resized``, ``_rank_of``, ``_are_factors``), which config key its patterns match and how
    its rank errors read."""

    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    """A Python float, or after ``hold_settings_in_tensors`` a 0-dim tensor buffer standing for it."""
    true_rank: int | None = None
    """The adapter's rank when the factors hold more (zero) ranks than it; None: all of them."""

    @abstractmethod
    def slot_rank(self) -> int:
        """The rank the factors have room for."""

    @abstractmethod
    def _resized(self, a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """``a``, ``b`` (factors in this delta's layout) cut or zero-padded to rank ``rank``; a cut of a
        layer's factors is a view, so filling it fills them."""

    @abstractmethod
    def _rank_of(self, a: Tensor) -> int:
        """The rank of the factors whose A is ``a`` (``_are_factors`` holds)."""

    @abstractmethod
    def _are_factors(self, a: Tensor, b: Tensor) -> bool:
        """Whether ``a`` and ``b`` are this delta's factors at some rank (only the rank axis may differ)."""

    @abstractmethod
    def _rank_key(self, key: str) -> str:
        """The name the config's ``rank_pattern`` / ``alpha_pattern`` match for this delta at layer ``key``."""

    @abstractmethod
    def _rank_mismatch(self, rank: int, expected: int) -> str:
        """The error's words for factors of ``rank`` where the config gives ``expected``."""

    @abstractmethod
    def _no_room(self, rank: int, a: Tensor, b: Tensor) -> str:
        """The error's words for factors ``a``, ``b`` of ``rank``, more than the slot holds."""

    def adapter_rank(self) -> int:
        """The adapter's own rank: the slot's, less the zero ranks a padding added."""
        return self.slot_rank() if self.true_rank is None else self.true_rank

    def adapter_factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` cut to the adapter's own rank: a padded slot's zero ranks belong to no adapter."""
        rank = self.adapter_rank()
        return (self.A, self.B) if rank == self.slot_rank() else self._resized(self.A, self.B, rank)

    def _factor_names(self) -> tuple[str, str]:
        names = {id(t): n for n, t in self.tensors().items()}
        return names[id(self.A)], names[id(self.B)]

    def tensors_to_save(self) -> dict[str, Tensor]:
        """``tensors()`` with the factors cut to the adapter's rank: a padded slot saves the adapter it holds."""
        out = self.tensors()
        a, b = self._factor_names()
        out[a], out[b] = self.adapter_factors()
        return out

    @torch.no_grad()
    def pad_rank(self, target: int) -> None:
        slot = self.slot_rank()
        if target <= slot:
            return
        self.true_rank = slot if self.true_rank is None else self.true_rank
        a, b = self._resized(self.A, self.B, target)
        self.A = nn.Parameter(a, requires_grad=self.A.requires_grad)
        self.B = nn.Parameter(b, requires_grad=self.B.requires_grad)

    def fit_rank(self, values: Mapping[str, Tensor], config: DeltaConfig, key: str, where: str) -> dict[str, Tensor]:
        a_name, b_name = self._factor_names()
        out = dict(values)
        a, b = values.get(a_name), values.get(b_name)
        if a is None or b is None or not self._are_factors(a, b):
            return out  # not this delta's factors at any rank: the shape check reports them
        rank, slot = self._rank_of(a), self.slot_rank()
        expected = _settings(config).rank_and_alpha(self._rank_key(key))[0]
        if rank != expected:
            raise AdapterFileError(f"{where}: {self._rank_mismatch(rank, expected)} (r, rank_pattern): the folder is "
                                   "inconsistent. The model was left unchanged.")
        if rank > slot:
            raise AdapterFileError(
                f"{where}: {self._no_room(rank, a, b)}. Fix: after loading the first adapter and before compiling, "
                f"call dt.prepare_hotswap(model, target_rank={rank}) or larger (the largest rank you will swap in). "
                "The model was left unchanged.")
        out[a_name], out[b_name] = self._resized(a, b, slot)
        return out

    def retunable_fields(self, slot: DeltaConfig, new: DeltaConfig) -> frozenset[str]:
        return RANK_FIELDS | SCALE_FIELDS | {"init_lora_weights"}

    def hold_settings_in_tensors(self) -> None:
        hold_scaling_in_tensor(self, self.A)

    def retune(self, config: DeltaConfig, key: str) -> None:
        settings = _settings(config)
        rank, alpha = settings.rank_and_alpha(self._rank_key(key))
        scale = scale_for(rank, alpha, settings.use_rslora)
        if isinstance(self.scaling, Tensor):
            self.scaling.fill_(scale)
        else:
            self.scaling = scale
        self.true_rank = None if rank == self.slot_rank() else rank


class RankSlot(FactorSlot):
    """The hot-swap side of a delta ``s * B @ A`` with ``A: (r, in, *kernel)`` and ``B: (out, r, 1, ...)``."""

    dropout: nn.Module

    def slot_rank(self) -> int:
        return self.A.shape[0]

    def _resized(self, a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        if rank < a.shape[0]:
            return a[:rank], b[:, :rank]
        return _padded(a, rank, 0), _padded(b, rank, 1)

    def _rank_of(self, a: Tensor) -> int:
        return a.shape[0]

    def _are_factors(self, a: Tensor, b: Tensor) -> bool:
        return (a.dim() == self.A.dim() and b.dim() == self.B.dim() and a.shape[1:] == self.A.shape[1:]
                and b.shape[0] == self.B.shape[0] and b.shape[2:] == self.B.shape[2:] and b.shape[1] == a.shape[0])

    def _rank_key(self, key: str) -> str:
        return key

    def _rank_mismatch(self, rank: int, expected: int) -> str:
        return f"the factors have rank {rank} but the folder's config gives this layer rank {expected}"

    def _no_room(self, rank: int, a: Tensor, b: Tensor) -> str:
        a_name, b_name = self._factor_names()
        return (f"the adapter has rank {rank} here ({a_name} {tuple(a.shape)}, {b_name} {tuple(b.shape)}) but the "
                f"slot has room for rank {self.slot_rank()} ({tuple(self.A.shape)}, {tuple(self.B.shape)})")

    def retunable_fields(self, slot: DeltaConfig, new: DeltaConfig) -> frozenset[str]:
        old_settings, new_settings = _settings(slot), _settings(new)
        if takes_weight(old_settings.init_lora_weights) or takes_weight(new_settings.init_lora_weights):
            return frozenset()  # the base holds a residual that depends on the settings
        same_dropout_kind = (old_settings.lora_dropout > 0) == (new_settings.lora_dropout > 0)
        return super().retunable_fields(slot, new) | ({"lora_dropout"} if same_dropout_kind else set())

    def retune(self, config: DeltaConfig, key: str) -> None:
        super().retune(config, key)
        if isinstance(self.dropout, nn.Dropout):
            self.dropout.p = float(_settings(config).lora_dropout)


if TYPE_CHECKING:  # the class declares hotswap's capabilities; mypy checks the signatures here
    from ..hotswap import PaddedRank, Retunable

    def _declares(slot: FactorSlot) -> tuple[PaddedRank, Retunable]:
        return slot, slot
