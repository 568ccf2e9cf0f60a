// Registers the C++ CPU kernels as torch.ops.adamoe.*_cpu. FRAGMENT: Python code defines other
// ops in the same `adamoe` namespace through torch.library.custom_op. Autograd formulas and fake
// (meta) kernels are registered from Python in adamoe_kernels/ops/cpu.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "adamoe_cpu.h"
#include "amx_gemm.h"
#include "cpu_math.h"

TORCH_LIBRARY_FRAGMENT(adamoe, m) {
  m.def(
      "route_cpu(Tensor router_logits, int top_k, int num_experts, str normalize, "
      "float? top_p=None, Tensor? selection_bias=None) -> "
      "(Tensor topk_ids, Tensor topk_weights, Tensor expert_counts, Tensor expert_offsets, "
      "Tensor sorted_slots)");
  m.def(
      "route_backward_cpu(Tensor grad_topk_weights, Tensor router_logits, Tensor topk_ids, "
      "int num_experts, str normalize) -> Tensor");
  m.def(
      "moe_mlp_forward_cpu(Tensor hidden, Tensor gate_up_proj, Tensor down_proj, "
      "Tensor topk_ids, Tensor topk_weights, Tensor sorted_slots, Tensor expert_offsets, "
      "str null_kind) -> (Tensor y, Tensor gate_up_out)");
  m.def(
      "moe_mlp_backward_cpu(Tensor grad_y, Tensor hidden, Tensor gate_up_proj, Tensor down_proj, "
      "Tensor topk_ids, Tensor topk_weights, Tensor sorted_slots, Tensor expert_offsets, "
      "Tensor gate_up_out, str null_kind, bool[4] output_mask) -> "
      "(Tensor grad_hidden, Tensor grad_gate_up_proj, Tensor grad_down_proj, "
      "Tensor grad_topk_weights)");
  m.def(
      "moe_lora_forward_cpu(Tensor x, Tensor lora_A, Tensor lora_B, Tensor topk_ids, "
      "Tensor topk_weights, Tensor sorted_slots, Tensor expert_offsets, float scaling) -> "
      "(Tensor y, Tensor u)");
  m.def(
      "moe_lora_backward_cpu(Tensor grad_y, Tensor x, Tensor lora_A, Tensor lora_B, "
      "Tensor topk_ids, Tensor topk_weights, Tensor sorted_slots, Tensor expert_offsets, "
      "Tensor u, float scaling, bool[4] output_mask) -> "
      "(Tensor grad_x, Tensor grad_lora_A, Tensor grad_lora_B, Tensor grad_topk_weights)");
  m.def("linear_small_m_cpu(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(adamoe, CPU, m) {
  m.impl("route_cpu", &adamoe::route_cpu);
  m.impl("route_backward_cpu", &adamoe::route_backward_cpu);
  m.impl("moe_mlp_forward_cpu", &adamoe::moe_mlp_forward_cpu);
  m.impl("moe_mlp_backward_cpu", &adamoe::moe_mlp_backward_cpu);
  m.impl("moe_lora_forward_cpu", &adamoe::moe_lora_forward_cpu);
  m.impl("moe_lora_backward_cpu", &adamoe::moe_lora_backward_cpu);
  m.impl("linear_small_m_cpu", &adamoe::linear_small_m_cpu);
}

// `import adamoe_kernels._C` loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adamoe_kernels C++ CPU backend (ops live in torch.ops.adamoe.*_cpu)";
  // Which of the own CPU kernels this process runs (each also needs the CPU feature it names;
  // ADAMOE_CPU_PORTABLE=1 and ADAMOE_CPU_NO_AMX=1 turn them off).
  m.def("cpu_features", [] {
    pybind11::dict d;
    d["avx512"] = adamoe::cpu_math::has_avx512();
    d["avx512_bf16"] = adamoe::cpu_math::has_avx512_bf16();
    d["amx_bf16"] = adamoe::amx::available();
    d["intel"] = adamoe::cpu_math::is_intel();
    return d;
  });
}
