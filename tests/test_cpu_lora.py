"""LoRA experts on the C++ CPU backend (``ak.moe_lora(..., backend="cpu")``) against
``reference.moe_lora``.

Skipped when the extension ``adamoe_kernels._C`` is not built. Shapes are small but cover the
kernels' edges: several token blocks (32 tokens each), ranks that are not a multiple of the
8-rank register tiles, feature sizes that are not a multiple of 16, empty experts, all-null
tokens, k = n+m, m = 0.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("adamoe_kernels._C", reason="C++ CPU backend not built")

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels import reference  # noqa: E402
from helpers import assert_close_max, run_moe_lora  # noqa: E402

# (dtype, atol, rtol) against the fp32 reference on the same (rounded) inputs: the C++ op keeps
# A x in fp32 and rounds once, so it is closer to fp32 than the bf16 reference itself.
TOLS = [
    (torch.float32, 1e-5, 1e-4),
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 5e-3, 5e-3),
]

# name: (T, in, out, r, n, m, k, null_bias, starve)
CASES = {
    "basic": (16, 48, 40, 8, 4, 2, 2, 0.0, None),
    "T1": (1, 48, 40, 8, 4, 3, 2, 0.0, None),
    "blocks_odd_dims": (70, 33, 131, 8, 4, 5, 2, 0.0, None),
    "rank20_k_eq_n_plus_m": (19, 40, 24, 20, 3, 2, 5, 0.0, None),
    "rank1_no_null": (37, 17, 23, 1, 5, 0, 2, 0.0, None),
    "empty_expert": (40, 32, 48, 8, 4, 2, 3, 0.0, 2),
    "mostly_null": (45, 24, 40, 4, 4, 6, 2, 2.0, None),
}


def _problem(T, in_f, out_f, r, n, m, k, null_bias, starve, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, in_f, generator=g).to(dtype)
    A = (torch.randn(n, r, in_f, generator=g) * 0.2).to(dtype)
    B = (torch.randn(n, out_f, r, generator=g) * 0.2).to(dtype)
    logits = torch.randn(T, n + m, generator=g)
    logits[:, n:] += null_bias
    if starve is not None:
        logits[:, starve] = -30.0
    dy = torch.randn(T, out_f, generator=g).to(dtype)
    return x, A, B, logits, dy


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
def test_matches_reference(case, dtype, atol, rtol):
    T, in_f, out_f, r, n, m, k, null_bias, starve = CASES[case]
    x, A, B, logits, dy = _problem(*CASES[case], dtype)
    got = run_moe_lora(x, A, B, logits, dy, k, n, 1.5, "cpu")
    want = run_moe_lora(x.float(), A.float(), B.float(), logits, dy.float(), k, n, 1.5, "torch")
    for name, a, b in zip(("y", "dx", "dA", "dB", "d router_logits"), got[:5], want[:5]):
        assert_close_max(name, a, b, atol, rtol)
    y, dx, dA, dB = got[:4]
    assert y.dtype == dx.dtype == dA.dtype == dB.dtype == dtype
    rt = got[5]
    counts = rt.expert_counts
    if starve is not None:
        assert counts[starve] == 0
    for e in range(n):
        if counts[e] == 0:  # no rows: exact zeros, not stale memory
            assert torch.equal(dA[e], torch.zeros_like(dA[e]))
            assert torch.equal(dB[e], torch.zeros_like(dB[e]))
    # a token routed to null experts only gets an exact zero delta and an exact zero dx
    all_null = (rt.topk_ids >= n).all(dim=1)
    if case == "mostly_null":
        assert all_null.any() and not all_null.all()
    assert torch.equal(y[all_null], torch.zeros_like(y[all_null]))
    assert torch.equal(dx[all_null], torch.zeros_like(dx[all_null]))


@pytest.mark.parametrize("normalize", ["all", "none"])
def test_null_slot_weights_get_zero_gradient(normalize):
    """With "all"/"none" the null slots have nonzero weights but add nothing: d w = 0 there."""
    x, A, B, logits, dy = _problem(20, 24, 16, 8, 4, 3, 3, 0.0, None, torch.float32)
    rt = ak.route(logits, 3, 4, normalize, backend="torch")
    w = rt.topk_weights.detach().clone().requires_grad_()
    rt_w = ak.Routing(rt.topk_ids, w, rt.expert_counts, rt.expert_offsets, rt.sorted_slots)
    y = ak.moe_lora(x, A, B, rt_w, 0.5, backend="cpu")
    (gw,) = torch.autograd.grad((y * dy).sum(), w)
    w_ref = rt.topk_weights.detach().clone().requires_grad_()
    rt_ref = ak.Routing(rt.topk_ids, w_ref, rt.expert_counts, rt.expert_offsets, rt.sorted_slots)
    (gw_ref,) = torch.autograd.grad((reference.moe_lora(x, A, B, rt_ref, 0.5) * dy).sum(), w_ref)
    assert_close_max("d topk_weights", gw, gw_ref, 1e-5, 1e-4)
    assert torch.equal(gw[rt.topk_ids >= 4], torch.zeros_like(gw[rt.topk_ids >= 4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_null_tokens_give_exact_zeros(dtype):
    x, A, B, logits, dy = _problem(40, 24, 40, 8, 4, 3, 3, 20.0, None, dtype)
    y, dx, dA, dB, dlogits, rt = run_moe_lora(x, A, B, logits, dy, 3, 4, 2.0, "cpu")
    assert int(rt.expert_offsets[-1]) == 0
    for name, t in (("y", y), ("dx", dx), ("dA", dA), ("dB", dB), ("dlogits", dlogits)):
        assert torch.equal(t, torch.zeros_like(t)), name


def test_empty_batch():
    x, A, B, logits, dy = _problem(0, 16, 24, 8, 4, 2, 2, 0.0, None, torch.float32)
    y, dx, dA, dB, _, _ = run_moe_lora(x, A, B, logits, dy, 2, 4, 1.0, "cpu")
    assert y.shape == (0, 24) and dx.shape == (0, 16)
    assert torch.equal(dA, torch.zeros_like(dA)) and torch.equal(dB, torch.zeros_like(dB))


def test_partial_gradients_and_no_grad():
    """Frozen LoRA weights (only dx wanted), frozen x, and no_grad all give the same values."""
    x, A, B, logits, dy = _problem(50, 24, 40, 8, 4, 2, 2, 0.0, None, torch.float32)
    rt = ak.route(logits, 2, 4, backend="torch")
    full = run_moe_lora(x, A, B, logits, dy, 2, 4, 0.7, "cpu")
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad((ak.moe_lora(xr, A, B, rt, 0.7, backend="cpu") * dy).sum(), xr)
    assert torch.equal(gx, full[1])
    Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
    gA, gB = torch.autograd.grad((ak.moe_lora(x, Ar, Br, rt, 0.7, backend="cpu") * dy).sum(),
                                 (Ar, Br))
    assert torch.equal(gA, full[2]) and torch.equal(gB, full[3])
    with torch.no_grad():
        assert torch.equal(ak.moe_lora(x, A, B, rt, 0.7, backend="cpu"), full[0])


def test_non_contiguous_inputs():
    x, A, B, logits, dy = _problem(33, 24, 40, 8, 4, 2, 2, 0.0, None, torch.float32)
    rt = ak.route(logits, 2, 4, backend="torch")
    xt = x.t().contiguous().t()                       # column-major x
    At = A.transpose(1, 2).contiguous().transpose(1, 2)
    Bt = B.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (xt.is_contiguous() or At.is_contiguous() or Bt.is_contiguous())
    assert torch.equal(ak.moe_lora(xt, At, Bt, rt, 1.0, backend="cpu"),
                       ak.moe_lora(x, A, B, rt, 1.0, backend="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_and_thread_count_independent(dtype):
    x, A, B, logits, dy = _problem(200, 40, 72, 12, 4, 3, 3, 0.3, None, dtype)
    first = run_moe_lora(x, A, B, logits, dy, 3, 4, 1.0, "cpu")[:5]
    second = run_moe_lora(x, A, B, logits, dy, 3, 4, 1.0, "cpu")[:5]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_moe_lora(x, A, B, logits, dy, 3, 4, 1.0, "cpu")[:5]
        torch.set_num_threads(3)
        three = run_moe_lora(x, A, B, logits, dy, 3, 4, 1.0, "cpu")[:5]
    finally:
        torch.set_num_threads(threads)
    for other in (second, single, three):
        for a, b in zip(first, other):
            assert torch.equal(a, b)


def test_portable_loops_match_reference():
    """ADAMOE_CPU_PORTABLE=1 (read once per process, so in a subprocess) runs the non-AVX-512
    loops."""
    code = """
