// Intel AMX bf16 GEMMs declared in amx_gemm.h.
//
// Tile registers (all configured 16 rows x 64 bytes): C accumulators tmm0-3, A tiles tmm4-5, B tiles
// tmm6-7. TDPBF16PS sums the products of a tile row of
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
#include <vector>
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

// The 16 x 16 fp32 C^T tiles of NB groups of 16 rows of w (group g starts at rows[g], row stride
// ldw) against MB m-tiles of xv, over the whole depth k: tile (g, j) goes to tiles[g * MB + j]
// (row = a row of w, column = one of the 16 rows of x). The callers' epilogues read them from L1.
// (GCC's tile intrinsics take the tile number as a literal, so the blocks are spelled out.)
template <int NB, int MB>
void wxt_tiles(const bf16* const* rows, int64_t ldw, int64_t k, const bf16* xv, int64_t mp,
               float (*tiles)[256]) {
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
    _tile_loadd(6, xrow, xv_row_bytes);
    if constexpr (MB == 2) _tile_loadd(7, xrow + 32, xv_row_bytes);
    _tile_loadd(4, rows[0] + k0, w_bytes);
    _tile_loadd(5, rows[1] + k0, w_bytes);
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
      _tile_loadd(4, rows[2] + k0, w_bytes);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(5, rows[3] + k0, w_bytes);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  _tile_stored(0, tiles[0], 64);
  _tile_stored(1, tiles[1], 64);
  if constexpr (kC > 2) _tile_stored(2, tiles[2], 64);
  if constexpr (kC > 2) _tile_stored(3, tiles[3], 64);
}

// Runs f(rows, NB, MB, m0, tiles) over every block of C^T = w @ x^T that task b of a gemm over
// w [n, k] owns: with one m-tile (mp == 16) a block is 64 rows (32 at the end), with more it is 32
// rows against each m-tile pair. row_of(i) is the first w row of 16-row group i (the gate/up
// GEMM interleaves its gate and up rows this way).
template <typename RowOf, typename Epi>
void wxt_task(int64_t rows0, int64_t nrows, RowOf&& row_of, int64_t ldw, int64_t k,
              const bf16* xv, int64_t mp, Epi&& epi) {
  alignas(64) float tiles[4][256];
  if (mp > 16) {
    const bf16* rows[2] = {row_of(rows0), row_of(rows0 + 16)};
    for (int64_t m0 = 0; m0 < mp; m0 += 32) {
      wxt_tiles<2, 2>(rows, ldw, k, xv + 2 * m0, mp, tiles);
      epi(2, 2, m0, tiles);
    }
  } else if (nrows >= 64) {
    const bf16* rows[4] = {row_of(rows0), row_of(rows0 + 16), row_of(rows0 + 32),
                           row_of(rows0 + 48)};
    wxt_tiles<4, 1>(rows, ldw, k, xv, mp, tiles);
    epi(4, 1, 0, tiles);
  } else {
    const bf16* rows[2] = {row_of(rows0), row_of(rows0 + 16)};
    wxt_tiles<2, 1>(rows, ldw, k, xv, mp, tiles);
    epi(2, 1, 0, tiles);
  }
}

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
      simd::transpose16x16(v);
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
      simd::transpose16x16(lo);
      for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(at + (i0 + c) * kp + j0, lo[c]);
      if (i0 + 16 < mp) {
        simd::transpose16x16(hi);
        for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(at + (i0 + 16 + c) * kp + j0, hi[c]);
      }
    }
  }
}

