// The forward pass's kernels: LN-scaling, the merged 7x7 depthwise conv (also the input gradient's,
// with the kernel rotated), GELU with dropout, and the merge of the three convs' weights.
#include "common.cuh"

namespace mona {
namespace {

template <typename T, typename TY, int VEC, int CH>
__global__ void __launch_bounds__(512, kLnMinBlocks) ln_scale_fwd_kernel(
    const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    const float* __restrict__ gamma, const float* __restrict__ gammax, TY* __restrict__ y, float* __restrict__ mean,
    float* __restrict__ rstd, int64_t M, int C, float eps) {
  extern __shared__ float scratch[];
  constexpr int R = kLnFwdRows;
  const int slots = blockDim.y;
  const LnParams<VEC, CH> prm(w, b, gamma, gammax, C);
  for (int64_t base = (int64_t)blockIdx.x * slots * R; base < M; base += (int64_t)gridDim.x * slots * R) {
    float xv[R][CH][VEC];
    float s[1][R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = base + r * slots + threadIdx.y;
      s[0][r] = 0.f;
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (row < M && c < C) {
          load_vec<T, VEC>(x + row * C + c, xv[r][k]);
        } else {
          zero(xv[r][k]);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[0][r] += xv[r][k][e];
      }
    }
    row_sums(s, scratch);
    float mu[R], q[1][R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      mu[r] = s[0][r] / C;
      q[0][r] = 0.f;
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (c < C) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) q[0][r] += (xv[r][k][e] - mu[r]) * (xv[r][k][e] - mu[r]);
        }
      }
    }
    row_sums(q, scratch);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = base + r * slots + threadIdx.y;
      if (row >= M) continue;
      const float rs = rsqrtf(q[0][r] / C + eps);
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (c >= C) continue;
        float out[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xe = xv[r][k][e];
          out[e] = ((xe - mu[r]) * rs * prm.w[k][e] + prm.b[k][e]) * prm.g[k][e] + xe * prm.gx[k][e];
        }
        store_vec<TY, VEC>(y + row * C + c, out);
      }
      if (threadIdx.x == 0 && mean != nullptr) {
        mean[row] = mu[r];
        rstd[row] = rs;
      }
    }
  }
}

// dy is read in TD (the projections' dtype under autocast, so that no cast of dy comes first).

// ---------------------------------------------------------------------------------------------
// The merged 7x7 depthwise conv. A thread computes kConvRows output rows of one column for VEC
// channels: for each tap column v it loads the kConvRows + 6 inputs of column j + v - 3 once and
// applies them to every tap row, so an input is loaded (R + 6) / R times per tap column instead of
// seven, and the 49 weights of its channels are read once per strip.

// R rows a thread and MIN_BLOCKS resident blocks an SM (the register budget) are tuning choices,
// measured by graph-replayed sweeps on an H200.
template <typename T, int VEC, bool FLIP, int R, int MIN_BLOCKS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) dwconv7_kernel(
    const T* __restrict__ h, const float* __restrict__ K, const float* __restrict__ bias, T* __restrict__ out,
    T* __restrict__ out2, int H, int W, int D, int col_tiles, int row_tiles) {
  const int groups = D / VEC;
  const int g = blockIdx.y * blockDim.x + threadIdx.x;
  int64_t t = blockIdx.x;
  const int ct = (int)(t % col_tiles);
  t /= col_tiles;
  const int rt = (int)(t % row_tiles);
  const int64_t img = t / row_tiles;
  const int j = ct * blockDim.y + threadIdx.y;
  if (g >= groups || j >= W) return;
  const int c = g * VEC;
  const int i0 = rt * R;
  float acc[R][VEC];
  float bv[VEC];
  if (bias != nullptr) {
    load_floats(bias + c, bv);
  } else {
    zero(bv);
  }
#pragma unroll
  for (int o = 0; o < R; ++o)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[o][e] = bv[e];
  const T* plane = h + img * H * (int64_t)W * D + c;
#pragma unroll
  for (int v = 0; v < kKernel; ++v) {
    const int jj = j + v - kHalo;
    if (jj < 0 || jj >= W) continue;
    float col[R + kKernel - 1][VEC];
#pragma unroll
    for (int r = 0; r < R + kKernel - 1; ++r) {
      const int ii = i0 + r - kHalo;
      if (ii >= 0 && ii < H) {
        load_vec<T, VEC>(plane + ((int64_t)ii * W + jj) * D, col[r]);
      } else {
        zero(col[r]);
      }
    }
#pragma unroll
    for (int u = 0; u < kKernel; ++u) {
      const int tap = FLIP ? kTaps - 1 - (u * kKernel + v) : u * kKernel + v;
      float wv[VEC];
      load_floats(K + (int64_t)tap * D + c, wv);
#pragma unroll
      for (int o = 0; o < R; ++o)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[o][e] += col[o + u][e] * wv[e];
    }
  }
  const int64_t base = img * H * (int64_t)W * D + c;
#pragma unroll
  for (int o = 0; o < R; ++o) {
    if (i0 + o >= H) continue;
    const int64_t off = base + ((int64_t)(i0 + o) * W + j) * D;
    store_vec<T, VEC>(out + off, acc[o]);
    if (out2 != nullptr) store_vec<T, VEC>(out2 + off, acc[o]);
  }
}


