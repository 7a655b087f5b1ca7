// The whole Mona adapter on the CUDA backend as one C++ autograd node: forward and backward each run
// from a single call with no Python between launches (the eager step is otherwise host-bound).
//
// Same math and layout contract as mona_kernels/ops/mona_adapter.py (docs/design.md): x is M tokens of C channels
// (any leading shape, contiguous; out and dx take its shape, so no view op joins the autograd graph),
// matmuls run in the compute dtype through cuBLAS with fp32 accumulation, the depthwise, LN-scaling
// and GELU/dropout kernels are those of mona_kernels.cu. Saved for backward: x, mean, rstd, h1 and the
// small float parameter buffers; y, h2, h3 and a are recomputed. The projector's residual rides on a
// pass that happens anyway: the conv also writes h2 into h3's buffer and the GEMM adds h2 Wp^T in place
// (one rounding, in fp32), likewise dh2 from the GELU backward. The projector bias is added inside the
// GELU kernels, so h3 is kept without it. The output keeps the reference's order, x + (a W2^T + b2):
// accumulating into a rounded x + b2 would round the large term twice.
#include "glue.h"

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

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
        const float* p = ptr<float>(lnp);
        check_cuda(mona::ln_scale_fwd<T, TY>(ptr<T>(x), p, p + C, p + 2 * C, p + 3 * C, ptr<TY>(y), mean, rstd, M, C,
                                             eps, sm_count(x), current_stream()),
                   "ln_scale_fwd");
      }
    });
  });
  return cast(y, ydt);
}

// The merged depthwise conv over h (M, d) viewed as (B, H, W, d); bias may be null; flip: the input
// gradient; copy, when defined, receives the result too.
Tensor conv(const Tensor& h, const float* K, const float* bias, int64_t B, int64_t H, int64_t W, bool flip,
            const Tensor& copy = {}) {
  auto out = torch::empty_like(h);
  dispatch(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::dwconv7_fwd<T>(ptr<T>(h), K, bias, ptr<T>(out), copy.defined() ? ptr<T>(copy) : nullptr, B, H,
                                    W, h.size(1), flip, -1, current_stream()),
               "dwconv7_fwd");
  });
  return out;
}

