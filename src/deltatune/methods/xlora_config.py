"""``XLoraConfig``: X-LoRA's settings, with peft's field names and defaults (see ``xlora``).

Two additions to peft's fields, both written to ``adapter_config.json`` only when set, so a folder
without them stays peft's: ``hidden_size=0`` means "the model's" (settled when the adapter is
attached, so the file always holds the number), and ``modules_to_save`` names modules copied,
trained in full and saved with the classifier, as for other methods (a classification task's
new head, which the frozen experts do not provide).

Experts travel with the adapter: ``dt.save`` copies each expert's ``adapter_config.json`` and
``adapter_model.safetensors`` into ``xlora_experts/<name>/`` inside the saved folder and writes
``adapters`` as those relative paths, so the folder names no expert by a path of the machine it was
saved on and loads wherever it is moved or copied. Reading a folder (``io.read_config``) makes a relative path
that lies inside it absolute again; any other path is kept as written (peft reads a relative one
from the working directory, so peft loads a deltatune folder when run from inside it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..config import DeltaConfig, check_modules_to_save, saved_with_heads
from ..state import check_name
from ..values import is_int, is_positive_int


EXPERTS_FOLDER = "xlora_experts"
"""Where a saved X-LoRA adapter keeps its copies of the experts, one subfolder per expert name."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class XLoraConfig(DeltaConfig):
    """X-LoRA settings, with peft's field names and defaults (``adapters``: name -> LoRA folder)."""

    peft_type: ClassVar[str] = "XLORA"

    hidden_size: int = 0
    """The model's hidden size (the classifier's input); 0: read from the model when attached."""
    adapters: Mapping[str, str] = dataclasses.field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    modules_to_save: tuple[str, ...] | None = None
    """Modules trained in full and saved with the adapter (deltatune's addition; peft's X-LoRA has none)."""

    def validate(self) -> None:
        super().validate()
        self.check(is_int(self.hidden_size) and self.hidden_size >= 0, "hidden_size",
                   "hidden_size must be a positive integer (or 0: the model's)", "pass e.g. hidden_size=16, or 0")
        for field in ("xlora_depth", "xlora_size"):
            value = getattr(self, field)
            self.check(is_positive_int(value), field,
                       f"{field} must be a positive integer", f"pass e.g. {field}=16")
        self.check(isinstance(self.adapters, Mapping) and len(self.adapters) > 0
                   and all(isinstance(k, str) and isinstance(v, str) for k, v in self.adapters.items()), "adapters",
                   "adapters must map expert names to LoRA adapter folders", "pass adapters={'a': 'path/to/lora'}")
        n = len(self.adapters) if isinstance(self.adapters, Mapping) else 0
        self.check(self.top_k_lora is None or (is_int(self.top_k_lora) and 1 <= self.top_k_lora <= n),
                   "top_k_lora", f"top_k_lora must be None or between 1 and the {n} experts", "pass e.g. top_k_lora=1")
        self.check(not self.enable_softmax_topk or self.top_k_lora is not None, "enable_softmax_topk",
                   "enable_softmax_topk needs top_k_lora", "set top_k_lora or enable_softmax_topk=False")
        for field in ("xlora_dropout_p", "softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
            value = getattr(self, field)
            self.check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), field,
                       f"{field} must be a finite number", f"pass e.g. {field}=1.0")
        self.check(0 <= self.xlora_dropout_p < 1, "xlora_dropout_p", "must be in [0, 1)", "pass e.g. 0.2")
        self.check(self.softmax_temperature > 0, "softmax_temperature", "must be positive", "pass e.g. 1.0")
        check_modules_to_save(self, self.modules_to_save)

    def saved_module_names(self) -> tuple[str, ...]:
        """``modules_to_save`` plus the heads the task type trains, as for the other methods."""
        return saved_with_heads(self.modules_to_save, self.task_type)

    def located(self, folder: Path) -> XLoraConfig:
        """Expert paths relative to ``folder`` (what a save writes) become paths that work from anywhere."""
        inside = {name: str((folder / path).resolve()) for name, path in self.adapters.items()
                  if not Path(path).is_absolute() and (folder / path).is_dir()}
        return self.replace(adapters={**self.adapters, **inside}) if inside else self

    def saved_folders(self) -> dict[str, Path]:
        """Each expert's folder, copied by a save to ``xlora_experts/<name>`` (the name checked: it becomes a folder)."""
        return {f"{EXPERTS_FOLDER}/{check_name(name)}": Path(path) for name, path in self.adapters.items()}

    def to_peft_dict(self) -> dict[str, Any]:
        out = {**super().to_peft_dict(), "adapters": {name: f"{EXPERTS_FOLDER}/{name}" for name in self.adapters}}
        if not self.saved_module_names():
            del out["modules_to_save"]  # peft's XLoraConfig has no such field
        return out
