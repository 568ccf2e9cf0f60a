"""The C++ CPU backend (``backend="cpu"``) against ``adamoe_kernels.reference``.

Skipped when the extension ``adamoe_kernels._C`` is not built.
"""

import pytest
import torch

pytest.importorskip("adamoe_kernels._C", reason="C++ CPU backend not built")

import adamoe_kernels as ak  # noqa: E402
from adamoe_kernels import reference  # noqa: E402

# (dtype, atol, rtol): fp32 tight; reduced precision against the fp32 reference on the same
# (rounded) inputs, loose.
TOLS = [
    (torch.float32, 1e-5, 1e-4),
    (torch.bfloat16, 6e-2, 6e-2),
    (torch.float16, 2e-2, 2e-2),
]

# (T, n, m, k, null_bias): T=1; n+m not a power of two; k = n+m; m = 0; T across routing blocks
# (256 tokens) and not a multiple of any block; every token all-null (null logits +20).
ROUTE_CASES = [
    (1, 4, 2, 2, 0.0),
    (37, 5, 2, 3, 0.0),
    (19, 3, 3, 6, 0.0),
    (70, 6, 0, 2, 0.0),
    (301, 7, 4, 3, 0.5),
    (23, 4, 3, 2, 20.0),
]


def _logits(T, n, m, dtype=torch.float32, null_bias=0.0, empty_expert=None):
    """Random logits without ties inside a row after rounding to ``dtype`` (torch.topk breaks
    ties in no documented order; the kernels take the lower index, see test_ties_lower_index)."""
    lg = torch.randn(T, n + m)
    lg[:, n:] += null_bias
    if empty_expert is not None:
        lg[:, empty_expert] -= 30.0
    lg = lg.to(dtype)
    for t in range(T):
        while lg[t].float().unique().numel() < n + m:
            lg[t] += (torch.randn(n + m) * 0.05).to(dtype)
    return lg


def test_ties_lower_index():
    """Equal probabilities: the lower expert index wins (a stable descending sort)."""
    n, m, k = 4, 3, 3
    lg = torch.tensor([[0.0] * 7,
                       [1.0, 2.0, 2.0, 0.0, 2.0, 1.0, 1.0],
                       [0.5, 0.0, 3.0, 0.0, 3.0, 0.5, 0.5]])
    for dtype in (torch.float32, torch.bfloat16):
        r = ak.route(lg.to(dtype), k, n, "all", backend="cpu")
        probs = torch.softmax(lg.float(), -1)
        want = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(r.topk_ids, want.int())


