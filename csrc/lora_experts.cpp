// Grouped LoRA experts (Mo-LoRA) on CPU over the true assignments only (null slots cost nothing).
//
//   delta_t = sum_{true j} w_tj * s * B_e (A_e x_t),  e = topk_ids[t, j] < n,  s = scaling
//   x [T, in], lora_A [n, r, in], lora_B [n, out, r]; the rank r is small (1..256).
//
// The rank is tiny, so the FLOPs are few (r * (in + out) per assignment, a few percent of the
// frozen base linear's) and the cost is memory traffic. The passes over token rows run on blocks of
// kTokenBlock tokens (one task each): a block's rows are converted to fp32 once, its true slots
// grouped by expert (a counting sort of the block), and each expert's rows go through register
// tiles (kDotMR x kDotNR dot products, kExpandMR rows x kExpandNV vectors of the expansion), so an
// expert's fp32 weights (A_f [n, r, in], Bt_f = B^T [n, r, out], converted once per call, in L2)
// are read once per tile of rows instead of once per row (measured: 1 thread, T=512, 512 -> 1408,
// bf16, top-2: forward 0.68 ms token by token, 0.56 ms in blocks, same register tiles). The
// sums of a block stay in fp32 rows (in L2) and are rounded once. Each token's sums run over its
// experts in increasing order and over q in order, whatever the block or tile sizes.
//
// Forward, per token t with true slots j (a token without one writes an exact zero row, x unread):
//   u_tj     = A_e x_t                                   r dot products of length in  (saved, fp32)
//   delta_t  = sum_j sum_q (w_tj s u_tj[q]) Bt_e[q]       expansion over out
// Backward, per token:
//   g_tj     = B_e^T dy_t = (Bt_e[q] . dy_t)_q            r dot products of length out
//   d w_tj   = s <g_tj, u_tj>;  du_tj = w_tj s g_tj;  v_tj = w_tj s u_tj
//   dx_t     = sum_j sum_q du_tj[q] A_e[q]                expansion over in
// and the weight gradients, reductions over each expert's rows (sorted_slots, slot order):
//   dA_e[q, i]  = sum_{slots a of e} du_a[q] x[token a, i]
//   dB_e[o, q]  = sum_{slots a of e} v_a[q]  dy[token a, o]
// tiled over (expert, kWgradRanks ranks, kWgradCols columns): every task owns its output tile and
// sums its expert's rows in slot order. Every result is summed in a fixed order by one task, so it
// is deterministic and independent of the thread count; no atomics, no per-thread partial sums.
//
// Why not at::mm: the reference's per-expert bf16 matmuls with one dimension equal to r cost about
// 1 ms each in oneDNN whatever the row count (profiled in the Mo-LoRA training step on a 2-core
// Xeon: [50..370, 8] @ [8, 512..1408] and [r_e, 512] @ [512, 8]), so the time did not fall with the
// load; the loops here are AVX-512 (picked at run time) with portable fallbacks through cpu_math.
#include "adamoe_cpu.h"
#include "cpu_math.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ADAMOE_LORA_AVX512 1
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "simd_math.h"
// has_avx512() includes BW and VL (masked 16-bit loads of bf16/fp16 rows).
#define ADAMOE_AVX512_BW __attribute__((target("avx512f,avx512bw,avx512vl")))
// The register tiles are inlined into their (AVX-512) drivers and their constant-count loops are
// unrolled by pragma: otherwise GCC 12 keeps their accumulator arrays in registers but also stores
// them to the stack on every step (seen in the disassembly; the backward ran 1.15x slower).
#define ADAMOE_INLINE __attribute__((always_inline)) inline
#define ADAMOE_UNROLL _Pragma("GCC unroll 16")
// case w: F(w) for w = 8 .. 2, default: F(1) (a run-time count as a template argument).
#define ADAMOE_CASES_8(F)  \
  case 8: F(8); break;     \
  case 7: F(7); break;     \
  case 6: F(6); break;     \
  case 5: F(5); break;     \
  ADAMOE_CASES_4(F)
#define ADAMOE_CASES_4(F) \
  case 4: F(4); break;    \
  case 3: F(3); break;    \
  case 2: F(2); break;    \
  default: F(1); break;
#else
#define ADAMOE_LORA_AVX512 0
#endif

// A torch.profiler scope "adamoe_cpu::<name>" until the end of the enclosing block.
#define ADAMOE_SCOPE(name) RECORD_FUNCTION("adamoe_cpu::" name, std::vector<c10::IValue>())

