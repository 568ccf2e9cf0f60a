"""The command line every benchmark shares: options, device and backend, CPU threads and
allocator, seeds, progress bars."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Iterable, Sequence

import torch

import adamoe_kernels as ak
from adamoe_kernels.ops.backend import cpu_extension_available

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# ---- arguments ----------------------------------------------------------------------------------

def make_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark has; scripts add their own (shapes, sweeps) to it."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small shapes and sweep (finishes in under 2 minutes on a 2-core CPU)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="activation/weight dtype")
    p.add_argument("--backend", default="auto", choices=["auto", *ak.BACKENDS],
                   help="adamoe backend; 'auto': triton on CUDA, on CPU 'cpu' if the C++ extension is "
                        "built, else 'torch' (never the Triton interpreter: far too slow to time)")
    p.add_argument("--out", default=None,
                   help="output folder (default: bench/results/<device-name>/)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (CPU)")
    p.add_argument("--cuda-warmup-ms", type=float, default=None,
                   help="CUDA: warm-up milliseconds per timed callable (default 25)")
    p.add_argument("--cuda-rep-ms", type=float, default=None,
                   help="CUDA: milliseconds of timed repetitions per callable (default 100)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads. Default: torch's, less the cores other processes keep busy "
                        "(1-minute load average) -- OpenMP threads that wait on a preempted peer make "
                        "timings 10-100x slower. Threads and load average are recorded in the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: keep glibc's default allocator settings (by default a script run re-execs "
                        "itself with harness.cli.CPU_MALLOC_ENV so freed memory is reused; see docs/benchmarks.md)")
    return p


# glibc malloc settings for CPU timings: serve every allocation from the heap (no mmap) and never
# give freed memory back, so a buffer freed by one call is reused by the next. Without them each
# large buffer (weight gradients: hundreds of MB) is a fresh mmap whose first touch page-faults and
# is zeroed by the kernel -- a fixed cost per call, equal for every implementation, that the
# interleaved timings of many settings make erratic (the heap state depends on what ran before).
# The same effect as the jemalloc/tcmalloc preload that PyTorch's CPU tuning guides recommend.
CPU_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
                  "MALLOC_TOP_PAD_": str(1 << 30)}


def reexec_with_cpu_malloc(argv: Sequence[str] | None = None) -> None:
    """Run as a script on CPU: re-exec once with ``CPU_MALLOC_ENV`` (glibc reads it at start).

    Skipped with ``--system-malloc``, on a CUDA device, when the variables are already set, and
    off Linux. The settings in effect are recorded in every JSON (``malloc_env``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--system-malloc" in argv or not sys.platform.startswith("linux"):
        return
    dev = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--device"), None)
    dev = dev or next((a.split("=", 1)[1] for a in argv if a.startswith("--device=")), "auto")
    if dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available()):
        return
    if all(os.environ.get(k) == v for k, v in CPU_MALLOC_ENV.items()):
        return
    env = dict(os.environ, **CPU_MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, sys.argv[0], *argv], env)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def resolve_bench_backend(name: str, device: torch.device) -> str:
    """The adamoe backend to time. 'auto' never picks the Triton interpreter (minutes per call)."""
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpu" if cpu_extension_available() else "torch"
    return ak.resolve_backend(name, device)  # validates (e.g. 'cpu' without the extension)


def reps_for(args, device: torch.device, quick_default: int, full_default: int) -> int:
    if args.reps is not None:
        return args.reps
    return quick_default if args.quick else full_default


# ---- CPU threads --------------------------------------------------------------------------------

_STATE: dict = {}


def busy_cores(interval: float = 0.5) -> float:
    """Cores kept busy by other processes now: /proc/stat sampled over ``interval`` seconds."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals), idle

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    total = t1 - t0
    return 0.0 if total <= 0 else (os.cpu_count() or 1) * (1 - (i1 - i0) / total)


def apply_threads(args, device: torch.device) -> int | None:
    """Set the CPU thread count (``--threads``, else the idle cores); returns it (None on CUDA).

    OpenMP threads wait on each other at the end of every parallel region; when another process
    holds one of the cores, a multi-threaded run slows down 10-100x. So by default use only the
    cores that are idle now.
    """
    if device.type != "cpu":
        return None
    threads = getattr(args, "threads", None)
    if not threads:
        threads = torch.get_num_threads()
        busy = busy_cores()
        _STATE["busy_cores_at_start"] = round(busy, 2)
        idle = max(1, (os.cpu_count() or threads) - math.floor(busy + 0.5))
        if idle < threads:
            print(f"[bench] other processes keep {busy:.1f} cores busy: timing with {idle} of {threads} "
                  "threads (set --threads to override)", file=sys.stderr)
            threads = idle
    torch.set_num_threads(threads)
    return threads


def apply_timing(args) -> None:
    """CUDA timing budget from ``--cuda-warmup-ms``/``--cuda-rep-ms`` (``timing.CUDA_BUDGET``)."""
    from .timing import set_cuda_budget

    set_cuda_budget(getattr(args, "cuda_warmup_ms", None), getattr(args, "cuda_rep_ms", None))


def busy_cores_at_start() -> float | None:
    """The busy cores ``apply_threads`` measured (None when ``--threads`` was given or on CUDA)."""
    return _STATE.get("busy_cores_at_start")


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ---- progress -----------------------------------------------------------------------------------

class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str = "", disable: bool = False):
    """A manually advanced tqdm bar (``.update()``, ``.close()``); a no-op without tqdm."""
    if disable:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", disable: bool = False):
    """A tqdm progress bar over the sweep (plain iteration when tqdm is missing or disabled)."""
    if disable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
