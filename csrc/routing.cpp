// Fused routing on CPU: fp32 softmax, top-k (optionally chosen on softmax(logits + selection_bias)
// and cut by top-p), null drop, normalisation, per-expert counts and a stable counting sort of
// the flat slots t*k+j by true expert. Deterministic: every token block counts on its own, one
// serial prefix over (expert, block) places the blocks, no atomics.
#include "adamoe_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

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

// The messages follow adamoe_kernels/_validation.py (check_top_p, check_route_args).
void check_top_p(double top_p) {
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0,
                    "top_p must be in (0, 1] (or None to turn top-p off), got ", top_p);
}

// selection_bias [n+m] float (any of the three dtypes), on the logits' device (CPU), finite.
// Returns it as a contiguous float32 tensor.
at::Tensor check_selection_bias(const at::Tensor& bias, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(bias.scalar_type() == at::kFloat || bias.scalar_type() == at::kHalf ||
                       bias.scalar_type() == at::kBFloat16,
                   "selection_bias has dtype ", bias.scalar_type(),
                   "; supported: float32, float16, bfloat16");
  TORCH_CHECK_VALUE(bias.dim() == 1, "selection_bias must have 1 dimensions, got shape ",
                    bias.sizes());
  TORCH_CHECK_VALUE(bias.size(0) == logits.size(1), "selection_bias must have n+m = ",
                    logits.size(1), " entries, got ", bias.size(0));
  TORCH_CHECK_VALUE(bias.device() == logits.device(), "selection_bias is on ", bias.device(),
                    " but router_logits is on ", logits.device());
  at::Tensor b = bias.to(at::kFloat).contiguous();
  const float* p = b.data_ptr<float>();
  TORCH_CHECK_VALUE(std::all_of(p, p + b.numel(), [](float v) { return std::isfinite(v); }),
                    "selection_bias contains NaN or Inf values");
  return b;
}

template <typename scalar_t>
inline bool row_finite(const scalar_t* x, int64_t N) {
  bool ok = true;
  for (int64_t c = 0; c < N; ++c) ok &= std::isfinite(static_cast<float>(x[c]));
  return ok;
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

// k rounds of argmax (strict >: ties go to the lower index) over a scratch copy of the selection
// scores `select` (the probabilities themselves, or softmax(logits + selection_bias)): ids, vals =
// the unbiased probs of those ids, and (if sel_vals) their selection scores, for the top-p mass.
inline void topk_row(const float* select, const float* probs, int64_t N, int64_t k,
                     float* scratch, int32_t* ids, float* vals, float* sel_vals) {
  std::copy(select, select + N, scratch);
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = 0;
    float bv = -1.f;  // scores are >= 0; taken entries are set to -2
    for (int64_t c = 0; c < N; ++c) {
      if (scratch[c] > bv) {
        bv = scratch[c];
        best = c;
      }
    }
    ids[j] = static_cast<int32_t>(best);
    vals[j] = probs[best];
    if (sel_vals) sel_vals[j] = select[best];
    scratch[best] = -2.f;
  }
}

// select[c] = softmax(x + bias)[c] in fp32: the scores that choose the experts when a selection
// bias is given (x + bias rounded to fp32 first, like reference.route).
template <typename scalar_t>
inline void softmax_biased_row(const scalar_t* x, const float* bias, int64_t N, float* select) {
  for (int64_t c = 0; c < N; ++c) select[c] = static_cast<float>(x[c]) + bias[c];
  softmax_row(select, N, select);
}

