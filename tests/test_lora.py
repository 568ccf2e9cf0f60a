"""LoRA experts (``ak.moe_lora``): Triton kernels against ``reference.moe_lora``.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes are tiny. GPU compilation is still checked here: every kernel is
compiled ahead of time for sm_80 and sm_90 with the configs ``ops.lora.lora_configs`` really
launches, by tests/aot_compile.py in a subprocess without TRITON_INTERPRET (with it,
``@triton.jit`` returns interpreter wrappers), once per session (the ``aot_compiles`` fixture).
"""

from __future__ import annotations


import pytest
import torch

import adamoe_kernels as ak

from conftest import DTYPE_TOLERANCES
from helpers import assert_close_max, run_moe_lora

N_TRUE = 4


def _problem(device, dtype, T=16, in_f=48, out_f=40, r=8, n=N_TRUE, m=2, k=2, null_bias=0.0,
             starve=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, in_f, generator=g).to(device=device, dtype=dtype)
    A = (torch.randn(n, r, in_f, generator=g) * 0.2).to(device=device, dtype=dtype)
    B = (torch.randn(n, out_f, r, generator=g) * 0.2).to(device=device, dtype=dtype)
    logits = torch.randn(T, n + m, generator=g)
    logits[:, n:] += null_bias
    if starve is not None:
        logits[:, starve] = -30.0          # this true expert gets no token
    dy = torch.randn(T, out_f, generator=g).to(device=device, dtype=dtype)
    return x, A, B, logits.to(device), dy


