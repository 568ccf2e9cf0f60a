"""Autograd and fake (meta) registration of the C++ CPU kernels (``adamoe_kernels._C``).

The C++ extension defines six ops (``python_bindings/bindings.cpp``):

* ``adamoe::route_cpu(router_logits, top_k, num_experts, normalize, top_p=None,
  selection_bias=None) -> (topk_ids, topk_weights, expert_counts, expert_offsets, sorted_slots)``;
  NaN/Inf in the logits or the bias is a ``ValueError`` from the kernel itself.
* ``adamoe::route_backward_cpu(grad_topk_weights, router_logits, topk_ids, num_experts, normalize)
  -> grad_router_logits``
* ``adamoe::moe_mlp_forward_cpu(hidden, gate_up_proj, down_proj, topk_ids, topk_weights,
  sorted_slots, expert_offsets, null_kind) -> (y, gate_up_out)``; ``gate_up_out [A, 2I]`` (``A`` =
  number of true assignments) is the only activation saved for the backward.
* ``adamoe::moe_mlp_backward_cpu(grad_y, hidden, gate_up_proj, down_proj, topk_ids, topk_weights,
  sorted_slots, expert_offsets, gate_up_out, null_kind, output_mask)
  -> (grad_hidden, grad_gate_up_proj, grad_down_proj, grad_topk_weights)``
* ``adamoe::moe_lora_forward_cpu(x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots,
  expert_offsets, scaling) -> (y, u)``; ``u [T*k, r]`` float32 (``lora_A[e] @ x_t`` per true slot,
  zero rows for the null slots) is the only activation saved for the backward.
* ``adamoe::moe_lora_backward_cpu(grad_y, x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots,
  expert_offsets, u, scaling, output_mask) -> (grad_x, grad_lora_A, grad_lora_B,
  grad_topk_weights)``

This module gives the forward ops their autograd formulas (``torch.library.register_autograd``)
and fake kernels, so they work under autograd and trace with ``torch.compile``.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.adamoe.*_cpu)

_ops = torch.ops.adamoe


def cpu_features() -> dict[str, bool]:
    """Which of the C++ backend's own kernels run in this process.

    ``avx512`` (fp32 small-M/small-K GEMMs and elementwise loops), ``avx512_bf16`` (the VDPBF16PS
    bf16 GEMMs), ``amx_bf16`` (the AMX bf16 GEMMs, Intel Xeon since Sapphire Rapids), ``intel``
    (picks the GEMM crossover points). ``ADAMOE_CPU_PORTABLE=1`` turns the first three off,
    ``ADAMOE_CPU_NO_AMX=1`` the AMX kernels alone (both read once per process).
    """
    return dict(_C.cpu_features())


def _call(op, differentiable: tuple, *args):
    """``op(*args)``; when no gradient is wanted (``no_grad``, inference, frozen inputs) and no
    ``torch.compile`` trace is running, straight to the CPU kernel, past the Python autograd
    wrapper ``register_autograd`` installs (~5 us a call, measured at T=1)."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    if wants_grad or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---- routing ----------------------------------------------------------------------------------

@torch.library.register_fake("adamoe::route_cpu")
def _route_fake(router_logits, top_k, num_experts, normalize, top_p=None, selection_bias=None):
    T = router_logits.shape[0]
    new = router_logits.new_empty
    return (new((T, top_k), dtype=torch.int32), new((T, top_k), dtype=torch.float32),
            new((num_experts,), dtype=torch.int32), new((num_experts + 1,), dtype=torch.int32),
            new((T * top_k,), dtype=torch.int32))


@torch.library.register_fake("adamoe::route_backward_cpu")
def _route_backward_fake(grad_topk_weights, router_logits, topk_ids, num_experts, normalize):
    return torch.empty_like(router_logits, memory_format=torch.contiguous_format)


def _route_setup_context(ctx, inputs, output):
    router_logits, _, num_experts, normalize = inputs[:4]
    ctx.save_for_backward(router_logits, output[0])  # logits (softmax is recomputed), topk_ids
    ctx.num_experts, ctx.normalize = num_experts, normalize


def _route_backward(ctx, g_ids, g_weights, g_counts, g_offsets, g_slots):
    router_logits, ids = ctx.saved_tensors
    if g_weights is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    # ids n+m (slots dropped by top-p) get no gradient; the selection bias never has one (it only
    # chooses the experts).
    grad = _ops.route_backward_cpu(g_weights, router_logits, ids, ctx.num_experts, ctx.normalize)
    return grad, None, None, None, None, None


torch.library.register_autograd("adamoe::route_cpu", _route_backward,
                                setup_context=_route_setup_context)


def route_cpu(router_logits: torch.Tensor, top_k: int, num_experts: int, normalize: str,
              top_p: float | None = None, selection_bias: torch.Tensor | None = None):
    """Fused CPU routing (softmax, top-k, null drop, normalisation, counting sort).

    ``selection_bias [n+m]`` (optional) is added to the logits only to choose the experts;
    ``top_p`` (optional, in ``(0, 1]``) keeps slot ``j`` while the selection mass before it is below
    ``top_p`` (dropped slots: id ``n+m``, weight 0). Semantics of ``reference.route``.

    Returns ``(topk_ids int32 [T, k], topk_weights float32 [T, k], expert_counts int32 [n],
    expert_offsets int32 [n+1], sorted_slots int32 [T*k])``; ``topk_weights`` is differentiable
    w.r.t. ``router_logits``.
    """
    if top_p is not None:
        top_p = float(top_p)
    return _call(_ops.route_cpu, (router_logits,), router_logits, top_k, num_experts, normalize,
                 top_p, selection_bias)