def _close(actual, expected, atol, rtol, what):
    """Max-abs error against atol + rtol * max|expected| (robust for sums of many terms)."""
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _assert_same_routing(r, rr):
    """The cpu Routing `r` equals the reference's `rr`: int32 metadata exactly, fp32 weights."""
    for name in ("topk_ids", "expert_counts", "expert_offsets", "sorted_slots"):
        got, want = getattr(r, name), getattr(rr, name)
        assert got.dtype == torch.int32, name
        assert torch.equal(got, want), name
    assert r.topk_weights.dtype == torch.float32
    torch.testing.assert_close(r.topk_weights, rr.topk_weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalize", ["true", "all", "none"])
@pytest.mark.parametrize("T,n,m,k,null_bias", ROUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(T, n, m, k, null_bias, normalize, dtype):
    lg = _logits(T, n, m, dtype, null_bias).requires_grad_()
    lg_ref = lg.detach().clone().requires_grad_()
    r = ak.route(lg, k, n, normalize, backend="cpu")
    rr = reference.route(lg_ref, k, n, normalize)
    _assert_same_routing(r, rr)
    g = torch.randn(T, k)
    (gl,) = torch.autograd.grad(r.topk_weights, lg, g)
    (gl_ref,) = torch.autograd.grad(rr.topk_weights, lg_ref, g)
    assert gl.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gl.float(), gl_ref.float(), atol=tol, rtol=tol)
    if null_bias >= 20 and normalize == "true":
        assert int(r.expert_offsets[-1]) == 0
        assert torch.count_nonzero(r.topk_weights) == 0 and torch.count_nonzero(gl) == 0


# ---- top-p and the selection bias (the load dial) in the C++ routing -----------------------------

# (T, n, m, k): T=1; T=700 spans three 256-token blocks and is a multiple of none; k = n+m;
# m = 0; n+m not a power of two.
EXT_CASES = [(1, 4, 2, 3), (37, 5, 3, 8), (70, 6, 0, 2), (700, 8, 8, 3), (129, 3, 4, 4)]
# top_p: 1e-6 keeps only the first slot of every token, 1.0 keeps the whole top-k.
EXT_VARIANTS = [  # (top_p, with_bias)
    (1e-6, False), (0.5, False), (1.0, False), (None, True), (0.3, True), (0.8, True),
]


def _ext_bias(n, m):
    """A selection bias that moves the choice: random on every column, + 0.7 on the null ones."""
    bias = torch.randn(n + m) * 0.5
    bias[n:] += 0.7
    return bias


@pytest.mark.parametrize("top_p,with_bias", EXT_VARIANTS)
@pytest.mark.parametrize("normalize", ["true", "all", "none"])
@pytest.mark.parametrize("T,n,m,k", EXT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_route_top_p_selection_bias_match_reference(T, n, m, k, normalize, top_p, with_bias,
                                                    dtype):
    lg = _logits(T, n, m, dtype).requires_grad_()
    lg_ref = lg.detach().clone().requires_grad_()
    bias = _ext_bias(n, m) if with_bias else None
    r = ak.route(lg, k, n, normalize, top_p=top_p, selection_bias=bias, backend="cpu")
    rr = reference.route(lg_ref, k, n, normalize, top_p=top_p, selection_bias=bias)
    _assert_same_routing(r, rr)
    assert float(r.load()) == float(rr.load())
    dropped = r.topk_ids == n + m
    assert torch.all(r.topk_weights[dropped] == 0)
    if top_p is not None and top_p < 1e-3:  # only the first slot survives
        assert torch.all(~dropped[:, 0]) and torch.all(dropped[:, 1:])
    if top_p is not None and dtype == torch.float32:
        g = torch.randn(T, k)
        (gl,) = torch.autograd.grad(r.topk_weights, lg, g)
        (gl_ref,) = torch.autograd.grad(rr.topk_weights, lg_ref, g)
        torch.testing.assert_close(gl, gl_ref, atol=1e-6, rtol=1e-5)


def test_route_extensions_change_the_routing():
    """The bias and top-p act (the cases above are not the plain routing in disguise)."""
    T, n, m, k = 300, 6, 6, 3
    lg = _logits(T, n, m)
    plain = ak.route(lg, k, n, backend="cpu")
    biased = ak.route(lg, k, n, selection_bias=_ext_bias(n, m), backend="cpu")
    cut = ak.route(lg, k, n, top_p=0.5, backend="cpu")
    assert float(biased.load()) < float(plain.load())
    assert float(cut.load()) < float(plain.load())
    assert torch.any(cut.topk_ids == n + m)
    # The bias only chooses: the weights stay the unbiased probabilities of the chosen ids.
    r = ak.route(lg, k, n, "none", selection_bias=_ext_bias(n, m), backend="cpu")
    probs = torch.softmax(lg, -1).gather(1, r.topk_ids.long())
    torch.testing.assert_close(r.topk_weights, probs, atol=1e-6, rtol=1e-5)


def test_route_extensions_ties_lower_index():
    """Ties in the biased selection scores go to the lower index; top-p cuts on those scores."""
    n, m, k = 4, 3, 4
    lg = torch.tensor([[0.0] * 7,
                       [1.0, 2.0, 1.5, 0.0, 1.5, 1.0, 2.0],
                       [0.5, 0.0, 3.0, 0.0, 3.0, 0.5, 0.5]])
    bias = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0])
    select = torch.softmax(lg + bias, -1)
    order = torch.sort(select, dim=-1, descending=True, stable=True)
    for top_p in (None, 0.5):
        want = order.indices[:, :k].int()
        if top_p is not None:
            top = order.values[:, :k]
            keep = (torch.cumsum(top, -1) - top) < top_p
            want = torch.where(keep, want, torch.full_like(want, n + m))
        for dtype in (torch.float32, torch.bfloat16):
            r = ak.route(lg.to(dtype), k, n, "all", top_p=top_p, selection_bias=bias,
                         backend="cpu")
            assert torch.equal(r.topk_ids, want), (top_p, dtype)


