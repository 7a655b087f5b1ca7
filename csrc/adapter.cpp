// The CUDA backend's plan of the whole Mona adapter: the forward and the backward, each one C++ call
// that binding.cpp registers as a torch operator (autograd joins them in Python, as for every
// backend: mona_kernels/backends/__init__.py).
//
// Same math and layout contract as the other plans (docs/design.md): x is M = B * H * W tokens of C
// channels, contiguous; matmuls run in the compute dtype through cuBLAS with fp32 accumulation, the
// depthwise, LN-scaling and GELU/dropout kernels are those of forward.cu and backward.cu. Saved for
// backward: x, mean, rstd and h1; y, h2, h3 and a are recomputed. The projector's residual rides on a
// pass that happens anyway: the conv also writes h2 into h3's buffer and the GEMM adds h2 Wp^T in place
// (one rounding, in fp32), likewise dh2 from the GELU backward. The projector bias is added inside the
// GELU kernels, so h3 is kept without it. The output keeps the reference's order, x + (a W2^T + b2):
// accumulating into a rounded x + b2 would round the large term twice.
#include "glue.h"

#include <array>
#include <type_traits>
#include <vector>

namespace {

using namespace mona_glue;
using torch::Tensor;

Tensor cast(const Tensor& t, at::ScalarType s) { return t.scalar_type() == s ? t : t.to(s); }

// (4, C) float rows w_ln, b_ln, gamma, gammax for the LN kernels.
Tensor ln_params(const Tensor& w, const Tensor& b, const Tensor& gamma, const Tensor& gammax) {
  return cast(at::stack({w, b, gamma, gammax}), at::kFloat);
}

mona::LnWeights ln_weights(const Tensor& lnp, int64_t C) {
  const float* q = ptr<float>(lnp);
  return {q, q + C, q + 2 * C, q + 3 * C};
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

// Whether the LN kernels take tokens of dtype t with y (or dy) of dtype u: the same dtype, or float
// tokens with the half dtypes of autocast (mona::ln_scale_fwd / ln_scale_bwd).
bool ln_pair(at::ScalarType t, at::ScalarType u) { return t == u || t == at::kFloat; }

template <typename T, typename U>
constexpr bool kLnPair = std::is_same_v<T, U> || std::is_same_v<T, float>;

// y (M, C) of the LN-scaling op in ydt (the projections' dtype), written by the kernel where ln_pair
// allows and cast after otherwise; mean and rstd written when given.
Tensor ln_forward(const Tensor& x, int64_t M, int64_t C, const Tensor& lnp, float eps, float* mean, float* rstd,
                  at::ScalarType ydt) {
  auto y = torch::empty({M, C}, x.options().dtype(ln_pair(x.scalar_type(), ydt) ? ydt : x.scalar_type()));
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch(y.scalar_type(), [&](auto* ytag) {
      using TY = std::remove_pointer_t<decltype(ytag)>;
      if constexpr (kLnPair<T, TY>) {
        check_cuda(mona::ln_scale_fwd<T, TY>(ptr<T>(x), ln_weights(lnp, C), ptr<TY>(y), mean, rstd, M, C, eps,
                                             sm_count(x), current_stream()),
                   "ln_scale_fwd");
      }
    });
  });
  return cast(y, ydt);
}

// The merged depthwise conv over h (M, d) viewed as (B, H, W, d); bias may be null; flip: the input
// gradient; copy, when defined, receives the result too.
Tensor conv(const Tensor& h, const float* K, const float* bias, const mona::Map& m, bool flip,
            const Tensor& copy = {}) {
  auto out = torch::empty_like(h);
  dispatch(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::dwconv7_fwd<T>(ptr<T>(h), K, bias, ptr<T>(out), copy.defined() ? ptr<T>(copy) : nullptr, m,
                                    flip, -1, current_stream()),
               "dwconv7_fwd");
  });
  return out;
}

Tensor gelu_forward(const Tensor& h3, const float* bp, const mona::Dropout& drop) {
  auto a = torch::empty_like(h3);
  dispatch(h3.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::gelu_dropout_fwd<T>(ptr<T>(h3), bp, ptr<T>(a), h3.size(0), h3.size(1), drop,
                                         current_stream()),
               "gelu_dropout_fwd");
  });
  return a;
}

