// Registration of the dino_scale::ms_deform_attn_{forward,backward} custom operators.
// Schemas live here (TORCH_LIBRARY); the CUDA kernels (msda_forward.cu, msda_backward.cu) and
// the CPU kernels (msda_cpu.cpp) are registered with TORCH_LIBRARY_IMPL, and so is the autograd
// formula (a C++ autograd::Function: no Python on the forward or backward call path). The fake
// (meta) implementations are registered from Python (dino_scale/ops/ms_deform_attn_cuda.py).
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "msda_launch.h"

namespace {

// Error messages are assembled with std::to_string and std::string concatenation and thrown
// through c10's exported torchCheckFail, never with TORCH_CHECK's ostream formatting: on an
// H100 machine (torch 2.11, its bundled libstdc++) streaming an int64 into the message from
// this library crashed the process inside std::ostream (seen with cuda-gdb) instead of raising.
#define MSDA_CHECK(cond, msg)                                                                  \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      ::c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__),       \
                                    std::string("ms_deform_attn: ") + (msg));                  \
    }                                                                                          \
  } while (0)

std::string sizes_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + "]";
}

// Any number of levels L: the CPU kernel keeps its level table in a std::vector; the CUDA
// launchers size theirs in shared memory and raise when it exceeds the device's block limit
// (thousands of levels; checked_level_table_bytes in msda_common.cuh).
void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& loc,
                  const at::Tensor& attw) {
  MSDA_CHECK(value.is_cuda() || value.is_cpu(), "value must be a CUDA or CPU tensor");
  const auto dev = value.device();
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &loc, &attw}) {
    MSDA_CHECK(t->device() == dev, "all inputs must be on value's device");
    MSDA_CHECK(t->is_contiguous(), "inputs must be contiguous");
  }
  MSDA_CHECK(value.is_contiguous(), "value must be contiguous");
  MSDA_CHECK(value.dim() == 4, "value must be (N, S, M, D), got " + sizes_str(value));
  MSDA_CHECK(loc.dim() == 6 && loc.size(5) == 2,
             "sampling_locations must be (N, Lq, M, L, P, 2), got " + sizes_str(loc));
  MSDA_CHECK(attw.dim() == 5, "attention_weights must be (N, Lq, M, L, P), got " + sizes_str(attw));
  const int64_t N = value.size(0), M = value.size(2), L = loc.size(3);
  MSDA_CHECK(loc.size(0) == N && loc.size(2) == M,
             "sampling_locations " + sizes_str(loc) + " do not match value " + sizes_str(value) +
                 " in batch or heads");
  MSDA_CHECK(attw.sizes() == loc.sizes().slice(0, 5),
             "attention_weights " + sizes_str(attw) + " do not match sampling_locations " +
                 sizes_str(loc));
  MSDA_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
             "spatial_shapes must be (L, 2) with L = " + std::to_string(L) + ", got " +
                 sizes_str(spatial_shapes));
  MSDA_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
             "level_start_index must be (L,) with L = " + std::to_string(L) + ", got " +
                 sizes_str(level_start_index));
  MSDA_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
             "spatial_shapes and level_start_index must be int64");
  const auto st = value.scalar_type();
  MSDA_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
             "value dtype must be float32, float16, bfloat16 or float64");
  MSDA_CHECK(value.is_cuda() || st == at::kFloat || st == at::kDouble,
             "the CPU kernel takes float32 or float64 value (half types: CUDA only)");
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  MSDA_CHECK(loc.scalar_type() == acc && attw.scalar_type() == acc,
             std::string("sampling_locations and attention_weights must be ") +
                 (acc == at::kDouble ? "float64" : "float32") + " for this value dtype");
}

// The kernels read (x, y) as one 8/16-byte pair: re-home a location tensor whose storage offset
// breaks that alignment (a fresh allocation is always aligned).
at::Tensor pair_aligned(const at::Tensor& loc) {
  const auto addr = reinterpret_cast<uintptr_t>(loc.data_ptr());
  return addr % (2 * loc.element_size()) == 0 ? loc : loc.clone();
}

