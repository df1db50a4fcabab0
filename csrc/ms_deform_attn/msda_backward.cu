// Backward kernel of multi-scale deformable attention.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "msda_common.cuh"
#include "msda_launch.h"

namespace dino_scale_msda {

// Same thread mapping as the forward. Per point, each lane forms the dot products of its
// grad_output channels with the 4 corner values; the gradients of the location and the weight
// are reduced across the group with xor-shuffles (no atomics) and lane t of the group keeps
// the result of point base+t, so the writes are coalesced and every element is written once.
// The value gradient is scattered with (vector) atomics into an acc_t buffer; VEC is 4 for
// every 2/4-byte dtype so that one group's atomics cover one contiguous 128-byte line of the
// fp32 buffer at D = 32 (VEC = 8 for the half types touched each line twice).
template <typename scalar_t, int VEC, bool ONE_CHUNK, typename I>
__global__ void __launch_bounds__(kBlockThreads) msda_backward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const typename AccType<scalar_t>::type* __restrict__ locations,
    const typename AccType<scalar_t>::type* __restrict__ weights,
    const scalar_t* __restrict__ grad_out, typename AccType<scalar_t>::type* __restrict__ grad_value,
    typename AccType<scalar_t>::type* __restrict__ grad_loc,
    typename AccType<scalar_t>::type* __restrict__ grad_w, I groups, I S, int M, int D,
    int Lq, int L, int P, int G) {
  using A = typename AccType<scalar_t>::type;
  const I row = static_cast<I>(M) * D;
  LevelEntry<I>* tab = level_table_smem<I>();  // dynamic shared memory, L levels
  load_level_table(spatial_shapes, level_start_index, L, S, row, tab);
  __syncthreads();

  const I tid = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
  const I grp = tid / G;
  const int lane = static_cast<int>(tid & (G - 1));
  const bool active = grp < groups;
  const I g = active ? grp : 0;
  const int m = static_cast<int>(g % M);
  const I n = g / M / Lq;
  const int LP = L * P;
  const A* loc_g = locations + g * LP * 2;
  const A* w_g = weights + g * LP;
  const I nm_off = n * S * row + static_cast<I>(m) * D;
  const scalar_t* v_nm = value + nm_off;
  A* gv_nm = grad_value + nm_off;
  const scalar_t* go_g = grad_out + g * D;
  const int chunks = D / VEC;

  A go1[VEC];  // the lane's grad_output chunk when it owns a single chunk
  if (ONE_CHUNK) {
    if (active && lane < chunks) load_vec<scalar_t, VEC>(go_g + lane * VEC, go1);
    else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) go1[i] = static_cast<A>(0);
    }
  }

  for (int base = 0; base < LP; base += G) {
    const int j = base + lane;
    A my_x = 0, my_y = 0, my_w = 0;
    if (j < LP) {
      const auto xy = reinterpret_cast<const typename Pair<A>::type*>(loc_g)[j];
      my_x = xy.x; my_y = xy.y; my_w = w_g[j];
    }
    A res_gx = 0, res_gy = 0, res_gw = 0;
    const int cnt = min(G, LP - base);
#pragma unroll 2
    for (int t = 0; t < cnt; ++t) {
      const A x = __shfl_sync(kFullMask, my_x, t, G);
      const A y = __shfl_sync(kFullMask, my_y, t, G);
      const A w = __shfl_sync(kFullMask, my_w, t, G);
      const int l = (base + t) / P;
      const int H = tab[l].h, W = tab[l].w;
      const Bilinear<A, I> b(x, y, H, W, row);
      A p_w = 0, p_lw = 0, p_lh = 0;  // lane partials of dL/dw, dL/dlw, dL/dlh (without w)
      if (active && b.sampled) {
        const I lvl_off = tab[l].start;
        // d(sample)/d(lw) and d(sample)/d(lh) coefficients of the corners
        const A s_lw[4] = {-b.hh, b.hh, -b.lh, b.lh};
        const A s_lh[4] = {-b.hw, -b.lw, b.hw, b.lw};
        for (int c0 = 0; c0 < (ONE_CHUNK ? 1 : chunks); c0 += G) {
          const int chunk = c0 + lane;
          if (chunk >= chunks) break;
          const int c = chunk * VEC;
          A go[VEC];
          if (ONE_CHUNK) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) go[i] = go1[i];
          } else {
            load_vec<scalar_t, VEC>(go_g + c, go);
          }
          A v[4][VEC];  // issue the 4 corner loads before the atomics
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (b.ok[k]) {
              load_vec<scalar_t, VEC>(v_nm + lvl_off + b.off[k] + c, v[k]);
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) v[k][i] = static_cast<A>(0);
            }
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!b.ok[k]) continue;
            A dot = 0;
            A gv[VEC];
            const A cwk = w * b.cw[k];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              dot += go[i] * v[k][i];
              gv[i] = cwk * go[i];
            }
            atomic_add_vec<VEC>(gv_nm + lvl_off + b.off[k] + c, gv);
            p_w += b.cw[k] * dot;
            p_lw += s_lw[k] * dot;
            p_lh += s_lh[k] * dot;
          }
        }
      }
      // group reduction; every lane ends with the full sums
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        if (o >= G) continue;
        p_w += __shfl_xor_sync(kFullMask, p_w, o, G);
        p_lw += __shfl_xor_sync(kFullMask, p_lw, o, G);
        p_lh += __shfl_xor_sync(kFullMask, p_lh, o, G);
      }
      if (lane == t && b.sampled) {  // an unsampled point keeps 0 (w * 0 is NaN for a non-finite w)
        res_gw = p_w;
        res_gx = w * p_lw * static_cast<A>(W);
        res_gy = w * p_lh * static_cast<A>(H);
      }
    }
    if (active && j < LP) {
      grad_w[g * LP + j] = res_gw;
      typename Pair<A>::type gxy;
      gxy.x = res_gx; gxy.y = res_gy;
      reinterpret_cast<typename Pair<A>::type*>(grad_loc)[g * LP + j] = gxy;
    }
  }
}

