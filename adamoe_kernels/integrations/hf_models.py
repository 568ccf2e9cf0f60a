"""transformers (v5) integration: null experts for Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE,
Mo-LoRA for dense models (Llama, any model with ``q_proj`` ... ``down_proj`` Linears), reload.

How a model is changed (``convert_model``), keeping every parameter name of the original:

* each sparse MoE block becomes an ``AdaMoESparseMoeBlock`` holding the model's own ``gate``
  (now an ``AdaMoERouter`` with ``n+m`` rows, the new rows copied from the trained rows in
  segments as the paper's ``gate2``), its own ``experts`` module (the 3-D ``gate_up_proj`` /
  ``down_proj`` Parameters stay where they were, so optimizers and PEFT ``target_parameters``
  keep working) and, for Qwen2-MoE, its shared expert and shared-expert gate;
* the block routes with ``ak.route`` and calls ``experts(...)``, which transformers dispatches
  through its ``ExpertsInterface`` to the ``"adamoe"`` implementation registered here
  (``ak.moe_mlp``: null slots cost nothing). PEFT's expert LoRA wraps exactly that call;
* the model's class becomes a subclass ``AdaMoE<Class>`` whose ``forward`` gives the null-aware
  loss in ``.aux_loss`` (``ak.null_aware_aux_loss``, added to ``.loss`` times
  ``router_aux_loss_coef`` when ``labels`` are given, as transformers does) and the ``[T, n+m]``
  router logits in ``.router_logits``;
* ``config.adamoe`` records what was done (and the ``top_p`` set by ``ak.set_top_p``), so
  ``save_pretrained`` + ``ak.from_pretrained`` rebuilds the same model (the subclass re-applies the change in ``__init__``, then transformers
  loads the weights as usual).

transformers is imported lazily: ``import adamoe_kernels`` works without it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .._contract import NORMALIZE_MODES, Routing, check_choice, check_int, check_layer_args
from ..losses import null_aware_aux_loss
from ..moe import moe_mlp
from ..reference import group_slots
from .modules import AdaMoELoRALinear, AdaMoERouter, _AdaMoELayer

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

EXPERTS_IMPLEMENTATION = "adamoe"
DEFAULT_MO_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj")


@dataclass(frozen=True)
class _MoESpec:
    block: str                              # class name of the model's sparse MoE block
    num_experts_attr: str                   # config attribute holding n
    normalizes_topk: Callable[[object], bool]  # does the model renormalise its top-k weights?
    jitter_attr: str | None = None          # config attribute of Mixtral's router jitter


SUPPORTED_MOE_MODELS = {
    "MixtralForCausalLM": _MoESpec("MixtralSparseMoeBlock", "num_local_experts",
                                   lambda c: True, "router_jitter_noise"),
    "Qwen2MoeForCausalLM": _MoESpec("Qwen2MoeSparseMoeBlock", "num_experts",
                                    lambda c: bool(c.norm_topk_prob)),
    "Qwen3MoeForCausalLM": _MoESpec("Qwen3MoeSparseMoeBlock", "num_experts",
                                    lambda c: bool(c.norm_topk_prob)),
    "OlmoeForCausalLM": _MoESpec("OlmoeSparseMoeBlock", "num_experts",
                                 lambda c: bool(c.norm_topk_prob)),
}


# ---- experts implementation -------------------------------------------------------------------

def routing_from_topk(top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      num_experts: int) -> Routing:
    """A ``Routing`` from transformers' own router outputs (ids in ``[0, n)``, weights as given)."""
    counts, offsets, slots = group_slots(top_k_index, num_experts)
    return Routing(topk_ids=top_k_index.int(), topk_weights=top_k_weights.float(),
                   expert_counts=counts, expert_offsets=offsets, sorted_slots=slots,
                   normalize="none")


def adamoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor, routing: Routing | None = None,
                           null_kind: str = "zero", backend: str | None = None) -> torch.Tensor:
    """The ``"adamoe"`` experts implementation of transformers' ``ExpertsInterface``.

    ``self`` is a transformers ``*Experts`` module (``gate_up_proj [n, 2I, H]``,
    ``down_proj [n, H, I]``, SiLU). A converted block passes its ``Routing`` (null slots
    included); called by an unconverted model (``experts_implementation="adamoe"``), the routing
    is built from the model's own top-k (that grouping uses ``bincount``: a host sync on CUDA).
    """
    if routing is None:
        routing = routing_from_topk(top_k_index, top_k_weights, self.num_experts)
    if getattr(self, "is_transposed", False) or getattr(self, "has_bias", False) or \
            not getattr(self, "has_gate", True):
        raise ValueError(f"experts_implementation='adamoe' needs gate_up_proj [n, 2I, H] without "
                         f"bias ({type(self).__name__} is transposed, biased or ungated)")
    return moe_mlp(hidden_states, self.gate_up_proj, self.down_proj, routing, null_kind,
                   backend=backend)


