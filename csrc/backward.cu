// The backward pass's kernels: LN-scaling backward, the merged kernel's gradient, the GELU and
// dropout backward, the split of the kernel gradient into the three convs', and the fixed-order
// sum of per-slot partials.
#include "common.cuh"

namespace mona {
namespace {

constexpr int kWgradRows = 7;  // threadIdx.y of the wgrad kernel: the tap row it accumulates

template <typename T, typename TD, int VEC, int CH>
__global__ void __launch_bounds__(512, kLnMinBlocks) ln_scale_bwd_kernel(
    const TD* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    const float* __restrict__ gamma, const float* __restrict__ gammax, const float* __restrict__ mean,
    const float* __restrict__ rstd, const T* __restrict__ residual, T* __restrict__ dx, float* __restrict__ partial,
    int64_t M, int C) {
  extern __shared__ float scratch[];
  constexpr int R = kLnBwdRows;
  const int slots = blockDim.y;
  // acc[k][0..3][e]: column sums over the rows of this slot of dy * xn, dy * x, dy and the residual;
  // the epilogue scales them into the five partial rows
  float acc[CH][4][VEC];
#pragma unroll
  for (int k = 0; k < CH; ++k)
#pragma unroll
    for (int r = 0; r < 4; ++r) zero(acc[k][r]);
  for (int64_t base = (int64_t)blockIdx.x * slots * R; base < M; base += (int64_t)gridDim.x * slots * R) {
    float xv[R][CH][VEC], gv[R][CH][VEC], res[R][CH][VEC], mu[R], rs[R];
    float sums[2][R];  // row sums of t = dy * gamma * w and of t * xn
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = base + r * slots + threadIdx.y;
      const bool row_ok = row < M;
      mu[r] = row_ok ? mean[row] : 0.f;
      rs[r] = row_ok ? rstd[row] : 0.f;
      sums[0][r] = sums[1][r] = 0.f;
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (row_ok && c < C) {
          load_vec<T, VEC>(x + row * C + c, xv[r][k]);
          load_vec<TD, VEC>(dy + row * C + c, gv[r][k]);
          if (residual != nullptr) {
            load_vec<T, VEC>(residual + row * C + c, res[r][k]);
          } else {
            zero(res[r][k]);
          }
        } else {
          zero(xv[r][k]);
          zero(gv[r][k]);
          zero(res[r][k]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * VEC;
      if (c >= C) continue;
      float gw[VEC], wv[VEC];
      load_floats(gamma + c, gw);
      load_floats(w + c, wv);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float t = gv[r][k][e] * gw[e] * wv[e];
          sums[0][r] += t;
          sums[1][r] += t * (xv[r][k][e] - mu[r]) * rs[r];
        }
    }
    row_sums(sums, scratch);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = base + r * slots + threadIdx.y;
      if (row >= M) continue;
      const float mean_t = sums[0][r] / C, mean_txn = sums[1][r] / C;
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (c >= C) continue;
        float wv[VEC], gmv[VEC], gxv[VEC], out[VEC];
        load_floats(w + c, wv);
        load_floats(gamma + c, gmv);
        load_floats(gammax + c, gxv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float g = gv[r][k][e], xe = xv[r][k][e], xn = (xe - mu[r]) * rs[r];
          out[e] = g * gxv[e] + rs[r] * (g * gmv[e] * wv[e] - mean_t - xn * mean_txn) + res[r][k][e];
          acc[k][0][e] += g * xn;
          acc[k][1][e] += g * xe;
          acc[k][2][e] += g;
          acc[k][3][e] += res[r][k][e];
        }
        store_vec<T, VEC>(dx + row * C + c, out);
      }
    }
  }
  // One partial slot per block: row slot 0's threads add the other slots' sums in slot order. A block
  // has several row slots only when bx < 256, hence CH == 1 and slots * C <= 256 * VEC floats a row.
  float* red = scratch + (size_t)slots * (blockDim.x / 32) * kLnSums * kLnRows;
  float* out = partial + (int64_t)blockIdx.x * 5 * C;
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = (k * blockDim.x + threadIdx.x) * VEC;
    if (c >= C) continue;
    if (slots > 1) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) red[((int64_t)threadIdx.y * 4 + r) * C + c + e] = acc[k][r][e];
    }
  }
  if (slots > 1) __syncthreads();
  if (threadIdx.y != 0) return;
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = (k * blockDim.x + threadIdx.x) * VEC;
    if (c >= C) continue;
    float sum[4][VEC], wv[VEC], bv[VEC], gmv[VEC];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float v = acc[k][r][e];
        for (int q = 1; q < slots; ++q) v += red[((int64_t)q * 4 + r) * C + c + e];
        sum[r][e] = v;
      }
    load_floats(w + c, wv);
    load_floats(b + c, bv);
    load_floats(gamma + c, gmv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      out[c + e] = sum[0][e] * wv[e] + sum[2][e] * bv[e];  // gamma: sum of dy * (xn * w + b)
      out[(int64_t)C + c + e] = sum[1][e];                // gammax: sum of dy * x
      out[(int64_t)2 * C + c + e] = sum[0][e] * gmv[e];   // LN weight: sum of dy * gamma * xn
      out[(int64_t)3 * C + c + e] = sum[2][e] * gmv[e];   // LN bias: sum of dy * gamma
      out[(int64_t)4 * C + c + e] = sum[3][e];            // the residual's column sums
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel gradient. Thread (channel group, tap row u = threadIdx.y) walks segments of image rows;
// along a segment it slides a 7-wide window over input row i + u - 3, so each step loads one h
// vector and one dout vector for 7 * VEC multiply-adds. The window lives in registers with
// rotating compile-time indices (steps unrolled by 7). Each block writes one slot of partials.

template <typename T, int VEC>
__global__ void __launch_bounds__(kWgradRows * 32) dwconv7_wgrad_kernel(
    const T* __restrict__ h, const T* __restrict__ dout, float* __restrict__ partial, int H, int W, int D,
    int seg_len, int segs_per_row, int64_t units) {
  const int groups = D / VEC;
  const int g = blockIdx.y * blockDim.x + threadIdx.x;
  const int u = threadIdx.y;
  const int64_t slot = blockIdx.x;
  if (g >= groups) return;
  const int c = g * VEC;
  float acc[kKernel][VEC], dsum[VEC];
#pragma unroll
  for (int v = 0; v < kKernel; ++v) zero(acc[v]);
  zero(dsum);
  for (int64_t unit = slot; unit < units; unit += gridDim.x) {
    const int seg = (int)(unit % segs_per_row);
    const int64_t row = unit / segs_per_row;  // b * H + i
    const int i = (int)(row % H);
    const int ii = i + u - kHalo;
    if (ii < 0 || ii >= H) continue;
    const int j0 = seg * seg_len;
    const T* hrow = h + (row + u - kHalo) * (int64_t)W * D + c;
    const T* grow = dout + row * (int64_t)W * D + c;
    float win[kKernel][VEC];
#pragma unroll
    for (int s = 0; s < kKernel - 1; ++s) {
      const int col = j0 - kHalo + s;
      if (col >= 0 && col < W) {
        load_vec<T, VEC>(hrow + (int64_t)col * D, win[s]);
      } else {
        zero(win[s]);
      }
    }
    for (int jb = 0; jb < seg_len; jb += kKernel) {
#pragma unroll
      for (int s = 0; s < kKernel; ++s) {
        const int j = j0 + jb + s;
        const int col = j + kHalo;
        // window slot of column j + v - 3 is (jb + s + v) % 7 == (s + v) % 7: jb is a multiple of 7
        if (col < W) {
          load_vec<T, VEC>(hrow + (int64_t)col * D, win[(s + kKernel - 1) % kKernel]);
        } else {
          zero(win[(s + kKernel - 1) % kKernel]);
        }
        if (j < W) {
          float gv[VEC];
          load_vec<T, VEC>(grow + (int64_t)j * D, gv);
          if (u == kHalo) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) dsum[e] += gv[e];
          }
#pragma unroll
          for (int v = 0; v < kKernel; ++v)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[v][e] += gv[e] * win[(s + v) % kKernel][e];
        }
      }
    }
  }
  float* mine = partial + slot * (kTaps + 1) * D + c;