# ---- the expert ops' shared autograd plumbing -------------------------------------------------
# moe_mlp_forward_cpu and moe_lora_forward_cpu take (activations, weight 1, weight 2, topk_ids,
# topk_weights, sorted_slots, expert_offsets, <non-tensor>); their backward ops return the
# gradients of inputs 0, 1, 2 and 4, each an empty [0] tensor where output_mask is false.

def _masked_grads_fake(output_mask, likes):
    return tuple(torch.empty_like(like, memory_format=torch.contiguous_format) if want
                 else like.new_empty((0,)) for want, like in zip(output_mask, likes))


def _register_expert_autograd(name: str, backward_op) -> None:
    """Autograd of a forward op that returns ``(out, saved buffer)``: the backward op gets
    ``(grad_out, the 7 tensor inputs, the buffer, the 8th input, output_mask)``."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7], output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.extra = inputs[7]

    def backward(ctx, grad_out, _grad_buffer):
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]), bool(need[2]), bool(need[4])]
        if grad_out is None or not any(mask):
            return (None,) * 8
        grads = backward_op(grad_out, *ctx.saved_tensors, ctx.extra, mask)
        g0, g1, g2, g4 = (g if want else None for want, g in zip(mask, grads))
        return g0, g1, g2, None, g4, None, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)


# ---- grouped expert MLP -------------------------------------------------------------------------

@torch.library.register_fake("adamoe::moe_mlp_forward_cpu")
def _moe_mlp_forward_fake(hidden, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_slots,
                          expert_offsets, null_kind):
    num_true = torch.library.get_ctx().new_dynamic_size()  # expert_offsets[n], data dependent
    y = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    return y, hidden.new_empty((num_true, gate_up_proj.shape[1]))


@torch.library.register_fake("adamoe::moe_mlp_backward_cpu")
def _moe_mlp_backward_fake(grad_y, hidden, gate_up_proj, down_proj, topk_ids, topk_weights,
                           sorted_slots, expert_offsets, gate_up_out, null_kind, output_mask):
    return _masked_grads_fake(output_mask, (hidden, gate_up_proj, down_proj, topk_weights))


# Saved: the inputs (no copies) and the compact [A, 2I] pre-activations; nothing [T*k, ...].
_register_expert_autograd("adamoe::moe_mlp_forward_cpu", _ops.moe_mlp_backward_cpu)


def moe_mlp_cpu(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor, sorted_slots: torch.Tensor,
                expert_offsets: torch.Tensor, null_kind: str) -> torch.Tensor:
    """Grouped expert MLP over the true assignments only (C++ CPU kernels).

    Shapes: hidden ``[T, H]``, gate_up_proj ``[n, 2I, H]``, down_proj ``[n, H, I]``, topk_ids and
    topk_weights ``[T, k]``, sorted_slots ``[T*k]``, expert_offsets ``[n+1]`` (as ``route``
    returns them). Returns ``y [T, H]`` in hidden's dtype, differentiable w.r.t. hidden, both
    weights and topk_weights.
    """
    y, _ = _call(_ops.moe_mlp_forward_cpu, (hidden, gate_up_proj, down_proj, topk_weights),
                 hidden, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_slots,
                 expert_offsets, null_kind)
    return y


# ---- LoRA experts -------------------------------------------------------------------------------

@torch.library.register_fake("adamoe::moe_lora_forward_cpu")
def _moe_lora_forward_fake(x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots,
                           expert_offsets, scaling):
    T, k = topk_ids.shape
    return (x.new_empty((x.shape[0], lora_B.shape[1])),
            x.new_empty((T * k, lora_A.shape[1]), dtype=torch.float32))


@torch.library.register_fake("adamoe::moe_lora_backward_cpu")
def _moe_lora_backward_fake(grad_y, x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots,
                            expert_offsets, u, scaling, output_mask):
    return _masked_grads_fake(output_mask, (x, lora_A, lora_B, topk_weights))


# Saved: the inputs (no copies) and u [T*k, r] fp32; nothing of size [T, out].
_register_expert_autograd("adamoe::moe_lora_forward_cpu", _ops.moe_lora_backward_cpu)


def moe_lora_cpu(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 topk_ids: torch.Tensor, topk_weights: torch.Tensor, sorted_slots: torch.Tensor,
                 expert_offsets: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA experts over the true assignments only (C++ CPU kernels).

    Shapes: x ``[T, in]``, lora_A ``[n, r, in]``, lora_B ``[n, out, r]`` (x's dtype), the routing
    tensors as ``route`` returns them. Returns ``delta [T, out]`` in x's dtype, differentiable
    w.r.t. x, both LoRA weights and topk_weights.
    """
    y, _ = _call(_ops.moe_lora_forward_cpu, (x, lora_A, lora_B, topk_weights), x, lora_A,
                 lora_B, topk_ids, topk_weights, sorted_slots, expert_offsets, float(scaling))
    return y


# ---- dense linear of a decode step --------------------------------------------------------------

@torch.library.register_fake("adamoe::linear_small_m_cpu")
def _linear_small_m_fake(x, weight, bias=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_small_m_cpu(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ weight [N, K]^T (+ bias [N])`` on the C++ small-M streaming kernel (float32 or
    bfloat16, one dtype; bf16 sums in fp32 and rounds once). No autograd: the dense layers of a
    decode step (``integrations.decode``). Needs ``cpu_features()["avx512"]`` (bf16:
    ``"avx512_bf16"``)."""
    return _ops.linear_small_m_cpu(x, weight, bias)