CASES = {
    "basic": dict(T=16, r=8, m=2, k=2),
    "rank16_k_eq_n_plus_m": dict(T=10, r=16, m=2, k=N_TRUE + 2),
    "T1": dict(T=1, r=8, m=3, k=2),
    "empty_expert": dict(T=12, r=8, m=2, k=2, starve=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
def test_forward_backward_matches_reference(device, case, dtype, atol, rtol):
    cfg = CASES[case]
    x, A, B, logits, dy = _problem(device, dtype, **cfg)
    k, scaling = cfg["k"], 1.5
    y, dx, dA, dB, dlogits, rt = run_moe_lora(x, A, B, logits, dy, k, N_TRUE, scaling, "triton")
    # the oracle on fp32 upcasts of the same (rounded) inputs
    y0, dx0, dA0, dB0, dlogits0, _ = run_moe_lora(x.float(), A.float(), B.float(), logits,
                                                  dy.float(), k, N_TRUE, scaling, "torch")
    assert y.dtype == dtype and y.shape == (x.shape[0], B.shape[1])
    assert_close_max("y", y, y0, atol, rtol)
    assert_close_max("dx", dx, dx0, atol, rtol)
    assert_close_max("dA", dA, dA0, atol, rtol)
    assert_close_max("dB", dB, dB0, atol, rtol)
    assert_close_max("d router_logits", dlogits, dlogits0, atol, rtol)
    assert dA.dtype == dtype and dB.dtype == dtype and dx.dtype == dtype
    counts = rt.expert_counts.cpu()
    for e in range(N_TRUE):
        if counts[e] == 0:   # an expert with no rows gets exact zeros (not stale memory)
            assert torch.equal(dA[e], torch.zeros_like(dA[e]))
            assert torch.equal(dB[e], torch.zeros_like(dB[e]))
    if case == "empty_expert":
        assert counts[cfg["starve"]] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_null_tokens_give_exact_zeros(device, dtype):
    # null logits +20 and k <= m: every token's top-k is all null -> bypasses the layer
    x, A, B, logits, dy = _problem(device, dtype, T=8, m=3, k=3, null_bias=20.0)
    y, dx, dA, dB, dlogits, rt = run_moe_lora(x, A, B, logits, dy, 3, N_TRUE, 2.0, "triton")
    assert int(rt.expert_offsets[-1]) == 0
    for name, t in (("y", y), ("dx", dx), ("dA", dA), ("dB", dB), ("dlogits", dlogits)):
        assert torch.equal(t, torch.zeros_like(t)), name


def test_no_null_experts_matches_reference(device):
    x, A, B, logits, dy = _problem(device, torch.float32, T=9, m=0, k=2)
    y, *grads = run_moe_lora(x, A, B, logits, dy, 2, N_TRUE, 0.5, "triton")[:5]
    y0, *grads0 = run_moe_lora(x, A, B, logits, dy, 2, N_TRUE, 0.5, "torch")[:5]
    assert_close_max("y", y, y0, 1e-4, 1e-4)
    for name, g, g0 in zip(("dx", "dA", "dB", "dlogits"), grads, grads0):
        assert_close_max(name, g, g0, 1e-4, 1e-4)


def test_deterministic_bitwise(device):
    x, A, B, logits, dy = _problem(device, torch.bfloat16, T=16, r=16, k=3)
    first = run_moe_lora(x, A, B, logits, dy, 3, N_TRUE, 1.0, "triton")[:5]
    second = run_moe_lora(x, A, B, logits, dy, 3, N_TRUE, 1.0, "triton")[:5]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bad_inputs_raise():
    x, A, B, logits, _ = _problem("cpu", torch.float32, T=6, in_f=16, out_f=16)
    rt = ak.route(logits, 2, N_TRUE, backend="torch")
    rt5 = ak.route(torch.randn(6, 5 + 2), 2, 5, backend="torch")
    rt_t = ak.route(torch.randn(7, N_TRUE + 2), 2, N_TRUE, backend="torch")
    meta_x = torch.empty_like(x, device="meta")
    bad = [
        (ValueError, "x", lambda: ak.moe_lora(x[0], A, B, rt)),
        (TypeError, "x", lambda: ak.moe_lora(x.long(), A, B, rt)),
        (TypeError, "x", lambda: ak.moe_lora(x.numpy(), A, B, rt)),
        (TypeError, "lora_A", lambda: ak.moe_lora(x, A.double(), B, rt)),
        (TypeError, "lora_B", lambda: ak.moe_lora(x, A, B.half(), rt)),
        (ValueError, "lora_A", lambda: ak.moe_lora(x, A[:, :, :8], B, rt)),
        (ValueError, "lora_A", lambda: ak.moe_lora(x, A[0], B, rt)),
        (ValueError, "lora_B", lambda: ak.moe_lora(x, A, B[:, :, :4], rt)),
        (ValueError, "lora_B", lambda: ak.moe_lora(x, A, B[:2], rt)),
        (ValueError, "lora_A", lambda: ak.moe_lora(x, torch.zeros(N_TRUE, 300, 16),
                                                   torch.zeros(N_TRUE, 16, 300), rt)),
        (ValueError, "x is a meta tensor", lambda: ak.moe_lora(meta_x, A, B, rt)),
        (ValueError, "routing", lambda: ak.moe_lora(x, A, B, rt5)),
        (ValueError, "routing.topk_ids", lambda: ak.moe_lora(x, A, B, rt_t)),
        (TypeError, "routing", lambda: ak.moe_lora(x, A, B, (rt.topk_ids, rt.topk_weights))),
        (TypeError, "scaling", lambda: ak.moe_lora(x, A, B, rt, "2")),
        (ValueError, "scaling", lambda: ak.moe_lora(x, A, B, rt, float("nan"))),
        (ValueError, "backend", lambda: ak.moe_lora(x, A, B, rt, backend="cuda")),
    ]
    for exc, arg, fn in bad:
        with pytest.raises(exc, match=arg):
            fn()
    # a broken Routing (wrong sorted_slots length) is caught before any kernel runs
    broken = ak.Routing(rt.topk_ids, rt.topk_weights, rt.expert_counts, rt.expert_offsets,
                        rt.sorted_slots[:-1])
    with pytest.raises(ValueError, match="routing.sorted_slots"):
        ak.moe_lora(x, A, B, broken)


def _op_args(device, requires_grad):
    x, A, B, logits, _ = _problem(device, torch.float32, T=5, in_f=16, out_f=24, r=8, k=2)
    rt = ak.route(logits, 2, N_TRUE, backend="torch")
    w = rt.topk_weights.detach().clone()
    if requires_grad:
        for t in (x, A, B, w):
            t.requires_grad_()
    return (x, A, B, rt.topk_ids, w, rt.sorted_slots, rt.expert_offsets, 1.5)


def test_opcheck(device):
    from adamoe_kernels.ops.lora import moe_lora_bwd_op, moe_lora_fwd_op  # noqa: F401

    args = _op_args(device, requires_grad=True)
    torch.library.opcheck(torch.ops.adamoe.moe_lora_fwd.default, args)
    x, A, B, ids, w, slots, offsets, s = _op_args(device, requires_grad=False)
    _, u = torch.ops.adamoe.moe_lora_fwd(x, A, B, ids, w, slots, offsets, s)
    dy = torch.randn(x.shape[0], B.shape[1], device=device)
    torch.library.opcheck(torch.ops.adamoe.moe_lora_bwd.default,
                          (dy, x, A, B, ids, w, slots, offsets, u, s))


def test_torch_compile_fullgraph(device):
    import torch._dynamo

    torch._dynamo.reset()
    x, A, B, logits, dy = _problem(device, torch.float32, T=8, in_f=16, out_f=24, k=2)

    def f(x, A, B, rt):
        return ak.moe_lora(x, A, B, rt, 1.5, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        xs, As, Bs, lg = (t.detach().clone().requires_grad_() for t in (x, A, B, logits))
        rt = ak.route(lg, 2, N_TRUE, backend="torch")
        y = fn(xs, As, Bs, rt)
        (y * dy).sum().backward()
        results.append((y.detach(), xs.grad, As.grad, Bs.grad, lg.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- ahead-of-time GPU compilation (no GPU needed) ------------------------------------------

@pytest.mark.slow
def test_aot_compile_sm80_sm90(aot_compiles):
    """Every LoRA kernel variant ``ops.lora.lora_configs`` launches (ranks 16 and 128, bf16/fp16/
    fp32) compiles for sm_80 and sm_90 (16-bit: with a tensor-core mma) and fits in shared memory: the
    ``lora`` workload of tests/aot_compile.py (run once per session by the fixture)."""
    rows = [r for r in aot_compiles["rows"] if r["kernel"].startswith("lora_")]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    shared_limit = {80: 163 * 1024, 90: 227 * 1024}
    seen = set()
    for r in rows:
        seen.add((r["kernel"], r["sm"], r["dtype"]))
        assert r["shared"] <= shared_limit[r["sm"]], r
        if r["kernel"] != "lora_combine_kernel" and r["dtype"] != "fp32":  # fp32: exact, no mma
            assert r["mma"], f"{r['kernel']} sm_{r['sm']} {r['workload']}: no mma in the PTX"
    kernels = {"lora_shrink_kernel", "lora_expand_kernel", "lora_combine_kernel",
               "lora_wgrad_kernel"}
    assert seen == {(k, a, d) for k in kernels for a in (80, 90) for d in ("bf16", "fp16", "fp32")}
