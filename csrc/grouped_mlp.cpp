// Grouped expert MLP on CPU over the compacted true assignments only (null slots cost nothing).
//
// Forward, per true expert e with r_e rows (slots sorted_slots[off_e : off_{e+1}]):
//   X_e  = hidden[slot / k]                       gathered once for all experts, [A, H]
//   GU_e = X_e @ gate_up_proj[e]^T                one GEMM for gate and up, [r_e, 2I]
//   h_e  = silu(GU_e[:, :I]) * GU_e[:, I:]        fused elementwise,        [r_e, I]
//   O_e  = h_e @ down_proj[e]^T                   [r_e, H], rows of a compact [A, H] buffer
//   y_t  = sum_j w_tj O[pos(t*k+j)]  (+ w_tj x_t per null slot for "identity")
// The combine runs per token in slot order (deterministic, no atomics, fp32 accumulation).
// GU is returned as the only saved activation; the backward recomputes h from it.
//
// Backward, per expert (d_out = w * dy is never materialised):
//   G     = dy_e @ down_proj[e]                   [r_e, I]
//   dw    = rowsum(G * h);  dh = w * G;  [dg, du] through silu (fused elementwise)
//   d down_proj[e]    = dy_e^T @ (w * h)
//   d gate_up_proj[e] = [dg, du]^T @ X_e
//   dX_e              = [dg, du] @ gate_up_proj[e] compact rows, summed per token in slot order
//
// GEMMs. An expert holds few rows (r_e = T*L/n), and every forward GEMM is x @ W^T against a
// large weight. For fp32 on AVX-512 CPUs with r_e <= kSmallGemmMaxRows the forward GEMMs use
// cpu_math::gemm_nt_small_m, which streams the weight once without packing (faster than MKL at
// small r_e, so the time keeps falling with the load); GU_e is then stored row-major [r_e, 2I].
// bf16 on CPUs with AVX512_BF16 does the same with the VDPBF16PS version of that kernel (fp32
// accumulation, results rounded to bf16 as the reference's bf16 matmuls). Otherwise at::mm_out
// (MKL/oneDNN, multithreaded) computes GU_e^T = W_e @ X_e^T, the faster orientation there, and
// GU_e is stored transposed as a [2I, r_e] block. The backward reads either layout
// (gu_transposed()). The weight gradients are GEMMs of depth r_e with a large
// output (the whole [2I, H] / [H, I] of the expert): for fp32 on AVX-512 they use
// cpu_math::gemm_tn_small_k, which sums the r_e rows in registers and writes each output element
// once with streaming stores (measured 1.1-2.4x faster than at::mm's MKL sgemm for 16-512 rows
// per expert on a 2-core AMD EPYC); bf16 weight gradients run on the AMX kernels (CPUs with
// AMX-BF16), else with few rows on the VDPBF16PS version of gemm_tn_small_k (AVX512_BF16), else
// on at::mm (oneDNN). Every phase of the backward is a torch.profiler scope
// (adamoe_cpu::bwd_*). The experts run one after the other; each GEMM and each
// elementwise pass is multithreaded inside (measured faster on few cores than experts in
// parallel with single-threaded GEMMs, and it keeps every result independent of the thread count
// up to the GEMM library's blocking). The forward's small-M experts are the exception: a run of
// them shares each parallel region (forward_small_experts), since at decode (1-64 rows) the
// forks/joins, not the GEMMs, were the per-expert fixed cost.
#include "adamoe_cpu.h"
#include "amx_gemm.h"
#include "cpu_math.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#include <limits>
#include <vector>

// A torch.profiler scope "adamoe_cpu::<name>" until the end of the enclosing block: the phases of a
// call that bench/harness/breakdown.py reports (free when no profiler runs).
#define ADAMOE_SCOPE(name) RECORD_FUNCTION("adamoe_cpu::" name, std::vector<c10::IValue>())

