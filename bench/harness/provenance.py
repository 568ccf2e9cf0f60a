"""Where a result comes from: a folder-safe device name and the environment it depends on."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

import adamoe_kernels as ak
from adamoe_kernels.ops.backend import cpu_extension_available
from adamoe_kernels.ops.tuning import device_slug

from . import REPO_DIR
from .cli import CPU_MALLOC_ENV, busy_cores_at_start


def slugify(text: str) -> str:
    """Folder-safe name; the same slug names a device's tuned-config file (``ops/tuning.py``)."""
    return device_slug(text)


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
        env["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
        env["timer"] = ("cuda events around each call after an L2 flush, callables interleaved "
                        "round by round (bench_many), or triton.testing.do_bench (bench_fn); medians")
    else:
        env["cpu_threads"] = torch.get_num_threads()
        env["cpu_count"] = os.cpu_count()
        env["timer"] = "time.perf_counter (median)"
        env["malloc_env"] = {k: os.environ.get(k) for k in CPU_MALLOC_ENV}
        if busy_cores_at_start() is not None:
            env["busy_cores_at_start"] = busy_cores_at_start()
        try:
            env["loadavg_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]  # taken after the run
        except OSError:
            pass
    return env
