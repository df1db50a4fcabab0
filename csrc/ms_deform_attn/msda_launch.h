// Host-side launch configuration shared by the forward and backward launchers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace dino_scale_msda {

struct LaunchShape {
  int64_t N, S, M, D, Lq, L, P;
  int64_t groups;  // N * Lq * M
};

inline LaunchShape launch_shape(const at::Tensor& value, const at::Tensor& locations) {
  LaunchShape s;
  s.N = value.size(0); s.S = value.size(1); s.M = value.size(2); s.D = value.size(3);
  s.Lq = locations.size(1); s.L = locations.size(3); s.P = locations.size(4);
  s.groups = s.N * s.Lq * s.M;
  return s;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Lanes per (n, q, m): the smallest power of two >= D / VEC, at most 32.
inline int group_lanes(int64_t chunks) {
  int g = 1;
  while (g < chunks && g < 32) g <<= 1;
  return g;
}

// True when every index the kernels form fits in int32 (value, locations, output, threads),
// so they can use 32-bit index arithmetic (cheaper than 64-bit multiplies). The bilinear corners
// of a point on a level's last row or column are formed (not read) one row and one column past
// the level, so the value's index range gets a margin of (S + 1) rows of M*D (W + 1 <= S + 1: a
// level with pixels has H >= 1, so W <= H * W <= S; load_level_table empties the others).
inline bool fits_int32(const LaunchShape& s, int vec) {
  constexpr int64_t kLimit = (int64_t{1} << 31) - 1;
  const int64_t lanes = static_cast<int64_t>(group_lanes((s.D + vec - 1) / vec));
  const int64_t value_span = (s.N * s.S + s.S + 1) * s.M * s.D;
  const int64_t biggest = std::max({value_span, s.groups * s.L * s.P * 2,
                                    s.groups * s.D, s.groups * lanes + 1024});
  return biggest < kLimit;
}

}  // namespace dino_scale_msda

// Host-side launchers (defined in msda_forward.cu / msda_backward.cu; registered in msda_ops.cpp)
// and the CPU kernels (msda_cpu.cpp).
at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output);
at::Tensor msda_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output);
