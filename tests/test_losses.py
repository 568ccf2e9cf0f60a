"""ak.null_aware_aux_loss against reference and transformers' Mixtral loss; AlphaSchedule."""

import pytest
import torch

import adamoe_kernels as ak
from adamoe_kernels import reference
from helpers import assert_close, leaf, make_logits


def _hf_loss(*args, **kwargs):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(*args, **kwargs)


@pytest.mark.parametrize("n,m,k", [(4, 4, 3), (8, 8, 3), (4, 12, 4), (6, 1, 7)])
def test_loss_matches_reference_and_grad(device, n, m, k):
    logits = make_logits(33, n, m, device=device)
    a, b = leaf(logits), leaf(logits)
    loss = ak.null_aware_aux_loss(a, k, n)
    loss_ref = reference.null_aware_aux_loss(b, k, n)
    assert_close(loss, loss_ref, 1e-6, 1e-6, "loss")
    loss.backward()
    loss_ref.backward()
    assert_close(a.grad, b.grad, 1e-6, 1e-5, "d logits")


def test_loss_null_experts_share_their_load(device):
    """f~ is the mean null f: moving picks between null experts does not change the loss."""
    n, m, k = 4, 4, 2
    logits = make_logits(64, n, m, device=device)
    swapped = logits.clone()
    swapped[:, [n, n + 1]] = swapped[:, [n + 1, n]]  # permute two null columns
    a = ak.null_aware_aux_loss(logits, k, n)
    b = ak.null_aware_aux_loss(swapped, k, n)
    assert_close(a, b, 1e-6, 1e-6, "loss")
    # Paper eq. 6 by hand.
    probs = torch.softmax(logits.float(), -1)
    f = torch.zeros(n + m, device=device)
    for row in torch.topk(probs, k, -1).indices:
        f[row] += 1.0 / logits.shape[0]
    f_tilde = torch.cat([f[:n], f[n:].mean().repeat(m)])
    assert_close(a, (n + m) * (f_tilde * probs.mean(0)).sum(), 1e-6, 1e-6, "eq. 6")


@pytest.mark.parametrize("masked", [False, True])
def test_loss_m0_equals_hf(device, masked):
    layers = tuple(make_logits(2 * 7, 8, 0, device=device, seed=s) for s in range(3))
    mask = None
    if masked:
        mask = torch.ones(2, 7, dtype=torch.long, device=device)
        mask[0, :3] = 0
    ours = ak.null_aware_aux_loss(layers, 2, 8, attention_mask=mask)
    theirs = _hf_loss(layers, 8, 2, attention_mask=mask)
    assert_close(ours, theirs, 1e-6, 1e-6, "loss")
    assert_close(ours, reference.null_aware_aux_loss(layers, 2, 8, attention_mask=mask),
                 1e-6, 1e-6, "reference")


def test_loss_masked_rows_do_not_matter(device):
    n, m, k = 4, 4, 3
    logits = make_logits(2 * 5, n, m, device=device)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=device)
    noisy = logits.clone()
    noisy[3:5] = 100.0 * torch.randn(2, n + m, device=device)
    a = ak.null_aware_aux_loss(logits, k, n, attention_mask=mask)
    b = ak.null_aware_aux_loss(noisy, k, n, attention_mask=mask)
    assert_close(a, b, 1e-6, 1e-6, "loss")


def test_loss_bad_inputs():
    with pytest.raises(ValueError, match="attention_mask"):
        ak.null_aware_aux_loss(torch.randn(10, 6), 2, 4, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="top_k"):
        ak.null_aware_aux_loss(torch.randn(10, 6), 7, 4)
    with pytest.raises(ValueError, match=r"router_logits\[1\]"):
        ak.null_aware_aux_loss((torch.randn(10, 6), torch.randn(10, 7)), 2, 4)
    with pytest.raises(ValueError, match="at least one"):
        ak.null_aware_aux_loss((), 2, 4)


def test_alpha_schedule_paper_default():
    s = ak.AlphaSchedule()
    assert s(0) == 0.02 and s(0.99) == 0.02
    assert s(1) == 0.0001 and s(5) == 0.0001


def test_alpha_schedule_steps_and_linear():
    s = ak.AlphaSchedule.by_steps(100)
    assert s.boundaries == (0, 50) and s(49) == 0.02 and s(50) == 0.0001
    lin = ak.AlphaSchedule(values=(1.0, 0.0), boundaries=(0, 10), unit="step", linear=True)
    assert lin(5) == pytest.approx(0.5) and lin(20) == 0.0
    with pytest.raises(ValueError, match="boundaries"):
        ak.AlphaSchedule(values=(1.0, 2.0), boundaries=(3, 1))
    with pytest.raises(ValueError, match="unit"):
        ak.AlphaSchedule(unit="hour")
