// What the torch-facing sources share: argument checks, dtype dispatch to the kernels' element types,
// raw pointers, the current stream, and the slot-order reduction of partial sums.
#pragma once
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include "mona_kernels.h"

namespace mona_glue {

constexpr int64_t kTaps = 49;

inline void check_input(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have rank ", dim, ", got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
              " must be float32, float16 or bfloat16 for the CUDA backend, got ", s);
}

inline torch::Tensor as_float_vector(const torch::Tensor& p, const char* name, int64_t n, const torch::Tensor& like) {
  TORCH_CHECK(p.device() == like.device(), name, " is on ", p.device(), " but the input is on ", like.device());
  TORCH_CHECK(p.numel() == n, name, " must have ", n, " elements, got ", p.numel());
  return p.to(at::kFloat).contiguous();
}

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// Calls fn with a null pointer of the kernel element type matching `s`.
template <typename Fn>
inline void dispatch(at::ScalarType s, Fn&& fn) {
  switch (s) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kHalf: fn(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "unsupported dtype ", s);
  }
}

template <typename T>
inline T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

inline int sm_count(const torch::Tensor& t) {
  int sms = 1;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.device().index()), "device query");
  return sms;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The sum over slots of a (slots, *shape) float partial buffer, in slot order, as a `shape` tensor of
// dtype `out_dtype` on the device of `like`.
inline torch::Tensor sum_slots(const float* partial, int64_t slots, at::IntArrayRef shape, const torch::Tensor& like,
                               at::ScalarType out_dtype = at::kFloat) {
  auto out = torch::empty(shape, like.options().dtype(out_dtype));
  dispatch(out_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::sum_slots<T>(partial, ptr<T>(out), slots, out.numel(), current_stream()), "sum_slots");
  });
  return out;
}

inline torch::Tensor sum_slots(const torch::Tensor& partial, at::ScalarType out_dtype = at::kFloat) {
  return sum_slots(ptr<float>(partial), partial.size(0), partial.sizes().slice(1), partial, out_dtype);
}

inline void check_channels(int64_t C) {
  TORCH_CHECK(C <= mona::ln_max_channels(C), "x has ", C, " channels; the CUDA backend takes at most ",
              mona::ln_max_channels(C));
}

}  // namespace mona_glue

// The whole adapter with its own C++ autograd node (adapter.cpp). seed_dev, when given, holds the
// dropout seed on the device (read at run time, so a caller's CUDA graph draws a new mask each replay)
// and replaces `seed`.
torch::Tensor mona_adapter(torch::Tensor x, int64_t B, int64_t H, int64_t W, torch::Tensor w_ln, torch::Tensor b_ln,
                           torch::Tensor gamma, torch::Tensor gammax, torch::Tensor W1, torch::Tensor b1,
                           torch::Tensor w3, torch::Tensor b3, torch::Tensor w5, torch::Tensor b5, torch::Tensor w7,
                           torch::Tensor b7, torch::Tensor Wp, torch::Tensor bp, torch::Tensor W2, torch::Tensor b2,
                           double eps, double p, int64_t seed, std::optional<torch::Tensor> seed_dev,
                           at::ScalarType compute_dtype);

// Sets the CUDA-graph cache's capacity (entries; 0 turns the graphs off, fewer entries evicts the least
// recently used) unless capacity < 0, and returns the previous capacity (adapter.cpp).
int64_t graph_cache(int64_t capacity);
