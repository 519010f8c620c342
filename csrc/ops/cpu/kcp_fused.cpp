// Fused forward of kind "kcp" (factor layout in hsvkernels/formats/kcp.py, the
// chain in chain/kind_kcp.cpp). Input channels are (s1, s2); the middle
// activations have channels c = (q*N + n)*R + r (C1 = Q*N*R of them):
//   stage 0  z0[s2][(q,n)]  = sum_s1 bs[q,n,s1] x[s1*S2 + s2]        per input pixel
//   stage 1  z1[(q,n),r]    = sum_s2 as[n,r,s2] z0[s2][(q,n)]         per input pixel
//   stage 2  kh x 1 depthwise on z1 (the layer's height stride, padding, dilation)
//   stage 3  1 x kw depthwise (the width's)
//   stage 4  z4[(q,n),t2]   = sum_r at[n,t2,r] z3[(q,n),r]            per output pixel
//   stage 5  y[t1*T2 + t2]  = bias + sum_(q,n) bt[t1,q,n] z4[(q,n),t2]
//   merged   y[t]           = bias + sum_c M[t,c] z3[c]               (stages 4 and 5 as one GEMM)
// The composite chain runs these as six ATen convs (two grouped, two
// depthwise), each a pass over memory with the batch folded into the channels
// or the height, most of them far from peak. Here a thread takes whole bands of
// output rows of one image and walks each band in groups of TH output rows. Per
// group it computes only the z1 rows the group's taps need that the previous
// group did not (a sliding window over input rows: each row once per band),
// then per output row the two depthwise passes, then stages 4 and 5 on the
// group's pixels, and writes the group's output once. Only the input rows and
// columns some tap reads are computed (a stride-2 1x1 layer skips three
// quarters of its input). The GEMMs use the microkernels two ways round, so
// every A operand is read along contiguous rows (strided A reads, one cache
// line per element, made an earlier version 4x slower):
//   stages 1, 4 and merged: pixels as rows, one small GEMM per (q, n) with
//     K = S2 or R, B the packed factor;
//   stages 0 and 5: one GEMM per pixel, factor rows as rows and the pixel's
//     own (S1 x S2) input or (QN x T2) z4 as B (the input packed into panels
//     per pixel, z4 written by stage 4 already in panel form).
// Stages 2 and 3 vectorize over channels (Microkernel::depthwise). Factors are
// packed once and cached against the factor tensors (pack.h).
#include "kcp_fused.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "kernel_util.h"
#include "pack.h"

