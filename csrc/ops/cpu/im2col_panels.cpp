// A spatial conv in the SVD layout on input with few channels, with the
// pixels as the microkernels' vector axis. The general kernel (hsv_fused.cpp)
// puts pixels on the microkernel's rows and the rank on its vector axis. A
// stem's rank (11 at 4x on ResNet's 3 -> 64 7x7 stride 2) fills 11 of 16
// columns there, and its K per call is one kernel row (21 = 7 taps x 3
// channels), so it ran at about a quarter of the FMA peak. Here the rank is
// the row axis (12 rows: two blocks of 6 or one of 12) and K is the whole
// Cin x kh x kw. Per band of output rows of one image:
//   - the input rows the band reads are copied, channel by channel (from any
//     layout), into column phases with the padding as zeros: phase f of a row
//     holds its padded columns f, f + sx, f + 2 sx, ... So tap column dx of
//     output column ox is element ox + (dx * dilation) / sx of phase
//     (dx * dilation) % sx, and each (channel, tap) row of an output row's
//     im2col panel is a contiguous run of one phase row;
//   - per NR-pixel panel of an output row, Z (r x NR) = V @ im2col panel by
//     the b_rows microkernel, which reads the K runs by pointer (ukernel.h),
//     so the panel is never copied;
//   - out = U @ Z by the strided kernel: for NCHW output per MR output
//     channels and panel, written straight into the output planes (through a
//     scratch block for a partial panel or the last rows); for NHWC output all
//     Cout rows of a panel into a block, transposed into the pixels' rows.
// ResNet's stem at 4x (hsv, rank 11), batch 8, 1 thread, AMD EPYC (AVX2):
// 17.1 -> 8.2 ms on NCHW input and 15.4 -> 11.1 ms on NHWC (dense oneDNN
// 22.6 and 26.6 ms).
#include "im2col_panels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "../env_choice.h"
#include "kernel_util.h"
#include "pack.h"