def register_experts_implementation() -> None:
    """Register ``"adamoe"`` in transformers' ``ExpertsInterface`` (idempotent). After it,
    ``from_pretrained(..., experts_implementation="adamoe")`` runs any supported MoE model's
    experts on ``ak.moe_mlp`` with the model's own routing."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, adamoe_experts_forward)


# ---- the converted MoE block ------------------------------------------------------------------

class AdaMoESparseMoeBlock(_AdaMoELayer):
    """A transformers sparse MoE block with ``m`` null experts, on this package's kernels.

    Holds the original submodules under their original names: ``gate`` (an ``AdaMoERouter``,
    ``weight [n+m, H]``), ``experts`` (the model's ``*Experts`` module) and optionally
    ``shared_expert`` / ``shared_expert_gate`` (Qwen2-MoE:
    ``y += sigmoid(shared_expert_gate(x)) * shared_expert(x)``).
    """

    def __init__(self, gate: AdaMoERouter, experts: nn.Module, *, top_k: int,
                 normalize: str = "true", null_kind: str = "zero", jitter_noise: float = 0.0,
                 shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None, backend: str | None = None):
        super().__init__()
        self._init_routing_state(gate.num_experts, gate.num_null_experts, top_k, normalize,
                                 null_kind, backend, gate.weight.device)
        self.jitter_noise = float(jitter_noise)
        self.gate = gate
        self.experts = experts
        if shared_expert is not None:
            self.shared_expert = shared_expert
        if shared_expert_gate is not None:
            self.shared_expert_gate = shared_expert_gate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        routing = self._route(self.gate(x))
        y = self._run_experts(x, routing)
        shared = getattr(self, "shared_expert", None)
        if shared is not None:
            out = shared(x)
            shared_gate = getattr(self, "shared_expert_gate", None)
            if shared_gate is not None:
                out = torch.sigmoid(shared_gate(x)) * out
            y = y + out
        return y.reshape(shape)

    def _run_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The routed experts on ``x [T, H]``: transformers' ``ExpertsInterface`` (``"adamoe"``).
        Expert parallelism (``ak.distributed.shard_experts``) overrides this step only."""
        return self.experts(x, routing.topk_ids, routing.topk_weights, routing=routing,
                            null_kind=self.null_kind, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, num_null_experts={self.num_null_experts}, "
                f"top_k={self.top_k}, normalize={self.normalize!r}, null_kind={self.null_kind!r}")


# ---- model class with the null-aware aux loss -------------------------------------------------

_CLASS_CACHE: dict[type, type] = {}


def adamoe_layers(model: nn.Module) -> list[_AdaMoELayer]:
    """The AdaMoE layers of ``model`` (converted MoE blocks or Mo-LoRA linears), in module order."""
    return [mod for mod in model.modules() if isinstance(mod, _AdaMoELayer)]


def _adamoe_forward(self, base, arg_names, base_takes_router_flag, args, kwargs):
    if len(args) > len(arg_names):
        raise TypeError(f"forward() takes at most {len(arg_names)} positional arguments")
    for name, value in zip(arg_names, args):
        if name in kwargs:
            raise TypeError(f"forward() got multiple values for argument {name!r}")
        kwargs[name] = value
    want_router = kwargs.pop("output_router_logits", None)
    if want_router is None:
        want_router = bool(getattr(self.config, "output_router_logits", False))
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if base_takes_router_flag:
        kwargs["output_router_logits"] = False  # transformers' own loss assumes n router columns
    out = base.forward(self, return_dict=True, **kwargs)
    if want_router:
        info = self.config.adamoe
        router_logits = tuple(layer.last_router_logits for layer in adamoe_layers(self))
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2
                and mask.numel() == router_logits[0].shape[0]):
            mask = None  # e.g. a decoding step: the mask covers the cache, not these tokens
        aux = null_aware_aux_loss(router_logits, info["top_k"], info["num_experts"], mask)
        if "aux_loss" not in getattr(type(out), "__dataclass_fields__", {}):
            from transformers.modeling_outputs import MoeCausalLMOutputWithPast

            out = MoeCausalLMOutputWithPast(**dict(out.items()))
        if kwargs.get("labels") is not None and out.get("loss") is not None:
            out["loss"] = out["loss"] + self.router_aux_loss_coef * aux.to(out["loss"].device)
        out["aux_loss"] = aux
        out["router_logits"] = router_logits
    return out if return_dict else out.to_tuple()


