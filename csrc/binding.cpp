// The CUDA backend's torch operators (namespace mona_kernels, names starting cuda_): argument
// checks, dtype dispatch and allocation for the standalone kernels, and the checks in front of the
// adapter's plan (adapter.cpp). The kernels are in forward.cu and backward.cu and know nothing of
// torch. Registered with TORCH_LIBRARY, so torch.compile sees each op with no graph break; their
// shapes for tracing and the adapter's autograd are registered in Python
// (mona_kernels/backends/cuda.py).
#include <torch/library.h>

#include "glue.h"

namespace {

using namespace mona_glue;

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> ln_scale_fwd(const torch::Tensor& x, const torch::Tensor& w,
                                                                     const torch::Tensor& b, const torch::Tensor& gamma,
                                                                     const torch::Tensor& gammax, double eps) {
  check_input(x, "x", 2);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), C = x.size(1);
  check_channels(C);
  auto wf = as_float_vector(w, "weight", C, x), bf = as_float_vector(b, "bias", C, x);
  auto gf = as_float_vector(gamma, "gamma", C, x), gxf = as_float_vector(gammax, "gammax", C, x);
  auto y = torch::empty_like(x);
  auto opts = x.options().dtype(at::kFloat);
  auto mean = torch::empty({M}, opts), rstd = torch::empty({M}, opts);
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const mona::LnWeights pw{ptr<float>(wf), ptr<float>(bf), ptr<float>(gf), ptr<float>(gxf)};
    check_cuda(mona::ln_scale_fwd<T>(ptr<T>(x), pw, ptr<T>(y), ptr<float>(mean), ptr<float>(rstd), M, C, (float)eps,
                                     sm_count(x), current_stream()),
               "ln_scale_fwd");
  });
  return {y, mean, rstd};
}

// (dx, (5, C) column sums: dgamma, dgammax, dw_ln, db_ln, sum of residual (zeros without one)).
std::tuple<torch::Tensor, torch::Tensor> ln_scale_bwd(const torch::Tensor& dy, const torch::Tensor& x,
                                                      const torch::Tensor& w, const torch::Tensor& b,
                                                      const torch::Tensor& gamma, const torch::Tensor& gammax,
                                                      const torch::Tensor& mean, const torch::Tensor& rstd,
                                                      const std::optional<torch::Tensor>& residual) {
  check_input(x, "x", 2);
  check_input(dy, "dy", 2);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "dy must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), C = x.size(1);
  check_channels(C);
  auto wf = as_float_vector(w, "weight", C, x), bf = as_float_vector(b, "bias", C, x);
  auto gf = as_float_vector(gamma, "gamma", C, x), gxf = as_float_vector(gammax, "gammax", C, x);
  auto meanf = as_float_vector(mean, "mean", M, x), rstdf = as_float_vector(rstd, "rstd", M, x);
  torch::Tensor res;
  if (residual.has_value()) {
    res = residual->to(x.scalar_type()).contiguous();
    TORCH_CHECK(res.sizes() == x.sizes(), "residual must match x in shape");
  }
  const int slots = mona::ln_bwd_slots(M, C, sm_count(x));
  auto dx = torch::empty_like(x);
  auto partial = torch::empty({slots, 5, C}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const mona::LnWeights pw{ptr<float>(wf), ptr<float>(bf), ptr<float>(gf), ptr<float>(gxf)};
    check_cuda(mona::ln_scale_bwd<T>(ptr<T>(dy), ptr<T>(x), pw, ptr<float>(meanf), ptr<float>(rstdf),
                                     res.defined() ? ptr<T>(res) : nullptr, ptr<T>(dx), ptr<float>(partial), slots,
                                     M, C, current_stream()),
               "ln_scale_bwd");
  });
  auto rows = sum_slots(partial);
  return {dx, residual.has_value() ? rows : rows.narrow(0, 0, 4).clone()};
}

torch::Tensor dwconv7_fwd(const torch::Tensor& h, const torch::Tensor& K, const std::optional<torch::Tensor>& bias,
                          bool flip, int64_t variant) {
  check_input(h, "h", 4);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), H = h.size(1), W = h.size(2), D = h.size(3);
  TORCH_CHECK(K.dim() == 2 && K.size(0) == kTaps && K.size(1) == D, "K must be (49, ", D, ")");
  TORCH_CHECK(H < (int64_t(1) << 31) && W < (int64_t(1) << 31) && D < (int64_t(1) << 31), "h is too large");
  auto Kf = K.to(at::kFloat).contiguous();
  torch::Tensor bf;
  if (bias.has_value()) bf = as_float_vector(*bias, "bias", D, h);
  auto out = torch::empty_like(h);
  dispatch(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::dwconv7_fwd<T>(ptr<T>(h), ptr<float>(Kf), bf.defined() ? ptr<float>(bf) : nullptr, ptr<T>(out),
                                    nullptr, mona::Map{B, H, W, D}, flip, (int)variant, current_stream()),
               "dwconv7_fwd");
  });
  return out;
}

torch::Tensor dwconv7_wgrad(const torch::Tensor& h, const torch::Tensor& dout, int64_t variant) {
  check_input(h, "h", 4);
  check_input(dout, "dout", 4);
  TORCH_CHECK(dout.sizes() == h.sizes() && dout.scalar_type() == h.scalar_type(), "dout must match h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), H = h.size(1), W = h.size(2), D = h.size(3);
  const mona::Map map{B, H, W, D};
  const int slots = mona::wgrad_slots(map, sm_count(h));
  auto partial = torch::empty({slots, kTaps + 1, D}, h.options().dtype(at::kFloat));
  dispatch(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::dwconv7_wgrad<T>(ptr<T>(h), ptr<T>(dout), ptr<float>(partial), slots, map, (int)variant,
                                      current_stream()),
               "dwconv7_wgrad");
  });
  return sum_slots(partial);
}