namespace adamoe {

namespace {

using cpu_math::from_float;
using cpu_math::to_float;

// The limits below are row counts up to which the AVX-512 small-M kernels beat at::mm (MKL, torch's
// BLAS on x86). On Intel CPUs (measured on a 2-core Xeon) MKL wins above them; MKL runs its
// AVX-512 paths on Intel CPUs only, so elsewhere (measured on a 2-core AMD EPYC, H=1024, I=2816)
// the kernels here are faster much further: the *NT/NN limits apply there.
// Largest expert row count for which the forward GEMMs use gemm_nt_small_m (fp32, AVX-512).
constexpr int64_t kSmallGemmMaxRows = 192;
constexpr int64_t kSmallGemmMaxRowsNT = 1024;  // not Intel: 1.4x faster than MKL at 512 rows
// Largest expert row count for which the bf16 forward GEMMs use the VDPBF16PS small-M kernel
// (CPUs with AVX512_BF16). On the AMD EPYC (Zen 4) it beats oneDNN's bf16 GEMM up to 128 rows
// per expert (1.3x at 16, 1.1x at 32-128; H=1024, I=2816, 2 threads) and ties at 256. Off on
// Intel until measured there (oneDNN uses AMX on the Intel CPUs that have AVX512_BF16).
constexpr int64_t kSmallGemmMaxRowsBf16 = 0;
constexpr int64_t kSmallGemmMaxRowsBf16NT = 192;
// The same for the bf16 backward GEMMs G = dy @ down and dX = dGU @ gate_up (VDPBF16PS on B row
// pairs interleaved on the fly): vs oneDNN (AMD EPYC, 2 threads) 1.9x at 16 rows, 1.2-1.5x at
// 32, 1.1-1.2x at 64, 0.8-0.95x at 128.
constexpr int64_t kSmallGemmMaxRowsBf16NN = 96;
// Largest expert row counts for which the backward GEMMs G = dy @ down and dX = dGU @ gate_up use
// cpu_math::gemm_nn_small_m (fp32, AVX-512); above them at::mm (MKL) is as fast or faster.
constexpr int64_t kSmallGemmMaxRowsG = 96;
constexpr int64_t kSmallGemmMaxRowsDx = 192;
constexpr int64_t kSmallGemmMaxRowsNN = 512;  // not Intel: faster than MKL to 256 rows, even at 512
// Largest expert row count for which the weight gradients use cpu_math::gemm_tn_small_k (fp32,
// AVX-512). Measured faster than MKL's sgemm at every row count tried (16..512 rows, H=1024,
// I=2816, AMD EPYC: 1.1-1.7x on one thread, up to 2.4x on two; not yet measured on an Intel CPU);
// far above that a packed GEMM should win, so MKL takes over.
constexpr int64_t kSmallGemmMaxRowsW = 1024;
// On CPUs with AMX-BF16 (Intel Xeon since Sapphire Rapids) the bf16 forward GEMMs always run on the
// own AMX kernels (amx_gemm.h; vs oneDNN's AMX GEMMs on a 2-core Xeon, H=512, I=1408: gate_up with
// its fused SwiGLU 1.3-1.7x faster, down 1.5-3x, 16-512 rows per expert), and the weight gradients
// up to kAmxMaxRowsGrad rows (1.2-1.7x faster at 16-256 rows, a tie or slower at 512). The
// backward's dy @ down and d gate_up @ gate_up stay on oneDNN: an own AMX version (the weight
// interleaved to VNNI pairs on the fly) was no faster at any row count.
constexpr int64_t kAmxMaxRowsGrad = 256;
// Largest expert row count for which the bf16 weight gradients use the VDPBF16PS small-K kernel
// (cpu_math::gemm_tn_small_k) on CPUs with AVX512_BF16 where the AMX kernels do not take them
// (no AMX, or ADAMOE_CPU_NO_AMX=1). A PROXY MEASUREMENT ON AN INTEL XEON, for both values: oneDNN
// restricted to AVX-512 BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16), 2 threads, n=8 top-2,
// H=1024/I=2816 and H=512/I=1408. The two weight-gradient GEMMs of 8 experts into fresh buffers:
// 1.05-1.4x faster at 8-32 rows per expert, 1.04-1.06x at 64, 0.93-0.99x at 128-1024 (both near the
// VDPBF16PS peak there). The whole backward: 1.17-1.35x at 8-16 rows and 1.04-1.08x at 32 into
// recycled gradient memory (the README's allocator setting), 1.0-1.06x into fresh pages (their
// faults dominate), 1.0-1.03x at 64-128. Not measured on an AMD CPU yet (Zen 4: re-measure the
// non-Intel value). On AMX CPUs the AMX kernels take up to kAmxMaxRowsGrad rows and oneDNN's AMX
// GEMMs (4-6x faster than this kernel above 256 rows) the rest, so this limit stays below that.
constexpr int64_t kSmallGemmMaxRowsBf16TN = 64;       // Intel without AMX
constexpr int64_t kSmallGemmMaxRowsBf16TNOther = 64;  // not Intel (proxy, see above)
// Rows x columns of one tile of the transposed-layout backward elementwise pass.
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileCols = 256;
// Tokens per task of the combine passes.
constexpr int64_t kCombineGrain = 16;
// Elements per task (and per fp32 conversion chunk) of the forward elementwise pass.
constexpr int64_t kElementwiseGrain = 4096;
// Elements per task of the row passes around the small-M GEMMs (SwiGLU, bf16 rounding, the
// gather): fewer rows than this run on the calling thread, as a fork/join of the thread pool
// costs about as much as that many elements (a decode step has 1-64 rows).
constexpr int64_t kRowPassGrainElements = 16384;
// Compact rows at or above which make_groups checks the experts in parallel.
constexpr int64_t kGroupsParallelRows = 4096;
// Most rows of one grouped launch of the small-M forward (forward_small_experts): bounds its fp32
// scratch (rows x max(2I, H)); a decode step is always one launch.
constexpr int64_t kSmallForwardChunkRows = 256;

// Rows per task of a pass over rows of `cols` elements.
int64_t row_grain(int64_t cols) {  // cols (H or I) may be 0
  return std::max<int64_t>(1, kRowPassGrainElements / std::max<int64_t>(cols, 1));
}

// The row limit for this CPU: `intel` on Intel CPUs, `other` elsewhere (see the limits above).
int64_t row_limit(int64_t intel, int64_t other) {
  static const bool is_intel = cpu_math::is_intel();
  return is_intel ? intel : other;
}

// True when the fp32 small-M kernels run for `rows` rows under the given limit.
bool small_gemm(at::ScalarType dtype, int64_t rows, int64_t max_rows) {
  return dtype == at::kFloat && rows <= max_rows && cpu_math::has_avx512();
}

// True when the bf16 small-M kernels (AVX512_BF16) run for `rows` rows under the given limit.
bool small_gemm_bf16(at::ScalarType dtype, int64_t rows, int64_t max_rows) {
  return dtype == at::kBFloat16 && rows <= max_rows && cpu_math::has_avx512_bf16();
}

// True when the forward GEMMs of an expert with `rows` rows use the small-M NT kernels: fp32
// (AVX-512) or bf16 (AVX512_BF16) under the row limits above.
bool small_forward(at::ScalarType dtype, int64_t rows) {
  return small_gemm(dtype, rows, row_limit(kSmallGemmMaxRows, kSmallGemmMaxRowsNT)) ||
         small_gemm_bf16(dtype, rows, row_limit(kSmallGemmMaxRowsBf16, kSmallGemmMaxRowsBf16NT));
}

// Scratch buffers reused by every expert of a call (grown, uninitialised, on demand), so the own
// kernels' fp32 results and packed operands cost no allocation per expert: one fp32 buffer and two
// bf16 buffers for packed operands.
struct Scratch {
  at::Tensor f32, packed[2];

  float* floats(int64_t n) { return grow(f32, n, at::kFloat).data_ptr<float>(); }
  c10::BFloat16* bf16s(int which, int64_t n) {
    return grow(packed[which], n, at::kBFloat16).data_ptr<c10::BFloat16>();
  }

 private:
  static at::Tensor& grow(at::Tensor& buf, int64_t n, at::ScalarType dtype) {
    if (!buf.defined() || buf.numel() < n) buf = at::empty({n}, at::dtype(dtype));
    return buf;
  }
};

// Rounds fp32 GEMM results acc [r, N] (row stride lda) to the bf16 rows of out (row stride ldo), as
// at::mm rounds its bf16 outputs; rows in parallel.
void round_rows_to_bf16(const float* acc, int64_t lda, int64_t r, int64_t N, c10::BFloat16* out,
                        int64_t ldo) {
  at::parallel_for(0, r, row_grain(N), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) cpu_math::convert(acc + i * lda, out + i * ldo, N);
  });
}

