"""ak.moe_mlp forward and backward (Triton kernels, interpreter on CPU) against reference.moe_mlp.

The reference runs in float32 on the same (rounded) inputs; the kernels run in the test dtype with
fp32 accumulation, so the tolerance is the dtype's.
"""

import pytest
import torch

import adamoe_kernels as ak
from adamoe_kernels import reference
from conftest import DTYPE_TOLERANCES
from helpers import ROUTING_CASES, assert_close, leaf, make_experts, make_logits

H, I = 32, 48


def _run(backend, logits, x, gate_up, down, k, n, normalize, null_kind, grad_out):
    """Forward + backward through route and moe_mlp; returns output and the four gradients."""
    leaves = [leaf(t) for t in (logits, x, gate_up, down)]
    if backend == "reference":
        r = reference.route(leaves[0], k, n, normalize)
        y = reference.moe_mlp(*leaves[1:], r, null_kind)
    else:
        r = ak.route(leaves[0], k, n, normalize, backend=backend)
        y = ak.moe_mlp(*leaves[1:], r, null_kind, backend=backend)
    (y.float() * grad_out).sum().backward()
    return y, [t.grad for t in leaves]


def _compare(device, dtype, atol, rtol, T, n, m, k, normalize, null_kind="zero", **logit_kw):
    logits = make_logits(T, n, m, device=device, **logit_kw)
    x = torch.randn(T, H, device=device).to(dtype)
    gate_up, down = make_experts(n, H, I, device=device, dtype=dtype)
    grad_out = torch.randn(T, H, device=device)
    y, grads = _run("triton", logits, x, gate_up, down, k, n, normalize, null_kind, grad_out)
    y_ref, grads_ref = _run("reference", logits, x.float(), gate_up.float(), down.float(), k, n,
                            normalize, null_kind, grad_out)
    assert y.dtype == dtype and y.shape == (T, H)
    assert_close(y, y_ref, atol, rtol, "y")
    for name, g, g_ref in zip(("d logits", "d hidden", "d gate_up", "d down"), grads, grads_ref):
        assert g is not None and g.dtype == (torch.float32 if name == "d logits" else dtype), name
        assert torch.isfinite(g).all(), name
        assert_close(g, g_ref, atol, rtol, name)


@pytest.mark.parametrize("T,n,m,k,normalize", ROUTING_CASES)
def test_moe_mlp_fp32(device, T, n, m, k, normalize):
    _compare(device, torch.float32, 1e-4, 1e-4, T, n, m, k, normalize)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES[1:])
@pytest.mark.parametrize("T,n,m,k,normalize", [ROUTING_CASES[1], ROUTING_CASES[3]])
def test_moe_mlp_half(device, dtype, atol, rtol, T, n, m, k, normalize):
    _compare(device, dtype, atol, rtol, T, n, m, k, normalize)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
def test_moe_mlp_empty_expert(device, dtype, atol, rtol):
    _compare(device, dtype, atol, rtol, 21, 4, 4, 3, "true", empty_expert=1)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
def test_moe_mlp_all_null_tokens(device, dtype, atol, rtol):
    """Every token picks only null experts: the layer is bypassed (zero output and grads)."""
    T, n, m, k = 13, 4, 4, 3
    logits = make_logits(T, n, m, device=device, null_bias=20.0)
    x = torch.randn(T, H, device=device).to(dtype)
    gate_up, down = make_experts(n, H, I, device=device, dtype=dtype)
    y, grads = _run("triton", logits, x, gate_up, down, k, n, "true", "zero",
                    torch.randn(T, H, device=device))
    assert torch.all(y == 0)
    for g in grads:
        assert torch.all(g == 0)


@pytest.mark.parametrize("normalize", ["all", "none"])
def test_moe_mlp_identity_null(device, normalize):
    _compare(device, torch.float32, 1e-4, 1e-4, 19, 4, 3, 4, normalize, null_kind="identity")


def test_moe_mlp_weight_gradient_only_when_needed(device):
    """Frozen experts (requires_grad=False) skip the weight-gradient kernels but keep the rest."""
    T, n, m, k = 15, 4, 2, 3
    logits = leaf(make_logits(T, n, m, device=device))
    x = leaf(torch.randn(T, H, device=device))
    gate_up, down = make_experts(n, H, I, device=device)
    y = ak.moe_mlp(x, gate_up, down, ak.route(logits, k, n))
    y.sum().backward()
    x_ref, lg_ref = leaf(x), leaf(logits)
    reference.moe_mlp(x_ref, gate_up, down, reference.route(lg_ref, k, n)).sum().backward()
    assert_close(x.grad, x_ref.grad, 1e-4, 1e-4, "d hidden")
    assert_close(logits.grad, lg_ref.grad, 1e-4, 1e-4, "d logits")


def test_moe_mlp_deterministic(device):
    T, n, m, k = 40, 4, 4, 4
    logits = make_logits(T, n, m, device=device)
    x = torch.randn(T, H, device=device)
    gate_up, down = make_experts(n, H, I, device=device)
    grad_out = torch.randn(T, H, device=device)
    y1, g1 = _run("triton", logits, x, gate_up, down, k, n, "true", "zero", grad_out)
    y2, g2 = _run("triton", logits, x, gate_up, down, k, n, "true", "zero", grad_out)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_moe_mlp_zero_tokens(device):
    gate_up, down = make_experts(4, H, I, device=device)
    r = ak.route(torch.zeros(0, 6, device=device), 2, 4)
    y = ak.moe_mlp(torch.zeros(0, H, device=device), gate_up, down, r)
    assert y.shape == (0, H)


def test_grouped_gemm_touches_only_true_rows(device):
    """The row-tiled GEMM writes exactly the true rows: null positions of its compact output keep
    their poison (so no tile ran for them), and the written rows equal x_tok @ W[e]^T."""
    from adamoe_kernels.ops.grouped_mlp import _launch_grouped_gemm, gemm_config

    T, n, m, k = 40, 4, 12, 4
    r = ak.route(make_logits(T, n, m, device=device, null_bias=1.5), k, n)
    rows = int(r.expert_offsets[-1])
    assert 0 < rows < T * k
    x = torch.randn(T, H, device=device)
    w = torch.randn(n, I, H, device=device)
    out = torch.full((T * k, I), float("nan"), device=device)
    _launch_grouped_gemm(x, w, out, r.sorted_slots, r.expert_offsets, n_cols=I, k_dim=H,
                         w_strides=(w.stride(0), w.stride(2), w.stride(1)), gather_a=True,
                         scatter_out=False, fuse_swiglu=False, num_experts=n, top_k=k,
                         cfg=gemm_config(x, T * k, n))
    assert torch.isnan(out[rows:]).all()
    slots = r.sorted_slots[:rows].long()
    experts = r.topk_ids.reshape(-1)[slots].long()
    expected = torch.einsum("rh,rih->ri", x[slots // k], w[experts])
    assert_close(out[:rows], expected, 1e-4, 1e-4, "rows")
