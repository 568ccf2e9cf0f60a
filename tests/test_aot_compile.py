"""Every Triton kernel, with the configs it really launches on GPU, compiles for sm_80 and sm_90,
fits in shared memory, and (bf16/fp16, sm_90) does not spill; docs/kernel_resources.md is the
table those compiles give.

``tests/aot_compile.py`` runs once per session (the ``aot_compiles`` fixture in conftest.py), in a
subprocess without TRITON_INTERPRET, so no GPU is needed.
"""

import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(os.path.dirname(HERE), "docs", "kernel_resources.md")
SHARED_LIMIT = {80: 166912, 90: 232448}   # bytes one block may use: A100; H100/H200 (227 KiB)
CORE_KERNELS = {"route_topk_kernel", "group_offsets_kernel", "scatter_slots_kernel",
                "route_backward_kernel", "grouped_gemm_kernel", "swiglu_backward_kernel",
                "grouped_weight_grad_kernel", "combine_slots_kernel", "slot_weight_grad_kernel"}
LORA_KERNELS = {"lora_shrink_kernel", "lora_expand_kernel", "lora_combine_kernel",
                "lora_wgrad_kernel"}

pytestmark = pytest.mark.slow


def _compiled(aot):
    assert aot["returncode"] == 0, [r for r in aot["rows"] if "error" in r] or aot["stderr"]
    return [r for r in aot["rows"] if "error" not in r]


def test_every_kernel_compiles_for_sm80_and_sm90(aot_compiles):
    rows = _compiled(aot_compiles)
    assert not [r for r in aot_compiles["rows"] if "error" in r]
    assert CORE_KERNELS | LORA_KERNELS <= {r["kernel"] for r in rows}
    assert {r["sm"] for r in rows} == {80, 90}
    # bf16 GEMMs use Hopper's wgmma on sm_90; every 16-bit GEMM has a tensor-core mma on both
    # archs (fp32 LoRA GEMMs are exact fp32: "ieee", no mma).
    assert any(r["wgmma"] for r in rows if r["kernel"] == "grouped_gemm_kernel"
               and r["sm"] == 90 and r["dtype"] == "bf16")
    gemms = {"grouped_gemm_kernel", "swiglu_backward_kernel", "grouped_weight_grad_kernel"}
    for r in rows:
        if (r["kernel"] in gemms or r["kernel"].startswith("lora_")) \
                and r["kernel"] != "lora_combine_kernel" and r["dtype"] in ("bf16", "fp16"):
            assert r["mma"], f"{r['kernel']} sm_{r['sm']} {r['workload']}: no mma in the PTX"


def test_shared_memory_fits_and_no_half_precision_spills(aot_compiles):
    rows = _compiled(aot_compiles)
    too_big = [(r["kernel"], r["sm"], r["workload"], r["shared"]) for r in rows
               if r["shared"] > SHARED_LIMIT[r["sm"]]]
    assert not too_big, too_big
    sm90 = [r for r in rows if r["sm"] == 90]
    assert sm90 and all(r["regs"] is not None and r["stack"] is not None for r in sm90), \
        "cuobjdump gave no resource usage"
    spills = [(r["kernel"], r["workload"], r["dtype"], r["constexprs"], r["num_warps"],
               r["num_stages"], r["regs"], r["stack"], r["spill_stores"]) for r in sm90
              if r["dtype"] in ("bf16", "fp16") and (r["stack"] or r["spill_stores"])]
    assert not spills, spills


def test_kernel_resources_table_is_current(aot_compiles):
    rows = _compiled(aot_compiles)
    with open(DOC) as f:
        doc = f.read()
    m = re.search(r"Triton (\S+), target sm_90", doc)
    triton_version = aot_compiles["summary"].get("triton")
    if not m or m.group(1) != triton_version:
        pytest.skip(f"docs/kernel_resources.md is for Triton {m and m.group(1)}, this is "
                    f"{triton_version}")
    sys.path.insert(0, HERE)
    try:
        import kernel_table
    finally:
        sys.path.remove(HERE)
    want = kernel_table.render_table(rows, triton_version)
    got = kernel_table.table_in(DOC)
    assert got == want, ("docs/kernel_resources.md is stale: run "
                         "`python tests/aot_compile.py --table docs/kernel_resources.md`")
