"""Shared helpers of the benchmarks: arguments, device naming, timing, load control, JSON, plots.

Every script in ``bench/`` builds its parser with ``make_parser``, times with ``bench_fn``, controls the
load with ``calibrate_null_bias`` and writes its results with ``write_results``, so their JSON files have
one layout (``meta`` + ``rows``) that ``make_readme_table.py`` reads.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA-event timing, L2 flushed, median of its repetitions;
CUDA events directly when triton is missing); on CPU the median of ``--reps`` calls timed with
``time.perf_counter`` after ``--warmup`` untimed calls.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

if str(REPO_DIR) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_DIR))

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels.ops.backend import cpu_extension_available  # noqa: E402

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# The AdaMoE settings of the paper (Mixtral-8x7B, n = 8): (label, m null experts, top-k).
TOP2 = ("top2", 0, 2)
ADAMOE_CONFIGS = (("m8k3", 8, 3), ("m16k4", 16, 4))
PAPER_LOADS = (2.0, 1.66, 1.0, 0.5, 0.25)


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
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads. Default: torch's, less the cores other processes keep busy "
                        "(1-minute load average) -- OpenMP threads that wait on a preempted peer make "
                        "timings 10-100x slower. Threads and load average are recorded in the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: keep glibc's default allocator settings (by default a script run re-execs "
                        "itself with common.CPU_MALLOC_ENV so freed memory is reused; see docs/benchmarks.md)")
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


# ---- device naming and provenance ---------------------------------------------------------------

def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """A folder-safe device name: ``cpu-<model name>`` or the slugged CUDA device name."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(cpu_model_name())


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 (missing or broken: record as absent)
        return None
    return getattr(mod, "__version__", None)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device, dtype: torch.dtype, backend: str) -> dict:
    """What a result depends on: device, software versions, threads, machine load, time."""
    env = {
        "device_name": device_name(device),
        "device": str(device),
        "device_description": (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else cpu_model_name()),
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "cpu_extension_built": cpu_extension_available(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "adamoe_kernels": ak.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = list(torch.cuda.get_device_capability(device))
        env["timer"] = "triton.testing.do_bench (median)" if env["triton"] else "cuda events (median)"
    else:
        env["cpu_threads"] = torch.get_num_threads()
        env["cpu_count"] = os.cpu_count()
        env["timer"] = "time.perf_counter (median)"
        env["malloc_env"] = {k: os.environ.get(k) for k in CPU_MALLOC_ENV}
        if "busy_cores_at_start" in _STATE:
            env["busy_cores_at_start"] = _STATE["busy_cores_at_start"]
        try:
            env["loadavg_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]  # taken after the run
        except OSError:
            pass
    return env


# ---- timing -------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 5,
             grad_to_none: Sequence[torch.Tensor] | None = None) -> dict:
    """Time ``fn`` and return ``{"ms": median, "ms_min", "ms_p20", "ms_p80", "n"}`` in milliseconds.

    ``grad_to_none``: tensors whose ``.grad`` is reset before every call (fwd+bwd timings).
    CUDA: ``triton.testing.do_bench`` (``warmup``/``reps`` are ignored: it runs ~25 ms warmup and
    ~100 ms of repetitions). CPU: ``warmup`` untimed calls, then ``reps`` timed calls.
    """
    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            med, p20, p80 = do_bench(call, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
            return {"ms": med, "ms_min": None, "ms_p20": p20, "ms_p80": p80, "n": None}
        for _ in range(max(warmup, 3)):
            call()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(max(reps, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return _summary(times)

    for _ in range(warmup):
        call()
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def bench_many(fns: dict, device: torch.device, *, warmup: int = 2, reps: int = 5,
               on_round: Callable[[], None] | None = None, max_spread: float = 1.5,
               retries: int = 2) -> dict:
    """Time several ``{key: (fn, grad_to_none)}`` that are to be compared with each other.

    On CPU the calls are interleaved (round-robin: every round calls each ``fn`` once), so a
    change in the machine's load during the run hits every candidate alike. If another process
    disturbed the run (some key's p80/p20 above ``max_spread``), the rounds are repeated up to
    ``retries`` times and the least disturbed attempt is kept (``attempts`` in each timing).
    ``on_round`` is called after each round (progress). On CUDA each is timed on its own with
    ``bench_fn``. Returns ``{key: timing}`` as ``bench_fn`` does.
    """
    if device.type == "cuda":
        out = {}
        for key, (fn, grads) in fns.items():
            out[key] = bench_fn(fn, device, warmup=warmup, reps=reps, grad_to_none=grads)
            if on_round:
                on_round()
        return out

    def call(fn, grads):
        for t in grads or ():
            t.grad = None
        fn()

    for _ in range(warmup):
        for fn, grads in fns.values():
            call(fn, grads)
        if on_round:
            on_round()
    best, best_spread = None, math.inf
    for attempt in range(1, retries + 2):
        times = {key: [] for key in fns}
        for _ in range(max(reps, 1)):
            for key, (fn, grads) in fns.items():
                t0 = time.perf_counter()
                call(fn, grads)
                times[key].append((time.perf_counter() - t0) * 1e3)
            if on_round and attempt == 1:
                on_round()
        result = {key: _summary(v) for key, v in times.items()}
        spread = max(t["ms_p80"] / t["ms_p20"] for t in result.values())
        if spread < best_spread:
            best, best_spread = result, spread
        if spread <= max_spread or reps < 3:
            break
    for t in best.values():
        t["attempts"] = attempt
    return best


def bench_rounds(n_fns: int, device: torch.device, warmup: int, reps: int) -> int:
    """How many times ``bench_many`` calls ``on_round`` (to size a progress bar)."""
    return n_fns if device.type == "cuda" else warmup + max(reps, 1)


def _summary(times_ms: list[float]) -> dict:
    s = sorted(times_ms)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"ms": statistics.median(s), "ms_min": s[0], "ms_p20": q(0.2), "ms_p80": q(0.8), "n": len(s)}


# ---- the MoE problem and the load dial ----------------------------------------------------------

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


# ---- outputs ------------------------------------------------------------------------------------

def output_dir(args, device: torch.device) -> Path:
    out = Path(args.out) if args.out else RESULTS_DIR / device_name(device)
    out.mkdir(parents=True, exist_ok=True)
    return out


def result_stem(script: str, quick: bool) -> str:
    return f"{script}_quick" if quick else script


def write_results(out_dir: Path, stem: str, meta: dict, rows: list[dict], **extra) -> Path:
    """Write ``<out_dir>/<stem>.json`` = ``{"meta": ..., "rows": [...], **extra}``; return its path."""
    path = Path(out_dir) / f"{stem}.json"
    payload = {"meta": meta, **extra, "rows": rows}
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    return path


def save_results(args, out_dir: Path, stem: str, meta: dict, rows: list[dict], plot_fn,
                 tables: Sequence[tuple[list[dict], list]], header: str = "", **extra) -> dict:
    """The end of every script: ``<stem>.json`` (+ ``<stem>.png`` by ``plot_fn(rows, meta, path)``
    unless ``--no-plot``), a header line and markdown ``tables`` (``(rows, columns)`` pairs) on
    stdout. Returns ``{"json", "png", "meta", "rows", **extra}``."""
    path = write_results(out_dir, stem, meta, rows, **extra)
    png = None if args.no_plot else plot_fn(rows, meta, Path(out_dir) / f"{stem}.png")
    print(f"\n{meta['device_name']} | backend {meta.get('backend')} | {meta['dtype']} | "
          f"torch {meta['torch']}{' | ' + header if header else ''}\n")
    print("\n\n".join(markdown_table(t_rows, cols) for t_rows, cols in tables))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return {"json": path, "png": png, "meta": meta, "rows": rows, **extra}


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


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


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", disable: bool = False):
    """A tqdm progress bar over the sweep (plain iteration when tqdm is missing or disabled)."""
    if disable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def markdown_table(rows: list[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header). Floats are printed with 3 significant decimals; None as '-'."""
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
