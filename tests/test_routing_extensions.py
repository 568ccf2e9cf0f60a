"""Top-p with null experts and the selection bias (the load dial): kernels against reference."""

import pytest
import torch

import adamoe_kernels as ak
from adamoe_kernels import reference
from helpers import assert_close, leaf, make_experts, make_logits
from test_routing import _check_routing_equal


@pytest.mark.parametrize("T,n,m,k,normalize,top_p", [
    (1, 4, 2, 3, "true", 0.5),
    (37, 4, 4, 4, "true", 0.6),
    (20, 6, 1, 7, "all", 0.9),
    (24, 3, 5, 4, "none", 0.3),
    (17, 8, 0, 4, "true", 0.7),
])
def test_top_p_matches_reference(device, T, n, m, k, normalize, top_p):
    logits = make_logits(T, n, m, device=device) * 2.0
    r = ak.route(logits, k, n, normalize, top_p=top_p)
    rr = reference.route(logits, k, n, normalize, top_p=top_p)
    _check_routing_equal(r, rr)
    dropped = r.topk_ids == n + m
    assert torch.all(r.topk_weights[dropped] == 0)
    assert torch.all(dropped.sum(1) < k)                    # the first slot is always kept
    probs = torch.softmax(logits.float(), -1).sort(-1, descending=True).values[:, :k]
    kept_mass = (probs * ~dropped).sum(1)
    assert torch.all((kept_mass >= top_p - 1e-6) | ~dropped.any(1))


def test_top_p_one_keeps_top_k(device):
    logits = make_logits(30, 4, 4, device=device)
    _check_routing_equal(ak.route(logits, 3, 4, top_p=1.0), reference.route(logits, 3, 4))


def test_selection_bias_moves_the_load(device):
    n, m, k = 4, 8, 4
    logits = make_logits(64, n, m, device=device)
    loads = []
    for b in (-4.0, 0.0, 4.0):
        bias = torch.cat([torch.zeros(n), torch.full((m,), b)]).to(device)
        r = ak.route(logits, k, n, selection_bias=bias)
        _check_routing_equal(r, reference.route(logits, k, n, selection_bias=bias))
        loads.append(float(r.load()))
    assert loads[0] > loads[1] > loads[2]
    # The bias chooses experts; the weights still come from the unbiased probabilities.
    bias = torch.cat([torch.zeros(n), torch.full((m,), 4.0)]).to(device)
    r = ak.route(logits, k, n, "none", selection_bias=bias)
    probs = torch.softmax(logits.float(), -1).gather(1, r.topk_ids.long())
    assert_close(r.topk_weights, probs, 1e-6, 1e-6, "weights")


@pytest.mark.parametrize("normalize", ["true", "all", "none"])
def test_extensions_gradient_through_moe_mlp(device, normalize):
    T, n, m, k, H, I = 19, 4, 4, 4, 32, 32
    logits = make_logits(T, n, m, device=device)
    bias = torch.linspace(-1, 1, n + m).to(device)
    x = torch.randn(T, H, device=device)
    gate_up, down = make_experts(n, H, I, device=device)
    grad = torch.randn(T, H, device=device)
    outs = []
    for api, kw in ((ak, {"backend": "triton"}), (reference, {})):
        lg, xx = leaf(logits), leaf(x)
        r = api.route(lg, k, n, normalize, top_p=0.6, selection_bias=bias, **kw)
        y = api.moe_mlp(xx, gate_up, down, r, **kw)
        (y * grad).sum().backward()
        outs.append((y, lg.grad, xx.grad))
    for a, b, name in zip(outs[0], outs[1], ("y", "d logits", "d hidden")):
        assert_close(a, b, 1e-5, 1e-4, name)


def test_extension_bad_args():
    logits = make_logits(5, 4, 2)
    with pytest.raises(ValueError, match="top_p must be in"):
        ak.route(logits, 2, 4, top_p=0.0)
    with pytest.raises(TypeError, match="top_p must be a float"):
        ak.route(logits, 2, 4, top_p="0.5")
    with pytest.raises(ValueError, match="selection_bias must have n\\+m = 6"):
        ak.route(logits, 2, 4, selection_bias=torch.zeros(5))
    with pytest.raises(ValueError, match="selection_bias contains NaN"):
        ak.route(logits, 2, 4, selection_bias=torch.full((6,), float("nan")))