namespace adamoe {

namespace {

// Tokens per block of the token passes (a task): the block's rows are grouped by expert, so each
// expert's weights are read once per register tile of rows instead of once per row.
constexpr int64_t kTokenBlock = 32;
// Register tiles of the grouped dot products (rows x weight rows: 3 x 8 = 24 accumulators of
// 16-lane partial sums) and of the grouped expansion (rows x 16-wide vectors: 4 x 6 = 24).
constexpr int kDotMR = 3;
constexpr int kDotNR = 8;
constexpr int kExpandMR = 4;
constexpr int kExpandNV = 6;
// Weight-gradient tiles: ranks x columns (8 x 32 = 16 zmm accumulators).
constexpr int64_t kWgradRanks = 8;
constexpr int64_t kWgradCols = 32;
// Rows ahead whose tile columns the weight-gradient loop prefetches.
constexpr int64_t kWgradAhead = 8;

#if ADAMOE_LORA_AVX512

// Lanes of a 16-wide vector with `left` values still to go (none for left <= 0).
inline __mmask16 tail_mask(int64_t left) {
  if (left <= 0) return 0;
  return static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1u);
}

// 16 values of a row of any supported dtype (masked) -> fp32.
ADAMOE_AVX512_BW inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
ADAMOE_AVX512_BW inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  return simd::from_bf16(_mm256_maskz_loadu_epi16(m, p));
}
ADAMOE_AVX512_BW inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// out[m * ldo + q] = <xr[m], wr[q]> for m < MR, q < NR (rows of length K): one pass over K, each
// sum the same 16-lane partial sums as cpu_math::dot.
template <int MR, int NR>
ADAMOE_AVX512_BW ADAMOE_INLINE void dot_tile(const float* const* xr, const float* const* wr,
                                             int64_t K, float* out, int64_t ldo) {
  __m512 acc[MR][NR];
  ADAMOE_UNROLL
  for (int m = 0; m < MR; ++m) {
    ADAMOE_UNROLL
    for (int q = 0; q < NR; ++q) acc[m][q] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < K; i += 16) {
    const __mmask16 mk = tail_mask(K - i);
    __m512 xv[MR];
    ADAMOE_UNROLL
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_ps(mk, xr[m] + i);
    ADAMOE_UNROLL
    for (int q = 0; q < NR; ++q) {
      const __m512 w = _mm512_maskz_loadu_ps(mk, wr[q] + i);
      ADAMOE_UNROLL
      for (int m = 0; m < MR; ++m) acc[m][q] = _mm512_fmadd_ps(xv[m], w, acc[m][q]);
    }
  }
  ADAMOE_UNROLL
  for (int m = 0; m < MR; ++m) {
    ADAMOE_UNROLL
    for (int q = 0; q < NR; ++q) out[m * ldo + q] = _mm512_reduce_add_ps(acc[m][q]);
  }
}

// yr[m][c0 + c] += sum_{p < P} coef[m * ldc + p] * wr[p][c0 + c] for m < MR, c < 16 NV (the last
// vector masked to `left - 16 (NV - 1)` columns), p in order: per element the same FMAs as P calls
// of cpu_math::axpy.
template <int MR, int NV>
ADAMOE_AVX512_BW ADAMOE_INLINE void expand_tile(const float* coef, int64_t ldc,
                                                const float* const* wr, int64_t P, int64_t c0,
                                                int64_t left, float* const* yr) {
  const __mmask16 last = tail_mask(left - 16 * (NV - 1));
  auto mask = [&](int v) { return v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF); };
  __m512 acc[MR][NV];
  ADAMOE_UNROLL
  for (int m = 0; m < MR; ++m) {
    ADAMOE_UNROLL
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_maskz_loadu_ps(mask(v), yr[m] + c0 + 16 * v);
  }
  for (int64_t p = 0; p < P; ++p) {
    __m512 b[MR];
    ADAMOE_UNROLL
    for (int m = 0; m < MR; ++m) b[m] = _mm512_set1_ps(coef[m * ldc + p]);
    const float* row = wr[p] + c0;
    ADAMOE_UNROLL
    for (int v = 0; v < NV; ++v) {
      const __m512 w = _mm512_maskz_loadu_ps(mask(v), row + 16 * v);
      ADAMOE_UNROLL
      for (int m = 0; m < MR; ++m) acc[m][v] = _mm512_fmadd_ps(b[m], w, acc[m][v]);
    }
  }
  ADAMOE_UNROLL
  for (int m = 0; m < MR; ++m) {
    ADAMOE_UNROLL
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(yr[m] + c0 + 16 * v, mask(v), acc[m][v]);
  }
}