template <typename T, int TH, int TW>
constexpr size_t conv_smem_bytes() {
  return sizeof(float) * (kTaps + 1) * kTileChannels + sizeof(T) * (TH + 6) * (TW + 6) * kTileChannels;
}

template <typename T, bool FLIP, int TH, int TW, int R, int Q, int MIN_BLOCKS>
__global__ void __launch_bounds__(kPairs * (TH / R) * (TW / Q), MIN_BLOCKS) dwconv7_smem_kernel(
    const T* __restrict__ h, const float* __restrict__ K, const float* __restrict__ bias, T* __restrict__ out,
    T* __restrict__ out2, int H, int W, int D, int col_tiles, int row_tiles) {
  constexpr int kCols = TW + 2 * kHalo;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* wsm = reinterpret_cast<float*>(smem_raw);  // (50, 64): taps, then bias
  T* tile = reinterpret_cast<T*>(wsm + (kTaps + 1) * kTileChannels);
  int64_t t = blockIdx.x;
  const int ct = (int)(t % col_tiles);
  t /= col_tiles;
  const int rt = (int)(t % row_tiles);
  const int64_t img = t / row_tiles;
  const int c0 = blockIdx.y * kTileChannels;
  const int i0 = rt * TH, j0 = ct * TW;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int k = tid; k < (kTaps + 1) * kTileChannels; k += blockDim.x * blockDim.y) {
    const int tap = k / kTileChannels, c = c0 + k % kTileChannels;
    float v = 0.f;
    if (c < D) {
      if (tap < kTaps) {
        v = K[(int64_t)(FLIP ? kTaps - 1 - tap : tap) * D + c];
      } else if (bias != nullptr) {
        v = bias[c];
      }
    }
    wsm[k] = v;
  }
  stage_tile(h, tile, img, i0 - kHalo, j0 - kHalo, TH + 2 * kHalo, kCols, c0, H, W, D);
  __syncthreads();

  const int cp = threadIdx.x;
  const int oi = (threadIdx.y / (TW / Q)) * R, oj = (threadIdx.y % (TW / Q)) * Q;
  const float2* w2 = reinterpret_cast<const float2*>(wsm) + cp;  // tap t of this pair: w2[t * kPairs]
  const float2 b = w2[kTaps * kPairs];
  float acc[R][Q][2];
#pragma unroll
  for (int o = 0; o < R; ++o)
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      acc[o][q][0] = b.x;
      acc[o][q][1] = b.y;
    }
#pragma unroll
  for (int r = 0; r < R + 2 * kHalo; ++r) {
    float2 row[Q + 2 * kHalo];
    const T* src = tile + ((oi + r) * kCols + oj) * kTileChannels + 2 * cp;
#pragma unroll
    for (int k = 0; k < Q + 2 * kHalo; ++k) row[k] = load_pair(src + k * kTileChannels);
#pragma unroll
    for (int o = 0; o < R; ++o) {
      const int u = r - o;  // the tap row joining input row r to output row o
      if (u < 0 || u >= kKernel) continue;
#pragma unroll
      for (int v = 0; v < kKernel; ++v) {
        const float2 w = w2[(u * kKernel + v) * kPairs];
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          acc[o][q][0] += row[q + v].x * w.x;
          acc[o][q][1] += row[q + v].y * w.y;
        }
      }
    }
  }
  const int c = c0 + 2 * cp;
  if (c >= D) return;