constexpr int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// True when the bf16 forward GEMMs of an expert run on the AMX kernels: the weights' tiles are
// loaded in place, so H and I must be multiples of 32.
bool amx_forward(at::ScalarType dtype, int64_t H, int64_t I) {
  return dtype == at::kBFloat16 && H % 32 == 0 && I % 32 == 0 && amx::available();
}

// True when the bf16 weight gradients of an expert with `rows` rows run on the AMX kernels (any
// shape: every operand they read by tiles is packed first).
bool amx_weight_grads(at::ScalarType dtype, int64_t rows) {
  return dtype == at::kBFloat16 && rows <= kAmxMaxRowsGrad && amx::available();
}

// True when expert blocks of GU are stored transposed ([2I, r], the at::mm layout) instead of
// row-major ([r, 2I], the small-M kernels'); decided by dtype and row count only, so the forward
// and the backward always agree.
bool gu_transposed(at::ScalarType dtype, int64_t H, int64_t I, int64_t rows) {
  return amx_forward(dtype, H, I) || !small_forward(dtype, rows);
}

// Large outputs are written once, in full, right after allocation: on Linux ask for transparent
// huge pages first, so the first touch costs one page fault per 2 MiB instead of per 4 KiB (this is
// most of the fixed cost of the weight gradients at low load). Only a hint, and only for buffers of
// >= 32 MiB: glibc always serves those with their own mmap (its dynamic mmap threshold is capped
// at 32 MiB), so the advice ends with the buffer and never reaches heap memory reused later.
// ADAMOE_CPU_NO_HUGEPAGES=1 turns it off.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kMinBytes = size_t{32} << 20;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  static const bool disabled = std::getenv("ADAMOE_CPU_NO_HUGEPAGES") != nullptr;
  if (disabled || t.nbytes() < kMinBytes) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1), b = end & ~(kHuge - 1);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// True when every page of t's data is resident (Linux mincore): memory written before (a block
// the allocator recycled), not fresh pages that the first store faults in, the kernel zeroing them
// through the cache. Picks the stores of the bf16 small-K kernel: streaming into resident pages
// (the whole backward 1.25x faster than plain stores at 8 rows per expert, 1.1x at 16-32, H=1024),
// plain into fresh ones (streaming there: 1.2x slower at 8 rows, 1.1x at 16-32). True where it
// cannot tell.
bool pages_resident(const at::Tensor& t) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes();
  std::vector<unsigned char> resident((end - begin + page - 1) / page);
  if (mincore(reinterpret_cast<void*>(begin), end - begin, resident.data()) != 0) return true;
  for (unsigned char r : resident) {
    if (!(r & 1)) return false;
  }
#else
  (void)t;
#endif
  return true;
}

// out = a @ b for row-major a [r, K], b [K, N] (contiguous rows): the own small-M kernels when they
// are the faster ones (fp32 under `max_rows`; bf16 under the bf16 NN limit, their fp32 results
// rounded to bf16 through `scratch` as at::mm rounds), else at::mm_out.
void mm_nn(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t max_rows,
           Scratch& scratch) {
  using bf16 = c10::BFloat16;
  const int64_t r = a.size(0), N = b.size(1), K = a.size(1);
  const bool rows_ok = a.stride(1) == 1 && b.stride(1) == 1 && out.stride(1) == 1;
  const int64_t bf16_rows = row_limit(kSmallGemmMaxRowsBf16, kSmallGemmMaxRowsBf16NN);
  if (rows_ok && small_gemm(a.scalar_type(), r, max_rows)) {
    cpu_math::gemm_nn_small_m(a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), b.stride(0),
                              out.data_ptr<float>(), out.stride(0), r, N, K);
  } else if (rows_ok && small_gemm_bf16(a.scalar_type(), r, bf16_rows)) {
    float* acc = scratch.floats(r * N);
    cpu_math::gemm_nn_small_m(a.data_ptr<bf16>(), a.stride(0), b.data_ptr<bf16>(), b.stride(0),
                              acc, N, r, N, K);
    round_rows_to_bf16(acc, N, r, N, out.data_ptr<bf16>(), out.stride(0));
  } else {
    at::mm_out(out, a, b);
  }
}

// out = a^T @ b for row-major a [r, M], b [r, N] (contiguous rows), out [M, N] contiguous: the
// own small-K kernels when they are the faster ones (bf16 on AMX first, then bf16 on VDPBF16PS
// under the bf16 TN limit, both rounded from fp32 as at::mm rounds; fp32 under `max_rows`), else
// at::mm_out.
void mm_tn(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t max_rows,
           Scratch& scratch) {
  using bf16 = c10::BFloat16;
  const int64_t r = a.size(0), M = a.size(1), N = b.size(1);
  const bool rows_ok = a.stride(1) == 1 && b.stride(1) == 1 && out.is_contiguous();
  const int64_t bf16_rows = row_limit(kSmallGemmMaxRowsBf16TN, kSmallGemmMaxRowsBf16TNOther);
  if (rows_ok && amx_weight_grads(a.scalar_type(), r)) {
    const int64_t kp = round_up(r, 32), np = round_up(N, 32);
    bf16* at = scratch.bf16s(0, round_up(M, 16) * kp);
    bf16* bv = scratch.bf16s(1, kp * np);
    amx::pack_transposed(a.data_ptr<bf16>(), a.stride(0), r, M, at);
    amx::pack_pairs_vnni(b.data_ptr<bf16>(), b.stride(0), r, N, np, bv);
    amx::gemm_tn(at, M, r, bv, N, out.data_ptr<bf16>(), out.stride(0));
  } else if (rows_ok && small_gemm(a.scalar_type(), r, max_rows)) {
    cpu_math::gemm_tn_small_k(a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), b.stride(0),
                              out.data_ptr<float>(), out.stride(0), M, N, r);
  } else if (rows_ok && small_gemm_bf16(a.scalar_type(), r, bf16_rows)) {
    ADAMOE_SCOPE("gemm_tn_bf16");
    cpu_math::gemm_tn_small_k(a.data_ptr<bf16>(), a.stride(0), b.data_ptr<bf16>(), b.stride(0),
                              out.data_ptr<bf16>(), out.stride(0), M, N, r, pages_resident(out));
  } else {
    at::mm_out(out, a.t(), b);
  }
}

