"""Bad inputs raise ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import adamoe_kernels as ak
from helpers import make_experts, make_logits

H, I = 32, 48


@pytest.fixture
def good():
    logits = make_logits(10, 4, 2)
    gate_up, down = make_experts(4, H, I)
    return logits, torch.randn(10, H), gate_up, down, ak.route(logits, 3, 4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(10), 2, 4), ValueError, "router_logits must have 2 dimensions"),
    (([[1.0, 2.0]], 1, 1), TypeError, "router_logits must be a torch.Tensor"),
    ((torch.randn(10, 6, dtype=torch.float64), 2, 4), TypeError, "router_logits has dtype"),
    ((torch.randn(10, 6), 7, 4), ValueError, r"top_k \(7\) must be <= n\+m"),
    ((torch.randn(10, 6), 0, 4), ValueError, "top_k must be in"),
    ((torch.randn(10, 6), 2, 7), ValueError, r"num_experts \(7\) must be <="),
    ((torch.randn(10, 6), 2.0, 4), TypeError, "top_k must be an int"),
    ((torch.randn(10, 6), 2, 4, "softmax"), ValueError, "normalize must be one of"),
])
def test_route_bad_args(backend, args, exc, match):
    with pytest.raises(exc, match=match):
        ak.route(*args, backend=backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_route_non_finite_logits(bad):
    logits = make_logits(10, 4, 2)
    logits[3, 1] = bad
    with pytest.raises(ValueError, match="router_logits contains NaN or Inf"):
        ak.route(logits, 2, 4)


def test_route_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.route(make_logits(4, 4, 2), 2, 4, backend="cuda")


def test_env_backend(monkeypatch):
    monkeypatch.setenv("ADAMOE_BACKEND", "nope")
    with pytest.raises(ValueError, match="ADAMOE_BACKEND must be one of"):
        ak.route(make_logits(4, 4, 2), 2, 4)
    monkeypatch.setenv("ADAMOE_BACKEND", "torch")
    assert ak.route(make_logits(4, 4, 2), 2, 4).topk_ids.shape == (4, 2)


def test_moe_mlp_bad_args(good):
    logits, x, gate_up, down, r = good
    cases = [
        (dict(hidden=x[0]), ValueError, "hidden must have 2 dimensions"),
        (dict(hidden=x.double()), TypeError, "hidden has dtype"),
        (dict(gate_up_proj=gate_up.half()), TypeError, "gate_up_proj has dtype"),
        (dict(gate_up_proj=gate_up[:, :, :16]), ValueError, r"gate_up_proj.shape\[2\]"),
        (dict(gate_up_proj=gate_up[:, :-1]), ValueError, "gate_up_proj.shape\\[1\\] must be 2\\*I"),
        (dict(down_proj=down[:, :, :10]), ValueError, "down_proj must have shape"),
        (dict(hidden=x[:9]), ValueError, "routing.topk_ids has 10 tokens but hidden has 9"),
        (dict(gate_up_proj=gate_up[:3], down_proj=down[:3]), ValueError,
         "routing.expert_counts must have shape"),
        (dict(routing=(r.topk_ids, r.topk_weights)), TypeError, "routing must be an"),
        (dict(null_kind="one"), ValueError, "null_kind must be one of"),
        (dict(null_kind="identity"), ValueError, 'null_kind="identity" needs'),
    ]
    base = dict(hidden=x, gate_up_proj=gate_up, down_proj=down, routing=r, null_kind="zero")
    for change, exc, match in cases:
        with pytest.raises(exc, match=match):
            ak.moe_mlp(**{**base, **change})


@pytest.mark.gpu
def test_device_mismatch(good):
    logits, x, gate_up, down, r = good
    with pytest.raises(ValueError, match="gate_up_proj is on"):
        ak.moe_mlp(x.cuda(), gate_up, down.cuda(), ak.route(logits.cuda(), 3, 4))
    with pytest.raises(ValueError, match="routing.topk_ids is on"):
        ak.moe_mlp(x.cuda(), gate_up.cuda(), down.cuda(), r)


@pytest.mark.gpu
def test_cuda_non_finite_check_only_when_asked(monkeypatch):
    logits = make_logits(10, 4, 2, device="cuda")
    logits[0, 0] = float("nan")
    ak.route(logits, 2, 4)  # no data check (no host sync) by default on CUDA
    with pytest.raises(ValueError, match="NaN or Inf"):
        ak.route(logits, 2, 4, check_finite=True)
    monkeypatch.setenv("ADAMOE_DEBUG", "1")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ak.route(logits, 2, 4)
