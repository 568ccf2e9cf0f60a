"""Routing kernels: fused softmax + top-k over n+m experts + null drop + normalisation, and its
backward. Naming: ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``b_`` register blocks.

Normalisation codes (``NORMALIZE``): 0 = "true" (over the true slots), 1 = "all", 2 = "none".
Slot groups: true expert ``e`` is group ``e``; every null expert falls in group ``n`` (``N_TRUE``).
Top-p drops the slots after the probability mass reached ``top_p``: a dropped slot gets the id
``E`` (= n+m, "no expert"), weight 0, and is grouped with the null slots.
"""

import triton
import triton.language as tl


@triton.jit
def _softmax_rows(logits_ptr, stride_t, o_t, m_t, o_e, m_e, b_bias=None):
    """fp32 softmax of the rows ``o_t`` (plus ``b_bias [BLOCK_E]`` if given) over the columns
    ``o_e`` (padding columns get 0)."""
    p_logits = logits_ptr + o_t[:, None].to(tl.int64) * stride_t + o_e[None, :]
    b_x = tl.load(p_logits, mask=m_t[:, None] & m_e[None, :], other=0.0).to(tl.float32)
    if b_bias is not None:
        b_x = b_x + b_bias[None, :]
    b_x = tl.where(m_e[None, :], b_x, float("-inf"))
    b_x = b_x - tl.max(b_x, axis=1)[:, None]
    b_p = tl.exp(b_x)
    return b_p / tl.sum(b_p, axis=1)[:, None]


@triton.jit
def _gather_logits(logits_ptr, stride_t, o_t, m_t, b_col, E: tl.constexpr):
    """fp32 logits ``[BLOCK_T]`` of the rows ``o_t`` at the columns ``b_col`` (0 where
    ``b_col >= E``, a slot dropped by top-p)."""
    p = logits_ptr + o_t.to(tl.int64) * stride_t + b_col
    return tl.load(p, mask=m_t & (b_col < E), other=0.0).to(tl.float32)


@triton.jit
def _true_slot_softmax(b_ltop, b_true):
    """``normalize="true"`` weights ``[BLOCK_T, BLOCK_K]``: a softmax of the selected logits over
    the true slots (= p_j / sum_true p, the softmax normaliser cancels), so they cannot underflow
    when every true probability is denormal; all-null rows get zeros."""
    b_lt = tl.where(b_true, b_ltop, float("-inf"))
    b_lmax = tl.max(b_lt, axis=1)
    b_lmax = tl.where(b_lmax > float("-inf"), b_lmax, 0.0)
    b_e = tl.where(b_true, tl.exp(b_lt - b_lmax[:, None]), 0.0)
    b_den = tl.sum(b_e, axis=1)
    b_den = tl.where(b_den > 0.0, b_den, 1.0)
    return b_e / b_den[:, None]


