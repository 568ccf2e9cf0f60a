"""Integrations with model libraries (transformers v5): MoE conversion, Mo-LoRA, save/reload.

transformers is imported only when these functions run.
"""

from .hf_models import (DEFAULT_MO_LORA_TARGETS, SUPPORTED_MOE_MODELS, AdaMoESparseMoeBlock,
                        adamoe_experts_forward, add_mo_lora, convert_model, expert_load,
                        from_pretrained, register_experts_implementation)

__all__ = [
    "DEFAULT_MO_LORA_TARGETS",
    "SUPPORTED_MOE_MODELS",
    "AdaMoESparseMoeBlock",
    "adamoe_experts_forward",
    "add_mo_lora",
    "convert_model",
    "expert_load",
    "from_pretrained",
    "register_experts_implementation",
]
