// Launchers of the CUDA fallback kernels (forward.cu and backward.cu). Plain CUDA (no torch headers), so that every
// architecture in the build list can be compile-checked on a machine without a GPU.
// Layout contract: rows/tokens row-major, channels last and contiguous; T is float, __half or
// __nv_bfloat16; parameter vectors, mean/rstd, the merged kernel K (49, D) and partial sums are float.
// Weight and bias gradients are written as per-slot partial sums (slots, rows, n) that sum_slots
// reduces in a fixed order, so every result is deterministic. `*_slots` give the slot count to
// allocate for a problem on a GPU with `sms` multiprocessors.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace mona {

// The four LN-scaling parameter vectors, C floats each.
struct LnWeights {
  const float* w;
  const float* b;
  const float* gamma;
  const float* gammax;
};

// A channels-last map: B images of H x W pixels with D channels, contiguous.
struct Map {
  int64_t B, H, W, D;
};

// The dropout of the GELU kernels: the multiplier of each element is a hash of (seed, flat index);
// seed_dev, when not null, holds the seed on the device (read at run time, so that a captured CUDA
// graph takes a new seed at each replay) and replaces `seed`. p == 0 keeps every element.
struct Dropout {
  uint64_t seed;
  const uint64_t* seed_dev;
  float p;
};

// Widest row the LN-scaling kernels take (2048: one chunk of 512 threads with 4 channels each, or
// four chunks of 512 threads with one channel each).
int64_t ln_max_channels(int64_t C);

// mean and rstd may be null (a recompute that wants y only). y is in TY: T, or for float tokens also
// __half or __nv_bfloat16 (the projections' dtype under autocast).
template <typename T, typename TY = T>
cudaError_t ln_scale_fwd(const T* x, LnWeights pw, TY* y, float* mean, float* rstd, int64_t M, int64_t C, float eps,
                         int sms, cudaStream_t stream);

// dx = LN-scaling backward (+ residual when not null); partial (slots, 5, C) receives column sums of
// (dy*(xn*w+b), dy*x, dy*gamma*xn, dy*gamma, residual) per slot (the fifth row 0 without residual).
// dy is in TD: T, or for float tokens also __half or __nv_bfloat16.
int ln_bwd_slots(int64_t M, int64_t C, int sms);
template <typename T, typename TD = T>
cudaError_t ln_scale_bwd(const TD* dy, const T* x, LnWeights pw, const float* mean, const float* rstd,
                         const T* residual, T* dx, float* partial, int slots, int64_t M, int64_t C,
                         cudaStream_t stream);

// out = conv7(h, K or K rotated by 180 degrees when flip) (+ bias when not null), zero "same"
// padding, depthwise over (H, W); out2, when not null, receives a second copy (the accumulator of a
// following in-place GEMM). `variant` picks a tiling:
// 0-3 register rows, 4-8 shared-memory tiles; a negative variant chooses by the map's size (the
// adapter's). Every variant computes the same sums, the shared-memory tiles in another order.
template <typename T>
cudaError_t dwconv7_fwd(const T* h, const float* K, const float* bias, T* out, T* out2, const Map& m, bool flip,
                        int variant, cudaStream_t stream);

// partial (slots, 50, D): rows 0..48 sum dout * h shifted by the tap, row 49 sums dout. `variant`:
// 0 four channels a thread, 1 two, 2-3 shared-memory tiles; negative as for the conv.
int wgrad_slots(const Map& m, int sms);
template <typename T>
cudaError_t dwconv7_wgrad(const T* h, const T* dout, float* partial, int slots, const Map& m, int variant,
                          cudaStream_t stream);

// a = gelu(h3 + bias) * m over (M, D), m the dropout multiplier for flat element index and seed (0 or
// 1/(1-p)); bias (D) may be null.
template <typename T>
cudaError_t gelu_dropout_fwd(const T* h3, const float* bias, T* a, int64_t M, int64_t D, const Dropout& drop,
                             cudaStream_t stream);

// dh3 = da * m * gelu'(h3 + bias), also into dh3_copy when not null; partial (slots, 1, D) receives
// per-slot column sums of dh3 (fp32).
int gelu_bwd_slots(int64_t M, int64_t D, int sms);
template <typename T>
cudaError_t gelu_dropout_bwd(const T* da, const T* h3, const float* bias, T* dh3, T* dh3_copy, float* partial,
                             int slots, int64_t M, int64_t D, const Dropout& drop, cudaStream_t stream);

// out (51, D) float: rows 0..48 the merged kernel delta + (pad(w3) + pad(w5) + w7) / 3 taps-major, row
// 49 the merged bias (b3 + b5 + b7) / 3, row 50 bp. Weights (D, 1, k, k), biases (D).
template <typename T>
cudaError_t merge_kernels(const T* w3, const T* b3, const T* w5, const T* b5, const T* w7, const T* b7, const T* bp,
                          float* out, int64_t D, cudaStream_t stream);

// The six conv weight and bias gradients from dKb (50, D) (merged kernel rows, then its bias):
// dw7 = dK / 3, dw5 and dw3 its centre 5x5 and 3x3 / 3, each db = dbias / 3.
template <typename T>
cudaError_t split_kernel_grad(const float* dKb, T* dw3, T* db3, T* dw5, T* db5, T* dw7, T* db7, int64_t D,
                              cudaStream_t stream);

// out[k] = sum over s of partial[s * n + k], in slot order, rounded once to T.
template <typename T>
cudaError_t sum_slots(const float* partial, T* out, int64_t slots, int64_t n, cudaStream_t stream);

}  // namespace mona
