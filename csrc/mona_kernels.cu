// CUDA fallback kernels for GPUs where the Triton path cannot run (see mona_kernels.h).
//
// Channels are the fastest dimension everywhere, so a thread owns VEC consecutive channels (one 8- or
// 16-byte access when the tensor allows it, else VEC = 1) and neighbouring threads own neighbouring
// channel groups: every warp access is contiguous. All arithmetic is fp32.
#include "mona_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <initializer_list>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

namespace mona {
namespace {

constexpr int kTaps = 49;
constexpr int kKernel = 7;
constexpr int kHalo = kKernel / 2;
constexpr int kThreads = 256;
constexpr int kWgradRows = 7;      // threadIdx.y of the wgrad kernel: the tap row it accumulates

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
template <typename T, typename TY, int VEC, int CH>
__global__ void __launch_bounds__(512, kLnMinBlocks) ln_scale_fwd_kernel(
    const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    const float* __restrict__ gamma, const float* __restrict__ gammax, TY* __restrict__ y, float* __restrict__ mean,
    float* __restrict__ rstd, int64_t M, int C, float eps) {
  extern __shared__ float scratch[];
  constexpr int R = kLnFwdRows;
  const int slots = blockDim.y;
  const LnParams<VEC, CH> prm(w, b, gamma, gammax, C);
  for (int64_t base = (int64_t)blockIdx.x * slots * R; base < M; base += (int64_t)gridDim.x * slots * R) {
    float xv[R][CH][VEC];
    float s[1][R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = base + r * slots + threadIdx.y;
      s[0][r] = 0.f;
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (row < M && c < C) {
          load_vec<T, VEC>(x + row * C + c, xv[r][k]);
        } else {
          zero(xv[r][k]);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[0][r] += xv[r][k][e];
      }
    }
    row_sums(s, scratch);
    float mu[R], q[1][R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      mu[r] = s[0][r] / C;
      q[0][r] = 0.f;
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (c < C) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) q[0][r] += (xv[r][k][e] - mu[r]) * (xv[r][k][e] - mu[r]);
        }
      }
    }
    row_sums(q, scratch);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = base + r * slots + threadIdx.y;
      if (row >= M) continue;
      const float rs = rsqrtf(q[0][r] / C + eps);
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (c >= C) continue;
        float out[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xe = xv[r][k][e];
          out[e] = ((xe - mu[r]) * rs * prm.w[k][e] + prm.b[k][e]) * prm.g[k][e] + xe * prm.gx[k][e];
        }
        store_vec<TY, VEC>(y + row * C + c, out);
      }
      if (threadIdx.x == 0 && mean != nullptr) {
        mean[row] = mu[r];
        rstd[row] = rs;
      }
    }
  }
}

// dy is read in TD (the projections' dtype under autocast, so that no cast of dy comes first).
template <typename T, typename TD, int VEC, int CH>
__global__ void __launch_bounds__(512, kLnMinBlocks) ln_scale_bwd_kernel(
    const TD* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    const float* __restrict__ gamma, const float* __restrict__ gammax, const float* __restrict__ mean,
    const float* __restrict__ rstd, const T* __restrict__ residual, T* __restrict__ dx, float* __restrict__ partial,
    int64_t M, int C) {
  extern __shared__ float scratch[];
  constexpr int R = kLnBwdRows;
  const int slots = blockDim.y;
  // acc[k][0..3][e]: column sums over the rows of this slot of dy * xn, dy * x, dy and the residual;
  // the epilogue scales them into the five partial rows
  float acc[CH][4][VEC];
#pragma unroll
  for (int k = 0; k < CH; ++k)
#pragma unroll
    for (int r = 0; r < 4; ++r) zero(acc[k][r]);
  for (int64_t base = (int64_t)blockIdx.x * slots * R; base < M; base += (int64_t)gridDim.x * slots * R) {
    float xv[R][CH][VEC], gv[R][CH][VEC], res[R][CH][VEC], mu[R], rs[R];
    float sums[2][R];  // row sums of t = dy * gamma * w and of t * xn
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = base + r * slots + threadIdx.y;
      const bool row_ok = row < M;
      mu[r] = row_ok ? mean[row] : 0.f;
      rs[r] = row_ok ? rstd[row] : 0.f;
      sums[0][r] = sums[1][r] = 0.f;
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (row_ok && c < C) {
          load_vec<T, VEC>(x + row * C + c, xv[r][k]);
          load_vec<TD, VEC>(dy + row * C + c, gv[r][k]);
          if (residual != nullptr) {
            load_vec<T, VEC>(residual + row * C + c, res[r][k]);
          } else {
            zero(res[r][k]);
          }
        } else {
          zero(xv[r][k]);
          zero(gv[r][k]);
          zero(res[r][k]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * VEC;
      if (c >= C) continue;
      float gw[VEC], wv[VEC];
      load_floats(gamma + c, gw);
      load_floats(w + c, wv);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float t = gv[r][k][e] * gw[e] * wv[e];
          sums[0][r] += t;
          sums[1][r] += t * (xv[r][k][e] - mu[r]) * rs[r];
        }
    }
    row_sums(sums, scratch);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = base + r * slots + threadIdx.y;
      if (row >= M) continue;
      const float mean_t = sums[0][r] / C, mean_txn = sums[1][r] / C;
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (c >= C) continue;
        float wv[VEC], gmv[VEC], gxv[VEC], out[VEC];
        load_floats(w + c, wv);
        load_floats(gamma + c, gmv);
        load_floats(gammax + c, gxv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float g = gv[r][k][e], xe = xv[r][k][e], xn = (xe - mu[r]) * rs[r];
          out[e] = g * gxv[e] + rs[r] * (g * gmv[e] * wv[e] - mean_t - xn * mean_txn) + res[r][k][e];
          acc[k][0][e] += g * xn;
          acc[k][1][e] += g * xe;
          acc[k][2][e] += g;
          acc[k][3][e] += res[r][k][e];
        }
        store_vec<T, VEC>(dx + row * C + c, out);
      }
    }
  }
  // One partial slot per block: row slot 0's threads add the other slots' sums in slot order. A block
  // has several row slots only when bx < 256, hence CH == 1 and slots * C <= 256 * VEC floats a row.
  float* red = scratch + (size_t)slots * (blockDim.x / 32) * kLnSums * kLnRows;
  float* out = partial + (int64_t)blockIdx.x * 5 * C;
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = (k * blockDim.x + threadIdx.x) * VEC;
    if (c >= C) continue;
    if (slots > 1) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) red[((int64_t)threadIdx.y * 4 + r) * C + c + e] = acc[k][r][e];
    }
  }
  if (slots > 1) __syncthreads();
  if (threadIdx.y != 0) return;
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = (k * blockDim.x + threadIdx.x) * VEC;
    if (c >= C) continue;
    float sum[4][VEC], wv[VEC], bv[VEC], gmv[VEC];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float v = acc[k][r][e];
        for (int q = 1; q < slots; ++q) v += red[((int64_t)q * 4 + r) * C + c + e];
        sum[r][e] = v;
      }
    load_floats(w + c, wv);
    load_floats(b + c, bv);
    load_floats(gamma + c, gmv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      out[c + e] = sum[0][e] * wv[e] + sum[2][e] * bv[e];  // gamma: sum of dy * (xn * w + b)
      out[(int64_t)C + c + e] = sum[1][e];                // gammax: sum of dy * x
      out[(int64_t)2 * C + c + e] = sum[0][e] * gmv[e];   // LN weight: sum of dy * gamma * xn
      out[(int64_t)3 * C + c + e] = sum[2][e] * gmv[e];   // LN bias: sum of dy * gamma
      out[(int64_t)4 * C + c + e] = sum[3][e];            // the residual's column sums
    }
  }
}

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
// The merged 7x7 depthwise conv. A thread computes kConvRows output rows of one column for VEC
// channels: for each tap column v it loads the kConvRows + 6 inputs of column j + v - 3 once and
// applies them to every tap row, so an input is loaded (R + 6) / R times per tap column instead of
// seven, and the 49 weights of its channels are read once per strip.

