// Fused forward of kind "svd" (factors [V (r, Cin, kh, kw), U (Cout, r)]).
//
// Work item = (image, tile of P consecutive output pixels in row-major Ho*Wo
// order), spread over threads with at::parallel_for. Per item:
//   GEMM 1  T (P x r)    = im2col(x)[tile] (P x kh*kw*Cin) @ V^T
//           The im2col rows are never copied: the input is NHWC, so the Cin
//           values of one pixel under one tap are contiguous, and the
//           microkernel reads them through one row pointer per pixel (padding
//           taps point at a zero vector). K is walked tap by tap.
//   GEMM 2  Y (P x Cout) = T @ U^T, T read straight from the cache-resident
//           tile buffer.
//   write   out = Y + bias, in the output's memory format (NHWC rows, or a
//           transposed store for NCHW).
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

// Packs rows of a (rows x K) operand, given as element (row, k) = at(row, k),
// into panels of nr rows: panel[p][k][j] = at(p*nr + j, k), zero past `rows`.
template <typename At>
at::Tensor pack_panels(int64_t rows, int64_t K, int64_t nr, At at) {
  const int64_t panels = (rows + nr - 1) / nr;
  at::Tensor packed = at::empty({panels * K * nr}, at::kFloat);
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* panel = dst + p * K * nr;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < nr; ++j) {
          const int64_t row = p * nr + j;
          panel[k * nr + j] = row < rows ? at(row, k) : 0.0f;
        }
    }
  });
  return packed;
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
  const at::Tensor V = factors[0].contiguous();
  const at::Tensor U = factors[1].contiguous();
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

  // GEMM 1 operand: V^T, K ordered (tap, cin) to match the NHWC row reads.
  const float* vp = V.data_ptr<float>();
  const at::Tensor b1 = pack_panels(r, k1, nr, [&](int64_t j, int64_t k) {
    const int64_t tap = k / cin, c = k % cin;
    return vp[(j * cin + c) * taps + tap];
  });
  // GEMM 2 operand: U^T, K = r.
  const float* up = U.data_ptr<float>();
  const at::Tensor b2 = pack_panels(cout, r, nr, [&](int64_t o, int64_t j) { return up[o * r + j]; });
  const float* b1p = b1.data_ptr<float>();
  const float* b2p = b2.data_ptr<float>();

  at::Tensor bias_c;
  const float* biasp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    biasp = bias_c.data_ptr<float>();
  }
  const std::vector<float> zeros(static_cast<size_t>(cin), 0.0f);

  const int64_t hw = ho * wo;
  const int64_t p_tile = tile_pixels(hw, n, mr);
  const int64_t tiles_per_image = (hw + p_tile - 1) / p_tile;
  float* outp = out.data_ptr<float>();
  const bool out_nhwc = out_format == at::MemoryFormat::ChannelsLast;

  at::parallel_for(0, n * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> t_buf(static_cast<size_t>(p_tile * r_pad));
    std::vector<float> y_buf(static_cast<size_t>(p_tile * cout_pad));
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

      // GEMM 1, taps outermost within a column panel: the panel's Cin x NR
      // slice of V^T stays hot across all the tile's row blocks.
      for (int64_t jb = 0; jb < r_pad / nr; ++jb) {
        for (int64_t tap = 0; tap < taps; ++tap) {
          const int64_t dy = (tap / kw) * cv.dilation[0], dx = (tap % kw) * cv.dilation[1];
          const float* bslice = b1p + (jb * k1 + tap * cin) * nr;
          for (int64_t ib = 0; ib < p_tile; ib += mr) {
            for (int64_t i = 0; i < mr; ++i) {
              const int64_t iy = iy0[ib + i] + dy, ix = ix0[ib + i] + dx;
              rows[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? ximg + (iy * w + ix) * cin : zeros.data();
            }
            uk.fn(cin, rows, bslice, t_buf.data() + ib * r_pad + jb * nr, r_pad, tap > 0);
          }
        }
      }

      // GEMM 2: the intermediate never leaves this thread's cache.
      for (int64_t ob = 0; ob < cout_pad / nr; ++ob) {
        for (int64_t ib = 0; ib < p_tile; ib += mr) {
          for (int64_t i = 0; i < mr; ++i) rows[i] = t_buf.data() + (ib + i) * r_pad;
          uk.fn(r, rows, b2p + ob * r * nr, y_buf.data() + ib * cout_pad + ob * nr, cout_pad, false);
        }
      }

      // Bias on write, in the output's layout.
      if (out_nhwc) {
        float* dst = outp + (img * hw + p0) * cout;
        for (int64_t p = 0; p < np; ++p) {
          const float* src = y_buf.data() + p * cout_pad;
          for (int64_t o = 0; o < cout; ++o) dst[p * cout + o] = src[o] + (biasp ? biasp[o] : 0.0f);
        }
      } else {
        float* dst = outp + img * cout * hw + p0;
        for (int64_t o = 0; o < cout; ++o) {
          const float b = biasp ? biasp[o] : 0.0f;
          for (int64_t p = 0; p < np; ++p) dst[o * hw + p] = y_buf[p * cout_pad + o] + b;
        }
      }
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace hsv