#pragma unroll
  for (int o = 0; o < R; ++o) {
    const int i = i0 + oi + o;
    if (i >= H) continue;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int j = j0 + oj + q;
      if (j >= W) continue;
      const int64_t off = ((img * H + i) * (int64_t)W + j) * D + c;
      store_pair(out + off, acc[o][q][0], acc[o][q][1]);
      if (out2 != nullptr) store_pair(out2 + off, acc[o][q][0], acc[o][q][1]);
    }
  }
}

// Kernel gradient from shared-memory tiles: thread (channel pair, tap row u = threadIdx.y) sums
// dout(i, j) * h(i + u - 3, j + v - 3) over the tile for its seven taps v, reading an input row of
// TW + 6 pixels once per output row. Blocks loop over tiles and write one partial slot each.

template <typename T>
__global__ void merge_kernels_kernel(const T* __restrict__ w3, const T* __restrict__ b3, const T* __restrict__ w5,
                                     const T* __restrict__ b5, const T* __restrict__ w7, const T* __restrict__ b7,
                                     const T* __restrict__ bp, float* __restrict__ out, int D) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int t = blockIdx.y;
  if (c >= D) return;
  float v;
  if (t < kTaps) {
    const int u = t / kKernel, w = t % kKernel;
    float s = 0.f;
    if (in_centre(u, w, 3)) s += to_float(w3[(int64_t)c * 9 + centre_index(u, w, 3)]);
    if (in_centre(u, w, 5)) s += to_float(w5[(int64_t)c * 25 + centre_index(u, w, 5)]);
    s += to_float(w7[(int64_t)c * kTaps + t]);
    v = __fdiv_rn(s, 3.f) + (t == kTaps / 2 ? 1.f : 0.f);
  } else if (t == kTaps) {
    v = __fdiv_rn(to_float(b3[c]) + to_float(b5[c]) + to_float(b7[c]), 3.f);
  } else {
    v = to_float(bp[c]);
  }
  out[(int64_t)t * D + c] = v;
}

// dKb (50, D): rows 0..48 the merged kernel's gradient, row 49 its bias's. Block y = tap, or 49: biases.

template <typename T, int VEC>
__global__ void gelu_dropout_fwd_kernel(const T* __restrict__ h3, const float* __restrict__ bias, T* __restrict__ a,
                                        int64_t M, int D, uint64_t seed, const uint64_t* __restrict__ seed_dev,
                                        float p, float scale) {
  if (seed_dev != nullptr) seed = *seed_dev;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (c >= D) return;
  float bv[VEC];
  zero(bv);
  if (bias != nullptr) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) bv[e] = __ldg(bias + c + e);
  }
  float v[kGeluUnroll][VEC];
  walk_rows(
      M, D, c, [&](int64_t row0) { load_rows(h3, row0, M, D, c, v); },
      [&](int u, int64_t off) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[u][e] = gelu(v[u][e] + bv[e]);
          if (p > 0.f) v[u][e] *= keep_scale(seed, (uint64_t)(off + e), p, scale);
        }
        store_vec<T, VEC>(a + off, v[u]);
      });
}

// Block = (bx channel groups) x (by row lanes); each thread sums dh3 of its channels over its rows,
// then lane 0 adds the other lanes' sums in lane order: one partial slot per block.

}  // namespace

int64_t ln_max_channels(int64_t) { return 2048; }

template <typename T, typename TY>
cudaError_t ln_scale_fwd(const T* x, LnWeights pw, TY* y, float* mean, float* rstd, int64_t M, int64_t C, float eps,
                         int sms, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const float *w = pw.w, *b = pw.b, *gamma = pw.gamma, *gammax = pw.gammax;
  const RowShape s = ln_layout(C, aligned(x, 4 * sizeof(T)) && aligned(y, 4 * sizeof(TY)) && aligned(w, 16) &&
                                      aligned(b, 16) && aligned(gamma, 16) && aligned(gammax, 16));
  const dim3 block(s.bx, s.slots_per_block);
  const size_t smem = ln_smem(s, C, false);
  const int blocks = ln_blocks(M, sms);
  pick_row_layout(s, [&](auto vec, auto ch) {
    ln_scale_fwd_kernel<T, TY, decltype(vec)::value, decltype(ch)::value>
        <<<blocks, block, smem, stream>>>(x, w, b, gamma, gammax, y, mean, rstd, M, (int)C, eps);
  });
  return cudaGetLastError();
}

