// Shared device helpers for the multi-scale deformable attention kernels.
//
// Layout conventions (all tensors contiguous, checked by the host code):
//   value               (N, S, M, D)        scalar_t
//   spatial_shapes      (L, 2)  int64       (H, W) per level
//   level_start_index   (L,)    int64
//   sampling_locations  (N, Lq, M, L, P, 2) acc_t (x, y) in [0, 1]
//   attention_weights   (N, Lq, M, L, P)    acc_t
//   output              (N, Lq, M, D)       scalar_t  (== (N, Lq, M*D))
// acc_t is float for float/half/bfloat16 and double for double.
//
// Thread mapping: one "group" of G lanes (G a power of two <= 32, never straddling a warp)
// per (n, q, m). Each lane owns VEC consecutive channels ("a chunk"; 16 bytes when the
// vector path applies) and, when D/VEC > G, every G-th chunk after that.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace dino_scale_msda {

constexpr int kBlockThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

// (x, y) pair type of the accumulation type: one 8-byte (16-byte for double) access.
template <typename A> struct Pair;
template <> struct Pair<float> { using type = float2; };
template <> struct Pair<double> { using type = double2; };

// Raw storage type with the size of VEC scalars (2, 4, 8 or 16 bytes).
template <int BYTES> struct RawVec;
template <> struct RawVec<2> { using type = unsigned short; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };

// Load VEC scalars (one aligned vector load) and widen them to the accumulation type.
template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, A (&out)[VEC]) {
  using R = typename RawVec<sizeof(T) * VEC>::type;
  const R raw = *reinterpret_cast<const R*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<A>(e[i]);
}

// Narrow VEC accumulators to T and store them with one aligned vector store.
template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const A (&in)[VEC]) {
  using R = typename RawVec<sizeof(T) * VEC>::type;
  R raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) e[i] = static_cast<T>(in[i]);
  *reinterpret_cast<R*>(p) = raw;
}

// grad_value accumulation: vector atomics (sm_90+: float4/float2 atomicAdd on global
// memory) cut the number of atomic instructions by 4x; scalar atomics elsewhere.
template <int VEC, typename A>
__device__ __forceinline__ void atomic_add_vec(A* p, const A (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  constexpr bool kVec4 = std::is_same<A, float>::value && VEC % 4 == 0;
  constexpr bool kVec2 = std::is_same<A, float>::value && VEC % 2 == 0 && !kVec4;
#else
  constexpr bool kVec4 = false, kVec2 = false;
#endif
  if constexpr (kVec4) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  } else if constexpr (kVec2) {
#pragma unroll
    for (int i = 0; i < VEC; i += 2)
      atomicAdd(reinterpret_cast<float2*>(p + i), make_float2(v[i], v[i + 1]));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(p + i, v[i]);
  }
}

// Level table in dynamic shared memory, so any number of levels L fits one block (sized at
// launch by level_table_bytes): L entries (start, H, W), the I start first so that an int64_t
// one sits 8-byte aligned (the buffer is 16-byte aligned; 12 bytes an entry for int, 16 for
// int64_t). I is the index type (int when every tensor has < 2^31 elements, else int64_t).
// One array of entries, not three arrays: every access is the buffer's fixed address plus
// l * sizeof(entry), no L-dependent base pointers held in registers (with three arrays ptxas
// used up to 5 more registers and spilled in some int64_t kernels). The kernels use no other
// shared memory.
template <typename I>
struct LevelEntry {
  I start;  // level start, in elements (start row * row)
  int h, w;
};
static_assert(sizeof(LevelEntry<int>) == 12 && sizeof(LevelEntry<int64_t>) == 16,
              "level table entries are packed");

template <typename I>
__device__ __forceinline__ LevelEntry<I>* level_table_smem() {
  extern __shared__ __align__(16) unsigned char msda_smem[];
  return reinterpret_cast<LevelEntry<I>*>(msda_smem);
}

// Dynamic shared memory bytes of an L-level table: L * (sizeof(I) + 2 * sizeof(int)).
template <typename I>
constexpr size_t level_table_bytes(int64_t L) {
  return static_cast<size_t>(L) * sizeof(LevelEntry<I>);
}