def test_route_extensions_bad_args_raise():
    """The op itself validates top_p and selection_bias (messages as _contract.py's)."""
    lg = _logits(5, 4, 2)
    op = torch.ops.adamoe.route_cpu
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        op(lg, 2, 4, "true", 1.5)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        op(lg, 2, 4, "true", 0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        op(lg, 2, 4, "true", float("nan"))
    with pytest.raises(ValueError, match=r"selection_bias must have n\+m = 6 entries, got 5"):
        op(lg, 2, 4, "true", None, torch.zeros(5))
    with pytest.raises(ValueError, match="selection_bias must have 1 dimensions"):
        op(lg, 2, 4, "true", None, torch.zeros(1, 6))
    with pytest.raises(TypeError, match="selection_bias has dtype"):
        op(lg, 2, 4, "true", None, torch.zeros(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="selection_bias contains NaN or Inf"):
        op(lg, 2, 4, "true", None, torch.full((6,), float("inf")))
    with pytest.raises(ValueError, match="selection_bias is a meta tensor"):
        ak.route(lg, 2, 4, selection_bias=torch.zeros(6, device="meta"), backend="cpu")
    # Half-precision biases are accepted (upcast to fp32, like reference.route).
    bias = _ext_bias(4, 2)
    ids_half = op(lg, 2, 4, "true", 0.7, bias.half())[0]
    rr = reference.route(lg, 2, 4, top_p=0.7, selection_bias=bias.half())
    assert torch.equal(ids_half, rr.topk_ids)


def _moe_case(T, n, m, k, H, I, dtype, null_bias=0.0, empty_expert=None, normalize="true"):
    lg = _logits(T, n, m, torch.float32, null_bias, empty_expert)
    x = torch.randn(T, H).to(dtype)
    gu = (torch.randn(n, 2 * I, H) / H**0.5).to(dtype)
    dn = (torch.randn(n, H, I) / I**0.5).to(dtype)
    return lg, x, gu, dn


def _run(backend, lg, x, gu, dn, k, n, normalize, null_kind, gy, upcast=False):
    """Output and grads (x, gate_up, down, router logits) through the public API."""
    leaves = [t.detach().clone() for t in (x, gu, dn)]
    if upcast:
        leaves = [t.float() for t in leaves]
    leaves = [t.requires_grad_() for t in leaves] + [lg.detach().clone().requires_grad_()]
    xx, gg, dd, ll = leaves
    r = ak.route(ll, k, n, normalize, backend=backend)
    y = ak.moe_mlp(xx, gg, dd, r, null_kind, backend=backend)
    if not y.requires_grad:  # the reference on an all-null batch: y is a constant zero
        return y, [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype), allow_unused=True,
                                materialize_grads=True)
    return y, grads


def _single_threaded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with torch (and the C++ kernels) on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


MOE_CASES = [
    # T, n, m, k, H, I, null_bias, empty_expert, normalize, null_kind
    (1, 4, 2, 2, 16, 24, 0.0, None, "true", "zero"),          # T = 1
    (45, 5, 3, 3, 32, 40, 0.0, 2, "true", "zero"),            # an expert with no tokens
    (29, 3, 4, 7, 16, 16, 0.0, None, "true", "zero"),         # k = n+m, n+m = 7
    (66, 6, 0, 2, 48, 32, 0.0, None, "true", "zero"),         # m = 0 (plain top-2)
    (21, 4, 2, 2, 16, 24, 20.0, None, "true", "zero"),        # every token all-null
    (53, 5, 3, 3, 32, 24, 0.5, None, "all", "identity"),      # identity null kind
    (31, 4, 3, 2, 16, 40, 0.5, None, "none", "identity"),
    (40, 4, 2, 3, 16, 24, 0.5, 1, "all", "zero"),
    (9, 2, 1, 2, 20, 1100, 0.0, None, "true", "zero"),       # H, I not multiples of 16; I > KC
    (7, 2, 1, 2, 20, 4200, 0.0, None, "true", "zero"),       # I > the NT K chunk (fp32 and bf16)
    (420, 2, 0, 2, 20, 24, 0.0, None, "true", "zero"),       # > kSmallGemmMaxRows (Intel)
    (1100, 2, 0, 2, 20, 24, 0.0, None, "true", "zero"),      # > every small-kernel row limit
    (37, 3, 2, 2, 18, 25, 0.0, None, "true", "zero"),        # row and column tails of every GEMM
    # H, I multiples of 32: the bf16 forward runs on the AMX kernels where the CPU has them.
    (5, 4, 2, 2, 64, 32, 0.0, None, "true", "zero"),          # <= 16 rows per expert (one m-tile)
    (9, 2, 1, 2, 96, 32, 0.0, None, "true", "zero"),          # H = 96: a last block of 32 rows
    (40, 3, 0, 2, 96, 64, 0.5, 1, "all", "identity"),          # 17-64 rows: m-tile pairs, an empty expert
    (150, 2, 0, 2, 32, 96, 0.0, None, "true", "zero"),        # 150 rows: five m-tile pairs
]


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("T,n,m,k,H,I,null_bias,empty_expert,normalize,null_kind", MOE_CASES)
def test_moe_mlp_matches_reference(T, n, m, k, H, I, null_bias, empty_expert, normalize, null_kind,
                                   dtype, atol, rtol):
    if dtype == torch.float16 and (T > 40 or I > 100):
        pytest.skip("fp16 covered on the smaller shapes")
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, dtype, null_bias, empty_expert, normalize)
    gy = torch.randn(T, H)
    y, grads = _run("cpu", lg, x, gu, dn, k, n, normalize, null_kind, gy)
    y_ref, grads_ref = _run("torch", lg, x, gu, dn, k, n, normalize, null_kind, gy, upcast=True)
    assert y.dtype == dtype and y.shape == (T, H)
    _close(y, y_ref, atol, rtol, "y")
    for name, got, want in zip(("d hidden", "d gate_up_proj", "d down_proj", "d router_logits"),
                               grads, grads_ref):
        assert got.shape == want.shape, name
        _close(got, want, atol, rtol, name)
    if empty_expert is not None:
        assert torch.count_nonzero(grads[1][empty_expert]) == 0
        assert torch.count_nonzero(grads[2][empty_expert]) == 0
    if null_bias >= 20:  # all-null: the layer is bypassed, all gradients exactly zero
        assert torch.count_nonzero(y) == 0
        assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS[:2], ids=["float32", "bfloat16"])
