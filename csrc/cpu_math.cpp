// AVX-512 and portable versions of the hot fp32 loops declared in cpu_math.h.
#include "cpu_math.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ADAMOE_X86_AVX512 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own intrinsic headers trip these on masked loads / reductions (false positives).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "simd_math.h"
#define ADAMOE_AVX512 __attribute__((target("avx512f")))
// The NT and NN GEMMs are templates over fp32 and bf16 policies (NtF32/NtBf16, NnF32/NnBf16), so
// they are compiled with AVX512_BF16, BW and VL enabled. Only the bf16 policies use BF16; the fp32
// instantiations run where has_avx512() holds (which requires BW and VL too).
#define ADAMOE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
// bf16 moves without bf16 arithmetic: has_avx512() includes BW and VL.
#define ADAMOE_AVX512_BW __attribute__((target("avx512f,avx512bw,avx512vl")))
#else
#define ADAMOE_X86_AVX512 0
#endif

namespace adamoe {
namespace cpu_math {

namespace {

// Small-M NT GEMM blocking: MR rows of A x NR rows of B per micro-kernel (MR*NR = 24 zmm
// accumulators), K in chunks of KC_BYTES per row (the B chunk, 48 KiB, stays in L2 while the
// m-blocks reuse it; long chunks amortise the reduction of the accumulators: 8 KiB beat 4 KiB by
// 1.1-1.15x at 32-48 rows with K = 2816); the next B block is prefetched into L2 while the
// current one is computed.
constexpr int kGemmMR = 4;
constexpr int kGemmNR = 6;
constexpr int64_t kGemmKCBytes = 8192;

// Small-M NN GEMM blocking: MR rows of A x NRV 16-wide column vectors of B per micro-kernel
// (24 zmm accumulators kept across a K chunk of KC rows of B, then added into C). The B chunk of a
// column block (KC x 16*NRV floats, 48 KiB) is prefetched into L2 while the previous one computes:
// B is streamed once from memory, and at few rows its latency, not the FMAs, bounds the kernel.
constexpr int kNnMR = 4;
constexpr int kNnNRV = 6;
constexpr int64_t kNnKC = 128;

// Small-K TN GEMM (weight gradients: C [M, N] = A^T @ B over an expert's K rows): MR rows of C x
// NRV 16-wide vectors per micro-kernel (24 accumulators over the whole K); each task owns
// kTnRowsPerTask rows of C and sweeps them panel by panel of B columns (<= kTnPanelBytes, in L2).
constexpr int kTnMR = 4;
constexpr int kTnNRV = 6;
constexpr int64_t kTnRowsPerTask = 64;
constexpr int64_t kTnPanelBytes = 256 << 10;
// Its bf16 version (VDPBF16PS) packs per task the task's columns of A as pairs and a panel of B
// (<= kTnBf16PanelBytes) with its rows interleaved in pairs, both kept in L2: 128 rows per task and
// 128 KiB panels measured 3-5% faster than 64 rows and 256 KiB (2-core Xeon, 8-1024 rows per
// expert).
constexpr int64_t kTnBf16RowsPerTask = 128;
constexpr int64_t kTnBf16PanelBytes = 128 << 10;

// exp for the scalar path: same Cephes polynomial as the vector path.
inline float exp_scalar(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float fx = std::nearbyint(x * 1.44269504088896341f);
  float r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + (r + 1.f);
  return std::ldexp(y, static_cast<int>(fx));
}

#if ADAMOE_X86_AVX512

// Calls f(std::integral_constant<int, w>{}) for a run-time width w in [1, 6] (w >= 6 -> 6): the
// column widths of the GEMM micro-kernels are template arguments.
template <typename F>
inline void with_width(int64_t w, F&& f) {
  switch (std::min<int64_t>(w, 6)) {
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

inline __mmask16 tail_mask(int64_t left) {
  return static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1u);
}

ADAMOE_AVX512 void silu_mul_avx512(const float* g, const float* u, float* h, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(h + i, m, simd::silu_mul512(_mm512_maskz_loadu_ps(m, g + i),
                                                       _mm512_maskz_loadu_ps(m, u + i)));
  }
}

ADAMOE_AVX512 float silu_mul_backward_avx512(const float* g, const float* u, const float* G,
                                             float w, int64_t n, float* wh, float* dg,
                                             float* du) {
  const __m512 one = _mm512_set1_ps(1.f), vw = _mm512_set1_ps(w);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 up = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 gr = _mm512_maskz_loadu_ps(m, G + i);
    const __m512 e = simd::exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __m512 silu = _mm512_mul_ps(x, s);
    const __m512 h = _mm512_mul_ps(silu, up);
    const __m512 dh = _mm512_mul_ps(vw, gr);
    acc = _mm512_fmadd_ps(gr, h, acc);
    _mm512_mask_storeu_ps(wh + i, m, _mm512_mul_ps(vw, h));
    _mm512_mask_storeu_ps(du + i, m, _mm512_mul_ps(dh, silu));
    // silu'(x) = s (1 + x (1 - s)) = s + silu * e * s
    const __m512 dsilu = _mm512_fmadd_ps(_mm512_mul_ps(silu, e), s, s);
    _mm512_mask_storeu_ps(dg + i, m, _mm512_mul_ps(_mm512_mul_ps(dh, up), dsilu));
  }
  return _mm512_reduce_add_ps(acc);
}

ADAMOE_AVX512 void axpy_avx512(float* acc, float w, const float* x, int64_t n) {
  const __m512 vw = _mm512_set1_ps(w);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 a = _mm512_maskz_loadu_ps(m, acc + i);
    _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(vw, _mm512_maskz_loadu_ps(m, x + i), a));
  }
}

