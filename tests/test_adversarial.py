"""Adversarial inputs (issue 22): finite logits that used to give NaN gradients, exact ties,
hand-built Routings that used to read out of bounds, layers with nothing to compute, and losses
over no rows. Every backend must give the oracle's answer or a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import adamoe_kernels as ak
from adamoe_kernels import reference
from adamoe_kernels.losses import aux_loss_terms
from adamoe_kernels.ops.backend import cpu_extension_available

from helpers import make_experts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (backend, device): every backend this machine can run.
BACKEND_DEVICES = [("torch", "cpu")]
if cpu_extension_available():
    BACKEND_DEVICES.append(("cpu", "cpu"))
if os.environ.get("TRITON_INTERPRET") == "1":
    BACKEND_DEVICES.append(("triton", "cpu"))
if torch.cuda.is_available():
    BACKEND_DEVICES += [("torch", "cuda"), ("triton", "cuda")]
IDS = [f"{b}-{d}" for b, d in BACKEND_DEVICES]


def _oracle_true_weights(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """``p_j / sum_true p`` in float64 from the logits (differentiable): an independent oracle."""
    z = logits.double().gather(1, ids.long())
    is_true = ids.long() < n
    z = torch.where(is_true, z, torch.full_like(z, float("-inf")))
    z = torch.where(is_true.any(-1, keepdim=True), z, torch.zeros_like(z))
    return torch.where(is_true, torch.softmax(z, -1), torch.zeros_like(z))


# ---- 1. normalize="true" when every true probability underflows ------------------------------

@pytest.mark.parametrize("backend,dev", BACKEND_DEVICES, ids=IDS)
def test_denormal_true_probabilities_give_finite_gradients(backend, dev):
    # The case: the null logit is 88 above the true ones, so p_true is denormal in fp32.
    lg = torch.tensor([[-88.0, -89.0, 0.0]], device=dev, requires_grad=True)
    r = ak.route(lg, 3, 2, backend=backend)
    g = torch.tensor([[1.0, 2.0, 3.0]], device=dev)
    (r.topk_weights * g).sum().backward()
    assert torch.isfinite(lg.grad).all(), lg.grad
    lg64 = lg.detach().double().requires_grad_(True)
    w64 = _oracle_true_weights(lg64, r.topk_ids, 2)
    (w64 * g.double()).sum().backward()
    torch.testing.assert_close(r.topk_weights.double(), w64.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lg.grad.double(), lg64.grad, atol=1e-6, rtol=1e-5)

    # Property: random shapes, true logits 80..150 below the nulls (denormal or exactly 0 in fp32).
    gen = torch.Generator().manual_seed(22)
    for trial in range(6):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        m = int(torch.randint(1, 5, (1,), generator=gen))
        k = int(torch.randint(1, n + m + 1, (1,), generator=gen))
        T = int(torch.randint(1, 40, (1,), generator=gen))
        base = torch.randn(T, n + m, generator=gen) * 3
        gap = 80 + 70 * torch.rand(T, 1, generator=gen)
        far = torch.rand(T, 1, generator=gen) < 0.7          # most tokens: huge gap
        base[:, :n] -= torch.where(far, gap, torch.zeros_like(gap))
        lg = base.to(dev).requires_grad_(True)
        r = ak.route(lg, k, n, backend=backend)
        gw = torch.randn(T, k, generator=gen).to(dev)
        (r.topk_weights * gw).sum().backward()
        assert torch.isfinite(r.topk_weights).all() and torch.isfinite(lg.grad).all(), trial
        lg64 = lg.detach().double().requires_grad_(True)
        w64 = _oracle_true_weights(lg64, r.topk_ids, n)
        (w64 * gw.double()).sum().backward()
        torch.testing.assert_close(r.topk_weights.double(), w64.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lg.grad.double(), lg64.grad, atol=1e-5, rtol=1e-4)
        # Every token with a true slot has weights summing to 1, all-null ones to 0.
        has_true = (r.topk_ids < n).any(-1)
        torch.testing.assert_close(r.topk_weights.sum(-1).double().cpu(), has_true.double().cpu(),
                                   atol=1e-5, rtol=0)


# ---- 2. exact ties: the lower index (a true expert before a null one) wins -------------------

def _expected_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by fp32 probability, ties to the lower index, by plain Python sorting."""
    probs = torch.softmax(logits.float(), -1).tolist()
    rows = [sorted(range(len(p)), key=lambda c: (-p[c], c))[:k] for p in probs]
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("backend,dev", BACKEND_DEVICES, ids=IDS)
def test_exact_ties_go_to_the_lower_index(backend, dev):
    # Null columns that copy the true columns (what convert_model's router does): every true
    # expert ties with its null copy, so with k = 3 each token takes e1, null(e1), e2: load 2.
    T, n = 50, 4
    true = torch.randn(T, n)
    logits = torch.cat([true, true], dim=1).to(dev)
    r = ak.route(logits, 3, n, backend=backend)
    assert torch.equal(r.topk_ids.cpu(), _expected_ids(logits.cpu(), 3))
    assert float(r.load()) == 2.0
    hits, _, _ = aux_loss_terms(logits, 3, n)
    assert torch.equal(hits[:n].cpu(), r.expert_counts.float().cpu())
    # Many ties of every kind: integer logits (exact in bf16, fp16 and fp32).
    for dtype in (torch.float32, torch.bfloat16):
        lg = torch.randint(-2, 3, (64, 7), generator=torch.Generator().manual_seed(3))
        lg = lg.to(device=dev, dtype=dtype)
        r = ak.route(lg, 4, 3, backend=backend)
        assert torch.equal(r.topk_ids.cpu(), _expected_ids(lg.cpu(), 4)), dtype
        assert torch.equal(r.topk_ids.cpu(), reference.route(lg, 4, 3).topk_ids.cpu())


