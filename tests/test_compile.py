"""torch.compile(fullgraph=True) traces route + moe_mlp (no graph break, so no host sync), and the
custom ops pass torch.library.opcheck."""

import pytest
import torch

import adamoe_kernels as ak
from adamoe_kernels.ops import grouped_mlp, routing
from helpers import assert_close, leaf, make_experts, make_logits

H, I = 32, 32


def _layer(logits, x, gate_up, down):
    r = ak.route(logits, 3, 4)
    return ak.moe_mlp(x, gate_up, down, r)


def test_compile_fullgraph_forward_backward(device):
    torch._dynamo.reset()
    logits = make_logits(12, 4, 4, device=device)
    x = torch.randn(12, H, device=device)
    gate_up, down = make_experts(4, H, I, device=device)
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")
    eager_in = [leaf(t) for t in (logits, x, gate_up, down)]
    comp_in = [leaf(t) for t in (logits, x, gate_up, down)]
    y_eager = _layer(*eager_in)
    y_comp = compiled(*comp_in)
    assert torch.equal(y_eager, y_comp)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for a, b in zip(eager_in, comp_in):
        assert_close(a.grad, b.grad, 1e-6, 1e-6, "grad")


def test_opcheck_route(device):
    logits = make_logits(9, 4, 3, device=device).requires_grad_()
    torch.library.opcheck(routing.route_op, (logits, 3, 4, "true"))
    ids = ak.route(logits, 3, 4).topk_ids
    torch.library.opcheck(routing.route_backward_op,
                          (torch.randn(9, 3, device=device), logits.detach(), ids, 4, "all"))


@pytest.mark.parametrize("null_kind,normalize", [("zero", "true"), ("identity", "all")])
def test_opcheck_moe_mlp(device, null_kind, normalize):
    r = ak.route(make_logits(10, 4, 3, device=device), 3, 4, normalize)
    x = torch.randn(10, H, device=device, requires_grad=True)
    gate_up, down = (t.requires_grad_() for t in make_experts(4, H, I, device=device))
    w = r.topk_weights.detach().requires_grad_()
    args = (x, gate_up, down, r.topk_ids, w, r.sorted_slots, r.expert_offsets, null_kind)
    torch.library.opcheck(grouped_mlp.moe_mlp_op, args)
    torch.library.opcheck(grouped_mlp.moe_mlp_backward_op,
                          (torch.randn(10, H, device=device),) + tuple(
                              a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                          + (True,))


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    """route + moe_mlp forward and backward never synchronise with the host."""
    logits = make_logits(256, 8, 8, device="cuda", dtype=torch.bfloat16).requires_grad_()
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gate_up, down = (t.requires_grad_() for t in make_experts(8, 128, 256, device="cuda",
                                                               dtype=torch.bfloat16))
    grad = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    ak.moe_mlp(x, gate_up, down, ak.route(logits, 3, 8)).backward(grad)  # warm-up: compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ak.moe_mlp(x, gate_up, down, ak.route(logits, 3, 8))
        y.backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