ADAMOE_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Element policies of the NT GEMM: how one vector step of K is loaded and multiplied into 16 fp32
// lanes. fp32: 16 elements, FMA. bf16: 32 elements, VDPBF16PS (pairs of bf16 products summed into
// each fp32 lane; needs AVX512_BF16). Both keep fp32 accumulators.
struct NtF32 {
  using T = float;
  static constexpr int64_t kStep = 16;
  ADAMOE_AVX512_BF16 static __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  ADAMOE_AVX512_BF16 static __m512 load_tail(const T* p, int64_t left) {
    return _mm512_maskz_loadu_ps(tail_mask(left), p);
  }
  ADAMOE_AVX512_BF16 static __m512 fma(__m512 a, __m512 b, __m512 acc) {
    return _mm512_fmadd_ps(a, b, acc);
  }
};

struct NtBf16 {
  using T = c10::BFloat16;
  static constexpr int64_t kStep = 32;
  ADAMOE_AVX512_BF16 static __m512i load(const T* p) { return _mm512_loadu_si512(p); }
  ADAMOE_AVX512_BF16 static __m512i load_tail(const T* p, int64_t left) {
    const __mmask32 m = left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1u;
    return _mm512_maskz_loadu_epi16(m, p);
  }
  ADAMOE_AVX512_BF16 static __m512 fma(__m512i a, __m512i b, __m512 acc) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
};

// Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for a pair of vectors (a, b).
ADAMOE_AVX512 __attribute__((always_inline)) inline __m512 pair_sums(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}

// Per 128-bit lane: [s(a), s(b), s(c), s(d)], the lane's share of each of four vectors, from
// ab = pair_sums(a, b) and cd = pair_sums(c, d).
ADAMOE_AVX512 __attribute__((always_inline)) inline __m512 quad_sums(__m512 ab, __m512 cd) {
  const __m512d x = _mm512_castps_pd(ab), y = _mm512_castps_pd(cd);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}

// Horizontal sums of up to 8 vectors at once: lane j of the result (j < NR) is the sum of the 16
// lanes of v[j]; lanes >= NR are unspecified. A shuffle tree (pairs within 128-bit lanes, then
// across lanes): 24 shuffles/adds for 8 vectors, a third of 8 separate reductions, in a fixed
// order.
template <int NR>
ADAMOE_AVX512 __attribute__((always_inline)) inline __m512 reduce_add_8(const __m512* v) {
  static_assert(NR >= 1 && NR <= 8, "reduce_add_8 takes 1..8 vectors");
  __m512 x[8];
  for (int j = 0; j < 8; ++j) x[j] = j < NR ? v[j] : _mm512_setzero_ps();
  const __m512 q0 = quad_sums(pair_sums(x[0], x[1]), pair_sums(x[2], x[3]));
  const __m512 q1 = quad_sums(pair_sums(x[4], x[5]), pair_sums(x[6], x[7]));
  // Lanes [q0.0+q0.2, q0.1+q0.3, q1.0+q1.2, q1.1+q1.3], then lane 0 + lane 1, lane 2 + lane 3.
  const __m512 h = _mm512_add_ps(_mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h, h, _MM_SHUFFLE(3, 2, 2, 0)),
                       _mm512_shuffle_f32x4(h, h, _MM_SHUFFLE(3, 2, 3, 1)));
}

// MR x NR block of C from one K chunk: 16-lane partial dot products, reduced at the end.
// Each k-step prefetches the next pf_step bytes (whole lines) from pf into L2, up to pf_end: all
// of the next block, spread over the k-steps. Every line, not one per step: with one prefetch per
// k-step (a sixth of the lines at NR = 6) the bf16 decode GEMV (M = 1, an H=1024/I=2816 expert,
// cold weights, 2 threads, AMD EPYC Zen 4) streamed 22-26 GB/s, with every line 28-33 GB/s
// (alternating runs of the two builds on a shared machine; not re-measured on Intel).
template <typename P, int MR, int NR>
ADAMOE_AVX512_BF16 __attribute__((always_inline)) inline void gemm_nt_micro(
    const typename P::T* A, int64_t lda, const typename P::T* B, int64_t ldb, float* C,
    int64_t ldc, int64_t K, bool accumulate, const char* pf, int64_t pf_step,
    const char* pf_end) {
  constexpr int64_t S = P::kStep;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    for (int64_t l = 0; l < pf_step && pf < pf_end; l += 64, pf += 64) {
      _mm_prefetch(pf, _MM_HINT_T1);
    }
    decltype(P::load(A)) a[MR];
    for (int i = 0; i < MR; ++i) a[i] = P::load(A + i * lda + k);
    for (int j = 0; j < NR; ++j) {
      const auto b = P::load(B + j * ldb + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = P::fma(a[i], b, acc[i][j]);
    }
  }
  if (k < K) {
    decltype(P::load(A)) a[MR];
    for (int i = 0; i < MR; ++i) a[i] = P::load_tail(A + i * lda + k, K - k);
    for (int j = 0; j < NR; ++j) {
      const auto b = P::load_tail(B + j * ldb + k, K - k);
      for (int i = 0; i < MR; ++i) acc[i][j] = P::fma(a[i], b, acc[i][j]);
    }
  }
  const __mmask16 row = static_cast<__mmask16>((1u << NR) - 1u);
  for (int i = 0; i < MR; ++i) {
    __m512 sums = reduce_add_8<NR>(acc[i]);
    if (accumulate) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(row, C + i * ldc));
    _mm512_mask_storeu_ps(C + i * ldc, row, sums);
  }
}

