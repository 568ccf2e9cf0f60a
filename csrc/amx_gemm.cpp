// Intel AMX bf16 GEMMs declared in amx_gemm.h.
//
// Tile registers (all configured 16 rows x 64 bytes): C accumulators tmm0-3, A tiles tmm4-5, B tiles
// tmm6-7 (gemm_nn uses tmm4 for A and tmm5-7 for B). TDPBF16PS sums the products of a tile row of
// A and a tile column of B into fp32, always in the same order, and each output element is owned by
// one task, so results are independent of the thread count. Every parallel task loads the tile
// configuration itself (it is per-thread state) and releases the tiles when done.
#include "amx_gemm.h"

#include "cpu_math.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// GCC 11+ on x86-64 (its intrinsic headers declare the AMX builtins for any target).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define ADAMOE_AMX 1
// GCC 12's own intrinsic headers trip these on masked loads (false positives).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "simd_math.h"
#else
#define ADAMOE_AMX 0
#endif

namespace adamoe {
namespace amx {

namespace {

constexpr int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Linux hands out the AMX tile state (8 KiB of XSAVE area per thread) only on request.
bool request_tile_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace

bool available() {
#if ADAMOE_AMX
  static const bool ok = std::getenv("ADAMOE_CPU_NO_AMX") == nullptr &&
                         cpu_math::has_avx512_bf16() && __builtin_cpu_supports("amx-tile") &&
                         __builtin_cpu_supports("amx-bf16") && request_tile_permission();
  return ok;
#else
  return false;
#endif
}

int64_t padded_rows(int64_t m) { return m <= 16 ? 16 : round_up(m, 32); }

void pack_rows(const bf16* a, int64_t lda, int64_t m, int64_t k, bf16* ap) {
  const int64_t mp = padded_rows(m), kp = round_up(k, 32);
  for (int64_t i = 0; i < mp; ++i) {
    bf16* row = ap + i * kp;
    const int64_t len = i < m ? k : 0;
    if (len) std::memcpy(row, a + i * lda, len * sizeof(bf16));
    std::memset(static_cast<void*>(row + len), 0, (kp - len) * sizeof(bf16));
  }
}

#if ADAMOE_AMX

// Everything below runs only where available() holds.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")

namespace {

// The palette-1 tile configuration: eight tiles of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration on this thread for the lifetime of the object; releases the tiles after.
struct TileScope {
  TileScope() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

__mmask32 mask32(int64_t left) {
  return left >= 32 ? ~__mmask32{0} : (__mmask32{1} << std::max<int64_t>(left, 0)) - 1u;
}

// Interleaves two rows of 32 bf16 into VNNI pairs: lo gets columns 0-15, hi columns 16-31.
inline void interleave_pairs(__m512i r0, __m512i r1, __m512i* lo, __m512i* hi) {
  const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                          40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                          32, 0);
  const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  *lo = _mm512_permutex2var_epi16(r0, idx_lo, r1);
  *hi = _mm512_permutex2var_epi16(r0, idx_hi, r1);
}

// Rows [k0, k0 + kc) (kc <= KC, zero beyond k) x columns [0, cols) (zero from n on; cols % 64 == 0)
// of b -> bv[s][t][16][32] for k-step s and 16-column tile t: the B tiles of one strip.
void pack_strip(const bf16* b, int64_t ldb, int64_t k0, int64_t kc, int64_t k, int64_t n,
                int64_t cols, bf16* bv) {
  const int64_t tiles = cols / 16;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t p = 0; p < round_up(kc, 32) / 2; ++p) {
    const int64_t r0 = k0 + 2 * p, r1 = r0 + 1;
    bf16* dst = bv + (p / 16) * tiles * 512 + (p % 16) * 32;
    for (int64_t c = 0; c < cols; c += 32) {
      const __mmask32 m = mask32(n - c);
      const __m512i a = r0 < k ? _mm512_maskz_loadu_epi16(m, b + r0 * ldb + c) : zero;
      const __m512i e = r1 < k ? _mm512_maskz_loadu_epi16(m, b + r1 * ldb + c) : zero;
      __m512i lo, hi;
      interleave_pairs(a, e, &lo, &hi);
      _mm512_store_si512(dst + (c / 16) * 512, lo);
      _mm512_store_si512(dst + (c / 16 + 1) * 512, hi);
    }
  }
}

// NB x MB tiles of C^T (rows n0.. of w against m-tiles of xv) over the whole depth k. (GCC's tile
// intrinsics take the tile number as a literal, so the blocks are spelled out.)
template <int NB, int MB>
void wxt_block(const bf16* w, int64_t ldw, int64_t k, const bf16* xv, int64_t mp, float* ct,
               int64_t ldc) {
  static_assert((MB == 1 && (NB == 2 || NB == 4)) || (MB == 2 && NB == 2),
                "four C tiles, two A tiles, two B tiles");
  constexpr int kC = NB * MB;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kC > 2) _tile_zero(2);
  if constexpr (kC > 2) _tile_zero(3);
  const int64_t xv_row_bytes = mp * 2 * static_cast<int64_t>(sizeof(bf16));
  const int64_t w_bytes = ldw * static_cast<int64_t>(sizeof(bf16));
  for (int64_t k0 = 0; k0 < k; k0 += 32) {
    const bf16* xrow = xv + (k0 / 2) * mp * 2;
    const bf16* wk = w + k0;
    _tile_loadd(6, xrow, xv_row_bytes);
    if constexpr (MB == 2) _tile_loadd(7, xrow + 32, xv_row_bytes);
    _tile_loadd(4, wk, w_bytes);
    _tile_loadd(5, wk + 16 * ldw, w_bytes);
    if constexpr (MB == 1) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    if constexpr (NB == 4) {
      _tile_loadd(4, wk + 32 * ldw, w_bytes);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(5, wk + 48 * ldw, w_bytes);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  const int64_t c_bytes = ldc * static_cast<int64_t>(sizeof(float));
  if constexpr (MB == 1) {
    _tile_stored(0, ct, c_bytes);
    _tile_stored(1, ct + 16 * ldc, c_bytes);
    if constexpr (NB == 4) {
      _tile_stored(2, ct + 32 * ldc, c_bytes);
      _tile_stored(3, ct + 48 * ldc, c_bytes);
    }
  } else {
    _tile_stored(0, ct, c_bytes);
    _tile_stored(1, ct + 16, c_bytes);
    _tile_stored(2, ct + 16 * ldc, c_bytes);
    _tile_stored(3, ct + 16 * ldc + 16, c_bytes);
  }
}

// Four 16-column tiles of C (columns c0..c0+64) for one m-tile, accumulated over the k-steps of a
// packed strip; `first` starts from zero, else from the C values already there.
void nn_group(const bf16* ap, int64_t kp, int64_t k0, int64_t steps, const bf16* bv,
              int64_t tiles, float* c, int64_t ldc, bool first) {
  const int64_t c_bytes = ldc * static_cast<int64_t>(sizeof(float));
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, c_bytes);
    _tile_loadd(1, c + 16, c_bytes);
    _tile_loadd(2, c + 32, c_bytes);
    _tile_loadd(3, c + 48, c_bytes);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, ap + k0 + 32 * s, kp * 2);
    const bf16* b = bv + s * tiles * 512;
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + 512, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, b + 1024, 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, b + 1536, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, c, c_bytes);
  _tile_stored(1, c + 16, c_bytes);
  _tile_stored(2, c + 32, c_bytes);
  _tile_stored(3, c + 48, c_bytes);
}

// In-register transpose of a 16 x 16 fp32 block: r[j] becomes column j of the input rows.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // per lane: one column of four rows
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 2; ++i) {  // 4 x 4 transpose of the 128-bit lanes, in two shuffles
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// 16 floats -> bf16, rounded to nearest even (as c10::BFloat16 rounds).
inline __m256i to_bf16(__m512 x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)); }
inline __m512 from_bf16(__m256i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// A per-thread 64-byte aligned scratch that only grows (the strips of gemm_nn).
bf16* thread_scratch(int64_t elems) {
  struct Free {
    void operator()(bf16* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<bf16, Free> buf;
  thread_local int64_t cap = 0;
  if (cap < elems) {
    const size_t bytes = static_cast<size_t>(round_up(elems * 2, 64));
    buf.reset(static_cast<bf16*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(buf, "adamoe amx: out of memory for a ", bytes, "-byte scratch");
    cap = elems;
  }
  return buf.get();
}

// gemm_nn blocking: columns per task (8 groups of 4 tiles) and B rows per packed strip (a strip
// is kNnStripRows x kNnTaskCols bf16 = 256 KiB, resident in L2 while every m-tile uses it).
constexpr int64_t kNnTaskCols = 512;
constexpr int64_t kNnStripRows = 256;

}  // namespace

void pack_pairs_vnni(const bf16* b, int64_t ldb, int64_t k, int64_t n, int64_t np, bf16* bv) {
  const int64_t kp = round_up(k, 32);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t p = 0; p < kp / 2; ++p) {
    const int64_t r0 = 2 * p, r1 = r0 + 1;
    bf16* dst = bv + p * np * 2;
    for (int64_t c = 0; c < np; c += 32) {
      const __mmask32 m = mask32(n - c);
      const __m512i a = r0 < k ? _mm512_maskz_loadu_epi16(m, b + r0 * ldb + c) : zero;
      const __m512i e = r1 < k ? _mm512_maskz_loadu_epi16(m, b + r1 * ldb + c) : zero;
      __m512i lo, hi;
      interleave_pairs(a, e, &lo, &hi);
      const int64_t left = 2 * (np - c);  // bf16 left in this row of bv
      _mm512_mask_storeu_epi16(dst + 2 * c, mask32(left), lo);
      if (left > 32) _mm512_mask_storeu_epi16(dst + 2 * c + 32, mask32(left - 32), hi);
    }
  }
}

void pack_rows_vnni(const bf16* x, int64_t ldx, int64_t m, int64_t k, int64_t mp, bf16* xv) {
  // A 16 x 32 block of x is a 16 x 16 block of bf16 pairs: its transpose is 16 rows of xv.
  const int64_t kp = round_up(k, 32);
  for (int64_t i0 = 0; i0 < mp; i0 += 16) {
    for (int64_t k0 = 0; k0 < kp; k0 += 32) {
      const __mmask32 km = mask32(k - k0);
      __m512 v[16];
      for (int64_t i = 0; i < 16; ++i) {
        v[i] = i0 + i < m ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(km, x + (i0 + i) * ldx + k0))
                          : _mm512_setzero_ps();
      }
      transpose16x16(v);
      for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(xv + ((k0 / 2 + c) * mp + i0) * 2, v[c]);
    }
  }
}

void pack_transposed(const bf16* a, int64_t lda, int64_t k, int64_t m, bf16* at) {
  // Rows 2p, 2p+1 of a 32 x 32 block, interleaved, are pairs (a[2p][i], a[2p+1][i]); the 16 x 16
  // transpose of those pairs is 16 rows of at, 32 entries each.
  const int64_t mp = round_up(m, 16), kp = round_up(k, 32);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t i0 = 0; i0 < mp; i0 += 32) {
    const __mmask32 im = mask32(m - i0);
    for (int64_t j0 = 0; j0 < kp; j0 += 32) {
      __m512 lo[16], hi[16];
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t r0 = j0 + 2 * p, r1 = r0 + 1;
        const __m512i x0 = r0 < k ? _mm512_maskz_loadu_epi16(im, a + r0 * lda + i0) : zero;
        const __m512i x1 = r1 < k ? _mm512_maskz_loadu_epi16(im, a + r1 * lda + i0) : zero;
        __m512i l, h;
        interleave_pairs(x0, x1, &l, &h);
        lo[p] = _mm512_castsi512_ps(l);
        hi[p] = _mm512_castsi512_ps(h);
      }
      transpose16x16(lo);
      for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(at + (i0 + c) * kp + j0, lo[c]);
      if (i0 + 16 < mp) {
        transpose16x16(hi);
        for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(at + (i0 + 16 + c) * kp + j0, hi[c]);
      }
    }
  }
}