def test_converted_model_keeps_its_loss_on_every_backend():
    # convert_model copies the trained router rows into the null rows: the ties must keep each
    # token on its true experts (load 2 with k=3), whichever backend runs it.
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    losses, loads = [], []
    for backend, dev in BACKEND_DEVICES:
        if dev != "cpu":
            continue
        torch.manual_seed(0)
        model = MixtralForCausalLM(cfg).eval()
        ak.convert_model(model, num_null_experts=4, top_k=3, backend=backend)
        with torch.no_grad():
            losses.append(float(model(ids, labels=ids).loss))
        loads.append(ak.expert_load(model))
    for load in loads:
        assert all(abs(v - 2.0) < 1e-6 for v in load), loads
    assert max(losses) - min(losses) < 1e-4, losses


# ---- 3. hand-built Routings ----------------------------------------------------------------

def _valid_routing(T=6, n=3, m=2, k=2):
    lg = torch.randn(T, n + m)
    lg[0, n:] += 20  # token 0: all null
    lg[1:, 0] += 20  # every other token on expert 0 (a segment of several rows)
    return reference.route(lg, k, n)


def _corruptions(r: ak.Routing):
    """(what, Routing) pairs, each inconsistent in one way."""
    T, k = r.topk_ids.shape
    A = int(r.expert_offsets[-1])
    out = []

    def edit(what, **fields):
        d = dict(topk_ids=r.topk_ids, topk_weights=r.topk_weights,
                 expert_counts=r.expert_counts, expert_offsets=r.expert_offsets,
                 sorted_slots=r.sorted_slots, normalize=r.normalize)
        d.update(fields)
        out.append((what, ak.Routing(**d)))

    s = r.sorted_slots.clone()
    s[1] = s[0]  # a repeated true slot (the out-of-bounds combine)
    edit("repeated slot", sorted_slots=s)
    s = r.sorted_slots.clone()
    s[0] = T * k
    edit("slot >= T*k", sorted_slots=s)
    s = r.sorted_slots.clone()
    s[0] = -1
    edit("negative slot", sorted_slots=s)
    o = r.expert_offsets.clone()
    o[-1] = T * k + 5
    edit("offsets past T*k", expert_offsets=o)
    o = r.expert_offsets.clone()
    o[1] = o[2] + 1
    edit("offsets not monotone", expert_offsets=o)
    ids = r.topk_ids.clone()
    ids[1, 0] = -1
    edit("negative id", topk_ids=ids)
    s = r.sorted_slots.clone()
    s[:A] = s[:A].flip(0)
    edit("slots in the wrong experts", sorted_slots=s)
    c = r.expert_counts.clone()
    c[0] += 1
    edit("counts do not count", expert_counts=c)
    s = r.sorted_slots.clone()
    lo = int(r.expert_offsets[0])  # expert 0 has T-1 rows: swap two of them
    s[lo], s[lo + 1] = int(s[lo + 1]), int(s[lo])
    edit("slots out of order", sorted_slots=s)
    return out