#pragma unroll
  for (int v = 0; v < kKernel; ++v)
#pragma unroll
    for (int e = 0; e < VEC; ++e) mine[(int64_t)(u * kKernel + v) * D + e] = acc[v][e];
  if (u == kHalo) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) mine[(int64_t)kTaps * D + e] = dsum[e];
  }
}

struct WgradShape {
  int seg_len, segs_per_row;
  int64_t units;
};

WgradShape wgrad_shape(int64_t B, int64_t H, int64_t W) {
  WgradShape s;
  s.seg_len = (int)cdiv(std::min<int64_t>(W, 63), kKernel) * kKernel;
  s.segs_per_row = (int)cdiv(W, s.seg_len);
  s.units = B * H * s.segs_per_row;
  return s;
}


template <typename T, int TH, int TW>
constexpr size_t wgrad_smem_bytes() {
  return sizeof(T) * ((TH + 6) * (TW + 6) + TH * TW) * kTileChannels;
}

template <typename T, int TH, int TW>
__global__ void __launch_bounds__(kPairs * kKernel) dwconv7_wgrad_smem_kernel(
    const T* __restrict__ h, const T* __restrict__ dout, float* __restrict__ partial, int H, int W, int D,
    int col_tiles, int row_tiles, int64_t n_tiles) {
  constexpr int kCols = TW + 2 * kHalo;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* htile = reinterpret_cast<T*>(smem_raw);
  T* gtile = htile + (TH + 2 * kHalo) * kCols * kTileChannels;
  const int cp = threadIdx.x, u = threadIdx.y;
  const int c0 = blockIdx.y * kTileChannels;
  float2 acc[kKernel], dsum = make_float2(0.f, 0.f);
#pragma unroll
  for (int v = 0; v < kKernel; ++v) acc[v] = make_float2(0.f, 0.f);
  for (int64_t t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    int64_t r = t;
    const int ct = (int)(r % col_tiles);
    r /= col_tiles;
    const int rt = (int)(r % row_tiles);
    const int64_t img = r / row_tiles;
    const int i0 = rt * TH, j0 = ct * TW;
    __syncthreads();  // the previous tile's readers are done
    stage_tile(h, htile, img, i0 - kHalo, j0 - kHalo, TH + 2 * kHalo, kCols, c0, H, W, D);
    stage_tile(dout, gtile, img, i0, j0, TH, TW, c0, H, W, D);
    __syncthreads();
    for (int oi = 0; oi < TH; ++oi) {
      const T* hrow = htile + ((oi + u) * kCols) * kTileChannels + 2 * cp;
      const T* grow = gtile + (oi * TW) * kTileChannels + 2 * cp;
      float2 hr[TW + 2 * kHalo];
#pragma unroll
      for (int k = 0; k < TW + 2 * kHalo; ++k) hr[k] = load_pair(hrow + k * kTileChannels);
#pragma unroll
      for (int q = 0; q < TW; ++q) {
        const float2 g = load_pair(grow + q * kTileChannels);
        if (u == kHalo) {
          dsum.x += g.x;
          dsum.y += g.y;
        }
#pragma unroll
        for (int v = 0; v < kKernel; ++v) {
          acc[v].x += g.x * hr[q + v].x;
          acc[v].y += g.y * hr[q + v].y;
        }
      }
    }
  }
  const int c = c0 + 2 * cp;
  if (c >= D) return;
  float* mine = partial + (int64_t)blockIdx.x * (kTaps + 1) * D + c;
#pragma unroll
  for (int v = 0; v < kKernel; ++v) {
    mine[(int64_t)(u * kKernel + v) * D] = acc[v].x;
    mine[(int64_t)(u * kKernel + v) * D + 1] = acc[v].y;
  }
  if (u == kHalo) {
    mine[(int64_t)kTaps * D] = dsum.x;
    mine[(int64_t)kTaps * D + 1] = dsum.y;
  }
}