// All m-blocks of A against NR rows of B (one K chunk).
template <typename P, int NR>
ADAMOE_AVX512_BF16 void gemm_nt_column_block(const typename P::T* A, int64_t lda,
                                           const typename P::T* B, int64_t ldb, float* C,
                                           int64_t ldc, int64_t M, int64_t K, bool acc,
                                           const char* pf, int64_t pf_bytes) {
  const int64_t m_blocks = (M + kGemmMR - 1) / kGemmMR;
  const int64_t k_steps = (K + P::kStep - 1) / P::kStep;
  // Spread the prefetch of the next block over all k-steps of all m-blocks.
  const int64_t lines = (pf_bytes + 63) / 64;
  const int64_t lines_per_step = (lines + m_blocks * k_steps - 1) / (m_blocks * k_steps);
  const int64_t step = std::max<int64_t>(lines_per_step, 1) * 64;
  const char* pf_end = pf ? pf + pf_bytes : nullptr;
  for (int64_t mb = 0; mb < m_blocks; ++mb) {
    const int64_t m = mb * kGemmMR;
    const char* p = pf ? std::min(pf + mb * k_steps * step, pf_end) : nullptr;
    const auto* a = A + m * lda;
    float* c = C + m * ldc;
    switch (std::min<int64_t>(kGemmMR, M - m)) {
      case 4: gemm_nt_micro<P, 4, NR>(a, lda, B, ldb, c, ldc, K, acc, p, step, pf_end); break;
      case 3: gemm_nt_micro<P, 3, NR>(a, lda, B, ldb, c, ldc, K, acc, p, step, pf_end); break;
      case 2: gemm_nt_micro<P, 2, NR>(a, lda, B, ldb, c, ldc, K, acc, p, step, pf_end); break;
      default: gemm_nt_micro<P, 1, NR>(a, lda, B, ldb, c, ldc, K, acc, p, step, pf_end); break;
    }
  }
}

// Every GEMM of the group in one parallel region: the column blocks of all of them in order form
// one task list, split into contiguous ranges (one per thread), so a decode step's few experts cost
// one fork/join instead of one per expert, and no thread waits at an expert's end for the other.
// Each block is computed exactly as alone (same K chunks, same order): results do not depend on
// the grouping or the thread count.
template <typename P>
ADAMOE_AVX512_BF16 void gemm_nt_grouped_avx512(const NtGemm<typename P::T>* gemms,
                                             int64_t count) {
  using T = typename P::T;
  constexpr int64_t kc_max = kGemmKCBytes / sizeof(T);
  c10::SmallVector<int64_t, 17> first(count + 1, 0);  // first task of each GEMM
  for (int64_t i = 0; i < count; ++i) {
    first[i + 1] = first[i] + (gemms[i].M > 0 ? (gemms[i].N + kGemmNR - 1) / kGemmNR : 0);
  }
  at::parallel_for(0, first[count], 1, [&](int64_t b0, int64_t b1) {
    int64_t g = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[g + 1]) ++g;
      const NtGemm<T>& q = gemms[g];
      const int64_t n = (b - first[g]) * kGemmNR, nr = std::min<int64_t>(kGemmNR, q.N - n);
      // This thread's next block: the next one of this GEMM, else the first of the next GEMM
      // that has any (prefetched chunk by chunk while this block runs).
      const NtGemm<T>* next = nullptr;
      int64_t next_n = 0;
      if (b + 1 < b1) {
        int64_t h = g;
        while (b + 1 >= first[h + 1]) ++h;
        next = &gemms[h];
        next_n = (b + 1 - first[h]) * kGemmNR;
      }
      for (int64_t k0 = 0; k0 < q.K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, q.K - k0);
        const char* pf = nullptr;
        int64_t pf_bytes = 0;
        if (next != nullptr && k0 < next->K) {
          const int64_t next_rows = std::min<int64_t>(kGemmNR, next->N - next_n);
          const int64_t next_kc = std::min(kc_max, next->K - k0);
          pf = reinterpret_cast<const char*>(next->B + next_n * next->ldb + k0);
          pf_bytes = ((next_rows - 1) * next->ldb + next_kc) * static_cast<int64_t>(sizeof(T));
        }
        with_width(nr, [&](auto w) {
          gemm_nt_column_block<P, decltype(w)::value>(q.A + k0, q.lda, q.B + n * q.ldb + k0, q.ldb,
                                                      q.C + n, q.ldc, q.M, kc, k0 > 0, pf,
                                                      pf_bytes);
        });
      }
    }
  });
}

