// Forward kernel of multi-scale deformable attention.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "msda_common.cuh"
#include "msda_launch.h"

namespace dino_scale_msda {

// One group of G lanes per (n, q, m). Locations and weights of the (q, m) pair are read once
// (coalesced, lane j reads point j) and broadcast to the group with warp shuffles; the
// bilinear geometry is computed once per point and reused for the lane's VEC channels.
// I: index type (int on the fast path, int64_t when a tensor has >= 2^31 elements).
template <typename scalar_t, int VEC, typename I>
__global__ void __launch_bounds__(kBlockThreads) msda_forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const typename AccType<scalar_t>::type* __restrict__ locations,
    const typename AccType<scalar_t>::type* __restrict__ weights, scalar_t* __restrict__ out,
    I groups, I S, int M, int D, int Lq, int L, int P, int G) {
  using A = typename AccType<scalar_t>::type;
  const I row = static_cast<I>(M) * D;  // stride of one pixel in value
  LevelEntry<I>* tab = level_table_smem<I>();  // dynamic shared memory, L levels
  load_level_table(spatial_shapes, level_start_index, L, S, row, tab);
  __syncthreads();

  const I tid = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x;
  const I grp = tid / G;
  const int lane = static_cast<int>(tid & (G - 1));
  const bool active = grp < groups;
  const I g = active ? grp : 0;  // inactive lanes still join the shuffles
  const int m = static_cast<int>(g % M);
  const I n = g / M / Lq;
  const int LP = L * P;
  const A* loc_g = locations + g * LP * 2;
  const A* w_g = weights + g * LP;
  const scalar_t* v_nm = value + n * S * row + static_cast<I>(m) * D;
  const int chunks = D / VEC;

  for (int c0 = 0; c0 < chunks; c0 += G) {  // one iteration when D <= G * VEC
    const int chunk = c0 + lane;
    const bool has = active && chunk < chunks;
    const int c = has ? chunk * VEC : 0;
    A acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = static_cast<A>(0);

    for (int base = 0; base < LP; base += G) {
      const int j = base + lane;
      A my_x = 0, my_y = 0, my_w = 0;
      if (j < LP) {
        const auto xy = reinterpret_cast<const typename Pair<A>::type*>(loc_g)[j];
        my_x = xy.x; my_y = xy.y; my_w = w_g[j];
      }
      const int cnt = min(G, LP - base);
#pragma unroll 4
      for (int t = 0; t < cnt; ++t) {
        const A x = __shfl_sync(kFullMask, my_x, t, G);
        const A y = __shfl_sync(kFullMask, my_y, t, G);
        const A w = __shfl_sync(kFullMask, my_w, t, G);
        const int l = (base + t) / P;
        const Bilinear<A, I> b(x, y, tab[l].h, tab[l].w, row);
        if (!has || !b.sampled) continue;
        const scalar_t* vp = v_nm + tab[l].start + c;
        A v[4][VEC];  // the 4 corner loads are issued before any is used
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (b.ok[k]) {
            load_vec<scalar_t, VEC>(vp + b.off[k], v[k]);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[k][i] = static_cast<A>(0);
          }
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const A cwk = w * b.cw[k];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += cwk * v[k][i];
        }
      }
    }
    if (has) store_vec<scalar_t, VEC>(out + g * D + c, acc);
  }
}

template <typename scalar_t, int VEC, typename I>
void launch_forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& lsi,
                    const at::Tensor& loc, const at::Tensor& attw, at::Tensor& out,
                    const LaunchShape& s) {
  using A = typename AccType<scalar_t>::type;
  const int G = group_lanes(s.D / VEC);
  const int64_t threads = s.groups * G;
  const int64_t blocks = (threads + kBlockThreads - 1) / kBlockThreads;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "ms_deform_attn: problem too large for one launch");
  const size_t smem = checked_level_table_bytes<I>(s.L);  // the level table, L entries
  auto stream = c10::cuda::getCurrentCUDAStream();
  msda_forward_kernel<scalar_t, VEC, I>
      <<<static_cast<unsigned>(blocks), kBlockThreads, smem, stream>>>(
      value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), lsi.data_ptr<int64_t>(),
      loc.data_ptr<A>(), attw.data_ptr<A>(), out.data_ptr<scalar_t>(), static_cast<I>(s.groups),
      static_cast<I>(s.S), static_cast<int>(s.M), static_cast<int>(s.D), static_cast<int>(s.Lq),
      static_cast<int>(s.L), static_cast<int>(s.P), G);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_forward_any(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& lsi,
                        const at::Tensor& loc, const at::Tensor& attw, at::Tensor& out,
                        const LaunchShape& s) {
  if (fits_int32(s, VEC)) {
    launch_forward<scalar_t, VEC, int>(value, shapes, lsi, loc, attw, out, s);
  } else {
    launch_forward<scalar_t, VEC, int64_t>(value, shapes, lsi, loc, attw, out, s);
  }
}

}  // namespace dino_scale_msda

at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  using namespace dino_scale_msda;
  const c10::cuda::CUDAGuard guard(value.device());
  const LaunchShape s = launch_shape(value, sampling_locations);
  at::Tensor out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (s.groups == 0 || s.D == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "msda_forward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);  // one 16-byte load per lane and corner
    const bool vec_ok = s.D % kVec == 0 && aligned16(value.data_ptr()) && aligned16(out.data_ptr());
    if (vec_ok) {
      launch_forward_any<scalar_t, kVec>(value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights, out, s);
    } else {
      launch_forward_any<scalar_t, 1>(value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights, out, s);
    }
  });
  return out;
}