// acc[q][c] = sum_{a < rows} coef[slots[a] * ldc + q] * L[tokens[a] * ldl + c] for q < NR,
// c < nc <= 32 (two vectors, the second masked); a in order.
template <int NR, typename T>
ADAMOE_AVX512_BW ADAMOE_INLINE void wgrad_block(const T* L, int64_t ldl, const float* coef,
                                                int64_t ldc, const int32_t* slots,
                                                const int32_t* tokens, int64_t rows, int64_t nc,
                                                float* acc_out) {
  __m512 acc[NR][2];
  ADAMOE_UNROLL
  for (int q = 0; q < NR; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
  const __mmask16 m0 = tail_mask(nc), m1 = tail_mask(nc - 16);
  for (int64_t a = 0; a < rows; ++a) {
    const int64_t s = slots[a];
    const T* l = L + tokens[a] * ldl;
    if (a + kWgradAhead < rows) {  // the rows are gathered: fetch a later one while this computes
      const char* next = reinterpret_cast<const char*>(L + tokens[a + kWgradAhead] * ldl);
      _mm_prefetch(next, _MM_HINT_T0);
      if constexpr (sizeof(T) == 4) _mm_prefetch(next + 64, _MM_HINT_T0);
    }
    const __m512 l0 = load16(l, m0), l1 = load16(l + 16, m1);
    const float* cf = coef + s * ldc;
    ADAMOE_UNROLL
    for (int q = 0; q < NR; ++q) {
      const __m512 b = _mm512_set1_ps(cf[q]);
      acc[q][0] = _mm512_fmadd_ps(b, l0, acc[q][0]);
      acc[q][1] = _mm512_fmadd_ps(b, l1, acc[q][1]);
    }
  }
  ADAMOE_UNROLL
  for (int q = 0; q < NR; ++q) {
    _mm512_storeu_ps(acc_out + q * kWgradCols, acc[q][0]);
    _mm512_storeu_ps(acc_out + q * kWgradCols + 16, acc[q][1]);
  }
}

// The drivers: every tile of a call, with its run-time sizes as template arguments.
template <int MR>
ADAMOE_AVX512_BW void dot_rows(const float* const* xr, const float* const* wr, int64_t P,
                               int64_t K, float* out) {
  for (int64_t q0 = 0; q0 < P; q0 += kDotNR) {
#define ADAMOE_DOT(NR) dot_tile<MR, NR>(xr, wr + q0, K, out + q0, P)
    switch (std::min<int64_t>(kDotNR, P - q0)) { ADAMOE_CASES_8(ADAMOE_DOT) }
#undef ADAMOE_DOT
  }
}

ADAMOE_AVX512_BW void grouped_dots_avx512(const float* const* xr, int64_t R,
                                          const float* const* wr, int64_t P, int64_t K,
                                          float* out) {
  static_assert(kDotMR == 3 && kDotNR == 8, "the cases below");
  for (int64_t m0 = 0; m0 < R; m0 += kDotMR) {
    const int64_t mr = std::min<int64_t>(kDotMR, R - m0);
    float* o = out + m0 * P;
    if (mr == 3) dot_rows<3>(xr + m0, wr, P, K, o);
    else if (mr == 2) dot_rows<2>(xr + m0, wr, P, K, o);
    else dot_rows<1>(xr + m0, wr, P, K, o);
  }
}

template <int MR>
ADAMOE_AVX512_BW void expand_rows(const float* coef, const float* const* wr, int64_t P, int64_t N,
                                  float* const* yr) {
  constexpr int64_t kCols = 16 * kExpandNV;
  for (int64_t c0 = 0; c0 < N; c0 += kCols) {
    const int64_t left = std::min(kCols, N - c0);
    switch ((left + 15) / 16) {
#define ADAMOE_EXPAND(NV) expand_tile<MR, NV>(coef, P, wr, P, c0, left, yr)
      case 6: ADAMOE_EXPAND(6); break;
      case 5: ADAMOE_EXPAND(5); break;
      ADAMOE_CASES_4(ADAMOE_EXPAND)
#undef ADAMOE_EXPAND
    }
  }
}

ADAMOE_AVX512_BW void grouped_expand_avx512(const float* coef, int64_t R, const float* const* wr,
                                            int64_t P, int64_t N, float* const* yr) {
  static_assert(kExpandMR == 4 && kExpandNV == 6, "the cases above and below");
  for (int64_t m0 = 0; m0 < R; m0 += kExpandMR) {
    const float* c = coef + m0 * P;
    switch (std::min<int64_t>(kExpandMR, R - m0)) {
#define ADAMOE_EXPAND(MR) expand_rows<MR>(c, wr, P, N, yr + m0)
      ADAMOE_CASES_4(ADAMOE_EXPAND)
#undef ADAMOE_EXPAND
    }
  }
}

template <typename T>
ADAMOE_AVX512_BW void wgrad_avx512(const T* L, int64_t ldl, const float* coef, int64_t ldc,
                                   const int32_t* slots, const int32_t* tokens, int64_t rows,
                                   int64_t nr, int64_t nc, float* acc) {
  static_assert(kWgradRanks == 8, "the cases below");
  switch (nr) {
#define ADAMOE_WGRAD(NR) wgrad_block<NR>(L, ldl, coef, ldc, slots, tokens, rows, nc, acc)
    ADAMOE_CASES_8(ADAMOE_WGRAD)
#undef ADAMOE_WGRAD
  }
}

#endif  // ADAMOE_LORA_AVX512

// out[m * P + q] = <xr[m], wr[q]> for m < R, q < P (fp32 rows of length K).
void grouped_dots(const float* const* xr, int64_t R, const float* const* wr, int64_t P, int64_t K,
                  float* out) {
#if ADAMOE_LORA_AVX512
  if (cpu_math::has_avx512()) return grouped_dots_avx512(xr, R, wr, P, K, out);
#endif
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t q = 0; q < P; ++q) out[m * P + q] = cpu_math::dot(xr[m], wr[q], K);
  }
}