// Element policies of the NN GEMM: kStep rows of B per step. fp32: one row, A broadcast, FMA.
// bf16: two rows interleaved into bf16 pairs ([B[k][n], B[k+1][n]] per fp32 lane) against the
// broadcast pair (A[i][k], A[i][k+1]), VDPBF16PS. `rows` < kStep zero-fills the missing row (an
// odd K). Both keep fp32 accumulators.
struct NnF32 {
  using T = float;
  using V = __m512;
  static constexpr int64_t kStep = 1;
  ADAMOE_AVX512_BF16 static V load_b(const T* b, int64_t, __mmask16 m, int64_t) {
    return _mm512_maskz_loadu_ps(m, b);
  }
  ADAMOE_AVX512_BF16 static V bcast_a(const T* a, int64_t) { return _mm512_set1_ps(*a); }
  ADAMOE_AVX512_BF16 static __m512 fma(V a, V b, __m512 acc) { return _mm512_fmadd_ps(a, b, acc); }
};

struct NnBf16 {
  using T = c10::BFloat16;
  using V = __m512i;
  static constexpr int64_t kStep = 2;
  ADAMOE_AVX512_BF16 static V load_b(const T* b, int64_t ldb, __mmask16 m, int64_t rows) {
    const __m256i r0 = _mm256_maskz_loadu_epi16(m, b);
    const __m256i r1 = rows > 1 ? _mm256_maskz_loadu_epi16(m, b + ldb) : _mm256_setzero_si256();
    // [r0[0], r1[0], r0[1], r1[1], ...]: element 2i from r0[i], 2i+1 from r1[i] (index 32 + i).
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                         40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                         32, 0);
    return _mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), idx,
                                     _mm512_castsi256_si512(r1));
  }
  ADAMOE_AVX512_BF16 static V bcast_a(const T* a, int64_t rows) {
    uint32_t pair = a[0].x;
    if (rows > 1) pair |= static_cast<uint32_t>(a[1].x) << 16;
    return _mm512_set1_epi32(static_cast<int>(pair));
  }
  ADAMOE_AVX512_BF16 static __m512 fma(V a, V b, __m512 acc) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
};

// C[MR, 16*NRV] (+)= A[MR, K] @ B[K, 16*NRV] (broadcast A, FMA with B rows); the last column
// vector is masked by `last`. With `pf`, each step also prefetches into L2 the lines of its
// rows of pf (the same rows of the thread's next column block).
template <typename P, int MR, int NRV>
ADAMOE_AVX512_BF16 __attribute__((always_inline)) inline void gemm_nn_micro(
    const typename P::T* A, int64_t lda, const typename P::T* B, int64_t ldb, float* C,
    int64_t ldc, int64_t K, bool accumulate, __mmask16 last, const typename P::T* pf) {
  constexpr int64_t S = P::kStep;
  constexpr int kLines = static_cast<int>((16 * NRV * sizeof(typename P::T) + 63) / 64);
  const auto mask = [last](int j) { return j == NRV - 1 ? last : static_cast<__mmask16>(0xFFFF); };
  __m512 acc[MR][NRV];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NRV; ++j) {
      acc[i][j] = accumulate ? _mm512_maskz_loadu_ps(mask(j), C + i * ldc + 16 * j)
                             : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; k += S) {
    const int64_t rows = std::min(S, K - k);
    if (pf) {
      for (int64_t s = 0; s < rows; ++s) {
        const char* line = reinterpret_cast<const char*>(pf + (k + s) * ldb);
        for (int l = 0; l < kLines; ++l) _mm_prefetch(line + 64 * l, _MM_HINT_T1);
      }
    }
    typename P::V b[NRV];
    for (int j = 0; j < NRV; ++j) b[j] = P::load_b(B + k * ldb + 16 * j, ldb, mask(j), rows);
    for (int i = 0; i < MR; ++i) {
      const auto a = P::bcast_a(A + i * lda + k, rows);
      for (int j = 0; j < NRV; ++j) acc[i][j] = P::fma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NRV; ++j) _mm512_mask_storeu_ps(C + i * ldc + 16 * j, mask(j), acc[i][j]);
  }
}

// All m-blocks of A against 16*NRV columns of B (one K chunk). The first m-block prefetches
// the K chunk of the thread's next column block (`pf`, nullable: at most 16*NRV columns wide).
template <typename P, int NRV>
ADAMOE_AVX512_BF16 void gemm_nn_column_block(const typename P::T* A, int64_t lda,
                                           const typename P::T* B, int64_t ldb, float* C,
                                           int64_t ldc, int64_t M, int64_t K, bool acc,
                                           __mmask16 last, const typename P::T* pf) {
  for (int64_t m = 0; m < M; m += kNnMR) {
    const auto* a = A + m * lda;
    float* c = C + m * ldc;
    const auto* p = m == 0 ? pf : nullptr;
    switch (std::min<int64_t>(kNnMR, M - m)) {
      case 4: gemm_nn_micro<P, 4, NRV>(a, lda, B, ldb, c, ldc, K, acc, last, p); break;
      case 3: gemm_nn_micro<P, 3, NRV>(a, lda, B, ldb, c, ldc, K, acc, last, p); break;
      case 2: gemm_nn_micro<P, 2, NRV>(a, lda, B, ldb, c, ldc, K, acc, last, p); break;
      default: gemm_nn_micro<P, 1, NRV>(a, lda, B, ldb, c, ldc, K, acc, last, p); break;
    }
  }
}

