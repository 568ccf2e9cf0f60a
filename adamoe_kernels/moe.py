"""Public expert-MLP API: ``moe_mlp`` over the grouped true assignments of a ``Routing``."""

from __future__ import annotations

import torch

from . import reference
from ._contract import Routing, check_moe_mlp_args, check_routing_values
from .ops.backend import resolve_backend


def moe_mlp(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
            routing: Routing, null_kind: str = "zero", *, backend: str | None = None,
            validate: bool = False) -> torch.Tensor:
    """Mixture of Mixtral-layout experts over the true assignments only.

    ``y_t = sum_{true j} w_tj * down_e (silu(gate_e x_t) * up_e x_t)`` with ``e = topk_ids[t, j]``
    and ``gate, up = (gate_up_proj[e] @ x_t).chunk(2)``; ``null_kind="identity"`` adds
    ``w_tj * x_t`` for each null slot. Null slots cost no GEMM FLOPs.

    Args:
        hidden: ``[T, H]`` float32/float16/bfloat16.
        gate_up_proj: ``[n, 2I, H]``, hidden's dtype and device.
        down_proj: ``[n, H, I]``, hidden's dtype and device.
        routing: from ``route`` (its ``topk_weights`` carry the gradient to the router logits).
        null_kind: ``"zero"`` or ``"identity"`` (needs ``normalize`` ``"all"`` or ``"none"``).
        backend: ``"triton"``, ``"cpu"`` or ``"torch"``; default as in ``ops.backend``.
        validate: also check that the Routing's tensors agree with each other on CUDA (a host
            sync; ``ADAMOE_DEBUG=1`` does it everywhere). On CPU it is always checked, so a
            Routing built by hand cannot make a kernel read out of bounds; on CUDA without the
            check the kernels clamp every index they read from it to its buffers.

    Returns:
        ``[T, H]`` in hidden's dtype. Differentiable w.r.t. hidden, both weights and
        ``routing.topk_weights``. Deterministic: the same inputs give bitwise the same output.
    """
    check_moe_mlp_args(hidden, gate_up_proj, down_proj, routing, null_kind)
    which = resolve_backend(backend, hidden.device)
    if which != "cpu":  # the C++ ops check the Routing themselves
        check_routing_values(routing, force=validate)
    if which == "torch":
        return reference.moe_mlp(hidden, gate_up_proj, down_proj, routing, null_kind)
    if which == "cpu":
        from .ops.cpu import moe_mlp_cpu as impl
    else:
        from .ops.grouped_mlp import moe_mlp_triton as impl
    return impl(hidden, gate_up_proj, down_proj, routing.topk_ids, routing.topk_weights,
                routing.sorted_slots, routing.expert_offsets, null_kind)
