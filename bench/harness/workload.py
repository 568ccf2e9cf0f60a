"""The MoE problem the benchmarks time: the paper's AdaMoE settings, FLOPs, the load dial."""

from __future__ import annotations

from typing import Callable

import torch

import adamoe_kernels as ak

# The AdaMoE settings of the paper (Mixtral-8x7B, n = 8): (label, m null experts, top-k).
TOP2 = ("top2", 0, 2)
ADAMOE_CONFIGS = (("m8k3", 8, 3), ("m16k4", 16, 4))
PAPER_LOADS = (2.0, 1.66, 1.0, 0.5, 0.25)


def moe_flops(rows: float, hidden: int, intermediate: int) -> float:
    """Forward FLOPs of the expert MLP over ``rows`` true assignments: ``2*rows*H*2I + 2*rows*I*H``.

    The backward costs twice the forward (a gradient w.r.t. inputs and one w.r.t. weights per GEMM).
    """
    return 2.0 * rows * hidden * 2 * intermediate + 2.0 * rows * intermediate * hidden


def null_bias_vector(num_experts: int, num_null: int, bias: float, device=None) -> torch.Tensor:
    """``[n+m]`` float32: 0 on the true experts, ``bias`` on the null ones (added to router logits)."""
    v = torch.zeros(num_experts + num_null, dtype=torch.float32, device=device)
    v[num_experts:] = bias
    return v


def routing_load(router_logits: torch.Tensor, top_k: int, num_experts: int, num_null: int,
                 bias: float, backend: str = "torch") -> float:
    """The load L reached when ``bias`` is added to the null columns of ``router_logits``.

    With ``normalize="true"`` a shift of the null logits changes only *which* experts are chosen:
    the true weights are ratios of true probabilities, so they are unchanged. Hence this plain
    logit bias is the load dial (the same as ``route(..., selection_bias=...)``) on every backend.
    """
    logits = router_logits.float() + null_bias_vector(num_experts, num_null, bias, router_logits.device)
    return float(ak.route(logits, top_k, num_experts, backend=backend).load())


def calibrate_null_bias(load_of_bias: Callable[[float], float], target: float, *, tol: float = 0.01,
                        lo: float = -8.0, hi: float = 8.0, max_iter: int = 60) -> dict:
    """Bisect a scalar null-expert bias so that the load hits ``target``.

    ``load_of_bias(b)`` must be non-increasing in ``b`` (a larger null bias picks more null experts).
    The bracket grows until it contains the target. The load is a step function (a multiple of
    ``1/T``), so the search stops at ``|L - target| <= tol`` or returns the closest load it saw.
    Returns ``{"bias", "load", "target", "iterations", "hit"}``.
    """
    best = None

    def probe(b):
        nonlocal best
        L = load_of_bias(b)
        if best is None or abs(L - target) < abs(best[1] - target):
            best = (b, L)
        return L

    it = 0
    while probe(lo) < target and it < 8:  # L(lo) must be >= target
        lo, it = lo * 2 - 1, it + 1
    it = 0
    while probe(hi) > target and it < 8:  # L(hi) must be <= target
        hi, it = hi * 2 + 1, it + 1
    iters = 0
    while iters < max_iter and abs(best[1] - target) > tol:
        mid = 0.5 * (lo + hi)
        if probe(mid) > target:
            lo = mid
        else:
            hi = mid
        iters += 1
    b, L = best
    return {"bias": b, "load": L, "target": target, "iterations": iters, "hit": abs(L - target) <= tol}


def load_tolerance(tokens: int) -> float:
    """How close a calibrated load must come to its target: 1% of a token-expert, or 2/T."""
    return max(0.01, 2.0 / tokens)
