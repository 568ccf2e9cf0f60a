"""LoRA experts: grouped low-rank GEMMs over the true assignments (the Mo-LoRA setting).

``delta_t = sum_{true j} w_tj * scaling * B_e A_e x_t`` with ``A_e [r, in]``, ``B_e [out, r]``.

Rows: position ``a`` in ``sorted_slots`` (``[0, expert_offsets[n])``) is one true assignment; its
flat slot is ``s = sorted_slots[a]`` and its token ``s // top_k``. Expert ``e`` owns rows
``expert_offsets[e] .. expert_offsets[e+1]``. Row tiles of ``BLOCK_M`` never straddle experts; a
program finds its (expert, row range) from ``expert_offsets`` in registers (``_lora_row_tile``), so
no tile map is materialised and programs past the real tile count exit at once. Null slots are
never read, computed or written. The rank ``R`` is padded to ``BLOCK_R >= 16`` (one ``tl.dot``).

Four kernels serve forward and backward through flags (no permuted copies):

* ``lora_shrink_kernel``   ``g[a] = X[token a] @ W_e`` (``[K] -> [R]``): forward ``u = A_e x``
  (``W = A_e^T``); backward ``g = dy B_e`` giving ``du = w s g`` and ``d w = s <g, u>``.
* ``lora_expand_kernel``   ``out[slot a] = c_a * (V[a] @ W_e^T)`` (``[R] -> [N]``): forward
  ``B_e u`` with ``c = w s``; backward ``du A_e`` with ``c = 1``.
* ``lora_combine_kernel``  ``y[t] = sum_{true j} out[t*k+j]`` in fixed ``j`` order (no atomics).
* ``lora_wgrad_kernel``    ``dW_e = sum_{rows a of e} (c_a L[token a])^T V[a]``, a K-grouped
  reduction looping over the expert's rows (``dB``: ``L = dy``, ``V = u``, ``c = w s``;
  ``dA^T``: ``L = x``, ``V = du``, ``c = 1``). An expert with no rows stores exact zeros.

Naming: ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` register blocks.
``UPCAST`` (set under the Triton interpreter) converts loaded blocks to fp32 right after
``tl.load``: the interpreter's bf16 arithmetic and bf16 ``tl.dot`` are wrong. All pointer offsets
that scale with ``T``, ``k`` or a feature dimension are computed in int64.
"""

import triton
import triton.language as tl


@triton.jit
def _clamp_lora_segment(lo, hi, num_slots):
    """An expert's row range from ``expert_offsets`` clamped into ``[0, num_slots]``: no row
    outside ``sorted_slots`` is read whatever the offsets hold (a hand-built Routing is checked
    on CPU, not on CUDA)."""
    lo = tl.minimum(tl.maximum(lo, 0), num_slots)
    return lo, tl.minimum(tl.maximum(hi, lo), num_slots)