template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kGeluBwdBlocks) gelu_dropout_bwd_kernel(
    const T* __restrict__ da, const T* __restrict__ h3, const float* __restrict__ bias, T* __restrict__ dh3,
    T* __restrict__ dh3_copy, float* __restrict__ partial, int64_t M, int D, uint64_t seed,
    const uint64_t* __restrict__ seed_dev, float p, float scale) {
  __shared__ float lanes[kThreads * 4];
  if (seed_dev != nullptr) seed = *seed_dev;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  const bool active = c < D;
  float acc[VEC], bv[VEC];
  zero(acc);
  zero(bv);
  if (active && bias != nullptr) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) bv[e] = __ldg(bias + c + e);
  }
  float g[kGeluUnroll][VEC], hv[kGeluUnroll][VEC];
  walk_rows(
      active ? M : 0, D, c,
      [&](int64_t row0) {
        load_rows(da, row0, M, D, c, g);
        load_rows(h3, row0, M, D, c, hv);
      },
      [&](int u, int64_t off) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[u][e] *= gelu_grad(hv[u][e] + bv[e]);
          if (p > 0.f) g[u][e] *= keep_scale(seed, (uint64_t)(off + e), p, scale);
          acc[e] += g[u][e];
        }
        store_vec<T, VEC>(dh3 + off, g[u]);
        if (dh3_copy != nullptr) store_vec<T, VEC>(dh3_copy + off, g[u]);
      });
  float* mine = lanes + (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
  for (int e = 0; e < VEC; ++e) mine[e] = acc[e];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    float v = acc[e];
    for (int q = 1; q < (int)blockDim.y; ++q) v += lanes[(q * blockDim.x + threadIdx.x) * VEC + e];
    partial[(int64_t)blockIdx.x * D + c + e] = v;
  }
}


