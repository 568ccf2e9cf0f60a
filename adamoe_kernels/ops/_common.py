"""Pieces shared by the launchers: kernel configs, output allocation, dtype mapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .backend import interpreter_enabled


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one GEMM-like kernel, passed explicitly to the launcher.

    Tests pin one config (the interpreter accepts a single one); production picks per shape/device.
    ``BLOCK_M`` tiles rows (assignments or tokens), ``BLOCK_N`` output columns, ``BLOCK_K`` the
    reduction. ``GROUP_M`` groups row tiles for L2 reuse where a kernel supports it.
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 1

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def interpreting(t: torch.Tensor) -> bool:
    """True when a kernel on ``t`` runs under the Triton interpreter (CPU tensors)."""
    return t.device.type == "cpu" and interpreter_enabled()


def new_empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN/poison-filled when ``ADAMOE_POISON_EMPTY=1`` (tests),
    so an element a kernel forgot to write cannot pass silently."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("ADAMOE_POISON_EMPTY", "0") == "1":
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.fill_(-(2**30) if dtype in (torch.int32, torch.int64) else 0)
    return out