void swiglu_to_vnni(const float* ct, int64_t mp, int64_t I, int64_t r, bf16* gu_blk, bf16* hv) {
  TORCH_CHECK(I % 2 == 0 && mp % 16 == 0, "amx::swiglu_to_vnni: bad shape I=", I, " mp=", mp);
  at::parallel_for(0, I / 2, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t m = 0; m < mp; m += 16) {
        const __mmask16 keep = static_cast<__mmask16>(
            r - m >= 16 ? 0xFFFF : (r > m ? (1u << (r - m)) - 1u : 0u));
        __m256i h[2];
        for (int64_t half = 0; half < 2; ++half) {
          const int64_t i = 2 * p + half;
          const __m256i g = to_bf16(_mm512_loadu_ps(ct + i * mp + m));
          const __m256i u = to_bf16(_mm512_loadu_ps(ct + (I + i) * mp + m));
          _mm256_mask_storeu_epi16(gu_blk + i * r + m, keep, g);
          _mm256_mask_storeu_epi16(gu_blk + (I + i) * r + m, keep, u);
          h[half] = to_bf16(simd::silu_mul512(from_bf16(g), from_bf16(u)));
        }
        __m512i lo, hi;
        interleave_pairs(_mm512_castsi256_si512(h[0]), _mm512_castsi256_si512(h[1]), &lo, &hi);
        _mm512_storeu_si512(hv + p * mp * 2 + 2 * m, lo);
      }
    }
  });
}