template <typename P>
ADAMOE_AVX512_BF16 void gemm_nn_avx512(const typename P::T* A, int64_t lda, const typename P::T* B,
                                     int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N,
                                     int64_t K) {
  static_assert(kNnKC % P::kStep == 0, "a K chunk must hold whole steps");
  constexpr int64_t kCols = 16 * kNnNRV;
  const int64_t n_blocks = (N + kCols - 1) / kCols;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t k0 = 0; k0 < K; k0 += kNnKC) {
      const int64_t kc = std::min(kNnKC, K - k0);
      const bool acc = k0 > 0;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * kCols, cols = std::min(kCols, N - n);
        const int nv = static_cast<int>((cols + 15) / 16);
        const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
        const auto* a = A + k0;
        const auto* bb = B + k0 * ldb + n;
        float* c = C + n;
        // The thread's next work item: the next column block of this K chunk, else its first
        // column block of the next K chunk. B rows are read from memory once (the m-blocks reuse
        // them from L1), so fetching the next block while this one computes hides the latency.
        // (Prefetches never fault, so a full-width one past a narrower last block is harmless.)
        decltype(bb) pf = nullptr;
        if (b + 1 < b1) {
          pf = bb + kCols;
        } else if (k0 + kc < K) {
          pf = B + (k0 + kc) * ldb + b0 * kCols;
        }
        with_width(nv, [&](auto w) {
          gemm_nn_column_block<P, decltype(w)::value>(a, lda, bb, ldb, c, ldc, M, kc, acc, last,
                                                      pf);
        });
      }
    }
  });
}

// C[MR, 16*NRV] = A^T[MR, K] @ B[K, 16*NRV] for A stored [K, M] (column m of A^T is row k of A):
// per k, NRV vectors of B row k times MR broadcast entries of A row k. The whole K is summed in
// registers (K is an expert's row count), so C is written once; full aligned vectors go out with
// streaming stores (C is large and written once: no read-for-ownership, no cache pollution).
template <int MR, int NRV>
ADAMOE_AVX512 __attribute__((always_inline)) inline void gemm_tn_micro(
    const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
    __mmask16 last) {
  const auto mask = [last](int j) { return j == NRV - 1 ? last : static_cast<__mmask16>(0xFFFF); };
  __m512 acc[MR][NRV];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NRV; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NRV];
    for (int j = 0; j < NRV; ++j) b[j] = _mm512_maskz_loadu_ps(mask(j), B + k * ldb + 16 * j);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[k * lda + i]);
      for (int j = 0; j < NRV; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NRV; ++j) {
      float* c = C + i * ldc + 16 * j;
      if (mask(j) == 0xFFFF && (reinterpret_cast<uintptr_t>(c) & 63) == 0) {
        _mm512_stream_ps(c, acc[i][j]);
      } else {
        _mm512_mask_storeu_ps(c, mask(j), acc[i][j]);
      }
    }
  }
}

// Rows [m0, m1) of C against columns [n0, n0 + cols) (cols <= 16 * kTnNRV).
template <int NRV>
ADAMOE_AVX512 void gemm_tn_column_block(const float* A, int64_t lda, const float* B, int64_t ldb,
                                        float* C, int64_t ldc, int64_t m0, int64_t m1, int64_t K,
                                        __mmask16 last) {
  for (int64_t m = m0; m < m1; m += kTnMR) {
    const float* a = A + m;
    float* c = C + m * ldc;
    switch (std::min<int64_t>(kTnMR, m1 - m)) {
      case 4: gemm_tn_micro<4, NRV>(a, lda, B, ldb, c, ldc, K, last); break;
      case 3: gemm_tn_micro<3, NRV>(a, lda, B, ldb, c, ldc, K, last); break;
      case 2: gemm_tn_micro<2, NRV>(a, lda, B, ldb, c, ldc, K, last); break;
      default: gemm_tn_micro<1, NRV>(a, lda, B, ldb, c, ldc, K, last); break;
    }
  }
}