def test_moe_mlp_mixed_expert_sizes_match_reference(dtype, atol, rtol):
    """One expert takes every token (1100 rows: above every small-kernel row limit, at::mm) and
    seven share the second slots (~157 rows each: the small-M kernels where the CPU has them),
    so one forward mixes both paths and the small experts' grouped launches are split at their
    row limit (forward_small_experts)."""
    T, n, k, H, I = 1100, 8, 2, 20, 24
    lg, x, gu, dn = _moe_case(T, n, 0, k, H, I, dtype)
    lg[:, 0] += 30.0
    gy = torch.randn(T, H)
    y, grads = _run("cpu", lg, x, gu, dn, k, n, "true", "zero", gy)
    y_ref, grads_ref = _run("torch", lg, x, gu, dn, k, n, "true", "zero", gy, upcast=True)
    counts = ak.route(lg, k, n, backend="cpu").expert_counts
    assert counts[0] == T and counts[1:].max() < 192 and counts[1:].sum() == T
    _close(y, y_ref, atol, rtol, "y")
    for name, got, want in zip(("d hidden", "d gate_up_proj", "d down_proj", "d router_logits"),
                               grads, grads_ref):
        _close(got, want, atol, rtol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_do_not_depend_on_the_batch(dtype):
    """On the small-M kernels every output row is summed in a fixed order whatever other rows and
    experts share the launch: a token decoded in a batch of 16 gets exactly the bits it gets
    alone (so batched greedy decoding picks the same tokens as one sequence at a time)."""
    from adamoe_kernels.ops.cpu import cpu_features

    f = cpu_features()  # bf16: off on Intel CPUs (AMX or oneDNN take those), see grouped_mlp.cpp
    small_m = (f["avx512_bf16"] and not f["amx_bf16"] and not f["intel"]
               if dtype == torch.bfloat16 else f["avx512"])
    if not small_m:
        pytest.skip("the small-M kernels do not run for this dtype on this CPU")
    T, n, m, k, H, I = 16, 8, 8, 3, 64, 96
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, dtype)
    with torch.no_grad():
        y = ak.moe_mlp(x, gu, dn, ak.route(lg, k, n, backend="cpu"), backend="cpu")
        for t in range(T):
            r = ak.route(lg[t:t + 1], k, n, backend="cpu")
            assert torch.equal(ak.moe_mlp(x[t:t + 1], gu, dn, r, backend="cpu"), y[t:t + 1]), t


def test_topk_weights_gradient_direct():
    """d topk_weights of moe_mlp alone (not through route), including null slots (identity)."""
    T, n, m, k, H, I = 33, 4, 3, 3, 16, 24
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.float32, null_bias=0.5)
    r = ak.route(lg, k, n, "all", backend="cpu")
    w = r.topk_weights.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    r_cpu = ak.Routing(r.topk_ids, w, r.expert_counts, r.expert_offsets, r.sorted_slots, "all")
    r_ref = ak.Routing(r.topk_ids, w_ref, r.expert_counts, r.expert_offsets, r.sorted_slots, "all")
    gy = torch.randn(T, H)
    y = ak.moe_mlp(x, gu, dn, r_cpu, "identity", backend="cpu")
    y_ref = reference.moe_mlp(x, gu, dn, r_ref, "identity")
    (gw,) = torch.autograd.grad(y, w, gy)
    (gw_ref,) = torch.autograd.grad(y_ref, w_ref, gy)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-4)