void store_transposed_bf16(const float* ct, int64_t mp, int64_t n, int64_t r, bf16* o,
                           int64_t ldo) {
  const int64_t col_blocks = (n + 15) / 16;
  at::parallel_for(0, col_blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = 16 * b, cols = std::min<int64_t>(16, n - c0);
      const __mmask16 cm = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1u);
      for (int64_t m0 = 0; m0 < r; m0 += 16) {
        __m512 v[16];
        for (int j = 0; j < 16; ++j) {
          v[j] = j < cols ? _mm512_loadu_ps(ct + (c0 + j) * mp + m0) : _mm512_setzero_ps();
        }
        transpose16x16(v);
        const int64_t rows = std::min<int64_t>(16, r - m0);
        for (int64_t i = 0; i < rows; ++i) {
          _mm256_mask_storeu_epi16(o + (m0 + i) * ldo + c0, cm, to_bf16(v[i]));
        }
      }
    }
  });
}

void gemm_wxt(const bf16* w, int64_t ldw, int64_t n, int64_t k, const bf16* xv, int64_t mp,
              float* ct, int64_t ldc) {
  RECORD_FUNCTION("adamoe_cpu::amx_gemm_wxt", std::vector<c10::IValue>());
  TORCH_CHECK(n % 32 == 0 && k % 32 == 0 && mp == padded_rows(mp) && ldc >= mp,
              "amx::gemm_wxt: bad shape n=", n, " k=", k, " mp=", mp);
  // One m-tile: 4 row tiles of w per block (2 in a last block of 32 rows); more: m-tile pairs
  // against 2 row tiles.
  const int64_t block_rows = mp == 16 ? 64 : 32;
  const int64_t blocks = (n + block_rows - 1) / block_rows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    TileScope tiles;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * block_rows;
      const bf16* wb = w + n0 * ldw;
      float* cb = ct + n0 * ldc;
      if (mp > 16) {
        for (int64_t m0 = 0; m0 < mp; m0 += 32) {
          wxt_block<2, 2>(wb, ldw, k, xv + 2 * m0, mp, cb + m0, ldc);
        }
      } else if (n - n0 >= 64) {
        wxt_block<4, 1>(wb, ldw, k, xv, mp, cb, ldc);
      } else {
        wxt_block<2, 1>(wb, ldw, k, xv, mp, cb, ldc);
      }
    }
  });
}

