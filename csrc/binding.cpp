// PyTorch binding of the CUDA fallback: argument checks, dtype dispatch, allocation. The kernels are
// in mona_kernels.cu and know nothing of torch.
#include "glue.h"

namespace {

using namespace mona_glue;

std::vector<torch::Tensor> ln_scale_fwd(torch::Tensor x, torch::Tensor w, torch::Tensor b, torch::Tensor gamma,
                                        torch::Tensor gammax, double eps) {
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
    check_cuda(mona::ln_scale_fwd<T>(ptr<T>(x), ptr<float>(wf), ptr<float>(bf), ptr<float>(gf), ptr<float>(gxf),
                                     ptr<T>(y), ptr<float>(mean), ptr<float>(rstd), M, C, (float)eps, sm_count(x),
                                     current_stream()),
               "ln_scale_fwd");
  });
  return {y, mean, rstd};
}

// (dx, (5, C) column sums: dgamma, dgammax, dw_ln, db_ln, sum of residual (zeros without one)).
std::vector<torch::Tensor> ln_scale_bwd(torch::Tensor dy, torch::Tensor x, torch::Tensor w, torch::Tensor b,
                                        torch::Tensor gamma, torch::Tensor gammax, torch::Tensor mean,
                                        torch::Tensor rstd, c10::optional<torch::Tensor> residual) {
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
    check_cuda(mona::ln_scale_bwd<T>(ptr<T>(dy), ptr<T>(x), ptr<float>(wf), ptr<float>(bf), ptr<float>(gf),
                                     ptr<float>(gxf), ptr<float>(meanf), ptr<float>(rstdf),
                                     res.defined() ? ptr<T>(res) : nullptr, ptr<T>(dx), ptr<float>(partial), slots,
                                     M, C, current_stream()),
               "ln_scale_bwd");
  });
  return {dx, sum_slots(partial)};
}

torch::Tensor dwconv7_fwd(torch::Tensor h, torch::Tensor K, c10::optional<torch::Tensor> bias, bool flip,
                          int64_t variant) {
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
                                    nullptr, B, H, W, D, flip, (int)variant, current_stream()),
               "dwconv7_fwd");
  });
  return out;
}

torch::Tensor dwconv7_wgrad(torch::Tensor h, torch::Tensor dout, int64_t variant) {
  check_input(h, "h", 4);
  check_input(dout, "dout", 4);
  TORCH_CHECK(dout.sizes() == h.sizes() && dout.scalar_type() == h.scalar_type(), "dout must match h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), H = h.size(1), W = h.size(2), D = h.size(3);
  const int slots = mona::wgrad_slots(B, H, W, sm_count(h));
  auto partial = torch::empty({slots, kTaps + 1, D}, h.options().dtype(at::kFloat));
  dispatch(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::dwconv7_wgrad<T>(ptr<T>(h), ptr<T>(dout), ptr<float>(partial), slots, B, H, W, D,
                                      (int)variant, current_stream()),
               "dwconv7_wgrad");
  });
  return sum_slots(partial);
}

torch::Tensor gelu_dropout_fwd(torch::Tensor h3, int64_t seed, double p) {
  check_input(h3, "h3", 2);
  const c10::cuda::CUDAGuard guard(h3.device());
  auto a = torch::empty_like(h3);
  dispatch(h3.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::gelu_dropout_fwd<T>(ptr<T>(h3), nullptr, ptr<T>(a), h3.size(0), h3.size(1), (uint64_t)seed,
                                         nullptr, (float)p, current_stream()),
               "gelu_dropout_fwd");
  });
  return a;
}

// (dh3, column sums of dh3 in fp32).
std::vector<torch::Tensor> gelu_dropout_bwd(torch::Tensor da, torch::Tensor h3, int64_t seed, double p) {
  check_input(h3, "h3", 2);
  check_input(da, "da", 2);
  TORCH_CHECK(da.sizes() == h3.sizes() && da.scalar_type() == h3.scalar_type(), "da must match h3");
  const c10::cuda::CUDAGuard guard(h3.device());
  const int64_t M = h3.size(0), D = h3.size(1);
  const int slots = mona::gelu_bwd_slots(M, D, sm_count(h3));
  auto dh3 = torch::empty_like(h3);
  auto partial = torch::empty({slots, D}, h3.options().dtype(at::kFloat));
  dispatch(h3.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::gelu_dropout_bwd<T>(ptr<T>(da), ptr<T>(h3), nullptr, ptr<T>(dh3), nullptr, ptr<float>(partial),
                                         slots, M, D, (uint64_t)seed, nullptr, (float)p, current_stream()),
               "gelu_dropout_bwd");
  });
  return {dh3, sum_slots(partial)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA fallback kernels of mona_kernels";
  m.def("ln_scale_fwd", &ln_scale_fwd, "LN-scaling forward: (y, mean, rstd)");
  m.def("ln_scale_bwd", &ln_scale_bwd, "LN-scaling backward: (dx, (5, C) parameter and residual column sums)");
  m.def("dwconv7_fwd", &dwconv7_fwd, "merged 7x7 depthwise conv, channels-last (flip: the kernel rotated 180 degrees)");
  m.def("dwconv7_wgrad", &dwconv7_wgrad, "merged kernel and bias gradient, (50, D)");
  m.def("gelu_dropout_fwd", &gelu_dropout_fwd, "gelu(h3) times the dropout multiplier of (seed, p)");
  m.def("gelu_dropout_bwd", &gelu_dropout_bwd, "(dh3, column sums of dh3) of gelu_dropout_fwd");
  m.def("mona_adapter", &mona_adapter,
        "the whole adapter on (M, C) tokens, forward and backward in C++ (one autograd node)");
  m.def("dwconv7_defaults", [](int64_t conv, int64_t wgrad) { return mona::dwconv7_defaults((int)conv, (int)wgrad); },
        "set the conv and wgrad variants the adapter uses (-1: keep, -2: by map size); returns the previous pair");
  m.def("graph_cache", &graph_cache,
        "set the CUDA-graph cache's capacity (0: off) unless negative; returns the previous capacity");
}
