"""Variable-length grouped GEMMs over the true assignments, grouped by expert.

Rows: position ``r`` in ``sorted_slots`` (``[0, expert_offsets[n])``) is one true assignment; its
flat slot is ``s = sorted_slots[r]`` and its token ``s // TOP_K``. Expert ``e`` owns rows
``expert_offsets[e] .. expert_offsets[e+1]``. Row tiles of ``BLOCK_M`` never straddle experts; a
program finds its (expert, row range) from ``expert_offsets`` in registers (``_row_tile``), so no
tile map is materialised and programs past the real tile count exit at once. Null slots are never
read, computed or written here.

Naming: ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` register blocks.
``UPCAST`` (set under the Triton interpreter) converts loaded blocks to fp32: the interpreter's
bf16 arithmetic is wrong.
"""

import triton
import triton.language as tl


@triton.jit
def _clamp_segment(lo, hi, num_slots):
    """An expert's row range ``[lo, hi)`` from ``expert_offsets``, clamped into
    ``[0, num_slots]`` so that no row outside ``sorted_slots`` is read whatever the offsets hold
    (``route``'s already lie inside; a hand-built Routing is checked on CPU, not on CUDA)."""
    lo = tl.minimum(tl.maximum(lo, 0), num_slots)
    return lo, tl.minimum(tl.maximum(hi, lo), num_slots)