namespace hsv {
namespace cpu {
namespace {

// A depthwise factor f (N, R, taps) as `taps` rows of C1 = Q*N*R channel
// weights: row t, channel (q*N + n)*R + r holds f[n][r][t].
at::Tensor depthwise_rows(const at::Tensor& f, int64_t q, const char* role) {
  return packed_cached(f, std::string("kcp.") + role + ":q" + std::to_string(q), [&] {
    const int64_t n = f.size(0), r = f.size(1), taps = f.size(2);
    return f.permute({2, 0, 1}).unsqueeze(1).expand({taps, q, n, r}).contiguous().view({taps, q * n * r});
  });
}

struct Problem {
  int64_t mr = 0;
  int64_t Q = 0, N = 0, R = 0, S1 = 0, S2 = 0, T2 = 0, QN = 0, C1 = 0, cout = 0;
  bool merged = false;
  int64_t kh = 0, kw = 0, H = 0, W = 0, Ho = 0, Wo = 0;
  ConvParams cv;
  const float* x = nullptr;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;  // input strides (elements)
  Panels g1, g4, gf;  // stage 1 (as, per n), 4 (at, per n), merged (M)
  const Microkernel* uk0 = nullptr;  // stage 0: N = S2 (per pixel)
  int64_t s2_pad = 0;                // S2 rounded up to uk0's NR
  const float* bs = nullptr;         // (QN, S1) row-major
  const float* bt = nullptr;         // (T1, QN) row-major
  int64_t T1 = 0;
  const float* zeros = nullptr;      // a zero row of max(S1, QN) floats
  const float* bias = nullptr;       // Cout floats (zeros without bias)
  const float* ah = nullptr;  // (kh, C1)
  const float* aw = nullptr;  // (kw, C1)
  DepthwiseFn depthwise = nullptr;
  // zt, the group's output before it is written: per pixel nt1 rows of nt2
  // channels (channel t1*nt2 + t2), rows ld_t1 apart, pixels ldt apart:
  // (T1, T2) from stage 5, or (1, Cout) from the merged GEMM.
  int64_t nt1 = 0, nt2 = 0, ld_t1 = 0, ldt = 0;
  // Stage 3's interior output columns [wa, wb): every tap inside the input, and
  // tap j of column ox at z2 slot wslot[j] + (ox - wa) * wstep (affine), so
  // they run as one depthwise call; wstep < 0: not affine, one call per column.
  int64_t wa = 0, wb = 0, wstep = -1;
  std::vector<int64_t> wslot;
  // Input rows and columns some tap reads, ascending; rank_below[iy] = how many
  // of those rows lie above row iy (H + 1 entries); col_slot[ix] = ix's index
  // in cols, or -1.
  std::vector<int64_t> rows, rank_below, cols, col_slot;
  int64_t ncols = 0;
  int64_t TH = 0, bands = 0, slots = 0;  // output rows per group, bands per image, z1 window (rows)
  int64_t ld0 = 0, ld1 = 0, ldc = 0, ld4 = 0;  // per-pixel lengths (floats) of z0, z1, z2/z3, z4
  float* out = nullptr;
  bool out_nhwc = false;
};

// Per-thread buffers, kept by each thread across calls and only ever grown:
// allocating and zeroing them per call (several MB for 512-channel layers) cost
// more than a batch-1 layer's GEMMs. Stale contents are harmless: every value a
// real output depends on is written in this call before it is read; only the
// spare rows of partial MR blocks read stale data, and they are never written out.
struct Buffers {
  std::vector<float> xpk, z0, z1, z2, z3, z4, zt;
  std::vector<const float*> xs, ws;
  int64_t gp = 0;  // pixel rows of z3, z4 and zt: TH * Wo plus a spare row block
  void fit(const Problem& pb) {
    gp = pb.TH * pb.Wo + pb.mr;
    const auto grow = [](auto& v, int64_t rows, int64_t ld) {
      if (v.size() < static_cast<size_t>(rows * ld)) v.resize(static_cast<size_t>(rows * ld));
    };
    grow(xpk, pb.mr * pb.S1, pb.s2_pad);
    grow(z0, pb.mr, pb.ld0);
    grow(z1, pb.slots * pb.ncols + pb.mr, pb.ld1);
    grow(z2, pb.ncols, pb.ldc);
    grow(z3, gp, pb.ldc);
    grow(z4, gp, pb.ld4);
    grow(zt, gp, pb.ldt);
    grow(xs, std::max(pb.kh, pb.kw), 1);
    grow(ws, std::max(pb.kh, pb.kw), 1);
  }
};

Buffers& thread_buffers(const Problem& pb) {
  thread_local Buffers buf;
  buf.fit(pb);
  return buf;
}

// Stages 0 and 1: z1 for the needed input rows of ranks [r0, r1) of image b,
// into the window whose first row has rank `base` (pixel u of the window is
// row base + u / ncols, column cols[u % ncols]). Whole MR-pixel blocks; a last
// partial block writes scratch rows past the window's rows (buffer slack).
void input_rows(const Problem& pb, Buffers& buf, int64_t b, int64_t base, int64_t r0, int64_t r1) {
  const int64_t mr = pb.mr, nr0 = pb.uk0->nr, S1 = pb.S1, S2 = pb.S2;
  const float* rows[64];
  float* z0 = buf.z0.data();
  float* xpk = buf.xpk.data();
  const int64_t u_end = (r1 - base) * pb.ncols;
  for (int64_t u0 = (r0 - base) * pb.ncols; u0 < u_end; u0 += mr) {
    const int64_t m = std::min(mr, u_end - u0);
    for (int64_t i = 0; i < m; ++i) {
      // stage 0 for pixel i: z0_i (QN x S2) = bs (QN x S1) @ X_i (S1 x S2), X_i
      // the pixel's channels packed into NR-wide panels of s2
      const int64_t u = u0 + i;
      const float* xp = pb.x + b * pb.sn + pb.rows[base + u / pb.ncols] * pb.sh + pb.cols[u % pb.ncols] * pb.sw;
      float* xi = xpk + i * S1 * pb.s2_pad;
      for (int64_t jb = 0; jb < pb.s2_pad / nr0; ++jb)
        for (int64_t s1 = 0; s1 < S1; ++s1) {
          float* d = xi + (jb * S1 + s1) * nr0;
          const int64_t c0 = s1 * S2 + jb * nr0, len = std::min(nr0, S2 - jb * nr0);
          if (pb.sc == 1) {
            std::memcpy(d, xp + c0, sizeof(float) * len);
          } else {
            for (int64_t j = 0; j < len; ++j) d[j] = xp[(c0 + j) * pb.sc];
          }
          for (int64_t j = len; j < nr0; ++j) d[j] = 0.0f;
        }
      float* zi = z0 + i * pb.ld0;
      for (int64_t q0 = 0; q0 < pb.QN; q0 += mr) {
        for (int64_t r = 0; r < mr; ++r) rows[r] = q0 + r < pb.QN ? pb.bs + (q0 + r) * S1 : pb.zeros;
        for (int64_t jb = 0; jb < pb.s2_pad / nr0; ++jb)
          pb.uk0->fn(S1, rows, 1, xi + jb * S1 * nr0, zi + q0 * pb.s2_pad + jb * nr0, pb.s2_pad, false, nullptr);
      }
    }
    // stage 1: per (q, n), K = S2, pixels as rows. Each GEMM writes NR-wide
    // blocks at column qn*R, so a block's padding columns land on the next
    // (q, n)'s columns, which that GEMM then overwrites (ld1 leaves room after
    // the last). Rows past m read stale z0 rows and write scratch rows.
    const Panels& g1 = pb.g1;
    float* c = buf.z1.data() + u0 * pb.ld1;
    for (int64_t qn = 0; qn < pb.QN; ++qn) {
      for (int64_t i = 0; i < mr; ++i) rows[i] = z0 + i * pb.ld0 + qn * pb.s2_pad;
      for (int64_t jb = 0; jb < g1.panels(); ++jb)
        g1.uk->fn(S2, rows, 1, g1.panel(qn % pb.N, jb), c + qn * pb.R + jb * g1.nr(), pb.ld1, false, nullptr);
    }
  }
}

// Stages 2 and 3 for output row oy: z3 rows (oy - oy0) * Wo + ox.
void depthwise_row(const Problem& pb, Buffers& buf, int64_t base, int64_t oy, int64_t oy0) {
  float* z2 = buf.z2.data();
  const float* z1 = buf.z1.data();
  for (int64_t i = 0; i < pb.kh; ++i) {
    const int64_t iy = oy * pb.cv.stride[0] - pb.cv.padding[0] + i * pb.cv.dilation[0];
    buf.xs[i] = (iy >= 0 && iy < pb.H) ? z1 + (pb.rank_below[iy] - base) * pb.ncols * pb.ld1 : nullptr;
    buf.ws[i] = pb.ah + i * pb.C1;
  }
  pb.depthwise(pb.C1, pb.ncols, pb.kh, buf.xs.data(), pb.ld1, buf.ws.data(), z2, pb.ldc);
  for (int64_t j = 0; j < pb.kw; ++j) buf.ws[j] = pb.aw + j * pb.C1;
  float* z3 = buf.z3.data() + (oy - oy0) * pb.Wo * pb.ldc;
  const auto one_column = [&](int64_t ox) {
    for (int64_t j = 0; j < pb.kw; ++j) {
      const int64_t ix = ox * pb.cv.stride[1] - pb.cv.padding[1] + j * pb.cv.dilation[1];
      buf.xs[j] = (ix >= 0 && ix < pb.W) ? z2 + pb.col_slot[ix] * pb.ldc : nullptr;
    }
    pb.depthwise(pb.C1, 1, pb.kw, buf.xs.data(), 0, buf.ws.data(), z3 + ox * pb.ldc, pb.ldc);
  };
  if (pb.wstep < 0) {
    for (int64_t ox = 0; ox < pb.Wo; ++ox) one_column(ox);
    return;
  }
  for (int64_t ox = 0; ox < pb.wa; ++ox) one_column(ox);
  for (int64_t j = 0; j < pb.kw; ++j) buf.xs[j] = z2 + pb.wslot[j] * pb.ldc;
  pb.depthwise(pb.C1, pb.wb - pb.wa, pb.kw, buf.xs.data(), pb.wstep * pb.ldc, buf.ws.data(), z3 + pb.wa * pb.ldc,
               pb.ldc);
  for (int64_t ox = pb.wb; ox < pb.Wo; ++ox) one_column(ox);
}

// Stages 4 and 5 (or the merged GEMM) on the group's gpix pixels, into zt.
// Stage 4's panel loop sits outside the pixel blocks, so each panel of B
// stays in L1 across the group.
void output_gemms(const Problem& pb, Buffers& buf, int64_t gpix) {
  const int64_t mr = pb.mr;
  const float* rows[64];
  if (pb.merged) {
    const Panels& gf = pb.gf;
    for (int64_t jb = 0; jb < gf.panels(); ++jb)
      for (int64_t u0 = 0; u0 < gpix; u0 += mr) {
        for (int64_t i = 0; i < mr; ++i) rows[i] = buf.z3.data() + (u0 + i) * pb.ldc;
        gf.uk->fn(gf.k, rows, 1, gf.panel(0, jb), buf.zt.data() + u0 * pb.ldt + jb * gf.nr(), pb.ldt, false,
                  nullptr);
      }
    return;
  }
  // stage 4, pixels as rows: z4 of pixel i in panel form, [jb][qn][NR] (t2 = jb*NR + j)
  const Panels& g4 = pb.g4;
  const int64_t nr4 = g4.nr();
  for (int64_t qn = 0; qn < pb.QN; ++qn)
    for (int64_t jb = 0; jb < g4.panels(); ++jb)
      for (int64_t u0 = 0; u0 < gpix; u0 += mr) {
        for (int64_t i = 0; i < mr; ++i) rows[i] = buf.z3.data() + (u0 + i) * pb.ldc + qn * pb.R;
        g4.uk->fn(pb.R, rows, 1, g4.panel(qn % pb.N, jb), buf.z4.data() + u0 * pb.ld4 + (jb * pb.QN + qn) * nr4,
                  pb.ld4, false, nullptr);
      }
  // stage 5, one GEMM per pixel: zt_i (T1 x T2) = bt (T1 x QN) @ z4_i (QN x T2)
  for (int64_t i = 0; i < gpix; ++i) {
    const float* z4 = buf.z4.data() + i * pb.ld4;
    float* zi = buf.zt.data() + i * pb.ldt;
    for (int64_t t0 = 0; t0 < pb.T1; t0 += mr) {
      for (int64_t r = 0; r < mr; ++r) rows[r] = t0 + r < pb.T1 ? pb.bt + (t0 + r) * pb.QN : pb.zeros;
      for (int64_t jb = 0; jb < g4.panels(); ++jb)
        g4.uk->fn(pb.QN, rows, 1, z4 + jb * pb.QN * nr4, zi + t0 * pb.ld_t1 + jb * nr4, pb.ld_t1, false, nullptr);
    }
  }
}

// The group's output, bias added: zt of pixel i -> pixel oy0 * Wo + i of image b.
void write_group(const Problem& pb, const Buffers& buf, int64_t b, int64_t oy0, int64_t gpix) {
  const int64_t hw = pb.Ho * pb.Wo, p0 = oy0 * pb.Wo;
  const float* zt = buf.zt.data();
  if (pb.out_nhwc) {
    for (int64_t i = 0; i < gpix; ++i) {
      float* dst = pb.out + (b * hw + p0 + i) * pb.cout;
      for (int64_t t1 = 0; t1 < pb.nt1; ++t1) {
        const float* src = zt + i * pb.ldt + t1 * pb.ld_t1;
        const float* bias = pb.bias + t1 * pb.nt2;
        float* d = dst + t1 * pb.nt2;
        for (int64_t t2 = 0; t2 < pb.nt2; ++t2) d[t2] = src[t2] + bias[t2];
      }
    }
    return;
  }
  for (int64_t t1 = 0; t1 < pb.nt1; ++t1)
    for (int64_t t2 = 0; t2 < pb.nt2; ++t2) {  // NCHW: the group's pixels are one run per output plane
      const int64_t ch = t1 * pb.nt2 + t2;
      float* dst = pb.out + (b * pb.cout + ch) * hw + p0;
      const float* src = zt + t1 * pb.ld_t1 + t2;
      const float bias = pb.bias[ch];
      for (int64_t i = 0; i < gpix; ++i) dst[i] = src[i * pb.ldt] + bias;
    }
}

// Output rows [oy_a, oy_b) of image b.
void run_band(const Problem& pb, Buffers& buf, int64_t b, int64_t oy_a, int64_t oy_b) {
  const int64_t sh = pb.cv.stride[0], ph = pb.cv.padding[0], span = (pb.kh - 1) * pb.cv.dilation[0];
  int64_t base = 0, done = 0;  // the window holds ranks [base, done)
  for (int64_t oy0 = oy_a; oy0 < oy_b; oy0 += pb.TH) {
    const int64_t oy1 = std::min(oy_b, oy0 + pb.TH);
    const int64_t lo = std::clamp<int64_t>(oy0 * sh - ph, 0, pb.H);
    const int64_t hi = std::clamp<int64_t>((oy1 - 1) * sh - ph + span + 1, 0, pb.H);
    const int64_t r_lo = pb.rank_below[lo], r_hi = pb.rank_below[hi];
    if (done <= r_lo || done == base) {  // nothing to keep
      base = done = r_lo;
    } else if (r_lo > base) {  // slide: keep ranks [r_lo, done)
      float* z1 = buf.z1.data();
      std::memmove(z1, z1 + (r_lo - base) * pb.ncols * pb.ld1, sizeof(float) * (done - r_lo) * pb.ncols * pb.ld1);
      base = r_lo;
    }
    if (r_hi > done) {
      input_rows(pb, buf, b, base, done, r_hi);
      done = r_hi;
    }
    for (int64_t oy = oy0; oy < oy1; ++oy) depthwise_row(pb, buf, base, oy, oy0);
    const int64_t gpix = (oy1 - oy0) * pb.Wo;
    output_gemms(pb, buf, gpix);
    write_group(pb, buf, b, oy0, gpix);
  }
}

}  // namespace

bool kcp_fused_supports(const at::Tensor& input, const std::string& kind) {
  return kind == "kcp" && input.scalar_type() == at::kFloat && input.device().is_cpu();
}

at::Tensor kcp_fused_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const Microkernel& uk) {
  const int64_t n = input.size(0);
  const at::MemoryFormat out_format = output_memory_format(input);
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(out_format));
  if (n == 0 || out.numel() == 0) return out;
  TORCH_CHECK(uk.mr <= 64 && (uk.narrow == nullptr || uk.narrow->mr == uk.mr) && uk.depthwise != nullptr,
              "hsv::conv2d: inconsistent CPU microkernel table");
  for (const auto& f : factors)
    TORCH_CHECK_VALUE(f.scalar_type() == at::kFloat,
                      "hsv::conv2d(kind='kcp'): the fused CPU kernel needs float32 factors like the input, got ",
                      f.scalar_type());

