// CPU building blocks shared by the C++ kernels: dtype conversion helpers and the hot fp32 loops
// (fused SiLU-gate elementwise passes, small-M / small-K GEMMs; NT and NN also in bf16). Each
// hot loop has an AVX-512 version (picked at run time when the CPU has AVX-512 F, BW and VL) and a
// portable scalar version, so the extension needs no -march flag and runs on any CPU. Both
// versions are deterministic: fixed summation order, independent of the thread count.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace adamoe {
namespace cpu_math {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }
template <>
inline float from_float<float>(float x) { return x; }

template <typename T>
inline void convert(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
template <typename T>
inline void convert(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}
inline void convert(const float* src, float* dst, int64_t n) {
  if (src != dst && n > 0) std::memcpy(dst, src, n * sizeof(float));
}
// bf16 <-> fp32 rows: AVX-512 versions where the CPU has them (fp32 -> bf16 needs AVX512_BF16),
// the same values as the scalar conversions above (round to nearest even).
void convert(const c10::BFloat16* src, float* dst, int64_t n);
void convert(const float* src, c10::BFloat16* dst, int64_t n);

// dst[i * ldd + c] = float(src[c * lds + i]) for c < rows, i < cols: a block of `rows` rows of
// `cols` values each (row stride lds) transposed into fp32 rows (row stride ldd).
template <typename T>
inline void transpose_to_float(const T* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                               int64_t ldd) {
  for (int64_t c = 0; c < rows; ++c) {
    for (int64_t i = 0; i < cols; ++i) dst[i * ldd + c] = to_float(src[c * lds + i]);
  }
}
void transpose_to_float(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                        int64_t ldd);
void transpose_to_float(const c10::BFloat16* src, int64_t lds, int64_t rows, int64_t cols,
                        float* dst, int64_t ldd);

// True when the AVX-512 versions run on this CPU (and ADAMOE_CPU_PORTABLE is not set).
bool has_avx512();

// True when the CPU also has AVX512_BF16 (VDPBF16PS: the bf16 small-M forward GEMM).
bool has_avx512_bf16();

// True on an Intel CPU (whose MKL sgemm has AVX-512 paths); picks the GEMM crossover points.
bool is_intel();

// h[i] = silu(g[i]) * u[i]
void silu_mul(const float* g, const float* u, float* h, int64_t n);

// Backward of h = silu(g) * u for one row, given G = d(sum_j w_j h_j)/dh / w (the unweighted
// gradient) and the routing weight w:
//   wh = w * h,  du = w * G * silu(g),  dg = w * G * u * silu'(g).
// Returns sum_i G[i] * h[i] (16-lane partial sums, fixed order).
float silu_mul_backward(const float* g, const float* u, const float* G, float w, int64_t n,
                        float* wh, float* dg, float* du);

// acc[i] += w * x[i]
void axpy(float* acc, float w, const float* x, int64_t n);

// sum_i a[i] * b[i] (16-lane partial sums, fixed order)
float dot(const float* a, const float* b, int64_t n);

// One GEMM C[m, n] = sum_k A[m, k] * B[n, k] of gemm_nt_small_m: row-major A [M, K] (row stride
// lda), B [N, K] (ldb), fp32 C [M, N] (ldc).
template <typename T>
struct NtGemm {
  const T* A;
  int64_t lda;
  const T* B;
  int64_t ldb;
  float* C;
  int64_t ldc;
  int64_t M, N, K;
};

// The GEMMs gemms[0..count) (fp32), all in one parallel region. Made for small M (the rows of an
// expert) against a large weight B, which is streamed once without packing. Multithreaded over
// the column blocks of all the GEMMs (at::parallel_for); each C element is summed in the same
// order for any thread count and any grouping. Needs has_avx512().
void gemm_nt_small_m(const NtGemm<float>* gemms, int64_t count);
// The same for bf16 A and B with fp32 C: products of bf16 pairs accumulated in fp32 lanes
// (VDPBF16PS). Needs has_avx512_bf16().
void gemm_nt_small_m(const NtGemm<c10::BFloat16>* gemms, int64_t count);

// C[m, n] = sum_k A[m, k] * B[k, n] for row-major fp32 A [M, K], B [K, N], C [M, N]; small M
// against a large B read row by row (no packing). Multithreaded over column blocks of C; the
// K order is fixed, so results do not depend on the thread count. Needs has_avx512().
void gemm_nn_small_m(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                     int64_t ldc, int64_t M, int64_t N, int64_t K);
// The same for bf16 A and B with fp32 C: pairs of B rows interleaved on the fly against pairs of
// A, VDPBF16PS into fp32 lanes. Needs has_avx512_bf16().
void gemm_nn_small_m(const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
                     float* C, int64_t ldc, int64_t M, int64_t N, int64_t K);

// C[m, n] = sum_k A[k, m] * B[k, n] for row-major fp32 A [K, M], B [K, N], C [M, N] (C is
// overwritten). Made for the weight gradients, whose depth K is one expert's row count: small K,
// large M x N output written once (streaming stores). Multithreaded over row blocks of C; each
// element is summed over k in order, so results do not depend on the thread count. Needs
// has_avx512().
void gemm_tn_small_k(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                     int64_t ldc, int64_t M, int64_t N, int64_t K);
// The same for bf16 A, B and C: pairs of A and B rows (k, k+1) multiplied by VDPBF16PS into fp32
// lanes (an odd K ends with a half pair), each element rounded once to bf16 (nearest even, as
// c10::BFloat16 and at::mm round). `stream`: full aligned lines of C go out with streaming stores
// (the faster ones where C's pages are resident; where the first store faults a page in, the
// kernel zeroes it through the cache and plain stores are faster). Needs has_avx512_bf16().
void gemm_tn_small_k(const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B, int64_t ldb,
                     c10::BFloat16* C, int64_t ldc, int64_t M, int64_t N, int64_t K, bool stream);

}  // namespace cpu_math
}  // namespace adamoe
