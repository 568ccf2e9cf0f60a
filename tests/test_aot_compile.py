"""Every Triton kernel, with the configs it really launches on GPU, compiles for sm_80 and sm_90.

Runs ``tests/aot_compile.py`` in a subprocess without TRITON_INTERPRET (the interpreter would
replace the jitted kernels), so no GPU is needed.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile.py")],
                          capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [r for r in rows if "error" in r]
    assert proc.returncode == 0 and not errors, (errors or proc.stderr[-3000:])
    compiled = [r for r in rows if "sm" in r and "error" not in r]
    kernels = {r["kernel"] for r in compiled}
    assert {"route_topk_kernel", "group_offsets_kernel", "scatter_slots_kernel",
            "route_backward_kernel", "grouped_gemm_kernel", "swiglu_backward_kernel",
            "grouped_weight_grad_kernel", "combine_slots_kernel",
            "slot_weight_grad_kernel"} <= kernels
    assert {r["sm"] for r in compiled} == {80, 90}
    # bf16 GEMMs use Hopper's wgmma on sm_90; every kernel fits in 227 KB of shared memory.
    assert any(r["wgmma"] for r in compiled if r["kernel"] == "grouped_gemm_kernel"
               and r["sm"] == 90 and "*bf16" in r["dtypes"])
    assert all(r["shared"] <= 227 * 1024 for r in compiled)