@triton.jit
def _lora_row_tile(expert_offsets_ptr, i_m, n_experts, num_slots, BLOCK_NE: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """Row tile ``i_m`` -> ``(expert, first row, end row of the expert)``; expert >= n: no tile."""
    o_e = tl.arange(0, BLOCK_NE)
    m_e = o_e < n_experts
    b_lo = tl.load(expert_offsets_ptr + o_e, mask=m_e, other=0).to(tl.int32)
    b_hi = tl.load(expert_offsets_ptr + o_e + 1, mask=m_e, other=0).to(tl.int32)
    b_lo, b_hi = _clamp_lora_segment(b_lo, b_hi, num_slots)
    b_tiles = (b_hi - b_lo + BLOCK_M - 1) // BLOCK_M
    b_end = tl.cumsum(b_tiles, axis=0)
    i_e = tl.sum((b_end <= i_m).to(tl.int32), axis=0)
    b_this = o_e == i_e
    tile_begin = tl.sum(tl.where(b_this, b_end - b_tiles, 0), axis=0)
    row_start = tl.sum(tl.where(b_this, b_lo, 0), axis=0) + (i_m - tile_begin) * BLOCK_M
    row_end = tl.sum(tl.where(b_this, b_hi, 0), axis=0)
    return i_e, row_start, row_end


@triton.jit
def lora_shrink_kernel(
    x_ptr,               # [T, K]      token rows: x (forward) or dy (backward)
    w_ptr,               # [n, K, R]   strided view: lora_A^T (forward) or lora_B (backward)
    sorted_slots_ptr,    # [T*top_k]   int32/int64
    expert_offsets_ptr,  # [n + 1]     int32/int64
    num_slots,           # T*top_k, the length of sorted_slots (indices read from it stay inside)
    u_ptr,               # [T*top_k, R] fp32 compact: forward output u; backward input u
    topk_weights_ptr,    # [T*top_k]   routing weights (IS_BWD only)
    du_ptr,              # [T*top_k, R] fp32 compact: backward output w*s*(dy B_e) (IS_BWD only)
    dw_ptr,              # [T*top_k]   fp32 per slot: backward output s*<dy B_e, u> (IS_BWD only)
    n_experts,
    top_k,
    K,
    R,
    scaling,
    stride_xt,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wr,
    IS_BWD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_NE: tl.constexpr,
):
    """``g[a] = X[token a] @ W_e`` for the true rows ``a`` of one row tile (fp32 accumulate).

    Forward (``IS_BWD=False``): stores ``u[a] = g``. Backward: stores ``du[a] = w_a * s * g`` and
    ``dw[slot a] = s * <g, u[a]>``. Grid: ``(cdiv(T*top_k, BLOCK_M) + n,)``.
    """
    i_m = tl.program_id(0)
    i_e, row_start, row_end = _lora_row_tile(expert_offsets_ptr, i_m, n_experts, num_slots,
                                              BLOCK_NE, BLOCK_M)
    if i_e >= n_experts:
        return
    o_m = row_start + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    b_slot = tl.load(sorted_slots_ptr + o_m, mask=m_m, other=0).to(tl.int64)
    b_slot = tl.minimum(tl.maximum(b_slot, 0), num_slots - 1)  # in-bounds for any Routing
    b_tok = b_slot // top_k
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    p_w_e = w_ptr + i_e.to(tl.int64) * stride_we
    b_acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(x_ptr + b_tok[:, None] * stride_xt + o_k[None, :].to(tl.int64) * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(p_w_e + o_k[:, None].to(tl.int64) * stride_wk + o_r[None, :] * stride_wr,
                      mask=m_k[:, None] & m_r[None, :], other=0.0)
        if UPCAST:
            b_x = b_x.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_acc = tl.dot(b_x, b_w.to(b_x.dtype), b_acc, input_precision=DOT_PRECISION)
    o_u = o_m[:, None].to(tl.int64) * R + o_r[None, :]
    m_u = m_m[:, None] & m_r[None, :]
    if IS_BWD:
        b_u = tl.load(u_ptr + o_u, mask=m_u, other=0.0)
        b_dw = tl.sum(b_acc * b_u, axis=1) * scaling
        tl.store(dw_ptr + b_slot, b_dw, mask=m_m)
        b_ws = tl.load(topk_weights_ptr + b_slot, mask=m_m, other=0.0).to(tl.float32) * scaling
        tl.store(du_ptr + o_u, b_acc * b_ws[:, None], mask=m_u)
    else:
        tl.store(u_ptr + o_u, b_acc, mask=m_u)


@triton.jit
def lora_expand_kernel(
    v_ptr,               # [T*top_k, R] fp32 compact rows: u (forward) or du (backward)
    w_ptr,               # [n, N, R]   strided view: lora_B (forward) or lora_A^T (backward)
    sorted_slots_ptr,    # [T*top_k]   int32/int64
    expert_offsets_ptr,  # [n + 1]     int32/int64
    num_slots,           # T*top_k, the length of sorted_slots (indices read from it stay inside)
    topk_weights_ptr,    # [T*top_k]   routing weights (HAS_WEIGHT only)
    out_ptr,             # [T*top_k, N] per-slot rows (contiguous); null-slot rows never written
    n_experts,
    N,
    R,
    scaling,
    stride_we,
    stride_wn,
    stride_wr,
    HAS_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_NE: tl.constexpr,
):
    """``out[slot a, :] = c_a * (V[a] @ W_e^T)``, ``c_a = w_a * s`` if HAS_WEIGHT else 1.

    The weight is applied once, here in the epilogue. Grid:
    ``(cdiv(T*top_k, BLOCK_M) + n, cdiv(N, BLOCK_N))``.
    """
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    i_e, row_start, row_end = _lora_row_tile(expert_offsets_ptr, i_m, n_experts, num_slots,
                                              BLOCK_NE, BLOCK_M)
    if i_e >= n_experts:
        return
    o_m = row_start + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_v = tl.load(v_ptr + o_m[:, None].to(tl.int64) * R + o_r[None, :],
                  mask=m_m[:, None] & m_r[None, :], other=0.0)
    b_w = tl.load(w_ptr + i_e.to(tl.int64) * stride_we + o_r[:, None] * stride_wr
                  + o_n[None, :].to(tl.int64) * stride_wn,
                  mask=m_r[:, None] & m_n[None, :], other=0.0)
    if UPCAST:
        b_w = b_w.to(tl.float32)
    b_acc = tl.dot(b_v.to(b_w.dtype), b_w, input_precision=DOT_PRECISION)
    b_slot = tl.load(sorted_slots_ptr + o_m, mask=m_m, other=0).to(tl.int64)
    b_slot = tl.minimum(tl.maximum(b_slot, 0), num_slots - 1)  # in-bounds for any Routing
    if HAS_WEIGHT:
        b_c = tl.load(topk_weights_ptr + b_slot, mask=m_m, other=0.0).to(tl.float32) * scaling
        b_acc = b_acc * b_c[:, None]
    p_out = out_ptr + b_slot[:, None] * N + o_n[None, :]
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def lora_combine_kernel(
    out_ptr,             # [T*top_k, N] per-slot rows (contiguous); rows of null slots never read
    topk_ids_ptr,        # [T, top_k]  int32/int64, contiguous
    y_ptr,               # [T, N]      contiguous
    T,
    N,
    top_k,
    n_experts,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``y[t] = sum_{j: topk_ids[t, j] < n} out[t*top_k + j]`` in fixed ``j`` order, fp32 sum.

    Deterministic (no atomics); an all-null token gets exact zeros. Grid:
    ``(cdiv(T, BLOCK_T), cdiv(N, BLOCK_N))``.
    """
    i_t = tl.program_id(0)
    i_n = tl.program_id(1)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    m_t = o_t < T
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for j in range(0, top_k):
        o_s = o_t * top_k + j
        b_id = tl.load(topk_ids_ptr + o_s, mask=m_t, other=n_experts)
        m_true = m_t & (b_id < n_experts)
        b_out = tl.load(out_ptr + o_s[:, None] * N + o_n[None, :],
                        mask=m_true[:, None] & m_n[None, :], other=0.0)
        b_acc += b_out.to(tl.float32)
    tl.store(y_ptr + o_t[:, None] * N + o_n[None, :], b_acc.to(y_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_n[None, :])


@triton.jit
def lora_wgrad_kernel(
    l_ptr,               # [T, N]      token rows: dy (dB) or x (dA)
    v_ptr,               # [T*top_k, R] fp32 compact rows: u (dB) or du (dA)
    sorted_slots_ptr,    # [T*top_k]   int32/int64
    expert_offsets_ptr,  # [n + 1]     int32/int64
    num_slots,           # T*top_k, the length of sorted_slots (indices read from it stay inside)
    topk_weights_ptr,    # [T*top_k]   routing weights (HAS_WEIGHT only)
    dw_ptr,              # [n, N, R]   strided view of the weight grad: dB, or dA^T
    top_k,
    N,
    R,
    scaling,
    stride_lt,
    stride_ln,
    stride_de,
    stride_dn,
    stride_dr,
    HAS_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``dW[e, n-block, :] = sum_{rows a of e} (c_a L[token a, n-block])^T V[a]`` (fp32 accumulate).

    ``c_a = w_a * s`` if HAS_WEIGHT else 1. The ragged reduction over the expert's rows runs in
    one program in row order: deterministic, and an expert without rows stores exact zeros.
    Grid: ``(n, cdiv(N, BLOCK_N))``.
    """
    i_e = tl.program_id(0)
    i_n = tl.program_id(1)
    row_start, row_end = _clamp_lora_segment(tl.load(expert_offsets_ptr + i_e).to(tl.int32),
                                             tl.load(expert_offsets_ptr + i_e + 1).to(tl.int32),
                                             num_slots)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < row_end
        b_slot = tl.load(sorted_slots_ptr + o_m, mask=m_m, other=0).to(tl.int64)
        b_slot = tl.minimum(tl.maximum(b_slot, 0), num_slots - 1)  # in-bounds for any Routing
        b_tok = b_slot // top_k
        b_l = tl.load(l_ptr + b_tok[:, None] * stride_lt + o_n[None, :].to(tl.int64) * stride_ln,
                      mask=m_m[:, None] & m_n[None, :], other=0.0)
        if UPCAST:
            b_l = b_l.to(tl.float32)
        if HAS_WEIGHT:
            b_c = tl.load(topk_weights_ptr + b_slot, mask=m_m, other=0.0).to(tl.float32) * scaling
            b_l = (b_l.to(tl.float32) * b_c[:, None]).to(b_l.dtype)
        b_v = tl.load(v_ptr + o_m[:, None].to(tl.int64) * R + o_r[None, :],
                      mask=m_m[:, None] & m_r[None, :], other=0.0)
        b_acc = tl.dot(tl.trans(b_l), b_v.to(b_l.dtype), b_acc, input_precision=DOT_PRECISION)
    p_dw = (dw_ptr + i_e.to(tl.int64) * stride_de + o_n[:, None].to(tl.int64) * stride_dn
            + o_r[None, :] * stride_dr)
    tl.store(p_dw, b_acc.to(dw_ptr.dtype.element_ty), mask=m_n[:, None] & m_r[None, :])