@triton.jit
def _row_tile(expert_offsets_ptr, i_m, num_slots, N_TRUE: tl.constexpr, BLOCK_NE: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """Row tile ``i_m`` -> ``(expert, first row, end row of the expert, is a real tile)``."""
    o_e = tl.arange(0, BLOCK_NE)
    m_e = o_e < N_TRUE
    b_lo = tl.load(expert_offsets_ptr + o_e, mask=m_e, other=0)
    b_hi = tl.load(expert_offsets_ptr + o_e + 1, mask=m_e, other=0)
    b_lo, b_hi = _clamp_segment(b_lo, b_hi, num_slots)
    b_tiles = (b_hi - b_lo + BLOCK_M - 1) // BLOCK_M
    b_end = tl.cumsum(b_tiles, axis=0)
    expert = tl.sum((b_end <= i_m).to(tl.int32), axis=0)
    b_this = o_e == expert
    tile_begin = tl.sum(tl.where(b_this, b_end - b_tiles, 0), axis=0)
    row_start = tl.sum(tl.where(b_this, b_lo, 0), axis=0) + (i_m - tile_begin) * BLOCK_M
    row_end = tl.sum(tl.where(b_this, b_hi, 0), axis=0)
    return expert, row_start, row_end, expert < N_TRUE


@triton.jit
def _round_to_bf16_nearest(b_x):
    """fp32 -> fp32 values exactly representable in bf16, rounded to nearest even. The
    interpreter's fp32 -> bf16 conversion truncates (twice the error of a GPU's ``cvt.rn``), so
    under it the value is rounded first and the conversion that follows is exact."""
    b_bits = b_x.to(tl.uint32, bitcast=True)
    b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
    return b_bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_block(p_out, b_acc, m_out, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr):
    """Store the fp32 block ``b_acc`` in the output's dtype, adding what is there if ACCUMULATE
    (``UPCAST``, the interpreter: a bf16 output is rounded to nearest, as on a GPU)."""
    if ACCUMULATE:
        b_acc += tl.load(p_out, mask=m_out, other=0.0).to(tl.float32)
    if UPCAST and p_out.dtype.element_ty == tl.bfloat16:
        b_acc = _round_to_bf16_nearest(b_acc)
    tl.store(p_out, b_acc.to(p_out.dtype.element_ty), mask=m_out)


@triton.jit
def grouped_gemm_kernel(
    a_ptr,               # GATHER_A: [T, K] token rows (row t at t*stride_am); else [A, K] compact
    w_ptr,               # [n, ...] expert weights: (e, k, j) at e*stride_we + k*stride_wk + j*stride_wn
    out_ptr,             # SCATTER_OUT: [T*TOP_K, N] slot rows; else [A, N] compact; row stride stride_om
    sorted_slots_ptr,    # [T*TOP_K] int32
    expert_offsets_ptr,  # [N_TRUE + 1] int32
    num_slots,           # T*TOP_K, the length of sorted_slots (indices read from it stay inside)
    N,
    K,
    stride_am,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    up_offset,           # FUSE_SWIGLU: elements from a gate column of W to its up column
    N_TRUE: tl.constexpr,
    TOP_K: tl.constexpr,
    GATHER_A: tl.constexpr,     # A rows are tokens sorted_slots[r] // TOP_K (no permuted copy)
    SCATTER_OUT: tl.constexpr,  # write row r at its slot sorted_slots[r]
    FUSE_SWIGLU: tl.constexpr,  # out = silu(A W_gate) * (A W_up), W_up = W_gate + up_offset
    ACCUMULATE: tl.constexpr,   # out += result (fixed order: deterministic)
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_NE: tl.constexpr,
):
    """``out[row r] = A[row r] @ W[e]`` for every true row ``r`` of expert ``e`` (fp32 accumulate).

    Serves the forward (gate_up with SwiGLU fused, then down scattered to slots) and the backward
    d hidden product (``[dg, du] @ gate_up[e]`` scattered to slots) through its flags.
    """
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    expert, row_start, row_end, is_real = _row_tile(expert_offsets_ptr, i_m, num_slots, N_TRUE, BLOCK_NE,
                                                    BLOCK_M)
    if not is_real:
        return
    o_r = row_start + tl.arange(0, BLOCK_M)
    m_r = o_r < row_end
    if GATHER_A or SCATTER_OUT:
        b_slot = tl.load(sorted_slots_ptr + o_r, mask=m_r, other=0)
        b_slot = tl.minimum(tl.maximum(b_slot, 0), num_slots - 1)  # in-bounds for any Routing
    if GATHER_A:
        o_a = (b_slot // TOP_K).to(tl.int64)
    else:
        o_a = o_r.to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    p_a = a_ptr + o_a[:, None] * stride_am
    p_w = w_ptr + expert.to(tl.int64) * stride_we + o_n[None, :].to(tl.int64) * stride_wn
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_SWIGLU:
        b_acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_a = tl.load(p_a + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        m_w = m_k[:, None] & m_n[None, :]
        b_w = tl.load(p_w + o_k[:, None].to(tl.int64) * stride_wk, mask=m_w, other=0.0)
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_acc = tl.dot(b_a, b_w, b_acc, input_precision=DOT_PRECISION)
        if FUSE_SWIGLU:
            p_up = p_w + up_offset + o_k[:, None].to(tl.int64) * stride_wk
            b_w_up = tl.load(p_up, mask=m_w, other=0.0)
            if UPCAST:
                b_w_up = b_w_up.to(tl.float32)
            b_acc_up = tl.dot(b_a, b_w_up, b_acc_up, input_precision=DOT_PRECISION)
    if FUSE_SWIGLU:
        b_acc = b_acc * tl.sigmoid(b_acc) * b_acc_up
    if SCATTER_OUT:
        o_out = b_slot.to(tl.int64)
    else:
        o_out = o_r.to(tl.int64)
    p_out = out_ptr + o_out[:, None] * stride_om + o_n[None, :]
    _store_block(p_out, b_acc, m_r[:, None] & m_n[None, :], ACCUMULATE, UPCAST)


@triton.jit
def swiglu_backward_kernel(
    x_ptr,               # [T, H] hidden, row stride stride_xm
    dy_ptr,              # [T, H] grad of the layer output, row stride stride_dym
    gate_up_ptr,         # [n, 2I, H] at the chunk's first gate row: (e, j, h) at
                         #   e*stride_gue + j*stride_gun + h*stride_guk; up rows at + up_offset
    down_ptr,            # [n, H, I] at the chunk's first column: (e, h, i) at
                         #   e*stride_de + h*stride_dk + i*stride_dn
    weights_ptr,         # [T*TOP_K] float32 routing weights, flat
    sorted_slots_ptr,    # [T*TOP_K] int32
    expert_offsets_ptr,  # [N_TRUE + 1] int32
    num_slots,           # T*TOP_K, the length of sorted_slots (indices read from it stay inside)
    dgu_ptr,             # [A, *] out (compact rows, row stride stride_dgu): d gate at column i,
                         #   d up at column du_col + i (pre-activation grads)
    h_ptr,               # [A, *] out (compact rows, row stride stride_h): silu(gate) * up (STORE_H)
    dw_partial_ptr,      # [T*TOP_K, num_parts] float32 out (slot rows): <dy, E(x)> per I block,
                         #   this chunk's blocks start at column part_offset
    H,
    I,                   # columns of I in this chunk
    stride_xm,
    stride_dym,
    stride_gue,
    stride_gun,
    stride_guk,
    up_offset,
    stride_de,
    stride_dk,
    stride_dn,
    stride_dgu,
    du_col,
    stride_h,
    part_offset,
    num_parts,
    N_TRUE: tl.constexpr,
    TOP_K: tl.constexpr,
    STORE_H: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_NE: tl.constexpr,
):
    """Backward through down and SwiGLU for one row tile and one block of ``I`` columns.

    Recomputes ``g, u = x W_gate^T, x W_up^T`` and ``dh_u = dy W_down`` in one pass over ``H``
    (nothing of the forward is saved), then ``dh = w * dh_u``, ``dg = dh * u * silu'(g)``,
    ``du = dh * silu(g)`` and the weight-gradient partial ``<dh_u, h>``.
    """
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    expert, row_start, row_end, is_real = _row_tile(expert_offsets_ptr, i_m, num_slots, N_TRUE, BLOCK_NE,
                                                    BLOCK_M)
    if not is_real:
        return
    o_r = row_start + tl.arange(0, BLOCK_M)
    m_r = o_r < row_end
    b_slot = tl.load(sorted_slots_ptr + o_r, mask=m_r, other=0)
    b_slot = tl.minimum(tl.maximum(b_slot, 0), num_slots - 1)  # in-bounds for any Routing
    o_tok = (b_slot // TOP_K).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < I
    e64 = expert.to(tl.int64)
    p_gate = gate_up_ptr + e64 * stride_gue + o_n[None, :].to(tl.int64) * stride_gun
    p_up = p_gate + up_offset
    p_down = down_ptr + e64 * stride_de + o_n[None, :].to(tl.int64) * stride_dn
    b_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_dhu = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        m_rk = m_r[:, None] & m_k[None, :]
        m_kn = m_k[:, None] & m_n[None, :]
        b_x = tl.load(x_ptr + o_tok[:, None] * stride_xm + o_k[None, :], mask=m_rk, other=0.0)
        b_dy = tl.load(dy_ptr + o_tok[:, None] * stride_dym + o_k[None, :], mask=m_rk, other=0.0)
        o_k64 = o_k[:, None].to(tl.int64)
        b_wg = tl.load(p_gate + o_k64 * stride_guk, mask=m_kn, other=0.0)
        b_wu = tl.load(p_up + o_k64 * stride_guk, mask=m_kn, other=0.0)
        b_wd = tl.load(p_down + o_k64 * stride_dk, mask=m_kn, other=0.0)
        if UPCAST:
            b_x = b_x.to(tl.float32)
            b_dy = b_dy.to(tl.float32)
            b_wg = b_wg.to(tl.float32)
            b_wu = b_wu.to(tl.float32)
            b_wd = b_wd.to(tl.float32)
        b_g = tl.dot(b_x, b_wg, b_g, input_precision=DOT_PRECISION)
        b_u = tl.dot(b_x, b_wu, b_u, input_precision=DOT_PRECISION)
        b_dhu = tl.dot(b_dy, b_wd, b_dhu, input_precision=DOT_PRECISION)
    b_sig = tl.sigmoid(b_g)
    b_silu = b_g * b_sig
    b_h = b_silu * b_u
    b_w = tl.load(weights_ptr + b_slot, mask=m_r, other=0.0).to(tl.float32)
    b_dh = b_dhu * b_w[:, None]
    b_dg = b_dh * b_u * b_sig * (1.0 + b_g * (1.0 - b_sig))
    b_du = b_dh * b_silu
    b_part = tl.sum(b_dhu * b_h, axis=1)
    p_part = dw_partial_ptr + b_slot.to(tl.int64) * num_parts + part_offset + i_n
    tl.store(p_part, b_part, mask=m_r)
    o_r64 = o_r[:, None].to(tl.int64)
    m_out = m_r[:, None] & m_n[None, :]
    p_dgu = dgu_ptr + o_r64 * stride_dgu + o_n[None, :]
    tl.store(p_dgu, b_dg.to(dgu_ptr.dtype.element_ty), mask=m_out)
    tl.store(p_dgu + du_col, b_du.to(dgu_ptr.dtype.element_ty), mask=m_out)
    if STORE_H:
        p_h = h_ptr + o_r64 * stride_h + o_n[None, :]
        tl.store(p_h, b_h.to(h_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def grouped_weight_grad_kernel(
    a_ptr,               # GATHER_A: [T, M] token rows; else [A, M] compact; row stride stride_am
    b_ptr,               # GATHER_B: [T, N] token rows; else [A, N] compact; row stride stride_bm
    scale_ptr,           # [T*TOP_K] float32 per-slot scale of A's rows (HAS_SCALE)
    out_ptr,             # [n, M, N] out: (e, i, j) at e*stride_oe + i*stride_om + j
    sorted_slots_ptr,    # [T*TOP_K] int32
    expert_offsets_ptr,  # [N_TRUE + 1] int32
    num_slots,           # T*TOP_K, the length of sorted_slots (indices read from it stay inside)
    M,
    N,
    stride_am,
    stride_bm,
    stride_oe,
    stride_om,
    TOP_K: tl.constexpr,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """K-grouped GEMM for weight gradients: ``out[e] = sum_{rows r of e} (s_r A_r)^T B_r``.

    The reduction runs over a variable number of rows per expert, in a fixed order (deterministic,
    no atomics). An expert with no rows gets exact zeros.
    """
    expert = tl.program_id(0)
    i_mn = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    i_m = i_mn // num_n
    i_n = i_mn % num_n
    row_lo, row_hi = _clamp_segment(tl.load(expert_offsets_ptr + expert),
                                    tl.load(expert_offsets_ptr + expert + 1), num_slots)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_lo, row_hi, BLOCK_K):
        o_r = r0 + tl.arange(0, BLOCK_K)
        m_r = o_r < row_hi
        b_slot = tl.load(sorted_slots_ptr + o_r, mask=m_r, other=0)
        b_slot = tl.minimum(tl.maximum(b_slot, 0), num_slots - 1)  # in-bounds for any Routing
        if GATHER_A:
            o_a = (b_slot // TOP_K).to(tl.int64)
        else:
            o_a = o_r.to(tl.int64)
        if GATHER_B:
            o_b = (b_slot // TOP_K).to(tl.int64)
        else:
            o_b = o_r.to(tl.int64)
        p_at = a_ptr + o_a[None, :] * stride_am + o_m[:, None]
        b_at = tl.load(p_at, mask=m_m[:, None] & m_r[None, :], other=0.0)   # [BLOCK_M, BLOCK_K]
        p_b = b_ptr + o_b[:, None] * stride_bm + o_n[None, :]
        b_b = tl.load(p_b, mask=m_r[:, None] & m_n[None, :], other=0.0)     # [BLOCK_K, BLOCK_N]
        if UPCAST:
            b_at = b_at.to(tl.float32)
            b_b = b_b.to(tl.float32)
        if HAS_SCALE:
            b_s = tl.load(scale_ptr + b_slot, mask=m_r, other=0.0).to(tl.float32)
            b_at = (b_at.to(tl.float32) * b_s[None, :]).to(b_b.dtype)
        b_acc = tl.dot(b_at, b_b, b_acc, input_precision=DOT_PRECISION)
    p_out = out_ptr + expert.to(tl.int64) * stride_oe + o_m[:, None].to(tl.int64) * stride_om \
        + o_n[None, :]
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def combine_slots_kernel(
    slot_out_ptr,        # [T*TOP_K, H] per-slot rows (only true slots are read)
    x_ptr,               # [T, H] rows added for null slots when IDENTITY (hidden, or dy backward)
    topk_ids_ptr,        # [T, TOP_K] int32
    topk_weights_ptr,    # [T, TOP_K] float32
    y_ptr,               # [T, H] out
    T,
    H,
    stride_xm,
    N_TRUE: tl.constexpr,
    TOP_K: tl.constexpr,
    WEIGHT_TRUE: tl.constexpr,  # multiply true rows by their weight (forward) or not (backward)
    IDENTITY: tl.constexpr,     # add w * x for each null slot
    ACCUMULATE: tl.constexpr,   # y += ... (I-chunked layers accumulate in an fp32 y)
    UPCAST: tl.constexpr,       # the interpreter (see _store_block)
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``y[t] (+)= sum_j [true] (w_tj) slot_out[t*TOP_K + j] (+ [null] w_tj x[t])`` in slot order."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_t = o_t < T
    m_h = o_h < H
    o_t64 = o_t.to(tl.int64)
    b_acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    if IDENTITY:
        p_x = x_ptr + o_t64[:, None] * stride_xm + o_h[None, :]
        b_x = tl.load(p_x, mask=m_t[:, None] & m_h[None, :], other=0.0).to(tl.float32)
    for j in tl.static_range(TOP_K):
        b_id = tl.load(topk_ids_ptr + o_t64 * TOP_K + j, mask=m_t, other=N_TRUE)
        b_w = tl.load(topk_weights_ptr + o_t64 * TOP_K + j, mask=m_t, other=0.0).to(tl.float32)
        b_true = b_id < N_TRUE
        p_o = slot_out_ptr + (o_t64 * TOP_K + j)[:, None] * H + o_h[None, :]
        b_o = tl.load(p_o, mask=(m_t & b_true)[:, None] & m_h[None, :], other=0.0).to(tl.float32)
        if WEIGHT_TRUE:
            b_o = b_o * b_w[:, None]
        b_acc += b_o
        if IDENTITY:
            b_acc += tl.where(b_true, 0.0, b_w)[:, None] * b_x
    _store_block(y_ptr + o_t64[:, None] * H + o_h[None, :], b_acc,
                 m_t[:, None] & m_h[None, :], ACCUMULATE, UPCAST)


@triton.jit
def slot_weight_grad_kernel(
    dw_partial_ptr,      # [T*TOP_K, NUM_PARTS] float32 (true slots' rows only are read)
    x_ptr,               # [T, H] hidden (IDENTITY)
    dy_ptr,              # [T, H] output grad (IDENTITY)
    topk_ids_ptr,        # [T, TOP_K] int32
    grad_weights_ptr,    # [T, TOP_K] float32 out
    T,
    H,
    stride_xm,
    stride_dym,
    NUM_PARTS,
    N_TRUE: tl.constexpr,
    TOP_K: tl.constexpr,
    IDENTITY: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``d w[t, j] = <dy_t, E_e(x_t)>`` for true slots (sum of the partials over ``I`` blocks, fixed
    order), ``<dy_t, x_t>`` for identity null slots, 0 for zero null slots."""
    i_t = tl.program_id(0)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_t64 = o_t.to(tl.int64)
    if IDENTITY:
        b_xdy = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            o_h = h0 + tl.arange(0, BLOCK_H)
            m = m_t[:, None] & (o_h < H)[None, :]
            b_x = tl.load(x_ptr + o_t64[:, None] * stride_xm + o_h[None, :], mask=m, other=0.0)
            b_dy = tl.load(dy_ptr + o_t64[:, None] * stride_dym + o_h[None, :], mask=m, other=0.0)
            b_xdy += tl.sum(b_x.to(tl.float32) * b_dy.to(tl.float32), axis=1)
    for j in tl.static_range(TOP_K):
        b_id = tl.load(topk_ids_ptr + o_t64 * TOP_K + j, mask=m_t, other=N_TRUE)
        b_true = b_id < N_TRUE
        b_g = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for p0 in range(0, NUM_PARTS, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m = (m_t & b_true)[:, None] & (o_p < NUM_PARTS)[None, :]
            p_part = dw_partial_ptr + (o_t64 * TOP_K + j)[:, None] * NUM_PARTS + o_p[None, :]
            b_g += tl.sum(tl.load(p_part, mask=m, other=0.0), axis=1)
        if IDENTITY:
            b_g = tl.where(b_true, b_g, b_xdy)
        tl.store(grad_weights_ptr + o_t64 * TOP_K + j, b_g, mask=m_t)
