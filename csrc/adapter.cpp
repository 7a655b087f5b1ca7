// The whole Mona adapter on the CUDA backend as one C++ autograd node: forward and backward each run
// from a single call with no Python between launches (the eager step is otherwise host-bound).
//
// Same math and layout contract as mona_kernels/ops/mona_adapter.py (SPEC §1): x is M tokens of C channels
// (any leading shape, contiguous; out and dx take its shape, so no view op joins the autograd graph),
// matmuls run in the compute dtype through cuBLAS with fp32 accumulation, the depthwise, LN-scaling
// and GELU/dropout kernels are those of mona_kernels.cu. Saved for backward: x, mean, rstd, h1 and the
// small float parameter buffers; y, h2, h3 and a are recomputed. The projector's residual rides on a
// pass that happens anyway: the conv also writes h2 into h3's buffer and the GEMM adds h2 Wp^T in place
// (one rounding, in fp32), likewise dh2 from the GELU backward. The projector bias is added inside the
// GELU kernels, so h3 is kept without it. The output keeps the reference's order, x + (a W2^T + b2):
// accumulating into a rounded x + b2 would round the large term twice.
#include "glue.h"

#include <torch/csrc/autograd/custom_function.h>

namespace {

using namespace mona_glue;
using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor cast(const Tensor& t, at::ScalarType s) { return t.scalar_type() == s ? t : t.to(s); }

// (4, C) float rows w_ln, b_ln, gamma, gammax for the LN kernels.
Tensor ln_params(const Tensor& w, const Tensor& b, const Tensor& gamma, const Tensor& gammax) {
  return cast(at::stack({w, b, gamma, gammax}), at::kFloat);
}

// The dtype shared by `ts`, or float when they differ.
at::ScalarType common_dtype(std::initializer_list<const Tensor*> ts) {
  auto s = (*ts.begin())->scalar_type();
  for (const Tensor* t : ts) {
    if (t->scalar_type() != s) return at::kFloat;
  }
  return s;
}

// (51, d) float: the merged 7x7 kernel (49 rows), its bias, then bp (mona::merge_kernels).
Tensor merged_params(const Tensor& w3, const Tensor& b3, const Tensor& w5, const Tensor& b5, const Tensor& w7,
                     const Tensor& b7, const Tensor& bp) {
  const int64_t d = w7.size(0);
  const auto s = common_dtype({&w3, &b3, &w5, &b5, &w7, &b7, &bp});
  auto out = torch::empty({kTaps + 2, d}, w7.options().dtype(at::kFloat));
  dispatch(s, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto c = [&](const Tensor& t) { return cast(t, s).contiguous(); };
    check_cuda(mona::merge_kernels<T>(ptr<T>(c(w3)), ptr<T>(c(b3)), ptr<T>(c(w5)), ptr<T>(c(b5)), ptr<T>(c(w7)),
                                      ptr<T>(c(b7)), ptr<T>(c(bp)), ptr<float>(out), d, current_stream()),
               "merge_kernels");
  });
  return out;
}

// y (M, C) in x's dtype of the LN-scaling op; mean and rstd written when given.
Tensor ln_forward(const Tensor& x, int64_t M, int64_t C, const Tensor& lnp, float eps, float* mean, float* rstd) {
  auto y = torch::empty({M, C}, x.options());
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const float* p = ptr<float>(lnp);
    check_cuda(mona::ln_scale_fwd<T>(ptr<T>(x), p, p + C, p + 2 * C, p + 3 * C, ptr<T>(y), mean, rstd, M, C, eps,
                                     sm_count(x), current_stream()),
               "ln_scale_fwd");
  });
  return y;
}

// The merged depthwise conv over h (M, d) viewed as (B, H, W, d); bias may be null; flip: the input
// gradient; copy, when defined, receives the result too.
Tensor conv(const Tensor& h, const float* K, const float* bias, int64_t B, int64_t H, int64_t W, bool flip,
            const Tensor& copy = {}) {
  auto out = torch::empty_like(h);
  dispatch(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::dwconv7_fwd<T>(ptr<T>(h), K, bias, ptr<T>(out), copy.defined() ? ptr<T>(copy) : nullptr, B, H,
                                    W, h.size(1), flip, 0, current_stream()),
               "dwconv7_fwd");
  });
  return out;
}

Tensor gelu_forward(const Tensor& h3, const float* bp, uint64_t seed, float p) {
  auto a = torch::empty_like(h3);
  dispatch(h3.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::gelu_dropout_fwd<T>(ptr<T>(h3), bp, ptr<T>(a), h3.size(0), h3.size(1), seed, p,
                                         current_stream()),
               "gelu_dropout_fwd");
  });
  return a;
}

// (h2, h3 without bp, a') from h1: the merged conv, the projector with its residual, GELU and dropout.
struct Tail {
  Tensor h2, h3, a;
};