// yr[m][c] += sum_p coef[m * P + p] * wr[p][c] for m < R, c < N (p in order).
void grouped_expand(const float* coef, int64_t R, const float* const* wr, int64_t P, int64_t N,
                    float* const* yr) {
#if ADAMOE_LORA_AVX512
  if (cpu_math::has_avx512()) return grouped_expand_avx512(coef, R, wr, P, N, yr);
#endif
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t p = 0; p < P; ++p) cpu_math::axpy(yr[m], coef[m * P + p], wr[p], N);
  }
}

// Tile of a weight gradient: acc [nr, kWgradCols] (row stride kWgradCols) with
// acc[q][c] = sum_{a < rows} coef[slots[a] * ldc + q] * L[tokens[a] * ldl + c], c < nc.
template <typename T>
void wgrad_tile(const T* L, int64_t ldl, const float* coef, int64_t ldc, const int32_t* slots,
                const int32_t* tokens, int64_t rows, int64_t nr, int64_t nc, float* acc) {
#if ADAMOE_LORA_AVX512
  if (cpu_math::has_avx512()) {
    return wgrad_avx512(L, ldl, coef, ldc, slots, tokens, rows, nr, nc, acc);
  }
#endif
  std::fill(acc, acc + kWgradRanks * kWgradCols, 0.f);
  float l[kWgradCols];
  for (int64_t a = 0; a < rows; ++a) {
    const int64_t s = slots[a];
    cpu_math::convert(L + tokens[a] * ldl, l, nc);
    for (int64_t q = 0; q < nr; ++q) cpu_math::axpy(acc + q * kWgradCols, coef[s * ldc + q], l, nc);
  }
}

// ---- routing metadata ---------------------------------------------------------------------

// The routing of one call, read from CPU tensors (no device sync) and checked, so a malformed
// Routing raises instead of reading out of bounds.
struct LoraRouting {
  int64_t T, k, n, S, A;
  std::vector<int64_t> off;  // [n+1]
  at::Tensor ids, w, slots;  // int32 [T*k], float32 [T*k], int32 [T*k] (contiguous)
  const int32_t* id() const { return ids.data_ptr<int32_t>(); }
  const float* weight() const { return w.data_ptr<float>(); }
  const int32_t* slot() const { return slots.data_ptr<int32_t>(); }
};

void check_lora_tensors(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                        const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& slots,
                        const at::Tensor& offsets) {
  for (const at::Tensor* t : {&x, &lora_A, &lora_B, &ids, &weights, &slots, &offsets}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "adamoe cpu ops take CPU tensors, got ", t->device());
  }
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "x must be float32/bfloat16/float16, got ", st);
  TORCH_CHECK_TYPE(lora_A.scalar_type() == st && lora_B.scalar_type() == st,
                   "lora_A and lora_B must have x's dtype ", st);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be [T, in], got ", x.sizes());
  TORCH_CHECK_VALUE(lora_A.dim() == 3 && lora_A.size(0) >= 1 && lora_A.size(1) >= 1 &&
                        lora_A.size(2) == x.size(1),
                    "lora_A must be [n, r, in] with n, r >= 1 and in = ", x.size(1), ", got ",
                    lora_A.sizes());
  TORCH_CHECK_VALUE(lora_B.dim() == 3 && lora_B.size(0) == lora_A.size(0) &&
                        lora_B.size(1) >= 1 && lora_B.size(2) == lora_A.size(1),
                    "lora_B must be [n, out, r] = [", lora_A.size(0), ", out, ", lora_A.size(1),
                    "], got ", lora_B.sizes());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == x.size(0),
                    "topk_ids must be [T, k] with T = ", x.size(0), ", got ", ids.sizes());
  TORCH_CHECK_VALUE(weights.sizes() == ids.sizes(), "topk_weights must have topk_ids' shape");
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.numel() == ids.numel(),
                    "sorted_slots must be [T*k] = [", ids.numel(), "], got ", slots.sizes());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() == lora_A.size(0) + 1,
                    "expert_offsets must be [n+1] = [", lora_A.size(0) + 1, "], got ",
                    offsets.sizes());
}