// h = silu(g) * u over n elements of any supported dtype (fp32 math).
template <typename T>
void silu_mul_any(const T* g, const T* u, T* h, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    cpu_math::silu_mul(g, u, h, n);
  } else {
    float gf[kElementwiseGrain], uf[kElementwiseGrain], hf[kElementwiseGrain];
    for (int64_t i0 = 0; i0 < n; i0 += kElementwiseGrain) {
      const int64_t len = std::min(kElementwiseGrain, n - i0);
      cpu_math::convert(g + i0, gf, len);
      cpu_math::convert(u + i0, uf, len);
      cpu_math::silu_mul(gf, uf, hf, len);
      cpu_math::convert(hf, h + i0, len);
    }
  }
}

// acc += w * x for a row of any supported dtype.
template <typename T>
void axpy_any(float* acc, float w, const T* x, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    cpu_math::axpy(acc, w, x, n);
  } else {
    cpu_math::convert(x, scratch, n);
    cpu_math::axpy(acc, w, scratch, n);
  }
}

// ---- routing metadata -------------------------------------------------------------------

struct Groups {
  int64_t T, H, n, I, k, A;
  std::vector<int64_t> off;   // [n+1]
  at::Tensor row_token;       // int64 [A]: token of compact row p
  std::vector<float> row_w;   // [A]: routing weight of compact row p
  std::vector<int32_t> pos;   // [T*k]: compact row of a true slot, -1 for a null slot
};

void check_inputs(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,
                  const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& slots,
                  const at::Tensor& offsets) {
  for (const at::Tensor* t : {&hidden, &gate_up, &down, &ids, &weights, &slots, &offsets}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "adamoe cpu ops take CPU tensors, got ", t->device());
  }
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be [T, H], got ", hidden.sizes());
  TORCH_CHECK_VALUE(gate_up.dim() == 3 && down.dim() == 3,
                    "gate_up_proj must be [n, 2I, H] and down_proj [n, H, I]");
  const auto st = hidden.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "hidden must be float32/bfloat16/float16, got ", st);
  TORCH_CHECK_TYPE(gate_up.scalar_type() == st && down.scalar_type() == st,
                   "gate_up_proj and down_proj must have hidden's dtype ", st);
  const int64_t T = hidden.size(0), H = hidden.size(1), n = gate_up.size(0);
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0 && gate_up.size(2) == H,
                    "gate_up_proj must be [n, 2I, H] with H = ", H, ", got ", gate_up.sizes());
  const int64_t I = gate_up.size(1) / 2;
  TORCH_CHECK_VALUE(down.size(0) == n && down.size(1) == H && down.size(2) == I,
                    "down_proj must be [n, H, I] = [", n, ", ", H, ", ", I, "], got ",
                    down.sizes());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == T, "topk_ids must be [T, k] with T = ", T,
                    ", got ", ids.sizes());
  TORCH_CHECK_VALUE(weights.sizes() == ids.sizes(), "topk_weights must have topk_ids' shape");
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.numel() == ids.numel(),
                    "sorted_slots must be [T*k] = [", ids.numel(), "], got ", slots.sizes());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() == n + 1,
                    "expert_offsets must be [n+1] = [", n + 1, "], got ", offsets.sizes());
}

// Reads the routing metadata (CPU tensors: no device sync) and checks it is consistent, so a
// malformed Routing raises instead of reading out of bounds.
Groups make_groups(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& ids_in,
                   const at::Tensor& weights_in, const at::Tensor& slots_in,
                   const at::Tensor& offsets_in) {
  ADAMOE_SCOPE("groups");
  Groups g;
  g.T = hidden.size(0);
  g.H = hidden.size(1);
  g.n = gate_up.size(0);
  g.I = gate_up.size(1) / 2;
  g.k = ids_in.size(1);
  const int64_t S = g.T * g.k;
  if (offsets_in.scalar_type() == at::kInt) {  // as route returns them: no conversion copy
    const at::Tensor offsets = offsets_in.contiguous();
    const int32_t* o = offsets.data_ptr<int32_t>();
    g.off.assign(o, o + g.n + 1);
  } else {
    const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
    const int64_t* o = offsets.data_ptr<int64_t>();
    g.off.assign(o, o + g.n + 1);
  }
  TORCH_CHECK_VALUE(g.off[0] == 0, "expert_offsets[0] must be 0");
  for (int64_t e = 0; e < g.n; ++e) {
    TORCH_CHECK_VALUE(g.off[e] <= g.off[e + 1], "expert_offsets must be non-decreasing");
  }
  g.A = g.off[g.n];
  TORCH_CHECK_VALUE(g.A <= S, "expert_offsets[n] (", g.A, ") exceeds T*k (", S, ")");
  const at::Tensor ids = ids_in.to(at::kInt).contiguous();
  const at::Tensor slots = slots_in.to(at::kInt).contiguous();
  const at::Tensor weights = weights_in.to(at::kFloat).contiguous();
  const int32_t* id = ids.data_ptr<int32_t>();
  const int32_t* sl = slots.data_ptr<int32_t>();
  const float* w = weights.data_ptr<float>();
  g.row_token = at::empty({g.A}, hidden.options().dtype(at::kLong));
  int64_t* tok = g.row_token.data_ptr<int64_t>();
  g.row_w.resize(g.A);
  g.pos.assign(S, -1);
  std::atomic<bool> bad{false};
  at::parallel_for(0, g.n, g.A >= kGroupsParallelRows ? 1 : g.n, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      for (int64_t p = g.off[e]; p < g.off[e + 1]; ++p) {
        const int64_t s = sl[p];
        // A slot belongs to expert id[s] only, so each pos[s] is written by one thread: a
        // repeated slot (pos already set) is caught without a race.
        if (s < 0 || s >= S || id[s] != e || g.pos[s] != -1) {
          bad = true;
          return;
        }
        tok[p] = s / g.k;
        g.row_w[p] = w[s];
        g.pos[s] = static_cast<int32_t>(p);
      }
    }
  });
  TORCH_CHECK_VALUE(!bad, "sorted_slots/expert_offsets do not match topk_ids: the first "
                    "expert_offsets[n] entries of sorted_slots must be the true slots grouped by "
                    "expert, each once (use adamoe_kernels.route)");
  // Every true slot must have a row (the null slots never do).
  int64_t n_true = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(id[s] >= 0, "topk_ids must be >= 0");
    n_true += id[s] < g.n;
  }
  TORCH_CHECK_VALUE(n_true == g.A, "topk_ids has ", n_true, " true slots but expert_offsets[n] is ",
                    g.A);
  return g;
}