// R rows a thread and MIN_BLOCKS resident blocks an SM (the register budget) are tuning choices,
// measured by graph-replayed sweeps on an H200.
template <typename T, int VEC, bool FLIP, int R, int MIN_BLOCKS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) dwconv7_kernel(
    const T* __restrict__ h, const float* __restrict__ K, const float* __restrict__ bias, T* __restrict__ out,
    T* __restrict__ out2, int H, int W, int D, int col_tiles, int row_tiles) {
  const int groups = D / VEC;
  const int g = blockIdx.y * blockDim.x + threadIdx.x;
  int64_t t = blockIdx.x;
  const int ct = (int)(t % col_tiles);
  t /= col_tiles;
  const int rt = (int)(t % row_tiles);
  const int64_t img = t / row_tiles;
  const int j = ct * blockDim.y + threadIdx.y;
  if (g >= groups || j >= W) return;
  const int c = g * VEC;
  const int i0 = rt * R;
  float acc[R][VEC];
  float bv[VEC];
  if (bias != nullptr) {
    load_floats(bias + c, bv);
  } else {
    zero(bv);
  }
#pragma unroll
  for (int o = 0; o < R; ++o)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[o][e] = bv[e];
  const T* plane = h + img * H * (int64_t)W * D + c;
#pragma unroll
  for (int v = 0; v < kKernel; ++v) {
    const int jj = j + v - kHalo;
    if (jj < 0 || jj >= W) continue;
    float col[R + kKernel - 1][VEC];
#pragma unroll
    for (int r = 0; r < R + kKernel - 1; ++r) {
      const int ii = i0 + r - kHalo;
      if (ii >= 0 && ii < H) {
        load_vec<T, VEC>(plane + ((int64_t)ii * W + jj) * D, col[r]);
      } else {
        zero(col[r]);
      }
    }
#pragma unroll
    for (int u = 0; u < kKernel; ++u) {
      const int tap = FLIP ? kTaps - 1 - (u * kKernel + v) : u * kKernel + v;
      float wv[VEC];
      load_floats(K + (int64_t)tap * D + c, wv);
#pragma unroll
      for (int o = 0; o < R; ++o)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[o][e] += col[o + u][e] * wv[e];
    }
  }
  const int64_t base = img * H * (int64_t)W * D + c;
#pragma unroll
  for (int o = 0; o < R; ++o) {
    if (i0 + o >= H) continue;
    const int64_t off = base + ((int64_t)(i0 + o) * W + j) * D;
    store_vec<T, VEC>(out + off, acc[o]);
    if (out2 != nullptr) store_vec<T, VEC>(out2 + off, acc[o]);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel gradient. Thread (channel group, tap row u = threadIdx.y) walks segments of image rows;
// along a segment it slides a 7-wide window over input row i + u - 3, so each step loads one h
// vector and one dout vector for 7 * VEC multiply-adds. The window lives in registers with
// rotating compile-time indices (steps unrolled by 7). Each block writes one slot of partials.

template <typename T, int VEC>
__global__ void __launch_bounds__(kWgradRows * 32) dwconv7_wgrad_kernel(
    const T* __restrict__ h, const T* __restrict__ dout, float* __restrict__ partial, int H, int W, int D,
    int seg_len, int segs_per_row, int64_t units) {
  const int groups = D / VEC;
  const int g = blockIdx.y * blockDim.x + threadIdx.x;
  const int u = threadIdx.y;
  const int64_t slot = blockIdx.x;
  if (g >= groups) return;
  const int c = g * VEC;
  float acc[kKernel][VEC], dsum[VEC];
#pragma unroll
  for (int v = 0; v < kKernel; ++v) zero(acc[v]);
  zero(dsum);
  for (int64_t unit = slot; unit < units; unit += gridDim.x) {
    const int seg = (int)(unit % segs_per_row);
    const int64_t row = unit / segs_per_row;  // b * H + i
    const int i = (int)(row % H);
    const int ii = i + u - kHalo;
    if (ii < 0 || ii >= H) continue;
    const int j0 = seg * seg_len;
    const T* hrow = h + (row + u - kHalo) * (int64_t)W * D + c;
    const T* grow = dout + row * (int64_t)W * D + c;
    float win[kKernel][VEC];
#pragma unroll
    for (int s = 0; s < kKernel - 1; ++s) {
      const int col = j0 - kHalo + s;
      if (col >= 0 && col < W) {
        load_vec<T, VEC>(hrow + (int64_t)col * D, win[s]);
      } else {
        zero(win[s]);
      }
    }
    for (int jb = 0; jb < seg_len; jb += kKernel) {
#pragma unroll
      for (int s = 0; s < kKernel; ++s) {
        const int j = j0 + jb + s;
        const int col = j + kHalo;
        // window slot of column j + v - 3 is (jb + s + v) % 7 == (s + v) % 7: jb is a multiple of 7
        if (col < W) {
          load_vec<T, VEC>(hrow + (int64_t)col * D, win[(s + kKernel - 1) % kKernel]);
        } else {
          zero(win[(s + kKernel - 1) % kKernel]);
        }
        if (j < W) {
          float gv[VEC];
          load_vec<T, VEC>(grow + (int64_t)j * D, gv);
          if (u == kHalo) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) dsum[e] += gv[e];
          }
#pragma unroll
          for (int v = 0; v < kKernel; ++v)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[v][e] += gv[e] * win[(s + v) % kKernel][e];
        }
      }
    }
  }
  float* mine = partial + slot * (kTaps + 1) * D + c;
#pragma unroll
  for (int v = 0; v < kKernel; ++v)
#pragma unroll
    for (int e = 0; e < VEC; ++e) mine[(int64_t)(u * kKernel + v) * D + e] = acc[v][e];
  if (u == kHalo) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) mine[(int64_t)kTaps * D + e] = dsum[e];
  }
}