template <typename T>
__global__ void split_kernel_grad_kernel(const float* __restrict__ dKb, T* __restrict__ dw3, T* __restrict__ db3,
                                         T* __restrict__ dw5, T* __restrict__ db5, T* __restrict__ dw7,
                                         T* __restrict__ db7, int D) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int t = blockIdx.y;
  if (c >= D) return;
  const T g = from_float<T>(__fdiv_rn(dKb[(int64_t)t * D + c], 3.f));
  if (t == kTaps) {
    db3[c] = g;
    db5[c] = g;
    db7[c] = g;
    return;
  }
  const int u = t / kKernel, w = t % kKernel;
  dw7[(int64_t)c * kTaps + t] = g;
  if (in_centre(u, w, 5)) dw5[(int64_t)c * 25 + centre_index(u, w, 5)] = g;
  if (in_centre(u, w, 3)) dw3[(int64_t)c * 9 + centre_index(u, w, 3)] = g;
}


// ---------------------------------------------------------------------------------------------
// out[k] = sum over slots of partial[s][k]: block = 32 columns x 16 slot lanes; lane l sums slots
// l, l + 16, ... in order, then lane 0 adds the 16 lane sums in order.
template <typename T>
__global__ void sum_slots_kernel(const float* __restrict__ partial, T* __restrict__ out, int64_t slots, int64_t n) {
  __shared__ float lanes[16][33];
  const int64_t k = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (k < n) {
    for (int64_t q = threadIdx.y; q < slots; q += 16) s += partial[q * n + k];
  }
  lanes[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && k < n) {
    float total = 0.f;
    for (int l = 0; l < 16; ++l) total += lanes[l][threadIdx.x];
    out[k] = from_float<T>(total);
  }
}


}  // namespace