// Rows src[row_token[p]] of a contiguous [T, H] tensor as a new [A, H] one (index_select without
// its dispatch and checks: the tokens are in range by make_groups' construction).
at::Tensor gather_rows(const at::Tensor& src, const Groups& g) {
  at::Tensor out = at::empty({g.A, g.H}, src.options());
  const int64_t bytes = g.H * static_cast<int64_t>(src.element_size());
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(out.data_ptr());
  const int64_t* tok = g.row_token.data_ptr<int64_t>();
  at::parallel_for(0, g.A, row_grain(g.H), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) std::memcpy(d + p * bytes, s + tok[p] * bytes, bytes);
  });
  return out;
}

// Block [rows, cols] of a flat buffer starting at row `row0` of a [*, cols] layout.
at::Tensor block(const at::Tensor& flat2d, int64_t row0, int64_t rows, int64_t view_rows,
                 int64_t view_cols) {
  const int64_t cols = flat2d.size(1);
  return flat2d.view({-1}).narrow(0, row0 * cols, rows * cols).view({view_rows, view_cols});
}

template <typename scalar_t>
void combine_forward(const Groups& g, NullKind null_kind, const scalar_t* O, const scalar_t* x,
                     const int32_t* ids, const float* w, scalar_t* y) {
  const int64_t H = g.H, k = g.k;
  at::parallel_for(0, g.T, kCombineGrain, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H), scratch(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      float null_w = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = t * k + j;
        if (ids[s] < g.n) {
          axpy_any(acc.data(), w[s], O + static_cast<int64_t>(g.pos[s]) * H, H, scratch.data());
        } else {
          null_w += w[s];
        }
      }
      if (null_kind == NullKind::kIdentity && null_w != 0.f) {
        axpy_any(acc.data(), null_w, x + t * H, H, scratch.data());
      }
      cpu_math::convert(acc.data(), y + t * H, H);
    }
  });
}

// The bf16 forward of every expert on AMX: each expert's rows of X packed as the B operand, then
// gate_up with its SwiGLU epilogue and down, each one parallel region over all experts' blocks
// (amx_gemm.h). GU goes into its transposed blocks, O into its compact rows.
void forward_amx(const Groups& g, const at::Tensor& X, const at::Tensor& gate_up,
                 const at::Tensor& down, at::Tensor& gu, at::Tensor& O, Scratch& scratch) {
  using bf16 = c10::BFloat16;
  const int64_t H = g.H, I = g.I, n = g.n;
  std::vector<int64_t> xv_off(n + 1, 0), hv_off(n + 1, 0);
  for (int64_t e = 0; e < n; ++e) {
    const int64_t r = g.off[e + 1] - g.off[e], mp = r ? amx::padded_rows(r) : 0;
    xv_off[e + 1] = xv_off[e] + H * mp;
    hv_off[e + 1] = hv_off[e] + I * mp;
  }
  bf16* xv = scratch.bf16s(0, xv_off[n]);
  bf16* hv = scratch.bf16s(1, hv_off[n]);
  std::vector<amx::ExpertOperands> experts(n);
  for (int64_t e = 0; e < n; ++e) {
    experts[e] = {gate_up[e].data_ptr<bf16>(), down[e].data_ptr<bf16>(), xv + xv_off[e],
                  hv + hv_off[e], gu.data_ptr<bf16>() + g.off[e] * 2 * I,
                  O.data_ptr<bf16>() + g.off[e] * H, g.off[e + 1] - g.off[e]};
  }
  {
    ADAMOE_SCOPE("fwd_gate_up");  // with the SwiGLU epilogue
    const bf16* x = X.data_ptr<bf16>();
    at::parallel_for(0, n, 1, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t r = experts[e].rows;
        if (r) amx::pack_rows_vnni(x + g.off[e] * H, H, r, H, amx::padded_rows(r), xv + xv_off[e]);
      }
    });
    amx::grouped_gate_up_swiglu(experts.data(), n, H, I);
  }
  ADAMOE_SCOPE("fwd_down");
  amx::grouped_down(experts.data(), n, H, I);
}

// Forward of the experts [e0, e1), all on the small-M kernels (row-major GU blocks) and holding
// compact rows [p0, p1): gate_up of all of them in one parallel region, the SwiGLU pass over all
// their rows, then down in one region (a decode step's experts cost three forks/joins in all, not
// three each). fp32 GEMMs write GU and O in place; bf16 ones write fp32 scratch, rounded to bf16 as
// the reference's bf16 matmuls round them, and h = silu(g) * u comes from the rounded g, u (as on
// the at::mm path).
template <typename scalar_t>
void forward_small_experts(const Groups& g, const scalar_t* X, const scalar_t* w_gu,
                           const scalar_t* w_down, scalar_t* gu, scalar_t* h, scalar_t* O,
                           int64_t e0, int64_t e1, Scratch& scratch) {
  static_assert(std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>,
                "row-major GU blocks are fp32/bf16 only");
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  const int64_t H = g.H, I = g.I, p0 = g.off[e0], rows = g.off[e1] - p0;
  float* acc = nullptr;
  if constexpr (!kF32) acc = scratch.floats(rows * std::max(2 * I, H));
  float* gu_out = kF32 ? reinterpret_cast<float*>(gu + p0 * 2 * I) : acc;  // [rows, 2I]
  float* o_out = kF32 ? reinterpret_cast<float*>(O + p0 * H) : acc;        // [rows, H]
  c10::SmallVector<cpu_math::NtGemm<scalar_t>, 16> gemms;
  {
    ADAMOE_SCOPE("fwd_gate_up");
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t p = g.off[e], r = g.off[e + 1] - p;
      if (r) {
        gemms.push_back({X + p * H, H, w_gu + e * 2 * I * H, H, gu_out + (p - p0) * 2 * I, 2 * I,
                         r, 2 * I, H});
      }
    }
    cpu_math::gemm_nt_small_m(gemms.data(), static_cast<int64_t>(gemms.size()));
  }
  {
    ADAMOE_SCOPE("fwd_swiglu");
    at::parallel_for(0, rows, row_grain(2 * I), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* gui = gu + (p0 + i) * 2 * I;
        if constexpr (kF32) {
          cpu_math::silu_mul(gui, gui + I, h + i * I, I);
        } else {
          cpu_math::convert(acc + i * 2 * I, gui, 2 * I);
          silu_mul_any(gui, gui + I, h + i * I, I);
        }
      }
    });
  }
  ADAMOE_SCOPE("fwd_down");
  gemms.clear();
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t p = g.off[e], r = g.off[e + 1] - p;
    if (r) {
      gemms.push_back(
          {h + (p - p0) * I, I, w_down + e * H * I, I, o_out + (p - p0) * H, H, r, H, I});
    }
  }
  cpu_math::gemm_nt_small_m(gemms.data(), static_cast<int64_t>(gemms.size()));
  if constexpr (!kF32) round_rows_to_bf16(acc, H, rows, H, O + p0 * H, H);
}

