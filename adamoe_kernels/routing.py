"""Public routing API: ``route`` and the ``Routing`` it returns (defined in ``_contract``)."""

from __future__ import annotations

import torch

from . import reference
from ._contract import Routing, check_route_args, check_route_values
from .ops.backend import resolve_backend

__all__ = ["Routing", "route"]


def route(router_logits: torch.Tensor, top_k: int, num_experts: int, normalize: str = "true",
          *, top_p: float | None = None, selection_bias: torch.Tensor | None = None,
          backend: str | None = None, check_finite: bool | None = None) -> Routing:
    """Route every token to its top-k of ``n+m`` experts and group the true assignments.

    Args:
        router_logits: ``[T, n+m]`` float32/float16/bfloat16 logits; columns ``n..n+m-1`` are the
            null experts.
        top_k: ``k``, experts picked per token (true and null together), ``1 <= k <= n+m``.
        num_experts: ``n``, the number of true experts.
        normalize: ``"true"`` (weights sum to 1 over the true slots; all-null tokens get zeros),
            ``"all"`` (over all k slots) or ``"none"`` (raw softmax probabilities).
        top_p: keep, per token, the smallest prefix of its top-k whose probability mass reaches
            ``top_p`` (null experts count in the mass; at most k slots). Dropped slots get the id
            ``n+m`` and weight 0 and count as null slots everywhere.
        selection_bias: ``[n+m]`` float added to the logits only to *choose* the experts (the
            weights use the unbiased probabilities): the load dial (a bias on the null columns)
            and auxiliary-loss-free balancing.
        backend: ``"triton"``, ``"cpu"`` or ``"torch"``; default as in ``ops.backend``. Every
            backend does top-p and the selection bias natively (triton and cpu in their fused
            routing).
        check_finite: also check for NaN/Inf on CUDA (costs a host sync). CPU always checks.

    Returns:
        A ``Routing``. No host synchronisation happens on the triton and cpu backends.
    """
    check_route_args(router_logits, top_k, num_experts, normalize, check_finite, top_p=top_p,
                     selection_bias=selection_bias, check_values=False)
    which = resolve_backend(backend, router_logits.device)
    if which != "cpu":  # the C++ routing rejects NaN/Inf itself, in the pass that reads them
        check_route_values(router_logits, selection_bias, check_finite)
    if which == "torch":
        return reference.route(router_logits, top_k, num_experts, normalize, top_p=top_p,
                               selection_bias=selection_bias)
    if which == "cpu":
        from .ops.cpu import route_cpu

        outs = route_cpu(router_logits, top_k, num_experts, normalize, top_p, selection_bias)
    else:
        from .ops.routing import route_triton

        outs = route_triton(router_logits, top_k, num_experts, normalize, top_p, selection_bias)
    ids, weights, counts, offsets, slots = outs
    return Routing(topk_ids=ids, topk_weights=weights, expert_counts=counts,
                   expert_offsets=offsets, sorted_slots=slots, normalize=normalize)