struct WgradShape {
  int seg_len, segs_per_row;
  int64_t units;
};

WgradShape wgrad_shape(int64_t B, int64_t H, int64_t W) {
  WgradShape s;
  s.seg_len = (int)cdiv(std::min<int64_t>(W, 63), kKernel) * kKernel;
  s.segs_per_row = (int)cdiv(W, s.seg_len);
  s.units = B * H * s.segs_per_row;
  return s;
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

template <typename T, int TH, int TW>
constexpr size_t conv_smem_bytes() {
  return sizeof(float) * (kTaps + 1) * kTileChannels + sizeof(T) * (TH + 6) * (TW + 6) * kTileChannels;
}

template <typename T, bool FLIP, int TH, int TW, int R, int Q, int MIN_BLOCKS>
__global__ void __launch_bounds__(kPairs * (TH / R) * (TW / Q), MIN_BLOCKS) dwconv7_smem_kernel(
    const T* __restrict__ h, const float* __restrict__ K, const float* __restrict__ bias, T* __restrict__ out,
    T* __restrict__ out2, int H, int W, int D, int col_tiles, int row_tiles) {
  constexpr int kCols = TW + 2 * kHalo;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* wsm = reinterpret_cast<float*>(smem_raw);  // (50, 64): taps, then bias
  T* tile = reinterpret_cast<T*>(wsm + (kTaps + 1) * kTileChannels);
  int64_t t = blockIdx.x;
  const int ct = (int)(t % col_tiles);
  t /= col_tiles;
  const int rt = (int)(t % row_tiles);
  const int64_t img = t / row_tiles;
  const int c0 = blockIdx.y * kTileChannels;
  const int i0 = rt * TH, j0 = ct * TW;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int k = tid; k < (kTaps + 1) * kTileChannels; k += blockDim.x * blockDim.y) {
    const int tap = k / kTileChannels, c = c0 + k % kTileChannels;
    float v = 0.f;
    if (c < D) {
      if (tap < kTaps) {
        v = K[(int64_t)(FLIP ? kTaps - 1 - tap : tap) * D + c];
      } else if (bias != nullptr) {
        v = bias[c];
      }
    }
    wsm[k] = v;
  }
  stage_tile(h, tile, img, i0 - kHalo, j0 - kHalo, TH + 2 * kHalo, kCols, c0, H, W, D);
  __syncthreads();

  const int cp = threadIdx.x;
  const int oi = (threadIdx.y / (TW / Q)) * R, oj = (threadIdx.y % (TW / Q)) * Q;
  const float2* w2 = reinterpret_cast<const float2*>(wsm) + cp;  // tap t of this pair: w2[t * kPairs]
  const float2 b = w2[kTaps * kPairs];
  float acc[R][Q][2];
#pragma unroll
  for (int o = 0; o < R; ++o)
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      acc[o][q][0] = b.x;
      acc[o][q][1] = b.y;
    }
#pragma unroll
  for (int r = 0; r < R + 2 * kHalo; ++r) {
    float2 row[Q + 2 * kHalo];
    const T* src = tile + ((oi + r) * kCols + oj) * kTileChannels + 2 * cp;
#pragma unroll
    for (int k = 0; k < Q + 2 * kHalo; ++k) row[k] = load_pair(src + k * kTileChannels);
#pragma unroll
    for (int o = 0; o < R; ++o) {
      const int u = r - o;  // the tap row joining input row r to output row o
      if (u < 0 || u >= kKernel) continue;
#pragma unroll
      for (int v = 0; v < kKernel; ++v) {
        const float2 w = w2[(u * kKernel + v) * kPairs];
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          acc[o][q][0] += row[q + v].x * w.x;
          acc[o][q][1] += row[q + v].y * w.y;
        }
      }
    }
  }
  const int c = c0 + 2 * cp;
  if (c >= D) return;
