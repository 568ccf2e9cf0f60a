"""One conftest for CPU and CUDA.

Without a GPU every Triton kernel runs under the interpreter: TRITON_INTERPRET=1 must be set before
``triton`` is imported, so it is set here, at collection time. Outputs allocated by the ops are
filled with NaN (ADAMOE_POISON_EMPTY=1) so an element a kernel forgot to write cannot pass a test.
"""

import json
import os
import subprocess
import sys

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ADAMOE_POISON_EMPTY", "1")

import torch  # noqa: E402

# The "cpu" device runs the Triton kernels under the interpreter; on a CUDA machine (no
# TRITON_INTERPRET) CPU tensors cannot take the triton backend, so the tests run on "cuda" only.
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if _HAS_CUDA else [])

# (dtype, atol, rtol) against the reference run in float32 on the same (rounded) inputs.
DTYPE_TOLERANCES = [
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 2e-2, 2e-2),
    (torch.bfloat16, 6e-2, 6e-2),
]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def aot_compiles():
    """Every GPU launch compiled ahead of time for sm_80/sm_90 by ``tests/aot_compile.py``, run
    once per session in a subprocess without TRITON_INTERPRET (the interpreter replaces the
    jitted kernels). Returns ``{"rows": [...], "summary": {...}, "returncode", "stderr"}``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_compile.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                          timeout=1200)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"rows": [r for r in lines if "kernel" in r],
            "summary": next((r for r in lines if "failures" in r), {}),
            "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
