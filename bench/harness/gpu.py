"""CUDA-side checks the benchmarks share: no host sync, CUDA-graph capture, what the device and its
clocks are, the memory/matrix ceilings, and the resources of the Triton kernels compiled so far.

Every function works (and says why it did nothing) on a machine without CUDA.
"""

from __future__ import annotations

import subprocess
from typing import Callable

import torch

SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "clocks.max.mem", "power.draw", "power.limit", "temperature.gpu", "memory.used",
              "memory.total")


def no_host_sync(step: Callable[[], object], device: torch.device) -> dict:
    """Run ``step`` once to warm up (compiles synchronise), then again under
    ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation raises."""
    if device.type != "cuda":
        return {"checked": False, "reason": f"needs CUDA (device is {device.type})"}
    step()  # compile first
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        result = {"checked": True, "host_sync": False}
    except RuntimeError as e:
        result = {"checked": True, "host_sync": True, "message": str(e)[:500]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return result


def graph_replay(fn: Callable[[], torch.Tensor], device: torch.device, reps: int = 20) -> dict:
    """Capture ``fn`` (returns a tensor) in a CUDA graph, replay it, and compare with an eager
    call bitwise; times both (CUDA events, median of ``reps``)."""
    if device.type != "cuda":
        return {"checked": False, "reason": f"needs CUDA (device is {device.type})"}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's graph docs do
        for _ in range(2):
            eager = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize(device)
    eager = fn()
    torch.cuda.synchronize(device)
    same = bool(torch.equal(captured, eager))

    def median_ms(call):
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return {"checked": True, "replay_equals_eager": same, "eager_ms": median_ms(fn),
            "replay_ms": median_ms(graph.replay)}


def nvidia_smi() -> dict:
    """``nvidia-smi --query-gpu`` of ``SMI_FIELDS`` for GPU 0 (clocks in MHz), or ``{"error"}``."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": repr(e)}
    if out.returncode != 0:
        return {"error": out.stderr.strip()[:300]}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(SMI_FIELDS, values))


def device_info(device: torch.device) -> dict:
    """Name, multiprocessors, memory, L2, capability of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "sm_count": props.multi_processor_count,
            "total_memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "capability": f"{props.major}.{props.minor}",
            "shared_per_block_optin": getattr(props, "shared_memory_per_block_optin", None)}


def ceilings(device: torch.device) -> dict:
    """Measured device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate on
    random data (8192^3), each a ``do_bench`` median: the two numbers METHOD.md asks for."""
    from triton.testing import do_bench

    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    return {"copy_tb_s": 2 * src.numel() / copy_ms / 1e9, "bf16_mm_tflops": 2 * 8192**3 / mm_ms / 1e9,
            "copy_ms": copy_ms, "mm_ms": mm_ms}


def triton_kernel_resources(*modules) -> list[dict]:
    """Registers, spills and shared memory of every Triton kernel compiled in this process from
    the ``@triton.jit`` functions of ``modules`` (read from Triton's in-memory kernel caches;
    the device's own compiler, so comparable with docs/kernel_resources.md)."""
    rows = []
    for mod in modules:
        for name, fn in sorted(vars(mod).items()):
            caches = getattr(fn, "device_caches", None)
            if not caches or not hasattr(fn, "arg_names"):
                continue
            for cache in list(caches.values()):
                for kernel in list(cache[0].values()):
                    try:
                        if getattr(kernel, "n_regs", None) is None:
                            kernel._init_handles()
                        md = kernel.metadata
                        cx = {}
                        for k, v in getattr(getattr(kernel, "src", None), "constants", {}).items():
                            key = fn.arg_names[k[0]] if isinstance(k, tuple) else str(k)
                            if key.startswith("BLOCK_") or isinstance(v, bool):
                                cx[key] = v if isinstance(v, (bool, int)) else str(v)
                        rows.append({"kernel": name, "regs": kernel.n_regs, "spills": kernel.n_spills,
                                     "shared": md.shared, "num_warps": md.num_warps,
                                     "num_stages": md.num_stages, "constexprs": cx})
                    except Exception as e:  # noqa: BLE001 (Triton internals differ by version)
                        rows.append({"kernel": name, "error": repr(e)[:200]})
    return rows