@triton.jit
def route_topk_kernel(
    logits_ptr,        # [T, E] router logits (any float dtype), row stride stride_t
    bias_ptr,          # [E] float32 selection bias (HAS_BIAS): ranks experts, not their weights
    topk_ids_ptr,      # [T, K] int32 out
    topk_weights_ptr,  # [T, K] float32 out
    slot_rank_ptr,     # [T, K] int32 out: rank of the slot among this block's slots of its group
    block_counts_ptr,  # [num_blocks, N_TRUE + 1] int32 out: slots per group in this block
    T,
    stride_t,
    top_p,                  # USE_TOP_P: keep slot j while the mass of slots < j is below top_p
    N_TRUE: tl.constexpr,   # n, true experts
    E: tl.constexpr,        # n + m
    K: tl.constexpr,        # top_k
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E + 1
    BLOCK_K: tl.constexpr,  # next power of two >= K
):
    """One program routes ``BLOCK_T`` tokens: softmax, k rounds of argmax (ties -> lower id) of
    the selection scores (the probabilities, or ``softmax(logits + bias)``), optional top-p cut,
    weights from the probabilities, per-group counts and each slot's stable rank in its group."""
    i_b = tl.program_id(0)
    o_t = i_b * BLOCK_T + tl.arange(0, BLOCK_T)
    o_e = tl.arange(0, BLOCK_E)
    o_k = tl.arange(0, BLOCK_K)
    m_t = o_t < T
    m_e = o_e < E

    b_p = _softmax_rows(logits_ptr, stride_t, o_t, m_t, o_e, m_e)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_e, mask=m_e, other=0.0)
        b_sel = _softmax_rows(logits_ptr, stride_t, o_t, m_t, o_e, m_e, b_bias)
    else:
        b_sel = b_p
    b_work = tl.where(m_e[None, :], b_sel, -2.0)
    b_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    b_top = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    if NORMALIZE == 0:
        b_ltop = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)  # the selected slots' logits
    b_chosen = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    b_mass = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(K):
        b_max = tl.max(b_work, axis=1)
        b_arg = tl.min(tl.where(b_work == b_max[:, None], o_e[None, :], BLOCK_E), axis=1)
        b_hit = o_e[None, :] == b_arg[:, None]
        b_work = tl.where(b_hit, -1.0, b_work)
        if HAS_BIAS:
            b_prob = tl.sum(tl.where(b_hit, b_p, 0.0), axis=1)
        else:
            b_prob = b_max
        if USE_TOP_P:
            b_keep = b_mass < top_p
            b_mass += b_max
            b_arg = tl.where(b_keep, b_arg, E)
            b_prob = tl.where(b_keep, b_prob, 0.0)
            b_hit = b_hit & b_keep[:, None]
        b_chosen = tl.where(b_hit, 1, b_chosen)
        b_ids = tl.where(o_k[None, :] == j, b_arg[:, None], b_ids)
        b_top = tl.where(o_k[None, :] == j, b_prob[:, None], b_top)
        if NORMALIZE == 0:
            b_l = _gather_logits(logits_ptr, stride_t, o_t, m_t, b_arg, E)
            b_ltop = tl.where(o_k[None, :] == j, b_l[:, None], b_ltop)

    m_k = o_k < K
    b_true = (b_ids < N_TRUE) & m_k[None, :]
    if NORMALIZE == 0:
        b_w = _true_slot_softmax(b_ltop, b_true)
    elif NORMALIZE == 1:
        b_den = tl.sum(tl.where(m_k[None, :], b_top, 0.0), axis=1)
        b_w = b_top / b_den[:, None]
    else:
        b_w = b_top

    m_out = m_t[:, None] & m_k[None, :]
    o_out = o_t[:, None].to(tl.int64) * K + o_k[None, :]
    tl.store(topk_ids_ptr + o_out, b_ids, mask=m_out)
    tl.store(topk_weights_ptr + o_out, b_w, mask=m_out)

    # Group counts of this block and stable ranks (slot order t*K + j inside each group).
    b_chosen = tl.where(m_t[:, None], b_chosen, 0)
    b_excl = tl.cumsum(b_chosen, axis=0) - b_chosen          # [BLOCK_T, BLOCK_E]
    b_is_null = tl.where(b_true | (o_k[None, :] >= K) | (~m_t[:, None]), 0, 1)  # null or dropped
    b_null_tok = tl.sum(b_is_null, axis=1)                                         # [BLOCK_T]
    b_null_excl = tl.cumsum(b_null_tok, axis=0) - b_null_tok
    b_rank = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(K):
        b_id_j = tl.sum(tl.where(o_k[None, :] == j, b_ids, 0), axis=1)
        b_rank_true = tl.sum(tl.where(o_e[None, :] == b_id_j[:, None], b_excl, 0), axis=1)
        # Null slots of the token before slot j: a masked sum, not tl.cumsum over the slot axis
        # (Triton 3.6 cannot lower that scan for the layout a 16-bit logits load gives it).
        b_rank_null = b_null_excl + tl.sum(tl.where(o_k[None, :] < j, b_is_null, 0), axis=1)
        b_rank_j = tl.where(b_id_j < N_TRUE, b_rank_true, b_rank_null)
        b_rank = tl.where(o_k[None, :] == j, b_rank_j[:, None], b_rank)
    tl.store(slot_rank_ptr + o_out, b_rank, mask=m_out)

    b_counts = tl.sum(b_chosen, axis=0)                        # [BLOCK_E]
    b_null_total = tl.sum(b_null_tok, axis=0)
    b_counts = tl.where(o_e == N_TRUE, b_null_total, b_counts)
    tl.store(block_counts_ptr + i_b * (N_TRUE + 1) + o_e, b_counts, mask=o_e <= N_TRUE)


