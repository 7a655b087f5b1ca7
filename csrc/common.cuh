// What the forward and backward kernels share: element conversion and vector access, the LN-scaling
// row layout and row sums, the shared-memory tile staging, GELU and the dropout hash, and the
// device queries of the launchers.
//
// Channels are the fastest dimension everywhere, so a thread owns VEC consecutive channels (one 8- or
// 16-byte access when the tensor allows it, else VEC = 1) and neighbouring threads own neighbouring
// channel groups: every warp access is contiguous. All arithmetic is fp32.
#pragma once
#include "mona.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <initializer_list>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

// The element types every launcher is instantiated for: T alone, and for the LN kernels tokens T
// with y or dy in T2 (T itself, or a half type beside float tokens, as under autocast).
#define MONA_FOR_TYPES(M) M(float) M(__half) M(__nv_bfloat16)
#define MONA_FOR_LN_TYPES(M) \
  M(float, float) M(__half, __half) M(__nv_bfloat16, __nv_bfloat16) M(float, __half) M(float, __nv_bfloat16)

namespace mona {
namespace {

constexpr int kTaps = 49;
constexpr int kKernel = 7;
constexpr int kHalo = kKernel / 2;
constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  const Vec<T, N> raw = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(raw.v[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Vec<T, N> raw;
#pragma unroll
  for (int k = 0; k < N; ++k) raw.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Vec<T, N>*>(p) = raw;
}

template <int N>
__device__ __forceinline__ void load_floats(const float* p, float (&out)[N]) {
  if constexpr (N == 4) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = __ldg(p + k);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&a)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) a[k] = 0.f;
}

bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int V>
using IntC = std::integral_constant<int, V>;

// Calls fn(IntC<V>{}) for the V among (V, Rest...) equal to v, the last one when none is: a runtime
// choice among a few compile-time values, each its own kernel instantiation.
template <int V, int... Rest, typename Fn>
void pick(int v, Fn&& fn) {
  if constexpr (sizeof...(Rest) == 0) {
    fn(IntC<V>{});
  } else if (v == V) {
    fn(IntC<V>{});
  } else {
    pick<Rest...>(v, std::forward<Fn>(fn));
  }
}


// ---------------------------------------------------------------------------------------------
// LayerNorm-scaling. Block = (bx threads over the row's channels) x (row slots). A loop step takes
// kLnFwdRows (kLnBwdRows) rows a slot (row base + r * slots + threadIdx.y) and loads all of them
// before the first reduction, so that each warp keeps several rows' loads in flight: with one row at
// a time the kernels moved 1.4-1.9 TB/s on an H200. A row's sums are warp shuffles, then, when the row spans several warps,
// one shared-memory pass across them in a fixed order.

constexpr int kLnFwdRows = 4;
constexpr int kLnBwdRows = 2;  // the backward holds x, dy and the residual of each row
constexpr int kLnRows = kLnFwdRows > kLnBwdRows ? kLnFwdRows : kLnBwdRows;
// Both kernels are capped at 64 registers (2 blocks of 512 or 4 of 256 threads an SM): every block of
// the ln_blocks grid is resident at once, so the grid-stride loop has no second wave.
constexpr int kLnMinBlocks = 2;

struct RowShape {
  int vec, chunks, bx, slots_per_block;
};

RowShape row_shape(int64_t C, int vec) {
  RowShape s;
  s.vec = vec;
  const int64_t groups = cdiv(C, s.vec);
  s.chunks = groups <= 512 ? 1 : groups <= 1024 ? 2 : 4;
  s.bx = (int)cdiv(cdiv(groups, s.chunks), 32) * 32;
  s.slots_per_block = s.bx >= kThreads ? 1 : kThreads / s.bx;
  return s;
}

// Floats of row-sum scratch a block needs: N sums of R rows for each warp of each slot.
constexpr int kLnSums = 2;
size_t ln_scratch_floats(const RowShape& s) { return (size_t)s.slots_per_block * (s.bx / 32) * kLnSums * kLnRows; }

// s[n][r] summed over the bx threads of this row slot; every thread of the slot gets the sums. N <= kLnSums.
template <int N, int R>
__device__ __forceinline__ void row_sums(float (&s)[N][R], float* scratch) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s[n][r] += __shfl_xor_sync(0xffffffffu, s[n][r], o);
  const int warps = blockDim.x / 32;
  if (warps == 1) return;  // the butterfly left every lane the same sums; no block-wide barrier
  float* mine = scratch + threadIdx.y * warps * N * R;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
      for (int r = 0; r < R; ++r) mine[(n * R + r) * warps + threadIdx.x / 32] = s[n][r];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = 0.f;
      for (int k = 0; k < warps; ++k) v += mine[(n * R + r) * warps + k];
      s[n][r] = v;
    }
  __syncthreads();  // the scratch is reused by the next call
}