#pragma unroll
  for (int o = 0; o < R; ++o) {
    const int i = i0 + oi + o;
    if (i >= H) continue;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int j = j0 + oj + q;
      if (j >= W) continue;
      const int64_t off = ((img * H + i) * (int64_t)W + j) * D + c;
      store_pair(out + off, acc[o][q][0], acc[o][q][1]);
      if (out2 != nullptr) store_pair(out2 + off, acc[o][q][0], acc[o][q][1]);
    }
  }
}

// Kernel gradient from shared-memory tiles: thread (channel pair, tap row u = threadIdx.y) sums
// dout(i, j) * h(i + u - 3, j + v - 3) over the tile for its seven taps v, reading an input row of
// TW + 6 pixels once per output row. Blocks loop over tiles and write one partial slot each.
template <typename T, int TH, int TW>
constexpr size_t wgrad_smem_bytes() {
  return sizeof(T) * ((TH + 6) * (TW + 6) + TH * TW) * kTileChannels;
}

template <typename T, int TH, int TW>
__global__ void __launch_bounds__(kPairs * kKernel) dwconv7_wgrad_smem_kernel(
    const T* __restrict__ h, const T* __restrict__ dout, float* __restrict__ partial, int H, int W, int D,
    int col_tiles, int row_tiles, int64_t n_tiles) {
  constexpr int kCols = TW + 2 * kHalo;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* htile = reinterpret_cast<T*>(smem_raw);
  T* gtile = htile + (TH + 2 * kHalo) * kCols * kTileChannels;
  const int cp = threadIdx.x, u = threadIdx.y;
  const int c0 = blockIdx.y * kTileChannels;
  float2 acc[kKernel], dsum = make_float2(0.f, 0.f);
#pragma unroll
  for (int v = 0; v < kKernel; ++v) acc[v] = make_float2(0.f, 0.f);
  for (int64_t t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    int64_t r = t;
    const int ct = (int)(r % col_tiles);
    r /= col_tiles;
    const int rt = (int)(r % row_tiles);
    const int64_t img = r / row_tiles;
    const int i0 = rt * TH, j0 = ct * TW;
    __syncthreads();  // the previous tile's readers are done
    stage_tile(h, htile, img, i0 - kHalo, j0 - kHalo, TH + 2 * kHalo, kCols, c0, H, W, D);
    stage_tile(dout, gtile, img, i0, j0, TH, TW, c0, H, W, D);
    __syncthreads();
    for (int oi = 0; oi < TH; ++oi) {
      const T* hrow = htile + ((oi + u) * kCols) * kTileChannels + 2 * cp;
      const T* grow = gtile + (oi * TW) * kTileChannels + 2 * cp;
      float2 hr[TW + 2 * kHalo];
#pragma unroll
      for (int k = 0; k < TW + 2 * kHalo; ++k) hr[k] = load_pair(hrow + k * kTileChannels);
#pragma unroll
      for (int q = 0; q < TW; ++q) {
        const float2 g = load_pair(grow + q * kTileChannels);
        if (u == kHalo) {
          dsum.x += g.x;
          dsum.y += g.y;
        }
#pragma unroll
        for (int v = 0; v < kKernel; ++v) {
          acc[v].x += g.x * hr[q + v].x;
          acc[v].y += g.y * hr[q + v].y;
        }
      }
    }
  }
  const int c = c0 + 2 * cp;
  if (c >= D) return;
  float* mine = partial + (int64_t)blockIdx.x * (kTaps + 1) * D + c;
#pragma unroll
  for (int v = 0; v < kKernel; ++v) {
    mine[(int64_t)(u * kKernel + v) * D] = acc[v].x;
    mine[(int64_t)(u * kKernel + v) * D + 1] = acc[v].y;
  }
  if (u == kHalo) {
    mine[(int64_t)kTaps * D] = dsum.x;
    mine[(int64_t)kTaps * D + 1] = dsum.y;
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
template <typename T, int VEC>
__global__ void gelu_dropout_fwd_kernel(const T* __restrict__ h3, const float* __restrict__ bias, T* __restrict__ a,
                                        int64_t M, int D, uint64_t seed, const uint64_t* __restrict__ seed_dev,
                                        float p, float scale) {
  if (seed_dev != nullptr) seed = *seed_dev;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (c >= D) return;
  float bv[VEC];
  zero(bv);
  if (bias != nullptr) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) bv[e] = __ldg(bias + c + e);
  }
  float v[kGeluUnroll][VEC];
  walk_rows(
      M, D, c, [&](int64_t row0) { load_rows(h3, row0, M, D, c, v); },
      [&](int u, int64_t off) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[u][e] = gelu(v[u][e] + bv[e]);
          if (p > 0.f) v[u][e] *= keep_scale(seed, (uint64_t)(off + e), p, scale);
        }
        store_vec<T, VEC>(a + off, v[u]);
      });
}

