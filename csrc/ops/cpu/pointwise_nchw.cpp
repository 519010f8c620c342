// 1x1 factorized conv on NCHW input: out = U (V x) per pixel, with the pixels as
// the microkernel's vector axis. The general fused kernel (hsv_fused.cpp) puts
// pixels on the microkernel's rows, so on NCHW input every k step reads one
// float from another channel plane; for 1x1 layers with many input channels
// (512 -> 128 at 28x28, batch 8, 1 thread) that made it 1.6-2.3x slower than
// the composite chain's two GEMMs. Here, per tile of pixels:
//   per NR-pixel panel, Z (r x NR) = V @ x[:, panel] by the strided microkernel
//     (ukernel.h), which reads the NR pixels of each of the Cin planes where
//     they lie and meanwhile prefetches the next panel's; Z is in the
//     packed-B layout of the next GEMM as written;
//   per MR output channels and panel, out (MR x NR) = U @ Z, written straight
//     into the output planes (a scratch block at a tile's right edge and for the
//     last rows), then the bias.
// Copying each panel out of the planes first, which the in-place reads
// replace, was 31% of the time at 1 thread (perf): the copy stalled on every
// line it read from L3, and nothing overlapped those stalls (prefetching in
// the copy loop itself stalled the same way). Prefetching one panel ahead
// from inside the FMA loop took that layer from 1.5x to about 1.0x the
// composite chain's time.
// Strided convs (ResNet's downsampling 1x1s) first gather each tile's pixels
// into an L2-sized block, channel by channel, and run the same GEMMs on it;
// the general kernel read those layers' NCHW planes one float per k step at
// 0.9-1.2x the composite chain's time, this at 0.6-0.85x (batch 8).
#include "pointwise_nchw.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__unix__)
#include <unistd.h>
#endif

#include "../env_choice.h"
#include "kernel_util.h"
#include "pack.h"

namespace hsv {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;  // pixels per tile: a long run per output plane (hsv_fused.cpp's NCHW note)
constexpr int64_t kGatherFloats = 64 * 1024;  // a gathered tile's size cap (256 KB: L2-resident)

std::atomic<int64_t> g_runs{0};

// One run of a gathered tile: `len` output pixels of one output row, whose
// inputs start at `src` (relative to channel 0) and step by the column stride.
struct Run {
  int64_t src, len;
};

// The runs covering output pixels [q0, q1) of the batch (q = image * hw +
// pixel, pixels row-major over an output width wo); the input pixel of output
// (image, yo, xo) is at image * sn + yo * row + xo * col. Worked out once per
// tile, not per channel (its divisions cost more than a short run's copy).
void tile_runs(int64_t sn, int64_t row, int64_t col, int64_t wo, int64_t hw, int64_t q0, int64_t q1,
               std::vector<Run>& runs) {
  runs.clear();
  for (int64_t q = q0; q < q1;) {
    const int64_t pix = q % hw, yo = pix / wo, x0 = pix % wo, len = std::min(wo - x0, q1 - q);
    runs.push_back({(q / hw) * sn + yo * row + x0 * col, len});
    q += len;
  }
}

// Every channel's pixels of `runs` into dst[k * ld + ...], in order. Channel by
// channel, so the reads of each are sequential runs the hardware prefetcher follows.
void gather_tile(const float* x, int64_t cin, int64_t sc, int64_t col, const std::vector<Run>& runs, float* dst,
                 int64_t ld) {
  for (int64_t k = 0; k < cin; ++k) {
    const float* plane = x + k * sc;
    float* d = dst + k * ld;
    for (const Run& run : runs) {
      const float* src = plane + run.src;
      if (col == 1) {
        std::memcpy(d, src, sizeof(float) * run.len);
      } else if (col == 2) {  // the common strided case, as a loop the compiler vectorizes
        for (int64_t j = 0; j < run.len; ++j) d[j] = src[2 * j];
      } else {
        for (int64_t j = 0; j < run.len; ++j) d[j] = src[j * col];
      }
      d += run.len;
    }
  }
}

// The L2 cache's size per core, as the OS reports it (1 MiB where it does not).
int64_t l2_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (reported > 0) return int64_t(reported);
#endif
    return int64_t(1) << 20;
  }();
  return bytes;
}

}  // namespace

