// Dense linear layer for the few rows of a decode step: y = x @ weight^T (+ bias) on the small-M
// kernel the experts use (cpu_math::gemm_nt_small_m), which streams the weight once without
// packing. At 1-16 rows a linear layer is bound by reading its weight; on a 2-core AMD EPYC
// (Zen 4) torch's dense GEMM (MKL fp32 / oneDNN bf16) read cold 1024x1024 weights at 8-14 GB/s
// inside a decode step, this kernel at the ~28 GB/s the experts reach. For the attention
// projections and the LM head of a decode step (integrations/decode.py), not for training: no
// autograd formula.
#include <ATen/ATen.h>

#include "adamoe_cpu.h"
#include "cpu_math.h"

namespace adamoe {

at::Tensor linear_small_m_cpu(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "linear_small_m_cpu: x and weight must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2,
              "linear_small_m_cpu: x must be [M, K] and weight [N, K], got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "linear_small_m_cpu: x [M, ", x.size(1),
              "] does not match weight [N, ", weight.size(1), "]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(),
              "linear_small_m_cpu: x and weight must have one dtype, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat,
              "linear_small_m_cpu: float32 or bfloat16 only, got ", x.scalar_type());
  TORCH_CHECK(bf16 ? cpu_math::has_avx512_bf16() : cpu_math::has_avx512(),
              "linear_small_m_cpu needs AVX-512", bf16 ? " with AVX512_BF16" : "",
              " (check adamoe_kernels.ops.cpu.cpu_features() first)");
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(),
                "linear_small_m_cpu: bias must be a CPU [", N, "] tensor, got ", bias->sizes());
  }
  // Rows of x and of the weight must be contiguous (any row stride); the kernel reads them so.
  const at::Tensor a = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor b = weight.stride(1) == 1 ? weight : weight.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias.has_value() ? y.copy_(bias->unsqueeze(0).expand({M, N})) : y.zero_();
  // fp32 accumulates straight into y; bf16 into fp32 scratch, rounded once (after the bias), as
  // torch's bf16 GEMM rounds its fp32 sums.
  at::Tensor acc = bf16 ? at::empty({M, N}, x.options().dtype(at::kFloat)) : y;
  float* c = acc.data_ptr<float>();
  if (bf16) {
    const cpu_math::NtGemm<c10::BFloat16> g{a.data_ptr<c10::BFloat16>(), a.stride(0),
                                            b.data_ptr<c10::BFloat16>(), b.stride(0), c, N, M, N,
                                            K};
    cpu_math::gemm_nt_small_m(&g, 1);
  } else {
    const cpu_math::NtGemm<float> g{a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(),
                                    b.stride(0), c, N, M, N, K};
    cpu_math::gemm_nt_small_m(&g, 1);
  }
  if (bias.has_value()) acc.add_(bias->to(at::kFloat).unsqueeze(0));
  if (bf16) cpu_math::convert(c, y.data_ptr<c10::BFloat16>(), M * N);  // both [M, N] contiguous
  return y;
}

}  // namespace adamoe
