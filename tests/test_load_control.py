"""The load dial: set_target_load calibrates each layer's null bias; LoadController holds a load
in training without a loss term; set_top_p routes every layer with top-p."""

import pytest
import torch
from torch import nn

import adamoe_kernels as ak
from adamoe_kernels.ops.backend import cpu_extension_available
from adamoe_kernels.integrations.load_control import adamoe_layers


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


# ---- top-p routing on the layers (ak.set_top_p) -----------------------------------------------

TOP_P_BACKENDS = ["torch", "triton"] + (["cpu"] if cpu_extension_available() else [])


@pytest.mark.parametrize("backend,p", [("torch", 0.3), ("torch", 0.9)]
                         + [(b, 0.6) for b in TOP_P_BACKENDS])
def test_set_top_p_matches_reference(backend, p):
    """The layer routes exactly as reference.route(..., top_p=p) on its input (every backend in
    its own routing: Triton, C++ or the torch reference)."""
    model = _stack(backend)
    x = torch.randn(48, 32)
    assert ak.set_top_p(model, p) is model
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
             for layer in adamoe_layers(model)]
    model(x)
    for h in hooks:
        h.remove()
    for layer, inp in zip(adamoe_layers(model), inputs):
        assert layer.top_p == p
        logits = layer.router(inp).float()
        r = ak.reference.route(logits, 4, 4, top_p=p)
        assert float(layer.last_load) == pytest.approx(float(r.load()))
        y_ref = ak.reference.moe_mlp(inp, layer.gate_up_proj, layer.down_proj, r)
        torch.testing.assert_close(layer(inp), y_ref, atol=1e-4, rtol=1e-4)


def test_set_top_p_load_falls_and_none_restores():
    model = _stack()
    x = torch.randn(128, 32)
    y_plain = model(x)
    plain = [float(layer.last_load) for layer in adamoe_layers(model)]
    loads = []
    for p in (1.0, 0.9, 0.7, 0.5, 0.3, 0.1):
        ak.set_top_p(model, p)
        model(x)
        loads.append(sum(float(layer.last_load) for layer in adamoe_layers(model)) / 2)
    assert all(a >= b for a, b in zip(loads, loads[1:])), loads
    assert loads[-1] < 0.5 * loads[0], loads
    assert loads[0] == pytest.approx(sum(plain) / 2)  # p = 1 keeps the whole top-k
    ak.set_top_p(model, None)
    assert all(layer.top_p is None for layer in adamoe_layers(model))
    torch.testing.assert_close(model(x), y_plain)
    assert [float(layer.last_load) for layer in adamoe_layers(model)] == plain


def test_set_top_p_combines_with_the_dial():
    """The null bias picks the top-k, top-p then truncates it: load below either alone."""
    block = _stack()[0].block
    x = torch.randn(128, 32)
    block.null_bias.fill_(0.5)
    ak.set_top_p(block, 0.6)
    block(x)
    bias = torch.cat([torch.zeros(4), torch.full((8,), 0.5)])
    r = ak.reference.route(block.last_router_logits, 4, 4, top_p=0.6, selection_bias=bias)
    assert float(block.last_load) == pytest.approx(float(r.load()))
    ak.load_control.reset_null_bias(block)
    assert float(block.null_bias) == 0.0


@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (1.5, ValueError), (-0.2, ValueError),
                                     (float("nan"), ValueError), (True, TypeError),
                                     ("0.5", TypeError)])
def test_set_top_p_rejects_bad_p(bad, err):
    model = _stack()
    with pytest.raises(err, match="top_p"):
        ak.set_top_p(model, bad)
    assert all(layer.top_p is None for layer in adamoe_layers(model))


def test_set_top_p_errors_on_models_without_top_p():
    with pytest.raises(ValueError, match="no AdaMoE layers"):
        ak.set_top_p(nn.Linear(4, 4), 0.5)

    class Custom(nn.Module):  # has a load dial, no top-p
        def __init__(self):
            super().__init__()
            self.register_buffer("null_bias", torch.zeros(()))
            self.last_load = torch.zeros(())

    with pytest.raises(TypeError, match="no top_p attribute"):
        ak.set_top_p(Custom(), 0.5)