def test_frozen_weights_and_no_grad():
    """Only the requested gradients are computed; no_grad forward matches."""
    T, n, m, k, H, I = 27, 4, 2, 2, 16, 24
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.float32)
    r = ak.route(lg, k, n, backend="cpu")
    xr = x.clone().requires_grad_()
    y = ak.moe_mlp(xr, gu, dn, r, backend="cpu")  # weights frozen
    (gx,) = torch.autograd.grad(y.sum(), xr)
    (gx_ref,) = torch.autograd.grad(reference.moe_mlp(xr, gu, dn, r).sum(), xr)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        y2 = ak.moe_mlp(x, gu, dn, r, backend="cpu")
    assert torch.equal(y.detach(), y2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype):
    T, n, m, k, H, I = 300, 6, 3, 3, 64, 48
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, dtype, null_bias=0.3)
    gy = torch.randn(T, H)
    y1, g1 = _run("cpu", lg, x, gu, dn, k, n, "all", "identity", gy)
    y2, g2 = _run("cpu", lg, x, gu, dn, k, n, "all", "identity", gy)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    r1 = ak.route(lg, k, n, backend="cpu")
    r2 = ak.route(lg, k, n, backend="cpu")
    assert torch.equal(r1.sorted_slots, r2.sorted_slots)
    assert torch.equal(r1.topk_weights, r2.topk_weights)


def test_thread_count_does_not_change_results():
    T, n, m, k, H, I = 200, 5, 3, 2, 32, 40
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.float32, null_bias=0.3)
    gy = torch.randn(T, H)
    y1, g1 = _single_threaded(_run, "cpu", lg, x, gu, dn, k, n, "true", "zero", gy)
    y2, g2 = _run("cpu", lg, x, gu, dn, k, n, "true", "zero", gy)
    # The routing and the combine orders are fixed; only the GEMM library may block differently.
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    r1 = ak.route(lg, k, n, backend="cpu")
    r2 = _single_threaded(ak.route, lg, k, n, backend="cpu")
    assert torch.equal(r1.sorted_slots, r2.sorted_slots)


def test_empty_batch():
    n, m, k, H, I = 3, 2, 2, 8, 8
    lg, x, gu, dn = _moe_case(0, n, m, k, H, I, torch.float32)
    r = ak.route(lg, k, n, backend="cpu")
    assert r.sorted_slots.shape == (0,)
    assert torch.equal(r.expert_offsets, torch.zeros(n + 1, dtype=torch.int32))
    y = ak.moe_mlp(x, gu, dn, r, backend="cpu")
    assert y.shape == (0, H)


def test_malformed_routing_raises_value_error():
    T, n, m, k, H, I = 10, 3, 2, 2, 8, 8
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.float32)
    r = ak.route(lg, k, n, backend="cpu")
    bad_slots = r.sorted_slots.flip(0).contiguous()
    with pytest.raises(ValueError, match="sorted_slots"):
        torch.ops.adamoe.moe_mlp_forward_cpu(x, gu, dn, r.topk_ids, r.topk_weights, bad_slots,
                                            r.expert_offsets, "zero")
    bad_offsets = r.expert_offsets.clone()
    bad_offsets[-1] = T * k + 1
    with pytest.raises(ValueError, match="expert_offsets"):
        torch.ops.adamoe.moe_mlp_forward_cpu(x, gu, dn, r.topk_ids, r.topk_weights,
                                            r.sorted_slots, bad_offsets, "zero")
    with pytest.raises(ValueError, match="normalize"):
        torch.ops.adamoe.route_cpu(lg, k, n, "bogus")


