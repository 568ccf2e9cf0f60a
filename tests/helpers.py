"""Shared test inputs (routing logits with controlled edge cases, expert weights, tolerances) and
the spawning of gloo ranks for the multi-process tests."""

from __future__ import annotations

import time
from pathlib import Path
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def assert_close_max(name, got, want, atol, rtol):
    """``max |got - want| <= atol + rtol * max |want|`` (robust for sums of many bf16 terms)."""
    assert got.shape == want.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    bound = atol + rtol * (want.float().abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def run_moe_lora(x, A, B, logits, dy, k, n, scaling, backend, normalize="true"):
    """``ak.moe_lora`` forward + backward of ``<y, dy>`` on fresh leaves, routed on the torch
    backend: ``(y, dx, dA, dB, d router_logits, routing)``."""
    import adamoe_kernels as ak

    x, A, B, logits = (t.detach().clone().requires_grad_() for t in (x, A, B, logits))
    rt = ak.route(logits, k, n, normalize, backend="torch")
    y = ak.moe_lora(x, A, B, rt, scaling, backend=backend)
    (y.float() * dy.float()).sum().backward()
    return y.detach(), x.grad, A.grad, B.grad, logits.grad, rt


def spawn_ranks(fn, world: int, init_file: str, args: tuple, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, world, init_file, *args)`` in ``world`` spawned processes and wait for them
    (killing them, and failing the test, after ``timeout_s``: a collective mismatch hangs)."""
    ctx = mp.start_processes(fn, args=(world, init_file, *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in {timeout_s} s (collective mismatch?)")


def init_gloo(rank: int, world: int, init_file: str, timeout_s: float = 60.0) -> None:
    """One thread per rank and a gloo process group through ``init_file`` (in a spawned rank)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


# ---- processes (Linux /proc) ------------------------------------------------------------------

def children_by_parent() -> dict[int, list[int]]:
    """``{ppid: [pid, ...]}`` of every process now running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts its workers in sessions of their own)."""
    children = children_by_parent()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def alive(pid: int) -> bool:
    """Is ``pid`` running (not gone, not a zombie)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
