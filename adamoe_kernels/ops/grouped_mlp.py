"""Launchers, autograd and ``torch.library`` registration of the grouped expert MLP.

Forward (``adamoe::moe_mlp``), A = T*k is the static bound on true assignments. For each chunk of
the intermediate dimension ``I`` (see ``i_chunk``):
1. ``grouped_gemm_kernel`` (SwiGLU fused, rows gathered from ``hidden`` in the prologue)
   -> ``h [A, I_chunk]`` compact;
2. ``grouped_gemm_kernel`` (down, rows scattered to their slots) -> ``slot_out [A, H]`` (fp32);
3. ``combine_slots_kernel``: ``y[t] (+)= sum_true w * slot_out`` in slot order (weight applied
   once per chunk; fp32 accumulation across chunks).
Nothing is saved for backward but the inputs: the backward recomputes ``gate/up`` per tile.

Backward (``adamoe::moe_mlp_backward``), per chunk of ``I``:
1. ``swiglu_backward_kernel`` -> ``[dg | du] [A, 2 I_chunk]``, ``h``, weight-grad partials;
2. ``grouped_weight_grad_kernel`` -> ``d down_proj``, ``d gate_up_proj`` columns/rows of the chunk
   (K-grouped: reduction over each expert's variable number of rows);
3. ``grouped_gemm_kernel`` -> ``dg @ W_gate + du @ W_up`` at slot rows, ``combine_slots_kernel``
   -> ``d hidden``; once at the end ``slot_weight_grad_kernel`` -> ``d topk_weights``.
Only real row tiles do work: grids have the static bound ``cdiv(A, BLOCK_M) + n`` row tiles and
the ones past the real count exit at once. No host synchronisation anywhere.

Why chunk ``I``: with no host sync the buffers are sized by the static bound ``A = T*k``, not by
the true rows. Chunking keeps the ``I``-sized buffers no larger than the ``H``-sized one, so the
peak stays near ``2*A*H`` elements whatever ``I`` is, while the reference (and HF eager) keeps
``~(2H + 4I)`` per true row alive for backward. FLOPs are unchanged; only ``x``/``dy`` rows are
gathered once per chunk.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from ..kernels.grouped_gemm import (
    combine_slots_kernel,
    grouped_gemm_kernel,
    grouped_weight_grad_kernel,
    slot_weight_grad_kernel,
    swiglu_backward_kernel,
)
from . import tuning
from ._common import KernelConfig, interpreting, new_empty

# Interpreter configs are small (numpy executes every program); GPU configs are a starting point
# for H100/A100 bf16. Tuned per-device tables (``ops/tuning.py``, written by
# ``bench/gpu_check.py``) replace them for the shapes they name; without one these apply.
INTERPRETER_GEMM = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
GPU_GEMM = KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
GPU_GEMM_FP32 = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
# The backward keeps three fp32 accumulators (gate, up, dy @ down): with 4 warps a 64x128 tile
# needs > 255 registers per thread and spills on sm_90 (136-152 bytes; docs/kernel_resources.md);
# 8 warps take 183 registers, 2 stages 128 KiB of shared memory (3 would take 192).
GPU_SWIGLU_BWD = KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2)
GPU_WGRAD = KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
GPU_DEFAULTS = {  # op -> (16-bit default, fp32 default)
    "gemm": (GPU_GEMM, GPU_GEMM_FP32),
    "swiglu_bwd": (GPU_SWIGLU_BWD, GPU_GEMM_FP32),
    "wgrad": (GPU_WGRAD, GPU_GEMM_FP32),
}
COMBINE_BLOCK_T = 16
COMBINE_BLOCK_H = 128


def kernel_config(op: str, x: torch.Tensor, num_experts: int, hidden: int | None = None,
                  intermediate: int | None = None, rows_per_expert: int | None = None
                  ) -> KernelConfig:
    """The config of ``op`` (``tuning.OPS``) for a layer on ``x``'s device and dtype.

    A config forced by ``tuning.force_configs`` wins; under the interpreter the pinned one
    applies; else the device's tuned table entry for ``(op, dtype, n, H, I)`` (when ``hidden``
    and ``intermediate`` are given and one matches), else the built-in default.
    """
    cfg = tuning.forced(op)
    if cfg is None:
        if interpreting(x):
            return INTERPRETER_GEMM
        if hidden is not None and intermediate is not None:
            cfg = tuning.lookup(op, x.device, x.dtype, n=num_experts, H=hidden, I=intermediate,
                                rows_per_expert=rows_per_expert)
        if cfg is None:
            cfg = GPU_DEFAULTS[op][x.dtype == torch.float32]
    return cfg


def gemm_config(x: torch.Tensor, num_assignments: int, num_experts: int,
                hidden: int | None = None, intermediate: int | None = None,
                op: str = "gemm") -> KernelConfig:
    """Tile config for the row-tiled grouped GEMMs (``op`` "gemm" or "swiglu_bwd") on ``x``.

    ``BLOCK_M`` follows the mean rows per expert (a static bound: ``T*k / n``), so small batches
    (decoding) waste at most a 16-row partial tile per expert instead of 64.
    """
    rows = triton.cdiv(num_assignments, num_experts)
    cfg = kernel_config(op, x, num_experts, hidden, intermediate, rows)
    if cfg is INTERPRETER_GEMM:
        return cfg
    block_m = min(cfg.BLOCK_M, max(16, triton.next_power_of_2(rows)))
    return dataclasses.replace(cfg, BLOCK_M=block_m)


def wgrad_config(x: torch.Tensor, num_experts: int | None = None, hidden: int | None = None,
                 intermediate: int | None = None, num_assignments: int | None = None
                 ) -> KernelConfig:
    """Tile config for the K-grouped weight-gradient GEMMs."""
    rows = None if num_assignments is None else triton.cdiv(num_assignments, num_experts)
    return kernel_config("wgrad", x, num_experts or 0, hidden, intermediate, rows)


def dot_precision(x: torch.Tensor) -> str:
    """fp32 GEMMs follow torch's TF32 switch; half types always use their tensor-core path."""
    if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _common_meta(x: torch.Tensor, num_experts: int, top_k: int) -> dict:
    return dict(N_TRUE=num_experts, TOP_K=top_k, UPCAST=interpreting(x),
                DOT_PRECISION=dot_precision(x))


