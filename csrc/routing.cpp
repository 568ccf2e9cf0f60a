// Fused routing on CPU: fp32 softmax, top-k, null drop, normalisation, per-expert counts and a
// stable counting sort of the flat slots t*k+j by true expert. Deterministic: every token block
// counts on its own, one serial prefix over (expert, block) places the blocks, no atomics.
#include "adamoe_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace adamoe {

// Tokens per block of the routing passes (one block = one task of at::parallel_for and one row of
// the per-block count table). Any value gives the same result; this one amortises the table.
constexpr int64_t kRouteBlockTokens = 256;

Normalize parse_normalize(const std::string& s) {
  if (s == "true") return Normalize::kTrue;
  if (s == "all") return Normalize::kAll;
  if (s == "none") return Normalize::kNone;
  TORCH_CHECK_VALUE(false, "normalize must be one of ('true', 'all', 'none'), got '", s, "'");
}

NullKind parse_null_kind(const std::string& s) {
  if (s == "zero") return NullKind::kZero;
  if (s == "identity") return NullKind::kIdentity;
  TORCH_CHECK_VALUE(false, "null_kind must be one of ('zero', 'identity'), got '", s, "'");
}

namespace {

void check_logits(const at::Tensor& logits, int64_t top_k, int64_t num_experts) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "router_logits must be a CPU tensor, got ",
                    logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, "router_logits must be [T, n+m], got shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                       logits.scalar_type() == at::kBFloat16,
                   "router_logits must be float32/float16/bfloat16, got ", logits.scalar_type());
  const int64_t total = logits.size(1);
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= total, "num_experts (", num_experts,
                    ") must be in [1, n+m = ", total, "]");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= total, "top_k (", top_k, ") must be in [1, n+m = ",
                    total, "]");
}

// probs[c] = softmax(x)[c] in fp32 (max-subtracted, like torch.softmax).
template <typename scalar_t>
inline void softmax_row(const scalar_t* x, int64_t N, float* probs) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < N; ++c) mx = std::max(mx, static_cast<float>(x[c]));
  float sum = 0.f;
  for (int64_t c = 0; c < N; ++c) {
    probs[c] = std::exp(static_cast<float>(x[c]) - mx);
    sum += probs[c];
  }
  const float inv = 1.f / sum;
  for (int64_t c = 0; c < N; ++c) probs[c] *= inv;
}

// k rounds of argmax (strict >: ties go to the lower index) over a scratch copy of probs.
inline void topk_row(const float* probs, int64_t N, int64_t k, float* scratch, int32_t* ids,
                     float* vals) {
  std::copy(probs, probs + N, scratch);
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = 0;
    float bv = -1.f;  // probabilities are >= 0; taken entries are set to -2
    for (int64_t c = 0; c < N; ++c) {
      if (scratch[c] > bv) {
        bv = scratch[c];
        best = c;
      }
    }
    ids[j] = static_cast<int32_t>(best);
    vals[j] = probs[best];
    scratch[best] = -2.f;
  }
}

