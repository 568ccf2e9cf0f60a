"""ak.route (Triton kernels, interpreter on CPU) against reference.route and HF Mixtral routing."""

import pytest
import torch

import adamoe_kernels as ak
from adamoe_kernels import reference
from helpers import ROUTING_CASES, assert_close, leaf, make_logits

BACKENDS = ["triton", "torch"]


def _check_routing_equal(r, rr, atol=1e-6):
    for field in ("topk_ids", "expert_counts", "expert_offsets", "sorted_slots"):
        a, b = getattr(r, field), getattr(rr, field)
        assert a.dtype == torch.int32, field
        assert torch.equal(a.cpu(), b.cpu()), f"{field}: {a} != {b}"
    assert r.topk_weights.dtype == torch.float32
    assert_close(r.topk_weights, rr.topk_weights, atol, atol, "topk_weights")


@pytest.mark.parametrize("T,n,m,k,normalize", ROUTING_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_route_matches_reference(device, backend, T, n, m, k, normalize):
    logits = make_logits(T, n, m, device=device)
    r = ak.route(logits, k, n, normalize, backend=backend)
    _check_routing_equal(r, reference.route(logits, k, n, normalize))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_route_half_logits(device, dtype):
    logits = make_logits(29, 6, 4, device=device, dtype=dtype)
    _check_routing_equal(ak.route(logits, 3, 6), reference.route(logits, 3, 6))


def test_route_sorted_slots_semantics(device):
    """sorted_slots groups true slots by expert in slot order, then the null slots."""
    T, n, m, k = 23, 4, 3, 3
    r = ak.route(make_logits(T, n, m, device=device), k, n)
    ids = r.topk_ids.cpu().reshape(-1)
    slots = r.sorted_slots.cpu().long()
    assert torch.equal(slots.sort().values, torch.arange(T * k))  # a permutation
    offsets = r.expert_offsets.cpu().long()
    for e in range(n):
        seg = slots[offsets[e]:offsets[e + 1]]
        assert torch.all(ids[seg] == e)
        assert torch.all(seg[1:] > seg[:-1])
    tail = slots[offsets[-1]:]
    assert torch.all(ids[tail] >= n) and torch.all(tail[1:] > tail[:-1])
    assert torch.equal(r.expert_counts.cpu().long(), offsets[1:] - offsets[:-1])


def test_route_empty_expert_and_all_null(device):
    r = ak.route(make_logits(19, 4, 4, device=device, empty_expert=2), 3, 4)
    assert r.expert_counts[2].item() == 0
    _check_routing_equal(r, reference.route(make_logits(19, 4, 4, device=device, empty_expert=2),
                                            3, 4))
    logits = make_logits(19, 4, 4, device=device, null_bias=20.0)
    r = ak.route(logits, 3, 4)
    assert r.expert_offsets[-1].item() == 0
    assert torch.all(r.topk_weights == 0)
    assert float(r.load()) == 0.0
    _check_routing_equal(r, reference.route(logits, 3, 4))


@pytest.mark.parametrize("T,n,m,k,normalize", ROUTING_CASES)
def test_route_gradient(device, T, n, m, k, normalize):
    logits = make_logits(T, n, m, device=device)
    grad = torch.randn(T, k, device=device)
    a, b = leaf(logits), leaf(logits)
    (ak.route(a, k, n, normalize).topk_weights * grad).sum().backward()
    (reference.route(b, k, n, normalize).topk_weights * grad).sum().backward()
    assert_close(a.grad, b.grad, 1e-6, 1e-5, "d logits")


def test_route_gradient_all_null_is_finite(device):
    logits = make_logits(9, 4, 4, device=device, null_bias=20.0)
    a = leaf(logits)
    (ak.route(a, 3, 4).topk_weights * 3.0).sum().backward()
    assert torch.isfinite(a.grad).all()
    assert torch.all(a.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_route_gradient_half(device, dtype):
    logits = make_logits(21, 4, 4, device=device, dtype=dtype)
    grad = torch.randn(21, 3, device=device)
    a, b = leaf(logits), leaf(logits)
    (ak.route(a, 3, 4).topk_weights * grad).sum().backward()
    (reference.route(b, 3, 4).topk_weights * grad).sum().backward()
    assert a.grad.dtype == dtype
    assert_close(a.grad, b.grad, 1e-2, 1e-2, "d logits")


def test_route_m0_equals_hf_mixtral(device):
    """With m = 0 the routing is exactly transformers' Mixtral router."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(cfg).to(device)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(45, 32, device=device)
    logits, scores, indices = router(x)
    r = ak.route(logits, 2, 8)
    assert torch.equal(r.topk_ids.long().cpu(), indices.cpu())
    assert_close(r.topk_weights, scores, 1e-6, 1e-6, "weights")


def test_route_is_deterministic(device):
    logits = make_logits(50, 8, 8, device=device)
    r1, r2 = ak.route(logits, 4, 8), ak.route(logits, 4, 8)
    for field in ("topk_ids", "topk_weights", "sorted_slots", "expert_offsets"):
        assert torch.equal(getattr(r1, field), getattr(r2, field))


def test_route_zero_tokens(device):
    r = ak.route(torch.zeros(0, 6, device=device), 2, 4)
    assert r.topk_ids.shape == (0, 2) and r.sorted_slots.shape == (0,)
    assert torch.all(r.expert_offsets == 0)


def test_route_strided_logits(device):
    big = make_logits(30, 4, 4, device=device)
    logits = torch.cat([big, big], dim=1)[:, :8]   # row stride 16
    _check_routing_equal(ak.route(logits, 3, 4), reference.route(logits.contiguous(), 3, 4))