Tail tail(const Tensor& h1, const Tensor& small, const Tensor& Wpc, int64_t B, int64_t H, int64_t W, uint64_t seed,
          float p) {
  const int64_t d = h1.size(1);
  const float* s = ptr<float>(small);
  Tail t;
  t.h3 = torch::empty_like(h1);
  t.h2 = conv(h1, s, s + kTaps * d, B, H, W, false, t.h3);
  t.h3.addmm_(t.h2, Wpc.t());
  t.a = gelu_forward(t.h3, s + (kTaps + 1) * d, seed, p);
  return t;
}

// Column sums of a tall (M, n) matrix: cuBLAS's matrix-vector product (fp32 accumulation) beats a
// column reduction.
Tensor column_sums(const Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t.sum(0);
  return at::mv(t.t(), at::ones({t.size(0)}, t.options()));
}

struct Adapter : public torch::autograd::Function<Adapter> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor w_ln, Tensor b_ln, Tensor gamma, Tensor gammax,
                        Tensor W1, Tensor b1, Tensor w3, Tensor b3, Tensor w5, Tensor b5, Tensor w7, Tensor b7,
                        Tensor Wp, Tensor bp, Tensor W2, Tensor b2, int64_t B, int64_t H, int64_t W, double eps,
                        double p, int64_t seed, at::ScalarType cdt) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t C = x.size(-1), M = x.numel() / C, d = W1.size(0);
    auto lnp = ln_params(w_ln, b_ln, gamma, gammax);
    auto small = merged_params(w3, b3, w5, b5, w7, b7, bp);
    auto stats = torch::empty({2, M}, x.options().dtype(at::kFloat));  // mean, rstd
    auto y = ln_forward(x, M, C, lnp, (float)eps, ptr<float>(stats), ptr<float>(stats) + M);
    auto h1 = at::addmm(cast(b1, cdt), cast(y, cdt), cast(W1, cdt).t());
    auto Wpc = cast(Wp, cdt).reshape({d, d});
    auto t = tail(h1, small, Wpc, B, H, W, (uint64_t)seed, (float)p);
    auto out = torch::empty(x.sizes(), x.options().dtype(at::promote_types(x.scalar_type(), cdt)));
    auto out2 = out.view({M, C});  // out itself (not a view) is returned, so callers may modify it in place
    at::add_out(out2, x.view({M, C}), at::addmm(cast(b2, cdt), t.a, cast(W2, cdt).t()));
    ctx->save_for_backward({x, w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, Wp, bp, W2, b2});
    ctx->saved_data["h1"] = h1;
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["lnp"] = lnp;
    ctx->saved_data["small"] = small;
    ctx->saved_data["bhw_seed"] = std::vector<int64_t>{B, H, W, seed};
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["p"] = p;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w_ln = saved[1], &b_ln = saved[2], &gamma = saved[3], &gammax = saved[4],
                 &W1 = saved[5], &b1 = saved[6], &w3 = saved[7], &b3 = saved[8], &w5 = saved[9], &b5 = saved[10],
                 &w7 = saved[11], &b7 = saved[12], &Wp = saved[13], &bp = saved[14], &W2 = saved[15], &b2 = saved[16];
    const c10::cuda::CUDAGuard guard(x.device());
    auto h1 = ctx->saved_data["h1"].toTensor();
    auto stats = ctx->saved_data["stats"].toTensor();
    auto lnp = ctx->saved_data["lnp"].toTensor();
    auto small = ctx->saved_data["small"].toTensor();
    const auto bhw_seed = ctx->saved_data["bhw_seed"].toIntVector();
    const int64_t B = bhw_seed[0], H = bhw_seed[1], W = bhw_seed[2];
    const auto seed = (uint64_t)bhw_seed[3];
    const float eps = (float)ctx->saved_data["eps"].toDouble(), p = (float)ctx->saved_data["p"].toDouble();
    const auto cdt = h1.scalar_type();
    const int64_t C = x.size(-1), M = x.numel() / C, d = h1.size(1);
    const float* s = ptr<float>(small);

    auto Wpc = cast(Wp, cdt).reshape({d, d});
    auto t = tail(h1, small, Wpc, B, H, W, seed, p);
    auto g = grads[0].reshape({M, C}).contiguous();
    auto gc = cast(g, cdt);
    auto dW2 = at::mm(gc.t(), t.a);
    auto da = at::mm(gc, cast(W2, cdt));

    // One float buffer holds the per-slot partial sums of the three reductions (16-byte aligned parts).
    const int sms = sm_count(x);
    const int gslots = mona::gelu_bwd_slots(M, d, sms), wslots = mona::wgrad_slots(B, H, W, sms),
              lslots = mona::ln_bwd_slots(M, C, sms);
    auto round4 = [](int64_t n) { return (n + 3) / 4 * 4; };
    const int64_t gn = round4(gslots * d), wn = round4(wslots * (kTaps + 1) * d), ln = lslots * 5 * C;
    auto scratch = torch::empty({gn + wn + ln}, x.options().dtype(at::kFloat));
    float* gpartial = ptr<float>(scratch);
    float* wpartial = gpartial + gn;
    float* lpartial = wpartial + wn;

    // dh3, a copy of it into dh2's buffer, and its column sums (the projector bias gradient)
    auto dh3 = torch::empty_like(t.h3), dh2 = torch::empty_like(t.h3);
    dispatch(cdt, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      check_cuda(mona::gelu_dropout_bwd<T>(ptr<T>(da), ptr<T>(t.h3), s + (kTaps + 1) * d, ptr<T>(dh3), ptr<T>(dh2),
                                           gpartial, gslots, M, d, seed, p, current_stream()),
                 "gelu_dropout_bwd");
    });
    auto dbp = sum_slots(gpartial, gslots, {d}, x, bp.scalar_type());
    dh2.addmm_(dh3, Wpc);  // dh2 = dh3 + dh3 Wp
    auto dWp = at::mm(dh3.t(), t.h2);

    auto dh1 = conv(dh2, s, nullptr, B, H, W, true);
    dispatch(cdt, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      check_cuda(mona::dwconv7_wgrad<T>(ptr<T>(h1), ptr<T>(dh2), wpartial, wslots, B, H, W, d, 0, current_stream()),
                 "dwconv7_wgrad");
    });
    auto dKb = sum_slots(wpartial, wslots, {kTaps + 1, d}, x);
    auto db1 = column_sums(dh1);

    auto y = ln_forward(x, M, C, lnp, eps, nullptr, nullptr);  // the forward's y again
    auto dW1 = at::mm(dh1.t(), cast(y, cdt));
    auto dy = cast(at::mm(dh1, cast(W1, cdt)), x.scalar_type());

    // The LN backward also adds the residual gradient g to dx; its fifth row is sum(g), db2.
    auto dx = torch::empty_like(x);
    auto gx = cast(g, x.scalar_type());
    dispatch(x.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const float* q = ptr<float>(lnp);
      const float* st = ptr<float>(stats);
      check_cuda(mona::ln_scale_bwd<T>(ptr<T>(dy), ptr<T>(x), q, q + C, q + 2 * C, q + 3 * C, st, st + M, ptr<T>(gx),
                                       ptr<T>(dx), lpartial, lslots, M, C, current_stream()),
                 "ln_scale_bwd");
    });
    // dgamma, dgammax, dw_ln, db_ln, db2
    auto rows = sum_slots(lpartial, lslots, {5, C}, x, common_dtype({&w_ln, &b_ln, &gamma, &gammax, &b2}));

    const auto ps = common_dtype({&w3, &b3, &w5, &b5, &w7, &b7});
    auto dw3 = torch::empty(w3.sizes(), w3.options().dtype(ps)), db3 = torch::empty(b3.sizes(), b3.options().dtype(ps));
    auto dw5 = torch::empty(w5.sizes(), w5.options().dtype(ps)), db5 = torch::empty(b5.sizes(), b5.options().dtype(ps));
    auto dw7 = torch::empty(w7.sizes(), w7.options().dtype(ps)), db7 = torch::empty(b7.sizes(), b7.options().dtype(ps));
    dispatch(ps, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      check_cuda(mona::split_kernel_grad<T>(ptr<float>(dKb), ptr<T>(dw3), ptr<T>(db3), ptr<T>(dw5), ptr<T>(db5),
                                            ptr<T>(dw7), ptr<T>(db7), d, current_stream()),
                 "split_kernel_grad");
    });

    auto like = [](const Tensor& grad, const Tensor& param) { return cast(grad, param.scalar_type()); };
    const Tensor none;
    return {dx,
            like(rows[2], w_ln),
            like(rows[3], b_ln),
            like(rows[0], gamma),
            like(rows[1], gammax),
            like(dW1, W1),
            like(db1, b1),
            like(dw3, w3),
            like(db3, b3),
            like(dw5, w5),
            like(db5, b5),
            like(dw7, w7),
            like(db7, b7),
            like(dWp, Wp).view(Wp.sizes()),
            like(dbp, bp),
            like(dW2, W2),
            like(rows[4], b2),
            none, none, none, none, none, none, none};
  }
};

}  // namespace

torch::Tensor mona_adapter(torch::Tensor x, int64_t B, int64_t H, int64_t W, torch::Tensor w_ln, torch::Tensor b_ln,
                           torch::Tensor gamma, torch::Tensor gammax, torch::Tensor W1, torch::Tensor b1,
                           torch::Tensor w3, torch::Tensor b3, torch::Tensor w5, torch::Tensor b5, torch::Tensor w7,
                           torch::Tensor b7, torch::Tensor Wp, torch::Tensor bp, torch::Tensor W2, torch::Tensor b2,
                           double eps, double p, int64_t seed, at::ScalarType compute_dtype) {
  TORCH_CHECK(x.dim() >= 2, "x must have rank 2 or more, got ", x.dim());
  check_input(x, "x", x.dim());
  TORCH_CHECK(x.numel() == B * H * W * x.size(-1), "x has ", x.numel() / std::max<int64_t>(1, x.size(-1)),
              " tokens but B*H*W = ", B * H * W);
  check_channels(x.size(-1));
  return Adapter::apply(x, w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, Wp, bp, W2, b2, B, H, W, eps, p,
                        seed, compute_dtype);
}