bool pointwise_nchw_applies(const at::Tensor& input, int64_t kh, int64_t kw, at::IntArrayRef stride,
                            at::IntArrayRef padding, int64_t rank) {
  if (kh != 1 || kw != 1 || padding[0] != 0 || padding[1] != 0) return false;
  if (input.scalar_type() != at::kFloat || input.dim() != 4 || input.size(1) < 2) return false;
  if (input.stride(1) == 1) return false;  // channels are the unit-stride axis: not NCHW
  const size_t choice = env_choice("HSV_CPU_POINTWISE_NCHW", {"auto", "on", "off"});
  if (choice != 0) return choice == 1;
  // Every NR-pixel panel streams all of V. From L2 that costs little; a V that does not fit
  // (2048 -> 512 at 7x7, rank 96: 786 KB against a 512 KB L2) came from L3: 1.01-1.09x the
  // general kernel's time at batch 1, 1.12-1.25x at batch 8 (1 and 2 threads; that kernel walks
  // Cin in L1-sized chunks); 1024 -> 512 at 14x14 (rank 80, 320 KB) took 0.90-1.00x its time.
  return rank * input.size(1) * int64_t(sizeof(float)) <= l2_bytes() * 3 / 4;
}

at::Tensor pointwise_nchw_forward(const at::Tensor& input, const at::Tensor& v, const at::Tensor& u,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  const Microkernel& uk) {
  const int64_t n = input.size(0), cin = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t sy = stride[0], sx = stride[1];
  const int64_t ho = (h - 1) / sy + 1, wo = (w - 1) / sx + 1, hw = ho * wo;
  const int64_t r = v.size(0), cout = u.size(0);
  at::Tensor out = at::empty({n, cout, ho, wo}, input.options());
  if (n == 0 || hw == 0) return out;
  g_runs.fetch_add(1, std::memory_order_relaxed);
  const int64_t nr = uk.nr;
  // Each GEMM's row blocks (r rows of V, Cout of U): see packed_a_rows.
  const PackedARows k1 = packed_a_rows(uk, r), k2 = packed_a_rows(uk, cout);
  const int64_t mr1 = k1.mr, mr = k2.mr;
  const MicrokernelStridedFn gemm1 = k1.strided, gemm2 = k2.strided;
  const int64_t r_pad = div_up(r, mr1) * mr1;
  const at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* b = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  // V and U in the strided kernels' A layout, cached against the factors.
  const at::Tensor vp = packed_a_cached(v, mr1), up = packed_a_cached(u, mr);
  const float* vps = vp.data_ptr<float>();
  const float* ups = up.data_ptr<float>();
  const float* x = input.data_ptr<float>();
  const int64_t sn = input.stride(0), sc = input.stride(1), sh = input.stride(2), sw = input.stride(3);
  float* o = out.data_ptr<float>();
  // Stride 1 on planes whose pixels are contiguous: panels are read in place.
  // Otherwise (a strided conv, or a width-sliced view) each tile's pixels are
  // first gathered into a Cin x tile block sized to stay in L2; there a tile
  // may span images. (Gathering 7x7 stride-1 images too, to save their last
  // panel's padding, cost more than the padding: 1.04-1.38x the time.)
  const bool in_place = sy == 1 && sx == 1 && sw == 1 && (h == 1 || sh == w);
  // A panel at a plane's right edge is read NR wide in place too (its extra
  // columns of Z are never written out) unless that would read past the
  // input's storage; then it is copied and zero-filled.
  const float* x_end = static_cast<const float*>(input.storage().data()) + input.storage().nbytes() / sizeof(float);

  // Tiles of whole NR panels, at most tile_max pixels and at least as many
  // as threads: in place, tiles of one image (an image is cut finer at batch
  // 1); gathered, tiles of the batch's pixels in order. Small problems run on
  // the calling thread (fused_threads). Pixels are numbered q = image * hw + pixel.
  const int64_t macs = n * hw * r * (cin + cout);
  const int64_t threads = fused_threads(macs);
  const int64_t tile_max = in_place ? kTile : std::max(nr, std::min(kTile, kGatherFloats / cin / nr * nr));
  int64_t tile, tiles_per_image = 0, tiles;
  if (in_place) {
    const int64_t per_image = std::max(div_up(hw, tile_max), div_up(threads, n));
    tile = std::max(nr, div_up(div_up(hw, per_image), nr) * nr);
    tiles_per_image = div_up(hw, tile);
    tiles = n * tiles_per_image;
  } else {
    const int64_t count = std::max(div_up(n * hw, tile_max), threads);
    tile = std::max(nr, div_up(div_up(n * hw, count), nr) * nr);
    tiles = div_up(n * hw, tile);
  }
  auto tile_range = [&](int64_t item) {  // [q0, q1) of tile `item`
    if (!in_place) return std::make_pair(item * tile, std::min(n * hw, (item + 1) * tile));
    const int64_t img = item / tiles_per_image, q0 = img * hw + (item % tiles_per_image) * tile;
    return std::make_pair(q0, std::min(img * hw + hw, q0 + tile));
  };
  auto input_at = [&](int64_t q) { return x + (q / hw) * sn + q % hw; };  // in place only
  at::parallel_for(0, tiles, threads == 1 ? tiles : 1, [&](int64_t begin, int64_t end) {
    const int64_t panels_max = div_up(tile, nr);
    std::vector<float> xp, z(static_cast<size_t>(panels_max * r_pad * nr)), block(static_cast<size_t>(mr * nr));
    // the gathered tile, NR floats longer so its last panel may be read NR wide
    std::vector<float> xg(in_place ? 0 : static_cast<size_t>(cin * tile + nr), 0.0f);
    std::vector<Run> runs;
    for (int64_t item = begin; item < end; ++item) {
      const auto [q0, q1] = tile_range(item);
      const int64_t panels = div_up(q1 - q0, nr);
      if (!in_place) {
        tile_runs(sn, sh * sy, sw * sx, wo, hw, q0, q1, runs);
        gather_tile(x, cin, sc, sw * sx, runs, xg.data(), tile);
      }
      // Z for every panel of the tile first, so that the second GEMM can write
      // each output plane's run of the tile at once (output channels outer):
      // panels outer wrote 128-byte runs into Cout planes per panel and ran
      // expansion layers (128 -> 512 at 28x28) 1.8x slower.
      for (int64_t pn = 0; pn < panels; ++pn) {
        const int64_t len = std::min(nr, q1 - (q0 + pn * nr));
        const float* src;
        int64_t ldb;
        const float* next;  // the next panel this thread reads: the first row block prefetches it
        if (in_place) {
          src = input_at(q0 + pn * nr);
          ldb = sc;
          next = pn + 1 < panels ? src + nr : item + 1 < end ? input_at(tile_range(item + 1).first) : nullptr;
          if (len < nr && src + (cin - 1) * sc + nr > x_end) {
            xp.resize(static_cast<size_t>(cin * nr));
            for (int64_t k = 0; k < cin; ++k) {
              float* d = xp.data() + k * nr;
              std::memcpy(d, src + k * sc, sizeof(float) * len);
              std::fill(d + len, d + nr, 0.0f);
            }
            src = xp.data();
            ldb = nr;
          }
        } else {
          src = xg.data() + pn * nr;
          ldb = tile;
          next = pn + 1 < panels ? src + nr : nullptr;
        }
        for (int64_t r0 = 0; r0 < r_pad; r0 += mr1)
          gemm1(cin, vps + r0 * cin, src, ldb, z.data() + (pn * r_pad + r0) * nr, nr, r0 == 0 ? next : nullptr);
      }
      for (int64_t c0 = 0; c0 < cout; c0 += mr) {
        const int64_t nrows = std::min(mr, cout - c0);
        for (int64_t pn = 0; pn < panels; ++pn) {
          const int64_t p0 = q0 + pn * nr, len = std::min(nr, q1 - p0);
          const int64_t img = p0 / hw, pix = p0 % hw;
          const bool direct = nrows == mr && len == nr && pix + len <= hw;
          float* dst = o + (img * cout + c0) * hw + pix;
          gemm2(r, ups + c0 * r, z.data() + pn * r_pad * nr, nr, direct ? dst : block.data(), direct ? hw : nr,
                nullptr);
          // the panel's runs of pixels, one per image it covers
          for (int64_t j = 0; j < len;) {
            const int64_t qi = (p0 + j) / hw, qp = (p0 + j) % hw, run = std::min(len - j, hw - qp);
            float* d = o + (qi * cout + c0) * hw + qp;
            if (!direct)
              for (int64_t i = 0; i < nrows; ++i)
                std::memcpy(d + i * hw, block.data() + i * nr + j, sizeof(float) * run);
            if (b != nullptr) add_row_bias(d, hw, nrows, run, b + c0);
            j += run;
          }
        }
      }
    }
  });
  return out;
}

int64_t pointwise_nchw_runs() { return g_runs.load(std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace hsv
