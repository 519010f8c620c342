// 1x1 factorized conv on NCHW input: out = U (V x) per pixel, with the pixels as
// the microkernel's vector axis. The general fused kernel (hsv_fused.cpp) puts
// pixels on the microkernel's rows, so on NCHW input every k step reads one
// float from another channel plane; for 1x1 layers with many input channels
// (512 -> 128 at 28x28, batch 8, 1 thread) that made it 1.6-2.3x slower than
// the composite chain's two GEMMs. Here, per tile of up to kTile pixels of one
// image:
//   per NR-pixel panel, Z (r x NR) = V @ x[:, panel] by the strided microkernel
//     (ukernel.h), which reads the NR pixels of each of the Cin planes where
//     they lie and meanwhile prefetches the next panel's; Z is in the
//     packed-B layout of the next GEMM as written;
//   per MR output channels and panel, out (MR x NR) = U @ Z, written straight
//     into the output planes (a scratch block at a tile's right edge and for the
//     last rows), then the bias.
// Copying each panel out of the planes first, which this replaces, was 31% of
// the time at 1 thread (perf): the copy stalled on every line it read from L3,
// and nothing overlapped those stalls (prefetching in the copy loop itself
// stalled the same way). Prefetching one panel ahead from inside the FMA loop
// took that layer from 1.5x to about 1.0x the composite chain's time.
#include "pointwise_nchw.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "kernel_util.h"
#include "pack.h"

namespace hsv {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;  // pixels per tile: a long run per output plane (hsv_fused.cpp's NCHW note)

std::atomic<int64_t> g_runs{0};

// w's rows x cols values as the strided microkernel's A operand: blocks of mr
// rows, each stored k-major (out[r0 * cols + k * mr + i] = w[r0 + i][k]), zero
// rows past `rows`.
at::Tensor pack_row_blocks(const at::Tensor& w, int64_t rows, int64_t cols, int64_t mr) {
  const int64_t rows_pad = div_up(rows, mr) * mr;
  const at::Tensor wc = w.reshape({rows, cols}).contiguous();
  return at::constant_pad_nd(wc, {0, 0, 0, rows_pad - rows}).view({rows_pad / mr, mr, cols}).transpose(1, 2).contiguous();
}

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
  // V and U in the strided kernel's A layout, cached against the factors.
  const at::Tensor vp = packed_cached(v, "pointwise_nchw.A/" + std::to_string(mr),
                                      [&] { return pack_row_blocks(v, r, cin, mr); });
  const at::Tensor up = packed_cached(u, "pointwise_nchw.A/" + std::to_string(mr),
                                      [&] { return pack_row_blocks(u, cout, r, mr); });
  const float* vps = vp.data_ptr<float>();
  const float* ups = up.data_ptr<float>();
  const float* x = input.data_ptr<float>();
  const int64_t sn = input.stride(0), sc = input.stride(1);
  float* o = out.data_ptr<float>();
  // A panel at a plane's right edge is read NR wide in place too (its extra
  // columns of Z are never written out) unless that would read past the
  // input's storage; then it is copied and zero-filled.
  const float* x_end = static_cast<const float*>(input.storage().data()) + input.storage().nbytes() / sizeof(float);

  // Tiles of whole NR panels of one image, at most kTile pixels, and at least
  // as many as threads (an image is cut finer at batch 1). Small problems run
  // on the calling thread (fused_threads).
  const int64_t macs = n * hw * r * (cin + cout);
  const int64_t threads = fused_threads(macs);
  const int64_t per_image = std::max(div_up(hw, kTile), div_up(threads, n));
  const int64_t tile = std::max(nr, div_up(div_up(hw, per_image), nr) * nr);
  const int64_t tiles_per_image = div_up(hw, tile);
  const int64_t tiles = n * tiles_per_image;
  // Where tile `item`'s panel pn starts.
  auto panel_at = [&](int64_t item, int64_t pn) {
    return x + (item / tiles_per_image) * sn + (item % tiles_per_image) * tile + pn * nr;
  };
  at::parallel_for(0, tiles, threads == 1 ? tiles : 1, [&](int64_t begin, int64_t end) {
    const int64_t panels_max = div_up(tile, nr);
    std::vector<float> xp, z(static_cast<size_t>(panels_max * r_pad * nr)), block(static_cast<size_t>(mr * nr));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t img = item / tiles_per_image, q0 = (item % tiles_per_image) * tile;
      const int64_t q1 = std::min(hw, q0 + tile), panels = div_up(q1 - q0, nr);
      // Z for every panel of the tile first, so that the second GEMM can write
      // each output plane's run of the tile at once (output channels outer):
      // panels outer wrote 128-byte runs into Cout planes per panel and ran
      // expansion layers (128 -> 512 at 28x28) 1.8x slower.
      for (int64_t pn = 0; pn < panels; ++pn) {
        const float* src = panel_at(item, pn);
        const int64_t len = std::min(nr, q1 - (q0 + pn * nr));
        const float* bsrc = src;
        int64_t ldb = sc;
        if (len < nr && src + (cin - 1) * sc + nr > x_end) {
          xp.resize(static_cast<size_t>(cin * nr));
          for (int64_t k = 0; k < cin; ++k) {
            float* d = xp.data() + k * nr;
            std::memcpy(d, src + k * sc, sizeof(float) * len);
            std::fill(d + len, d + nr, 0.0f);
          }
          bsrc = xp.data();
          ldb = nr;
        }
        // The next panel this thread reads (this tile's, else the next tile's
        // first): the first row block prefetches it.
        const float* next = pn + 1 < panels ? src + nr : item + 1 < end ? panel_at(item + 1, 0) : nullptr;
        for (int64_t r0 = 0; r0 < r_pad; r0 += mr)
          uk.strided(cin, vps + r0 * cin, bsrc, ldb, z.data() + (pn * r_pad + r0) * nr, nr, r0 == 0 ? next : nullptr);
      }
      for (int64_t c0 = 0; c0 < cout; c0 += mr) {
        const int64_t nrows = std::min(mr, cout - c0);
        for (int64_t pn = 0; pn < panels; ++pn) {
          const int64_t p0 = q0 + pn * nr, len = std::min(nr, q1 - p0);
          float* dst = o + (img * cout + c0) * hw + p0;
          const bool direct = nrows == mr && len == nr;
          uk.strided(r, ups + c0 * r, z.data() + pn * r_pad * nr, nr, direct ? dst : block.data(), direct ? hw : nr,
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
