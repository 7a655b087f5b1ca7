// CUDA fallback kernels for GPUs where the Triton path cannot run (see mona_kernels.h).
#include "mona_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mona {
namespace {

constexpr int kThreads = 256;
constexpr int kTaps = 49;
constexpr int kKernel = 7;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum of v over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < (int)(blockDim.x / 32); ++i) total += scratch[i];
  return total;
}

// One block per row: two passes for mean and variance, a third writes y.
template <typename T>
__global__ void ln_scale_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                                    const float* __restrict__ gamma, const float* __restrict__ gammax, T* __restrict__ y,
                                    float* __restrict__ mean, float* __restrict__ rstd, int64_t C, float eps) {
  __shared__ float scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += to_float(xr[c]);
  const float mu = block_sum(s, scratch) / C;
  float q = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float d = to_float(xr[c]) - mu;
    q += d * d;
  }
  const float rs = rsqrtf(block_sum(q, scratch) / C + eps);
  T* yr = y + row * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float xv = to_float(xr[c]);
    yr[c] = from_float<T>(((xv - mu) * rs * w[c] + b[c]) * gamma[c] + xv * gammax[c]);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Grid-stride over rows; thread t owns columns t, t + blockDim, ... of this program's partial row, so
// its read-modify-writes never race and the sums are deterministic.
template <typename T>
__global__ void ln_scale_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ b, const float* __restrict__ gamma,
                                    const float* __restrict__ gammax, const float* __restrict__ mean,
                                    const float* __restrict__ rstd, const T* __restrict__ residual, T* __restrict__ dx,
                                    float* __restrict__ partial, int64_t M, int64_t C) {
  __shared__ float scratch[kThreads / 32];
  const int64_t stride = (int64_t)gridDim.x * C;
  float* p_gamma = partial + (int64_t)blockIdx.x * C;
  float* p_gammax = p_gamma + stride;
  float* p_w = p_gammax + stride;
  float* p_b = p_w + stride;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    const float mu = mean[row], rs = rstd[row];
    float st = 0.f, stx = 0.f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float xn = (to_float(xr[c]) - mu) * rs;
      const float t = to_float(dyr[c]) * gamma[c] * w[c];
      st += t;
      stx += t * xn;
    }
    const float mean_t = block_sum(st, scratch) / C;
    const float mean_txn = block_sum(stx, scratch) / C;
    T* dxr = dx + row * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float xv = to_float(xr[c]), g = to_float(dyr[c]);
      const float xn = (xv - mu) * rs;
      float v = g * gammax[c] + rs * (g * gamma[c] * w[c] - mean_t - xn * mean_txn);
      if (residual != nullptr) v += to_float(residual[row * C + c]);
      dxr[c] = from_float<T>(v);
      p_gamma[c] += g * (xn * w[c] + b[c]);
      p_gammax[c] += g * xv;
      p_w[c] += g * gamma[c] * xn;
      p_b[c] += g * gamma[c];
    }
  }
}

// One thread per (pixel, channel); consecutive threads read consecutive channels.
template <typename T>
__global__ void dwconv7_fwd_kernel(const T* __restrict__ h, const float* __restrict__ K, const float* __restrict__ bias,
                                   T* __restrict__ out, int64_t H, int64_t W, int64_t D, int64_t total) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t ch = idx % D;
  const int64_t pix = idx / D;
  const int64_t j = pix % W, i = (pix / W) % H;
  float acc = bias != nullptr ? bias[ch] : 0.f;
#pragma unroll
  for (int u = 0; u < kKernel; ++u) {
    const int64_t ii = i + u - kKernel / 2;
    if (ii < 0 || ii >= H) continue;
#pragma unroll
    for (int v = 0; v < kKernel; ++v) {
      const int64_t jj = j + v - kKernel / 2;
      if (jj < 0 || jj >= W) continue;
      acc += K[(u * kKernel + v) * D + ch] * to_float(h[idx + ((ii - i) * W + (jj - j)) * D]);
    }
  }
  out[idx] = from_float<T>(acc);
}