template <typename T, int R, int MIN_BLOCKS>
cudaError_t launch_conv(const T* h, const float* K, const float* bias, T* out, T* out2, const Map& m, bool flip,
                        cudaStream_t stream) {
  const int64_t B = m.B, H = m.H, W = m.W, D = m.D;
  const int vec = D % 4 == 0 && aligned(h, 4 * sizeof(T)) && aligned(out, 4 * sizeof(T)) &&
                          aligned(out2, 4 * sizeof(T)) && aligned(K, 16) && aligned(bias, 16) ? 4 : 1;
  const int64_t groups = D / vec;
  const int bx = (int)std::min<int64_t>(groups, 32);
  const int by = kThreads / bx;
  const int col_tiles = (int)cdiv(W, by), row_tiles = (int)cdiv(H, R);
  const dim3 grid((unsigned)(B * col_tiles * row_tiles), (unsigned)cdiv(groups, bx));
  const dim3 block(bx, by);
  pick<4, 1>(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (flip) {
      dwconv7_kernel<T, V, true, R, MIN_BLOCKS>
          <<<grid, block, 0, stream>>>(h, K, bias, out, out2, (int)H, (int)W, (int)D, col_tiles, row_tiles);
    } else {
      dwconv7_kernel<T, V, false, R, MIN_BLOCKS>
          <<<grid, block, 0, stream>>>(h, K, bias, out, out2, (int)H, (int)W, (int)D, col_tiles, row_tiles);
    }
  });
  return cudaGetLastError();
}

// A negative variant: the shared-memory tiles from maps of these many pixels, the register kernels below.
// Same-call A/B in the adapter (bf16 H200, GPU time of fwd+bwd): the
// tiles took 0.77x at 2x200x336, 0.81x at 32x56x56 and 0.86-0.90x at 128x128, 100x168 and 50x84;
// at 14x14 they cost 5%; at 32x32 the wgrad's gained 2% and the conv's lost 2%. With at least
// kConvBusyTiles tiles an SM, the conv tiles held to 64 registers (4 blocks an SM) took 1-4% less
// (0.758 / 0.799 / 0.827 against 0.766 / 0.808 / 0.858 ms at 2x200x336, 32x56x56, 4x128x128);
// with fewer (2x50x84, 84 tiles) 1% more, and the kernel alone 9% more at 32x28x28 (256 tiles).
constexpr int64_t kConvTileMinPixels = 2048, kConvBusyTiles = 2;
// The tile (rows x columns a block) of the conv variants chosen by shape, 4 and 7.
constexpr int kConvTileRows = 8, kConvTileCols = 16;

