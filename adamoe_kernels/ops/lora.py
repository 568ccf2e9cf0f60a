"""Launchers, ``torch.library`` registration and autograd of the LoRA-expert kernels.

Forward (``adamoe::moe_lora_fwd``), with ``A = T*k`` the static bound on true assignments:

1. ``lora_shrink_kernel``  ``u[a] = A_e x[token a]``         compact ``[A, r]`` fp32 (saved for bwd)
2. ``lora_expand_kernel``  ``out[slot] = w s B_e u[a]``       per slot ``[T*k, out]``, x's dtype
3. ``lora_combine_kernel`` ``y[t] = sum_{true j} out[t*k+j]`` fixed order, no atomics

Backward (``adamoe::moe_lora_bwd``):

1. ``lora_shrink_kernel`` (IS_BWD) ``g = dy[token a] B_e``: ``du[a] = w s g``, ``d w[slot] = s <g, u[a]>``
2. ``lora_wgrad_kernel``  ``dB_e = sum_a (w s dy[token a])^T u[a]``
3. ``lora_wgrad_kernel``  ``dA_e^T = sum_a x[token a]^T du[a]``
4. ``lora_expand_kernel`` + ``lora_combine_kernel``: ``dx[t] = sum_{true j} du[a(t,j)] A_e``

Buffers are sized by the static bound ``T*k``; kernels read ``expert_offsets`` from device memory
and programs past the real tile count exit at once: no host sync anywhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton

from ..kernels.lora import (
    lora_combine_kernel,
    lora_expand_kernel,
    lora_shrink_kernel,
    lora_wgrad_kernel,
)
from ._common import KernelConfig, interpreting, new_empty


@dataclass(frozen=True)
class LoraConfigs:
    """One ``KernelConfig`` per LoRA kernel. ``shrink`` uses BLOCK_M/BLOCK_K (rank padded to
    BLOCK_R), ``expand`` BLOCK_M/BLOCK_N, ``combine`` BLOCK_M (tokens)/BLOCK_N, ``wgrad``
    BLOCK_M (rows reduced per step)/BLOCK_N."""

    shrink: KernelConfig
    expand: KernelConfig
    combine: KernelConfig
    wgrad: KernelConfig


def block_r(rank: int) -> int:
    """The rank padded for ``tl.dot``: a power of two >= 16."""
    return max(16, triton.next_power_of_2(rank))


def block_ne(num_experts: int) -> int:
    """The expert count padded to a power of two (>= 2) for the in-register tile map."""
    return max(2, triton.next_power_of_2(num_experts))


def lora_configs(rank: int, interpret: bool) -> LoraConfigs:
    """The configs the launchers use: one small pinned config under the interpreter (it accepts
    a single config), on GPU tiles sized for a rank-``rank`` LoRA (bf16/fp16/fp32)."""
    if interpret:
        c = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
        return LoraConfigs(shrink=c, expand=c, combine=c, wgrad=c)
    wide = block_r(rank) > 64
    bm = 32 if wide else 64
    return LoraConfigs(
        shrink=KernelConfig(BLOCK_M=bm, BLOCK_N=block_r(rank), BLOCK_K=64, num_warps=4,
                            num_stages=3),
        expand=KernelConfig(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=block_r(rank), num_warps=4,
                            num_stages=2),
        combine=KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=1, num_warps=4, num_stages=1),
        wgrad=KernelConfig(BLOCK_M=64, BLOCK_N=64 if wide else 128, BLOCK_K=block_r(rank),
                           num_warps=4, num_stages=3),
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would miss the fp32 tolerance); 16-bit: tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tile_bound(num_rows: int, n: int, block_m: int) -> int:
    # sum_e cdiv(count_e, BM) <= cdiv(sum_e count_e, BM) + n: a static bound on the real tiles.
    return triton.cdiv(num_rows, block_m) + n


def _shrink(tok_rows, w_view_strides, w, slots, offsets, u, scaling, cfg, *, bwd=None):
    """Launch ``lora_shrink_kernel``: ``g[a] = tok_rows[token a] @ W_e`` with ``W_e`` ``[K, R]``
    given by ``w_view_strides = (stride_e, stride_k, stride_r)`` into ``w``."""
    n = offsets.shape[0] - 1
    TK = slots.shape[0]
    top_k = TK // tok_rows.shape[0]
    K = tok_rows.shape[1]
    R = u.shape[1]
    if bwd is None:
        topk_w, du, dw, is_bwd = u, u, u, False
    else:
        topk_w, du, dw = bwd
        is_bwd = True
    grid = (_tile_bound(TK, n, cfg.BLOCK_M),)
    lora_shrink_kernel[grid](
        tok_rows, w, slots, offsets, slots.shape[0], u, topk_w, du, dw,
        n, top_k, K, R, float(scaling),
        tok_rows.stride(0), tok_rows.stride(1), *w_view_strides,
        IS_BWD=is_bwd, UPCAST=interpreting(tok_rows), DOT_PRECISION=_dot_precision(tok_rows.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K, BLOCK_R=block_r(R), BLOCK_NE=block_ne(n),
        **cfg.launch_options(),
    )


def _expand_combine(v, w, w_view_strides, N, slots, offsets, topk_ids, topk_w, scaling, out_dtype,
                    cfgs: LoraConfigs):
    """``y[t] = sum_{true j} c * (v[a(t,j)] @ W_e^T)`` through a per-slot ``[T*k, N]`` buffer."""
    T, top_k = topk_ids.shape
    n = offsets.shape[0] - 1
    R = v.shape[1]
    dev = v.device
    y = new_empty((T, N), out_dtype, dev)
    per_slot = new_empty((T * top_k, N), out_dtype, dev)
    cfg = cfgs.expand
    grid = (_tile_bound(T * top_k, n, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N))
    has_weight = topk_w is not None
    lora_expand_kernel[grid](
        v, w, slots, offsets, slots.shape[0], topk_w if has_weight else v, per_slot,
        n, N, R, float(scaling), *w_view_strides,
        HAS_WEIGHT=has_weight, UPCAST=interpreting(v), DOT_PRECISION=_dot_precision(out_dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_R=block_r(R), BLOCK_NE=block_ne(n),
        **cfg.launch_options(),
    )
    cfg = cfgs.combine
    grid = (triton.cdiv(T, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N))
    lora_combine_kernel[grid](
        per_slot, topk_ids, y, T, N, top_k, n,
        BLOCK_T=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, **cfg.launch_options(),
    )
    return y


def _wgrad(tok_rows, v, slots, offsets, topk_w, scaling, dW, dW_view_strides, N, cfg):
    """Launch ``lora_wgrad_kernel`` into ``dW`` (``[n, N, R]`` through ``dW_view_strides``)."""
    n = offsets.shape[0] - 1
    top_k = slots.shape[0] // tok_rows.shape[0]
    R = v.shape[1]
    has_weight = topk_w is not None
    grid = (n, triton.cdiv(N, cfg.BLOCK_N))
    lora_wgrad_kernel[grid](
        tok_rows, v, slots, offsets, slots.shape[0], topk_w if has_weight else v, dW,
        top_k, N, R, float(scaling),
        tok_rows.stride(0), tok_rows.stride(1), *dW_view_strides,
        HAS_WEIGHT=has_weight, UPCAST=interpreting(v), DOT_PRECISION=_dot_precision(dW.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_R=block_r(R),
        **cfg.launch_options(),
    )


# --- strided views of the LoRA weights (no copies) -------------------------------------------

def _a_as_kr(t):   # lora_A [n, r, in] seen as [n, K=in, R=r]
    return (t.stride(0), t.stride(2), t.stride(1))


def _b_as_nr(t):   # lora_B [n, out, r] seen as [n, N=out, R=r] (and as [n, K=out, R=r])
    return (t.stride(0), t.stride(1), t.stride(2))


# --- custom ops -------------------------------------------------------------------------------

@torch.library.custom_op("adamoe::moe_lora_fwd", mutates_args=())
def moe_lora_fwd_op(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    topk_ids: torch.Tensor, topk_weights: torch.Tensor, sorted_slots: torch.Tensor,
                    expert_offsets: torch.Tensor, scaling: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA experts forward on the Triton kernels.

    Args:
        x: ``[T, in]``; lora_A: ``[n, r, in]``; lora_B: ``[n, out, r]`` (x's dtype and device).
        topk_ids ``[T, k]``, topk_weights ``[T, k]``, sorted_slots ``[T*k]``,
        expert_offsets ``[n+1]``: from a ``Routing``. scaling: the LoRA scale ``alpha / r``.

    Returns:
        ``(y [T, out] in x's dtype, u [T*k, r] fp32)``; ``u`` holds ``A_e x`` for the first
        ``expert_offsets[n]`` compact rows (the rest is zero) and is saved for backward.
    """
    T = x.shape[0]
    n, r, _ = lora_A.shape
    out = lora_B.shape[1]
    k = topk_ids.shape[1]
    # u is an op output: its tail (rows >= expert_offsets[n], the null slots) must be defined,
    # so it starts zeroed (T*k*r fp32: small next to x); the kernels never read the tail.
    u = torch.zeros((T * k, r), dtype=torch.float32, device=x.device)
    if T == 0:
        return x.new_zeros((0, out)), u
    cfgs = lora_configs(r, interpreting(x))
    topk_ids = topk_ids.contiguous()
    topk_w = topk_weights.contiguous().view(-1)
    with _device_guard(x):
        _shrink(x, _a_as_kr(lora_A), lora_A, sorted_slots, expert_offsets, u, scaling, cfgs.shrink)
        y = _expand_combine(u, lora_B, _b_as_nr(lora_B), out, sorted_slots, expert_offsets,
                            topk_ids, topk_w, scaling, x.dtype, cfgs)
    return y, u


