// Fused forward of kind "svd" (factors [V (r, Cin, kh, kw), U (Cout, r)]).
//
// Work item = (image, tile of P consecutive output pixels in row-major Ho*Wo
// order), spread over threads with at::parallel_for. Per item:
//   GEMM 1  T (P x r)    = im2col(x)[tile] (P x kh*kw*Cin) @ V^T
//           The im2col rows are never copied: the input is NHWC, so the Cin
//           values of one pixel under one tap are contiguous, and the
//           microkernel reads them through one row pointer per pixel (padding
//           taps point at a zero vector). K is walked tap by tap.
//   GEMM 2  out (P x Cout) = bias + T @ U^T, T read straight from the
//           cache-resident tile buffer; the bias is the accumulators' start
//           value. NHWC outputs are written in place by the microkernel; NCHW
//           outputs get each MR x NR block transposed on the way out.
// NCHW inputs are copied to NHWC once per call (a layout copy of the input).
// V^T and U^T are packed into NR-wide panels on every call.
// TODO: cache the packed factors per (factor version, ISA) instead of packing
// on every call; split Cout / K across threads when there are fewer tiles than
// threads (deep layers at batch 1); read NCHW input without the layout copy.
#include "svd_fused.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace hsv {
namespace cpu {
namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Packs a (rows x K) row-major matrix into panels of nr rows, transposed for
// the microkernel: panel[p][k][j] = m[p*nr + j][k], zero rows past the end.
// ATen's copy does the strided transpose faster than a hand loop.
at::Tensor pack_panels(const at::Tensor& m, int64_t nr) {
  const int64_t rows = m.size(0), K = m.size(1);
  const int64_t padded = round_up(rows, nr);
  at::Tensor src = padded == rows ? m : at::constant_pad_nd(m, {0, 0, 0, padded - rows});
  return src.view({padded / nr, nr, K}).transpose(1, 2).contiguous();
}

// Pixels per tile: a multiple of MR, at most ~128 (keeps the P x r and P x Cout
// tile buffers in L2), and small enough that every thread gets work.
int64_t tile_pixels(int64_t pixels_per_image, int64_t images, int64_t mr) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = std::max<int64_t>(1, (pixels_per_image * images + 2 * threads - 1) / (2 * threads));
  const int64_t p = std::min<int64_t>({target, 128, pixels_per_image});
  return round_up(p, mr);
}

}  // namespace

bool svd_fused_supports(const at::Tensor& input, const std::string& kind) {
  return kind == "svd" && input.scalar_type() == at::kFloat && input.device().is_cpu();
}