// Block = (bx channel groups) x (by row lanes); each thread sums dh3 of its channels over its rows,
// then lane 0 adds the other lanes' sums in lane order: one partial slot per block.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kGeluBwdBlocks) gelu_dropout_bwd_kernel(
    const T* __restrict__ da, const T* __restrict__ h3, const float* __restrict__ bias, T* __restrict__ dh3,
    T* __restrict__ dh3_copy, float* __restrict__ partial, int64_t M, int D, uint64_t seed,
    const uint64_t* __restrict__ seed_dev, float p, float scale) {
  __shared__ float lanes[kThreads * 4];
  if (seed_dev != nullptr) seed = *seed_dev;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  const bool active = c < D;
  float acc[VEC], bv[VEC];
  zero(acc);
  zero(bv);
  if (active && bias != nullptr) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) bv[e] = __ldg(bias + c + e);
  }
  float g[kGeluUnroll][VEC], hv[kGeluUnroll][VEC];
  walk_rows(
      active ? M : 0, D, c,
      [&](int64_t row0) {
        load_rows(da, row0, M, D, c, g);
        load_rows(h3, row0, M, D, c, hv);
      },
      [&](int u, int64_t off) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[u][e] *= gelu_grad(hv[u][e] + bv[e]);
          if (p > 0.f) g[u][e] *= keep_scale(seed, (uint64_t)(off + e), p, scale);
          acc[e] += g[u][e];
        }
        store_vec<T, VEC>(dh3 + off, g[u]);
        if (dh3_copy != nullptr) store_vec<T, VEC>(dh3_copy + off, g[u]);
      });
  float* mine = lanes + (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
  for (int e = 0; e < VEC; ++e) mine[e] = acc[e];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    float v = acc[e];
    for (int q = 1; q < (int)blockDim.y; ++q) v += lanes[(q * blockDim.x + threadIdx.x) * VEC + e];
    partial[(int64_t)blockIdx.x * D + c + e] = v;
  }
}

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
template <typename T>
__global__ void merge_kernels_kernel(const T* __restrict__ w3, const T* __restrict__ b3, const T* __restrict__ w5,
                                     const T* __restrict__ b5, const T* __restrict__ w7, const T* __restrict__ b7,
                                     const T* __restrict__ bp, float* __restrict__ out, int D) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int t = blockIdx.y;
  if (c >= D) return;
  float v;
  if (t < kTaps) {
    const int u = t / kKernel, w = t % kKernel;
    float s = 0.f;
    if (in_centre(u, w, 3)) s += to_float(w3[(int64_t)c * 9 + centre_index(u, w, 3)]);
    if (in_centre(u, w, 5)) s += to_float(w5[(int64_t)c * 25 + centre_index(u, w, 5)]);
    s += to_float(w7[(int64_t)c * kTaps + t]);
    v = __fdiv_rn(s, 3.f) + (t == kTaps / 2 ? 1.f : 0.f);
  } else if (t == kTaps) {
    v = __fdiv_rn(to_float(b3[c]) + to_float(b5[c]) + to_float(b7[c]), 3.f);
  } else {
    v = to_float(bp[c]);
  }
  out[(int64_t)t * D + c] = v;
}

// dKb (50, D): rows 0..48 the merged kernel's gradient, row 49 its bias's. Block y = tap, or 49: biases.
template <typename T>
__global__ void split_kernel_grad_kernel(const float* __restrict__ dKb, T* __restrict__ dw3, T* __restrict__ db3,
                                         T* __restrict__ dw5, T* __restrict__ db5, T* __restrict__ dw7,
                                         T* __restrict__ db7, int D) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int t = blockIdx.y;
  if (c >= D) return;
  const T g = from_float<T>(__fdiv_rn(dKb[(int64_t)t * D + c], 3.f));
  if (t == kTaps) {
    db3[c] = g;
    db5[c] = g;
    db7[c] = g;
    return;
  }
  const int u = t / kKernel, w = t % kKernel;
  dw7[(int64_t)c * kTaps + t] = g;
  if (in_centre(u, w, 5)) dw5[(int64_t)c * 25 + centre_index(u, w, 5)] = g;
  if (in_centre(u, w, 3)) dw3[(int64_t)c * 9 + centre_index(u, w, 3)] = g;
}

// ---------------------------------------------------------------------------------------------
// out[k] = sum over slots of partial[s][k]: block = 32 columns x 16 slot lanes; lane l sums slots
// l, l + 16, ... in order, then lane 0 adds the 16 lane sums in order.
template <typename T>
__global__ void sum_slots_kernel(const float* __restrict__ partial, T* __restrict__ out, int64_t slots, int64_t n) {
  __shared__ float lanes[16][33];
  const int64_t k = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (k < n) {
    for (int64_t q = threadIdx.y; q < slots; q += 16) s += partial[q * n + k];
  }
  lanes[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && k < n) {
    float total = 0.f;
    for (int l = 0; l < 16; ++l) total += lanes[l][threadIdx.x];
    out[k] = from_float<T>(total);
  }
}

// ---------------------------------------------------------------------------------------------
// Several device-to-device copies in one launch: block row y copies job y, kCopyUnroll 16-byte chunks
// a thread and step when both ends are 16-byte aligned (the tail and unaligned jobs byte by byte).

constexpr int kCopyUnroll = 4;

__global__ void multi_copy_kernel(const CopyList list) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && list.seed_dst != nullptr) *list.seed_dst = list.seed;
  const CopyJob job = list.job[blockIdx.y];
  const char* src = static_cast<const char*>(job.src);
  char* dst = static_cast<char*>(job.dst);
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  int64_t done = 0;
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    const int64_t n16 = job.bytes / 16;
    const uint4* s16 = reinterpret_cast<const uint4*>(src);
    uint4* d16 = reinterpret_cast<uint4*>(dst);
    // kCopyUnroll 16-byte loads a thread in flight before their stores
    int64_t k = tid;
    for (; k + (kCopyUnroll - 1) * stride < n16; k += kCopyUnroll * stride) {
      uint4 v[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) v[u] = s16[k + u * stride];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) d16[k + u * stride] = v[u];
    }
    for (; k < n16; k += stride) d16[k] = s16[k];
    done = n16 * 16;
  }
  for (int64_t k = done + tid; k < job.bytes; k += stride) dst[k] = src[k];
}

}  // namespace

int64_t ln_max_channels(int64_t) { return 2048; }

template <typename T, typename TY>
cudaError_t ln_scale_fwd(const T* x, const float* w, const float* b, const float* gamma, const float* gammax, TY* y,
                         float* mean, float* rstd, int64_t M, int64_t C, float eps, int sms, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const RowShape s = ln_layout(C, aligned(x, 4 * sizeof(T)) && aligned(y, 4 * sizeof(TY)) && aligned(w, 16) &&
                                      aligned(b, 16) && aligned(gamma, 16) && aligned(gammax, 16));
  const dim3 block(s.bx, s.slots_per_block);
  const size_t smem = ln_smem(s, C, false);
  const int blocks = ln_blocks(M, sms);
  pick_row_layout(s, [&](auto vec, auto ch) {
    ln_scale_fwd_kernel<T, TY, decltype(vec)::value, decltype(ch)::value>
        <<<blocks, block, smem, stream>>>(x, w, b, gamma, gammax, y, mean, rstd, M, (int)C, eps);
  });
  return cudaGetLastError();
}