ADAMOE_AVX512 void gemm_tn_avx512(const float* A, int64_t lda, const float* B, int64_t ldb,
                                  float* C, int64_t ldc, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kCols = 16 * kTnNRV;
  // Columns per pass: the B panel [K, cols] a thread sweeps its rows of C with stays in L2.
  const int64_t panel_cols = std::max<int64_t>(
      kCols, (kTnPanelBytes / (std::max<int64_t>(K, 1) * 4)) / kCols * kCols);
  const int64_t m_blocks = (M + kTnRowsPerTask - 1) / kTnRowsPerTask;
  at::parallel_for(0, m_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t m0 = b0 * kTnRowsPerTask, m1 = std::min(M, b1 * kTnRowsPerTask);
    for (int64_t p0 = 0; p0 < N; p0 += panel_cols) {
      const int64_t p1 = std::min(N, p0 + panel_cols);
      for (int64_t mm = m0; mm < m1; mm += kTnRowsPerTask) {
        const int64_t mm1 = std::min(m1, mm + kTnRowsPerTask);
        for (int64_t n = p0; n < p1; n += kCols) {
          const int64_t cols = std::min(kCols, p1 - n);
          const int nv = static_cast<int>((cols + 15) / 16);
          const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
          const float* bb = B + n;
          float* c = C + n;
          with_width(nv, [&](auto w) {
            gemm_tn_column_block<decltype(w)::value>(A, lda, bb, ldb, c, ldc, mm, mm1, K, last);
          });
        }
      }
    }
    // Streaming stores are weakly ordered: each thread fences its own before the parallel
    // region's join publishes C to the caller.
    _mm_sfence();
  });
}

// C[MR, 16*NRV] = A^T @ B in bf16 from the packed operands of gemm_tn_bf16_avx512: per pair p of
// K, NRV vectors of interleaved B pairs (pb + p * ldb) times MR broadcast A pairs (pa + p * lda),
// VDPBF16PS into fp32 lanes over the whole K, then rounded to bf16 (nearest even) and written once,
// two vectors per 64-byte line; with `stream`, full aligned lines go out with streaming stores.
template <int MR, int NRV>
ADAMOE_AVX512_BF16 __attribute__((always_inline)) inline void gemm_tn_bf16_micro(
    const uint32_t* pa, int64_t lda, const c10::BFloat16* pb, int64_t ldb, c10::BFloat16* C,
    int64_t ldc, int64_t K2, __mmask16 last, bool stream) {
  __m512 acc[MR][NRV];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NRV; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < K2; ++p) {
    __m512bh b[NRV];
    for (int j = 0; j < NRV; ++j) {
      b[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pb + p * ldb + 32 * j));
    }
    for (int i = 0; i < MR; ++i) {
      const __m512bh a =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pa[p * lda + i])));
      for (int j = 0; j < NRV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
  const auto mask = [last](int j) -> __mmask32 {
    return j >= NRV ? 0u : j == NRV - 1 ? last : 0xFFFFu;
  };
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NRV; j += 2) {
      const __m512 hi = j + 1 < NRV ? acc[i][j + 1] : _mm512_setzero_ps();
      const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, acc[i][j]));
      const __mmask32 m = mask(j) | mask(j + 1) << 16;
      c10::BFloat16* c = C + i * ldc + 16 * j;
      if (stream && m == ~__mmask32{0} && (reinterpret_cast<uintptr_t>(c) & 63) == 0) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(c), v);
      } else {
        _mm512_mask_storeu_epi16(c, m, v);
      }
    }
  }
}

// Rows [0, rows) of C against 16*NRV columns (pa, pb, C at the block's first row and column).
template <int NRV>
ADAMOE_AVX512_BF16 void gemm_tn_bf16_column_block(const uint32_t* pa, int64_t lda,
                                                  const c10::BFloat16* pb, int64_t ldb,
                                                  c10::BFloat16* C, int64_t ldc, int64_t rows,
                                                  int64_t K2, __mmask16 last, bool stream) {
  for (int64_t m = 0; m < rows; m += kTnMR) {
    const uint32_t* a = pa + m;
    c10::BFloat16* c = C + m * ldc;
    switch (std::min<int64_t>(kTnMR, rows - m)) {
      case 4: gemm_tn_bf16_micro<4, NRV>(a, lda, pb, ldb, c, ldc, K2, last, stream); break;
      case 3: gemm_tn_bf16_micro<3, NRV>(a, lda, pb, ldb, c, ldc, K2, last, stream); break;
      case 2: gemm_tn_bf16_micro<2, NRV>(a, lda, pb, ldb, c, ldc, K2, last, stream); break;
      default: gemm_tn_bf16_micro<1, NRV>(a, lda, pb, ldb, c, ldc, K2, last, stream); break;
    }
  }
}

// dst[p * ldd + 2j + q] = src[(2p + q) * lds + j] for p < ceil(K / 2), q < 2, j < cols: the rows of
// src [K, cols] interleaved in pairs (NnBf16::load_b), zero for row K of an odd K and for the
// columns up to the next multiple of 16.
ADAMOE_AVX512_BF16 void pack_row_pairs(const c10::BFloat16* src, int64_t lds, int64_t K,
                                       int64_t cols, c10::BFloat16* dst, int64_t ldd) {
  for (int64_t k = 0; k < K; k += 2) {
    const int64_t rows = std::min<int64_t>(2, K - k);
    for (int64_t j = 0; j < cols; j += 16) {
      _mm512_storeu_si512(dst + (k / 2) * ldd + 2 * j,
                          NnBf16::load_b(src + k * lds + j, lds, tail_mask(cols - j), rows));
    }
  }
}

