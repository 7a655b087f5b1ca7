// What the torch-facing sources share: argument checks, dtype dispatch to the kernels' element types,
// raw pointers, the current stream, and the slot-order reduction of partial sums.
#pragma once
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "mona.h"

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

// The dropout seed: one int64 on the input's device, read there by the kernels.
inline void check_seed(const torch::Tensor& seed, const torch::Tensor& like) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == like.device(),
              "seed must be one int64 on ", like.device(), ", got ", seed.scalar_type(), " with ", seed.numel(),
              " elements on ", seed.device());
}

inline mona::Dropout dropout(const std::optional<torch::Tensor>& seed, double p) {
  return {0, seed.has_value() ? reinterpret_cast<const uint64_t*>(seed->data_ptr()) : nullptr, (float)p};
}

// The adapter's sixteen parameters in the authors' state_dict order.
constexpr int kParams = 16;
using Params = std::array<torch::Tensor, kParams>;
enum Param { kWln, kBln, kGamma, kGammax, kW1, kB1, kW3, kB3, kW5, kB5, kW7, kB7, kWp, kBp, kW2, kB2 };

}  // namespace mona_glue

// The CUDA backend's plan of the whole adapter (adapter.cpp); binding.cpp checks the arguments.
// x is (M, C) tokens, M = B * H * W; seed, when given, is the dropout seed as one int64 on x's device.
namespace mona_plan {

// (out, h1, mean, rstd): out in x's dtype promoted with the compute dtype cdt, h1 in cdt.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> forward(
    const torch::Tensor& x, const mona_glue::Params& P, int64_t H, int64_t W, double eps, double p,
    const std::optional<torch::Tensor>& seed, at::ScalarType cdt);

// dx, then the sixteen parameter gradients in their parameters' dtypes and shapes; g is (M, C).
std::vector<torch::Tensor> backward(const torch::Tensor& g, const torch::Tensor& x, const torch::Tensor& h1,
                                    const torch::Tensor& mean, const torch::Tensor& rstd,
                                    const mona_glue::Params& P, int64_t H, int64_t W, double eps, double p,
                                    const std::optional<torch::Tensor>& seed);

}  // namespace mona_plan