Tensor gelu_forward(const Tensor& h3, const float* bp, uint64_t seed, const uint64_t* seed_dev, float p) {
  auto a = torch::empty_like(h3);
  dispatch(h3.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::gelu_dropout_fwd<T>(ptr<T>(h3), bp, ptr<T>(a), h3.size(0), h3.size(1), seed, seed_dev, p,
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
          const uint64_t* seed_dev, float p) {
  const int64_t d = h1.size(1);
  const float* s = ptr<float>(small);
  Tail t;
  t.h3 = torch::empty_like(h1);
  t.h2 = conv(h1, s, s + kTaps * d, B, H, W, false, t.h3);
  t.h3.addmm_(t.h2, Wpc.t());
  t.a = gelu_forward(t.h3, s + (kTaps + 1) * d, seed, seed_dev, p);
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

// The sixteen parameters in the node's argument order.
constexpr int kParams = 16;
using Params = std::array<Tensor, kParams>;
enum Param { kWln, kBln, kGamma, kGammax, kW1, kB1, kW3, kB3, kW5, kB5, kW7, kB7, kWp, kBp, kW2, kB2 };

// What a call is, besides its tensors.
struct Problem {
  int64_t B, H, W;
  float eps, p;
  at::ScalarType cdt;  // the compute dtype of the projections
};

// The forward's output and what the backward needs of it; lnp and small (the float parameter rows)
// are left undefined by a replayed graph, and the backward then rebuilds them.
struct Saved {
  Tensor out, h1, stats, lnp, small;
};

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

// The forward. seed_dev, when not null, holds the dropout seed on the device instead of `seed`.
Saved run_forward(const Tensor& x, const Params& P, const Problem& pb, uint64_t seed, const uint64_t* seed_dev) {
  const int64_t C = x.size(-1), M = x.numel() / C;
  const auto cdt = pb.cdt;
  Saved r;
  r.lnp = ln_params(P[kWln], P[kBln], P[kGamma], P[kGammax]);
  r.small = merged_params(P[kW3], P[kB3], P[kW5], P[kB5], P[kW7], P[kB7], P[kBp]);
  r.stats = torch::empty({2, M}, x.options().dtype(at::kFloat));  // mean, rstd
  auto y = ln_forward(x, M, C, r.lnp, pb.eps, ptr<float>(r.stats), ptr<float>(r.stats) + M, cdt);
  const Weights wc = compute_weights(P, cdt);
  r.h1 = at::addmm(wc.b1, y, wc.W1.t());
  const Tensor& Wpc = wc.Wp;
  auto t = tail(r.h1, r.small, Wpc, pb.B, pb.H, pb.W, seed, seed_dev, pb.p);
  r.out = torch::empty(x.sizes(), x.options().dtype(at::promote_types(x.scalar_type(), cdt)));
  auto out2 = r.out.view({M, C});  // out itself (not a view) is returned, so callers may modify it in place
  at::add_out(out2, x.view({M, C}), at::addmm(wc.b2, t.a, wc.W2.t()));
  return r;
}

// dx, then the gradients of the parameters in their order, dtypes and shapes. g is (M, C), contiguous.
using Grads = std::array<Tensor, kParams + 1>;

Grads run_backward(const Tensor& g, const Tensor& x, const Saved& sv, const Params& P, const Problem& pb,
                   uint64_t seed, const uint64_t* seed_dev) {
  const auto cdt = pb.cdt;
  const int64_t B = pb.B, H = pb.H, W = pb.W, C = x.size(-1), M = x.numel() / C, d = sv.h1.size(1);
  const float p = pb.p;
  const Tensor& h1 = sv.h1;
  auto lnp = sv.lnp.defined() ? sv.lnp : ln_params(P[kWln], P[kBln], P[kGamma], P[kGammax]);
  auto small = sv.small.defined() ? sv.small : merged_params(P[kW3], P[kB3], P[kW5], P[kB5], P[kW7], P[kB7], P[kBp]);
  const float* s = ptr<float>(small);

  const Weights wc = compute_weights(P, cdt);
  const Tensor& Wpc = wc.Wp;
  auto t = tail(h1, small, Wpc, B, H, W, seed, seed_dev, p);
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
  const int gslots = mona::gelu_bwd_slots(M, d, sms), wslots = mona::wgrad_slots(B, H, W, sms),
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
                                         gpartial, gslots, M, d, seed, seed_dev, p, current_stream()),
               "gelu_dropout_bwd");
  });
  auto dbp = sum_slots(gpartial, gslots, {d}, x, P[kBp].scalar_type());
  dh2.addmm_(dh3, Wpc);  // dh2 = dh3 + dh3 Wp
  at::mm_out(dWp, dh3.t(), t.h2);

  auto dh1 = conv(dh2, s, nullptr, B, H, W, true);
  dispatch(cdt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(mona::dwconv7_wgrad<T>(ptr<T>(h1), ptr<T>(dh2), wpartial, wslots, B, H, W, d, -1, current_stream()),
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
        const float* q = ptr<float>(lnp);
        const float* st = ptr<float>(sv.stats);
        check_cuda(mona::ln_scale_bwd<T, TD>(ptr<TD>(dy), ptr<T>(x), q, q + C, q + 2 * C, q + 3 * C, st, st + M,
                                             ptr<T>(gx), ptr<T>(dx), lpartial, lslots, M, C, current_stream()),
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

// ---------------------------------------------------------------------------------------------
// Replayed CUDA graphs. On this path the host, not the GPU, sets the pace of an eager step: each of
// the ~50 launches and ATen calls of a forward+backward costs several microseconds of CPU. So, for a
// problem seen before (same shapes, dtypes, device and stream), the forward and the backward are each
// captured once into a CUDA graph over static buffers, and a call then costs three launches: one
// kernel that copies the call's inputs (tokens, parameters, the dropout seed) into the static
// buffers, the graph, and one kernel that copies its outputs into fresh tensors. Parameters are
// copied each call, so adapters of the same shape share one entry, and the per-call h1 and stats
// keep every forward's state for its own backward. A problem is captured the second time it is seen
// (the first runs directly, which also warms cuBLAS up); entries past the cache's capacity go least
// recently used first. MONA_KERNELS_CUDA_GRAPHS sets the capacity (default kDefaultGraphs, 0 turns
// the graphs off); mona_kernels.ops.cuda_ext.graph_cache changes it at run time.

constexpr int64_t kDefaultGraphs = 8;

struct Entry {
  at::cuda::CUDAGraph fwd, bwd;
  bool fwd_ready = false, bwd_ready = false;
  int fwd_seen = 0, bwd_seen = 0;
  uint64_t last_use = 0;
  Tensor x, g, seed;  // static inputs (g: the upstream gradient; the forward's out buffer when dtypes agree)
  Params params;
  Tensor out, h1, stats;  // the forward's outputs; h1 and stats are the backward's inputs too
  Grads grads;            // the backward's outputs
};

using Key = std::vector<int64_t>;

struct GraphCache {
  std::mutex mu;
  std::map<Key, std::unique_ptr<Entry>> entries;
  int64_t capacity = -1;  // read from the environment on first use
  uint64_t clock = 0;

  int64_t cap() {
    if (capacity < 0) {
      const char* env = std::getenv("MONA_KERNELS_CUDA_GRAPHS");
      capacity = kDefaultGraphs;
      if (env != nullptr && *env != '\0') {
        char* end = nullptr;
        const long long v = std::strtoll(env, &end, 10);
        TORCH_CHECK(end != env && *end == '\0' && v >= 0, "MONA_KERNELS_CUDA_GRAPHS must be a count >= 0, got '",
                    env, "'");
        capacity = v;
      }
    }
    return capacity;
  }

  // Evicts least recently used entries down to n; the device is synchronised before each goes, since a
  // graph's memory returns to the allocator with it.
  void shrink_to(int64_t n) {
    while ((int64_t)entries.size() > n) {
      auto oldest = entries.begin();
      for (auto it = entries.begin(); it != entries.end(); ++it) {
        if (it->second->last_use < oldest->second->last_use) oldest = it;
      }
      check_cuda(cudaDeviceSynchronize(), "graph cache eviction");
      entries.erase(oldest);
    }
  }

  // The entry of `key`; created (evicting as needed) when `create`. Null when the graphs are off.
  Entry* find(const Key& key, bool create) {
    if (cap() == 0) return nullptr;
    auto it = entries.find(key);
    if (it == entries.end()) {
      if (!create) return nullptr;
      shrink_to(cap() - 1);
      it = entries.emplace(key, std::make_unique<Entry>()).first;
    }
    it->second->last_use = ++clock;
    return it->second.get();
  }
};

GraphCache& graph_cache_instance() {
  static auto* cache = new GraphCache;  // never destroyed: graphs must not be freed after the CUDA context
  return *cache;
}

// The cache key of a call, or an empty key when the call cannot take a graph (the stream is being
// captured already, an empty problem, parameters not contiguous or elsewhere).
Key graph_key(const Tensor& x, const Params& P, const Problem& pb) {
  if (x.numel() == 0) return {};
  cudaStreamCaptureStatus status;
  check_cuda(cudaStreamIsCapturing(current_stream(), &status), "capture query");
  if (status != cudaStreamCaptureStatusNone) return {};
  Key key{x.device().index(), (int64_t)reinterpret_cast<uintptr_t>(current_stream()), pb.B, pb.H, pb.W,
          x.size(-1), (int64_t)x.scalar_type(), (int64_t)pb.cdt};
  for (const Tensor& t : P) {
    if (!t.is_contiguous() || t.device() != x.device()) return {};
    key.push_back((int64_t)t.scalar_type());
    key.push_back(t.dim());
    key.insert(key.end(), t.sizes().begin(), t.sizes().end());
  }
  uint32_t bits[2];
  std::memcpy(&bits[0], &pb.eps, 4);
  std::memcpy(&bits[1], &pb.p, 4);
  key.push_back(bits[0]);
  key.push_back(bits[1]);
  return key;
}

uint64_t* seed_ptr(const Tensor& t) { return reinterpret_cast<uint64_t*>(t.data_ptr()); }

// The stream graphs are captured on: one per device for the process. PyTorch keeps a cuBLAS
// workspace (32 MiB on Hopper) for every stream a GEMM has run on and never frees it, so drawing a
// new pool stream for each capture left up to one workspace per pool stream allocated.
c10::cuda::CUDAStream capture_stream(c10::DeviceIndex device) {
  static std::mutex mu;
  static auto* streams = new std::map<c10::DeviceIndex, c10::cuda::CUDAStream>;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = streams->find(device);
  if (it == streams->end()) it = streams->emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
  return it->second;
}

// Runs fn on the capture stream (graphs are captured off the current stream), ordered after the
// current stream's work and before its next.
template <typename Fn>
void on_side_stream(const Tensor& like, Fn&& fn) {
  auto cur = c10::cuda::getCurrentCUDAStream();
  auto side = capture_stream(like.device().index());
  at::cuda::CUDAEvent before, after;
  before.record(cur);
  before.block(side);
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    fn();
  }
  after.record(side);
  after.block(cur);
}

void capture_forward(Entry& e, const Tensor& x, const Params& P, const Problem& pb) {
  e.x = x.clone();
  for (int k = 0; k < kParams; ++k) e.params[k] = P[k].clone();
  e.seed = torch::zeros({1}, x.options().dtype(at::kLong));
  on_side_stream(x, [&] {
    run_forward(e.x, e.params, pb, 0, seed_ptr(e.seed));  // warm-up: lazy initialisation stays out of the graph
    e.fwd.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    Saved r = run_forward(e.x, e.params, pb, 0, seed_ptr(e.seed));
    e.fwd.capture_end();
    e.out = r.out;
    e.h1 = r.h1;
    e.stats = r.stats;
  });
  e.fwd_ready = true;
}

void capture_backward(Entry& e, const Tensor& g, const Problem& pb) {
  // The forward's output buffer is free between the forward's copy-out and the next forward replay,
  // and the backward's upstream gradient has its shape: one buffer serves both when the dtypes agree.
  e.g = g.scalar_type() == e.out.scalar_type() ? e.out.view(g.sizes()) : g.clone();
  e.g.copy_(g);
  on_side_stream(g, [&] {
    Saved sv{{}, e.h1, e.stats, {}, {}};
    run_backward(e.g, e.x, sv, e.params, pb, 0, seed_ptr(e.seed));  // warm-up
    e.bwd.capture_begin(e.fwd.pool(), cudaStreamCaptureModeThreadLocal);
    e.grads = run_backward(e.g, e.x, sv, e.params, pb, 0, seed_ptr(e.seed));
    e.bwd.capture_end();
  });
  e.bwd_ready = true;
}

// Empty tensors shaped and typed like templ[0..n) in one allocation, 16-byte aligned each: one
// allocator call instead of n (on a slow host, a large share of a replayed call's cost).
void allocate_together(const Tensor* templ, Tensor* out, int n) {
  std::vector<int64_t> offset(n);
  int64_t bytes = 0;
  for (int k = 0; k < n; ++k) {
    offset[k] = bytes;
    bytes += ((int64_t)templ[k].nbytes() + 15) / 16 * 16;
  }
  auto flat = torch::empty({bytes}, templ[0].options().dtype(at::kByte));
  for (int k = 0; k < n; ++k) {
    auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(flat.storage()), flat.key_set(), templ[k].dtype());
    impl->set_sizes_contiguous(templ[k].sizes());
    impl->set_storage_offset(offset[k] / (int64_t)templ[k].element_size());
    out[k] = Tensor(std::move(impl));
  }
}

// The largest staging list: g, x, h1 and stats, then the parameters.
static_assert(4 + kParams <= mona::kMaxCopyJobs, "a staging list outgrows mona::CopyList");

// Adds the copies of the call's parameters into the entry's, and the call's dropout seed, to `list`.
void stage_params_and_seed(mona::CopyList& list, const Params& P, Entry& e, uint64_t seed) {
  for (int k = 0; k < kParams; ++k) list.add(P[k].data_ptr(), e.params[k].data_ptr(), P[k].nbytes());
  list.seed = seed;
  list.seed_dst = seed_ptr(e.seed);
}

// The forward through the graph cache; false when this call runs directly instead.
bool forward_replayed(const Tensor& x, const Params& P, const Problem& pb, uint64_t seed, Saved& r) {
  const Key key = graph_key(x, P, pb);
  if (key.empty()) return false;
  auto& cache = graph_cache_instance();
  const std::lock_guard<std::mutex> lock(cache.mu);
  Entry* e = cache.find(key, true);
  if (e == nullptr) return false;
  if (!e->fwd_ready) {
    if (e->fwd_seen++ == 0) return false;
    capture_forward(*e, x, P, pb);
  }
  r.out = torch::empty_like(e->out);
  const Tensor saved[2] = {e->h1, e->stats};
  Tensor fresh[2];
  allocate_together(saved, fresh, 2);
  r.h1 = fresh[0];
  r.stats = fresh[1];
  mona::CopyList in;
  in.add(x.data_ptr(), e->x.data_ptr(), x.nbytes());
  stage_params_and_seed(in, P, *e, seed);
  const int sms = sm_count(x);
  check_cuda(mona::multi_copy(in, sms, current_stream()), "multi_copy");
  e->fwd.replay();
  mona::CopyList out;
  out.add(e->out.data_ptr(), r.out.data_ptr(), r.out.nbytes());
  out.add(e->h1.data_ptr(), r.h1.data_ptr(), r.h1.nbytes());
  out.add(e->stats.data_ptr(), r.stats.data_ptr(), r.stats.nbytes());
  check_cuda(mona::multi_copy(out, sms, current_stream()), "multi_copy");
  return true;
}

// The backward through the graph cache (only where the forward was captured); false when this call
// runs directly instead.
bool backward_replayed(const Tensor& g, const Tensor& x, const Saved& sv, const Params& P, const Problem& pb,
                       uint64_t seed, Grads& out) {
  const Key key = graph_key(x, P, pb);
  if (key.empty()) return false;
  auto& cache = graph_cache_instance();
  const std::lock_guard<std::mutex> lock(cache.mu);
  Entry* e = cache.find(key, false);
  if (e == nullptr || !e->fwd_ready) return false;
  if (!e->bwd_ready) {
    if (e->bwd_seen++ == 0) return false;
    capture_backward(*e, g, pb);
  }
  if (g.scalar_type() != e->g.scalar_type()) return false;
  mona::CopyList in;
  in.add(g.data_ptr(), e->g.data_ptr(), g.nbytes());
  in.add(x.data_ptr(), e->x.data_ptr(), x.nbytes());
  in.add(sv.h1.data_ptr(), e->h1.data_ptr(), sv.h1.nbytes());
  in.add(sv.stats.data_ptr(), e->stats.data_ptr(), sv.stats.nbytes());
  stage_params_and_seed(in, P, *e, seed);
  const int sms = sm_count(x);
  check_cuda(mona::multi_copy(in, sms, current_stream()), "multi_copy");
  e->bwd.replay();
  out[0] = torch::empty_like(e->grads[0]);  // dx on its own: the parameter gradients may outlive it
  allocate_together(e->grads.data() + 1, out.data() + 1, kParams);
  mona::CopyList copies;
  for (int k = 0; k <= kParams; ++k) copies.add(e->grads[k].data_ptr(), out[k].data_ptr(), out[k].nbytes());
  check_cuda(mona::multi_copy(copies, sms, current_stream()), "multi_copy");
  return true;
}

struct Adapter : public torch::autograd::Function<Adapter> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor w_ln, Tensor b_ln, Tensor gamma, Tensor gammax,
                        Tensor W1, Tensor b1, Tensor w3, Tensor b3, Tensor w5, Tensor b5, Tensor w7, Tensor b7,
                        Tensor Wp, Tensor bp, Tensor W2, Tensor b2, int64_t B, int64_t H, int64_t W, double eps,
                        double p, int64_t seed, std::optional<Tensor> seed_dev, at::ScalarType cdt) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const c10::cuda::CUDAGuard guard(x.device());
    const Params P{w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, Wp, bp, W2, b2};
    const Problem pb{B, H, W, (float)eps, (float)p, cdt};
    Saved r;
    if (seed_dev.has_value()) {
      // A seed on the device (drawn inside a caller's capture): every replay of that capture rewrites
      // it, and the kernels read it at run time. The graph cache stages host seeds only.
      r = run_forward(x, P, pb, 0, seed_ptr(*seed_dev));
      ctx->saved_data["seed_dev"] = *seed_dev;
    } else if (!forward_replayed(x, P, pb, (uint64_t)seed, r)) {
      r = run_forward(x, P, pb, (uint64_t)seed, nullptr);
    }
    ctx->save_for_backward({x, w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, Wp, bp, W2, b2});
    ctx->saved_data["h1"] = r.h1;
    ctx->saved_data["stats"] = r.stats;
    if (r.lnp.defined()) {
      ctx->saved_data["lnp"] = r.lnp;
      ctx->saved_data["small"] = r.small;
    }
    ctx->saved_data["bhw_seed"] = std::vector<int64_t>{B, H, W, seed};
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["p"] = p;
    return r.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    Params P;
    for (int k = 0; k < kParams; ++k) P[k] = saved[k + 1];
    const c10::cuda::CUDAGuard guard(x.device());
    auto& data = ctx->saved_data;
    Saved sv;
    sv.h1 = data["h1"].toTensor();
    sv.stats = data["stats"].toTensor();
    if (data.count("lnp") != 0) {
      sv.lnp = data["lnp"].toTensor();
      sv.small = data["small"].toTensor();
    }
    const auto bhw_seed = data["bhw_seed"].toIntVector();
    const Problem pb{bhw_seed[0], bhw_seed[1], bhw_seed[2], (float)data["eps"].toDouble(),
                     (float)data["p"].toDouble(), sv.h1.scalar_type()};  // h1 is in the compute dtype
    const auto seed = (uint64_t)bhw_seed[3];
    const int64_t C = x.size(-1), M = x.numel() / C;
    auto g = grads[0].reshape({M, C}).contiguous();
    Grads out;
    if (data.count("seed_dev") != 0) {
      out = run_backward(g, x, sv, P, pb, 0, seed_ptr(data["seed_dev"].toTensor()));
    } else if (!backward_replayed(g, x, sv, P, pb, seed, out)) {
      out = run_backward(g, x, sv, P, pb, seed, nullptr);
    }
    variable_list result(out.begin(), out.end());
    result.resize(result.size() + 8);  // B, H, W, eps, p, the two seeds and the compute dtype take no gradient
    return result;
  }
};

}  // namespace