// The four parameter vectors at this thread's channels (zeros past C).
template <int VEC, int CH>
struct LnParams {
  float w[CH][VEC], b[CH][VEC], g[CH][VEC], gx[CH][VEC];
  __device__ __forceinline__ LnParams(const float* w_, const float* b_, const float* g_, const float* gx_, int C) {
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * VEC;
      if (c < C) {
        load_floats(w_ + c, w[k]);
        load_floats(b_ + c, b[k]);
        load_floats(g_ + c, g[k]);
        load_floats(gx_ + c, gx[k]);
      } else {
        zero(w[k]);
        zero(b[k]);
        zero(g[k]);
        zero(gx[k]);
      }
    }
  }
};

// y is written in TY (the projections' dtype under autocast, so that no cast of y follows).


// Blocks (and partial slots) of the LN kernels: independent of the layout, so that callers can size
// the partial buffer without knowing it.
int ln_blocks(int64_t M, int sms) { return (int)std::max<int64_t>(1, std::min<int64_t>(cdiv(M, 8), 4 * (int64_t)sms)); }

RowShape ln_layout(int64_t C, bool vectorisable) { return row_shape(C, vectorisable && C % 4 == 0 ? 4 : 1); }

// Calls fn(IntC<VEC>{}, IntC<CH>{}) for the layout's vector width and chunk count.
template <typename Fn>
void pick_row_layout(const RowShape& s, Fn&& fn) {
  if (s.vec == 4) {
    fn(IntC<4>{}, IntC<1>{});  // C <= ln_max_channels: one chunk of at most 512 threads
  } else {
    pick<1, 2, 4>(s.chunks, [&](auto ch) { fn(IntC<1>{}, ch); });
  }
}

size_t ln_smem(const RowShape& s, int64_t C, bool reduce) {
  size_t bytes = sizeof(float) * ln_scratch_floats(s);
  if (reduce && s.slots_per_block > 1) bytes += sizeof(float) * s.slots_per_block * 4 * C;
  return bytes;
}


// ---------------------------------------------------------------------------------------------
// Shared-memory tiles of the conv and its kernel gradient. A block stages the input tile of TH x TW
// pixels and 64 channels with its 3-pixel halo (zeros outside the image) in shared memory once,
// so the 49 taps read shared memory instead of L1/L2, and every thread owns one channel pair.
// Conv: a thread computes an R x Q patch of outputs; it reads each of its R + 6 input rows (Q + 6
// pixels) once and applies it to every output row of the patch, so a shared-memory read feeds
// 7 * Q * R / (R + 6) / (Q + 6) * 7 multiply-adds per channel. The merged kernel (and bias) sit in
// shared memory too, rotated on the way in for the input gradient.

constexpr int kTileChannels = 64;
constexpr int kPairs = kTileChannels / 2;  // threadIdx.x: one channel pair each

template <typename T>
__device__ __forceinline__ float2 load_pair(const T* p) {
  const Vec<T, 2> raw = *reinterpret_cast<const Vec<T, 2>*>(p);
  return make_float2(to_float(raw.v[0]), to_float(raw.v[1]));
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
  Vec<T, 2> raw;
  raw.v[0] = from_float<T>(a);
  raw.v[1] = from_float<T>(b);
  *reinterpret_cast<Vec<T, 2>*>(p) = raw;
}

// Copies rows [i0, i0 + rows) x columns [j0, j0 + cols) of image `img` and channels [c0, c0 + 64)
// into tile[(row * cols + col) * 64 + channel], zero outside the image and past D. 16-byte
// chunks: D is a multiple of 16 / sizeof(T) and the tensor 16-byte aligned (checked by the host).
template <typename T>
__device__ __forceinline__ void stage_tile(const T* __restrict__ src, T* tile, int64_t img, int i0, int j0, int rows,
                                           int cols, int c0, int H, int W, int D) {
  constexpr int kPer = 16 / sizeof(T);
  constexpr int kChunks = kTileChannels / kPer;
  const int n = rows * cols * kChunks;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int k = tid; k < n; k += blockDim.x * blockDim.y) {
    const int chunk = k % kChunks, pix = k / kChunks;
    const int i = i0 + pix / cols, j = j0 + pix % cols, c = c0 + chunk * kPer;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (i >= 0 && i < H && j >= 0 && j < W && c < D)
      v = *reinterpret_cast<const uint4*>(src + ((img * H + i) * (int64_t)W + j) * D + c);
    *reinterpret_cast<uint4*>(tile + (int64_t)pix * kTileChannels + chunk * kPer) = v;
  }
}


// ---------------------------------------------------------------------------------------------
// Vectors (forward) or rows (backward) a thread loads before computing, to keep loads in flight.
constexpr int kGeluUnroll = 4;
// Resident backward blocks an SM (the register cap), and the blocks (partial slots) launched an SM.
constexpr int kGeluBwdBlocks = 4;

// GELU (exact erf form) and dropout. The mask is a hash of (seed, flat element index): splitmix64,
// whose 24 top bits give a uniform draw in [0, 1); kept when the draw is >= p.