// normalize="true" weights of one token: w_j = p_j / sum_true p, computed as a softmax of the
// selected true slots' logits (the softmax normaliser cancels), so it cannot underflow when every
// true probability is denormal in fp32. Null and dropped slots (id >= n) get 0; so does an
// all-null token. Same arithmetic as reference.normalize_topk.
template <typename scalar_t>
inline void true_slot_softmax(const scalar_t* x, const int32_t* id, int64_t k, int64_t n,
                              float* w) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    if (id[j] < n) mx = std::max(mx, static_cast<float>(x[id[j]]));
  }
  float sum = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    w[j] = id[j] < n ? std::exp(static_cast<float>(x[id[j]]) - mx) : 0.f;
    sum += w[j];
  }
  if (sum > 0.f) {
    for (int64_t j = 0; j < k; ++j) w[j] /= sum;
  }
}

// Top-p cut of one token's top-k: slot j stays while the selection mass of slots 0..j-1 is below
// top_p; a dropped slot gets id N (= n+m, "no expert") and probability 0. The mass is computed as
// reference.route does (torch.cumsum on CPU accumulates fp32 in double, rounds to fp32, then the
// slot's own score is subtracted in fp32), so a boundary case decides the same way.
inline void top_p_row(const float* sel_vals, int64_t N, int64_t k, float top_p, int32_t* ids,
                      float* vals) {
  double cum = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    cum += sel_vals[j];
    const float before = static_cast<float>(cum) - sel_vals[j];
    if (!(before < top_p)) {
      ids[j] = static_cast<int32_t>(N);
      vals[j] = 0.f;
    }
  }
}