template <typename scalar_t>
void route_blocks(const scalar_t* logits, int64_t T, int64_t N, int64_t k, int64_t n,
                  Normalize norm, int32_t* ids, float* weights, int64_t* block_counts) {
  const int64_t num_blocks = (T + kRouteBlockTokens - 1) / kRouteBlockTokens;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> probs(N), scratch(N), vals(k);
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* cnt = block_counts + b * (n + 1);
      std::fill(cnt, cnt + n + 1, 0);
      const int64_t t1 = std::min(T, (b + 1) * kRouteBlockTokens);
      for (int64_t t = b * kRouteBlockTokens; t < t1; ++t) {
        softmax_row(logits + t * N, N, probs.data());
        int32_t* id = ids + t * k;
        float* w = weights + t * k;
        topk_row(probs.data(), N, k, scratch.data(), id, vals.data());
        float denom = 0.f;
        for (int64_t j = 0; j < k; ++j) {
          if (norm == Normalize::kAll || id[j] < n) denom += vals[j];
        }
        for (int64_t j = 0; j < k; ++j) {
          const bool is_true = id[j] < n;
          switch (norm) {
            case Normalize::kNone: w[j] = vals[j]; break;
            case Normalize::kAll: w[j] = vals[j] / denom; break;
            case Normalize::kTrue: w[j] = (is_true && denom > 0.f) ? vals[j] / denom : 0.f; break;
          }
          cnt[is_true ? id[j] : n] += 1;
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& router_logits, int64_t top_k, int64_t num_experts,
    const std::string& normalize) {
  check_logits(router_logits, top_k, num_experts);
  const Normalize norm = parse_normalize(normalize);
  const at::Tensor logits = router_logits.contiguous();
  const int64_t T = logits.size(0), N = logits.size(1), k = top_k, n = num_experts;
  TORCH_CHECK_VALUE(T * k < std::numeric_limits<int32_t>::max(), "T*k must fit in int32");
  auto i32 = logits.options().dtype(at::kInt);
  at::Tensor ids = at::empty({T, k}, i32);
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
  at::Tensor counts = at::empty({n}, i32);
  at::Tensor offsets = at::empty({n + 1}, i32);
  at::Tensor sorted_slots = at::empty({T * k}, i32);

  // Pass 1 (parallel over token blocks): routing + per-block histogram over n+1 buckets
  // (bucket n = all null slots).
  const int64_t num_blocks = (T + kRouteBlockTokens - 1) / kRouteBlockTokens;
  std::vector<int64_t> block_counts(std::max<int64_t>(num_blocks, 1) * (n + 1), 0);
  int32_t* id_ptr = ids.data_ptr<int32_t>();
  ADAMOE_DISPATCH_FLOAT(logits.scalar_type(), "route_cpu", [&] {
    route_blocks<scalar_t>(logits.data_ptr<scalar_t>(), T, N, k, n, norm, id_ptr,
                           weights.data_ptr<float>(), block_counts.data());
  });

  // Pass 2 (serial, (n+1) x num_blocks): each block's first position inside each bucket. Buckets
  // are laid out expert 0..n-1 then null, blocks in token order: a stable counting sort.
  int32_t* cnt_ptr = counts.data_ptr<int32_t>();
  int32_t* off_ptr = offsets.data_ptr<int32_t>();
  int64_t running = 0;
  for (int64_t e = 0; e <= n; ++e) {
    if (e < n) off_ptr[e] = static_cast<int32_t>(running);
    const int64_t start = running;
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t c = block_counts[b * (n + 1) + e];
      block_counts[b * (n + 1) + e] = running;  // becomes the block's cursor
      running += c;
    }
    if (e < n) {
      cnt_ptr[e] = static_cast<int32_t>(running - start);
    } else {
      off_ptr[n] = static_cast<int32_t>(start);
    }
  }

  // Pass 3 (parallel over token blocks): scatter each slot to its cursor.
  int32_t* slot_ptr = sorted_slots.data_ptr<int32_t>();
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* cursor = block_counts.data() + b * (n + 1);
      const int64_t s1 = std::min(T, (b + 1) * kRouteBlockTokens) * k;
      for (int64_t s = b * kRouteBlockTokens * k; s < s1; ++s) {
        const int64_t e = id_ptr[s] < n ? id_ptr[s] : n;
        slot_ptr[cursor[e]++] = static_cast<int32_t>(s);
      }
    }
  });
  return {ids, weights, counts, offsets, sorted_slots};
}

