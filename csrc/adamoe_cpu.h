// adamoe_kernels C++ CPU backend: fused routing + counting sort, grouped expert MLP and LoRA
// experts (forward and backward) over the compacted true assignments only. Semantics:
// shared/DESIGN.md; oracle: adamoe_kernels/reference.py. Registered as torch.ops.adamoe.*_cpu by
// python_bindings/bindings.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

// Dispatch over the three supported floating dtypes (float32, float16, bfloat16).
#define ADAMOE_DISPATCH_FLOAT(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace adamoe {

enum class Normalize { kTrue, kAll, kNone };
enum class NullKind { kZero, kIdentity };

Normalize parse_normalize(const std::string& s);
NullKind parse_null_kind(const std::string& s);

// ---- routing.cpp ---------------------------------------------------------------------------

// router_logits [T, n+m] (fp32/fp16/bf16) ->
//   topk_ids int32 [T, k], topk_weights float32 [T, k], expert_counts int32 [n],
//   expert_offsets int32 [n+1], sorted_slots int32 [T*k] (true slots grouped by expert, in slot
//   order; then the null slots in slot order).
// selection_bias [n+m] (optional, float; CPU): the experts are chosen on softmax(logits + bias),
// the weights come from the unbiased softmax(logits). top_p (optional, in (0, 1]): slot j is kept
// while the selection mass of slots 0..j-1 is below top_p; a dropped slot gets id n+m and
// weight 0 and is sorted with the null slots. Semantics of adamoe_kernels/reference.py::route.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& router_logits, int64_t top_k, int64_t num_experts,
    const std::string& normalize, std::optional<double> top_p,
    const std::optional<at::Tensor>& selection_bias);

// d topk_weights [T, k] -> d router_logits [T, n+m] (router_logits' dtype). The softmax and the
// normalisation are recomputed from the logits; only topk_ids is needed besides (ids n+m, slots
// dropped by top-p, get no gradient; the selection bias has none either).
at::Tensor route_backward_cpu(const at::Tensor& grad_topk_weights, const at::Tensor& router_logits,
                              const at::Tensor& topk_ids, int64_t num_experts,
                              const std::string& normalize);

// ---- grouped_mlp.cpp -----------------------------------------------------------------------

// Returns (y [T, H] hidden's dtype, gate_up_out [A, 2I] hidden's dtype) with A = expert_offsets[n]
// (the number of true assignments). gate_up_out is an opaque buffer saved for the backward: rows
// off_e..off_{e+1} hold expert e's pre-activation (x_rows @ gate_up_proj[e]^T) stored transposed,
// as a contiguous [2I, r_e] block.
std::tuple<at::Tensor, at::Tensor> moe_mlp_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& sorted_slots,
    const at::Tensor& expert_offsets, const std::string& null_kind);

// Returns (grad_hidden [T, H], grad_gate_up_proj [n, 2I, H], grad_down_proj [n, H, I],
// grad_topk_weights [T, k] topk_weights' dtype); an output whose output_mask entry is false is an
// empty [0] tensor and costs nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& sorted_slots, const at::Tensor& expert_offsets,
    const at::Tensor& gate_up_out, const std::string& null_kind, std::array<bool, 4> output_mask);

// ---- lora_experts.cpp ----------------------------------------------------------------------

// Mixture of LoRA experts over the true assignments (semantics of reference.py::moe_lora):
// delta_t = sum_{true j} w_tj * scaling * lora_B[e] @ (lora_A[e] @ x_t), e = topk_ids[t, j] < n.
// x [T, in], lora_A [n, r, in], lora_B [n, out, r] (x's dtype); routing tensors as route_cpu
// returns them. Returns (y [T, out] x's dtype, u [T*k, r] float32): u holds lora_A[e] @ x_t for
// every true slot t*k+j (zero rows for the null slots) and is saved for the backward.
std::tuple<at::Tensor, at::Tensor> moe_lora_forward_cpu(
    const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& sorted_slots,
    const at::Tensor& expert_offsets, double scaling);

// Returns (grad_x [T, in], grad_lora_A [n, r, in], grad_lora_B [n, out, r], grad_topk_weights
// [T, k] topk_weights' dtype; zero on null slots); an output whose output_mask entry is false is
// an empty [0] tensor. Experts without rows get exact-zero weight gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& sorted_slots, const at::Tensor& expert_offsets, const at::Tensor& u,
    double scaling, std::array<bool, 4> output_mask);

// ---- dense_linear.cpp ----------------------------------------------------------------------

// y [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]) for float32 or bfloat16 (one dtype; bf16
// accumulates in fp32 and rounds once) on the small-M streaming kernel; rows of x and weight must
// be contiguous (any row stride). Needs AVX-512 (bf16: AVX512_BF16). No autograd: for the dense
// layers of a decode step (adamoe_kernels/integrations/decode.py).
at::Tensor linear_small_m_cpu(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias);

}  // namespace adamoe
