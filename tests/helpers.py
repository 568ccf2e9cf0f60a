"""Shared test inputs: routing logits with controlled edge cases, expert weights, tolerances."""

from __future__ import annotations

import torch

# (T, n, m, k, normalize): T=1, T not a multiple of any block, k = n+m, n+m not a power of two,
# m = 0 (plain Mixtral routing).
ROUTING_CASES = [
    (1, 4, 2, 3, "true"),
    (37, 4, 4, 3, "true"),
    (16, 5, 3, 8, "all"),
    (20, 6, 1, 7, "true"),
    (24, 3, 5, 4, "none"),
    (17, 8, 0, 2, "true"),
]


def make_logits(T, n, m, *, device="cpu", dtype=torch.float32, empty_expert=None,
                null_bias=0.0, seed=0):
    """Random router logits; ``empty_expert`` gets -30 (never picked), null columns ``+null_bias``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, n + m, generator=g)
    if empty_expert is not None:
        logits[:, empty_expert] -= 30.0
    logits[:, n:] += null_bias
    return logits.to(device=device, dtype=dtype)


def make_experts(n, H, I, *, device="cpu", dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(n, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(n, H, I, generator=g) / I**0.5
    return gate_up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype)


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def assert_close(actual, expected, atol, rtol, name=""):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")
