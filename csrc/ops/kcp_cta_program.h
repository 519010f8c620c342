// The work of one CTA of the fused kcp CUDA kernel (cuda/kcp_cuda.cu), written
// once against an executor so the same code runs on the GPU and, in the tests,
// on the CPU (kcp_cta_emulate.cpp), where every phase's indexing, padding and
// buffer reuse is checked against the reference without a GPU.
//
// The executor ex provides:
//   ex.threads(count, f)   f(i) for every i < count, spread over the CTA's threads
//   ex.warps(count, f)     f(t) for every 16 x 16 output tile t < count, one warp each
//   ex.sync()              a CTA barrier (__syncthreads)
//   ex.mma_store<BCol>(A, lda, B, ldb, K, D, ldd)
//                          D (16 x 16, operand dtype) = A (16 x K, row-major) @ B (K x 16,
//                          row-major, or column-major when BCol), fp32 accumulation
//   ex.mma_accum(A, lda, B, ldb, K, C, ldc)
//                          C (16 x 16 fp32) += A @ B (B row-major)
// Between two ex.sync() calls no item reads what another item of the same
// phase writes (the emulator runs the phases and items forwards and backwards to check).
// Every phase's ex.sync() sits in the scope of the locals its items use: the
// emulator defers a phase until the barrier, so those locals must still live.
//
// A CTA owns tile_h x tile_w output pixels of one image (kcp_cta_params.h).
// Channels of the input are (s1, s2); (q, n) pairs, "qn", are walked in blocks
// of nb, each block's intermediates in shared memory:
//   per chunk of hc halo pixels hp (the input pixels the tile's taps read):
//     load xs[s1][hp][s2] = the input (zero outside the image and for s1 >= S1)   (region a)
//     G0   z0[qn][hp][s2] = sum_s1 bs[qn][s1] xs[s1][hp][s2]                      (region a, after xs)
//     G1   z1[qn][r][hp]  = sum_s2 as[n][r][s2] z0[qn][hp][s2]                    (region b)
//   D      z3[qn][r][p]    = sum_(i,j) ah[n][r][i] aw[n][r][j] z1[qn][r][tap(p, i, j)]   (region a)
//   G4     z4[qn][t2][p]   = sum_r at[n][t2][r] z3[qn][r][p]             (region b)
//   G5     y[t1][t2][p]   += sum_qn bt[t1][qn] z4[qn][t2][p]             (fp32)
//   merged y[t][p]        += sum_(qn,r) M[t][qn][r] z3[qn][r][p]         (instead of G4, G5)
// and at the end out = y + bias. The intermediates are rounded to the operand
// dtype between stages, as the composite chain rounds its activations.
// Where the tiles alone give too few CTAs (batch 1), the qn blocks are split
// over `splits` CTAs per tile: each writes its partial y to a fp32 workspace,
// and kcp_cta_finalize (a second launch) sums the splits in order and adds the bias.
// The input is read once per block (from L2 after the first): holding it for
// the whole CTA took more shared memory than the tiles worth running.
// Every tap's input pixel is a halo pixel, so the depthwise stages need no
// bounds checks: a pixel outside the image has z1 = 0, the conv's zero padding.
#pragma once

#include "kcp_cta_params.h"

#ifdef __CUDACC__
#define KCP_FN __device__ __forceinline__
#else
#define KCP_FN inline
#endif