LoraRouting read_routing(int64_t n, const at::Tensor& ids_in, const at::Tensor& weights_in,
                         const at::Tensor& slots_in, const at::Tensor& offsets_in) {
  ADAMOE_SCOPE("lora_groups");
  LoraRouting g;
  g.T = ids_in.size(0);
  g.k = ids_in.size(1);
  g.n = n;
  g.S = g.T * g.k;
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  g.off.assign(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + n + 1);
  bool monotone = g.off[0] == 0;
  for (int64_t e = 0; e < n; ++e) monotone = monotone && g.off[e] <= g.off[e + 1];
  TORCH_CHECK_VALUE(monotone, "expert_offsets must start at 0 and be non-decreasing");
  g.A = g.off[n];
  TORCH_CHECK_VALUE(g.A <= g.S, "expert_offsets[n] (", g.A, ") exceeds T*k (", g.S, ")");
  g.ids = ids_in.to(at::kInt).contiguous().view({-1});
  g.w = weights_in.to(at::kFloat).contiguous().view({-1});
  g.slots = slots_in.to(at::kInt).contiguous();
  const int32_t* id = g.id();
  const int32_t* sl = g.slot();
  std::atomic<bool> bad{false};
  // A slot belongs to expert id[s] only, so each seen[s] is written by one thread.
  std::vector<uint8_t> seen(g.S, 0);
  at::parallel_for(0, n, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1 && !bad; ++e) {
      for (int64_t a = g.off[e]; a < g.off[e + 1]; ++a) {
        const int64_t s = sl[a];
        if (s < 0 || s >= g.S || id[s] != e || seen[s]) {
          bad = true;
          break;
        }
        seen[s] = 1;
      }
    }
  });
  TORCH_CHECK_VALUE(!bad, "sorted_slots/expert_offsets do not match topk_ids: the first "
                    "expert_offsets[n] entries of sorted_slots must be the true slots grouped by "
                    "expert, each once (use adamoe_kernels.route)");
  int64_t n_true = 0, negative = 0;
  for (int64_t s = 0; s < g.S; ++s) {
    n_true += id[s] >= 0 && id[s] < n;
    negative += id[s] < 0;
  }
  TORCH_CHECK_VALUE(negative == 0, "topk_ids must be >= 0");
  TORCH_CHECK_VALUE(n_true == g.A, "topk_ids has ", n_true, " true slots but expert_offsets[n] is ",
                    g.A);
  return g;
}

// The LoRA weights in fp32: A_f [n, r, in] (lora_A itself when it already is contiguous fp32) and
// Bt_f = lora_B^T [n, r, out].
struct LoraWeights {
  at::Tensor A, Bt;
  int64_t n, r, in, out;
  const float* a_row(int64_t e, int64_t q) const { return A.data_ptr<float>() + (e * r + q) * in; }
  const float* bt_row(int64_t e, int64_t q) const {
    return Bt.data_ptr<float>() + (e * r + q) * out;
  }
};

LoraWeights fp32_weights(const at::Tensor& lora_A, const at::Tensor& lora_B_in) {
  ADAMOE_SCOPE("lora_weights");
  LoraWeights lw;
  lw.n = lora_A.size(0);
  lw.r = lora_A.size(1);
  lw.in = lora_A.size(2);
  lw.out = lora_B_in.size(1);
  lw.A = lora_A.to(at::kFloat).contiguous();
  lw.Bt = at::empty({lw.n, lw.r, lw.out}, lora_B_in.options().dtype(at::kFloat));
  const at::Tensor lora_B = lora_B_in.contiguous();
  ADAMOE_DISPATCH_FLOAT(lora_B.scalar_type(), "lora_weights", [&] {
    const scalar_t* b = lora_B.data_ptr<scalar_t>();
    float* bt = lw.Bt.data_ptr<float>();
    for (int64_t e = 0; e < lw.n; ++e) {
      cpu_math::transpose_to_float(b + e * lw.out * lw.r, lw.r, lw.out, lw.r,
                                   bt + e * lw.r * lw.out, lw.out);
    }
  });
  return lw;
}

// One block of tokens [t0, t1) with its true slots grouped by expert (token order inside an
// expert), and the fp32 rows the block's passes work on.
struct TokenBlock {
  int64_t t0 = 0, t1 = 0;
  std::vector<int64_t> start;      // [n+1]: the slots of expert e are slot[start[e] : start[e+1]]
  std::vector<int64_t> slot;       // [block tokens * k]
  std::vector<uint8_t> any_true;   // [block tokens]
  std::vector<float> rows, acc;    // [kTokenBlock, K] token rows in fp32, [kTokenBlock, N] sums
  std::vector<const float*> xr, wr;
  std::vector<float*> yr;
  std::vector<float> dots, coef;   // [block slots, r]