int ln_bwd_slots(int64_t M, int64_t C, int sms) { return ln_blocks(M, sms); }

template <typename T, typename TD>
cudaError_t ln_scale_bwd(const TD* dy, const T* x, const float* w, const float* b, const float* gamma,
                         const float* gammax, const float* mean, const float* rstd, const T* residual, T* dx,
                         float* partial, int slots, int64_t M, int64_t C, cudaStream_t stream) {
  if (M == 0) return cudaMemsetAsync(partial, 0, sizeof(float) * slots * 5 * C, stream);
  const RowShape s = ln_layout(C, aligned(x, 4 * sizeof(T)) && aligned(dy, 4 * sizeof(TD)) &&
                                      aligned(dx, 4 * sizeof(T)) && aligned(residual, 4 * sizeof(T)) &&
                                      aligned(w, 16) && aligned(b, 16) && aligned(gamma, 16) && aligned(gammax, 16));
  const int blocks = slots;  // one partial slot per block
  const dim3 block(s.bx, s.slots_per_block);
  const size_t smem = ln_smem(s, C, true);
  pick_row_layout(s, [&](auto vec, auto ch) {
    ln_scale_bwd_kernel<T, TD, decltype(vec)::value, decltype(ch)::value><<<blocks, block, smem, stream>>>(
        dy, x, w, b, gamma, gammax, mean, rstd, residual, dx, partial, M, (int)C);
  });
  return cudaGetLastError();
}

template <typename T, int R, int MIN_BLOCKS>
cudaError_t launch_conv(const T* h, const float* K, const float* bias, T* out, T* out2, int64_t B, int64_t H,
                        int64_t W, int64_t D, bool flip, cudaStream_t stream) {
  const int vec = D % 4 == 0 && aligned(h, 4 * sizeof(T)) && aligned(out, 4 * sizeof(T)) &&
                          aligned(out2, 4 * sizeof(T)) && aligned(K, 16) && aligned(bias, 16) ? 4 : 1;
  const int64_t groups = D / vec;
  const int bx = (int)std::min<int64_t>(groups, 32);
  const int by = kThreads / bx;
  const int col_tiles = (int)cdiv(W, by), row_tiles = (int)cdiv(H, R);
  const dim3 grid((unsigned)(B * col_tiles * row_tiles), (unsigned)cdiv(groups, bx));
  const dim3 block(bx, by);
  pick<4, 1>(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (flip) {
      dwconv7_kernel<T, V, true, R, MIN_BLOCKS>
          <<<grid, block, 0, stream>>>(h, K, bias, out, out2, (int)H, (int)W, (int)D, col_tiles, row_tiles);
    } else {
      dwconv7_kernel<T, V, false, R, MIN_BLOCKS>
          <<<grid, block, 0, stream>>>(h, K, bias, out, out2, (int)H, (int)W, (int)D, col_tiles, row_tiles);
    }
  });
  return cudaGetLastError();
}

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

// kByShape: the shared-memory tiles from maps of these many pixels, the register kernels below.
// Same-call A/B in the adapter (bf16 H200, GPU time of fwd+bwd): the
// tiles took 0.77x at 2x200x336, 0.81x at 32x56x56 and 0.86-0.90x at 128x128, 100x168 and 50x84;
// at 14x14 they cost 5%; at 32x32 the wgrad's gained 2% and the conv's lost 2%. With at least
// kConvBusyTiles tiles an SM, the conv tiles held to 64 registers (4 blocks an SM) took 1-4% less
// (0.758 / 0.799 / 0.827 against 0.766 / 0.808 / 0.858 ms at 2x200x336, 32x56x56, 4x128x128);
// with fewer (2x50x84, 84 tiles) 1% more, and the kernel alone 9% more at 32x28x28 (256 tiles).
constexpr int kUseDefault = -1, kByShape = -2;
constexpr int64_t kConvTileMinPixels = 2048, kWgradTileMinPixels = 1024, kConvBusyTiles = 2;
// The tile (rows x columns a block) of the conv variants chosen by shape, 4 and 7.
constexpr int kConvTileRows = 8, kConvTileCols = 16;
static std::atomic<int> default_conv_variant{kByShape}, default_wgrad_variant{kByShape};

