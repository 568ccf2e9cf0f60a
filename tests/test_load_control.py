"""The load dial: set_target_load calibrates each layer's null bias; LoadController holds a load
in training without a loss term."""

import pytest
import torch
from torch import nn

import adamoe_kernels as ak
from adamoe_kernels.load_control import adamoe_layers


class _Residual(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def _stack(backend="torch"):
    """Two residual AdaMoE layers (n=4, m=8, k=4): the second one's input moves with the first."""
    torch.manual_seed(0)
    return nn.Sequential(*[_Residual(ak.AdaMoEBlock(32, 48, num_experts=4, num_null_experts=8,
                                                 top_k=4, backend=backend)) for _ in range(2)])


@pytest.mark.parametrize("target", [0.5, 1.5, 3.0])
def test_set_target_load_reaches_target(target):
    model = _stack()
    x = torch.randn(128, 32)
    loads = ak.set_target_load(model, target, x, iters=14)
    assert len(loads) == 2
    for layer, load in zip(adamoe_layers(model), loads):
        assert abs(load - target) < 0.05, (load, target)
        assert float(layer.last_load) == pytest.approx(load)
    # The dial is monotone: a higher target needs a lower null bias.
    biases = [float(layer.null_bias) for layer in adamoe_layers(model)]
    ak.set_target_load(model, max(target - 0.4, 0.0), x, iters=14)
    assert all(float(layer.null_bias) > b for layer, b in zip(adamoe_layers(model), biases))


def test_set_target_load_with_triton_kernels():
    model = _stack(backend="triton")
    loads = ak.set_target_load(model, 1.0, torch.randn(32, 32), iters=10, passes=2, tol=0.05)
    assert all(abs(load - 1.0) <= 0.05 for load in loads)


def test_dial_changes_selection_not_weights():
    """With the bias the kept true slots keep their unbiased normalised weights."""
    block = _stack()[0].block
    x = torch.randn(128, 32)
    block.null_bias.fill_(1.0)
    block(x)
    logits = block.last_router_logits
    bias = torch.cat([torch.zeros(4), torch.ones(8)])
    r = ak.reference.route(logits, 4, 4, selection_bias=bias)
    y = ak.reference.moe_mlp(x, block.gate_up_proj, block.down_proj, r)
    torch.testing.assert_close(block(x), y, atol=1e-5, rtol=1e-5)


def test_load_controller_holds_load_while_training():
    model = _stack()
    target = 1.0
    controller = ak.LoadController(target, rate=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(128, 32)
    y_target = torch.randn(128, 32)
    history = []
    for _ in range(60):
        loss = (model(x) - y_target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        controller.update(model)
        history.append([float(layer.last_load) for layer in adamoe_layers(model)])
    first, last = history[0], history[-1]
    for l0, l1 in zip(first, last):
        assert abs(l1 - target) < abs(l0 - target)
        assert abs(l1 - target) < 0.25


def test_load_control_errors():
    with pytest.raises(ValueError, match="no AdaMoE layers"):
        ak.set_target_load(nn.Linear(4, 4), 1.0, torch.randn(2, 4))
    with pytest.raises(ValueError, match="target_load must be >= 0"):
        ak.LoadController(-1.0)
    with pytest.raises(ValueError, match="rate must be > 0"):
        ak.LoadController(1.0, rate=0.0)