template <typename scalar_t, int VEC, typename I>
void launch_backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& lsi,
                     const at::Tensor& loc, const at::Tensor& attw, const at::Tensor& grad_out,
                     at::Tensor& grad_value, at::Tensor& grad_loc, at::Tensor& grad_w,
                     const LaunchShape& s) {
  using A = typename AccType<scalar_t>::type;
  const int64_t chunks = s.D / VEC;
  const int G = group_lanes(chunks);
  const int64_t threads = s.groups * G;
  const int64_t blocks = (threads + kBlockThreads - 1) / kBlockThreads;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "ms_deform_attn: problem too large for one launch");
  const size_t smem = checked_level_table_bytes<I>(s.L);  // the level table, L entries
  auto stream = c10::cuda::getCurrentCUDAStream();
#define DINO_MSDA_BWD_LAUNCH(ONE)                                                              \
  msda_backward_kernel<scalar_t, VEC, ONE, I>                                                  \
      <<<static_cast<unsigned>(blocks), kBlockThreads, smem, stream>>>(                        \
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), lsi.data_ptr<int64_t>(),     \
          loc.data_ptr<A>(), attw.data_ptr<A>(), grad_out.data_ptr<scalar_t>(),                \
          grad_value.data_ptr<A>(), grad_loc.data_ptr<A>(), grad_w.data_ptr<A>(),              \
          static_cast<I>(s.groups), static_cast<I>(s.S), static_cast<int>(s.M),                \
          static_cast<int>(s.D), static_cast<int>(s.Lq), static_cast<int>(s.L),                \
          static_cast<int>(s.P), G)
  if (chunks <= G) {
    DINO_MSDA_BWD_LAUNCH(true);
  } else {
    DINO_MSDA_BWD_LAUNCH(false);
  }
#undef DINO_MSDA_BWD_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_backward_any(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& lsi,
                         const at::Tensor& loc, const at::Tensor& attw, const at::Tensor& grad_out,
                         at::Tensor& grad_value, at::Tensor& grad_loc, at::Tensor& grad_w,
                         const LaunchShape& s) {
  if (fits_int32(s, VEC)) {
    launch_backward<scalar_t, VEC, int>(value, shapes, lsi, loc, attw, grad_out, grad_value,
                                        grad_loc, grad_w, s);
  } else {
    launch_backward<scalar_t, VEC, int64_t>(value, shapes, lsi, loc, attw, grad_out, grad_value,
                                            grad_loc, grad_w, s);
  }
}

}  // namespace dino_scale_msda

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  using namespace dino_scale_msda;
  const c10::cuda::CUDAGuard guard(value.device());
  const LaunchShape s = launch_shape(value, sampling_locations);
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // value gradient accumulates in acc_t (fp32 for the half types), cast at the end
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_w = at::empty(attention_weights.sizes(), attention_weights.options());
  if (s.groups == 0 || s.D == 0 || s.L * s.P == 0) {
    grad_loc.zero_();
    grad_w.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                    "msda_backward_cuda", [&] {
      // 4 channels per lane (16-byte fp32 / 8-byte half loads; 2 for double = 16 bytes)
      constexpr int kVec = sizeof(scalar_t) == 8 ? 2 : 4;
      const bool vec_ok = s.D % kVec == 0 && aligned16(value.data_ptr()) &&
                          aligned16(grad_output.data_ptr());
      if (vec_ok) {
        launch_backward_any<scalar_t, kVec>(value, spatial_shapes, level_start_index,
                                            sampling_locations, attention_weights, grad_output,
                                            grad_value_acc, grad_loc, grad_w, s);
      } else {
        launch_backward_any<scalar_t, 1>(value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights, grad_output,
                                         grad_value_acc, grad_loc, grad_w, s);
      }
    });
  }
  at::Tensor grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                              ? grad_value_acc
                              : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_w};
}