at::Tensor svd_fused_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const Microkernel& uk) {
  const at::Tensor& V = factors[0];
  const at::Tensor& U = factors[1];
  const int64_t r = V.size(0), cin = V.size(1), kh = V.size(2), kw = V.size(3);
  const int64_t cout = U.size(0);
  const int64_t n = input.size(0), h = input.size(2), w = input.size(3);
  const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
  const ConvParams& cv = plan.stages[0].conv;

  const at::MemoryFormat out_format = output_memory_format(input);
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(out_format));
  if (n == 0) return out;

  // NHWC input; no copy when the input already is channels_last.
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const float* xp = x.data_ptr<float>();

  const int64_t mr = uk.mr, nr = uk.nr;
  TORCH_CHECK(mr <= 64, "hsv::conv2d: microkernel MR too large");
  const int64_t taps = kh * kw;
  const int64_t k1 = taps * cin;
  const int64_t r_pad = round_up(r, nr), cout_pad = round_up(cout, nr);

  // GEMM 1 operand: V^T with K ordered (tap, cin) to match the NHWC row reads.
  const at::Tensor b1 = pack_panels(V.permute({0, 2, 3, 1}).reshape({r, k1}), nr);
  // GEMM 2 operand: U^T, K = r.
  const at::Tensor b2 = pack_panels(U, nr);
  const float* b1p = b1.data_ptr<float>();
  const float* b2p = b2.data_ptr<float>();

  // Bias padded to whole panels (zeros without bias): the accumulator start of GEMM 2.
  std::vector<float> bias_pad(static_cast<size_t>(cout_pad), 0.0f);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bias_c = bias->contiguous();
    std::copy(bias_c.data_ptr<float>(), bias_c.data_ptr<float>() + cout, bias_pad.begin());
  }
  const std::vector<float> zeros(static_cast<size_t>(cin), 0.0f);

  // Cin chunk of GEMM 1: about 24 KB of packed V^T per chunk (L1 is 32-48 KB),
  // split evenly so no chunk is a short remainder.
  const int64_t kc_max = std::max<int64_t>(1, 6144 / nr);
  const int64_t chunks = std::max<int64_t>(1, (cin + kc_max - 1) / kc_max);
  const int64_t kc = std::max<int64_t>(1, (cin + chunks - 1) / chunks);

  const int64_t hw = ho * wo;
  const int64_t p_tile = tile_pixels(hw, n, mr);
  const int64_t tiles_per_image = (hw + p_tile - 1) / p_tile;
  float* outp = out.data_ptr<float>();
  const bool out_nhwc = out_format == at::MemoryFormat::ChannelsLast;

  at::parallel_for(0, n * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> t_buf(static_cast<size_t>(p_tile * r_pad));
    std::vector<float> block(static_cast<size_t>(mr * nr));
    // Top-left input coordinate of each pixel's receptive field; a pixel past
    // the image end gets a far-away origin so every tap reads zeros.
    std::vector<int64_t> iy0(p_tile), ix0(p_tile);
    const float* rows[64];  // >= any microkernel's MR
    for (int64_t item = begin; item < end; ++item) {
      const int64_t img = item / tiles_per_image;
      const int64_t p0 = (item % tiles_per_image) * p_tile;
      const int64_t np = std::min(p_tile, hw - p0);
      for (int64_t p = 0; p < p_tile; ++p) {
        if (p < np) {
          const int64_t oy = (p0 + p) / wo, ox = (p0 + p) % wo;
          iy0[p] = oy * cv.stride[0] - cv.padding[0];
          ix0[p] = ox * cv.stride[1] - cv.padding[1];
        } else {
          iy0[p] = -(int64_t(1) << 40);
          ix0[p] = 0;
        }
      }
      const float* ximg = xp + img * h * w * cin;

      // GEMM 1. Within a column panel, K is walked tap by tap and, for wide
      // Cin, in chunks, so the chunk's slice of V^T (kc x NR) stays in L1
      // across all the tile's row blocks.
      for (int64_t jb = 0; jb < r_pad / nr; ++jb) {
        for (int64_t tap = 0; tap < taps; ++tap) {
          const int64_t dy = (tap / kw) * cv.dilation[0], dx = (tap % kw) * cv.dilation[1];
          for (int64_t c0 = 0; c0 < cin; c0 += kc) {
            const int64_t klen = std::min(kc, cin - c0);
            const float* bslice = b1p + (jb * k1 + tap * cin + c0) * nr;
            for (int64_t ib = 0; ib < np; ib += mr) {
              for (int64_t i = 0; i < mr; ++i) {
                const int64_t iy = iy0[ib + i] + dy, ix = ix0[ib + i] + dx;
                rows[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? ximg + (iy * w + ix) * cin + c0 : zeros.data();
              }
              uk.fn(klen, rows, bslice, t_buf.data() + ib * r_pad + jb * nr, r_pad, tap > 0 || c0 > 0, nullptr);
            }
          }
        }
      }

      // GEMM 2, bias folded into the accumulator start. Full blocks of an
      // NHWC output are written in place; edge blocks and NCHW outputs go
      // through an MR x NR scratch block (transposed on the way for NCHW).
      for (int64_t ob = 0; ob < cout_pad / nr; ++ob) {
        const int64_t o0 = ob * nr, ncols = std::min(nr, cout - o0);
        const float* bpanel = b2p + ob * r * nr;
        for (int64_t ib = 0; ib < np; ib += mr) {
          for (int64_t i = 0; i < mr; ++i) rows[i] = t_buf.data() + (ib + i) * r_pad;
          const int64_t nrows = std::min(mr, np - ib);
          if (out_nhwc && nrows == mr && ncols == nr) {
            uk.fn(r, rows, bpanel, outp + (img * hw + p0 + ib) * cout + o0, cout, false, bias_pad.data() + o0);
            continue;
          }
          uk.fn(r, rows, bpanel, block.data(), nr, false, bias_pad.data() + o0);
          if (out_nhwc) {
            float* dst = outp + (img * hw + p0 + ib) * cout + o0;
            for (int64_t i = 0; i < nrows; ++i)
              for (int64_t j = 0; j < ncols; ++j) dst[i * cout + j] = block[i * nr + j];
          } else {
            float* dst = outp + (img * cout + o0) * hw + p0 + ib;
            for (int64_t j = 0; j < ncols; ++j)
              for (int64_t i = 0; i < nrows; ++i) dst[j * hw + i] = block[i * nr + j];
          }
        }
      }
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace hsv