namespace hsv {
namespace cpu {
namespace {

constexpr int64_t kBandPixels = 512;  // output pixels per band: long runs per output plane (as pointwise_nchw)
// Where this beats the general kernel: a grid of 220 convs (Cin 3 and 8, Cout 16 and 64, r 3-16, 3x3 and 7x7,
// stride 1 and 2, 56 and 224 pixels, batch 1 and 8), 1 thread, AVX2, took 0.21-0.82x its time with 3 input
// channels on NCHW input and 0.39-0.98x on NHWC; with 8 it took 0.32-1.16x (NCHW) and 0.55-1.46x (NHWC),
// the losses all at stride 2, where few FMAs follow each copied input value (the NHWC copy is a strided one).
constexpr int64_t kMaxChannels = 8;
constexpr int64_t kMaxChannelsStrided = 4;
constexpr int64_t kMaxStride = 16;

std::atomic<int64_t> g_runs{0};

// dst[j] = padded input row at column j * sx + f, for j < len: the row's
// columns shifted by the left padding px, zeros outside [0, w).
void fill_phase(const float* row, int64_t w, int64_t sw, int64_t sx, int64_t f, int64_t px, float* dst, int64_t len) {
  // valid j: 0 <= j * sx + f - px < w
  const int64_t lo = std::min(len, std::max<int64_t>(0, div_up(px - f, sx)));
  const int64_t hi = std::max(lo, std::min(len, div_up(w + px - f, sx)));
  std::fill(dst, dst + lo, 0.0f);
  const float* src = row + (lo * sx + f - px) * sw;  // read only when hi > lo
  if (sx == 1 && sw == 1) {
    if (hi > lo) std::memcpy(dst + lo, src, sizeof(float) * (hi - lo));
  } else {
    const int64_t step = sx * sw;
    for (int64_t j = lo; j < hi; ++j) dst[j] = src[(j - lo) * step];
  }
  std::fill(dst + hi, dst + len, 0.0f);
}

}  // namespace

bool im2col_panels_applies(const at::Tensor& input, int64_t kh, int64_t kw, at::IntArrayRef stride,
                           const Microkernel& uk) {
  if (uk.b_rows == nullptr || kh * kw < 2 || input.scalar_type() != at::kFloat || input.dim() != 4) return false;
  const bool unit_stride = stride[0] == 1 && stride[1] == 1;
  if (input.size(1) > (unit_stride ? kMaxChannels : kMaxChannelsStrided)) return false;
  // The phase copies of an input row take stride[1] times its width: bounded, so a huge stride
  // (patchify stems use up to 16) cannot ask for gigabytes; the general kernel takes those.
  if (stride[0] > kMaxStride || stride[1] > kMaxStride) return false;
  return env_choice("HSV_CPU_IM2COL_PANELS", {"on", "off"}) == 0;
}

at::Tensor im2col_panels_forward(const at::Tensor& input, const at::Tensor& v, const at::Tensor& u,
                                 const c10::optional<at::Tensor>& bias, int64_t kh, int64_t kw, const ConvParams& cv,
                                 at::IntArrayRef out_shape, at::MemoryFormat out_format, const Microkernel& uk) {
  const int64_t n = input.size(0), cin = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t ho = out_shape[2], wo = out_shape[3], hw = ho * wo;
  const int64_t r = v.size(0), cout = u.size(0), K = cin * kh * kw;
  at::Tensor out = at::empty(out_shape, input.options().memory_format(out_format));
  const bool out_nhwc = out_format == at::MemoryFormat::ChannelsLast;
  if (n == 0 || hw == 0) return out;
  g_runs.fetch_add(1, std::memory_order_relaxed);
  const int64_t sy = cv.stride[0], sx = cv.stride[1], py = cv.padding[0], px = cv.padding[1];
  const int64_t dil_y = cv.dilation[0], dil_x = cv.dilation[1];
  const int64_t nr = uk.nr;
  const PackedARows k1 = packed_a_rows(uk, r), k2 = packed_a_rows(uk, cout);
  const int64_t mr1 = k1.mr, mr = k2.mr, r_pad = round_up(r, mr1);
  TORCH_CHECK(k1.b_rows != nullptr && (out_nhwc || k2.strided != nullptr),
              "hsv::conv2d: inconsistent CPU microkernel table (b_rows / strided kernels)");
  // V, and for NCHW output U, in the packed-A layout, cached against the factors.
  const at::Tensor vp = packed_a_cached(v, mr1), up = out_nhwc ? at::Tensor() : packed_a_cached(u, mr);
  const float* vps = vp.data_ptr<float>();
  const float* ups = out_nhwc ? nullptr : up.data_ptr<float>();
  // NHWC output: U^T in NR-wide B panels (the general kernel's layout), and the bias as their init row.
  const Panels ut = out_nhwc ? make_panels(uk, u, "im2col_panels.Ut", cout, r) : Panels{};
  std::vector<float> bias_t(static_cast<size_t>(ut.n_pad), 0.0f);
  const at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* b = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  if (b != nullptr) std::copy(b, b + std::min(cout, ut.n_pad), bias_t.begin());
  const float* x = input.data_ptr<float>();
  const int64_t sn = input.stride(0), sc = input.stride(1), sh = input.stride(2), sw = input.stride(3);
  float* o = out.data_ptr<float>();

  // A phase row is read NR wide from ox + offset (ox < wo, offset <= off_max),
  // so it holds wo + off_max + nr floats; past the input's columns, zeros.
  const int64_t off_max = (kw - 1) * dil_x / sx;
  const int64_t lp = wo + off_max + nr;
  const int64_t ppr = div_up(wo, nr);  // panels per output row; a row's last one may be partial
  // Bands of about kBandPixels output pixels of one image; with threads, about a multiple of their count
  // (at::parallel_for hands each thread one contiguous range of bands).
  const int64_t threads = fused_threads(n * hw * r * (K + cout));
  int64_t band = std::min(ho, std::max<int64_t>(1, kBandPixels / wo));
  if (threads > 1) band = std::max<int64_t>(1, div_up(ho, div_up(round_up(n * div_up(ho, band), threads), n)));
  const int64_t bands = div_up(ho, band), items = n * bands;
  const int64_t in_rows_max = (band - 1) * sy + (kh - 1) * dil_y + 1;

  at::parallel_for(0, items, threads == 1 ? items : 1, [&](int64_t begin, int64_t end) {
    // the band's phase rows [channel][input row][phase], then one row of zeros for rows in the padding
    std::vector<float> phase(static_cast<size_t>((cin * in_rows_max * sx + 1) * lp), 0.0f);
    const float* zero_row = phase.data() + cin * in_rows_max * sx * lp;
    std::vector<const float*> rows(static_cast<size_t>(K));
    std::vector<float> z(static_cast<size_t>(band * ppr * r_pad * nr));
    // a scratch block: NCHW output, MR x NR (partial panels, last rows); NHWC, MR pixels x Cout padded
    std::vector<float> block(static_cast<size_t>(out_nhwc ? ut.uk->mr * ut.n_pad : mr * nr));
    const float* prow[64];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t img = item / bands, oy0 = (item % bands) * band, oy1 = std::min(ho, oy0 + band);
      const int64_t iy0 = oy0 * sy - py, in_rows = (oy1 - oy0 - 1) * sy + (kh - 1) * dil_y + 1;
      const float* ximg = x + img * sn;
      for (int64_t c = 0; c < cin; ++c)
        for (int64_t rr = 0; rr < in_rows; ++rr) {
          const int64_t iy = iy0 + rr;
          if (iy < 0 || iy >= h) continue;  // read as zero_row
          for (int64_t f = 0; f < sx; ++f)
            fill_phase(ximg + c * sc + iy * sh, w, sw, sx, f, px,
                       phase.data() + ((c * in_rows_max + rr) * sx + f) * lp, lp);
        }
      // Z for every panel of the band first, so that U @ Z writes each output plane's run of the band at once.
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        for (int64_t c = 0; c < cin; ++c)
          for (int64_t ty = 0; ty < kh; ++ty) {
            const int64_t rr = (oy - oy0) * sy + ty * dil_y, iy = iy0 + rr;
            for (int64_t tx = 0; tx < kw; ++tx) {
              const int64_t t = tx * dil_x, k = (c * kh + ty) * kw + tx;
              rows[k] = iy < 0 || iy >= h ? zero_row
                                          : phase.data() + ((c * in_rows_max + rr) * sx + t % sx) * lp + t / sx;
            }
          }
        float* zrow = z.data() + (oy - oy0) * ppr * r_pad * nr;
        for (int64_t pn = 0; pn < ppr; ++pn)
          for (int64_t r0 = 0; r0 < r_pad; r0 += mr1)
            k1.b_rows(K, vps + r0 * K, rows.data(), pn * nr, zrow + (pn * r_pad + r0) * nr, nr);
      }
      if (out_nhwc) {
        // per MR pixels of a panel, their output rows = bias + Z^T @ U^T: the microkernel's rows are the
        // pixels' columns of Z (k step nr), written straight into the NHWC rows where whole
        const int64_t mrt = ut.uk->mr, nrt = ut.uk->nr;
        for (int64_t oy = oy0; oy < oy1; ++oy)
          for (int64_t pn = 0; pn < ppr; ++pn) {
            const int64_t ox = pn * nr, len = std::min(nr, wo - ox);
            const float* zp = z.data() + ((oy - oy0) * ppr + pn) * r_pad * nr;
            float* orow = o + ((img * ho + oy) * wo + ox) * cout;
            for (int64_t ib = 0; ib < len; ib += mrt) {
              const int64_t np = std::min(mrt, len - ib);
              for (int64_t i = 0; i < mrt; ++i) prow[i] = zp + (i < np ? ib + i : 0);
              const bool direct = np == mrt && ut.n_pad == cout;
              float* c = direct ? orow + ib * cout : block.data();
              const int64_t ldc = direct ? cout : ut.n_pad;
              for (int64_t jb = 0; jb < ut.n_pad / nrt; ++jb)
                ut.uk->fn(r, prow, nr, ut.b + jb * r * nrt, c + jb * nrt, ldc, false, bias_t.data() + jb * nrt);
              if (!direct)
                for (int64_t i = 0; i < np; ++i)
                  std::memcpy(orow + (ib + i) * cout, block.data() + i * ut.n_pad, sizeof(float) * cout);
            }
          }
        continue;
      }
      for (int64_t c0 = 0; c0 < cout; c0 += mr) {
        const int64_t nrows = std::min(mr, cout - c0);
        for (int64_t oy = oy0; oy < oy1; ++oy)
          for (int64_t pn = 0; pn < ppr; ++pn) {
            const int64_t ox = pn * nr, len = std::min(nr, wo - ox);
            const bool direct = nrows == mr && len == nr;
            float* dst = o + (img * cout + c0) * hw + oy * wo + ox;
            const float* zp = z.data() + ((oy - oy0) * ppr + pn) * r_pad * nr;
            k2.strided(r, ups + c0 * r, zp, nr, direct ? dst : block.data(), direct ? hw : nr, nullptr);
            if (!direct)
              for (int64_t i = 0; i < nrows; ++i)
                std::memcpy(dst + i * hw, block.data() + i * nr, sizeof(float) * len);
            if (b != nullptr) add_row_bias(dst, hw, nrows, len, b + c0);
          }
      }
    }
  });
  return out;
}

int64_t im2col_panels_runs() { return g_runs.load(std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace hsv