// C [M, N] = A^T @ B in bf16 for A [K, M], B [K, N]. VDPBF16PS multiplies pairs: lane j of C row m
// gets A[k][m] B[k][n+j] + A[k+1][m] B[k+1][n+j] from the broadcast pair (A[k][m], A[k+1][m]) and
// B rows k, k+1 interleaved. Each task owns a block of rows of C: it interleaves the block's
// columns of A into 32-bit pairs once, then, panel by panel of B columns, the panel's row pairs
// (both stay in L2 while every micro-kernel of the block reads them: one interleave per element of
// B and task instead of one per micro-kernel: 1.2-1.5x faster where the GEMM is compute-bound).
ADAMOE_AVX512_BF16 void gemm_tn_bf16_avx512(const c10::BFloat16* A, int64_t lda,
                                            const c10::BFloat16* B, int64_t ldb, c10::BFloat16* C,
                                            int64_t ldc, int64_t M, int64_t N, int64_t K,
                                            bool stream) {
  using bf16 = c10::BFloat16;
  constexpr int64_t kCols = 16 * kTnNRV;
  const int64_t K2 = (K + 1) / 2;
  // Rows per task: kTnBf16RowsPerTask, fewer where that would leave threads without a task (each
  // element's sum is the same for any split, so results stay independent of the thread count).
  const int64_t per_thread = (M + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t rows_per_task =
      std::clamp<int64_t>((per_thread + 15) / 16 * 16, 16, kTnBf16RowsPerTask);
  const int64_t panel_cols = std::max<int64_t>(
      kCols, kTnBf16PanelBytes / (std::max<int64_t>(K2, 1) * 4) / kCols * kCols);
  const int64_t tasks = (M + rows_per_task - 1) / rows_per_task;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    // Per-thread packing buffers, kept between calls (grown, never shrunk: a few hundred KiB).
    thread_local std::vector<uint32_t> pa;
    thread_local std::vector<bf16> pb;
    const int64_t lda_p = rows_per_task, pcols = (std::min(panel_cols, N) + 15) / 16 * 16;
    pa.resize(std::max<size_t>(pa.size(), K2 * lda_p));
    pb.resize(std::max<size_t>(pb.size(), K2 * 2 * pcols));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * rows_per_task, rows = std::min(M, m0 + rows_per_task) - m0;
      pack_row_pairs(A + m0, lda, K, rows, reinterpret_cast<bf16*>(pa.data()), 2 * lda_p);
      for (int64_t p0 = 0; p0 < N; p0 += panel_cols) {
        const int64_t p1 = std::min(N, p0 + panel_cols);
        const int64_t ldp = 2 * ((p1 - p0 + 15) / 16 * 16);
        pack_row_pairs(B + p0, ldb, K, p1 - p0, pb.data(), ldp);
        for (int64_t n = p0; n < p1; n += kCols) {
          const int64_t cols = std::min(kCols, p1 - n);
          const int nv = static_cast<int>((cols + 15) / 16);
          const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
          with_width(nv, [&](auto w) {
            gemm_tn_bf16_column_block<decltype(w)::value>(
                pa.data(), lda_p, pb.data() + 2 * (n - p0), ldp, C + m0 * ldc + n, ldc, rows, K2,
                last, stream);
          });
        }
      }
    }
    _mm_sfence();
  });
}

// The bits of bf16 rows <-> fp32 (bf16 -> fp32 exact; fp32 -> bf16 rounds to nearest even).
ADAMOE_AVX512_BW void bf16_to_float_avx512(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, simd::from_bf16(_mm256_maskz_loadu_epi16(m, src + i)));
  }
}

ADAMOE_AVX512_BF16 void float_to_bf16_avx512(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm256_mask_storeu_epi16(dst + i, m, simd::to_bf16(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

// Blocks of 16 rows x 16 values, loaded as 16 floats, transposed in registers and stored as 16 fp32
// rows (masked at the edges).
template <typename T>
ADAMOE_AVX512_BW inline __m512 load_as_float(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    return simd::from_bf16(_mm256_maskz_loadu_epi16(m, p));
  }
}

template <typename T>
ADAMOE_AVX512_BW void transpose_to_float_avx512(const T* src, int64_t lds, int64_t rows,
                                                int64_t cols, float* dst, int64_t ldd) {
  for (int64_t c0 = 0; c0 < rows; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, rows - c0);
    for (int64_t i0 = 0; i0 < cols; i0 += 16) {
      const int64_t ni = std::min<int64_t>(16, cols - i0);
      __m512 v[16];
      for (int64_t c = 0; c < 16; ++c) {
        v[c] = c < nc ? load_as_float(src + (c0 + c) * lds + i0, tail_mask(ni)) : _mm512_setzero_ps();
      }
      simd::transpose16x16(v);
      for (int64_t i = 0; i < ni; ++i) {
        _mm512_mask_storeu_ps(dst + (i0 + i) * ldd + c0, tail_mask(nc), v[i]);
      }
    }
  }
}

#endif  // ADAMOE_X86_AVX512

}  // namespace

