"""Backend choice: ``triton`` (the kernels), ``cpu`` (C++ extension), ``torch`` (the reference).

Default: ``triton`` on CUDA; on CPU ``triton`` under the Triton interpreter when
``TRITON_INTERPRET=1`` was set before ``triton`` was imported, else ``cpu`` if the C++ extension is
built, else ``torch``. ``ADAMOE_BACKEND`` and the ``backend=`` argument override the default.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("triton", "cpu", "torch")


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the interpreter (CPU tensors, ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
try:
    from .. import _C  # noqa: F401  (registers torch.ops.adamoe.*_cpu)

    _CPU_EXTENSION_AVAILABLE = True
except ImportError:
    _CPU_EXTENSION_AVAILABLE = False


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def cpu_extension_available() -> bool:
    """True when the C++ CPU backend ``adamoe_kernels._C`` is built and loads."""
    return _CPU_EXTENSION_AVAILABLE


def warn_if_cpu_extension_missing() -> None:
    if not cpu_extension_available():
        warnings.warn(
            "adamoe_kernels: the C++ CPU backend (adamoe_kernels._C) is not built; "
            "CPU tensors without TRITON_INTERPRET=1 use the torch reference backend",
            stacklevel=3,
        )


def default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if device.type == "cpu":
        if interpreter_enabled() and triton_available():
            return "triton"
        if cpu_extension_available():
            return "cpu"
    return "torch"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run on ``device``: the argument, else ``ADAMOE_BACKEND``, else the default."""
    if backend is None:
        backend = os.environ.get("ADAMOE_BACKEND") or None
        source = "ADAMOE_BACKEND"
    else:
        source = "backend"
    if backend is None:
        return default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{source}='triton' but triton is not installed")
        if device.type == "cpu" and not interpreter_enabled():
            raise ValueError(
                f"{source}='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                "imported; use backend='cpu' or 'torch' instead"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{source}='triton' supports CPU and CUDA tensors, got {device}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{source}='cpu' needs CPU tensors, got {device}")
        if not cpu_extension_available():
            raise ValueError(
                f"{source}='cpu' but the C++ extension adamoe_kernels._C is not built "
                "(pip install --no-build-isolation -e .)"
            )
    return backend