// Forward of one expert on at::mm: rows Xe [r, H] -> its transposed GU block [2I, r] (saved), O
// rows [r, H].
template <typename scalar_t>
void expert_forward_mm(const at::Tensor& Xe, const at::Tensor& w_gu, const at::Tensor& w_down,
                       at::Tensor& gu, at::Tensor& h_buf, at::Tensor& O, int64_t row0, int64_t r) {
  const int64_t I = w_down.size(1);
  at::Tensor guT = block(gu, row0, r, 2 * I, r);
  {
    ADAMOE_SCOPE("fwd_gate_up");
    at::mm_out(guT, w_gu, Xe.t());
  }
  at::Tensor hT = h_buf.narrow(0, 0, I * r).view({I, r});
  {
    ADAMOE_SCOPE("fwd_swiglu");
    const scalar_t* gp = guT.data_ptr<scalar_t>();
    scalar_t* hp = hT.data_ptr<scalar_t>();
    const int64_t len = I * r;
    at::parallel_for(0, len, kElementwiseGrain, [&](int64_t i0, int64_t i1) {
      silu_mul_any(gp + i0, gp + len + i0, hp + i0, i1 - i0);
    });
  }
  ADAMOE_SCOPE("fwd_down");
  at::Tensor Oe = O.narrow(0, row0, r);
  at::mm_out(Oe, hT.t(), w_down.t());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> moe_mlp_forward_cpu(
    const at::Tensor& hidden_in, const at::Tensor& gate_up_in, const at::Tensor& down_in,
    const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& sorted_slots,
    const at::Tensor& expert_offsets, const std::string& null_kind_str) {
  check_inputs(hidden_in, gate_up_in, down_in, topk_ids, topk_weights, sorted_slots,
               expert_offsets);
  const NullKind null_kind = parse_null_kind(null_kind_str);
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous();
  const at::Tensor down = down_in.contiguous();
  const Groups g = make_groups(hidden, gate_up, topk_ids, topk_weights, sorted_slots,
                               expert_offsets);
  const int64_t H = g.H, I = g.I, A = g.A;
  auto opts = hidden.options();

  at::Tensor gu = at::empty({A, 2 * I}, opts);  // saved: one block per expert (see top)
  advise_huge_pages(gu);
  at::Tensor O = at::empty({A, H}, opts);        // expert outputs, compact rows
  if (A > 0) {
    at::Tensor X;
    {
      ADAMOE_SCOPE("fwd_gather");
      X = gather_rows(hidden, g);  // [A, H]
    }
    Scratch scratch;
    if (amx_forward(hidden.scalar_type(), H, I)) {
      forward_amx(g, X, gate_up, down, gu, O, scratch);
    } else {
      const auto st = hidden.scalar_type();
      const auto rows = [&](int64_t e) { return g.off[e + 1] - g.off[e]; };
      // On the small-M kernels (fp32/bf16 only, few rows).
      const auto small = [&](int64_t e) { return !gu_transposed(st, H, I, rows(e)); };
      // h of one at::mm expert or one small-M launch (at most kSmallForwardChunkRows rows or one
      // expert), reused.
      int64_t max_rows = 0;
      for (int64_t e = 0; e < g.n; ++e) max_rows = std::max(max_rows, rows(e));
      at::Tensor h_buf =
          at::empty({std::min(A, std::max(max_rows, kSmallForwardChunkRows)) * I}, opts);
      ADAMOE_DISPATCH_FLOAT(st, "moe_mlp_forward_cpu", [&] {
        for (int64_t e = 0; e < g.n;) {
          if (rows(e) == 0) {  // an expert with no rows does no work
            ++e;
            continue;
          }
          if (!small(e)) {
            expert_forward_mm<scalar_t>(X.narrow(0, g.off[e], rows(e)), gate_up[e], down[e], gu,
                                        h_buf, O, g.off[e], rows(e));
            ++e;
            continue;
          }
          // The run of small (or empty) experts from e: up to kSmallForwardChunkRows rows, or e
          // alone.
          int64_t e1 = e + 1;
          while (e1 < g.n && (rows(e1) == 0 || small(e1)) &&
                 g.off[e1 + 1] - g.off[e] <= kSmallForwardChunkRows) {
            ++e1;
          }
          if constexpr (std::is_same_v<scalar_t, c10::Half>) {
            TORCH_CHECK(false, "fp16 experts run on at::mm");  // small() is never true for fp16
          } else {
            forward_small_experts<scalar_t>(g, X.data_ptr<scalar_t>(), gate_up.data_ptr<scalar_t>(),
                                            down.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(),
                                            h_buf.data_ptr<scalar_t>(), O.data_ptr<scalar_t>(), e,
                                            e1, scratch);
          }
          e = e1;
        }
      });
    }
  }
  at::Tensor y = at::empty_like(hidden);
  const at::Tensor ids = topk_ids.to(at::kInt).contiguous();
  const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
  ADAMOE_DISPATCH_FLOAT(hidden.scalar_type(), "combine", [&] {
    ADAMOE_SCOPE("fwd_combine");
    combine_forward<scalar_t>(g, null_kind, O.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(),
                              ids.data_ptr<int32_t>(), w.data_ptr<float>(), y.data_ptr<scalar_t>());
  });
  return {y, gu};
}

namespace {

// Backward elementwise pass of one expert: from its GU block and G [r, I] writes wh = w*h [r, I],
// dGU = [dg, du] [r, 2I] and dw[p] = <G_p, h_p>. Row-major GU (fp32, bf16): one call per row.
// Transposed GU: tiles of kTileRows x kTileCols are transposed into fp32 scratch first so every
// inner loop is contiguous; per-tile partial sums are added in a fixed order. Deterministic for
// any thread count either way.
template <typename scalar_t>
void silu_mul_backward_expert(const scalar_t* gu, bool transposed, const scalar_t* G,
                              const float* row_w, int64_t r, int64_t I, scalar_t* wh,
                              scalar_t* dgu, float* dw) {
  if (!transposed) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      at::parallel_for(0, r, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          const float* row = gu + i * 2 * I;
          dw[i] = cpu_math::silu_mul_backward(row, row + I, G + i * I, row_w[i], I, wh + i * I,
                                              dgu + i * 2 * I, dgu + i * 2 * I + I);
        }
      });
    } else {  // bf16 rows: through fp32 scratch, one row at a time
      at::parallel_for(0, r, 1, [&](int64_t r0, int64_t r1) {
        std::vector<float> in(3 * I), out(3 * I);  // [g, u, G] and [wh, dg, du]
        for (int64_t i = r0; i < r1; ++i) {
          cpu_math::convert(gu + i * 2 * I, in.data(), 2 * I);
          cpu_math::convert(G + i * I, in.data() + 2 * I, I);
          dw[i] = cpu_math::silu_mul_backward(in.data(), in.data() + I, in.data() + 2 * I,
                                              row_w[i], I, out.data(), out.data() + I,
                                              out.data() + 2 * I);
          cpu_math::convert(out.data(), wh + i * I, I);
          cpu_math::convert(out.data() + I, dgu + i * 2 * I, 2 * I);
        }
      });
    }
    return;
  }
  const int64_t n_rb = (r + kTileRows - 1) / kTileRows;
  const int64_t n_cb = (I + kTileCols - 1) / kTileCols;
  std::vector<float> partial(n_cb * r);
  at::parallel_for(0, n_rb * n_cb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> gt(kTileRows * kTileCols), ut(kTileRows * kTileCols);
    float Gf[kTileCols], whf[kTileCols], dgf[kTileCols], duf[kTileCols];
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t rb = tile / n_cb, cb = tile % n_cb;
      const int64_t r0 = rb * kTileRows, nr = std::min(kTileRows, r - r0);
      const int64_t c0 = cb * kTileCols, nc = std::min(kTileCols, I - c0);
      cpu_math::transpose_to_float(gu + c0 * r + r0, r, nc, nr, gt.data(), kTileCols);
      cpu_math::transpose_to_float(gu + (I + c0) * r + r0, r, nc, nr, ut.data(), kTileCols);
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t row = r0 + i;
        cpu_math::convert(G + row * I + c0, Gf, nc);
        partial[cb * r + row] = cpu_math::silu_mul_backward(
            gt.data() + i * kTileCols, ut.data() + i * kTileCols, Gf, row_w[row], nc, whf, dgf,
            duf);
        cpu_math::convert(whf, wh + row * I + c0, nc);
        cpu_math::convert(dgf, dgu + row * 2 * I + c0, nc);
        cpu_math::convert(duf, dgu + row * 2 * I + I + c0, nc);
      }
    }
  });
  for (int64_t row = 0; row < r; ++row) {
    float s = 0.f;
    for (int64_t cb = 0; cb < n_cb; ++cb) s += partial[cb * r + row];
    dw[row] = s;
  }
}

