"""adamoe-kernels: fast adaptive Mixture-of-Experts routing with null experts (AdaMoE).

Public API (names fixed by DESIGN.md)::

    r = route(router_logits, top_k, num_experts, normalize="true")
    y = moe_mlp(hidden, gate_up_proj, down_proj, r, null_kind="zero")
    loss = null_aware_aux_loss(router_logits, top_k, num_experts, attention_mask=None)
"""

# Layered as docs/architecture.md says: kernels/ -> ops/ -> this package's functional API
# (routing, moe, lora, losses; reference beside it) -> integrations/ -> training/.
from . import reference
from .integrations import (add_mo_lora, convert_model, expert_load, from_pretrained, load_control,
                           use_decode_linears)
from .integrations.load_control import LoadController, set_target_load, set_top_p
from .integrations.modules import AdaMoEBlock, AdaMoELoRALinear
from .lora import moe_lora
from .losses import AlphaSchedule, null_aware_aux_loss
from .moe import moe_mlp
from .ops.backend import BACKENDS, resolve_backend
from .routing import Routing, route
from .training import distributed

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "AdaMoEBlock",
    "AdaMoECallback",
    "AdaMoELoRALinear",
    "AlphaSchedule",
    "LoadController",
    "Routing",
    "add_mo_lora",
    "convert_model",
    "expert_load",
    "from_pretrained",
    "moe_lora",
    "moe_mlp",
    "null_aware_aux_loss",
    "reference",
    "resolve_backend",
    "route",
    "set_target_load",
    "set_top_p",
    "use_decode_linears",
]


def __getattr__(name):
    # transformers' Trainer machinery takes seconds to import: load the callback on first use
    if name == "AdaMoECallback":
        from .training.callbacks import AdaMoECallback

        return AdaMoECallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
