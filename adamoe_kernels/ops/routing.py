"""Launchers and ``torch.library`` registration of the routing kernels.

``adamoe::route`` runs three kernels and never synchronises with the host:
1. ``route_topk_kernel`` (grid over token blocks): softmax, top-k, weights, per-block group counts
   and in-block ranks;
2. ``group_offsets_kernel`` (one program): prefix sums over blocks -> counts, offsets;
3. ``scatter_slots_kernel`` (grid over token blocks): the stable counting-sort scatter.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..kernels.routing import (
    group_offsets_kernel,
    route_backward_kernel,
    route_topk_kernel,
    scatter_slots_kernel,
)
from ._common import interpreting, new_empty

NORMALIZE_CODES = {"true": 0, "all": 1, "none": 2}


def _route_block_t(num_cols: int, x: torch.Tensor) -> int:
    """Tokens per routing program: keep the [BLOCK_T, BLOCK_E] tiles around 4K elements."""
    if interpreting(x):
        return 32
    return max(16, min(128, 4096 // triton.next_power_of_2(num_cols + 1)))


@torch.library.custom_op("adamoe::route", mutates_args=())
def route_op(router_logits: torch.Tensor, top_k: int, num_experts: int, normalize: str,
             top_p: Optional[float] = None, selection_bias: Optional[torch.Tensor] = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(topk_weights, topk_ids, expert_counts, expert_offsets, sorted_slots)``."""
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    T, E = logits.shape
    n, k, dev = num_experts, top_k, logits.device
    ids = new_empty((T, k), torch.int32, dev)
    weights = new_empty((T, k), torch.float32, dev)
    counts = new_empty((n,), torch.int32, dev)
    offsets = new_empty((n + 1,), torch.int32, dev)
    slots = new_empty((T * k,), torch.int32, dev)
    if T == 0:
        return weights, ids, counts.zero_(), offsets.zero_(), slots
    block_t = _route_block_t(E, logits)
    num_blocks = triton.cdiv(T, block_t)
    ranks = torch.empty((T, k), dtype=torch.int32, device=dev)
    block_counts = torch.empty((num_blocks, n + 1), dtype=torch.int32, device=dev)
    block_start = torch.empty_like(block_counts)
    BLOCK_E = triton.next_power_of_2(E + 1)
    BLOCK_K = triton.next_power_of_2(k)
    bias = logits if selection_bias is None else selection_bias.float().contiguous()
    route_topk_kernel[(num_blocks,)](
        logits, bias, ids, weights, ranks, block_counts, T, logits.stride(0),
        2.0 if top_p is None else float(top_p),
        N_TRUE=n, E=E, K=k, NORMALIZE=NORMALIZE_CODES[normalize],
        HAS_BIAS=selection_bias is not None, USE_TOP_P=top_p is not None,
        BLOCK_T=block_t, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K,
    )
    group_offsets_kernel[(1,)](
        block_counts, block_start, counts, offsets, num_blocks,
        N_TRUE=n, BLOCK_B=64, BLOCK_G=triton.next_power_of_2(n + 1),
    )
    scatter_slots_kernel[(num_blocks,)](
        ids, ranks, block_start, offsets, slots, T,
        N_TRUE=n, K=k, BLOCK_T=block_t, BLOCK_K=BLOCK_K,
    )
    return weights, ids, counts, offsets, slots


@route_op.register_fake
def _(router_logits, top_k, num_experts, normalize, top_p=None, selection_bias=None):
    T = router_logits.shape[0]
    new = router_logits.new_empty
    return (new((T, top_k), dtype=torch.float32), new((T, top_k), dtype=torch.int32),
            new((num_experts,), dtype=torch.int32), new((num_experts + 1,), dtype=torch.int32),
            new((T * top_k,), dtype=torch.int32))


@torch.library.custom_op("adamoe::route_backward", mutates_args=())
def route_backward_op(grad_weights: torch.Tensor, router_logits: torch.Tensor,
                      topk_ids: torch.Tensor, num_experts: int, normalize: str) -> torch.Tensor:
    """d router_logits from d topk_weights (probabilities are recomputed, nothing [T, n+m] saved)."""
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    T, E = logits.shape
    k = topk_ids.shape[1]
    grad_logits = new_empty((T, E), logits.dtype, logits.device)
    if T == 0:
        return grad_logits
    block_t = _route_block_t(E, logits)
    route_backward_kernel[(triton.cdiv(T, block_t),)](
        grad_weights.contiguous(), logits, topk_ids, grad_logits, T, logits.stride(0),
        N_TRUE=num_experts, E=E, K=k, NORMALIZE=NORMALIZE_CODES[normalize],
        BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(E + 1),
        BLOCK_K=triton.next_power_of_2(k),
    )
    return grad_logits


@route_backward_op.register_fake
def _(grad_weights, router_logits, topk_ids, num_experts, normalize):
    return torch.empty_like(router_logits, memory_format=torch.contiguous_format)


def _route_setup_context(ctx, inputs, output):
    router_logits, _, num_experts, normalize = inputs[:4]
    ctx.save_for_backward(router_logits, output[1])
    ctx.num_experts, ctx.normalize = num_experts, normalize


def _route_backward(ctx, g_weights, g_ids, g_counts, g_offsets, g_slots):
    router_logits, ids = ctx.saved_tensors
    if g_weights is None:
        return None, None, None, None, None, None
    grad = torch.ops.adamoe.route_backward(g_weights, router_logits, ids, ctx.num_experts,
                                           ctx.normalize)
    return grad, None, None, None, None, None


route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def route_triton(router_logits, top_k, num_experts, normalize, top_p=None, selection_bias=None):
    """Public-API entry: the ``adamoe::route`` op (CUDA, or CPU under the Triton interpreter).

    Returns ``(topk_ids, topk_weights, expert_counts, expert_offsets, sorted_slots)``.
    """
    weights, ids, counts, offsets, slots = torch.ops.adamoe.route(
        router_logits, top_k, num_experts, normalize, top_p, selection_bias)
    return ids, weights, counts, offsets, slots