__device__ __forceinline__ float keep_scale(uint64_t seed, uint64_t idx, float p, float scale) {
  uint64_t z = seed + (idx + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float draw = (float)(z >> 40) * (1.0f / 16777216.0f);
  return draw >= p ? scale : 0.f;
}

__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

__device__ __forceinline__ float gelu_grad(float v) {
  return 0.5f * (1.f + erff(v * 0.70710678118654752f)) + v * __expf(-0.5f * v * v) * 0.3989422804014327f;
}

// Rows row0, row0 + blockDim.y, ... (U of them) of an (M, D) tensor at channels c .. c + VEC - 1;
// zeros past M.
template <typename T, int U, int VEC>
__device__ __forceinline__ void load_rows(const T* p, int64_t row0, int64_t M, int D, int c, float (&v)[U][VEC]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t row = row0 + (int64_t)u * blockDim.y;
    if (row < M) {
      load_vec<T, VEC>(p + row * D + c, v[u]);
    } else {
      zero(v[u]);
    }
  }
}

// Walks a thread's rows of an (M, D) tensor at channels c .. c + VEC - 1, kGeluUnroll rows (blockDim.y
// apart) a step: load(row0) loads a step's rows before any is computed, to keep loads in flight; then
// row(u, off) runs for each of them inside M, off being its element offset.
template <typename Load, typename Row>
__device__ __forceinline__ void walk_rows(int64_t M, int D, int c, Load load, Row row) {
  constexpr int U = kGeluUnroll;
  const int64_t step = (int64_t)gridDim.x * blockDim.y * U;
  for (int64_t row0 = (int64_t)blockIdx.x * blockDim.y * U + threadIdx.y; row0 < M; row0 += step) {
    load(row0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t r = row0 + (int64_t)u * blockDim.y;
      if (r < M) row(u, r * D + c);
    }
  }
}

// h3 is the projector output before its bias: the kernels add bias[channel] (when not null) first.
// Both kernels: block = (bx channel groups) x (by row lanes), so a thread's channels, and its bias,
// stay fixed while it walks rows.

struct ColShape {
  int vec, bx, by;
};

ColShape col_shape(int64_t D, int elem_bytes, const void* a, const void* b, const void* c, const void* e) {
  ColShape s;
  const int bytes = 4 * elem_bytes;
  s.vec = D % 4 == 0 && aligned(a, bytes) && aligned(b, bytes) && aligned(c, bytes) && aligned(e, bytes) ? 4 : 1;
  const int64_t groups = D / s.vec;
  s.bx = (int)std::min<int64_t>(groups, 64);
  s.by = std::max(1, kThreads / s.bx);
  return s;
}



// ---------------------------------------------------------------------------------------------
// The merge of the three depthwise convs (docs/design.md) and the split of its gradient. Conv weights are
// (D, 1, k, k); a 7x7 tap t = u * 7 + v lies in the centre 5x5 when 1 <= u, v <= 5 and in the centre
// 3x3 when 2 <= u, v <= 4. Divisions are IEEE (the build uses fast math).

__device__ __forceinline__ bool in_centre(int u, int v, int k) {
  const int lo = (kKernel - k) / 2;
  return u >= lo && u < lo + k && v >= lo && v < lo + k;
}

__device__ __forceinline__ int centre_index(int u, int v, int k) {
  const int lo = (kKernel - k) / 2;
  return (u - lo) * k + (v - lo);
}

// Block y = output row: taps 0..48 of K, then the merged bias, then bp as float.

constexpr int kMaxDevices = 64;

// An attribute of the current device, cached per device (0 when it cannot be read).
template <cudaDeviceAttr ATTR>
int current_device_attr() {
  static std::atomic<int> cache[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  int value = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    if (cudaDeviceGetAttribute(&value, ATTR, dev) != cudaSuccess) return 0;
    if (dev < kMaxDevices) cache[dev].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Whether a block may use `bytes` of shared memory on the current device (Turing: 64 KB, Hopper: 227 KB).
bool smem_available(size_t bytes) {
  return bytes <= (size_t)current_device_attr<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
}


// Dynamic shared memory past 48 KB needs an opt-in, once per kernel and device (the kernels' types
// are alike, so the registry keys on the function's address).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::mutex lock;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const std::pair<const void*, int> key(reinterpret_cast<const void*>(kernel), dev);
  std::lock_guard<std::mutex> guard(lock);
  if (done.count(key)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (err == cudaSuccess) done.insert(key);
  return err;
}

// The shared-memory tiles take 16-byte chunks of 64 channels.
template <typename T>
bool smem_tiles_fit(int64_t D, std::initializer_list<const void*> ptrs) {
  if (D % (16 / (int64_t)sizeof(T)) != 0) return false;
  for (const void* p : ptrs)
    if (!aligned(p, 16)) return false;
  return true;
}

}  // namespace
}  // namespace mona