def adamoe_model_class(base: type) -> type:
    """``AdaMoE<base>``: ``base`` whose ``__init__`` re-applies ``config.adamoe`` (so
    ``from_pretrained`` rebuilds a converted model) and whose ``forward`` gives the null-aware
    ``aux_loss``. Cached per base class."""
    if getattr(base, "_adamoe_base_class", None) is not None:
        return base
    if base in _CLASS_CACHE:
        return _CLASS_CACHE[base]
    signature = inspect.signature(base.forward)
    params = list(signature.parameters.values())[1:]
    arg_names = tuple(p.name for p in params
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    takes_flag = "output_router_logits" in signature.parameters

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        info = getattr(config, "adamoe", None)
        if info:
            _apply_adamoe(self, info)

    @functools.wraps(base.forward)
    def forward(self, *args, **kwargs):
        return _adamoe_forward(self, base, arg_names, takes_flag, args, kwargs)

    namespace = {"__init__": __init__, "forward": forward, "_adamoe_base_class": base,
                 "__module__": __name__, "__doc__": base.__doc__}
    # transformers decides some capabilities by reading the source of the class's module.
    for probe in ("_can_set_experts_implementation", "_can_set_attn_implementation"):
        fn = getattr(base, probe, None)
        if callable(fn):
            try:
                namespace[f"{probe}_cached_value"] = bool(fn())
            except Exception:  # pragma: no cover - depends on transformers internals
                pass
    cls = type(f"AdaMoE{base.__name__}", (base,), namespace)
    _CLASS_CACHE[base] = cls
    return cls


def _swap_class(model: nn.Module) -> None:
    cls = adamoe_model_class(type(model))
    if type(model) is not cls:
        model.__class__ = cls
    try:  # transformers keys its output-capture registry by class name
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

        _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)
    except Exception:  # pragma: no cover - depends on transformers internals
        pass


def _apply_adamoe(model: nn.Module, info: dict) -> None:
    kind = info.get("kind")
    if kind == "moe":
        _convert_blocks(model, info)
    elif kind == "mo_lora":
        _insert_mo_lora(model, info)
    else:
        raise ValueError(f"config.adamoe['kind'] must be 'moe' or 'mo_lora', got {kind!r}")
    _set_experts_implementation(model, kind)


def _set_experts_implementation(model: nn.Module, kind: str) -> None:
    if kind != "moe":
        return
    register_experts_implementation()
    try:
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    except Exception:  # pragma: no cover - fall back to the config attribute itself
        model.config._experts_implementation_internal = EXPERTS_IMPLEMENTATION
    for module in model.modules():  # experts modules may hold their own (sub)config
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(module, "gate_up_proj") and \
                getattr(cfg, "_experts_implementation", None) != EXPERTS_IMPLEMENTATION:
            cfg._experts_implementation_internal = EXPERTS_IMPLEMENTATION


# ---- convert_model ----------------------------------------------------------------------------

def _moe_spec(model: nn.Module) -> tuple[str, _MoESpec]:
    for klass in type(model).__mro__:
        if klass.__name__ in SUPPORTED_MOE_MODELS:
            return klass.__name__, SUPPORTED_MOE_MODELS[klass.__name__]
    names = ", ".join(SUPPORTED_MOE_MODELS)
    raise ValueError(f"convert_model supports {names}; got {type(model).__name__}. For a dense "
                     "model (e.g. LlamaForCausalLM) use ak.add_mo_lora")


