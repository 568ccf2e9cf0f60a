"""AdaMoEBlock and AdaMoELoRALinear against the reference ops; a short training run of the block."""

import pytest
import torch

import adamoe_kernels as ak
from adamoe_kernels.integrations.modules import AdaMoEBlock, AdaMoELoRALinear, AdaMoERouter

H, I, N = 32, 64, 4


def _reference_block(block, x):
    flat = x.reshape(-1, H)
    r = ak.reference.route(block.router(flat), block.top_k, block.num_experts, block.normalize)
    y = ak.reference.moe_mlp(flat, block.gate_up_proj, block.down_proj, r, block.null_kind)
    return y.reshape(x.shape), r


# (m, k, normalize, null_kind, input shape): batched, T=1, m=0, k = n+m, identity nulls
BLOCK_CASES = [
    (4, 3, "true", "zero", (2, 8, H)),
    (0, 2, "true", "zero", (5, H)),
    (3, 2, "all", "identity", (1, H)),
    (2, 6, "none", "zero", (3, 1, 4, H)),
]


@pytest.mark.parametrize("m,k,normalize,null_kind,shape", BLOCK_CASES)
def test_block_matches_reference(m, k, normalize, null_kind, shape):
    """Default backend (the kernels) against the reference on the same router logits."""
    block = AdaMoEBlock(H, I, N, m, k, normalize, null_kind)
    x = torch.randn(shape)
    y = block(x)
    expected, r = _reference_block(block, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    T = x.numel() // H
    assert block.last_router_logits.shape == (T, N + m)
    assert block.last_load.dim() == 0
    assert float(block.last_load) == pytest.approx(float((r.topk_ids < N).sum()) / T)
    torch.testing.assert_close(block.aux_loss(),
                               ak.reference.null_aware_aux_loss(block.last_router_logits, k, N))


def test_block_backward_is_finite_and_matches_reference():
    block = AdaMoEBlock(H, I, N, 4, 3)
    x = torch.randn(12, H, requires_grad=True)
    (block(x).square().sum() + 0.1 * block.aux_loss()).backward()
    grads = [x.grad, block.router.weight.grad, block.gate_up_proj.grad, block.down_proj.grad]
    block_ref = AdaMoEBlock(H, I, N, 4, 3, backend="torch")
    block_ref.load_state_dict(block.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    (block_ref(x_ref).square().sum() + 0.1 * block_ref.aux_loss()).backward()
    ref = [x_ref.grad, block_ref.router.weight.grad, block_ref.gate_up_proj.grad,
           block_ref.down_proj.grad]
    for g, g_ref in zip(grads, ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_block_validation():
    with pytest.raises(ValueError, match="top_k"):
        AdaMoEBlock(H, I, N, 1, 6)
    with pytest.raises(ValueError, match="identity"):
        AdaMoEBlock(H, I, N, 2, 2, normalize="true", null_kind="identity")
    with pytest.raises(ValueError, match="normalize"):
        AdaMoEBlock(H, I, N, 2, 2, normalize="softmax")
    block = AdaMoEBlock(H, I, N, 2, 2, backend="torch")
    with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
        block(torch.randn(3, H + 1))
    with pytest.raises(RuntimeError, match="forward"):
        AdaMoEBlock(H, I, N, 2, 2).aux_loss()


def test_null_bias_is_the_load_dial():
    """A large ``null_bias`` (ak.load_control's dial) sends every token to null experts."""
    block = AdaMoEBlock(H, I, N, 4, 2, backend="torch")
    x = torch.randn(16, H)
    block(x)
    assert float(block.last_load) > 0
    block.null_bias.fill_(30.0)
    y = block(x)
    assert float(block.last_load) == 0.0
    assert torch.count_nonzero(y) == 0


def test_block_training_moves_load_toward_loss_target():
    """50 CPU steps from a router that sends every token to true experts (L = k): the task
    loss falls and the load moves to n*k/(n+m) = 1, the balance the null-aware loss asks for."""
    torch.manual_seed(0)
    n, m, k = 4, 4, 2
    teacher = AdaMoEBlock(H, I, n, 0, 2, backend="torch")
    block = AdaMoEBlock(H, I, n, m, k, backend="torch")
    with torch.no_grad():
        teacher.down_proj.mul_(3.0)
        block.router.weight[:n].fill_(0.05)
        block.router.weight[:n] += 0.01 * torch.randn(n, H)
        block.router.weight[n:].zero_()
    data = torch.randn(256, H) + 1.0
    target = teacher(data).detach()
    opt = torch.optim.Adam(block.parameters(), lr=3e-3)
    task_losses, loads = [], []
    for _ in range(50):
        idx = torch.randint(0, data.shape[0], (64,))
        task = (block(data[idx]) - target[idx]).square().mean()
        loss = task + 0.1 * block.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        task_losses.append(float(task.detach()))
        loads.append(float(block.last_load))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert loads[0] == pytest.approx(k)
    assert 0.6 < mean(loads[-10:]) < 1.5
    assert mean(task_losses[-10:]) < 0.9 * mean(task_losses[:10])


def test_router_init_from_true_rows_copies_in_segments():
    router = AdaMoERouter(H, 3, 7)
    w = torch.randn(3, H)
    router.init_from_true_rows(w)
    assert torch.equal(router.weight[:3], w)
    assert torch.equal(router.weight[3:], w[[0, 1, 2, 0, 1, 2, 0]])
    with pytest.raises(ValueError, match="true_weight"):
        router.init_from_true_rows(torch.randn(4, H))


def test_lora_linear_starts_at_base_and_matches_formula():
    base = torch.nn.Linear(H, 48)
    layer = AdaMoELoRALinear.from_linear(base, num_experts=N, num_null_experts=2, top_k=3,
                                         rank=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias
    x = torch.randn(2, 5, H)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init (LoRA paper)
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    flat = x.reshape(-1, H)
    r = ak.reference.route(layer.router(flat), 3, N)
    delta = torch.zeros(flat.shape[0], 48)
    for t in range(flat.shape[0]):
        for j in range(3):
            e = int(r.topk_ids[t, j])
            if e < N:
                delta[t] += r.topk_weights[t, j] * 2.0 * (layer.lora_B[e] @ (layer.lora_A[e]
                                                                              @ flat[t]))
    torch.testing.assert_close(y, base(x) + delta.reshape(2, 5, 48), atol=1e-5, rtol=1e-5)


def test_lora_linear_trains_only_lora_and_router():
    layer = AdaMoELoRALinear(H, 16, num_experts=N, num_null_experts=2, top_k=2, rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(1, H)  # T = 1
    (layer(x).square().sum() + layer.aux_loss()).backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    for p in (layer.router.weight, layer.lora_A, layer.lora_B):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert layer.lora_B.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="alpha"):
        AdaMoELoRALinear(H, 16, alpha=0)
    with pytest.raises(ValueError, match="top_k"):
        AdaMoELoRALinear(H, 16, num_experts=2, num_null_experts=1, top_k=4)
