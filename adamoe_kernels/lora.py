"""Public LoRA-experts API: ``moe_lora``, the Mo-LoRA delta over the true assignments of a Routing.

For a frozen base linear ``W`` the layer output is ``W x + moe_lora(x, lora_A, lora_B, routing,
scaling)``: ``n`` LoRA experts (``A_e [r, in]``, ``B_e [out, r]``) and ``m`` null experts that
cost nothing.
"""

from __future__ import annotations

import torch

from . import reference
from ._contract import Routing, check_moe_lora_args, check_routing_values
from .ops.backend import resolve_backend


def moe_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, routing: Routing,
             scaling: float = 1.0, *, backend: str | None = None,
            validate: bool = False) -> torch.Tensor:
    """Mixture of LoRA experts over the true assignments only (null experts add zero).

    ``delta_t = sum_{true j} w_tj * scaling * B_e A_e x_t`` with ``e = topk_ids[t, j] < n``.
    Null slots cost no FLOPs; a token routed only to null experts gets an exact zero.

    Args:
        x: ``[T, in]`` float32/float16/bfloat16 (the input of the frozen base linear).
        lora_A: ``[n, r, in]``, x's dtype and device (``1 <= r <= 256``).
        lora_B: ``[n, out, r]``, x's dtype and device.
        routing: from ``route`` over ``n`` true experts (its ``topk_weights`` carry the gradient
            to the router logits).
        scaling: the LoRA scale (``lora_alpha / r``).
        backend: ``"triton"`` (the kernels), ``"cpu"`` (the C++ kernels, CPU tensors) or
            ``"torch"`` (the reference); default as in ``ops.backend``.
        validate: also check that the Routing's tensors agree with each other on CUDA (a host
            sync; ``ADAMOE_DEBUG=1`` does it everywhere). On CPU it is always checked, so a
            Routing built by hand cannot make a kernel read out of bounds; on CUDA without the
            check the kernels clamp every index they read from it to its buffers.

    Returns:
        ``[T, out]`` in x's dtype. Differentiable w.r.t. ``x``, ``lora_A``, ``lora_B`` and
        ``routing.topk_weights``. Deterministic: the same inputs give bitwise the same output.
    """
    check_moe_lora_args(x, lora_A, lora_B, routing, scaling)
    which = resolve_backend(backend, x.device)
    if which != "cpu":  # the C++ ops check the Routing themselves
        check_routing_values(routing, force=validate)
    if which == "torch":
        return reference.moe_lora(x, lora_A, lora_B, routing, scaling)
    if which == "cpu":
        from .ops.cpu import moe_lora_cpu as impl
    else:
        from .ops.lora import moe_lora_triton as impl
    return impl(x, lora_A, lora_B, routing.topk_ids, routing.topk_weights, routing.sorted_slots,
                routing.expert_offsets, float(scaling))