  TokenBlock(const LoraRouting& g, int64_t r, int64_t K, int64_t N)
      : start(g.n + 1), slot(kTokenBlock * g.k), any_true(kTokenBlock), rows(kTokenBlock * K),
        acc(kTokenBlock * N), xr(kTokenBlock * g.k), wr(r), yr(kTokenBlock * g.k),
        dots(kTokenBlock * g.k * r), coef(kTokenBlock * g.k * r) {}

  // Groups the true slots of tokens [b0, b1) by expert (a counting sort of the block).
  void group(const LoraRouting& g, int64_t b0, int64_t b1) {
    t0 = b0;
    t1 = b1;
    std::fill(start.begin(), start.end(), 0);
    std::fill(any_true.begin(), any_true.end(), 0);
    const int32_t* id = g.id();
    for (int64_t s = t0 * g.k; s < t1 * g.k; ++s) {
      if (id[s] < g.n) ++start[id[s] + 1];
    }
    for (int64_t e = 0; e < g.n; ++e) start[e + 1] += start[e];
    std::vector<int64_t>& fill = scratch_fill;
    fill.assign(start.begin(), start.end() - 1);
    for (int64_t s = t0 * g.k; s < t1 * g.k; ++s) {
      if (id[s] < g.n) {
        slot[fill[id[s]]++] = s;
        any_true[s / g.k - t0] = 1;
      }
    }
  }

  // Converts the block's rows of src [T, K] to fp32 (only the tokens with a true slot).
  template <typename scalar_t>
  void load_rows(const scalar_t* src, int64_t K) {
    for (int64_t t = t0; t < t1; ++t) {
      if (any_true[t - t0]) cpu_math::convert(src + t * K, rows.data() + (t - t0) * K, K);
    }
  }

  // Points xr / yr at the token rows (length K) / sums (length N) of expert e's slots in the block,
  // slot[start[e]] on; returns their count.
  int64_t point_rows(int64_t e, int64_t k, int64_t K, int64_t N) {
    const int64_t a0 = start[e], R = start[e + 1] - a0;
    for (int64_t i = 0; i < R; ++i) {
      const int64_t tl = slot[a0 + i] / k - t0;
      xr[i] = rows.data() + tl * K;
      yr[i] = acc.data() + tl * N;
    }
    return R;
  }

  // Zeroes the sums of the tokens with a true slot (the others are never read).
  void zero_acc(int64_t N) {
    for (int64_t t = t0; t < t1; ++t) {
      if (any_true[t - t0]) std::fill_n(acc.data() + (t - t0) * N, N, 0.f);
    }
  }

  // Writes the block's sums acc to dst [T, N]: an exact zero row (all bits zero) for a token
  // without true slots.
  template <typename scalar_t>
  void store_acc(scalar_t* dst, int64_t N) const {
    for (int64_t t = t0; t < t1; ++t) {
      if (any_true[t - t0]) {
        cpu_math::convert(acc.data() + (t - t0) * N, dst + t * N, N);
      } else {
        std::memset(static_cast<void*>(dst + t * N), 0, N * sizeof(scalar_t));
      }
    }
  }

 private:
  std::vector<int64_t> scratch_fill;
};

// Runs f(block) for every block of kTokenBlock tokens (blocks in parallel, one TokenBlock per
// task).
template <typename F>
void for_token_blocks(const LoraRouting& g, int64_t r, int64_t K, int64_t N, F&& f) {
  const int64_t blocks = (g.T + kTokenBlock - 1) / kTokenBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t i0, int64_t i1) {
    TokenBlock blk(g, r, K, N);
    for (int64_t i = i0; i < i1; ++i) {
      blk.group(g, i * kTokenBlock, std::min(g.T, (i + 1) * kTokenBlock));
      f(blk);
    }
  });
}

// Forward: u (every slot of the block; zero rows for the null slots) and y.
template <typename scalar_t>
void forward_tokens(const LoraRouting& g, const LoraWeights& lw, double scaling,
                    const scalar_t* x, float* u, scalar_t* y) {
  const int64_t in = lw.in, out = lw.out, r = lw.r, k = g.k;
  const float s = static_cast<float>(scaling);
  for_token_blocks(g, r, in, out, [&](TokenBlock& blk) {
    std::fill(u + blk.t0 * k * r, u + blk.t1 * k * r, 0.f);
    blk.zero_acc(out);
    blk.load_rows(x, in);
    for (int64_t e = 0; e < g.n; ++e) {
      const int64_t a0 = blk.start[e], R = blk.point_rows(e, k, in, out);
      if (R == 0) continue;
      for (int64_t q = 0; q < r; ++q) blk.wr[q] = lw.a_row(e, q);
      grouped_dots(blk.xr.data(), R, blk.wr.data(), r, in, blk.dots.data());  // A_e x
      for (int64_t i = 0; i < R; ++i) {
        const int64_t slot = blk.slot[a0 + i];
        const float c = g.weight()[slot] * s;
        for (int64_t q = 0; q < r; ++q) {
          u[slot * r + q] = blk.dots[i * r + q];
          blk.coef[i * r + q] = c * blk.dots[i * r + q];
        }
      }
      for (int64_t q = 0; q < r; ++q) blk.wr[q] = lw.bt_row(e, q);
      grouped_expand(blk.coef.data(), R, blk.wr.data(), r, out, blk.yr.data());  // += B_e (w s u)
    }
    blk.store_acc(y, out);
  });
}

