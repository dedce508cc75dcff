"""One file per method; importing this package registers them all."""

from . import adalora, adalora_schedule, bitfit, bottleneck, bottleneck_format, dora, fusion, fusion_recipe, full, ia3, lora, lora_combine, lora_fused, lora_param, lora_qalora, lora_routed, mixlora, poly, prompt, prompt_hub_format, prompt_recipes, vera, xlora, xlora_recipe

__all__ = ["adalora", "adalora_schedule", "bitfit", "bottleneck", "bottleneck_format", "dora", "fusion", "fusion_recipe", "full", "ia3", "lora", "lora_combine", "lora_fused", "lora_param", "lora_qalora", "lora_routed", "mixlora", "poly", "prompt", "prompt_hub_format", "prompt_recipes", "vera", "xlora", "xlora_recipe"]
