// bf16 GEMMs on Intel AMX (TMUL tiles, TDPBF16PS) for the expert MLP over few rows per expert.
//
// AMX multiplies a 16x32 bf16 tile A by a 32x16 bf16 tile B held in "VNNI" order (row kk of the B
// tile holds the pairs B[2kk][n], B[2kk+1][n] for 16 n) into a 16x16 fp32 tile. The kernels here are
// arranged so the large operand, the expert weight, is read straight from memory once, in its own
// layout, and only the small operands (the expert's rows of activations) are repacked:
//
//   grouped_gate_up_swiglu, grouped_down
//             C^T [N, Mp] = W [N, K] @ X^T   (forward: W tiles are plain row tiles of W; X^T is
//                                            packed to VNNI by pack_rows_vnni; the epilogues
//                                            run on the fp32 tiles in L1; all experts' blocks
//                                            in one parallel region)
//   gemm_tn   C [M, N]    = A^T @ B, depth K = rows (weight gradients: the small operands are
//                                            packed, the large bf16 output is written once)
//
// All accumulate in fp32 in a fixed order per output element, independent of the thread count.
// Call only when available() is true. Shapes follow cpu_math.h: row-major, leading dimensions in
// elements. "Mp" is the padded row count of the small operand: 16 for M <= 16, else M rounded up to
// a multiple of 32 (padded_rows()); padding is zero-filled by the packers.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace adamoe {
namespace amx {

using bf16 = c10::BFloat16;

// True when the AMX kernels run on this CPU: AMX-TILE, AMX-BF16 and AVX512_BF16 present, the
// kernel granted this process the tile state (Linux arch_prctl), and ADAMOE_CPU_NO_AMX unset.
bool available();

// Rows of a small operand padded for the tile loops: 16 for m <= 16, else m rounded up to 32.
int64_t padded_rows(int64_t m);

// x [m, k] (row stride ldx) -> xv [round_up(k, 32) / 2][mp][2]: xv[kk][i][p] = x[i][2kk + p], zero
// for i >= m or 2kk + p >= k. The B operand of the forward GEMMs.
void pack_rows_vnni(const bf16* x, int64_t ldx, int64_t m, int64_t k, int64_t mp, bf16* xv);

// b [k, n] (row stride ldb) -> bv [round_up(k, 32) / 2][np][2]: bv[kk][j][p] = b[2kk + p][j], zero
// for j >= n or 2kk + p >= k (np >= n). The B operand of gemm_tn.
void pack_pairs_vnni(const bf16* b, int64_t ldb, int64_t k, int64_t n, int64_t np, bf16* bv);

// a [k, m] (row stride lda) -> at [mp][kp]: at[i][j] = a[j][i], zero for i >= m or j >= k
// (kp = round_up(k, 32), mp = round_up(m, 16)). The A operand of gemm_tn.
void pack_transposed(const bf16* a, int64_t lda, int64_t k, int64_t m, bf16* at);

// One expert's operands of the grouped forward GEMMs (its `rows` rows of the batch, mp =
// padded_rows(rows)).
struct ExpertOperands {
  const bf16* w_gate_up;  // [2I, H]: gate rows 0..I-1, up rows I..2I-1
  const bf16* w_down;     // [H, I]
  const bf16* xv;         // pack_rows_vnni of its rows of x: [H/2][mp][2]
  bf16* hv;               // out of the gate/up GEMM, in of the down GEMM: [I/2][mp][2]
  bf16* gu;               // the saved pre-activations, transposed: [2I, rows]
  bf16* out;              // its rows of the expert output: [rows, H]
  int64_t rows;
};

// The gate/up projection with its SwiGLU epilogue for every expert, in one parallel region:
// GU^T = w_gate_up @ x^T, g and u rounded to bf16 into gu (as at::mm would round them), and
// h = silu(g) * u of the rounded values, rounded, written transposed in VNNI pairs to hv: the B
// operand of the down projection. Needs H % 32 == 0 and I % 32 == 0 (the weights' tiles are
// loaded in place). Experts with no rows are skipped.
void grouped_gate_up_swiglu(const ExpertOperands* experts, int64_t count, int64_t H, int64_t I);

// The down projection for every expert, in one parallel region: out = (w_down @ h^T)^T rounded
// from fp32 to bf16 rows. Same shape rules.
void grouped_down(const ExpertOperands* experts, int64_t count, int64_t H, int64_t I);

// c [m, n] (row stride ldc, bf16, overwritten) = a^T @ b over depth k, rounded from fp32, for
// at = pack_transposed(a) [round_up(m, 16)][round_up(k, 32)] and bv = pack_pairs_vnni(b) with
// np = round_up(n, 32). Threads split the rows of c.
void gemm_tn(const bf16* at, int64_t m, int64_t k, const bf16* bv, int64_t n, bf16* c,
             int64_t ldc);

}  // namespace amx
}  // namespace adamoe