// The kernel gradient takes shared-memory tiles from maps of this many pixels (the A/B is beside the
// conv's threshold in forward.cu).
constexpr int64_t kWgradTileMinPixels = 1024;

int ln_bwd_slots(int64_t M, int64_t C, int sms) { return ln_blocks(M, sms); }

template <typename T, typename TD>
cudaError_t ln_scale_bwd(const TD* dy, const T* x, LnWeights pw, const float* mean, const float* rstd,
                         const T* residual, T* dx, float* partial, int slots, int64_t M, int64_t C,
                         cudaStream_t stream) {
  if (M == 0) return cudaMemsetAsync(partial, 0, sizeof(float) * slots * 5 * C, stream);
  const float *w = pw.w, *b = pw.b, *gamma = pw.gamma, *gammax = pw.gammax;
  const RowShape s = ln_layout(C, aligned(x, 4 * sizeof(T)) && aligned(dy, 4 * sizeof(TD)) &&
                                      aligned(dx, 4 * sizeof(T)) && aligned(residual, 4 * sizeof(T)) &&
                                      aligned(w, 16) && aligned(b, 16) && aligned(gamma, 16) && aligned(gammax, 16));
  const int blocks = slots;  // one partial slot per block
  const dim3 block(s.bx, s.slots_per_block);
  const size_t smem = ln_smem(s, C, true);
  pick_row_layout(s, [&](auto vec, auto ch) {
    ln_scale_bwd_kernel<T, TD, decltype(vec)::value, decltype(ch)::value><<<blocks, block, smem, stream>>>(
        dy, x, w, b, gamma, gammax, mean, rstd, residual, dx, partial, M, (int)C);
  });
  return cudaGetLastError();
}

int wgrad_slots(const Map& m, int sms) {
  const WgradShape s = wgrad_shape(m.B, m.H, m.W);
  return (int)std::max<int64_t>(1, std::min<int64_t>(s.units, 8 * (int64_t)sms));
}

