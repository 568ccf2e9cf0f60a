"""The load dial: a per-layer bias on the null logits, used only to *select* experts.

Every AdaMoE layer of this package (``AdaMoEBlock``, converted transformers MoE blocks, Mo-LoRA
linears) holds a 0-d buffer ``null_bias`` and routes with
``selection_bias = [0]*n + [null_bias]*m``: raising it makes null experts win more top-k places,
so the load ``L`` (mean true experts per token) falls, while the routing *weights* still come from
the unbiased probabilities. Two ways to set it:

* inference: ``set_target_load(model, L, batch)`` calibrates each layer's bias by bisection on a
  batch so that the layer's load is ``L``;
* training: ``LoadController(L).update(model)`` after each optimizer step nudges each layer's
  bias by ``rate * sign(L_layer - L)``, in the spirit of auxiliary-loss-free balancing, holding
  the load near ``L`` without a loss term.

``reset_null_bias(model)`` sets every bias back to 0 (the model's own routing).

A second, calibration-free dial: ``set_top_p(model, p)`` makes every layer route with top-p over
its top-k (``ak.route(..., top_p=p)``): a token keeps only the smallest prefix of its top-k whose
probability mass (null experts included) reaches ``p``, so confident tokens use fewer experts.
``set_top_p(model, None)`` restores plain top-k. Both dials combine (the bias picks the top-k,
top-p then truncates it).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .._contract import check_top_p

BIAS_LIMIT = 30.0  # |null_bias| beyond this changes no routing decision in fp32 softmax


def null_selection_bias(num_experts: int, num_null_experts: int,
                        null_bias: torch.Tensor) -> torch.Tensor:
    """``[n+m]`` selection bias: 0 for the true experts, ``null_bias`` for the null ones."""
    zeros = torch.zeros(num_experts, dtype=torch.float32, device=null_bias.device)
    return torch.cat([zeros, null_bias.float().reshape(1).expand(num_null_experts)])


def adamoe_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The layers of ``model`` that carry a load dial (a ``null_bias`` buffer and ``last_load``)."""
    for module in model.modules():
        if isinstance(getattr(module, "null_bias", None), torch.Tensor) and \
                hasattr(module, "last_load"):
            yield module


def _layers_or_raise(model: nn.Module) -> list:
    layers = list(adamoe_layers(model))
    if not layers:
        raise ValueError("model has no AdaMoE layers (modules with a null_bias buffer): convert "
                         "it with ak.convert_model / ak.add_mo_lora or use ak.AdaMoEBlock")
    return layers


def _check_target(target_load: float) -> None:
    if isinstance(target_load, bool) or not isinstance(target_load, (int, float)):
        raise TypeError(f"target_load must be a float, got {type(target_load).__name__}")
    if target_load < 0:
        raise ValueError(f"target_load must be >= 0, got {target_load}")


@torch.no_grad()
def set_target_load(model: nn.Module, target_load: float, *inputs, iters: int = 20,
                    passes: int = 3, tol: float = 0.02, **kwargs) -> list[float]:
    """Calibrate every layer's ``null_bias`` so its load on ``model(*inputs, **kwargs)`` is
    ``target_load``.

    Bisection on all layers at once (each layer's load falls as its own bias rises). A layer's
    input moves while the layers before it are calibrated, so up to ``passes`` passes re-bracket
    the layers still off by more than ``tol`` around their current bias. Returns the per-layer
    loads reached; a layer that cannot reach the target (a target above k, or no null experts)
    ends at the nearest reachable bias.
    """
    _check_target(target_load)
    layers = _layers_or_raise(model)
    was_training = model.training
    model.eval()

    def run(biases):
        for layer, b in zip(layers, biases):
            layer.null_bias.fill_(b)
        model(*inputs, **kwargs)
        return [float(layer.last_load) for layer in layers]

    try:
        lo, hi = [-BIAS_LIMIT] * len(layers), [BIAS_LIMIT] * len(layers)
        for _ in range(passes):
            for _ in range(iters):
                mid = [(a + b) / 2 for a, b in zip(lo, hi)]
                for i, load in enumerate(run(mid)):
                    if load > target_load:
                        lo[i] = mid[i]
                    else:
                        hi[i] = mid[i]
            biases = [(a + b) / 2 for a, b in zip(lo, hi)]
            loads = run(biases)
            off = [abs(load - target_load) > tol for load in loads]
            if not any(off):
                break
            width = 2.0
            lo = [max(b - width, -BIAS_LIMIT) if o else b for b, o in zip(biases, off)]
            hi = [min(b + width, BIAS_LIMIT) if o else b for b, o in zip(biases, off)]
    finally:
        model.train(was_training)
    return loads


