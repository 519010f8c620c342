// 1x1 factorized conv on NCHW input: out = U (V x) per pixel, with the pixels as
// the microkernel's vector axis. The general fused kernel (hsv_fused.cpp) puts
// pixels on the microkernel's rows, so on NCHW input every k step reads one
// float from another channel plane; for 1x1 layers with many input channels
// (512 -> 128 at 28x28, batch 8, 1 thread) that made it 1.6-2.3x slower than
// the composite chain's two GEMMs. Here, per tile of up to kTile pixels of one
// image:
//   per NR-pixel panel, the panel of x (Cin x NR) is copied from the NCHW
//     planes (contiguous runs), and Z (r x NR) = V @ panel with V's rows as the
//     microkernel's rows: Z is in the packed-B layout of the next GEMM as written;
//   per MR output channels and panel, out (MR x NR) = U @ Z, written straight
//     into the output planes (a scratch block at a tile's right edge and for the
//     last rows), then the bias.
#include "pointwise_nchw.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "kernel_util.h"

namespace hsv {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;  // pixels per tile: a long run per output plane (hsv_fused.cpp's NCHW note)

std::atomic<int64_t> g_runs{0};

}  // namespace

bool pointwise_nchw_applies(const at::Tensor& input, int64_t kh, int64_t kw, at::IntArrayRef stride,
                            at::IntArrayRef padding) {
  if (kh != 1 || kw != 1 || stride[0] != 1 || stride[1] != 1 || padding[0] != 0 || padding[1] != 0) return false;
  if (input.scalar_type() != at::kFloat || input.dim() != 4 || input.size(1) < 2) return false;
  const int64_t w = input.size(3);
  const bool plane_contiguous = input.stride(3) == 1 && (input.size(2) == 1 || input.stride(2) == w);
  return plane_contiguous && input.stride(1) != 1;
}

at::Tensor pointwise_nchw_forward(const at::Tensor& input, const at::Tensor& v, const at::Tensor& u,
                                  const c10::optional<at::Tensor>& bias, const Microkernel& uk) {
  const int64_t n = input.size(0), cin = input.size(1), hw = input.size(2) * input.size(3);
  const int64_t r = v.size(0), cout = u.size(0);
  at::Tensor out = at::empty({n, cout, input.size(2), input.size(3)}, input.options());
  if (n == 0 || hw == 0) return out;
  g_runs.fetch_add(1, std::memory_order_relaxed);
  const int64_t mr = uk.mr, nr = uk.nr;
  const int64_t r_pad = div_up(r, mr) * mr;
  const at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* b = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  const float* vs = v.data_ptr<float>();
  const float* us = u.data_ptr<float>();
  const std::vector<float> zeros(static_cast<size_t>(std::max(cin, r)), 0.0f);
  const float* x = input.data_ptr<float>();
  const int64_t sn = input.stride(0), sc = input.stride(1);
  float* o = out.data_ptr<float>();

  // Tiles of whole NR panels of one image, at most kTile pixels, and at least
  // as many as threads (an image is cut finer at batch 1). Small problems run
  // on the calling thread (fused_threads).
  const int64_t macs = n * hw * r * (cin + cout);
  const int64_t threads = fused_threads(macs);
  const int64_t per_image = std::max(div_up(hw, kTile), div_up(threads, n));
  const int64_t tile = std::max(nr, div_up(div_up(hw, per_image), nr) * nr);
  const int64_t tiles_per_image = div_up(hw, tile);
  const int64_t tiles = n * tiles_per_image;
  at::parallel_for(0, tiles, threads == 1 ? tiles : 1, [&](int64_t begin, int64_t end) {
    const int64_t panels_max = div_up(tile, nr);
    std::vector<float> xp(static_cast<size_t>(cin * nr)), z(static_cast<size_t>(panels_max * r_pad * nr)),
        block(static_cast<size_t>(mr * nr));
    const float* rows[64];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t img = item / tiles_per_image, q0 = (item % tiles_per_image) * tile;
      const int64_t q1 = std::min(hw, q0 + tile), panels = div_up(q1 - q0, nr);
      // Z for every panel of the tile first, so that the second GEMM can write
      // each output plane's run of the tile at once (output channels outer):
      // panels outer wrote 128-byte runs into Cout planes per panel and ran
      // expansion layers (128 -> 512 at 28x28) 1.8x slower.
      for (int64_t pn = 0; pn < panels; ++pn) {
        const int64_t p0 = q0 + pn * nr, len = std::min(nr, q1 - p0);
        const float* src = x + img * sn + p0;
        for (int64_t k = 0; k < cin; ++k) {  // the panel: Cin rows of NR pixels
          float* d = xp.data() + k * nr;
          std::memcpy(d, src + k * sc, sizeof(float) * len);
          if (len < nr) std::fill(d + len, d + nr, 0.0f);
        }
        for (int64_t r0 = 0; r0 < r_pad; r0 += mr) {
          for (int64_t i = 0; i < mr; ++i) rows[i] = r0 + i < r ? vs + (r0 + i) * cin : zeros.data();
          uk.fn(cin, rows, 1, xp.data(), z.data() + (pn * r_pad + r0) * nr, nr, false, nullptr);
        }
      }
      for (int64_t c0 = 0; c0 < cout; c0 += mr) {
        const int64_t nrows = std::min(mr, cout - c0);
        for (int64_t i = 0; i < mr; ++i) rows[i] = i < nrows ? us + (c0 + i) * r : zeros.data();
        for (int64_t pn = 0; pn < panels; ++pn) {
          const int64_t p0 = q0 + pn * nr, len = std::min(nr, q1 - p0);
          float* dst = o + (img * cout + c0) * hw + p0;
          const bool direct = nrows == mr && len == nr;
          uk.fn(r, rows, 1, z.data() + pn * r_pad * nr, direct ? dst : block.data(), direct ? hw : nr, false,
                nullptr);
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

int64_t pointwise_nchw_runs() { return g_runs.load(std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace hsv
