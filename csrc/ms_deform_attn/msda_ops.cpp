// Registration of the dino_scale::ms_deform_attn_{forward,backward} custom operators.
// Schemas live here (TORCH_LIBRARY); the CUDA kernels are registered with TORCH_LIBRARY_IMPL.
// Autograd and the fake (meta) implementation are registered from Python
// (dino_scale/ops/ms_deform_attn_cuda.py) with torch.library.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "msda_launch.h"

at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output);

namespace {

constexpr int64_t kMaxLevels = 16;  // must match msda_common.cuh

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& loc,
                  const at::Tensor& attw) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (cuda): value must be a CUDA tensor");
  const auto dev = value.device();
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &loc, &attw}) {
    TORCH_CHECK(t->device() == dev, "ms_deform_attn (cuda): all inputs must be on ", dev);
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn (cuda): inputs must be contiguous");
  }
  TORCH_CHECK(value.is_contiguous(), "ms_deform_attn (cuda): value must be contiguous");
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", loc.sizes());
  TORCH_CHECK(attw.dim() == 5, "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
              attw.sizes());
  const int64_t N = value.size(0), M = value.size(2), L = loc.size(3);
  TORCH_CHECK(loc.size(0) == N && loc.size(2) == M,
              "ms_deform_attn: sampling_locations batch/heads ", loc.sizes(),
              " do not match value ", value.sizes());
  TORCH_CHECK(attw.sizes() == loc.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attw.sizes(),
              " do not match sampling_locations ", loc.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", L, ", got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must be (L,) with L = ", L);
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(L <= kMaxLevels, "ms_deform_attn (cuda): at most ", kMaxLevels, " levels, got ", L);
  const auto st = value.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "ms_deform_attn (cuda): value dtype must be float32, float16, bfloat16 or float64");
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(loc.scalar_type() == acc && attw.scalar_type() == acc,
              "ms_deform_attn (cuda): sampling_locations and attention_weights must be ",
              c10::toString(acc), " for value dtype ", c10::toString(st));
}

// The kernels read (x, y) as one 8/16-byte pair: re-home a location tensor whose storage offset
// breaks that alignment (a fresh allocation is always aligned).
at::Tensor pair_aligned(const at::Tensor& loc) {
  const auto addr = reinterpret_cast<uintptr_t>(loc.data_ptr());
  return addr % (2 * loc.element_size()) == 0 ? loc : loc.clone();
}

at::Tensor forward_impl(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& loc,
                        const at::Tensor& attw) {
  check_inputs(value, spatial_shapes, level_start_index, loc, attw);
  return msda_forward_cuda(value, spatial_shapes, level_start_index, pair_aligned(loc), attw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& loc, const at::Tensor& attw,
    const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, loc, attw);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.device() == value.device() &&
                  grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn (cuda): grad_output must be contiguous, on value's device and dtype");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == value.size(0) &&
                  grad_output.size(1) == loc.size(1) &&
                  grad_output.size(2) == value.size(2) * value.size(3),
              "ms_deform_attn: grad_output must be (N, Lq, M*D), got ", grad_output.sizes());
  return msda_backward_cuda(value, spatial_shapes, level_start_index, pair_aligned(loc), attw,
                            grad_output);
}

}  // namespace

TORCH_LIBRARY(dino_scale, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dino_scale, CUDA, m) {
  m.impl("ms_deform_attn_forward", &forward_impl);
  m.impl("ms_deform_attn_backward", &backward_impl);
}