template <typename T, int TH, int TW>
cudaError_t launch_wgrad_smem(const T* h, const T* dout, float* partial, int slots, const Map& m,
                              cudaStream_t stream) {
  const int64_t B = m.B, H = m.H, W = m.W, D = m.D;
  const int col_tiles = (int)cdiv(W, TW), row_tiles = (int)cdiv(H, TH);
  const dim3 grid((unsigned)slots, (unsigned)cdiv(D, kTileChannels));  // one partial slot per block
  const dim3 block(kPairs, kKernel);
  constexpr size_t smem = wgrad_smem_bytes<T, TH, TW>();
  auto kernel = dwconv7_wgrad_smem_kernel<T, TH, TW>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, block, smem, stream>>>(h, dout, partial, (int)H, (int)W, (int)D, col_tiles, row_tiles,
                                        B * col_tiles * row_tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dwconv7_wgrad(const T* h, const T* dout, float* partial, int slots, const Map& m, int variant,
                          cudaStream_t stream) {
  const int64_t B = m.B, H = m.H, W = m.W, D = m.D;
  const WgradShape s = wgrad_shape(B, H, W);
  if (D == 0) return cudaSuccess;
  if (variant < 0) variant = H * W >= kWgradTileMinPixels ? 2 : 0;
  if (variant >= 2 && smem_tiles_fit<T>(D, {h, dout})) {
    if (variant == 3 && smem_available(wgrad_smem_bytes<T, 4, 32>()))
      return launch_wgrad_smem<T, 4, 32>(h, dout, partial, slots, m, stream);
    if (variant != 3 && smem_available(wgrad_smem_bytes<T, 8, 16>()))
      return launch_wgrad_smem<T, 8, 16>(h, dout, partial, slots, m, stream);
  }
  const int want = variant == 1 ? 2 : 4;  // channels a thread: 4 (default) or 2 (fewer registers)
  const int vec = D % want == 0 && aligned(h, want * sizeof(T)) && aligned(dout, want * sizeof(T)) ? want : 1;
  const int64_t groups = D / vec;
  const int bx = (int)std::min<int64_t>(groups, 32);
  const dim3 grid((unsigned)slots, (unsigned)cdiv(groups, bx));  // one partial slot per block
  const dim3 block(bx, kWgradRows);
  pick<4, 2, 1>(vec, [&](auto v) {
    dwconv7_wgrad_kernel<T, decltype(v)::value><<<grid, block, 0, stream>>>(
        h, dout, partial, (int)H, (int)W, (int)D, s.seg_len, s.segs_per_row, s.units);
  });
  return cudaGetLastError();
}

int gelu_bwd_slots(int64_t M, int64_t, int sms) {
  return (int)std::max<int64_t>(1, std::min<int64_t>(cdiv(M, 16), kGeluBwdBlocks * (int64_t)sms));
}

template <typename T>
cudaError_t gelu_dropout_bwd(const T* da, const T* h3, const float* bias, T* dh3, T* dh3_copy, float* partial,
                             int slots, int64_t M, int64_t D, const Dropout& drop, cudaStream_t stream) {
  if (M * D == 0) return cudaMemsetAsync(partial, 0, sizeof(float) * slots * D, stream);
  const float p = drop.p, scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  const ColShape s = col_shape(D, sizeof(T), da, h3, dh3, dh3_copy);
  const dim3 grid((unsigned)slots, (unsigned)cdiv(D / s.vec, s.bx));  // one partial slot per block
  const dim3 block(s.bx, s.by);
  pick<4, 1>(s.vec, [&](auto v) {
    gelu_dropout_bwd_kernel<T, decltype(v)::value>
        <<<grid, block, 0, stream>>>(da, h3, bias, dh3, dh3_copy, partial, M, (int)D, drop.seed, drop.seed_dev, p,
                                          scale);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t split_kernel_grad(const float* dKb, T* dw3, T* db3, T* dw5, T* db5, T* dw7, T* db7, int64_t D,
                              cudaStream_t stream) {
  if (D == 0) return cudaSuccess;
  split_kernel_grad_kernel<T><<<dim3((unsigned)cdiv(D, 64), kTaps + 1), 64, 0, stream>>>(dKb, dw3, db3, dw5, db5,
                                                                                         dw7, db7, (int)D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sum_slots(const float* partial, T* out, int64_t slots, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  sum_slots_kernel<T><<<(unsigned)cdiv(n, 32), dim3(32, 16), 0, stream>>>(partial, out, slots, n);
  return cudaGetLastError();
}

#define MONA_INSTANTIATE_LN(T, T2) \
  template cudaError_t ln_scale_bwd<T, T2>(const T2*, const T*, LnWeights, const float*, const float*, const T*, \
                                           T*, float*, int, int64_t, int64_t, cudaStream_t);

MONA_FOR_LN_TYPES(MONA_INSTANTIATE_LN)

#define MONA_INSTANTIATE(T)                                                                                      \
  template cudaError_t dwconv7_wgrad<T>(const T*, const T*, float*, int, const Map&, int, cudaStream_t);         \
  template cudaError_t gelu_dropout_bwd<T>(const T*, const T*, const float*, T*, T*, float*, int, int64_t,      \
                                           int64_t, const Dropout&, cudaStream_t);                               \
  template cudaError_t sum_slots<T>(const float*, T*, int64_t, int64_t, cudaStream_t);                           \
  template cudaError_t split_kernel_grad<T>(const float*, T*, T*, T*, T*, T*, T*, int64_t, cudaStream_t);

MONA_FOR_TYPES(MONA_INSTANTIATE)

}  // namespace mona