torch::Tensor mona_adapter(torch::Tensor x, int64_t B, int64_t H, int64_t W, torch::Tensor w_ln, torch::Tensor b_ln,
                           torch::Tensor gamma, torch::Tensor gammax, torch::Tensor W1, torch::Tensor b1,
                           torch::Tensor w3, torch::Tensor b3, torch::Tensor w5, torch::Tensor b5, torch::Tensor w7,
                           torch::Tensor b7, torch::Tensor Wp, torch::Tensor bp, torch::Tensor W2, torch::Tensor b2,
                           double eps, double p, int64_t seed, std::optional<torch::Tensor> seed_dev,
                           at::ScalarType compute_dtype) {
  TORCH_CHECK(x.dim() >= 2, "x must have rank 2 or more, got ", x.dim());
  check_input(x, "x", x.dim());
  TORCH_CHECK(x.numel() == B * H * W * x.size(-1), "x has ", x.numel() / std::max<int64_t>(1, x.size(-1)),
              " tokens but B*H*W = ", B * H * W);
  check_channels(x.size(-1));
  if (seed_dev.has_value()) {
    TORCH_CHECK(seed_dev->scalar_type() == at::kLong && seed_dev->numel() == 1 && seed_dev->device() == x.device(),
                "seed_dev must be one int64 on x's device, got ", seed_dev->scalar_type(), " with ",
                seed_dev->numel(), " elements on ", seed_dev->device());
  }
  return Adapter::apply(x, w_ln, b_ln, gamma, gammax, W1, b1, w3, b3, w5, b5, w7, b7, Wp, bp, W2, b2, B, H, W, eps, p,
                        seed, seed_dev, compute_dtype);
}

int64_t graph_cache(int64_t capacity) {
  auto& cache = graph_cache_instance();
  const std::lock_guard<std::mutex> lock(cache.mu);
  const int64_t previous = cache.cap();
  if (capacity >= 0) {
    cache.capacity = capacity;
    cache.shrink_to(capacity);
  }
  return previous;
}