bool has_avx512() {
#if ADAMOE_X86_AVX512
  // ADAMOE_CPU_PORTABLE=1 forces the portable loops (tests; CPUs that downclock on AVX-512).
  static const bool ok = __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") &&
                         std::getenv("ADAMOE_CPU_PORTABLE") == nullptr;
  return ok;
#else
  return false;
#endif
}

bool has_avx512_bf16() {
#if ADAMOE_X86_AVX512
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool is_intel() {
#if ADAMOE_X86_AVX512
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

void silu_mul(const float* g, const float* u, float* h, int64_t n) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) return silu_mul_avx512(g, u, h, n);
#endif
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * u[i] / (1.f + exp_scalar(-g[i]));
}

float silu_mul_backward(const float* g, const float* u, const float* G, float w, int64_t n,
                        float* wh, float* dg, float* du) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) return silu_mul_backward_avx512(g, u, G, w, n, wh, dg, du);
#endif
  float lanes[16] = {0.f};
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i], e = exp_scalar(-x), s = 1.f / (1.f + e), silu = x * s;
    const float h = silu * u[i], dh = w * G[i];
    lanes[i % 16] += G[i] * h;
    wh[i] = w * h;
    du[i] = dh * silu;
    dg[i] = dh * u[i] * (silu * e * s + s);
  }
  float sum = 0.f;
  for (float l : lanes) sum += l;
  return sum;
}

void axpy(float* acc, float w, const float* x, int64_t n) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) return axpy_avx512(acc, w, x, n);
#endif
  for (int64_t i = 0; i < n; ++i) acc[i] += w * x[i];
}

float dot(const float* a, const float* b, int64_t n) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) return dot_avx512(a, b, n);
#endif
  float lanes[16] = {0.f};
  for (int64_t i = 0; i < n; ++i) lanes[i % 16] += a[i] * b[i];
  float sum = 0.f;
  for (float l : lanes) sum += l;
  return sum;
}

void gemm_nn_small_m(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                     int64_t ldc, int64_t M, int64_t N, int64_t K) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) return gemm_nn_avx512<NnF32>(A, lda, B, ldb, C, ldc, M, N, K);
#endif
  TORCH_CHECK(false, "gemm_nn_small_m needs AVX-512 (check has_avx512() first)");
}

void gemm_nn_small_m(const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
                     float* C, int64_t ldc, int64_t M, int64_t N, int64_t K) {
#if ADAMOE_X86_AVX512
  if (has_avx512_bf16()) return gemm_nn_avx512<NnBf16>(A, lda, B, ldb, C, ldc, M, N, K);
#endif
  TORCH_CHECK(false, "the bf16 gemm_nn_small_m needs AVX512_BF16 (check has_avx512_bf16() first)");
}

void gemm_tn_small_k(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                     int64_t ldc, int64_t M, int64_t N, int64_t K) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) return gemm_tn_avx512(A, lda, B, ldb, C, ldc, M, N, K);
#endif
  TORCH_CHECK(false, "gemm_tn_small_k needs AVX-512 (check has_avx512() first)");
}

void gemm_tn_small_k(const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
                     c10::BFloat16* C, int64_t ldc, int64_t M, int64_t N, int64_t K, bool stream) {
#if ADAMOE_X86_AVX512
  if (has_avx512_bf16()) return gemm_tn_bf16_avx512(A, lda, B, ldb, C, ldc, M, N, K, stream);
#endif
  TORCH_CHECK(false, "the bf16 gemm_tn_small_k needs AVX512_BF16 (check has_avx512_bf16() first)");
}

void gemm_nt_small_m(const NtGemm<float>* gemms, int64_t count) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) return gemm_nt_grouped_avx512<NtF32>(gemms, count);
#endif
  TORCH_CHECK(false, "gemm_nt_small_m needs AVX-512 (check has_avx512() first)");
}

void gemm_nt_small_m(const NtGemm<c10::BFloat16>* gemms, int64_t count) {
#if ADAMOE_X86_AVX512
  if (has_avx512_bf16()) return gemm_nt_grouped_avx512<NtBf16>(gemms, count);
#endif
  TORCH_CHECK(false, "the bf16 gemm_nt_small_m needs AVX512_BF16 (check has_avx512_bf16() first)");
}

void convert(const c10::BFloat16* src, float* dst, int64_t n) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) return bf16_to_float_avx512(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

void convert(const float* src, c10::BFloat16* dst, int64_t n) {
#if ADAMOE_X86_AVX512
  if (has_avx512_bf16()) return float_to_bf16_avx512(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<c10::BFloat16>(src[i]);
}

void transpose_to_float(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                        int64_t ldd) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) {
    return transpose_to_float_avx512(src, lds, rows, cols, dst, ldd);
  }
#endif
  transpose_to_float<float>(src, lds, rows, cols, dst, ldd);
}

void transpose_to_float(const c10::BFloat16* src, int64_t lds, int64_t rows, int64_t cols,
                        float* dst, int64_t ldd) {
#if ADAMOE_X86_AVX512
  if (has_avx512()) {
    return transpose_to_float_avx512(src, lds, rows, cols, dst, ldd);
  }
#endif
  transpose_to_float<c10::BFloat16>(src, lds, rows, cols, dst, ldd);
}

}  // namespace cpu_math
}  // namespace adamoe
