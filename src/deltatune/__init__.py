"""deltatune: parameter-efficient fine-tuning ("delta tuning") for PyTorch models.

Train a small set of parameters on top of a frozen model, save only those in peft's format,
and merge, combine and switch them. The public API is what this module exports.
"""

from . import methods as _methods  # registers every method
from .adapters import (
    active_adapters,
    adapter_names,
    adapter_parameters,
    delete_adapter,
    disabled,
    set_active,
    summary,
    trainable_parameters,
)
from .compose import Average, BatchSplit, Composition, Fuse, Parallel, Route, Stack, Sum
from .config import DeltaConfig, TargetedConfig
from .errors import AdapterError, AdapterFileError, ConfigError, DeltatuneError, TargetError
from .combine import combine
from .inject import attach
from .intrinsic import IntrinsicSubspace, d90, enter_subspace, subspace_of
from .hotswap import prepare_hotswap
from .io import hotswap, load, save
from .routing import routing
from .spectrum import AdapterSpectrum, LayerSimilarity, LayerSpectrum, spectrum, subspace_similarity
from .merge import merge, unload, unmerge
from .methods.adalora import AdaLoraConfig
from .methods.adalora_schedule import AdaLoraScheduler
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from .methods.full import FullConfig
from .methods.fusion import FusionConfig, StaticFusionConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.lora_loftq import LoftQConfig
from .methods.loraplus import loraplus_optimizer
from .methods.mixlora import MixLoraConfig
from .methods.poly import PolyConfig, poly_tasks
from .methods.xlora import XLoraConfig
from .methods.prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .methods.vera import VeraConfig
from . import quant
from .errors import QuantError
from .fast import accelerate, restore, retain_freed_memory
from .quant import QuantConfig, quantize

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdaLoraScheduler",
    "AdapterError",
    "AdapterFileError",
    "AdapterSpectrum",
    "Average",
    "BatchSplit",
    "BitFitConfig",
    "BnConfig",
    "Composition",
    "ConfigError",
    "DeltaConfig",
    "DeltatuneError",
    "DoubleSeqBnConfig",
    "FullConfig",
    "Fuse",
    "FusionConfig",
    "IA3Config",
    "IntrinsicSubspace",
    "LayerSimilarity",
    "LayerSpectrum",
    "LoftQConfig",
    "LoraConfig",
    "MixLoraConfig",
    "ParBnConfig",
    "Parallel",
    "PolyConfig",
    "XLoraConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "QuantConfig",
    "QuantError",
    "Route",
    "SeqBnConfig",
    "StaticFusionConfig",
    "Stack",
    "Sum",
    "TargetError",
    "TargetedConfig",
    "VeraConfig",
    "accelerate",
    "active_adapters",
    "adapter_names",
    "adapter_parameters",
    "attach",
    "combine",
    "d90",
    "delete_adapter",
    "disabled",
    "enter_subspace",
    "hotswap",
    "load",
    "loraplus_optimizer",
    "merge",
    "poly_tasks",
    "prepare_hotswap",
    "quant",
    "quantize",
    "restore",
    "retain_freed_memory",
    "routing",
    "save",
    "set_active",
    "spectrum",
    "subspace_of",
    "summary",
    "subspace_similarity",
    "trainable_parameters",
    "unload",
    "unmerge",
]
del _methods