// kBias: choose on softmax(logits + bias); kTopP: cut by top_p. Both false is the plain path
// (no extra work per token: the branches are compile-time).
template <typename scalar_t, bool kBias, bool kTopP>
void route_blocks(const scalar_t* logits, int64_t T, int64_t N, int64_t k, int64_t n,
                  Normalize norm, const float* bias, float top_p, int32_t* ids, float* weights,
                  int64_t* block_counts, std::atomic<bool>& nonfinite) {
  const int64_t num_blocks = (T + kRouteBlockTokens - 1) / kRouteBlockTokens;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> probs(N), scratch(N), vals(k);
    std::vector<float> select(kBias ? N : 0), sel_vals(kTopP ? k : 0);
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* cnt = block_counts + b * (n + 1);
      std::fill(cnt, cnt + n + 1, 0);
      const int64_t t1 = std::min(T, (b + 1) * kRouteBlockTokens);
      for (int64_t t = b * kRouteBlockTokens; t < t1; ++t) {
        int32_t* id = ids + t * k;
        float* w = weights + t * k;
        if (!row_finite(logits + t * N, N)) {
          // Reported (ValueError) once every block is done; the row gets dropped slots so the
          // counts and the sort below stay in bounds.
          nonfinite.store(true, std::memory_order_relaxed);
          std::fill(id, id + k, static_cast<int32_t>(N));
          std::fill(w, w + k, 0.f);
          cnt[n] += k;
          continue;
        }
        softmax_row(logits + t * N, N, probs.data());
        const float* sel = probs.data();
        if constexpr (kBias) {
          softmax_biased_row(logits + t * N, bias, N, select.data());
          sel = select.data();
        }
        topk_row(sel, probs.data(), N, k, scratch.data(), id, vals.data(),
                 kTopP ? sel_vals.data() : nullptr);
        if constexpr (kTopP) top_p_row(sel_vals.data(), N, k, top_p, id, vals.data());
        if (norm == Normalize::kTrue) {
          true_slot_softmax(logits + t * N, id, k, n, w);
        } else {
          float denom = 0.f;
          for (int64_t j = 0; j < k; ++j) denom += vals[j];
          for (int64_t j = 0; j < k; ++j) {
            w[j] = norm == Normalize::kNone ? vals[j] : vals[j] / denom;
          }
        }
        for (int64_t j = 0; j < k; ++j) cnt[id[j] < n ? id[j] : n] += 1;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& router_logits, int64_t top_k, int64_t num_experts,
    const std::string& normalize, std::optional<double> top_p,
    const std::optional<at::Tensor>& selection_bias) {
  check_logits(router_logits, top_k, num_experts);
  const Normalize norm = parse_normalize(normalize);
  if (top_p.has_value()) check_top_p(*top_p);
  at::Tensor bias;
  if (selection_bias.has_value()) bias = check_selection_bias(*selection_bias, router_logits);
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
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  // top_p is compared in fp32, as reference.route's fp32 tensor against the Python float.
  const float tp = top_p.has_value() ? static_cast<float>(*top_p) : 2.f;
  std::atomic<bool> nonfinite{false};  // a NaN/Inf logit (checked here, not by a Python pass)
  ADAMOE_DISPATCH_FLOAT(logits.scalar_type(), "route_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    float* w = weights.data_ptr<float>();
    int64_t* bc = block_counts.data();
    if (bias_ptr != nullptr && top_p.has_value()) {
      route_blocks<scalar_t, true, true>(x, T, N, k, n, norm, bias_ptr, tp, id_ptr, w, bc,
                                          nonfinite);
    } else if (bias_ptr != nullptr) {
      route_blocks<scalar_t, true, false>(x, T, N, k, n, norm, bias_ptr, tp, id_ptr, w, bc,
                                          nonfinite);
    } else if (top_p.has_value()) {
      route_blocks<scalar_t, false, true>(x, T, N, k, n, norm, bias_ptr, tp, id_ptr, w, bc,
                                          nonfinite);
    } else {
      route_blocks<scalar_t, false, false>(x, T, N, k, n, norm, bias_ptr, tp, id_ptr, w, bc,
                                          nonfinite);
    }
  });

  TORCH_CHECK_VALUE(!nonfinite.load(), "router_logits contains NaN or Inf values");

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
      const int32_t* id = ids + t * k;
      const float* g = grad_w + t * k;
      scalar_t* out = grad_logits + t * N;
      if (norm == Normalize::kTrue) {
        // w = softmax of the selected true logits: dz_j = w_j (g_j - <g, w>) on the true slots,
        // 0 elsewhere (no division by the true mass, which may be denormal).
        true_slot_softmax(logits + t * N, id, k, n, dq.data());
        float dot = 0.f;
        for (int64_t j = 0; j < k; ++j) dot += g[j] * dq[j];
        std::fill(out, out + N, static_cast<scalar_t>(0.f));
        for (int64_t j = 0; j < k; ++j) {
          if (id[j] < n) out[id[j]] = static_cast<scalar_t>(dq[j] * (g[j] - dot));
        }
        continue;
      }
      softmax_row(logits + t * N, N, probs.data());
      // d topk_probs from d weights (normalisation derivative). A slot dropped by top-p (id N)
      // has the constant probability 0: it is in no set and gets no gradient.
      if (norm == Normalize::kNone) {
        for (int64_t j = 0; j < k; ++j) dq[j] = id[j] < N ? g[j] : 0.f;
      } else {
        // "all": w_j = q_j / S over the top-k => dq_j = (g_j - sum_i g_i w_i) / S there.
        float denom = 0.f;
        for (int64_t j = 0; j < k; ++j) {
          if (id[j] < N) denom += probs[id[j]];
        }
        float dot = 0.f;
        for (int64_t j = 0; j < k; ++j) {
          if (id[j] < N) dot += g[j] * (probs[id[j]] / denom);
        }
        for (int64_t j = 0; j < k; ++j) dq[j] = id[j] < N ? (g[j] - dot) / denom : 0.f;
      }
      // Scatter into d probs, then the softmax backward p * (dp - <p, dp>).
      std::fill(dprobs.begin(), dprobs.end(), 0.f);
      float pdp = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        if (id[j] == N) continue;
        dprobs[id[j]] += dq[j];
        pdp += probs[id[j]] * dq[j];
      }
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
    // N (= n+m) marks a slot dropped by top-p.
    TORCH_CHECK_VALUE(ids.numel() == 0 || (*mn >= 0 && *mx <= N), "topk_ids must be in [0, ", N,
                      "] (", N, " = a slot dropped by top-p)");
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