def test_set_top_p_survives_save_and_reload(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, experts_implementation="eager")
    model = ak.convert_model(transformers.MixtralForCausalLM(cfg), num_null_experts=4, top_k=3,
                             backend="torch")
    ak.set_top_p(model, 0.7)
    assert model.config.adamoe["top_p"] == 0.7
    ids = torch.randint(0, 64, (2, 8))
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    loaded = ak.from_pretrained(tmp_path / "ckpt", backend="torch").eval()
    assert [layer.top_p for layer in adamoe_layers(loaded)] == [0.7, 0.7]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)
    ak.set_top_p(loaded, None)
    assert "top_p" not in loaded.config.adamoe
    assert all(layer.top_p is None for layer in adamoe_layers(loaded))


@pytest.mark.skipif(not cpu_extension_available(), reason="C++ CPU backend not built")
@pytest.mark.parametrize("dial", ["target_load", "top_p", "both"])
def test_cpu_backend_dials_route_in_cpp(dial, monkeypatch):
    """A layer on the C++ backend routes with the null bias and top-p in C++ (never through the
    torch reference) and gives the torch backend's outputs and loads."""
    x = torch.randn(96, 32)
    cpu_model, torch_model = _stack("cpu"), _stack("torch")  # same seed: the same weights

    def no_reference(*args, **kwargs):
        raise AssertionError("the cpu backend fell back to reference.route")

    monkeypatch.setattr(ak.reference, "route", no_reference)
    calls = []
    from adamoe_kernels.ops import cpu as cpu_ops
    real_route_cpu = cpu_ops.route_cpu
    monkeypatch.setattr(cpu_ops, "route_cpu",
                        lambda *a, **kw: calls.append(a[4:]) or real_route_cpu(*a, **kw))
    if dial in ("target_load", "both"):
        loads = ak.set_target_load(cpu_model, 1.0, x, iters=10, passes=2, tol=0.05)
        assert all(abs(load - 1.0) <= 0.05 for load in loads)
    if dial in ("top_p", "both"):
        ak.set_top_p(cpu_model, 0.6)
    with torch.no_grad():
        y_cpu = cpu_model(x)
    cpu_loads = [float(layer.last_load) for layer in adamoe_layers(cpu_model)]
    assert calls and all(a[0] == (0.6 if dial != "target_load" else None) for a in calls[-2:])
    assert all((a[1] is not None) == (dial != "top_p") for a in calls[-2:])
    monkeypatch.undo()

    for src, dst in zip(adamoe_layers(cpu_model), adamoe_layers(torch_model)):
        dst.null_bias.copy_(src.null_bias)
    if dial in ("top_p", "both"):
        ak.set_top_p(torch_model, 0.6)
    with torch.no_grad():
        y_torch = torch_model(x)
    assert [float(layer.last_load) for layer in adamoe_layers(torch_model)] == cpu_loads
    torch.testing.assert_close(y_cpu, y_torch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if cpu_extension_available() else []))
def test_cpu_selection_bias_follows_every_change_of_null_bias(backend):
    """On CPU the selection bias is built once per bias value: every way of changing
    ``null_bias`` (in place, through ``.data``, a new tensor) routes with the new value, and
    each forward leaves a new ``last_load`` tensor (a kept one does not change under you)."""
    block = _stack(backend)[0].block
    x = torch.randn(64, 32)

    loads = []
    setters = [lambda v: block.null_bias.fill_(v), lambda v: block.null_bias.data.fill_(v),
               lambda v: setattr(block, "null_bias", torch.tensor(v)),
               lambda v: block.null_bias.fill_(v)]
    with torch.no_grad():
        for setter, value in zip(setters, [1.0, -0.5, 0.25, 1.0]):
            setter(value)
            y = block(x)
            bias = torch.cat([torch.zeros(4), torch.full((8,), value)])
            r = ak.reference.route(block.router(x), 4, 4, selection_bias=bias)
            y_ref = ak.reference.moe_mlp(x, block.gate_up_proj, block.down_proj, r)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
            assert float(block.last_load) == pytest.approx(float(r.load()))
            loads.append((block.last_load, float(r.load())))
    assert len({id(t) for t, _ in loads}) == len(loads)
    assert [float(t) for t, _ in loads] == pytest.approx([v for _, v in loads])
    assert len({v for _, v in loads}) >= 3  # the values really moved the load