namespace {

template <typename scalar_t>
void route_backward_rows(const float* grad_w, const scalar_t* logits, const int32_t* ids,
                         int64_t T, int64_t N, int64_t k, int64_t n, Normalize norm,
                         scalar_t* grad_logits) {
  at::parallel_for(0, T, kRouteBlockTokens, [&](int64_t t0, int64_t t1) {
    std::vector<float> probs(N), dprobs(N), dq(k);
    for (int64_t t = t0; t < t1; ++t) {
      softmax_row(logits + t * N, N, probs.data());
      const int32_t* id = ids + t * k;
      const float* g = grad_w + t * k;
      // d topk_probs from d weights (normalisation derivative).
      float denom = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        if (norm == Normalize::kAll || id[j] < n) denom += probs[id[j]];
      }
      if (norm == Normalize::kNone) {
        for (int64_t j = 0; j < k; ++j) dq[j] = g[j];
      } else if (norm == Normalize::kTrue && !(denom > 0.f)) {
        // All-null token: weights are constant zero, so is their gradient.
        std::fill(dq.begin(), dq.end(), 0.f);
      } else {
        // w_j = q_j / S over the normalised set => dq_j = (g_j - sum_i g_i w_i) / S on the set.
        float dot = 0.f;
        for (int64_t j = 0; j < k; ++j) {
          if (norm == Normalize::kAll || id[j] < n) dot += g[j] * (probs[id[j]] / denom);
        }
        for (int64_t j = 0; j < k; ++j) {
          const bool in_set = norm == Normalize::kAll || id[j] < n;
          dq[j] = in_set ? (g[j] - dot) / denom : 0.f;
        }
      }
      // Scatter into d probs, then the softmax backward p * (dp - <p, dp>).
      std::fill(dprobs.begin(), dprobs.end(), 0.f);
      float pdp = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        dprobs[id[j]] += dq[j];
        pdp += probs[id[j]] * dq[j];
      }
      scalar_t* out = grad_logits + t * N;
      for (int64_t c = 0; c < N; ++c) {
        out[c] = static_cast<scalar_t>(probs[c] * (dprobs[c] - pdp));
      }
    }
  });
}

}  // namespace

at::Tensor route_backward_cpu(const at::Tensor& grad_topk_weights, const at::Tensor& router_logits,
                              const at::Tensor& topk_ids, int64_t num_experts,
                              const std::string& normalize) {
  const int64_t k = topk_ids.dim() == 2 ? topk_ids.size(1) : 0;
  check_logits(router_logits, std::max<int64_t>(k, 1), num_experts);
  const Normalize norm = parse_normalize(normalize);
  const int64_t T = router_logits.size(0), N = router_logits.size(1), n = num_experts;
  TORCH_CHECK_VALUE(topk_ids.dim() == 2 && topk_ids.size(0) == T && k <= N,
                    "topk_ids must be [T, k] with T = ", T, " and k <= ", N, ", got shape ",
                    topk_ids.sizes());
  TORCH_CHECK_VALUE(grad_topk_weights.sizes() == topk_ids.sizes(),
                    "grad_topk_weights must have topk_ids' shape ", topk_ids.sizes(), ", got ",
                    grad_topk_weights.sizes());
  const at::Tensor logits = router_logits.contiguous();
  const at::Tensor ids = topk_ids.to(at::kInt).contiguous();
  const at::Tensor g = grad_topk_weights.to(at::kFloat).contiguous();
  {
    const int32_t* p = ids.data_ptr<int32_t>();
    const auto [mn, mx] = std::minmax_element(p, p + ids.numel());
    TORCH_CHECK_VALUE(ids.numel() == 0 || (*mn >= 0 && *mx < N), "topk_ids must be in [0, ", N,
                      ")");
  }
  at::Tensor grad = at::empty_like(logits);
  ADAMOE_DISPATCH_FLOAT(logits.scalar_type(),
                                  "route_backward_cpu", [&] {
    route_backward_rows<scalar_t>(g.data_ptr<float>(), logits.data_ptr<scalar_t>(),
                                  ids.data_ptr<int32_t>(), T, N, k, n, norm,
                                  grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace adamoe