// Backward token pass: d topk_weights (every slot), du and v (true slots; rows by slot id, the
// null slots' rows are never read) and, when dx is given, dx.
template <typename scalar_t>
void backward_tokens(const LoraRouting& g, const LoraWeights& lw, double scaling,
                     const scalar_t* dy, const float* u, float* du, float* v, float* dw,
                     scalar_t* dx) {
  const int64_t in = lw.in, out = lw.out, r = lw.r, k = g.k;
  const float s = static_cast<float>(scaling);
  for_token_blocks(g, r, out, in, [&](TokenBlock& blk) {
    std::fill(dw + blk.t0 * k, dw + blk.t1 * k, 0.f);
    if (dx) blk.zero_acc(in);
    blk.load_rows(dy, out);
    for (int64_t e = 0; e < g.n; ++e) {
      const int64_t a0 = blk.start[e], R = blk.point_rows(e, k, out, in);
      if (R == 0) continue;
      for (int64_t q = 0; q < r; ++q) blk.wr[q] = lw.bt_row(e, q);
      grouped_dots(blk.xr.data(), R, blk.wr.data(), r, out, blk.dots.data());  // g = B_e^T dy
      for (int64_t i = 0; i < R; ++i) {
        const int64_t slot = blk.slot[a0 + i];
        const float ws = g.weight()[slot] * s;
        const float* gq = blk.dots.data() + i * r;
        const float* uq = u + slot * r;
        float gu = 0.f;
        for (int64_t q = 0; q < r; ++q) {
          gu += gq[q] * uq[q];
          du[slot * r + q] = blk.coef[i * r + q] = ws * gq[q];
          v[slot * r + q] = ws * uq[q];
        }
        dw[slot] = s * gu;
      }
      if (dx) {
        for (int64_t q = 0; q < r; ++q) blk.wr[q] = lw.a_row(e, q);
        grouped_expand(blk.coef.data(), R, blk.wr.data(), r, in, blk.yr.data());  // += A_e^T du
      }
    }
    if (dx) blk.store_acc(dx, in);
  });
}

// One weight gradient: D_e [r, N] tiles, D_e[q, c] = sum_{slots a of e} coef[a][q] L[token a, c],
// stored row-major (dA: grad[e, q, c]) or transposed (dB: grad[e, c, q]).
struct WgradJob {
  const void* L;        // [T, N] x or dy (scalar_t)
  const float* coef;    // [T*k, r] du or v, rows by slot id
  void* grad;           // [n, r, N] or [n, N, r] (scalar_t)
  int64_t N;
  bool transposed;
};

