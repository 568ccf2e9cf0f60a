"""nn.Modules built on the public ops: an AdaMoE MoE block and a Mo-LoRA linear with null experts.

* ``AdaMoEBlock``: router ``Linear(H, n+m)`` + ``n`` Mixtral-layout experts (``gate_up_proj
  [n, 2I, H]``, ``down_proj [n, H, I]``), top-k over ``n+m``; null slots cost nothing.
* ``AdaMoELoRALinear``: a frozen ``nn.Linear`` plus a router and ``n`` LoRA experts (paper §3.5,
  Fig. 4 left): ``y = W x + b + sum_{true j} w_j * (alpha/r) * B_e A_e x``.
* ``AdaMoERouter``: the ``n+m`` row router (an ``nn.Linear`` without bias, so PEFT can target it).

Every layer here keeps the contract of ``ak.load_control``: a 0-d ``null_bias`` buffer (the
selection-only bias on the null logits, 0 = plain routing), a ``top_p`` attribute (``None`` = plain
top-k; else each token keeps the smallest prefix of its top-k reaching that probability mass, see
``ak.set_top_p``) and ``last_load`` (0-d float tensor, the load L of the last forward, set without
a host sync), plus ``last_router_logits`` for the null-aware loss.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._contract import SUPPORTED_FLOAT_DTYPES, check_int, check_layer_args, check_tensor
from ..lora import moe_lora
from ..losses import null_aware_aux_loss
from ..moe import moe_mlp
from ..routing import Routing, route
from .load_control import null_selection_bias

__all__ = ["AdaMoEBlock", "AdaMoELoRALinear", "AdaMoERouter", "route_with_null_bias"]


def route_with_null_bias(router_logits: torch.Tensor, top_k: int, num_experts: int,
                         normalize: str, null_bias: torch.Tensor | None,
                         backend: str | None = None, top_p: float | None = None) -> Routing:
    """``ak.route`` plus the load dial: ``null_bias`` is added to the null logits for selection,
    and ``top_p`` (``None``: off) truncates each token's top-k to the prefix reaching that mass.

    A zero bias routes exactly like no bias; on CPU (where reading it is free) it is then left out
    so the routing takes its plain path (no second, biased softmax). On other devices, and while
    ``torch.compile`` traces, the bias is always passed (no host sync, no data-dependent branch).
    Every backend (``triton``, the C++ ``cpu``, ``torch``) routes with the bias and top-p natively.
    """
    m = router_logits.shape[-1] - num_experts
    bias = None
    if m > 0 and null_bias is not None:
        if torch.compiler.is_compiling() or null_bias.device.type != "cpu":
            bias = null_selection_bias(num_experts, m, null_bias)
        else:
            value = null_bias.item()
            if value != 0:
                bias = _cpu_selection_bias(num_experts, m, value)
    return route(router_logits, top_k, num_experts, normalize, top_p=top_p, selection_bias=bias,
                 backend=backend)


@functools.lru_cache(maxsize=256)
def _cpu_selection_bias(num_experts: int, num_null_experts: int, value: float) -> torch.Tensor:
    """The CPU selection bias of a null bias ``value``, built once per value (the load dial
    holds a bias for many steps; building it took ~6 us of a ~30 us route at T=1). Keyed on the
    value read, so it cannot go stale; ``route`` only reads it."""
    return null_selection_bias(num_experts, num_null_experts,
                               torch.tensor(value, dtype=torch.float32))


class AdaMoERouter(nn.Linear):
    """Router over ``n`` true + ``m`` null experts: ``logits = x W^T``, ``W [n+m, H]`` (no bias).

    Rows ``0..n-1`` score the true experts, rows ``n..n+m-1`` the null ones. An ``nn.Linear``, so
    PEFT ``target_modules`` can put LoRA on it (the paper's ``gate`` + ``gate2``).
    """

    def __init__(self, hidden_size: int, num_experts: int, num_null_experts: int, *,
                 device=None, dtype=None):
        check_int("hidden_size", hidden_size, 1)
        check_int("num_experts", num_experts, 1)
        check_int("num_null_experts", num_null_experts, 0)
        super().__init__(hidden_size, num_experts + num_null_experts, bias=False, device=device,
                         dtype=dtype)
        self.num_experts = num_experts
        self.num_null_experts = num_null_experts

    @torch.no_grad()
    def init_from_true_rows(self, true_weight: torch.Tensor) -> None:
        """Paper §4.2.1 (``gate2``): true rows = ``true_weight [n, H]``; null row ``n+j`` is a copy
        of true row ``j % n`` (copied in segments, the last one truncated)."""
        n, m = self.num_experts, self.num_null_experts
        if tuple(true_weight.shape) != (n, self.in_features):
            raise ValueError(f"true_weight must have shape (n, H) = {(n, self.in_features)}, "
                             f"got {tuple(true_weight.shape)}")
        self.weight[:n].copy_(true_weight)
        if m:
            self.weight[n:].copy_(true_weight[torch.arange(m, device=true_weight.device) % n])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.reshape(-1, self.in_features), self.weight)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.in_features}, num_experts={self.num_experts}, "
                f"num_null_experts={self.num_null_experts}")


class _AdaMoELayer(nn.Module):
    """The routing state every AdaMoE layer shares (the load_control contract)."""

    def _init_routing_state(self, num_experts, num_null_experts, top_k, normalize, null_kind,
                            backend, device):
        self.num_experts, self.num_null_experts, self.top_k = num_experts, num_null_experts, top_k
        self.normalize, self.null_kind, self.backend = normalize, null_kind, backend
        self.top_p: float | None = None  # top-p routing (ak.set_top_p); None = plain top-k
        self.register_buffer("null_bias", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("last_load", torch.zeros((), dtype=torch.float32, device=device),
                             persistent=False)
        self.last_router_logits: torch.Tensor | None = None

    def _route(self, router_logits: torch.Tensor) -> Routing:
        routing = route_with_null_bias(router_logits, self.top_k, self.num_experts,
                                       self.normalize, self.null_bias, self.backend,
                                       top_p=getattr(self, "top_p", None))
        self.last_router_logits = router_logits
        load = routing.load()  # from int32 offsets: never requires grad, nothing to detach
        if torch.compiler.is_compiling():
            self.last_load = load
        else:  # a new value for the existing buffer, past nn.Module.__setattr__ (~3 us at T=1)
            self._buffers["last_load"] = load
        return routing

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Null-aware load-balancing loss (paper eq. 6, without α) of the last forward."""
        if self.last_router_logits is None:
            raise RuntimeError("aux_loss() needs a forward pass first")
        return null_aware_aux_loss(self.last_router_logits, self.top_k, self.num_experts,
                                   attention_mask)


class AdaMoEBlock(_AdaMoELayer):
    """MoE block with ``n`` true and ``m`` null experts, top-k over ``n+m`` (the AdaMoE layer).

    Args:
        hidden_size: ``H``.  intermediate_size: ``I`` of each expert.
        num_experts: ``n`` true experts.  num_null_experts: ``m`` null experts (0 = plain top-k).
        top_k: ``k`` experts per token, true and null together (``1 <= k <= n+m``).
        normalize: ``"true"`` (default, paper option 2), ``"all"`` or ``"none"`` (see ``ak.route``).
        null_kind: ``"zero"`` (default) or ``"identity"`` (needs ``normalize`` "all"/"none").
        backend: ``ak`` backend for routing and experts (default: the package default).

    Parameters: ``router`` (``AdaMoERouter``, ``weight [n+m, H]``), ``gate_up_proj [n, 2I, H]``,
    ``down_proj [n, H, I]`` (Mixtral layout). ``forward(x [..., H]) -> [..., H]``; after it,
    ``last_router_logits [T, n+m]`` and ``last_load`` (0-d, no host sync) hold the last routing
    and ``aux_loss()`` gives its null-aware loss.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 num_null_experts: int, top_k: int, normalize: str = "true",
                 null_kind: str = "zero", *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("intermediate_size", intermediate_size, 1)
        check_layer_args(num_experts, num_null_experts, top_k, normalize, null_kind)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self._init_routing_state(num_experts, num_null_experts, top_k, normalize, null_kind,
                                 backend, device)
        kw = {"device": device, "dtype": dtype}
        self.router = AdaMoERouter(hidden_size, num_experts, num_null_experts, **kw)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size,
                                                     hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size,
                                                  **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Router as ``nn.Linear``; each expert matrix ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
        self.router.reset_parameters()
        nn.init.uniform_(self.gate_up_proj, -self.hidden_size ** -0.5, self.hidden_size ** -0.5)
        nn.init.uniform_(self.down_proj, -self.intermediate_size ** -0.5,
                         self.intermediate_size ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dtypes=SUPPORTED_FLOAT_DTYPES)
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [..., {self.hidden_size}], got {tuple(x.shape)}")
        flat = x.reshape(-1, self.hidden_size)
        routing = self._route(self.router(flat))
        y = moe_mlp(flat, self.gate_up_proj, self.down_proj, routing, self.null_kind,
                    backend=self.backend)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, num_null_experts={self.num_null_experts}, "
                f"top_k={self.top_k}, normalize={self.normalize!r}, null_kind={self.null_kind!r}")


class AdaMoELoRALinear(nn.Linear, _AdaMoELayer):
    """A frozen ``nn.Linear`` with ``n`` routed LoRA experts and ``m`` null experts (Mo-LoRA).

    ``y = x W^T + b + sum_{true j} w_tj * (alpha / rank) * B_e A_e x`` with the top-k of ``n+m``
    from ``router`` (``AdaMoERouter``, randomly initialised as an ``nn.Linear``). LoRA init as in
    the LoRA paper: ``A`` Kaiming-uniform, ``B`` zeros, so the layer starts equal to the base.
    The base ``weight``/``bias`` keep their names (a checkpoint of the base model loads into it)
    and are frozen; ``router.weight``, ``lora_A [n, r, in]`` and ``lora_B [n, out, r]`` train.
    Null experts are zero maps (an identity LoRA expert is undefined when ``in != out``).
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 4,
                 num_null_experts: int = 0, top_k: int = 2, rank: int = 8, alpha: float = 16.0,
                 bias: bool = True, normalize: str = "true", *, backend: str | None = None,
                 device=None, dtype=None):
        check_layer_args(num_experts, num_null_experts, top_k, normalize)
        check_int("rank", rank, 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_routing_state(num_experts, num_null_experts, top_k, normalize, "zero",
                                 backend, device)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        kw = {"device": device, "dtype": dtype}
        self.router = AdaMoERouter(in_features, num_experts, num_null_experts, **kw)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, rank, **kw))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        self.router.reset_parameters()
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def reset_parameters(self) -> None:
        # nn.Linear.__init__ calls this before the LoRA parts exist: only the base is reset here.
        super().reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "AdaMoELoRALinear":
        """Wrap an existing ``nn.Linear``; its ``weight``/``bias`` Parameters are shared, frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta", dtype=w.dtype, **kwargs)
        layer.weight = w
        layer.bias = linear.bias
        # Materialise the new parts on the base's device, then initialise them.
        layer.router = AdaMoERouter(linear.in_features, layer.num_experts,
                                    layer.num_null_experts, device=w.device, dtype=w.dtype)
        layer.lora_A = nn.Parameter(torch.empty_like(layer.lora_A, device=w.device))
        layer.lora_B = nn.Parameter(torch.empty_like(layer.lora_B, device=w.device))
        for name in ("null_bias", "last_load"):
            setattr(layer, name, torch.zeros((), dtype=torch.float32, device=w.device))
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.reset_lora_parameters()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        routing = self._route(self.router(flat))
        delta = moe_lora(flat, self.lora_A, self.lora_B, routing, scaling=self.scaling,
                         backend=self.backend)
        return base + delta.reshape(base.shape).to(base.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, num_experts={self.num_experts}, "
                f"num_null_experts={self.num_null_experts}, top_k={self.top_k}, "
                f"rank={self.rank}, alpha={self.alpha}, normalize={self.normalize!r}")