// d hidden (sum of the compact dX rows of a token, slot order, + identity term) and
// d topk_weights, per token.
template <typename scalar_t>
void combine_backward(const Groups& g, NullKind null_kind, const scalar_t* dX, const scalar_t* dy,
                      const scalar_t* x, const int32_t* ids, const float* w, const float* dw_row,
                      scalar_t* grad_hidden, float* grad_w) {
  const int64_t H = g.H, k = g.k;
  at::parallel_for(0, g.T, kCombineGrain, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H), scratch(H), dyf(H), xf(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      float null_w = 0.f;
      bool dyx_ready = false;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = t * k + j;
        if (ids[s] < g.n) {
          const int64_t p = g.pos[s];
          if (grad_hidden) axpy_any(acc.data(), 1.f, dX + p * H, H, scratch.data());
          if (grad_w) grad_w[s] = dw_row[p];
        } else {
          null_w += w[s];
          if (grad_w) {
            if (null_kind == NullKind::kIdentity && !dyx_ready) {
              cpu_math::convert(dy + t * H, dyf.data(), H);
              cpu_math::convert(x + t * H, xf.data(), H);
              dyx_ready = true;
            }
            grad_w[s] = null_kind == NullKind::kIdentity ? cpu_math::dot(dyf.data(), xf.data(), H)
                                                         : 0.f;
          }
        }
      }
      if (grad_hidden) {
        if (null_kind == NullKind::kIdentity && null_w != 0.f) {
          axpy_any(acc.data(), null_w, dy + t * H, H, scratch.data());
        }
        cpu_math::convert(acc.data(), grad_hidden + t * H, H);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& hidden_in, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
    const at::Tensor& sorted_slots, const at::Tensor& expert_offsets,
    const at::Tensor& gate_up_out, const std::string& null_kind_str,
    std::array<bool, 4> output_mask) {
  check_inputs(hidden_in, gate_up_in, down_in, topk_ids, topk_weights, sorted_slots,
               expert_offsets);
  const NullKind null_kind = parse_null_kind(null_kind_str);
  TORCH_CHECK_VALUE(grad_y_in.sizes() == hidden_in.sizes(), "grad_y must have hidden's shape");
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous();
  const at::Tensor down = down_in.contiguous();
  const at::Tensor dy = grad_y_in.to(hidden.scalar_type()).contiguous();
  const Groups g = make_groups(hidden, gate_up, topk_ids, topk_weights, sorted_slots,
                               expert_offsets);
  const int64_t H = g.H, I = g.I, A = g.A, n = g.n;
  TORCH_CHECK_VALUE(gate_up_out.dim() == 2 && gate_up_out.size(0) == A &&
                        gate_up_out.size(1) == 2 * I &&
                        gate_up_out.scalar_type() == hidden.scalar_type(),
                    "gate_up_out must be the [A, 2I] buffer moe_mlp_forward_cpu returned");
  const at::Tensor gu = gate_up_out.contiguous();
  const auto [need_hidden, need_gate_up, need_down, need_w] = output_mask;
  const bool need_G = need_hidden || need_gate_up || need_w;
  auto opts = hidden.options();

  at::Tensor grad_hidden = need_hidden ? at::empty_like(hidden) : at::empty({0}, opts);
  at::Tensor grad_gate_up = need_gate_up ? at::empty_like(gate_up) : at::empty({0}, opts);
  at::Tensor grad_down = need_down ? at::empty_like(down) : at::empty({0}, opts);
  if (need_gate_up) advise_huge_pages(grad_gate_up);
  if (need_down) advise_huge_pages(grad_down);
  at::Tensor grad_w = need_w ? at::empty(topk_weights.sizes(), opts.dtype(at::kFloat))
                             : at::empty({0}, topk_weights.options());
  if (H == 0) {
    // Nothing depends on the weights or the routing: exact zeros (the K = 0 GEMMs below would
    // leave their scratch unwritten, and d topk_weights is read from it).
    grad_gate_up.zero_();
    grad_down.zero_();
    grad_w.zero_();
    if (need_w && topk_weights.scalar_type() != at::kFloat) {
      grad_w = grad_w.to(topk_weights.scalar_type());
    }
    return {grad_hidden, grad_gate_up, grad_down, grad_w};
  }
  at::Tensor dX = at::empty({need_hidden ? A : 0, H}, opts);  // compact rows of d hidden
  std::vector<float> dw_row(A, 0.f);

  if (A > 0 && (need_G || need_down)) {
    at::Tensor X, dY;  // [A, H]: the rows of hidden (for d gate_up_proj) and of dy
    {
      ADAMOE_SCOPE("bwd_gather");
      if (need_gate_up) X = gather_rows(hidden, g);
      dY = gather_rows(dy, g);
    }
    int64_t max_rows = 0;
    for (int64_t e = 0; e < n; ++e) max_rows = std::max(max_rows, g.off[e + 1] - g.off[e]);
    // Scratch reused by every expert (stays warm in cache, no per-expert allocation).
    at::Tensor G_buf = at::empty({max_rows * I}, opts);
    at::Tensor wh_buf = at::empty({max_rows * I}, opts);
    at::Tensor dgu_buf = at::empty({max_rows * 2 * I}, opts);
    Scratch scratch;
    for (int64_t e = 0; e < n; ++e) {
      const int64_t r = g.off[e + 1] - g.off[e];
      if (r == 0) {  // no rows: exact zero weight gradients, no other work
        if (need_gate_up) grad_gate_up[e].zero_();
        if (need_down) grad_down[e].zero_();
        continue;
      }
      const at::Tensor dYe = dY.narrow(0, g.off[e], r);
      at::Tensor G = G_buf.narrow(0, 0, r * I).view({r, I});
      at::Tensor wh = wh_buf.narrow(0, 0, r * I).view({r, I});
      at::Tensor dgu = dgu_buf.narrow(0, 0, r * 2 * I).view({r, 2 * I});
      if (need_G) {
        ADAMOE_SCOPE("bwd_dy_down");
        mm_nn(G, dYe, down[e], row_limit(kSmallGemmMaxRowsG, kSmallGemmMaxRowsNN), scratch);
      } else {
        G.zero_();  // only w*h is wanted
      }
      ADAMOE_DISPATCH_FLOAT(hidden.scalar_type(), "silu_mul_backward", [&] {
        ADAMOE_SCOPE("bwd_silu");
        silu_mul_backward_expert<scalar_t>(
            gu.data_ptr<scalar_t>() + g.off[e] * 2 * I, gu_transposed(hidden.scalar_type(), H, I, r),
            G.data_ptr<scalar_t>(), g.row_w.data() + g.off[e], r, I, wh.data_ptr<scalar_t>(),
            dgu.data_ptr<scalar_t>(), dw_row.data() + g.off[e]);
      });
      if (need_down) {
        ADAMOE_SCOPE("bwd_grad_down");
        at::Tensor out = grad_down[e];
        mm_tn(out, dYe, wh, kSmallGemmMaxRowsW, scratch);
      }
      if (need_gate_up) {
        ADAMOE_SCOPE("bwd_grad_gate_up");
        at::Tensor out = grad_gate_up[e];
        mm_tn(out, dgu, X.narrow(0, g.off[e], r), kSmallGemmMaxRowsW, scratch);
      }
      if (need_hidden) {
        ADAMOE_SCOPE("bwd_dx");
        at::Tensor out = dX.narrow(0, g.off[e], r);
        mm_nn(out, dgu, gate_up[e], row_limit(kSmallGemmMaxRowsDx, kSmallGemmMaxRowsNN), scratch);
      }
    }
  } else if (A == 0) {
    if (need_gate_up) grad_gate_up.zero_();
    if (need_down) grad_down.zero_();
  }
  if (need_hidden || need_w) {
    const at::Tensor ids = topk_ids.to(at::kInt).contiguous();
    const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
    ADAMOE_DISPATCH_FLOAT(hidden.scalar_type(), "combine_backward", [&] {
      ADAMOE_SCOPE("bwd_combine");
      combine_backward<scalar_t>(g, null_kind, need_hidden ? dX.data_ptr<scalar_t>() : nullptr,
                                 dy.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(),
                                 ids.data_ptr<int32_t>(), w.data_ptr<float>(), dw_row.data(),
                                 need_hidden ? grad_hidden.data_ptr<scalar_t>() : nullptr,
                                 need_w ? grad_w.data_ptr<float>() : nullptr);
    });
  }
  if (need_w && topk_weights.scalar_type() != at::kFloat) {
    grad_w = grad_w.to(topk_weights.scalar_type());
  }
  return {grad_hidden, grad_gate_up, grad_down, grad_w};
}

}  // namespace adamoe