@triton.jit
def group_offsets_kernel(
    block_counts_ptr,    # [num_blocks, N_TRUE + 1] int32
    block_start_ptr,     # [num_blocks, N_TRUE + 1] int32 out: exclusive prefix over blocks
    expert_counts_ptr,   # [N_TRUE] int32 out
    expert_offsets_ptr,  # [N_TRUE + 1] int32 out
    num_blocks,
    N_TRUE: tl.constexpr,
    BLOCK_B: tl.constexpr,   # blocks scanned per step
    BLOCK_G: tl.constexpr,   # next power of two >= N_TRUE + 1
):
    """Single program: per-group prefix sums over the route blocks, counts and offsets."""
    o_g = tl.arange(0, BLOCK_G)
    m_g = o_g <= N_TRUE
    b_carry = tl.zeros((BLOCK_G,), dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        o_b = b0 + tl.arange(0, BLOCK_B)
        m = (o_b < num_blocks)[:, None] & m_g[None, :]
        o = o_b[:, None] * (N_TRUE + 1) + o_g[None, :]
        b_c = tl.load(block_counts_ptr + o, mask=m, other=0)
        b_start = tl.cumsum(b_c, axis=0) - b_c + b_carry[None, :]
        tl.store(block_start_ptr + o, b_start, mask=m)
        b_carry += tl.sum(b_c, axis=0)
    b_offsets = tl.cumsum(b_carry, axis=0) - b_carry
    tl.store(expert_counts_ptr + o_g, b_carry, mask=o_g < N_TRUE)
    tl.store(expert_offsets_ptr + o_g, b_offsets, mask=m_g)


@triton.jit
def scatter_slots_kernel(
    topk_ids_ptr,        # [T, K] int32
    slot_rank_ptr,       # [T, K] int32
    block_start_ptr,     # [num_blocks, N_TRUE + 1] int32
    expert_offsets_ptr,  # [N_TRUE + 1] int32 (group n starts at expert_offsets[n])
    sorted_slots_ptr,    # [T * K] int32 out
    T,
    N_TRUE: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Stable counting-sort scatter: slot ``t*K+j`` goes to
    ``offsets[g] + block_start[b, g] + rank`` with ``g`` its group."""
    i_b = tl.program_id(0)
    o_t = i_b * BLOCK_T + tl.arange(0, BLOCK_T)
    o_k = tl.arange(0, BLOCK_K)
    m = (o_t < T)[:, None] & (o_k < K)[None, :]
    o_slot = o_t[:, None] * K + o_k[None, :]
    b_ids = tl.load(topk_ids_ptr + o_slot, mask=m, other=0)
    b_rank = tl.load(slot_rank_ptr + o_slot, mask=m, other=0)
    b_group = tl.minimum(b_ids, N_TRUE)
    b_start = tl.load(block_start_ptr + i_b * (N_TRUE + 1) + b_group, mask=m, other=0)
    b_off = tl.load(expert_offsets_ptr + b_group, mask=m, other=0)
    tl.store(sorted_slots_ptr + b_off + b_start + b_rank, o_slot, mask=m)


@triton.jit
def route_backward_kernel(
    grad_weights_ptr,  # [T, K] float32: d loss / d topk_weights
    logits_ptr,        # [T, E] router logits, row stride stride_t
    topk_ids_ptr,      # [T, K] int32
    grad_logits_ptr,   # [T, E] out, logits' dtype, contiguous
    T,
    stride_t,
    N_TRUE: tl.constexpr,
    E: tl.constexpr,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """d logits through softmax, top-k selection and the normalisation (probabilities recomputed).

    "all": with ``w_j = p_j / S`` over the top-k, ``dp_j = (g_j - sum_i g_i w_i) / S`` there, 0
    elsewhere, then the softmax backward ``dz = p * (dp - sum(dp * p))`` ("none": ``dp = g``).
    "true": ``w`` is a softmax of the selected true logits, so ``dz_j = w_j (g_j - sum_i g_i w_i)``
    on those slots directly.
    """
    i_b = tl.program_id(0)
    o_t = i_b * BLOCK_T + tl.arange(0, BLOCK_T)
    o_e = tl.arange(0, BLOCK_E)
    o_k = tl.arange(0, BLOCK_K)
    m_t = o_t < T
    m_e = o_e < E
    m_k = o_k < K
    if NORMALIZE != 0:  # "true" needs only the selected logits
        b_p = _softmax_rows(logits_ptr, stride_t, o_t, m_t, o_e, m_e)
    m_tk = m_t[:, None] & m_k[None, :]
    o_tk = o_t[:, None].to(tl.int64) * K + o_k[None, :]
    b_ids = tl.load(topk_ids_ptr + o_tk, mask=m_tk, other=0)
    b_g = tl.load(grad_weights_ptr + o_tk, mask=m_tk, other=0.0).to(tl.float32)

    # Selected probabilities (and, for "true", logits), gathered slot by slot.
    b_top = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    b_ltop = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(K):
        b_id_j = tl.sum(tl.where(o_k[None, :] == j, b_ids, 0), axis=1)
        if NORMALIZE == 0:
            b_l_j = _gather_logits(logits_ptr, stride_t, o_t, m_t, b_id_j, E)
            b_ltop = tl.where(o_k[None, :] == j, b_l_j[:, None], b_ltop)
        else:
            b_p_j = tl.sum(tl.where(o_e[None, :] == b_id_j[:, None], b_p, 0.0), axis=1)
            b_top = tl.where(o_k[None, :] == j, b_p_j[:, None], b_top)

    if NORMALIZE == 0:
        # w = softmax of the selected true logits: dz_j = w_j (g_j - sum_i g_i w_i) on the true
        # slots, 0 elsewhere (no division by the true mass, which may be denormal).
        b_true = (b_ids < N_TRUE) & m_k[None, :]
        b_w = _true_slot_softmax(b_ltop, b_true)
        b_gw = tl.sum(b_g * b_w, axis=1)
        b_dtop = tl.where(b_true, b_w * (b_g - b_gw[:, None]), 0.0)
    elif NORMALIZE == 2:
        b_dtop = tl.where(m_k[None, :], b_g, 0.0)
    else:
        b_in = m_k[None, :] & (b_ids >= 0)
        b_den = tl.sum(tl.where(b_in, b_top, 0.0), axis=1)
        b_den = tl.where(b_den > 0.0, b_den, 1.0)
        b_gw = tl.sum(tl.where(b_in, b_g * b_top, 0.0), axis=1) / b_den
        b_dtop = tl.where(b_in, (b_g - b_gw[:, None]) / b_den[:, None], 0.0)

    b_dp = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(K):
        b_id_j = tl.sum(tl.where(o_k[None, :] == j, b_ids, 0), axis=1)
        b_d_j = tl.sum(tl.where(o_k[None, :] == j, b_dtop, 0.0), axis=1)
        b_dp = tl.where(o_e[None, :] == b_id_j[:, None], b_d_j[:, None], b_dp)
    if NORMALIZE == 0:
        b_dz = b_dp  # already d logits: the weights depend on the selected logits only
    else:
        b_dz = b_p * (b_dp - tl.sum(b_dp * b_p, axis=1)[:, None])
    p_out = grad_logits_ptr + o_t[:, None].to(tl.int64) * E + o_e[None, :]
    tl.store(p_out, b_dz.to(grad_logits_ptr.dtype.element_ty), mask=m_t[:, None] & m_e[None, :])