template <typename scalar_t>
void weight_grads(const LoraRouting& g, int64_t r, const std::vector<WgradJob>& jobs) {
  // The token of every row (slot / k), once: a division per row and tile would cost more than
  // its FMAs.
  std::vector<int32_t> tokens(g.A);
  for (int64_t a = 0; a < g.A; ++a) tokens[a] = static_cast<int32_t>(g.slot()[a] / g.k);
  // Tasks: (job, expert, rank block, column block), each owning one output tile.
  const int64_t rb = (r + kWgradRanks - 1) / kWgradRanks;
  std::vector<int64_t> job_start(jobs.size() + 1, 0);
  for (size_t i = 0; i < jobs.size(); ++i) {
    job_start[i + 1] = job_start[i] + g.n * rb * ((jobs[i].N + kWgradCols - 1) / kWgradCols);
  }
  at::parallel_for(0, job_start.back(), 1, [&](int64_t i0, int64_t i1) {
    float acc[kWgradRanks * kWgradCols];
    for (int64_t item = i0; item < i1; ++item) {
      size_t ji = 0;
      while (item >= job_start[ji + 1]) ++ji;
      const WgradJob& job = jobs[ji];
      const int64_t cb = (job.N + kWgradCols - 1) / kWgradCols;
      const int64_t local = item - job_start[ji];
      const int64_t e = local / (rb * cb), q0 = (local / cb) % rb * kWgradRanks;
      const int64_t c0 = local % cb * kWgradCols;
      const int64_t nr = std::min(kWgradRanks, r - q0), nc = std::min(kWgradCols, job.N - c0);
      const int64_t rows = g.off[e + 1] - g.off[e];
      wgrad_tile(static_cast<const scalar_t*>(job.L) + c0, job.N, job.coef + q0, r,
                 g.slot() + g.off[e], tokens.data() + g.off[e], rows, nr, nc, acc);
      scalar_t* grad = static_cast<scalar_t*>(job.grad) + e * r * job.N;
      for (int64_t q = 0; q < nr; ++q) {
        const float* a = acc + q * kWgradCols;
        if (job.transposed) {
          for (int64_t c = 0; c < nc; ++c) {
            grad[(c0 + c) * r + q0 + q] = cpu_math::from_float<scalar_t>(a[c]);
          }
        } else {
          cpu_math::convert(a, grad + (q0 + q) * job.N + c0, nc);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> moe_lora_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& sorted_slots,
    const at::Tensor& expert_offsets, double scaling) {
  check_lora_tensors(x_in, lora_A, lora_B, topk_ids, topk_weights, sorted_slots, expert_offsets);
  const LoraRouting g =
      read_routing(lora_A.size(0), topk_ids, topk_weights, sorted_slots, expert_offsets);
  const at::Tensor x = x_in.contiguous();
  const LoraWeights lw = fp32_weights(lora_A, lora_B);
  at::Tensor y = at::empty({g.T, lw.out}, x.options());
  at::Tensor u = at::empty({g.S, lw.r}, x.options().dtype(at::kFloat));
  ADAMOE_DISPATCH_FLOAT(x.scalar_type(), "moe_lora_forward_cpu", [&] {
    ADAMOE_SCOPE("lora_fwd_tokens");
    forward_tokens<scalar_t>(g, lw, scaling, x.data_ptr<scalar_t>(), u.data_ptr<float>(),
                             y.data_ptr<scalar_t>());
  });
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& sorted_slots, const at::Tensor& expert_offsets, const at::Tensor& u_in,
    double scaling, std::array<bool, 4> output_mask) {
  check_lora_tensors(x_in, lora_A, lora_B, topk_ids, topk_weights, sorted_slots, expert_offsets);
  const LoraRouting g =
      read_routing(lora_A.size(0), topk_ids, topk_weights, sorted_slots, expert_offsets);
  const int64_t n = lora_A.size(0), r = lora_A.size(1), in = lora_A.size(2),
                out = lora_B.size(1);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == g.T && grad_y.size(1) == out,
                    "grad_y must be [T, out] = [", g.T, ", ", out, "], got ", grad_y.sizes());
  TORCH_CHECK_VALUE(u_in.dim() == 2 && u_in.size(0) == g.S && u_in.size(1) == r &&
                        u_in.scalar_type() == at::kFloat,
                    "u must be the [T*k, r] float32 buffer moe_lora_forward_cpu returned");
  const auto [need_x, need_A, need_B, need_w] = output_mask;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous();
  const at::Tensor u = u_in.contiguous();
  auto opts = x.options();
  at::Tensor dx = need_x ? at::empty_like(x) : at::empty({0}, opts);
  at::Tensor dA = need_A ? at::empty({n, r, in}, lora_A.options()) : at::empty({0}, opts);
  at::Tensor dB = need_B ? at::empty({n, out, r}, lora_B.options()) : at::empty({0}, opts);
  at::Tensor dw = at::empty({g.S}, opts.dtype(at::kFloat));
  if (need_x || need_A || need_B || need_w) {
    const LoraWeights lw = fp32_weights(lora_A, lora_B);
    at::Tensor du = at::empty({g.S, r}, opts.dtype(at::kFloat));
    at::Tensor v = at::empty({g.S, r}, opts.dtype(at::kFloat));
    ADAMOE_DISPATCH_FLOAT(x.scalar_type(), "moe_lora_backward_cpu", [&] {
      {
        ADAMOE_SCOPE("lora_bwd_tokens");
        backward_tokens<scalar_t>(g, lw, scaling, dy.data_ptr<scalar_t>(), u.data_ptr<float>(),
                                  du.data_ptr<float>(), v.data_ptr<float>(), dw.data_ptr<float>(),
                                  need_x ? dx.data_ptr<scalar_t>() : nullptr);
      }
      std::vector<WgradJob> jobs;
      if (need_A) jobs.push_back({x.data_ptr<scalar_t>(), du.data_ptr<float>(), dA.data_ptr(), in,
                                  false});
      if (need_B) jobs.push_back({dy.data_ptr<scalar_t>(), v.data_ptr<float>(), dB.data_ptr(), out,
                                  true});
      ADAMOE_SCOPE("lora_bwd_weights");
      weight_grads<scalar_t>(g, r, jobs);
    });
  }
  at::Tensor grad_w = need_w ? dw.view(topk_weights.sizes()).to(topk_weights.scalar_type())
                             : at::empty({0}, topk_weights.options());
  return {dx, dA, dB, grad_w};
}

}  // namespace adamoe
