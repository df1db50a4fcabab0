// CPU kernels of multi-scale deformable attention (float32 / float64), registered for the CPU
// dispatch key next to the CUDA ones. They let the compiled operator (argument checks, the C++
// autograd in msda_autograd.cpp, the fake implementation, torch.compile) be tested on a machine
// without a GPU, against the PyTorch reference. The arithmetic is the official op's:
// x = loc_x * W - 0.5, y = loc_y * H - 0.5, bilinear over the four neighbours, zero outside.
//
// Layouts (contiguous): value (N, S, M, D), locations (N, Lq, M, L, P, 2) as (x, y),
// weights (N, Lq, M, L, P), output / grad_output (N, Lq, M * D).
// Work is split over (n, m) pairs: every output and gradient element belongs to exactly one
// pair, so threads never write the same memory (no atomics, deterministic).
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include "msda_launch.h"

namespace {

struct Corners {
  int64_t h0, w0;     // top-left neighbour (may lie outside the map)
  double lh, lw;      // fractional offsets
  bool inside;        // the sample touches the map at all
};

inline Corners corners_of(double x_norm, double y_norm, int64_t H, int64_t W) {
  const double y = y_norm * static_cast<double>(H) - 0.5;
  const double x = x_norm * static_cast<double>(W) - 0.5;
  Corners c;
  c.inside = y > -1.0 && x > -1.0 && y < static_cast<double>(H) && x < static_cast<double>(W);
  if (!c.inside) {  // NaN, inf or far outside: never cast such a coordinate to an integer
    c.h0 = c.w0 = 0;
    c.lh = c.lw = 0.0;
    return c;
  }
  const double fy = std::floor(y), fx = std::floor(x);
  c.h0 = static_cast<int64_t>(fy);
  c.w0 = static_cast<int64_t>(fx);
  c.lh = y - fy;
  c.lw = x - fx;
  return c;
}

// Reads the level's shapes once (host memory: the CPU kernel may read them directly) and checks
// that every level lies inside value's S rows: a level past the end would be read (forward) and
// written (backward) out of bounds.
std::vector<std::pair<int64_t, int64_t>> level_table(const at::Tensor& shapes, const at::Tensor& starts,
                                                     int64_t S, std::vector<int64_t>* start_out) {
  const auto L = shapes.size(0);
  const int64_t* sp = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> hw(L);
  start_out->resize(L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = sp[2 * l], W = sp[2 * l + 1], start = st[l];
    if (H < 0 || W < 0 || start < 0 || start > S || (W > 0 && H > (S - start) / W)) {
      ::c10::detail::torchCheckFail(
          __func__, __FILE__, static_cast<uint32_t>(__LINE__),
          "ms_deform_attn: level " + std::to_string(l) + " (" + std::to_string(H) + " x " +
              std::to_string(W) + " from row " + std::to_string(start) +
              ") does not fit in value's " + std::to_string(S) + " rows");
    }
    hw[l] = {H, W};
    (*start_out)[l] = start;
  }
  return hw;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const scalar_t* loc, const scalar_t* attw, scalar_t* out,
                    const dino_scale_msda::LaunchShape& s,
                    const std::vector<std::pair<int64_t, int64_t>>& hw, const std::vector<int64_t>& start) {
  const int64_t N = s.N, S = s.S, M = s.M, D = s.D, Lq = s.Lq, L = s.L, P = s.P;
  at::parallel_for(0, N * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(D);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / M, m = nm % M;
      for (int64_t q = 0; q < Lq; ++q) {
        std::fill(acc.begin(), acc.end(), 0.0);
        const int64_t base = ((n * Lq + q) * M + m) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = hw[l].first, W = hw[l].second;
          const scalar_t* v = value + ((n * S + start[l]) * M + m) * D;  // (h*W + w) * M * D strides
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = base + l * P + p;
            const Corners c = corners_of(loc[2 * i], loc[2 * i + 1], H, W);
            if (!c.inside) continue;
            const double a = attw[i];
            const double w[4] = {(1 - c.lh) * (1 - c.lw), (1 - c.lh) * c.lw, c.lh * (1 - c.lw), c.lh * c.lw};
            const int64_t hs[4] = {c.h0, c.h0, c.h0 + 1, c.h0 + 1};
            const int64_t ws[4] = {c.w0, c.w0 + 1, c.w0, c.w0 + 1};
            for (int k = 0; k < 4; ++k) {
              if (hs[k] < 0 || ws[k] < 0 || hs[k] >= H || ws[k] >= W) continue;
              const scalar_t* src = v + (hs[k] * W + ws[k]) * M * D;
              const double f = a * w[k];
              for (int64_t d = 0; d < D; ++d) acc[d] += f * static_cast<double>(src[d]);
            }
          }
        }
        scalar_t* dst = out + ((n * Lq + q) * M + m) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* value, const scalar_t* loc, const scalar_t* attw, const scalar_t* gout,
                     scalar_t* gvalue, scalar_t* gloc, scalar_t* gattw, const dino_scale_msda::LaunchShape& s,
                     const std::vector<std::pair<int64_t, int64_t>>& hw, const std::vector<int64_t>& start) {
  const int64_t N = s.N, S = s.S, M = s.M, D = s.D, Lq = s.Lq, L = s.L, P = s.P;
  at::parallel_for(0, N * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / M, m = nm % M;
      for (int64_t q = 0; q < Lq; ++q) {
        const scalar_t* g = gout + ((n * Lq + q) * M + m) * D;
        const int64_t base = ((n * Lq + q) * M + m) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = hw[l].first, W = hw[l].second;
          const int64_t off = ((n * S + start[l]) * M + m) * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = base + l * P + p;
            const Corners c = corners_of(loc[2 * i], loc[2 * i + 1], H, W);
            if (!c.inside) continue;
            const double a = attw[i];
            const double hh = 1 - c.lh, hw_ = 1 - c.lw;
            const double w[4] = {hh * hw_, hh * c.lw, c.lh * hw_, c.lh * c.lw};
            const int64_t hs[4] = {c.h0, c.h0, c.h0 + 1, c.h0 + 1};
            const int64_t ws[4] = {c.w0, c.w0 + 1, c.w0, c.w0 + 1};
            // d(sample)/dx and d(sample)/dy per corner (x = loc_x * W - 0.5, y = loc_y * H - 0.5)
            const double dx[4] = {-hh, hh, -c.lh, c.lh};
            const double dy[4] = {-hw_, -c.lw, hw_, c.lw};
            double g_sample = 0, g_x = 0, g_y = 0;
            for (int k = 0; k < 4; ++k) {
              if (hs[k] < 0 || ws[k] < 0 || hs[k] >= H || ws[k] >= W) continue;
              const int64_t idx = off + (hs[k] * W + ws[k]) * M * D;
              double dot = 0;
              for (int64_t d = 0; d < D; ++d) {
                dot += static_cast<double>(g[d]) * static_cast<double>(value[idx + d]);
                gvalue[idx + d] += static_cast<scalar_t>(a * w[k] * static_cast<double>(g[d]));
              }
              g_sample += w[k] * dot;
              g_x += dx[k] * dot;
              g_y += dy[k] * dot;
            }
            gattw[i] = static_cast<scalar_t>(g_sample);
            gloc[2 * i] = static_cast<scalar_t>(a * g_x * static_cast<double>(W));
            gloc[2 * i + 1] = static_cast<scalar_t>(a * g_y * static_cast<double>(H));
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor msda_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const auto s = dino_scale_msda::launch_shape(value, sampling_locations);
  auto out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (out.numel() == 0) return out;
  std::vector<int64_t> start;
  const auto hw = level_table(spatial_shapes, level_start_index, value.size(1), &start);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_forward_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s, hw, start);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const auto s = dino_scale_msda::launch_shape(value, sampling_locations);
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attw = at::zeros_like(attention_weights);
  if (grad_output.numel() == 0) return std::make_tuple(grad_value, grad_loc, grad_attw);
  std::vector<int64_t> start;
  const auto hw = level_table(spatial_shapes, level_start_index, value.size(1), &start);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_backward_cpu", [&] {
    backward_kernel<scalar_t>(value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                              attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                              grad_attw.data_ptr<scalar_t>(), s, hw, start);
  });
  return std::make_tuple(grad_value, grad_loc, grad_attw);
}