// A new autograd node, held the way this torch holds them (std::shared_ptr before the
// switch to c10::intrusive_ptr, which newer torch uses: the build must work with both).
using NodePtr = std::decay_t<decltype(std::declval<torch::autograd::Edge>().function)>;

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

at::Tensor forward_impl(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& loc,
                        const at::Tensor& attw) {
  check_inputs(value, spatial_shapes, level_start_index, loc, attw);
  if (value.is_cpu()) return msda_forward_cpu(value, spatial_shapes, level_start_index, loc, attw);
  return msda_forward_cuda(value, spatial_shapes, level_start_index, pair_aligned(loc), attw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& loc, const at::Tensor& attw,
    const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, loc, attw);
  MSDA_CHECK(grad_output.is_contiguous() && grad_output.device() == value.device() &&
                 grad_output.scalar_type() == value.scalar_type(),
             "grad_output must be contiguous, on value's device and in value's dtype");
  MSDA_CHECK(grad_output.dim() == 3 && grad_output.size(0) == value.size(0) &&
                 grad_output.size(1) == loc.size(1) &&
                 grad_output.size(2) == value.size(2) * value.size(3),
             "grad_output must be (N, Lq, M*D), got " + sizes_str(grad_output));
  if (value.is_cpu()) {
    return msda_backward_cpu(value, spatial_shapes, level_start_index, loc, attw, grad_output);
  }
  // The CUDA value gradient is summed with atomics, so its last bits follow the threads' order
  // (as in PyTorch's grid_sample backward): torch.use_deterministic_algorithms(True) raises here,
  // and warns with warn_only=True (train.deterministic). The CPU kernels above are deterministic.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward (CUDA)");
  return msda_backward_cuda(value, spatial_shapes, level_start_index, pair_aligned(loc), attw,
                            grad_output);
}

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&);

// Autograd in C++: forward redispatches below autograd to the device kernel and saves its
// inputs; backward calls the backward operator (so torch.compile traces both through their
// fake implementations). Shapes and start indices get no gradient; the backward is not itself
// differentiable (no double backward, as the official op).
class MSDAFunction : public torch::autograd::Function<MSDAFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& value,
                            const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                            const at::Tensor& loc, const at::Tensor& attw) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dino_scale::ms_deform_attn_forward", "")
                         .typed<ForwardSig>();
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(value, spatial_shapes, level_start_index, loc, attw);
    }
    ctx->save_for_backward({value, spatial_shapes, level_start_index, loc, attw});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dino_scale::ms_deform_attn_backward", "")
                         .typed<BackwardSig>();
    const auto saved = ctx->get_saved_variables();
    std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;  // the backward op has no autograd formula
      result = op.call(saved[0], saved[1], saved[2], saved[3], saved[4], grads[0].contiguous());
    }
    torch::autograd::variable_list out = {std::get<0>(result), std::get<1>(result), std::get<2>(result)};
    bool differentiable = grads[0].requires_grad();
    for (const auto& t : saved) differentiable = differentiable || (t.defined() && t.requires_grad());
    if (at::GradMode::is_enabled() && differentiable) {
      // create_graph=True: the gradients hang off a node that raises when differentiated
      // again (the official op is @once_differentiable); before, the backward op's autograd
      // fallback made every second-order gradient zero with a warning
      auto error = make_node<torch::autograd::Error>(
          std::string("ms_deform_attn: double backward is not supported (the op is differentiable "
                      "once, as the official one); use backend='pytorch' for higher-order gradients"),
          torch::autograd::collect_next_edges(saved[0], saved[3], saved[4], grads[0]));
      for (auto& t : out) torch::autograd::set_history(t, error);
    }
    return {out[0], at::Tensor(), at::Tensor(), out[1], out[2]};
  }
};

at::Tensor forward_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& loc,
                            const at::Tensor& attw) {
  return MSDAFunction::apply(value, spatial_shapes, level_start_index, loc, attw);
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

TORCH_LIBRARY_IMPL(dino_scale, CPU, m) {
  m.impl("ms_deform_attn_forward", &forward_impl);
  m.impl("ms_deform_attn_backward", &backward_impl);
}

TORCH_LIBRARY_IMPL(dino_scale, Autograd, m) {
  m.impl("ms_deform_attn_forward", &forward_autograd);
}