@moe_lora_fwd_op.register_fake
def _(x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots, expert_offsets, scaling):
    T, k = topk_ids.shape
    return (x.new_empty((x.shape[0], lora_B.shape[1])),
            x.new_empty((T * k, lora_A.shape[1]), dtype=torch.float32))


@torch.library.custom_op("adamoe::moe_lora_bwd", mutates_args=())
def moe_lora_bwd_op(grad_y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    sorted_slots: torch.Tensor, expert_offsets: torch.Tensor, u: torch.Tensor,
                    scaling: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA experts backward on the Triton kernels.

    Args: ``grad_y [T, out]`` (x's dtype), the forward inputs, and ``u [T*k, r]`` from the forward.

    Returns:
        ``(dx [T, in], d lora_A [n, r, in], d lora_B [n, out, r], d topk_weights [T, k])`` in the
        dtypes of their inputs. Experts without rows get exact-zero weight grads; null slots get
        zero ``d topk_weights``.
    """
    T, in_f = x.shape
    n, r, _ = lora_A.shape
    out = lora_B.shape[1]
    k = topk_ids.shape[1]
    dev = x.device
    dA = new_empty(lora_A.shape, lora_A.dtype, dev)
    dB = new_empty(lora_B.shape, lora_B.dtype, dev)
    d_topk = torch.zeros((T * k,), dtype=torch.float32, device=dev)
    if T == 0:
        return x.new_zeros(x.shape), dA.zero_(), dB.zero_(), d_topk.view(T, k).to(topk_weights.dtype)
    cfgs = lora_configs(r, interpreting(x))
    topk_ids = topk_ids.contiguous()
    topk_w = topk_weights.contiguous().view(-1)
    du = new_empty((T * k, r), torch.float32, dev)
    with _device_guard(x):
        # g = dy B_e: du = w s g (compact), d w = s <g, u>
        _shrink(grad_y, _b_as_nr(lora_B), lora_B, sorted_slots, expert_offsets, u, scaling,
                cfgs.shrink, bwd=(topk_w, du, d_topk))
        # dB_e = sum_a (w s dy[token a])^T u[a]
        _wgrad(grad_y, u, sorted_slots, expert_offsets, topk_w, scaling, dB, _b_as_nr(dB), out,
               cfgs.wgrad)
        # dA_e^T = sum_a x[token a]^T du[a]
        _wgrad(x, du, sorted_slots, expert_offsets, None, 1.0, dA, _a_as_kr(dA), in_f, cfgs.wgrad)
        # dx[t] = sum_{true j} du[a] A_e
        dx = _expand_combine(du, lora_A, _a_as_kr(lora_A), in_f, sorted_slots, expert_offsets,
                             topk_ids, None, 1.0, x.dtype, cfgs)
    return dx, dA, dB, d_topk.view(T, k).to(topk_weights.dtype)


@moe_lora_bwd_op.register_fake
def _(grad_y, x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots, expert_offsets, u, scaling):
    return (torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B),
            torch.empty_like(topk_weights))


def _setup_context(ctx, inputs, output):
    x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots, expert_offsets, scaling = inputs
    _, u = output
    ctx.save_for_backward(x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots,
                          expert_offsets, u)
    ctx.scaling = scaling
    ctx.mark_non_differentiable(u)


def _backward(ctx, grad_y, grad_u):
    # ``u`` is an internal buffer (non-differentiable); its gradient is ignored.
    x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots, expert_offsets, u = ctx.saved_tensors
    dx, dA, dB, d_topk = moe_lora_bwd_op(grad_y.to(x.dtype), x, lora_A, lora_B, topk_ids,
                                         topk_weights, sorted_slots, expert_offsets, u,
                                         ctx.scaling)
    return dx, dA, dB, None, d_topk, None, None, None


moe_lora_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def moe_lora_triton(x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots, expert_offsets,
                    scaling: float = 1.0) -> torch.Tensor:
    """``delta [T, out]`` (x's dtype) on the Triton kernels; differentiable w.r.t. ``x``, both
    LoRA weights and ``topk_weights``. Inputs as in ``moe_lora_fwd_op`` (validated by the caller)."""
    y, _ = moe_lora_fwd_op(x, lora_A, lora_B, topk_ids, topk_weights, sorted_slots,
                           expert_offsets, float(scaling))
    return y
