"""Public LoRA-experts API: ``moe_lora``, the Mo-LoRA delta over the true assignments of a Routing.

For a frozen base linear ``W`` the layer output is ``W x + moe_lora(x, lora_A, lora_B, routing,
scaling)``: ``n`` LoRA experts (``A_e [r, in]``, ``B_e [out, r]``) and ``m`` null experts that
cost nothing.
"""

from __future__ import annotations

import os

import torch

from ._backend import resolve_backend
from ._validation import (
    SUPPORTED_FLOAT_DTYPES,
    check_routing,
    check_same_device,
    check_tensor,
)
from .routing import Routing

MAX_LORA_RANK = 256


def check_moe_lora_args(x, lora_A, lora_B, routing, scaling) -> None:
    """Metadata checks of ``moe_lora`` (free, always on): types, shapes, dtypes, devices, routing."""
    check_tensor("x", x, ndim=2, dtypes=SUPPORTED_FLOAT_DTYPES)
    check_tensor("lora_A", lora_A, ndim=3, dtypes=SUPPORTED_FLOAT_DTYPES)
    check_tensor("lora_B", lora_B, ndim=3, dtypes=SUPPORTED_FLOAT_DTYPES)
    for name, w in (("lora_A", lora_A), ("lora_B", lora_B)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}")
        check_same_device(name, w, "x", x)
    T, in_f = x.shape
    n, r, a_in = lora_A.shape
    if n < 1:
        raise ValueError(f"lora_A must hold at least one expert (shape[0] >= 1), got {n}")
    if r < 1 or r > MAX_LORA_RANK:
        raise ValueError(f"lora_A.shape[1] is the rank r, must be in [1, {MAX_LORA_RANK}], got {r}")
    if a_in != in_f:
        raise ValueError(f"lora_A.shape[2] ({a_in}) must equal x.shape[1] ({in_f})")
    if lora_B.shape[0] != n or lora_B.shape[2] != r or lora_B.shape[1] < 1:
        raise ValueError(
            f"lora_B must have shape (n, out, r) = ({n}, out, {r}) with out >= 1, "
            f"got {tuple(lora_B.shape)}"
        )
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    if scaling != scaling or scaling in (float("inf"), float("-inf")):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be an adamoe_kernels.Routing, got {type(routing).__name__}")
    if isinstance(routing.expert_counts, torch.Tensor) and routing.expert_counts.dim() == 1 \
            and routing.expert_counts.shape[0] != n:
        raise ValueError(
            f"routing has {routing.expert_counts.shape[0]} true experts (routing.expert_counts) "
            f"but lora_A has n = {n}"
        )
    if isinstance(routing.topk_ids, torch.Tensor) and routing.topk_ids.dim() == 2 \
            and routing.topk_ids.shape[0] != T:
        raise ValueError(
            f"routing.topk_ids has {routing.topk_ids.shape[0]} tokens but x has {T} rows"
        )
    check_routing(routing, T, n)
    check_same_device("routing.topk_ids", routing.topk_ids, "x", x)


def _requested_backend(backend: str | None) -> str | None:
    if backend is not None:
        return backend
    return os.environ.get("ADAMOE_BACKEND") or None


def moe_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, routing: Routing,
             scaling: float = 1.0, *, backend: str | None = None) -> torch.Tensor:
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
        backend: ``"triton"`` (the kernels), ``"torch"`` (the reference) or ``"cpu"`` (no C++
            kernel for LoRA experts: runs the reference on CPU tensors); default as in ``_backend``.

    Returns:
        ``[T, out]`` in x's dtype. Differentiable w.r.t. ``x``, ``lora_A``, ``lora_B`` and
        ``routing.topk_weights``. Deterministic: the same inputs give bitwise the same output.
    """
    check_moe_lora_args(x, lora_A, lora_B, routing, scaling)
    if _requested_backend(backend) == "cpu":
        if x.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {x.device}")
        which = "torch"
    else:
        which = resolve_backend(backend, x.device)
    if which in ("torch", "cpu"):
        from . import reference

        return reference.moe_lora(x, lora_A, lora_B, routing, scaling)
    from .ops.lora import moe_lora_triton

    return moe_lora_triton(x, lora_A, lora_B, routing.topk_ids, routing.topk_weights,
                           routing.sorted_slots, routing.expert_offsets, float(scaling))