// Host: raise (instead of a failed launch) when the table of L levels exceeds what one block of
// the current device may use without opting in (sharedMemPerBlock, 48 KiB: 4096 levels with
// int indices, 3072 with int64_t). The message is built with std::string (see MSDA_CHECK in
// msda_ops.cpp for why not TORCH_CHECK's stream formatting).
template <typename I>
inline size_t checked_level_table_bytes(int64_t L) {
  const size_t bytes = level_table_bytes<I>(L);
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlock;
  if (bytes > limit) {
    ::c10::detail::torchCheckFail(
        __func__, __FILE__, static_cast<uint32_t>(__LINE__),
        "ms_deform_attn: " + std::to_string(L) + " levels need " + std::to_string(bytes) +
            " bytes of shared memory for the CUDA kernels' level table, above this GPU's " +
            std::to_string(limit) + " bytes per block (at most " +
            std::to_string(limit / level_table_bytes<I>(1)) + " levels on CUDA)");
  }
  return bytes;
}

// The block's threads copy the level table into shared memory, thread t taking levels
// t, t + blockDim.x, ... (any L, also more levels than threads; the caller syncs). A level
// outside value's S rows reads as empty (H = W = 0): never an out-of-bounds access. The shapes
// and starts live on the device, so this is not checked on the host; the CPU kernel raises.
template <typename I>
__device__ __forceinline__ void load_level_table(const int64_t* __restrict__ spatial_shapes,
                                                 const int64_t* __restrict__ level_start_index,
                                                 int L, I S, I row, LevelEntry<I>* tab) {
  const int64_t rows = static_cast<int64_t>(S);
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    const int64_t h = spatial_shapes[2 * t], w = spatial_shapes[2 * t + 1];
    const int64_t start = level_start_index[t];
    // a level with no pixel (h or w 0) is empty: its geometry is never formed (W * row could
    // pass the int32 range for a 0 x huge level)
    const bool fits = h > 0 && w > 0 && start >= 0 && start <= rows && h <= (rows - start) / w;
    tab[t].h = fits ? static_cast<int>(h) : 0;
    tab[t].w = fits ? static_cast<int>(w) : 0;
    tab[t].start = fits ? static_cast<I>(start) * row : 0;
  }
}

// Bilinear sampling geometry of one point, official convention:
//   h_im = y * H - 0.5, w_im = x * W - 0.5; sampled only if -1 < h_im < H and -1 < w_im < W;
//   corners outside the map contribute zero.
// I is the index type (int when every tensor has < 2^31 elements, else int64_t); `row` is the
// element stride of one pixel in value (M * D), so off[k] is an element offset in the level.
template <typename A, typename I>
struct Bilinear {
  bool sampled;
  I off[4];         // element offset (pixel * row) of the 4 corners within the level
  bool ok[4];       // corner inside the map
  A cw[4];          // corner weights hh*hw, hh*lw, lh*hw, lh*lw
  A lh, lw, hh, hw;

  __device__ __forceinline__ Bilinear(A x, A y, int H, int W, I row) {
    const A h_im = y * static_cast<A>(H) - static_cast<A>(0.5);
    const A w_im = x * static_cast<A>(W) - static_cast<A>(0.5);
    sampled = h_im > static_cast<A>(-1) && w_im > static_cast<A>(-1) &&
              h_im < static_cast<A>(H) && w_im < static_cast<A>(W);
    const A hf = floor(sampled ? h_im : static_cast<A>(0));
    const A wf = floor(sampled ? w_im : static_cast<A>(0));
    const int h_low = static_cast<int>(hf), w_low = static_cast<int>(wf);
    const int h_high = h_low + 1, w_high = w_low + 1;
    lh = h_im - hf; lw = w_im - wf;
    hh = static_cast<A>(1) - lh; hw = static_cast<A>(1) - lw;
    cw[0] = hh * hw; cw[1] = hh * lw; cw[2] = lh * hw; cw[3] = lh * lw;
    const bool h0 = h_low >= 0, h1 = h_high <= H - 1, w0 = w_low >= 0, w1 = w_high <= W - 1;
    ok[0] = sampled && h0 && w0; ok[1] = sampled && h0 && w1;
    ok[2] = sampled && h1 && w0; ok[3] = sampled && h1 && w1;
    off[0] = (static_cast<I>(h_low) * W + w_low) * row; off[1] = off[0] + row;
    off[2] = off[0] + static_cast<I>(W) * row; off[3] = off[2] + row;
  }
};

}  // namespace dino_scale_msda