template <typename T, int TH, int TW, int R, int Q, int MIN_BLOCKS = 1>
cudaError_t launch_conv_smem(const T* h, const float* K, const float* bias, T* out, T* out2, const Map& m, bool flip,
                             cudaStream_t stream) {
  const int64_t B = m.B, H = m.H, W = m.W, D = m.D;
  const int col_tiles = (int)cdiv(W, TW), row_tiles = (int)cdiv(H, TH);
  const dim3 grid((unsigned)(B * col_tiles * row_tiles), (unsigned)cdiv(D, kTileChannels));
  const dim3 block(kPairs, (TH / R) * (TW / Q));
  constexpr size_t smem = conv_smem_bytes<T, TH, TW>();
  if (!smem_available(smem)) return dwconv7_fwd<T>(h, K, bias, out, out2, m, flip, 0, stream);
  auto kernel = flip ? dwconv7_smem_kernel<T, true, TH, TW, R, Q, MIN_BLOCKS>
                     : dwconv7_smem_kernel<T, false, TH, TW, R, Q, MIN_BLOCKS>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, block, smem, stream>>>(h, K, bias, out, out2, (int)H, (int)W, (int)D, col_tiles, row_tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dwconv7_fwd(const T* h, const float* K, const float* bias, T* out, T* out2, const Map& m, bool flip,
                        int variant, cudaStream_t stream) {
  const int64_t B = m.B, H = m.H, W = m.W, D = m.D;
  if (B * H * W * D == 0) return cudaSuccess;
  if (variant < 0) {
    const int64_t tiles = B * cdiv(H, kConvTileRows) * cdiv(W, kConvTileCols) * cdiv(D, kTileChannels);
    const int64_t sms = current_device_attr<cudaDevAttrMultiProcessorCount>();
    variant = H * W < kConvTileMinPixels ? 0 : tiles >= kConvBusyTiles * sms ? 7 : 4;
  }
  if (variant >= 4 && !smem_tiles_fit<T>(D, {h, out, out2})) variant = 0;
  switch (variant) {
    case 4: return launch_conv_smem<T, kConvTileRows, kConvTileCols, 2, 8>(h, K, bias, out, out2, m, flip,
                                                                           stream);
    case 5: return launch_conv_smem<T, 8, 16, 4, 4>(h, K, bias, out, out2, m, flip, stream);
    case 6: return launch_conv_smem<T, 8, 32, 2, 8>(h, K, bias, out, out2, m, flip, stream);
    case 7: return launch_conv_smem<T, kConvTileRows, kConvTileCols, 2, 8, 4>(h, K, bias, out, out2, m, flip,
                                                                              stream);
    case 8: return launch_conv_smem<T, 8, 32, 2, 8, 2>(h, K, bias, out, out2, m, flip, stream);
    // measured on the H200 at 2x200x336x64 bf16: 87, 123, 93 and 140 us
    case 1: return launch_conv<T, 8, 2>(h, K, bias, out, out2, m, flip, stream);
    case 2: return launch_conv<T, 4, 4>(h, K, bias, out, out2, m, flip, stream);
    case 3: return launch_conv<T, 6, 2>(h, K, bias, out, out2, m, flip, stream);
    default: return launch_conv<T, 4, 3>(h, K, bias, out, out2, m, flip, stream);
  }
}

template <typename T>
cudaError_t gelu_dropout_fwd(const T* h3, const float* bias, T* a, int64_t M, int64_t D, const Dropout& drop,
                             cudaStream_t stream) {
  if (M * D == 0) return cudaSuccess;
  const float p = drop.p, scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const ColShape s = col_shape(D, sizeof(T), h3, a, nullptr, nullptr);
  const int64_t row_blocks = std::min<int64_t>(cdiv(M, (int64_t)s.by * kGeluUnroll), 65535);
  const dim3 grid((unsigned)row_blocks, (unsigned)cdiv(D / s.vec, s.bx));
  const dim3 block(s.bx, s.by);
  pick<4, 1>(s.vec, [&](auto v) {
    gelu_dropout_fwd_kernel<T, decltype(v)::value>
        <<<grid, block, 0, stream>>>(h3, bias, a, M, (int)D, drop.seed, drop.seed_dev, p, scale);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t merge_kernels(const T* w3, const T* b3, const T* w5, const T* b5, const T* w7, const T* b7, const T* bp,
                          float* out, int64_t D, cudaStream_t stream) {
  if (D == 0) return cudaSuccess;
  merge_kernels_kernel<T><<<dim3((unsigned)cdiv(D, 64), kTaps + 2), 64, 0, stream>>>(w3, b3, w5, b5, w7, b7, bp, out,
                                                                                     (int)D);
  return cudaGetLastError();
}

#define MONA_INSTANTIATE_LN(T, T2) \
  template cudaError_t ln_scale_fwd<T, T2>(const T*, LnWeights, T2*, float*, float*, int64_t, int64_t, float, int, \
                                           cudaStream_t);

MONA_FOR_LN_TYPES(MONA_INSTANTIATE_LN)

#define MONA_INSTANTIATE(T)                                                                                      \
  template cudaError_t dwconv7_fwd<T>(const T*, const float*, const float*, T*, T*, const Map&, bool, int,     \
                                      cudaStream_t);                                                             \
  template cudaError_t gelu_dropout_fwd<T>(const T*, const float*, T*, int64_t, int64_t, const Dropout&,       \
                                           cudaStream_t);                                                        \
  template cudaError_t merge_kernels<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*,   \
                                        float*, int64_t, cudaStream_t);

MONA_FOR_TYPES(MONA_INSTANTIATE)

}  // namespace mona