// (h2, h3 without bp, a') from h1: the merged conv, the projector with its residual, GELU and dropout.
struct Tail {
  Tensor h2, h3, a;
};

Tail tail(const Tensor& h1, const Tensor& small, const Tensor& Wpc, const mona::Map& m, const mona::Dropout& drop) {
  const int64_t d = h1.size(1);
  const float* s = ptr<float>(small);
  Tail t;
  t.h3 = torch::empty_like(h1);
  t.h2 = conv(h1, s, s + kTaps * d, m, false, t.h3);
  t.h3.addmm_(t.h2, Wpc.t());
  t.a = gelu_forward(t.h3, s + (kTaps + 1) * d, drop);
  return t;
}

// Column sums of a tall (M, n) matrix into out (n): cuBLAS's matrix-vector product (fp32
// accumulation) beats a column reduction.
void column_sums_out(Tensor& out, const Tensor& t) {
  if (t.scalar_type() == at::kFloat) {
    at::sum_out(out, t, at::IntArrayRef{0});
  } else {
    at::mv_out(out, t.t(), at::ones({t.size(0)}, t.options()));
  }
}

// What a call is, besides its tensors: the map of h1 (B, H, W, d), LN's eps, the dropout and the
// compute dtype of the projections.
struct Problem {
  mona::Map map;
  float eps;
  mona::Dropout drop;
  at::ScalarType cdt;
};

Problem problem(const Tensor& x, const Params& P, int64_t H, int64_t W, double eps, double p,
                const std::optional<Tensor>& seed, at::ScalarType cdt) {
  const int64_t d = P[kW1].size(0), M = x.size(0);
  return {mona::Map{M / (H * W), H, W, d}, (float)eps, dropout(seed, p), cdt};
}

// The projections' weights and biases (W1, b1, Wp as (d, d), W2, b2) in the compute dtype. Where any
// needs a cast (float parameters under autocast), all five come as views of one buffer made by one
// concatenation and one cast: two launches instead of five.
struct Weights {
  Tensor W1, b1, Wp, W2, b2;
};

// Views of a flat buffer that holds parameters ks[0], ks[1], ... one after another, each in its
// parameter's shape.
template <size_t N>
std::array<Tensor, N> flat_views(const Tensor& buf, const Params& P, const Param (&ks)[N]) {
  std::array<Tensor, N> v;
  int64_t off = 0;
  for (size_t i = 0; i < N; ++i) {
    const int64_t n = P[ks[i]].numel();
    v[i] = buf.narrow(0, off, n).view(P[ks[i]].sizes());
    off += n;
  }
  return v;
}

Weights compute_weights(const Params& P, at::ScalarType cdt) {
  constexpr Param ks[5] = {kW1, kB1, kWp, kW2, kB2};
  const int64_t d = P[kW1].size(0);
  bool same = true;
  for (Param k : ks) same = same && P[k].scalar_type() == cdt;
  std::array<Tensor, 5> w;
  if (same) {
    for (int i = 0; i < 5; ++i) w[i] = P[ks[i]];
  } else {
    std::vector<Tensor> flat;
    for (Param k : ks) flat.push_back(P[k].reshape({-1}));
    w = flat_views(cast(at::cat(flat), cdt), P, ks);
  }
  return {w[0], w[1], w[2].reshape({d, d}), w[3], w[4]};
}

}  // namespace