// Block = (channel chunk of blockDim.x threads) x one tile of `tile_pixels` consecutive pixels; each
// thread keeps the 49 tap sums of its channel in registers (compile-time indices) and writes them once.
template <typename T>
__global__ void dwconv7_wgrad_kernel(const T* __restrict__ h, const T* __restrict__ dout, float* __restrict__ partial,
                                     int64_t H, int64_t W, int64_t D, int64_t n_pix, int64_t tile_pixels) {
  const int64_t ch = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
  if (ch >= D) return;
  const int64_t tile = blockIdx.x;
  float acc[kTaps + 1];
#pragma unroll
  for (int t = 0; t <= kTaps; ++t) acc[t] = 0.f;
  const int64_t end = min(n_pix, (tile + 1) * tile_pixels);
  for (int64_t pix = tile * tile_pixels; pix < end; ++pix) {
    const int64_t j = pix % W, i = (pix / W) % H;
    const float g = to_float(dout[pix * D + ch]);
    acc[kTaps] += g;
#pragma unroll
    for (int u = 0; u < kKernel; ++u) {
      const int64_t ii = i + u - kKernel / 2;
#pragma unroll
      for (int v = 0; v < kKernel; ++v) {
        const int64_t jj = j + v - kKernel / 2;
        if (ii >= 0 && ii < H && jj >= 0 && jj < W)
          acc[u * kKernel + v] += g * to_float(h[(pix + (ii - i) * W + (jj - j)) * D + ch]);
      }
    }
  }
  float* out = partial + tile * (kTaps + 1) * D + ch;
#pragma unroll
  for (int t = 0; t <= kTaps; ++t) out[t * D] = acc[t];
}

}  // namespace

template <typename T>
cudaError_t ln_scale_fwd(const T* x, const float* w, const float* b, const float* gamma, const float* gammax, T* y,
                         float* mean, float* rstd, int64_t M, int64_t C, float eps, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  ln_scale_fwd_kernel<T><<<(unsigned)M, kThreads, 0, stream>>>(x, w, b, gamma, gammax, y, mean, rstd, C, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ln_scale_bwd(const T* dy, const T* x, const float* w, const float* b, const float* gamma,
                         const float* gammax, const float* mean, const float* rstd, const T* residual, T* dx,
                         float* partial, int programs, int64_t M, int64_t C, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  ln_scale_bwd_kernel<T><<<programs, kThreads, 0, stream>>>(dy, x, w, b, gamma, gammax, mean, rstd, residual, dx,
                                                            partial, M, C);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dwconv7_fwd(const T* h, const float* K, const float* bias, T* out, int64_t B, int64_t H, int64_t W,
                        int64_t D, cudaStream_t stream) {
  const int64_t total = B * H * W * D;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  dwconv7_fwd_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(h, K, bias, out, H, W, D, total);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dwconv7_wgrad(const T* h, const T* dout, float* partial, int64_t B, int64_t H, int64_t W, int64_t D,
                          int64_t tile_pixels, cudaStream_t stream) {
  const int64_t n_pix = B * H * W;
  if (n_pix == 0) return cudaSuccess;
  const int threads = D < 128 ? (int)((D + 31) / 32 * 32) : 128;
  const dim3 grid((unsigned)((n_pix + tile_pixels - 1) / tile_pixels), (unsigned)((D + threads - 1) / threads));
  dwconv7_wgrad_kernel<T><<<grid, threads, 0, stream>>>(h, dout, partial, H, W, D, n_pix, tile_pixels);
  return cudaGetLastError();
}

#define MONA_INSTANTIATE(T)                                                                                      \
  template cudaError_t ln_scale_fwd<T>(const T*, const float*, const float*, const float*, const float*, T*,    \
                                       float*, float*, int64_t, int64_t, float, cudaStream_t);                   \
  template cudaError_t ln_scale_bwd<T>(const T*, const T*, const float*, const float*, const float*,            \
                                       const float*, const float*, const float*, const T*, T*, float*, int,      \
                                       int64_t, int64_t, cudaStream_t);                                          \
  template cudaError_t dwconv7_fwd<T>(const T*, const float*, const float*, T*, int64_t, int64_t, int64_t,      \
                                      int64_t, cudaStream_t);                                                    \
  template cudaError_t dwconv7_wgrad<T>(const T*, const T*, float*, int64_t, int64_t, int64_t, int64_t,         \
                                        int64_t, cudaStream_t);

MONA_INSTANTIATE(float)
MONA_INSTANTIATE(__half)
MONA_INSTANTIATE(__nv_bfloat16)

}  // namespace mona