def test_opcheck():
    T, n, m, k, H, I = 12, 3, 2, 2, 8, 8
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.float32, null_bias=0.3)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.adamoe.route_cpu.default, (lg.requires_grad_(), k, n, "true"),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.adamoe.route_cpu.default,
                          (lg, k, n, "all", 0.6, torch.linspace(-1, 1, n + m)), test_utils=utils)
    r = ak.route(lg.detach(), k, n, "all", backend="cpu")
    args = (x.requires_grad_(), gu.requires_grad_(), dn, r.topk_ids,
            r.topk_weights.requires_grad_(), r.sorted_slots, r.expert_offsets, "identity")
    torch.library.opcheck(torch.ops.adamoe.moe_mlp_forward_cpu.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.parametrize("top_p,with_bias", [(None, False), (0.6, True)])
def test_torch_compile_fullgraph(top_p, with_bias):
    T, n, m, k, H, I = 24, 4, 2, 2, 16, 24
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.float32, null_bias=0.3)
    bias = _ext_bias(n, m) if with_bias else None

    def f(lg, x, gu, dn):
        r = ak.route(lg, k, n, "true", top_p=top_p, selection_bias=bias, backend="cpu")
        return ak.moe_mlp(x, gu, dn, r, backend="cpu")

    leaves = [t.clone().requires_grad_() for t in (lg, x, gu, dn)]
    y = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(y.sum(), leaves)
    leaves_eager = [t.clone().requires_grad_() for t in (lg, x, gu, dn)]
    y_eager = f(*leaves_eager)
    grads_eager = torch.autograd.grad(y_eager.sum(), leaves_eager)
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("switch,dtype,H,I,atol,off", [
    ("ADAMOE_CPU_PORTABLE", "float32", 20, 40, 1e-5, ("avx512", "avx512_bf16", "amx_bf16")),
    ("ADAMOE_CPU_NO_AMX", "bfloat16", 64, 96, 6e-2, ("amx_bf16",)),
])
def test_kernel_switches_match_reference(switch, dtype, H, I, atol, off):
    """The kernels behind each switch (read once per process, so in a subprocess):
    ADAMOE_CPU_PORTABLE=1 runs the non-AVX-512 loops, ADAMOE_CPU_NO_AMX=1 the bf16 GEMMs without
    AMX (oneDNN, or the VDPBF16PS kernels on other CPUs)."""
    import os
    import subprocess
    import sys

    code = f"""
import torch, adamoe_kernels as ak
from adamoe_kernels import reference
from adamoe_kernels.ops.cpu import cpu_features
assert not any(cpu_features()[f] for f in {off!r}), cpu_features()
torch.manual_seed(0)
T, n, m, k, H, I = 37, 4, 2, 2, {H}, {I}
dt = torch.{dtype}
lg = torch.randn(T, n + m)
x = torch.randn(T, H).to(dt).requires_grad_()
gu = (torch.randn(n, 2 * I, H) / H**0.5).to(dt).requires_grad_()
dn = (torch.randn(n, H, I) / I**0.5).to(dt).requires_grad_()
r = ak.route(lg, k, n, backend="cpu")
out = []
for args in ((x, gu, dn), tuple(t.detach().float().requires_grad_() for t in (x, gu, dn))):
    y = (ak.moe_mlp(*args, r, backend="cpu") if args[0] is x else reference.moe_mlp(*args, r))
    out.append([y.detach()] + list(torch.autograd.grad(y, args, torch.ones_like(y))))
for a, b in zip(*out):
    torch.testing.assert_close(a.float(), b, atol={atol}, rtol={atol} * 10)
print("ok")
"""
    env = dict(os.environ, **{switch: "1"})
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _amx_or_skip():
    from adamoe_kernels.ops.cpu import cpu_features

    if not cpu_features()["amx_bf16"]:
        pytest.skip("this CPU has no AMX-BF16 (or ADAMOE_CPU_NO_AMX is set)")


def test_amx_kernels_run_forward_and_backward():
    """On an AMX CPU the bf16 forward GEMMs (H, I multiples of 32) and the weight gradients run
    on the own AMX kernels (their profiler scopes); only the backward's dy @ down and
    d gate_up @ gate_up stay on at::mm (oneDNN), two per expert with rows."""
    _amx_or_skip()
    T, n, m, k, H, I = 64, 4, 2, 3, 64, 96
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.bfloat16)
    busy = int((ak.route(lg, k, n, backend="cpu").expert_counts > 0).sum())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _run("cpu", lg, x, gu, dn, k, n, "true", "zero", torch.randn(T, H))
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("adamoe_cpu::amx_gemm_gate_up", 0) == 1  # gate_up + SwiGLU, all experts
    assert calls.get("adamoe_cpu::amx_gemm_wxt", 0) == 1      # down, all experts
    assert calls.get("adamoe_cpu::amx_gemm_tn", 0) == 2 * busy   # both weight gradients
    assert calls.get("aten::mm", 0) == 2 * busy, calls