  Problem pb;
  pb.mr = uk.mr;
  const at::Tensor &bs = factors[0], &as = factors[1], &ah = factors[2], &aw = factors[3];
  pb.merged = factors.size() == 5;
  pb.Q = bs.size(0), pb.N = bs.size(1), pb.S1 = bs.size(2);
  pb.R = as.size(1), pb.S2 = as.size(2);
  pb.kh = ah.size(2), pb.kw = aw.size(2);
  pb.QN = pb.Q * pb.N;
  pb.C1 = pb.QN * pb.R;
  pb.cout = plan.out_shape[1];
  pb.H = input.size(2), pb.W = input.size(3);
  pb.Ho = plan.out_shape[2], pb.Wo = plan.out_shape[3];
  pb.cv = plan.stages[2].conv;  // the height stage: stride/padding/dilation [0]
  pb.cv.stride[1] = plan.stages[3].conv.stride[1];
  pb.cv.padding[1] = plan.stages[3].conv.padding[1];
  pb.cv.dilation[1] = plan.stages[3].conv.dilation[1];

  pb.uk0 = &microkernel_for_width(uk, pb.S2);
  pb.s2_pad = round_up(pb.S2, pb.uk0->nr);
  const at::Tensor bs_c = bs.contiguous();
  pb.bs = bs_c.data_ptr<float>();
  pb.g1 = make_panels(uk, as, "kcp.as", pb.R, pb.S2, 1, nullptr, pb.N);
  at::Tensor bt_c;
  if (pb.merged) {
    pb.T2 = 1;
    pb.gf = make_panels(uk, factors[4], "kcp.M", pb.cout, pb.C1);
    pb.nt1 = 1, pb.nt2 = pb.cout, pb.ld_t1 = 0, pb.ldt = pb.gf.n_pad;
  } else {
    pb.T2 = factors[4].size(1);
    pb.T1 = factors[5].size(0);
    pb.g4 = make_panels(uk, factors[4], "kcp.at", pb.T2, pb.R, 1, nullptr, pb.N);
    bt_c = factors[5].contiguous();
    pb.bt = bt_c.data_ptr<float>();
    pb.nt1 = pb.T1, pb.nt2 = pb.T2, pb.ld_t1 = pb.g4.n_pad, pb.ldt = round_up(pb.T1, pb.mr) * pb.g4.n_pad;
  }
  const at::Tensor ahr = depthwise_rows(ah, pb.Q, "ah"), awr = depthwise_rows(aw, pb.Q, "aw");
  pb.ah = ahr.data_ptr<float>();
  pb.aw = awr.data_ptr<float>();
  pb.depthwise = uk.depthwise;
  const std::vector<float> zeros(static_cast<size_t>(std::max(pb.S1, pb.QN)), 0.0f);
  pb.zeros = zeros.data();

