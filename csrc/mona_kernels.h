// Launchers of the CUDA fallback kernels. Plain CUDA (no torch headers), so that every
// architecture in the build list can be compile-checked on a machine without a GPU.
// Layout contract: rows/tokens row-major, channels last and contiguous; T is float, __half or
// __nv_bfloat16; parameter vectors, mean/rstd, merged kernel K (49, D) and partials are float.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace mona {

template <typename T>
cudaError_t ln_scale_fwd(const T* x, const float* w, const float* b, const float* gamma, const float* gammax,
                         T* y, float* mean, float* rstd, int64_t M, int64_t C, float eps, cudaStream_t stream);

// dx = LN-scaling backward (+ residual when not null); partial (4, programs, C) must be zeroed and
// receives per-program column sums of (dy*(xn*w+b), dy*x, dy*gamma*xn, dy*gamma).
template <typename T>
cudaError_t ln_scale_bwd(const T* dy, const T* x, const float* w, const float* b, const float* gamma,
                         const float* gammax, const float* mean, const float* rstd, const T* residual, T* dx,
                         float* partial, int programs, int64_t M, int64_t C, cudaStream_t stream);

// out = conv7(h, K) (+ bias when not null), zero "same" padding, depthwise over (H, W).
template <typename T>
cudaError_t dwconv7_fwd(const T* h, const float* K, const float* bias, T* out, int64_t B, int64_t H, int64_t W,
                        int64_t D, cudaStream_t stream);

// partial (tiles, 50, D): rows 0..48 sum over a tile of dout * h shifted by the tap, row 49 sum of dout.
template <typename T>
cudaError_t dwconv7_wgrad(const T* h, const T* dout, float* partial, int64_t B, int64_t H, int64_t W, int64_t D,
                          int64_t tile_pixels, cudaStream_t stream);

}  // namespace mona