namespace mona_plan {

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& x, const Params& P, int64_t H, int64_t W, double eps,
                                                   double p, const std::optional<Tensor>& seed,
                                                   at::ScalarType cdt) {
  const Problem pb = problem(x, P, H, W, eps, p, seed, cdt);
  const int64_t M = x.size(0), C = x.size(1);
  auto lnp = ln_params(P[kWln], P[kBln], P[kGamma], P[kGammax]);
  auto small = merged_params(P[kW3], P[kB3], P[kW5], P[kB5], P[kW7], P[kB7], P[kBp]);
  auto mean = torch::empty({M}, x.options().dtype(at::kFloat)), rstd = torch::empty_like(mean);
  auto y = ln_forward(x, M, C, lnp, pb.eps, ptr<float>(mean), ptr<float>(rstd), cdt);
  const Weights wc = compute_weights(P, cdt);
  auto h1 = at::addmm(wc.b1, y, wc.W1.t());
  auto t = tail(h1, small, wc.Wp, pb.map, pb.drop);
  auto out = torch::empty({M, C}, x.options().dtype(at::promote_types(x.scalar_type(), cdt)));
  at::add_out(out, x, at::addmm(wc.b2, t.a, wc.W2.t()));
  return {out, h1, mean, rstd};
}

std::vector<Tensor> backward(const Tensor& g, const Tensor& x, const Tensor& h1, const Tensor& mean,
                             const Tensor& rstd, const Params& P, int64_t H, int64_t W, double eps, double p,
                             const std::optional<Tensor>& seed) {
  const Problem pb = problem(x, P, H, W, eps, p, seed, h1.scalar_type());  // h1 is in the compute dtype
  const auto cdt = pb.cdt;
  const mona::Map& map = pb.map;
  const int64_t C = x.size(1), M = x.size(0), d = h1.size(1);
  auto lnp = ln_params(P[kWln], P[kBln], P[kGamma], P[kGammax]);
  auto small = merged_params(P[kW3], P[kB3], P[kW5], P[kB5], P[kW7], P[kB7], P[kBp]);
  const float* s = ptr<float>(small);

  const Weights wc = compute_weights(P, cdt);
  const Tensor& Wpc = wc.Wp;
  auto t = tail(h1, small, Wpc, map, pb.drop);
  // The projections' gradients dW1, db1, dWp and dW2 come out of cuBLAS in the compute dtype. Where
  // their parameters share another dtype (float under autocast), they are written into one buffer,
  // which one cast at the end returns in the parameters' dtype.
  constexpr Param kProj[4] = {kW1, kB1, kWp, kW2};
  const auto pdt = P[kW1].scalar_type();
  bool one_cast = pdt != cdt;
  int64_t total = 0;
  for (Param k : kProj) {
    one_cast = one_cast && P[k].scalar_type() == pdt;
    total += P[k].numel();
  }
  const Tensor gbuf = one_cast ? torch::empty({total}, x.options().dtype(cdt)) : Tensor();
  // kProj[i]'s gradient in the compute dtype and its parameter's shape: a view of gbuf, or its own
  std::array<Tensor, 4> gview;
  if (gbuf.defined()) {
    gview = flat_views(gbuf, P, kProj);
  } else {
    for (int i = 0; i < 4; ++i) gview[i] = torch::empty(P[kProj[i]].sizes(), x.options().dtype(cdt));
  }
  Tensor dW1 = gview[0], db1 = gview[1], dWp = gview[2].view({d, d}), dW2 = gview[3];

  auto gc = cast(g, cdt);
  at::mm_out(dW2, gc.t(), t.a);
  auto da = at::mm(gc, wc.W2);

  // One float buffer holds the per-slot partial sums of the three reductions (16-byte aligned parts).
  const int sms = sm_count(x);
  const int gslots = mona::gelu_bwd_slots(M, d, sms), wslots = mona::wgrad_slots(map, sms),
            lslots = mona::ln_bwd_slots(M, C, sms);
  auto round4 = [](int64_t n) { return (n + 3) / 4 * 4; };
  const int64_t gn = round4(gslots * d), wn = round4(wslots * (kTaps + 1) * d), ln = lslots * 5 * C;
  auto scratch = torch::empty({gn + wn + ln}, x.options().dtype(at::kFloat));
  float* gpartial = ptr<float>(scratch);
  float* wpartial = gpartial + gn;
  float* lpartial = wpartial + wn;

  // dh3 (the GELU backward adds bp to h3 first), a copy of it into dh2's buffer, and its column sums
  // (the projector bias gradient)
  auto dh3 = torch::empty_like(t.h3), dh2 = torch::empty_like(t.h3);
  dispatch(cdt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::gelu_dropout_bwd<T>(ptr<T>(da), ptr<T>(t.h3), s + (kTaps + 1) * d, ptr<T>(dh3), ptr<T>(dh2),
                                         gpartial, gslots, M, d, pb.drop, current_stream()),
               "gelu_dropout_bwd");
  });
  auto dbp = sum_slots(gpartial, gslots, {d}, x, P[kBp].scalar_type());
  dh2.addmm_(dh3, Wpc);  // dh2 = dh3 + dh3 Wp
  at::mm_out(dWp, dh3.t(), t.h2);

  auto dh1 = conv(dh2, s, nullptr, map, true);
  dispatch(cdt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::dwconv7_wgrad<T>(ptr<T>(h1), ptr<T>(dh2), wpartial, wslots, map, -1,
                                      current_stream()),
               "dwconv7_wgrad");
  });
  auto dKb = sum_slots(wpartial, wslots, {kTaps + 1, d}, x);
  column_sums_out(db1, dh1);

  auto y = ln_forward(x, M, C, lnp, pb.eps, nullptr, nullptr, cdt);  // the forward's y again
  at::mm_out(dW1, dh1.t(), y);
  auto dy = at::mm(dh1, wc.W1);
  if (!ln_pair(x.scalar_type(), dy.scalar_type())) dy = cast(dy, x.scalar_type());

  // The LN backward also adds the residual gradient g to dx; its fifth row is sum(g), db2.
  auto dx = torch::empty_like(x);
  auto gx = cast(g, x.scalar_type());
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch(dy.scalar_type(), [&](auto* dtag) {
      using TD = std::remove_pointer_t<decltype(dtag)>;
      if constexpr (kLnPair<T, TD>) {
        check_cuda(mona::ln_scale_bwd<T, TD>(ptr<TD>(dy), ptr<T>(x), ln_weights(lnp, C), ptr<float>(mean),
                                             ptr<float>(rstd), ptr<T>(gx), ptr<T>(dx), lpartial, lslots, M, C,
                                             current_stream()),
                   "ln_scale_bwd");
      }
    });
  });
  // dgamma, dgammax, dw_ln, db_ln, db2
  auto rows = sum_slots(lpartial, lslots, {5, C}, x,
                        common_dtype({&P[kWln], &P[kBln], &P[kGamma], &P[kGammax], &P[kB2]}));

  const auto ps = common_dtype({&P[kW3], &P[kB3], &P[kW5], &P[kB5], &P[kW7], &P[kB7]});
  auto alloc = [&](Param k) { return torch::empty(P[k].sizes(), P[k].options().dtype(ps)); };
  auto dw3 = alloc(kW3), db3 = alloc(kB3), dw5 = alloc(kW5), db5 = alloc(kB5), dw7 = alloc(kW7), db7 = alloc(kB7);
  dispatch(ps, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::split_kernel_grad<T>(ptr<float>(dKb), ptr<T>(dw3), ptr<T>(db3), ptr<T>(dw5), ptr<T>(db5),
                                          ptr<T>(dw7), ptr<T>(db7), d, current_stream()),
               "split_kernel_grad");
  });

  // the projections' gradients in their parameters' dtypes: views of one cast of gbuf, or one cast each
  std::array<Tensor, 4> proj;
  if (gbuf.defined()) {
    proj = flat_views(cast(gbuf, pdt), P, kProj);
  } else {
    for (int i = 0; i < 4; ++i) proj[i] = cast(gview[i], P[kProj[i]].scalar_type());
  }
  auto like = [&](const Tensor& grad, Param k) { return cast(grad, P[k].scalar_type()); };
  return {dx,
          like(rows[2], kWln),
          like(rows[3], kBln),
          like(rows[0], kGamma),
          like(rows[1], kGammax),
          proj[0],
          proj[1],
          like(dw3, kW3),
          like(db3, kB3),
          like(dw5, kW5),
          like(db5, kB5),
          like(dw7, kW7),
          like(db7, kB7),
          proj[2],
          like(dbp, kBp),
          proj[3],
          like(rows[4], kB2)};
}

}  // namespace mona_plan