  pb.ld0 = round_up(pb.QN, pb.mr) * pb.s2_pad;
  pb.ld1 = round_up(pb.C1 + pb.g1.nr(), 16);
  pb.ldc = round_up(pb.C1, 16);
  pb.ld4 = pb.merged ? 0 : pb.QN * pb.g4.n_pad;

  std::vector<float> bias_v(static_cast<size_t>(pb.cout), 0.0f);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bias_c = bias->contiguous();
    std::memcpy(bias_v.data(), bias_c.data_ptr<float>(), sizeof(float) * pb.cout);
  }
  pb.bias = bias_v.data();

  // The input rows and columns some tap reads.
  std::vector<char> need_row(static_cast<size_t>(pb.H), 0), need_col(static_cast<size_t>(pb.W), 0);
  for (int64_t oy = 0; oy < pb.Ho; ++oy)
    for (int64_t i = 0; i < pb.kh; ++i) {
      const int64_t iy = oy * pb.cv.stride[0] - pb.cv.padding[0] + i * pb.cv.dilation[0];
      if (iy >= 0 && iy < pb.H) need_row[iy] = 1;
    }
  for (int64_t ox = 0; ox < pb.Wo; ++ox)
    for (int64_t j = 0; j < pb.kw; ++j) {
      const int64_t ix = ox * pb.cv.stride[1] - pb.cv.padding[1] + j * pb.cv.dilation[1];
      if (ix >= 0 && ix < pb.W) need_col[ix] = 1;
    }
  pb.rank_below.assign(static_cast<size_t>(pb.H + 1), 0);
  for (int64_t iy = 0; iy < pb.H; ++iy) {
    pb.rank_below[iy + 1] = pb.rank_below[iy] + need_row[iy];
    if (need_row[iy]) pb.rows.push_back(iy);
  }
  pb.col_slot.assign(static_cast<size_t>(pb.W), -1);
  for (int64_t ix = 0; ix < pb.W; ++ix)
    if (need_col[ix]) {
      pb.col_slot[ix] = static_cast<int64_t>(pb.cols.size());
      pb.cols.push_back(ix);
    }
  pb.ncols = static_cast<int64_t>(pb.cols.size());
  // Stage 3's interior columns and whether their taps' slots are affine in ox.
  {
    const int64_t sw = pb.cv.stride[1], pw = pb.cv.padding[1], dw = pb.cv.dilation[1];
    pb.wa = std::min(pb.Wo, div_up(pw, sw));
    pb.wb = pb.wa;
    while (pb.wb < pb.Wo && pb.wb * sw - pw + (pb.kw - 1) * dw < pb.W) ++pb.wb;
    if (pb.wb > pb.wa) {
      const auto slot = [&](int64_t ox, int64_t j) { return pb.col_slot[ox * sw - pw + j * dw]; };
      const int64_t step = pb.wb - pb.wa > 1 ? slot(pb.wa + 1, 0) - slot(pb.wa, 0) : 0;
      bool affine = step >= 0;
      for (int64_t j = 0; j < pb.kw && affine; ++j)
        for (int64_t ox = pb.wa; ox < pb.wb && affine; ++ox)
          affine = slot(ox, j) == slot(pb.wa, j) + (ox - pb.wa) * step;
      if (affine) {
        pb.wstep = step;
        for (int64_t j = 0; j < pb.kw; ++j) pb.wslot.push_back(slot(pb.wa, j));
      }
    }
  }

  pb.x = input.data_ptr<float>();
  pb.sn = input.stride(0), pb.sc = input.stride(1), pb.sh = input.stride(2), pb.sw = input.stride(3);
  pb.out_nhwc = out_format == at::MemoryFormat::ChannelsLast;
  pb.out = out.data_ptr<float>();

  // Threads: small problems run on the calling thread (waking the OpenMP team
  // costs more than ~2^20 MACs take). Work items are (image, band); an image
  // is cut into bands only when there are too few images to share out evenly
  // (each band recomputes the z1 rows its first group shares with the band above).
  const int64_t macs = n * (static_cast<int64_t>(pb.rows.size()) * pb.ncols * pb.QN * pb.S2 * (pb.S1 + pb.R) +
                            pb.Ho * pb.Wo * (pb.C1 * (pb.kh + pb.kw) + pb.cout * (pb.merged ? pb.C1 : pb.QN) +
                                             (pb.merged ? 0 : pb.QN * pb.T2 * pb.R)));
  const int64_t threads = fused_threads(macs);
  pb.bands = (n % threads == 0 || n >= 4 * threads) ? 1 : std::min(pb.Ho, div_up(2 * threads, n));
  const int64_t band_rows = div_up(pb.Ho, pb.bands);
  // Output rows per group: up to about 96 pixels (8 MR blocks) while the
  // group's z3, z4 and zt stay under ~1 MB (L2 is 1-2 MB), and among those the
  // count whose last MR block is fullest: stage 4 and the merged GEMM run whole
  // blocks, so 7 pixels (one 7x7 row) would waste 5 of 12 rows, 21 only 3.
  const int64_t px_bytes = sizeof(float) * (pb.ldc + pb.ld4 + pb.ldt);
  const int64_t th_max = std::clamp<int64_t>(div_up(96, pb.Wo), 1, band_rows);
  pb.TH = 1;
  double best = 1e30;
  for (int64_t th = 1; th <= th_max; ++th) {
    const int64_t px = th * pb.Wo;
    if (th > 1 && px * px_bytes > (int64_t(1) << 20)) break;
    const double waste = static_cast<double>(round_up(px, pb.mr)) / static_cast<double>(px);
    if (waste <= best + 1e-9) best = waste, pb.TH = th;
  }
  pb.slots = std::min<int64_t>(static_cast<int64_t>(pb.rows.size()),
                               (pb.TH - 1) * pb.cv.stride[0] + (pb.kh - 1) * pb.cv.dilation[0] + 1);
  const int64_t items = n * pb.bands;
  at::parallel_for(0, items, threads == 1 ? items : 1, [&](int64_t begin, int64_t end) {
    Buffers& buf = thread_buffers(pb);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / pb.bands, band = item % pb.bands;
      const int64_t oy_a = band * band_rows, oy_b = std::min(pb.Ho, oy_a + band_rows);
      if (oy_a < oy_b) run_band(pb, buf, b, oy_a, oy_b);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace hsv