void gemm_nn(const bf16* ap, int64_t mp, int64_t k, const bf16* b, int64_t ldb, int64_t n,
             float* c, int64_t ldc) {
  RECORD_FUNCTION("adamoe_cpu::amx_gemm_nn", std::vector<c10::IValue>());
  const int64_t kp = round_up(k, 32), n64 = round_up(n, 64);
  TORCH_CHECK(mp % 16 == 0 && ldc >= n64, "amx::gemm_nn: bad shape mp=", mp, " ldc=", ldc);
  // Column chunks of at most kNnTaskCols, at least one per thread where the width allows.
  const int64_t threads = at::get_num_threads();
  const int64_t task_cols =
      std::clamp<int64_t>(round_up((n64 + threads - 1) / threads, 64), 64, kNnTaskCols);
  const int64_t tasks = (n64 + task_cols - 1) / task_cols;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    TileScope tiles;
    bf16* bv = thread_scratch(kNnStripRows * task_cols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * task_cols, cols = std::min(task_cols, n64 - c0);
      for (int64_t k0 = 0; k0 < k; k0 += kNnStripRows) {
        const int64_t kc = std::min(kNnStripRows, k - k0);
        pack_strip(b + c0, ldb, k0, kc, k, n - c0, cols, bv);
        for (int64_t g = 0; g < cols / 64; ++g) {
          for (int64_t m0 = 0; m0 < mp; m0 += 16) {
            nn_group(ap + m0 * kp, kp, k0, round_up(kc, 32) / 32, bv + g * 4 * 512, cols / 16,
                     c + m0 * ldc + c0 + 64 * g, ldc, k0 == 0);
          }
        }
      }
    }
  });
}

