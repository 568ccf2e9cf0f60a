"""Layer 3 of the package (see ``docs/architecture.md``): models built on the functional API.

* ``modules.py``: the ``nn.Module`` layers (``AdaMoEBlock``, ``AdaMoELoRALinear``, ``AdaMoERouter``);
* ``load_control.py``: the load dial and top-p on those layers (``ak.load_control``);
* ``hf_models.py``: transformers v5 (MoE conversion, Mo-LoRA, the ``"adamoe"`` experts
  implementation, save/reload). transformers is imported only when these functions run.
* ``decode.py``: a CPU decode step's dense layers on the C++ small-M kernel (``use_decode_linears``).
"""

from .decode import use_decode_linears
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
    "use_decode_linears",
]