@pytest.mark.parametrize("kernels", ["amx", "tn_bf16"])
def test_bf16_own_kernels_do_not_depend_on_thread_count(kernels):
    """The AMX kernels, and without AMX the VDPBF16PS small-K weight-gradient kernel, sum each
    output element in a fixed order: bitwise equal results for one and two threads."""
    (_amx_or_skip if kernels == "amx" else _tn_bf16_or_skip)()
    T, n, m, k, H, I = 90, 3, 2, 2, 64, 64
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.bfloat16, null_bias=0.3)
    gy = torch.randn(T, H)
    y1, g1 = _single_threaded(_run, "cpu", lg, x, gu, dn, k, n, "true", "zero", gy)
    y2, g2 = _run("cpu", lg, x, gu, dn, k, n, "true", "zero", gy)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ---- the bf16 weight gradients on the VDPBF16PS small-K kernel (AVX512_BF16 without AMX) ------

def _tn_bf16_or_skip():
    from adamoe_kernels.ops.cpu import cpu_features

    f = cpu_features()
    if f["amx_bf16"] or not f["avx512_bf16"]:
        pytest.skip("the bf16 small-K kernel takes the weight gradients on AVX512_BF16 CPUs "
                    "without AMX (on an AMX CPU: ADAMOE_CPU_NO_AMX=1, see "
                    "test_bf16_kernels_without_amx)")