def max_row_tiles(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Static bound on row tiles: ``sum_e cdiv(c_e, BM) <= cdiv(A, BM) + n``."""
    return triton.cdiv(num_assignments, block_m) + num_experts


def i_chunk(I: int, H: int, buffers_per_col: int, block_n: int) -> int:
    """Columns of ``I`` per chunk so that ``buffers_per_col * chunk <= ~H`` (a multiple of
    ``block_n``; the whole ``I`` when it already fits)."""
    chunks = max(1, triton.cdiv(buffers_per_col * I, H))
    return min(I, triton.cdiv(triton.cdiv(I, chunks), block_n) * block_n)


def _launch_grouped_gemm(a, w, out, sorted_slots, expert_offsets, *, n_cols, k_dim, w_strides,
                         gather_a, scatter_out, num_experts, top_k, cfg, up_offset=0,
                         fuse_swiglu=False, accumulate=False):
    A = sorted_slots.shape[0]
    grid = (max_row_tiles(A, num_experts, cfg.BLOCK_M), triton.cdiv(n_cols, cfg.BLOCK_N))
    stride_we, stride_wk, stride_wn = w_strides
    grouped_gemm_kernel[grid](
        a, w, out, sorted_slots, expert_offsets, A, n_cols, k_dim,
        a.stride(0), stride_we, stride_wk, stride_wn, out.stride(0), up_offset,
        GATHER_A=gather_a, SCATTER_OUT=scatter_out, FUSE_SWIGLU=fuse_swiglu,
        ACCUMULATE=accumulate, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        BLOCK_NE=triton.next_power_of_2(num_experts),
        **_common_meta(a, num_experts, top_k), **cfg.launch_options(),
    )


def _launch_weight_grad(a, b, row_scale, out, sorted_slots, expert_offsets, *, M, N, gather_a,
                        gather_b, has_scale, top_k, meta, cfg):
    """``out[e] = sum_{rows of e} (s A)^T B`` (d down: A = w dy, B = h; d gate_up: A = dgu, B = x)."""
    num_experts = out.shape[0]
    grid = (num_experts, triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N))
    grouped_weight_grad_kernel[grid](
        a, b, row_scale, out, sorted_slots, expert_offsets, sorted_slots.shape[0], M, N,
        a.stride(0), b.stride(0),
        out.stride(0), out.stride(1),
        TOP_K=top_k, GATHER_A=gather_a, GATHER_B=gather_b, HAS_SCALE=has_scale,
        UPCAST=meta["UPCAST"], DOT_PRECISION=meta["DOT_PRECISION"],
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, **cfg.launch_options(),
    )


def _launch_combine(slot_out, x, topk_ids, topk_weights, y, *, num_experts, weight_true,
                    identity, accumulate):
    T, H = y.shape
    grid = (triton.cdiv(T, COMBINE_BLOCK_T), triton.cdiv(H, COMBINE_BLOCK_H))
    combine_slots_kernel[grid](
        slot_out, x, topk_ids, topk_weights, y, T, H, x.stride(0),
        N_TRUE=num_experts, TOP_K=topk_ids.shape[1], WEIGHT_TRUE=weight_true, IDENTITY=identity,
        ACCUMULATE=accumulate, UPCAST=interpreting(x), BLOCK_T=COMBINE_BLOCK_T,
        BLOCK_H=COMBINE_BLOCK_H,
    )


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _layer_shapes(hidden, gate_up_proj, topk_ids):
    """``(T, H, n, I, k, A)`` with ``A = T*k`` the static bound on true assignments."""
    T, H = hidden.shape
    n, two_i, _ = gate_up_proj.shape
    k = topk_ids.shape[1]
    return T, H, n, two_i // 2, k, T * k


def _routing_tensors(topk_ids, topk_weights, sorted_slots, expert_offsets):
    return (topk_ids.to(torch.int32).contiguous(), topk_weights.float().contiguous(),
            sorted_slots.to(torch.int32).contiguous(), expert_offsets.to(torch.int32).contiguous())


@torch.library.custom_op("adamoe::moe_mlp", mutates_args=())
def moe_mlp_op(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
               topk_ids: torch.Tensor, topk_weights: torch.Tensor, sorted_slots: torch.Tensor,
               expert_offsets: torch.Tensor, null_kind: str) -> torch.Tensor:
    """Forward of the grouped expert MLP; see the module docstring."""
    hidden = _row_major(hidden)
    T, H, n, I, k, A = _layer_shapes(hidden, gate_up_proj, topk_ids)
    dev, dt = hidden.device, hidden.dtype
    y = new_empty((T, H), dt, dev)
    if T == 0 or H == 0:  # nothing to compute (and no grid to size)
        return y
    ids, weights, slots, offsets = _routing_tensors(topk_ids, topk_weights, sorted_slots,
                                                    expert_offsets)
    cfg = gemm_config(hidden, A, n, H, I)
    chunk = i_chunk(I, H, 1, cfg.BLOCK_N)
    y_acc = y if chunk == I else new_empty((T, H), torch.float32, dev)
    h = new_empty((A, chunk), dt, dev)
    # fp32 per-slot rows: the down GEMM's fp32 accumulator reaches the combine unrounded, so a
    # 16-bit output is rounded once (as a plain bf16 layer's is), not twice.
    slot_out = new_empty((A, H), torch.float32, dev)
    for c0 in range(0, I, chunk):
        cols = min(chunk, I - c0)
        _launch_grouped_gemm(
            hidden, gate_up_proj[:, c0:], h, slots, offsets, n_cols=cols, k_dim=H,
            w_strides=(gate_up_proj.stride(0), gate_up_proj.stride(2), gate_up_proj.stride(1)),
            gather_a=True, scatter_out=False, fuse_swiglu=True,
            up_offset=I * gate_up_proj.stride(1), num_experts=n, top_k=k, cfg=cfg)
        _launch_grouped_gemm(
            h, down_proj[:, :, c0:], slot_out, slots, offsets, n_cols=H, k_dim=cols,
            w_strides=(down_proj.stride(0), down_proj.stride(2), down_proj.stride(1)),
            gather_a=False, scatter_out=True, num_experts=n, top_k=k, cfg=cfg)
        _launch_combine(slot_out, hidden, ids, weights, y_acc, num_experts=n, weight_true=True,
                        identity=null_kind == "identity" and c0 == 0, accumulate=c0 > 0)
    return y if y_acc is y else y_acc.to(dt)


@moe_mlp_op.register_fake
def _(hidden, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_slots, expert_offsets,
      null_kind):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


@torch.library.custom_op("adamoe::moe_mlp_backward", mutates_args=())
def moe_mlp_backward_op(
    grad_out: torch.Tensor, hidden: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    sorted_slots: torch.Tensor, expert_offsets: torch.Tensor, null_kind: str,
    weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(d hidden, d gate_up_proj, d down_proj, d topk_weights)``; with
    ``weight_grads=False`` the two weight gradients are skipped and returned empty."""
    hidden = _row_major(hidden)
    dy = grad_out.to(hidden.dtype).contiguous()
    T, H, n, I, k, A = _layer_shapes(hidden, gate_up_proj, topk_ids)
    dev, dt = hidden.device, hidden.dtype
    dx = new_empty((T, H), dt, dev)
    d_weights = new_empty((T, k), torch.float32, dev)
    d_gate_up = new_empty(gate_up_proj.shape if weight_grads else (0,), gate_up_proj.dtype, dev)
    d_down = new_empty(down_proj.shape if weight_grads else (0,), down_proj.dtype, dev)
    if T == 0 or H == 0:
        return dx, d_gate_up.zero_(), d_down.zero_(), d_weights.zero_()
    ids, weights, slots, offsets = _routing_tensors(topk_ids, topk_weights, sorted_slots,
                                                    expert_offsets)
    meta = _common_meta(hidden, n, k)
    cfg = gemm_config(hidden, A, n, H, I)
    scfg = gemm_config(hidden, A, n, H, I, op="swiglu_bwd")
    wcfg = wgrad_config(hidden, n, H, I, A)
    identity = null_kind == "identity"
    chunk = i_chunk(I, H, 3, scfg.BLOCK_N)
    num_parts = triton.cdiv(I, scfg.BLOCK_N)
    dx_acc = dx if chunk == I else new_empty((T, H), torch.float32, dev)
    dgu = new_empty((A, 2 * chunk), dt, dev)
    h = new_empty((A, chunk) if weight_grads else (1, 1), dt, dev)
    dw_partial = new_empty((A, num_parts), torch.float32, dev)
    dx_slots = new_empty((A, H), dt, dev)
    gu_s0, gu_s1, gu_s2 = gate_up_proj.stride()
    for c0 in range(0, I, chunk):
        cols = min(chunk, I - c0)
        dg, du = dgu[:, :cols], dgu[:, chunk:chunk + cols]
        swiglu_backward_kernel[(max_row_tiles(A, n, scfg.BLOCK_M),
                                triton.cdiv(cols, scfg.BLOCK_N))](
            hidden, dy, gate_up_proj[:, c0:], down_proj[:, :, c0:], weights, slots, offsets, A,
            dgu, h, dw_partial, H, cols, hidden.stride(0), dy.stride(0),
            gu_s0, gu_s1, gu_s2, I * gu_s1,
            down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
            dgu.stride(0), chunk, h.stride(0), c0 // scfg.BLOCK_N, num_parts,
            STORE_H=weight_grads, BLOCK_M=scfg.BLOCK_M, BLOCK_N=scfg.BLOCK_N,
            BLOCK_K=scfg.BLOCK_K, BLOCK_NE=triton.next_power_of_2(n), **meta,
            **scfg.launch_options(),
        )
        if weight_grads:
            _launch_weight_grad(dy, h[:, :cols], weights, d_down[:, :, c0:c0 + cols], slots,
                                offsets, M=H, N=cols, gather_a=True, gather_b=False,
                                has_scale=True, top_k=k, meta=meta, cfg=wcfg)
            for d_rows, row0 in ((dg, c0), (du, I + c0)):
                _launch_weight_grad(d_rows, hidden, weights, d_gate_up[:, row0:row0 + cols], slots,
                                    offsets, M=cols, N=H, gather_a=False, gather_b=True,
                                    has_scale=False, top_k=k, meta=meta, cfg=wcfg)
        for d_rows, row0, acc in ((dg, c0, False), (du, I + c0, True)):
            _launch_grouped_gemm(
                d_rows, gate_up_proj[:, row0:], dx_slots, slots, offsets, n_cols=H, k_dim=cols,
                w_strides=(gu_s0, gu_s1, gu_s2), gather_a=False, scatter_out=True,
                accumulate=acc, num_experts=n, top_k=k, cfg=cfg)
        _launch_combine(dx_slots, dy, ids, weights, dx_acc, num_experts=n, weight_true=False,
                        identity=identity and c0 == 0, accumulate=c0 > 0)
    slot_weight_grad_kernel[(triton.cdiv(T, COMBINE_BLOCK_T),)](
        dw_partial, hidden, dy, ids, d_weights, T, H, hidden.stride(0), dy.stride(0), num_parts,
        N_TRUE=n, TOP_K=k, IDENTITY=identity, BLOCK_T=COMBINE_BLOCK_T,
        BLOCK_P=min(triton.next_power_of_2(num_parts), 64), BLOCK_H=COMBINE_BLOCK_H,
    )
    if dx_acc is not dx:
        dx.copy_(dx_acc)
    return dx, d_gate_up, d_down, d_weights


@moe_mlp_backward_op.register_fake
def _(grad_out, hidden, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_slots,
      expert_offsets, null_kind, weight_grads):
    dx = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    gu_shape = gate_up_proj.shape if weight_grads else (0,)
    d_shape = down_proj.shape if weight_grads else (0,)
    return (dx, gate_up_proj.new_empty(gu_shape), down_proj.new_empty(d_shape),
            topk_weights.new_empty(topk_ids.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    hidden, gate_up, down, ids, weights, slots, offsets, null_kind = inputs
    ctx.save_for_backward(hidden, gate_up, down, ids, weights, slots, offsets)
    ctx.null_kind = null_kind
    ctx.weights_dtype = weights.dtype


def _backward(ctx, grad_out):
    hidden, gate_up, down, ids, weights, slots, offsets = ctx.saved_tensors
    need = ctx.needs_input_grad
    weight_grads = bool(need[1] or need[2])
    dx, d_gate_up, d_down, d_w = torch.ops.adamoe.moe_mlp_backward(
        grad_out, hidden, gate_up, down, ids, weights, slots, offsets, ctx.null_kind,
        weight_grads)
    return (dx if need[0] else None,
            d_gate_up if need[1] else None,
            d_down if need[2] else None,
            None,
            d_w.to(ctx.weights_dtype) if need[4] else None,
            None, None, None)


moe_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def moe_mlp_triton(hidden, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_slots,
                   expert_offsets, null_kind):
    """Public-API entry: the ``adamoe::moe_mlp`` op (CUDA, or CPU under the Triton interpreter)."""
    return torch.ops.adamoe.moe_mlp(hidden, gate_up_proj, down_proj, topk_ids, topk_weights,
                                    sorted_slots, expert_offsets, null_kind)