std::pair<int, int> dwconv7_defaults(int conv, int wgrad) {
  const std::pair<int, int> old(default_conv_variant.load(), default_wgrad_variant.load());
  if (conv != kUseDefault) default_conv_variant = conv;
  if (wgrad != kUseDefault) default_wgrad_variant = wgrad;
  return old;
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

template <typename T, int TH, int TW, int R, int Q, int MIN_BLOCKS = 1>
cudaError_t launch_conv_smem(const T* h, const float* K, const float* bias, T* out, T* out2, int64_t B, int64_t H,
                             int64_t W, int64_t D, bool flip, cudaStream_t stream) {
  const int col_tiles = (int)cdiv(W, TW), row_tiles = (int)cdiv(H, TH);
  const dim3 grid((unsigned)(B * col_tiles * row_tiles), (unsigned)cdiv(D, kTileChannels));
  const dim3 block(kPairs, (TH / R) * (TW / Q));
  constexpr size_t smem = conv_smem_bytes<T, TH, TW>();
  if (!smem_available(smem)) return dwconv7_fwd<T>(h, K, bias, out, out2, B, H, W, D, flip, 0, stream);
  auto kernel = flip ? dwconv7_smem_kernel<T, true, TH, TW, R, Q, MIN_BLOCKS>
                     : dwconv7_smem_kernel<T, false, TH, TW, R, Q, MIN_BLOCKS>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, block, smem, stream>>>(h, K, bias, out, out2, (int)H, (int)W, (int)D, col_tiles, row_tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dwconv7_fwd(const T* h, const float* K, const float* bias, T* out, T* out2, int64_t B, int64_t H,
                        int64_t W, int64_t D, bool flip, int variant, cudaStream_t stream) {
  if (B * H * W * D == 0) return cudaSuccess;
  if (variant == kUseDefault) variant = default_conv_variant.load(std::memory_order_relaxed);
  if (variant < 0) {
    const int64_t tiles = B * cdiv(H, kConvTileRows) * cdiv(W, kConvTileCols) * cdiv(D, kTileChannels);
    const int64_t sms = current_device_attr<cudaDevAttrMultiProcessorCount>();
    variant = H * W < kConvTileMinPixels ? 0 : tiles >= kConvBusyTiles * sms ? 7 : 4;
  }
  if (variant >= 4 && !smem_tiles_fit<T>(D, {h, out, out2})) variant = 0;
  switch (variant) {
    case 4: return launch_conv_smem<T, kConvTileRows, kConvTileCols, 2, 8>(h, K, bias, out, out2, B, H, W, D, flip,
                                                                           stream);
    case 5: return launch_conv_smem<T, 8, 16, 4, 4>(h, K, bias, out, out2, B, H, W, D, flip, stream);
    case 6: return launch_conv_smem<T, 8, 32, 2, 8>(h, K, bias, out, out2, B, H, W, D, flip, stream);
    case 7: return launch_conv_smem<T, kConvTileRows, kConvTileCols, 2, 8, 4>(h, K, bias, out, out2, B, H, W, D, flip,
                                                                              stream);
    case 8: return launch_conv_smem<T, 8, 32, 2, 8, 2>(h, K, bias, out, out2, B, H, W, D, flip, stream);
    // measured on the H200 at 2x200x336x64 bf16: 87, 123, 93 and 140 us
    case 1: return launch_conv<T, 8, 2>(h, K, bias, out, out2, B, H, W, D, flip, stream);
    case 2: return launch_conv<T, 4, 4>(h, K, bias, out, out2, B, H, W, D, flip, stream);
    case 3: return launch_conv<T, 6, 2>(h, K, bias, out, out2, B, H, W, D, flip, stream);
    default: return launch_conv<T, 4, 3>(h, K, bias, out, out2, B, H, W, D, flip, stream);
  }
}

int wgrad_slots(int64_t B, int64_t H, int64_t W, int sms) {
  const WgradShape s = wgrad_shape(B, H, W);
  return (int)std::max<int64_t>(1, std::min<int64_t>(s.units, 8 * (int64_t)sms));
}

template <typename T, int TH, int TW>
cudaError_t launch_wgrad_smem(const T* h, const T* dout, float* partial, int slots, int64_t B, int64_t H, int64_t W,
                              int64_t D, cudaStream_t stream) {
  const int col_tiles = (int)cdiv(W, TW), row_tiles = (int)cdiv(H, TH);
  const dim3 grid((unsigned)slots, (unsigned)cdiv(D, kTileChannels));  // one partial slot per block
  const dim3 block(kPairs, kKernel);
  constexpr size_t smem = wgrad_smem_bytes<T, TH, TW>();
  auto kernel = dwconv7_wgrad_smem_kernel<T, TH, TW>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, block, smem, stream>>>(h, dout, partial, (int)H, (int)W, (int)D, col_tiles, row_tiles,
                                        B * col_tiles * row_tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dwconv7_wgrad(const T* h, const T* dout, float* partial, int slots, int64_t B, int64_t H, int64_t W,
                          int64_t D, int variant, cudaStream_t stream) {
  const WgradShape s = wgrad_shape(B, H, W);
  if (D == 0) return cudaSuccess;
  if (variant == kUseDefault) variant = default_wgrad_variant.load(std::memory_order_relaxed);
  if (variant < 0) variant = H * W >= kWgradTileMinPixels ? 2 : 0;
  if (variant >= 2 && smem_tiles_fit<T>(D, {h, dout})) {
    if (variant == 3 && smem_available(wgrad_smem_bytes<T, 4, 32>()))
      return launch_wgrad_smem<T, 4, 32>(h, dout, partial, slots, B, H, W, D, stream);
    if (variant != 3 && smem_available(wgrad_smem_bytes<T, 8, 16>()))
      return launch_wgrad_smem<T, 8, 16>(h, dout, partial, slots, B, H, W, D, stream);
  }
  const int want = variant == 1 ? 2 : 4;  // channels a thread: 4 (default) or 2 (fewer registers)
  const int vec = D % want == 0 && aligned(h, want * sizeof(T)) && aligned(dout, want * sizeof(T)) ? want : 1;
  const int64_t groups = D / vec;
  const int bx = (int)std::min<int64_t>(groups, 32);
  const dim3 grid((unsigned)slots, (unsigned)cdiv(groups, bx));  // one partial slot per block
  const dim3 block(bx, kWgradRows);
  pick<4, 2, 1>(vec, [&](auto v) {
    dwconv7_wgrad_kernel<T, decltype(v)::value><<<grid, block, 0, stream>>>(
        h, dout, partial, (int)H, (int)W, (int)D, s.seg_len, s.segs_per_row, s.units);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t gelu_dropout_fwd(const T* h3, const float* bias, T* a, int64_t M, int64_t D, uint64_t seed,
                             const uint64_t* seed_dev, float p, cudaStream_t stream) {
  if (M * D == 0) return cudaSuccess;
  const float scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const ColShape s = col_shape(D, sizeof(T), h3, a, nullptr, nullptr);
  const int64_t row_blocks = std::min<int64_t>(cdiv(M, (int64_t)s.by * kGeluUnroll), 65535);
  const dim3 grid((unsigned)row_blocks, (unsigned)cdiv(D / s.vec, s.bx));
  const dim3 block(s.bx, s.by);
  pick<4, 1>(s.vec, [&](auto v) {
    gelu_dropout_fwd_kernel<T, decltype(v)::value>
        <<<grid, block, 0, stream>>>(h3, bias, a, M, (int)D, seed, seed_dev, p, scale);
  });
  return cudaGetLastError();
}

int gelu_bwd_slots(int64_t M, int64_t, int sms) {
  return (int)std::max<int64_t>(1, std::min<int64_t>(cdiv(M, 16), kGeluBwdBlocks * (int64_t)sms));
}

template <typename T>
cudaError_t gelu_dropout_bwd(const T* da, const T* h3, const float* bias, T* dh3, T* dh3_copy, float* partial,
                             int slots, int64_t M, int64_t D, uint64_t seed, const uint64_t* seed_dev, float p,
                             cudaStream_t stream) {
  if (M * D == 0) return cudaMemsetAsync(partial, 0, sizeof(float) * slots * D, stream);
  const float scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const ColShape s = col_shape(D, sizeof(T), da, h3, dh3, dh3_copy);
  const dim3 grid((unsigned)slots, (unsigned)cdiv(D / s.vec, s.bx));  // one partial slot per block
  const dim3 block(s.bx, s.by);
  pick<4, 1>(s.vec, [&](auto v) {
    gelu_dropout_bwd_kernel<T, decltype(v)::value>
        <<<grid, block, 0, stream>>>(da, h3, bias, dh3, dh3_copy, partial, M, (int)D, seed, seed_dev, p, scale);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t merge_kernels(const T* w3, const T* b3, const T* w5, const T* b5, const T* w7, const T* b7, const T* bp,
                          float* out, int64_t D, cudaStream_t stream) {
  if (D == 0) return cudaSuccess;
  merge_kernels_kernel<T><<<dim3((unsigned)cdiv(D, 64), kTaps + 2), 64, 0, stream>>>(w3, b3, w5, b5, w7, b7, bp, out,
                                                                                     (int)D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t split_kernel_grad(const float* dKb, T* dw3, T* db3, T* dw5, T* db5, T* dw7, T* db7, int64_t D,
                              cudaStream_t stream) {
  if (D == 0) return cudaSuccess;
  split_kernel_grad_kernel<T><<<dim3((unsigned)cdiv(D, 64), kTaps + 1), 64, 0, stream>>>(dKb, dw3, db3, dw5, db5,
                                                                                         dw7, db7, (int)D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sum_slots(const float* partial, T* out, int64_t slots, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  sum_slots_kernel<T><<<(unsigned)cdiv(n, 32), dim3(32, 16), 0, stream>>>(partial, out, slots, n);
  return cudaGetLastError();
}

cudaError_t multi_copy(const CopyList& list, int sms, cudaStream_t stream) {
  if (list.n <= 0 && list.seed_dst == nullptr) return cudaSuccess;
  int64_t most = 0;
  for (int k = 0; k < list.n; ++k) most = std::max<int64_t>(most, list.job[k].bytes);
  // about 64 KiB a block, and at most four blocks an SM for the largest job: with two blocks of one
  // 16-byte load a thread the copies moved 2.2 TB/s on an H200, with this 2.5
  const unsigned blocks = (unsigned)std::max<int64_t>(1, std::min<int64_t>(cdiv(most, 64 * 1024), 4 * (int64_t)sms));
  multi_copy_kernel<<<dim3(blocks, std::max(list.n, 1)), kThreads, 0, stream>>>(list);
  return cudaGetLastError();
}

// The LN kernels for tokens in T and y / dy in T2 (T itself, or a half type beside float tokens).
#define MONA_INSTANTIATE_LN(T, T2)                                                                               \
  template cudaError_t ln_scale_fwd<T, T2>(const T*, const float*, const float*, const float*, const float*,   \
                                           T2*, float*, float*, int64_t, int64_t, float, int, cudaStream_t);     \
  template cudaError_t ln_scale_bwd<T, T2>(const T2*, const T*, const float*, const float*, const float*,      \
                                           const float*, const float*, const float*, const T*, T*, float*, int,  \
                                           int64_t, int64_t, cudaStream_t);

MONA_INSTANTIATE_LN(float, float)
MONA_INSTANTIATE_LN(__half, __half)
MONA_INSTANTIATE_LN(__nv_bfloat16, __nv_bfloat16)
MONA_INSTANTIATE_LN(float, __half)
MONA_INSTANTIATE_LN(float, __nv_bfloat16)

#define MONA_INSTANTIATE(T)                                                                                      \
  template cudaError_t dwconv7_fwd<T>(const T*, const float*, const float*, T*, T*, int64_t, int64_t, int64_t,  \
                                      int64_t, bool, int, cudaStream_t);                                         \
  template cudaError_t dwconv7_wgrad<T>(const T*, const T*, float*, int, int64_t, int64_t, int64_t, int64_t,    \
                                        int, cudaStream_t);                                                      \
  template cudaError_t gelu_dropout_fwd<T>(const T*, const float*, T*, int64_t, int64_t, uint64_t,             \
                                           const uint64_t*, float, cudaStream_t);                                \
  template cudaError_t gelu_dropout_bwd<T>(const T*, const T*, const float*, T*, T*, float*, int, int64_t,      \
                                           int64_t, uint64_t, const uint64_t*, float, cudaStream_t);             \
  template cudaError_t sum_slots<T>(const float*, T*, int64_t, int64_t, cudaStream_t);                           \
  template cudaError_t merge_kernels<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*,   \
                                        float*, int64_t, cudaStream_t);                                          \
  template cudaError_t split_kernel_grad<T>(const float*, T*, T*, T*, T*, T*, T*, int64_t, cudaStream_t);

MONA_INSTANTIATE(float)
MONA_INSTANTIATE(__half)
MONA_INSTANTIATE(__nv_bfloat16)

}  // namespace mona