def _exact_bf16_case(T, n, H, I, seed):
    """A top-1 bf16 layer whose weight gradients are exact integer sums (|x| < 2^24): x in
    {-1, 0, 1} with x[:, 0] = 1, gate rows that read only that column (g = 22..30, so
    silu(g) = g and silu'(g) = 1 in fp32), up rows of four +-1 entries (|u| <= 4), one +-1 per
    column of down (so |G| = |dy @ down| <= 3), routing weights 1, dy in [-3, 3]: every bf16
    intermediate (g, u, h <= 120, G, dg, du <= 90) is exact, so each weight-gradient element must
    be its exact sum rounded once to bf16 (nearest even), whatever the kernel's summation order."""
    g = torch.Generator().manual_seed(seed)
    lg = torch.randn(T, n, generator=g)
    x = torch.randint(-1, 2, (T, H), generator=g).float()
    x[:, 0] = 1
    gu = torch.zeros(n, 2 * I, H)
    gu[:, :I, 0] = 22 + torch.arange(I) % 9
    dn = torch.zeros(n, H, I)
    for e in range(n):
        for i in range(I):
            cols = 1 + torch.randperm(H - 1, generator=g)[:4]
            gu[e, I + i, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    rows = torch.randint(0, H, (n, I), generator=g)
    signs = torch.randint(0, 2, (n, I), generator=g).float() * 2 - 1
    dn.scatter_(1, rows[:, None, :], signs[:, None, :])
    gy = torch.randint(-3, 4, (T, H), generator=g).float()
    return lg, x.bfloat16(), gu.bfloat16(), dn.bfloat16(), gy.bfloat16()


# (T, n, H, I): H, I not multiples of 16 (row and column tails of both weight gradients), odd row
# counts. Up to 64 rows per expert (the small-K kernel's row limit): ~12 rows; ~50 rows with
# H = 1100 (two B panels of d gate_up_proj) and 2I = 302 (three row blocks, the last with a tail).
# ~300 rows: at::mm (or AMX's row limit), the same exactness.
EXACT_CASES = [(37, 3, 18, 40), (101, 2, 1100, 151), (601, 2, 20, 200)]


@pytest.mark.parametrize("T,n,H,I", EXACT_CASES)
def test_bf16_weight_grads_exactly_rounded(T, n, H, I):
    """bf16 d gate_up_proj and d down_proj equal the fp32 reference rounded to bf16, bit for bit,
    on data whose sums are exact (_exact_bf16_case): this checks the pairing of the rows, the odd
    last row and the rounding (nearest even; integer sums hit ties) of whichever kernel runs."""
    lg, x, gu, dn, gy = _exact_bf16_case(T, n, H, I, seed=T)
    r = ak.route(lg, 1, n, backend="cpu")
    counts = r.expert_counts.tolist()
    assert any(c % 2 == 1 for c in counts), counts  # an odd K: the half pair
    ones = torch.ones_like(r.topk_weights)
    routing = ak.Routing(r.topk_ids, ones, r.expert_counts, r.expert_offsets, r.sorted_slots,
                         "true")
    grads = []
    for upcast, fn in ((False, ak.moe_mlp), (True, reference.moe_mlp)):
        leaves = [t.float() if upcast else t for t in (gu, dn)]
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        kw = {"backend": "cpu"} if fn is ak.moe_mlp else {}
        y = fn(x.float() if upcast else x, *leaves, routing, **kw)
        grads.append(torch.autograd.grad(y, leaves, gy.to(y.dtype)))
    for name, got, want in zip(("d gate_up_proj", "d down_proj"), *grads):
        assert got.dtype == torch.bfloat16
        want = want.bfloat16()
        assert torch.equal(got, want), (name, int((got != want).sum()), got.numel())


def test_bf16_tn_kernel_engages():
    """Without AMX the bf16 weight gradients of experts up to the row limit run on the own small-K
    kernel (its profiler scope, two per expert with rows); the other bf16 GEMMs stay on at::mm."""
    _tn_bf16_or_skip()
    T, n, m, k, H, I = 64, 4, 2, 3, 64, 96
    lg, x, gu, dn = _moe_case(T, n, m, k, H, I, torch.bfloat16)
    counts = ak.route(lg, k, n, backend="cpu").expert_counts
    busy = int((counts > 0).sum())
    assert int(counts.max()) <= 64  # under the row limit on every CPU vendor
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _run("cpu", lg, x, gu, dn, k, n, "true", "zero", torch.randn(T, H))
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("adamoe_cpu::gemm_tn_bf16", 0) == 2 * busy, calls
    assert calls.get("adamoe_cpu::amx_gemm_tn", 0) == 0


def test_bf16_kernels_without_amx():
    """ADAMOE_CPU_NO_AMX=1 (in a subprocess: the switch is read once per process): the bf16 cases
    of this file run with the kernels of an AVX512_BF16 CPU without AMX (AMD Zen 4, older Xeons),
    so on an AMX machine the small-K weight-gradient kernel is exercised, and it must engage."""
    import os
    import subprocess
    import sys

    from adamoe_kernels.ops.cpu import cpu_features

    if not cpu_features()["avx512_bf16"]:
        pytest.skip("no AVX512_BF16 on this CPU")
    if not cpu_features()["amx_bf16"]:
        pytest.skip("no AMX here: the bf16 tests above already run without it")
    select = ("bfloat16 or bf16_weight_grads_exactly or bf16_tn_kernel_engages "
              "or bf16_own_kernels_do_not_depend")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", __file__,
           "-k", f"({select}) and not without_amx and not kernel_switches"]
    res = subprocess.run(cmd, env=dict(os.environ, ADAMOE_CPU_NO_AMX="1"), capture_output=True,
                         text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    passed = [line for line in out.splitlines() if line.startswith("PASSED")]
    for name in ("test_bf16_tn_kernel_engages", "test_bf16_weight_grads_exactly_rounded",
                 "test_bf16_own_kernels_do_not_depend_on_thread_count[tn_bf16]"):
        assert any(name in line for line in passed), out[-4000:]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("row", [0, 300])  # the first token block, and a later one
def test_route_cpu_kernel_rejects_nonfinite_logits(bad, row):
    # The C++ routing checks the logits in its own pass (route skips the Python check on cpu).
    logits = torch.randn(301, 12)
    logits[row, 5] = bad
    with pytest.raises(ValueError, match="router_logits contains NaN or Inf"):
        torch.ops.adamoe.route_cpu(logits, 3, 8, "true", None, None)
    with pytest.raises(ValueError, match="router_logits contains NaN or Inf"):
        ak.route(logits.bfloat16(), 3, 8, backend="cpu")


def test_no_grad_fast_path_matches_autograd_path():
    # Without a wanted gradient the ops skip the autograd wrapper: bitwise the same outputs.
    torch.manual_seed(0)
    T, H, I, n, m, k = 9, 32, 48, 4, 3, 3
    x = torch.randn(T, H, requires_grad=True)
    gu = torch.randn(n, 2 * I, H) * 0.1
    dn = torch.randn(n, H, I) * 0.1
    logits = torch.randn(T, n + m, requires_grad=True)
    r = ak.route(logits, k, n, backend="cpu")
    y = ak.moe_mlp(x, gu, dn, r, backend="cpu")
    assert y.requires_grad and r.topk_weights.requires_grad
    with torch.no_grad():
        r0 = ak.route(logits, k, n, backend="cpu")
        y0 = ak.moe_mlp(x, gu, dn, r0, backend="cpu")
    assert not y0.requires_grad and not r0.topk_weights.requires_grad
    for a, b in zip((r.topk_ids, r.topk_weights, r.expert_offsets, r.sorted_slots, y),
                    (r0.topk_ids, r0.topk_weights, r0.expert_offsets, r0.sorted_slots, y0)):
        assert torch.equal(a.detach(), b)
    ref = reference.moe_mlp(x.detach(), gu, dn, reference.route(logits.detach(), k, n))
    torch.testing.assert_close(y0, ref, atol=1e-5, rtol=1e-4)