// (dh3, column sums of dh3 in fp32) for a = gelu(h3) times the dropout multiplier of (seed, p); seed is
// one int64 on h3's device.
std::tuple<torch::Tensor, torch::Tensor> gelu_dropout_bwd(const torch::Tensor& da, const torch::Tensor& h3,
                                                          const torch::Tensor& seed, double p) {
  check_input(h3, "h3", 2);
  check_input(da, "da", 2);
  check_seed(seed, h3);
  TORCH_CHECK(da.sizes() == h3.sizes() && da.scalar_type() == h3.scalar_type(), "da must match h3");
  const c10::cuda::CUDAGuard guard(h3.device());
  const int64_t M = h3.size(0), D = h3.size(1);
  const int slots = mona::gelu_bwd_slots(M, D, sm_count(h3));
  auto dh3 = torch::empty_like(h3);
  auto partial = torch::empty({slots, D}, h3.options().dtype(at::kFloat));
  dispatch(h3.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::gelu_dropout_bwd<T>(ptr<T>(da), ptr<T>(h3), nullptr, ptr<T>(dh3), nullptr, ptr<float>(partial),
                                         slots, M, D, dropout(seed, p), current_stream()),
               "gelu_dropout_bwd");
  });
  return {dh3, sum_slots(partial)};
}

// The adapter's sixteen parameters, checked: each a tensor on x's device.
Params adapter_params(at::TensorList params, const torch::Tensor& x) {
  TORCH_CHECK(params.size() == kParams, "params must hold the adapter's ", kParams, " parameters, got ",
              params.size());
  Params P;
  for (int k = 0; k < kParams; ++k) {
    TORCH_CHECK(params[k].device() == x.device(), "parameter ", k, " is on ", params[k].device(),
                " but x is on ", x.device());
    P[k] = params[k];
  }
  return P;
}

void check_problem(const torch::Tensor& x, int64_t H, int64_t W, const std::optional<torch::Tensor>& seed) {
  check_input(x, "x", 2);
  check_channels(x.size(1));
  TORCH_CHECK(H > 0 && W > 0 && x.size(0) % (H * W) == 0, "x has ", x.size(0), " tokens, not a multiple of H*W = ",
              H * W);
  if (seed.has_value()) check_seed(*seed, x);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> adapter_fwd(
    const torch::Tensor& x, at::TensorList params, const std::optional<torch::Tensor>& seed, int64_t H, int64_t W,
    double eps, double p, at::ScalarType compute_dtype) {
  check_problem(x, H, W, seed);
  const Params P = adapter_params(params, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return mona_plan::forward(x, P, H, W, eps, p, seed, compute_dtype);
}

std::vector<torch::Tensor> adapter_bwd(const torch::Tensor& g, const torch::Tensor& x, const torch::Tensor& h1,
                                       const torch::Tensor& mean, const torch::Tensor& rstd, at::TensorList params,
                                       const std::optional<torch::Tensor>& seed, int64_t H, int64_t W, double eps,
                                       double p) {
  check_problem(x, H, W, seed);
  TORCH_CHECK(g.sizes() == x.sizes(), "g must match x in shape");
  TORCH_CHECK(h1.dim() == 2 && h1.size(0) == x.size(0) && h1.is_contiguous(), "h1 must be (M, d) and contiguous");
  const Params P = adapter_params(params, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return mona_plan::backward(g.contiguous(), x, h1, mean.to(at::kFloat), rstd.to(at::kFloat), P, H, W, eps, p, seed);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mona_kernels, m) {
  m.def("cuda_ln_scale_fwd(Tensor x, Tensor w, Tensor b, Tensor gamma, Tensor gammax, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cuda_ln_scale_bwd(Tensor dy, Tensor x, Tensor w, Tensor b, Tensor gamma, Tensor gammax, Tensor mean, "
        "Tensor rstd, Tensor? residual) -> (Tensor, Tensor)");
  m.def("cuda_dwconv7_fwd(Tensor h, Tensor K, Tensor? bias, bool flip, int variant) -> Tensor");
  m.def("cuda_dwconv7_wgrad(Tensor h, Tensor dout, int variant) -> Tensor");
  m.def("cuda_gelu_dropout_bwd(Tensor da, Tensor h3, Tensor seed, float p) -> (Tensor, Tensor)");
  m.def("cuda_adapter_fwd(Tensor x, Tensor[] params, Tensor? seed, SymInt H, SymInt W, float eps, float p, "
        "ScalarType compute_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_adapter_bwd(Tensor g, Tensor x, Tensor h1, Tensor mean, Tensor rstd, Tensor[] params, Tensor? seed, "
        "SymInt H, SymInt W, float eps, float p) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mona_kernels, CUDA, m) {
  m.impl("cuda_ln_scale_fwd", &ln_scale_fwd);
  m.impl("cuda_ln_scale_bwd", &ln_scale_bwd);
  m.impl("cuda_dwconv7_fwd", &dwconv7_fwd);
  m.impl("cuda_dwconv7_wgrad", &dwconv7_wgrad);
  m.impl("cuda_gelu_dropout_bwd", &gelu_dropout_bwd);
  m.impl("cuda_adapter_fwd", &adapter_fwd);
  m.impl("cuda_adapter_bwd", &adapter_bwd);
}

// Importing the module loads the library, which registers the operators above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA fallback kernels of mona_kernels (torch.ops.mona_kernels.cuda_*)";
}