import torch, adamoe_kernels as ak
from adamoe_kernels import reference
from adamoe_kernels.ops.cpu import cpu_features
assert not cpu_features()["avx512"]
torch.manual_seed(0)
for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    T, n, m, k, r, fi, fo = 45, 4, 2, 2, 12, 40, 52
    x = torch.randn(T, fi).to(dt).requires_grad_()
    A = (torch.randn(n, r, fi) * .2).to(dt).requires_grad_()
    B = (torch.randn(n, fo, r) * .2).to(dt).requires_grad_()
    rt = ak.route(torch.randn(T, n + m), k, n, backend="torch")
    y = ak.moe_lora(x, A, B, rt, 1.5, backend="cpu")
    got = [y] + list(torch.autograd.grad(y.float().sum(), (x, A, B)))
    fp = [t.detach().float().requires_grad_() for t in (x, A, B)]
    y0 = reference.moe_lora(*fp, rt, 1.5)
    want = [y0] + list(torch.autograd.grad(y0.sum(), fp))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.detach(), atol=tol, rtol=tol)
print("ok")
"""
    env = dict(os.environ, ADAMOE_CPU_PORTABLE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _op_args(requires_grad):
    x, A, B, logits, _ = _problem(9, 16, 24, 8, 4, 2, 2, 0.0, None, torch.float32)
    rt = ak.route(logits, 2, 4, backend="torch")
    w = rt.topk_weights.detach().clone()
    if requires_grad:
        for t in (x, A, B, w):
            t.requires_grad_()
    return (x, A, B, rt.topk_ids, w, rt.sorted_slots, rt.expert_offsets, 1.5)


def test_opcheck():
    from adamoe_kernels.ops import cpu  # noqa: F401  (registers autograd and fake kernels)

    torch.library.opcheck(torch.ops.adamoe.moe_lora_forward_cpu.default, _op_args(True))
    args = _op_args(False)
    _, u = torch.ops.adamoe.moe_lora_forward_cpu(*args)
    dy = torch.randn(args[0].shape[0], args[2].shape[1])
    for mask in ([True] * 4, [True, False, True, False]):
        torch.library.opcheck(torch.ops.adamoe.moe_lora_backward_cpu.default,
                              (dy, *args[:-1], u, args[-1], mask))


def test_torch_compile_fullgraph():
    import torch._dynamo

    torch._dynamo.reset()
    x, A, B, logits, dy = _problem(20, 16, 24, 8, 4, 2, 2, 0.0, None, torch.float32)

    def f(x, A, B, logits):
        rt = ak.route(logits, 2, 4, backend="cpu")
        return ak.moe_lora(x, A, B, rt, 1.5, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, logits)]
        y = fn(*leaves)
        results.append([y.detach()] + list(torch.autograd.grad((y * dy).sum(), leaves)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_malformed_routing_raises():
    x, A, B, ids, w, slots, offsets, s = _op_args(False)
    op = torch.ops.adamoe.moe_lora_forward_cpu
    with pytest.raises(ValueError, match="sorted_slots"):
        op(x, A, B, ids, w, slots.flip(0).contiguous(), offsets, s)
    bad = offsets.clone()
    bad[-1] = ids.numel() + 1
    with pytest.raises(ValueError, match="expert_offsets"):
        op(x, A, B, ids, w, slots, bad, s)
    bad_ids = ids.clone()
    bad_ids[0, 0] = -1
    with pytest.raises(ValueError, match="topk_ids|sorted_slots"):
        op(x, A, B, bad_ids, w, slots, offsets, s)
    with pytest.raises(ValueError, match="lora_B"):
        op(x, A, B[:, :, :4], ids, w, slots, offsets, s)
    with pytest.raises(ValueError, match="topk_ids"):
        op(x[:-1], A, B, ids, w, slots, offsets, s)
    with pytest.raises(TypeError, match="lora_A"):
        op(x, A.double(), B, ids, w, slots, offsets, s)
    _, u = op(x, A, B, ids, w, slots, offsets, s)
    dy = torch.randn(x.shape[0], B.shape[1])
    with pytest.raises(ValueError, match="u must be"):
        torch.ops.adamoe.moe_lora_backward_cpu(dy, x, A, B, ids, w, slots, offsets, u[:-1], s,
                                               [True] * 4)
    with pytest.raises(ValueError, match="grad_y"):
        torch.ops.adamoe.moe_lora_backward_cpu(dy[:, :-1], x, A, B, ids, w, slots, offsets, u, s,
                                               [True] * 4)
    # the public function checks the metadata in Python first
    rt = ak.route(torch.randn(x.shape[0], 6), 2, 4, backend="torch")
    broken = ak.Routing(rt.topk_ids, rt.topk_weights, rt.expert_counts, rt.expert_offsets,
                        rt.sorted_slots[:-1])
    with pytest.raises(ValueError, match="routing.sorted_slots"):
        ak.moe_lora(x, A, B, broken, backend="cpu")


def test_lora_layer_runs_on_the_cpu_backend():
    """AdaMoELoRALinear(backend="cpu") trains through the C++ op and matches the reference."""
    from adamoe_kernels.integrations.modules import AdaMoELoRALinear

    torch.manual_seed(0)
    layer = AdaMoELoRALinear(24, 40, num_experts=4, num_null_experts=2, top_k=2, rank=4,
                             backend="cpu")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, 24)
    outs = []
    for backend in ("cpu", "torch"):
        layer.backend = backend
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        outs.append([y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone(),
                     layer.router.weight.grad.clone()])
    for a, b in zip(*outs):
        assert_close_max("layer", a, b, 1e-5, 1e-4)