@torch.no_grad()
def reset_null_bias(model: nn.Module) -> None:
    """Set every layer's ``null_bias`` back to 0: the routing the model was trained with."""
    for layer in _layers_or_raise(model):
        layer.null_bias.zero_()


def set_top_p(model: nn.Module, top_p: float | None) -> nn.Module:
    """Route every AdaMoE layer of ``model`` with top-p over its top-k; ``None`` turns it off.

    Each token keeps the smallest prefix of its top-k (in descending probability) whose
    probability mass reaches ``top_p``; null experts count in the mass, at most ``k`` slots are
    kept, and the dropped slots cost nothing, like null slots (``ak.route(..., top_p=...)``).
    Lower ``top_p`` means a lower load; ``top_p=1.0`` keeps all k slots (the same routing as
    ``None``). With ``normalize="true"`` the kept true experts' weights are renormalised over the
    kept true slots.

    Backends: ``triton``, the C++ ``cpu`` backend and ``torch`` all route with top-p (and the
    ``null_bias`` dial) natively, in their own routing.

    On a model from ``ak.convert_model`` / ``ak.add_mo_lora`` the value is also recorded in
    ``config.adamoe["top_p"]``, so ``save_pretrained`` + ``ak.from_pretrained`` keep it.

    Raises ``TypeError``/``ValueError`` for a ``top_p`` outside ``(0, 1]``, for a model without
    AdaMoE layers, and for a layer that has a load dial but no ``top_p`` attribute (a custom
    layer that does not implement top-p). Returns ``model``.
    """
    check_top_p(top_p)
    layers = _layers_or_raise(model)
    unsupported = [type(layer).__name__ for layer in layers if not hasattr(layer, "top_p")]
    if unsupported:
        raise TypeError(f"set_top_p: these layers have no top_p attribute (they do not route "
                        f"with top-p): {sorted(set(unsupported))}")
    value = None if top_p is None else float(top_p)
    for layer in layers:
        layer.top_p = value
    info = getattr(getattr(model, "config", None), "adamoe", None)
    if isinstance(info, dict):
        info = dict(info)
        if value is None:
            info.pop("top_p", None)
        else:
            info["top_p"] = value
        model.config.adamoe = info
    return model


class LoadController:
    """Holds each layer's load near ``target_load`` during training without a loss term.

    After each step: ``null_bias += rate * sign(last_load - target_load)`` per layer (the bias is
    not a parameter: the optimizer never sees it). Use it with or instead of the null-aware loss::

        controller = ak.LoadController(target_load=1.5, rate=0.01)
        for batch in loader:
            loss = model(**batch).loss
            loss.backward(); opt.step(); opt.zero_grad()
            controller.update(model)
    """

    def __init__(self, target_load: float, rate: float = 0.01):
        _check_target(target_load)
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.target_load = float(target_load)
        self.rate = float(rate)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One bias step per layer from the load of its last forward (no host sync)."""
        for layer in _layers_or_raise(model):
            step = torch.sign(layer.last_load.float() - self.target_load) * self.rate
            layer.null_bias.add_(step.to(layer.null_bias.dtype)).clamp_(-BIAS_LIMIT, BIAS_LIMIT)