def _convert_blocks(model: nn.Module, info: dict) -> None:
    _, spec = _moe_spec(model)
    config = model.config
    m, k = info["num_null_experts"], info["top_k"]
    jitter = float(getattr(config, spec.jitter_attr, 0.0) or 0.0) if spec.jitter_attr else 0.0
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod).__name__ == spec.block or isinstance(mod, AdaMoESparseMoeBlock)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no {spec.block} module to convert")
    for name, block in targets:
        old_gate, experts = block.gate, block.experts
        n = experts.num_experts
        true_rows = old_gate.weight[:n]
        gate = AdaMoERouter(true_rows.shape[1], n, m, device=true_rows.device,
                            dtype=true_rows.dtype)
        gate.init_from_true_rows(true_rows.detach())
        gate.weight.requires_grad_(old_gate.weight.requires_grad)
        new = AdaMoESparseMoeBlock(
            gate, experts, top_k=k, normalize=info["normalize"], null_kind=info["null_kind"],
            jitter_noise=jitter, shared_expert=getattr(block, "shared_expert", None),
            shared_expert_gate=getattr(block, "shared_expert_gate", None),
            backend=info.get("backend"))
        new.top_p = info.get("top_p")  # ak.set_top_p records it in config.adamoe
        new.train(block.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def convert_model(model: nn.Module, num_null_experts: int = 0, top_k: int | None = None,
                  normalize: str | None = None, null_kind: str = "zero", *,
                  backend: str | None = None) -> nn.Module:
    """Give a transformers MoE model ``m`` null experts, top-``k`` routing over ``n+m`` (in place).

    Supported: ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``,
    ``OlmoeForCausalLM`` (others raise ``ValueError``). Each router grows to ``n+m`` rows, null
    row ``n+j`` a copy of trained row ``j % n`` (paper §4.2.1, ``gate2`` copied in segments);
    the experts keep their Parameters and run on ``ak.moe_mlp`` (null slots cost nothing).
    ``model(..., output_router_logits=True).aux_loss`` is the null-aware loss (eq. 6) with the new
    ``k`` and ``n``, added to ``.loss`` times ``config.router_aux_loss_coef`` when labels are given.

    Args:
        model: a supported ``*ForCausalLM``; converting a converted model starts again from its
            true router rows.
        num_null_experts: ``m >= 0``.
        top_k: ``k`` over ``n+m`` (default: the model's own ``num_experts_per_tok``).
        normalize: ``"true"``, ``"all"`` or ``"none"`` (see ``ak.route``). Default: the model's
            own convention, ``"true"`` where it renormalises its top-k (Mixtral, Qwen/OLMoE with
            ``norm_topk_prob=True``) else ``"none"``, so ``m=0`` with the model's ``k`` changes
            no output.
        null_kind: ``"zero"`` or ``"identity"``.
        backend: ``ak`` backend for routing and experts (default: the package default).

    Returns:
        ``model`` itself, its class now ``AdaMoE<Class>``; ``config.adamoe`` records ``m``,
        ``k``, ``normalize`` and ``null_kind`` so ``save_pretrained`` + ``ak.from_pretrained``
        reload it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    _, spec = _moe_spec(model)
    config = model.config
    if getattr(config, "adamoe", None) and config.adamoe.get("kind") == "mo_lora" and \
            adamoe_layers(model):
        raise ValueError("model already has Mo-LoRA layers (ak.add_mo_lora); convert_model "
                         "cannot be combined with them")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"convert_model needs SiLU experts (Mixtral layout); config.hidden_act "
                         f"is {act!r}")
    n = int(getattr(config, spec.num_experts_attr))
    own_k = int(config.num_experts_per_tok)
    top_k = own_k if top_k is None else top_k
    if normalize is None:
        normalize = "true" if spec.normalizes_topk(config) else "none"
    check_layer_args(n, num_null_experts, top_k, normalize, null_kind)
    info = {"kind": "moe", "num_experts": n, "num_null_experts": num_null_experts,
            "top_k": top_k, "normalize": normalize, "null_kind": null_kind,
            "original_top_k": own_k}
    _convert_blocks(model, {**info, "backend": backend})
    _set_experts_implementation(model, "moe")
    config.adamoe = info
    _swap_class(model)
    return model


# ---- add_mo_lora ------------------------------------------------------------------------------

def _insert_mo_lora(model: nn.Module, info: dict) -> None:
    targets = set(info["target_modules"])
    found = [(name, mod) for name, mod in model.named_modules()
             if name.rpartition(".")[2] in targets and isinstance(mod, nn.Linear)
             and not isinstance(mod, AdaMoELoRALinear)]
    if not found:
        raise ValueError(f"no nn.Linear named one of {sorted(targets)} in "
                         f"{type(model).__name__}: check target_modules")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in found:
        layer = AdaMoELoRALinear.from_linear(
            linear, num_experts=info["num_experts"], num_null_experts=info["num_null_experts"],
            top_k=info["top_k"], rank=info["rank"], alpha=info["alpha"],
            normalize=info["normalize"], backend=info.get("backend"))
        layer.top_p = info.get("top_p")  # ak.set_top_p records it in config.adamoe
        layer.train(linear.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    if not hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = info["router_aux_loss_coef"]


def add_mo_lora(model: nn.Module, num_experts: int = 4, num_null_experts: int = 0,
                top_k: int = 2, rank: int = 8,
                target_modules=DEFAULT_MO_LORA_TARGETS, alpha: float = 16.0,
                normalize: str = "true", *, router_aux_loss_coef: float = 0.01,
                backend: str | None = None) -> nn.Module:
    """Mo-LoRA with null experts (paper §4.1): each target ``nn.Linear`` gets a router and ``n``
    LoRA experts (``AdaMoELoRALinear``), top-``k`` over ``n`` true + ``m`` null experts (in place).

    Works on ``LlamaForCausalLM`` and any model whose Linears carry the ``target_modules`` names.
    Every existing parameter is frozen; the routers (random init) and LoRA experts (``A``
    Kaiming-uniform, ``B`` zero: the model's outputs are unchanged at first) train.
    ``model(..., output_router_logits=True)`` gives the null-aware loss over all Mo-LoRA layers in
    ``.aux_loss`` (added to ``.loss`` times ``router_aux_loss_coef`` when labels are given).
    ``config.adamoe`` records the settings so ``save_pretrained`` + ``ak.from_pretrained`` reload.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    if adamoe_layers(model):
        raise ValueError("model already has AdaMoE layers (convert_model / add_mo_lora)")
    check_int("num_experts", num_experts, 1)
    check_int("num_null_experts", num_null_experts, 0)
    check_int("top_k", top_k, 1, num_experts + num_null_experts)
    check_int("rank", rank, 1)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    info = {"kind": "mo_lora", "num_experts": num_experts, "num_null_experts": num_null_experts,
            "top_k": top_k, "rank": rank, "alpha": float(alpha), "normalize": normalize,
            "null_kind": "zero", "target_modules": list(target_modules),
            "router_aux_loss_coef": float(router_aux_loss_coef)}
    _insert_mo_lora(model, {**info, "backend": backend})
    model.config.adamoe = info
    _swap_class(model)
    return model


# ---- reload and reporting ---------------------------------------------------------------------

def from_pretrained(path_or_name, *, backend: str | None = None, **kwargs) -> nn.Module:
    """Load what ``save_pretrained`` wrote after ``convert_model`` or ``add_mo_lora``.

    Reads ``config.adamoe``, builds ``AdaMoE<Class>`` (the transformers class for the config's
    ``model_type``) and lets transformers load the weights into it. ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...); ``backend`` sets the ``ak`` backend.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hub_keys = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code",
                "subfolder")
    config = kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(
            path_or_name, **{key: kwargs[key] for key in hub_keys if key in kwargs})
    info = getattr(config, "adamoe", None)
    if not info:
        raise ValueError(f"{path_or_name} has no config.adamoe: it was not saved after "
                         "ak.convert_model / ak.add_mo_lora (load it with transformers and "
                         "convert it)")
    base = AutoModelForCausalLM._model_mapping[type(config)]
    model = adamoe_model_class(base).from_pretrained(path_or_name, config=config, **kwargs)
    if info.get("kind") == "mo_lora":  # loading may hand back fresh (trainable) Parameters
        for param in model.parameters():
            param.requires_grad_(False)
        for layer in adamoe_layers(model):
            for param in (layer.router.weight, layer.lora_A, layer.lora_B):
                param.requires_grad_(True)
    _set_experts_implementation(model, info.get("kind"))
    for layer in adamoe_layers(model):
        layer.backend = backend
    return model


def expert_load(model: nn.Module) -> list[float]:
    """Load L (mean true experts per token) of each AdaMoE layer in the last forward, in module
    order (one per MoE layer; one per Mo-LoRA linear). Reads the values: a host sync on GPU."""
    layers = adamoe_layers(model)
    if not layers:
        raise ValueError("model has no AdaMoE layers: convert it with ak.convert_model or "
                         "ak.add_mo_lora first")
    if any(layer.last_router_logits is None for layer in layers):
        raise ValueError("expert_load(model) reports the last forward: run the model first")
    return [float(layer.last_load) for layer in layers]
