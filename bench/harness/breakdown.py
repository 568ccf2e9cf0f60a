"""Per-op breakdown of one layer call, from the profiler: where the time goes at each load.

On CPU the C++ backend marks each phase with a ``torch.profiler`` scope (``adamoe_cpu::*`` in
``csrc/grouped_mlp.cpp`` and ``csrc/amx_gemm.cpp``); the phases below are the innermost scopes, so
they do not overlap, and ``other`` is the rest of the call (Python, validation, autograd, small
torch ops). On CUDA the phases are the Triton kernels' device times by kernel name. Profiling adds
a little overhead, so the wall-clock figures of a benchmark come from its timed runs, and the
breakdown says how a call divides.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

# CPU phases of a layer call: (profiler event, phase), in the order a call runs them.
CPU_PHASES = (
    ("aten::linear", "router"),
    ("adamoe::route_cpu", "route"),
    ("adamoe_cpu::groups", "groups"),
    ("adamoe_cpu::fwd_gather", "gather"),
    ("adamoe_cpu::fwd_gate_up", "gate_up"),
    ("adamoe_cpu::fwd_swiglu", "swiglu"),
    ("adamoe_cpu::fwd_down", "down"),
    ("adamoe_cpu::fwd_combine", "combine"),
    ("adamoe_cpu::bwd_gather", "bwd_gather"),
    ("adamoe_cpu::bwd_dy_down", "bwd_dy_down"),
    ("adamoe_cpu::bwd_silu", "bwd_swiglu"),
    ("adamoe_cpu::bwd_grad_down", "bwd_grad_down"),
    ("adamoe_cpu::bwd_grad_gate_up", "bwd_grad_gate_up"),
    ("adamoe_cpu::bwd_dx", "bwd_dx"),
    ("adamoe_cpu::bwd_combine", "bwd_combine"),
    ("adamoe::route_backward_cpu", "route_backward"),
)

# CUDA phases: (kernel-name substring, phase).
CUDA_PHASES = (
    ("route_topk_kernel", "route"),
    ("group_offsets_kernel", "route"),
    ("scatter_slots_kernel", "route"),
    ("route_backward_kernel", "route_backward"),
    ("grouped_gemm_kernel", "grouped_gemm"),
    ("combine_slots_kernel", "combine"),
    ("swiglu_backward_kernel", "bwd_swiglu"),
    ("grouped_weight_grad_kernel", "bwd_weight_grads"),
    ("slot_weight_grad_kernel", "bwd_weight_grads"),
)

PHASE_ORDER = tuple(dict.fromkeys([p for _, p in CPU_PHASES] + [p for _, p in CUDA_PHASES]
                                  + ["other"]))


def op_breakdown(fn: Callable[[], object], device: torch.device, *, reps: int = 3,
                 grad_to_none: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
    """``{phase: ms per call}`` of ``fn`` (plus ``"other"``) over ``reps`` profiled calls.

    ``grad_to_none``: tensors whose ``.grad`` is reset before every call, as in the timings.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm: first-call allocations do not count
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            for t in grad_to_none or ():
                t.grad = None
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / reps
    phases: dict[str, float] = {}
    for ev in prof.key_averages():
        if device.type == "cuda":
            phase = next((p for sub, p in CUDA_PHASES if sub in ev.key), None)
            ms = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0)) / 1e3 / reps
        else:
            phase = next((p for name, p in CPU_PHASES if ev.key == name), None)
            ms = ev.cpu_time_total / 1e3 / reps
        if phase is not None and ms > 0:
            phases[phase] = phases.get(phase, 0.0) + ms
    phases["other"] = max(wall_ms - sum(phases.values()), 0.0)
    return {p: round(phases[p], 4) for p in PHASE_ORDER if p in phases}