namespace {

// One block of the gate/up GEMM of expert x: channels c0..c0 + chans (gate and up rows), then its
// SwiGLU epilogue on the L1 tiles.
void gate_up_block(const ExpertOperands& x, int64_t H, int64_t I, int64_t c0, int64_t chans) {
  const bf16* w = x.w_gate_up;
  const int64_t r = x.rows, mp = padded_rows(r);
  const auto row_of = [&](int64_t group_row) {  // group_row = 32 * c + 16 * (0: gate, 1: up)
    const int64_t c = group_row / 32 * 16, up = (group_row / 16) % 2;
    return w + (up * I + c) * H;
  };
  wxt_task(2 * c0, 2 * chans, row_of, H, H, x.xv, mp,
           [&](int nb, int mb, int64_t m0, float (*tiles)[256]) {
    // tiles: (gate, up) pairs per 16 channels: with mb == 2 the two m-tiles of one pair.
    for (int t = 0; t < nb * mb / 2; ++t) {
      const int64_t ch = c0 + (mb == 2 ? 0 : 16 * t), m = m0 + (mb == 2 ? 16 * t : 0);
      const float* g_tile = tiles[mb == 2 ? t : 2 * t];
      const float* u_tile = tiles[mb == 2 ? 2 + t : 2 * t + 1];
      const __mmask16 keep = static_cast<__mmask16>(
          r - m >= 16 ? 0xFFFF : (r > m ? (1u << (r - m)) - 1u : 0u));
      for (int j = 0; j < 16; j += 2) {
        __m256i h[2];
        for (int half = 0; half < 2; ++half) {
          const int64_t i = ch + j + half;
          const __m256i g = simd::to_bf16(_mm512_load_ps(g_tile + 16 * (j + half)));
          const __m256i u = simd::to_bf16(_mm512_load_ps(u_tile + 16 * (j + half)));
          _mm256_mask_storeu_epi16(x.gu + i * r + m, keep, g);
          _mm256_mask_storeu_epi16(x.gu + (I + i) * r + m, keep, u);
          h[half] = simd::to_bf16(simd::silu_mul512(simd::from_bf16(g), simd::from_bf16(u)));
        }
        __m512i lo, hi;
        interleave_pairs(_mm512_castsi256_si512(h[0]), _mm512_castsi256_si512(h[1]), &lo, &hi);
        _mm512_storeu_si512(x.hv + ((ch + j) / 2 * mp + m) * 2, lo);
      }
    }
  });
}

// One block of the down GEMM of expert x: output columns n0..n0 + ncols, written to its rows.
void down_block(const ExpertOperands& x, int64_t H, int64_t I, int64_t n0, int64_t ncols) {
  const int64_t r = x.rows, mp = padded_rows(r);
  const auto row_of = [&](int64_t row) { return x.w_down + row * I; };
  wxt_task(n0, ncols, row_of, I, I, x.hv, mp, [&](int nb, int mb, int64_t m0, float (*tiles)[256]) {
    // Tile (g, j) holds C^T rows n0 + 16 g, columns (rows of x) m0 + 16 j: transposed, each of
    // its columns is 16 consecutive entries of an output row.
    for (int g = 0; g < nb; ++g) {
      for (int j = 0; j < mb; ++j) {
        const int64_t m = m0 + 16 * j;
        if (m >= r) continue;
        __m512 v[16];
        for (int i = 0; i < 16; ++i) v[i] = _mm512_load_ps(tiles[g * mb + j] + 16 * i);
        simd::transpose16x16(v);
        for (int64_t i = 0; i < std::min<int64_t>(16, r - m); ++i) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(x.out + (m + i) * H + n0 + 16 * g),
                              simd::to_bf16(v[i]));
        }
      }
    }
  });
}

// The blocks of every expert as one list of work items (expert, first output, width), split into
// one contiguous run of about equal cost per thread: a single parallel region for all experts.
// Cost of a block: its weight bytes (the same for every block) plus its rows of compute.
template <typename Block>
void run_blocks(const ExpertOperands* experts, int64_t count, int64_t extent,
                int64_t (*block_of)(int64_t mp), Block&& block) {
  struct Item {
    int64_t expert, start, width;
  };
  std::vector<Item> items;
  std::vector<int64_t> prefix{0};
  for (int64_t e = 0; e < count; ++e) {
    if (experts[e].rows == 0) continue;
    const int64_t mp = padded_rows(experts[e].rows), width = block_of(mp);
    for (int64_t s = 0; s < extent; s += width) {
      items.push_back({e, s, std::min(width, extent - s)});
      prefix.push_back(prefix.back() + width * (64 + mp));
    }
  }
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), n), total = prefix.back();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    TileScope tiles_on;
    for (int64_t p = p0; p < p1; ++p) {
      // Item i runs in the part where its cost prefix starts.
      const auto first = [&](int64_t q) {
        return std::lower_bound(prefix.begin(), prefix.end() - 1, total * q / parts) -
               prefix.begin();
      };
      for (int64_t i = first(p), i1 = first(p + 1); i < i1; ++i) {
        block(experts[items[i].expert], items[i].start, items[i].width);
      }
    }
  });
}

}  // namespace

void grouped_gate_up_swiglu(const ExpertOperands* experts, int64_t count, int64_t H, int64_t I) {
  RECORD_FUNCTION("adamoe_cpu::amx_gemm_gate_up", std::vector<c10::IValue>());
  TORCH_CHECK(I % 32 == 0 && H % 32 == 0, "amx::grouped_gate_up_swiglu: bad shape H=", H,
              " I=", I);
  // Tile groups alternate gate and up rows of the same 16 channels, so each block's epilogue has
  // g and u side by side: one block = 32 channels with one m-tile, 16 with more.
  run_blocks(experts, count, I, [](int64_t mp) -> int64_t { return mp == 16 ? 32 : 16; },
             [&](const ExpertOperands& x, int64_t c0, int64_t chans) {
               gate_up_block(x, H, I, c0, chans);
             });
}

void grouped_down(const ExpertOperands* experts, int64_t count, int64_t H, int64_t I) {
  RECORD_FUNCTION("adamoe_cpu::amx_gemm_wxt", std::vector<c10::IValue>());
  TORCH_CHECK(I % 32 == 0 && H % 32 == 0, "amx::grouped_down: bad shape H=", H, " I=", I);
  run_blocks(experts, count, H, [](int64_t mp) -> int64_t { return mp == 16 ? 64 : 32; },
             [&](const ExpertOperands& x, int64_t n0, int64_t ncols) {
               down_block(x, H, I, n0, ncols);
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
void grouped_gate_up_swiglu(const ExpertOperands*, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void grouped_down(const ExpertOperands*, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}
void gemm_tn(const bf16*, int64_t, int64_t, const bf16*, int64_t, bf16*, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built in (check amx::available() first)");
}

#endif  // ADAMOE_AMX

}  // namespace amx
}  // namespace adamoe