@pytest.mark.parametrize("backend,dev", BACKEND_DEVICES, ids=IDS)
def test_malformed_routing_raises(backend, dev):
    if dev != "cpu":
        pytest.skip("CUDA checks the Routing only under ADAMOE_DEBUG=1 / validate=True")
    T, n, H, I, r_ = 6, 3, 16, 16, 4
    x = torch.randn(T, H)
    gate_up, down = make_experts(n, H, I)
    lora_A, lora_B = torch.randn(n, r_, H), torch.randn(n, H, r_)
    good = _valid_routing(T, n)
    ak.moe_mlp(x, gate_up, down, good, backend=backend)  # the valid one passes
    for what, bad in _corruptions(good):
        if backend == "cpu" and what in ("counts do not count", "slots out of order"):
            continue  # the C++ ops read only the offsets and combine in slot order: these two
            # cannot misdirect them (their answer is the valid Routing's)
        with pytest.raises(ValueError, match="routing|topk_ids|sorted_slots|expert_offsets"):
            ak.moe_mlp(x, gate_up, down, bad, backend=backend)
        with pytest.raises(ValueError, match="routing|topk_ids|sorted_slots|expert_offsets"):
            ak.moe_lora(x, lora_A, lora_B, bad, backend=backend)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_triton_kernels_stay_inside_their_buffers_for_any_routing():
    # The unchecked path (what CUDA runs without ADAMOE_DEBUG): call the ops directly with each
    # corrupted Routing. They used to segfault the interpreter; now every index read from the
    # Routing is clamped. A subprocess, so a crash fails this test instead of the session.
    script = textwrap.dedent("""
        import torch, adamoe_kernels as ak
        from adamoe_kernels import reference
        from adamoe_kernels.ops.grouped_mlp import moe_mlp_triton
        from adamoe_kernels.ops.lora import moe_lora_triton
        import test_adversarial as t
        torch.manual_seed(0)
        T, n, H, I, r_ = 6, 3, 16, 16, 4
        x = torch.randn(T, H, requires_grad=True)
        gate_up, down = (w.requires_grad_() for w in t.make_experts(n, H, I))
        A, B = torch.randn(n, r_, H, requires_grad=True), torch.randn(n, H, r_, requires_grad=True)
        for what, bad in t._corruptions(t._valid_routing(T, n)):
            args = (bad.topk_ids, bad.topk_weights.requires_grad_(), bad.sorted_slots,
                    bad.expert_offsets)
            y = moe_mlp_triton(x, gate_up, down, *args, "zero")
            y.float().sum().backward()
            y = moe_lora_triton(x, A, B, *args, 1.0)
            y.float().sum().backward()
            print("ran", what)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", ADAMOE_POISON_EMPTY="0",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ran ") == len(_corruptions(_valid_routing()))


# ---- 4. nothing to compute: the zero output still has a gradient -----------------------------

@pytest.mark.parametrize("backend,dev", BACKEND_DEVICES, ids=IDS)
@pytest.mark.parametrize("case", ["T=0", "all-null"])
def test_zero_output_is_differentiable(backend, dev, case):
    n, m, k, H, I, r_ = 3, 2, 2, 16, 16, 4
    T = 0 if case == "T=0" else 5
    lg = torch.randn(T, n + m, device=dev)
    lg[:, n:] += 30.0  # every token all-null
    lg.requires_grad_(True)
    x = torch.randn(T, H, device=dev, requires_grad=True)
    gate_up, down = (w.to(dev).requires_grad_() for w in make_experts(n, H, I))
    r = ak.route(lg, k, n, backend=backend)
    assert int(r.expert_offsets[-1]) == 0
    y = ak.moe_mlp(x, gate_up, down, r, backend=backend)
    assert y.requires_grad and torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    for t in (x, gate_up, down, lg):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t.grad))
    A = torch.randn(n, r_, H, device=dev, requires_grad=True)
    B = torch.randn(n, H, r_, device=dev, requires_grad=True)
    r = ak.route(lg, k, n, backend=backend)
    d = ak.moe_lora(x, A, B, r, 2.0, backend=backend)
    assert d.requires_grad and torch.equal(d, torch.zeros_like(d))
    d.sum().backward()
    for t in (A, B):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t.grad))


# ---- 5. the aux loss over no rows ----------------------------------------------------------

@pytest.mark.parametrize("fn", [ak.null_aware_aux_loss, reference.null_aware_aux_loss],
                         ids=["ak", "reference"])
def test_aux_loss_over_no_rows_is_zero(fn):
    empty = torch.zeros(0, 6, requires_grad=True)
    loss = fn(empty, 2, 4)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(empty.grad, torch.zeros_like(empty))
    lg = torch.randn(8, 6, requires_grad=True)
    loss = fn(lg, 2, 4, attention_mask=torch.zeros(2, 4))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(lg.grad, torch.zeros_like(lg))
    # One counted row still gives the ordinary value (the guard changes nothing else).
    mask = torch.zeros(2, 4)
    mask[0, 0] = 1
    torch.testing.assert_close(fn(lg.detach(), 2, 4, attention_mask=mask),
                               fn(lg.detach()[:1], 2, 4))


# ---- 6. clear errors, and the Triton answer for hidden [T, 0] --------------------------------

@pytest.mark.parametrize("backend", [None, "torch", "cpu", "triton"])
def test_meta_tensors_get_a_clear_error(backend):
    lg = torch.randn(4, 6, device="meta")
    with pytest.raises(ValueError, match="router_logits is a meta tensor"):
        ak.route(lg, 2, 4, backend=backend)
    r = reference.route(torch.randn(4, 6), 2, 4)
    gate_up, down = make_experts(4, 8, 8)
    with pytest.raises(ValueError, match="hidden is a meta tensor"):
        ak.moe_mlp(torch.randn(4, 8, device="meta"), gate_up, down, r, backend=backend)


@pytest.mark.parametrize("backend,dev", BACKEND_DEVICES, ids=IDS)
def test_zero_width_hidden(backend, dev):
    n, T = 3, 5
    for _ in range(3):  # uninitialised scratch shows up as garbage in some of the runs
        x = torch.randn(T, 0, device=dev, requires_grad=True)
        gate_up = torch.randn(n, 8, 0, device=dev, requires_grad=True)
        down = torch.randn(n, 0, 4, device=dev, requires_grad=True)
        lg = torch.randn(T, n + 2, device=dev, requires_grad=True)
        r = ak.route(lg, 2, n, backend=backend)
        y = ak.moe_mlp(x, gate_up, down, r, backend=backend)
        assert y.shape == (T, 0)
        y.sum().backward()
        assert torch.equal(lg.grad, torch.zeros_like(lg))
        assert torch.equal(gate_up.grad, torch.zeros_like(gate_up))


# ---- 10. the Triton bf16 output is rounded once ------------------------------------------------

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs the Triton backend")
def test_triton_bf16_output_as_close_as_a_plain_bf16_layer():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    T, n, m, k, H, I = 48, 4, 2, 3, 64, 64
    lg = torch.randn(T, n + m, device=dev)
    x = torch.randn(T, H, device=dev).bfloat16()
    gate_up, down = (w.to(dev).bfloat16() for w in make_experts(n, H, I))
    r = ak.route(lg, k, n, backend="triton")
    exact = reference.moe_mlp(x.float(), gate_up.float(), down.float(), r)
    ours = ak.moe_mlp(x, gate_up, down, r, backend="triton").float()
    plain = reference.moe_mlp(x, gate_up, down, r).float()  # bf16 GEMMs, bf16 per-expert rows
    err_ours = (ours - exact).abs().mean()
    err_plain = (plain - exact).abs().mean()
    assert err_ours <= 1.1 * err_plain, (float(err_ours), float(err_plain))