void gemm_tn(const bf16* at, int64_t m, int64_t k, const bf16* bv, int64_t n, bf16* c,
             int64_t ldc) {
  RECORD_FUNCTION("adamoe_cpu::amx_gemm_tn", std::vector<c10::IValue>());
  const int64_t kp = round_up(k, 32), np = round_up(n, 32);
  const int64_t tasks = (m + 15) / 16;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    TileScope tiles;
    alignas(64) float buf[16 * 32];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = 16 * t, rows = std::min<int64_t>(16, m - m0);
      for (int64_t j0 = 0; j0 < np; j0 += 32) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t s = 0; s < kp; s += 32) {
          _tile_loadd(4, at + m0 * kp + s, kp * 2);
          const bf16* brow = bv + (s / 2) * np * 2 + 2 * j0;
          _tile_loadd(6, brow, np * 4);
          _tile_loadd(7, brow + 32, np * 4);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
        }
        _tile_stored(0, buf, 128);
        _tile_stored(1, buf + 16, 128);
        const __mmask32 cm = mask32(n - j0);
        for (int64_t i = 0; i < rows; ++i) {
          const __m512i v = reinterpret_cast<__m512i>(
              _mm512_cvtne2ps_pbh(_mm512_load_ps(buf + 32 * i + 16), _mm512_load_ps(buf + 32 * i)));
          _mm512_mask_storeu_epi16(c + (m0 + i) * ldc + j0, cm, v);
        }
      }
    }
  });
}

#pragma GCC pop_options

#else  // !ADAMOE_AMX

void pack_rows_vnni(const bf16*, int64_t, int64_t, int64_t, int64_t, bf16*) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void pack_transposed(const bf16*, int64_t, int64_t, int64_t, bf16*) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void swiglu_to_vnni(const float*, int64_t, int64_t, int64_t, bf16*, bf16*) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void store_transposed_bf16(const float*, int64_t, int64_t, int64_t, bf16*, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void pack_pairs_vnni(const bf16*, int64_t, int64_t, int64_t, int64_t, bf16*) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void gemm_wxt(const bf16*, int64_t, int64_t, int64_t, const bf16*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void gemm_nn(const bf16*, int64_t, int64_t, const bf16*, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void gemm_tn(const bf16*, int64_t, int64_t, const bf16*, int64_t, bf16*, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}

#endif  // ADAMOE_AMX

}  // namespace amx
}  // namespace adamoe