namespace hsv {

template <typename S, typename Exec>
KCP_FN void kcp_cta_run(const KcpParams& p, long long cta, unsigned char* smem, Exec& ex) {
  const int per_image = p.tiles_y * p.tiles_x;
  const long long per_split = static_cast<long long>(p.batch) * per_image;
  const int split = static_cast<int>(cta / per_split);
  const long long b = (cta - split * per_split) / per_image;
  const int tile = static_cast<int>(cta - split * per_split - b * per_image);
  const int qn_begin = split * p.split_blocks * p.nb;
  const int qn_end = qn_begin + p.split_blocks * p.nb < p.qnp ? qn_begin + p.split_blocks * p.nb : p.qnp;
  const int oy0 = (tile / p.tiles_x) * p.tile_h, ox0 = (tile % p.tiles_x) * p.tile_w;
  const int iy0 = oy0 * p.stride_h - p.pad_h, ix0 = ox0 * p.stride_w - p.pad_w;
  S* const xs = reinterpret_cast<S*>(smem + p.off_a);
  S* const za = reinterpret_cast<S*>(smem + p.off_a);
  S* const zb = reinterpret_cast<S*>(smem + p.off_b);
  float* const y = reinterpret_cast<float*>(smem + p.off_y);
  const S* const x = static_cast<const S*>(p.x) + b * p.sn;
  const int P = p.p, S2 = p.S2, chans = p.s1p * S2;

  ex.threads(p.y_rows * P, [&](int i) { y[i] = 0.0f; });

  S* const z0 = xs + chans * p.hc;  // after the chunk's input in region a
  const int ld0 = p.hc * S2;        // z0: one (hc x S2) block per qn
  for (int qn0 = qn_begin; qn0 < qn_end; qn0 += p.nb) {
    // G0 and G1 walk the halo in chunks of hc pixels, so that only a chunk's input and z0 are held.
    for (int hc0 = 0; hc0 < p.hp; hc0 += p.hc) {
      const int nh = p.hp - hc0 < p.hc ? p.hp - hc0 : p.hc;
      // the input at halo pixels hc0 .. + nh: xs[s1][j][s2], zero outside the image and for s1 >= S1
      ex.threads(chans * nh, [&](int i) {
        int c, j;
        if (p.in_channels_fastest) {
          c = i % chans;
          j = i / chans;
        } else {
          j = i % nh;
          c = i / nh;
        }
        const int s1 = c / S2, s2 = c - s1 * S2, hp = hc0 + j;
        const int iy = iy0 + p.row_off[hp / p.ncols], ix = ix0 + p.col_off[hp % p.ncols];
        float v = 0.0f;
        if (s1 < p.S1 && static_cast<unsigned>(iy) < static_cast<unsigned>(p.h) &&
            static_cast<unsigned>(ix) < static_cast<unsigned>(p.w))
          v = static_cast<float>(x[c * p.sc + iy * p.sh + ix * p.sw]);
        xs[(s1 * p.hc + j) * S2 + s2] = static_cast<S>(v);
      });
      ex.sync();
      {  // G0: z0 (nb x nh*S2, rows ld0 apart) = bs[qn0 .. +nb] (nb x s1p) @ xs (s1p x nh*S2, rows ld0 apart)
        const int nt = nh * S2 / 16;
        const S* bs = static_cast<const S*>(p.bs) + qn0 * p.s1p;
        ex.warps(p.nb / 16 * nt, [&](int t) {
          const int mi = t / nt, ni = t - mi * nt;
          ex.template mma_store<false>(bs + mi * 16 * p.s1p, p.s1p, xs + ni * 16, ld0, p.s1p,
                                       z0 + mi * 16 * ld0 + ni * 16, ld0);
        });
        ex.sync();
      }
      {  // G1, per qn: z1[:, hc0 ..] (rp x nh, rounded up to 16) = as[n] (rp x S2) @ z0[qn]^T (column-major)
        const int mt = p.rp / 16, nt = (nh + 15) / 16;  // columns past hp: never read
        ex.warps(p.nb * mt * nt, [&](int t) {
          const int qn = t / (mt * nt), rest = t - qn * (mt * nt), mi = rest / nt, ni = rest - mi * nt;
          const int n = (qn0 + qn) % p.N;
          const S* as = static_cast<const S*>(p.as) + (n * p.rp + mi * 16) * S2;
          ex.template mma_store<true>(as, S2, z0 + qn * ld0 + ni * 16 * S2, S2, S2,
                                      zb + (qn * p.rp + mi * 16) * p.hpp + hc0 + ni * 16, p.hpp);
        });
        ex.sync();
      }
    }
    // D: the kh x 1 and 1 x kw depthwise taps of every output pixel, fp32
    ex.threads(p.nb * p.rp * P, [&](int i) {
      const int px = i % P, qr = i / P, r = qr % p.rp, qn = qr / p.rp;
      float acc = 0.0f;
      if (r < p.R) {
        const int n = (qn0 + qn) % p.N;
        const float* ah = p.ah + (n * p.R + r) * p.kh;
        const float* aw = p.aw + (n * p.R + r) * p.kw;
        const S* z = zb + (qn * p.rp + r) * p.hpp;
        const int ty = px / p.tile_w, tx = px - ty * p.tile_w;
        for (int di = 0; di < p.kh; ++di) {
          const S* zrow = z + p.row_slot[ty * p.kh + di] * p.ncols;
          float s = 0.0f;
          for (int dj = 0; dj < p.kw; ++dj) s += aw[dj] * static_cast<float>(zrow[p.col_slot[tx * p.kw + dj]]);
          acc += ah[di] * s;
        }
      }
      za[(qn * p.rp + r) * P + px] = static_cast<S>(acc);
    });
    ex.sync();
    if (p.merged) {  // y (coutp x P) += M[:, qn0 .. +nb, :] (coutp x nb*rp) @ z3 (nb*rp x P)
      const int nt = P / 16, lda = p.qnp * p.rp;
      const S* m = static_cast<const S*>(p.m) + qn0 * p.rp;
      ex.warps(p.coutp / 16 * nt, [&](int t) {
        const int mi = t / nt, ni = t - mi * nt;
        ex.mma_accum(m + mi * 16 * lda, lda, za + ni * 16, P, p.nb * p.rp, y + mi * 16 * P + ni * 16, P);
      });
      ex.sync();
    } else {
      {  // G4, per qn: z4 (T2 x P) = at[n] (T2 x rp) @ z3[qn] (rp x P)
        const int mt = p.T2 / 16, nt = P / 16;
        ex.warps(p.nb * mt * nt, [&](int t) {
          const int qn = t / (mt * nt), rest = t - qn * (mt * nt), mi = rest / nt, ni = rest - mi * nt;
          const int n = (qn0 + qn) % p.N;
          const S* at = static_cast<const S*>(p.at) + (n * p.T2 + mi * 16) * p.rp;
          ex.template mma_store<false>(at, p.rp, za + qn * p.rp * P + ni * 16, P, p.rp,
                                       zb + (qn * p.T2 + mi * 16) * P + ni * 16, P);
        });
        ex.sync();
      }
      {  // G5: y (t1p x T2*P) += bt[:, qn0 .. +nb] (t1p x nb) @ z4 (nb x T2*P)
        const int nt = p.T2 * P / 16, ld = p.T2 * P;
        const S* bt = static_cast<const S*>(p.bt) + qn0;
        ex.warps(p.t1p / 16 * nt, [&](int t) {
          const int mi = t / nt, ni = t - mi * nt;
          ex.mma_accum(bt + mi * 16 * p.qnp, p.qnp, zb + ni * 16, ld, p.nb, y + mi * 16 * ld + ni * 16, ld);
        });
        ex.sync();
      }
    }
  }

  if (p.splits > 1) {  // this split's partial y, to the workspace (ws[split][b][t][oy][ox])
    float* const ws = p.ws + split * p.ws_split + b * p.cout * static_cast<long long>(p.ho) * p.wo;
    ex.threads(p.cout * P, [&](int i) {
      const int px = i % P, t = i / P;
      const int oy = oy0 + px / p.tile_w, ox = ox0 + px % p.tile_w;
      if (oy < p.ho && ox < p.wo) ws[(static_cast<long long>(t) * p.ho + oy) * p.wo + ox] = y[t * P + px];
    });
    ex.sync();
    return;
  }
  // out = y + bias (rows t = t1 * T2 + t2 of y are the output channels either way)
  S* const out = static_cast<S*>(p.out) + b * p.on;
  ex.threads(p.cout * P, [&](int i) {
    int t, px;
    if (p.out_channels_fastest) {
      t = i % p.cout;
      px = i / p.cout;
    } else {
      px = i % P;
      t = i / P;
    }
    const int oy = oy0 + px / p.tile_w, ox = ox0 + px % p.tile_w;
    if (oy < p.ho && ox < p.wo) {
      const float v = y[t * P + px] + (p.bias != nullptr ? p.bias[t] : 0.0f);
      out[t * p.oc + oy * p.oh + ox * p.ow] = static_cast<S>(v);
    }
  });
  ex.sync();
}

// Element i (of batch x cout x ho x wo, in that order) of the output when splits > 1:
// the splits' partial sums in order, plus the bias.
template <typename S>
KCP_FN void kcp_cta_finalize(const KcpParams& p, long long i) {
  const long long hw = static_cast<long long>(p.ho) * p.wo;
  const long long b = i / (p.cout * hw), rest = i - b * p.cout * hw;
  const int t = static_cast<int>(rest / hw);
  const int oy = static_cast<int>((rest % hw) / p.wo), ox = static_cast<int>(rest % p.wo);
  float v = p.bias != nullptr ? p.bias[t] : 0.0f;
  for (int s = 0; s < p.splits; ++s) v += p.ws[s * p.ws_split + i];
  static_cast<S*>(p.out)[b * p.on + t * p.oc + oy * p.oh + ox * p.ow] = static_cast<S>(v);
}

}  // namespace hsv
