// Fused forward of kind "hsv" (layout in hsvkernels/formats/hsv.py), and of
// kind "svd" as hsv with S1 = T2 = 1:
//   W[t1*T2 + t2, s1*S2 + s2] = sum_p A[t1, s1, p] * B[p, t2, s2]   (B a kh x kw conv)
// The composite chain runs B as one conv over the batch-folded view
// (N*S1, S2, H, W) and A as a GEMM after it, each a full pass over memory.
// Here the output pixels of the whole batch, in (N, Ho, Wo) order, are cut into
// tiles of P consecutive pixels (a tile may span images), and per tile:
//   for each input-channel group s1:
//     Y_s1 (pix x P*T2) = im2col(x[:, s1*S2 : (s1+1)*S2])[tile] @ B^T
//       implicit im2col: one row pointer per pixel and tap into NHWC input
//       (or, for NCHW, a per-tile NHWC patch or strided reads: see the input
//       rule in hsv_fused_forward); B's rows are packed in (t2, p) order, so
//       for each t2 the P values of a pixel are contiguous. (Level 2: conv
//       with B1, then a GEMM with B2.)
//     With S1 > 1, Y_s1 is copied into Y (pix x T2 x S1*P) so that each
//     (t2, pixel) has its whole contraction axis (s1, p) contiguous.
//   for each t2:
//     NHWC output: Z[:, t2, :] (pix x T1) = bias + Y[:, t2, :] @ A^T (K = S1*P;
//       level 2 through A1 then A2), then Z goes to channels t1*T2 + t2 (in
//       place when T2 = 1);
//     NCHW output: the last GEMM transposed, (T1 x pix) = A @ Y[:, t2, :]^T,
//       so result rows are runs of output planes (final_nchw).
// All intermediates are per-thread buffers of P rows (L1/L2 sized); threads
// take whole tiles (at::parallel_for), and tiles shrink when there are too few
// of them for the threads (small images at batch 1). Factors are packed into
// NR-wide microkernel panels once and cached against the factor tensors (pack.h).
#include "hsv_fused.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <numeric>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define HSV_HAVE_MMAP 1
#endif
#include <vector>

#include "../env_choice.h"
#include "../epilogue.h"
#include "channels_last_copy.h"
#include "im2col_panels.h"
#include "kernel_util.h"
#include "pack.h"
#include "pointwise_nchw.h"

namespace hsv {
namespace cpu {
namespace {

constexpr int64_t kMaxTilePixels = 128;
// NCHW output: a tile writes a run of p_tile pixels into each of Cout planes at
// once, and 128-pixel runs (512 bytes per plane, Cout streams) left the write
// misses unprefetched: a 1x1 64->256 layer at 56x56, batch 8, 2 threads, took
// 8.5-10 ms against 2.0-2.1 with 512-pixel tiles (composite chain 2.9); 3x3
// 64@56 went from 3.5-7 to 3.2-3.3 ms. 768 and whole images measured no better.
constexpr int64_t kMaxTilePixelsNchwOut = 512;
// Inputs with at most this many channels take tile_conv_rows (Problem::row_taps).
constexpr int64_t kRowTapsMaxChannels = 8;
// tile_conv_taps: taps per call until the call's K (taps x S2) reaches about
// this. One call per tap and Cin chunk (at most 384 channels, its B slice in
// L1) reloads and stores the C block every 64-384 k steps, and the first FMAs
// wait on those loads. Grouping took ResNet-style 3x3 layers (AVX2, 1 and 2
// threads, batch 1 and 8, bench/cpu_fused_hsv.py --ab) to 0.90-0.99 of their
// per-tap time in the SVD layout (K = 576 at 64@56 up to 1024 at 512@7) and
// 0.79-0.98 with S1 = 4 splits; K budgets of 600, 1200 and 2400 measured alike.
constexpr int64_t kTapCallK = 1152;
constexpr int64_t kMaxTapRows = 256;  // row pointers per call: taps x MR
std::atomic<int64_t> g_tap_group_runs{0};

// A read-only all-zero buffer of at least n floats, or null where unsupported.
// It stands in for a padding row of a strided-channel (NCHW) input, read at
// k * channel stride like a real row, so the microkernel needs no gathered
// copy next to the padding. An anonymous mapping that is only read maps every
// page to the OS's shared zero page: no memory, and its few lines stay cached.
// Grows by doubling; superseded mappings stay mapped (another thread may still
// read them), which costs address space only.
const float* zero_span(int64_t n) {
#ifdef HSV_HAVE_MMAP
  static std::mutex mutex;
  static void* base = nullptr;
  static size_t bytes = 0;
  std::lock_guard<std::mutex> lock(mutex);
  const size_t need = static_cast<size_t>(n) * sizeof(float);
  if (need <= bytes) return static_cast<const float*>(base);
  size_t len = std::max<size_t>(bytes * 2, size_t(1) << 20);
  while (len < need) len *= 2;
  void* p = mmap(nullptr, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  base = p;
  bytes = len;
  return static_cast<const float*>(base);
#else
  (void)n;
  return nullptr;
#endif
}

struct Problem {
  int64_t mr;
  int64_t S1, S2, T1, T2, P, n1, s1p;
  bool split_b, split_a;
  Panels conv;  // the kh x kw conv on one channel group: B (N = P*T2) or B1 (N = q1)
  Panels b2;    // level 2: Q @ B2^T -> Y_s1 (N = P*T2)
  Panels a;     // A (N = T1) or A1 (N = q2), K = S1*P
  Panels a2;    // level 2: R @ A2^T (N = T1)
  // NCHW output: the last GEMM runs transposed, out^T block (T1 rows x pixels)
  // = Wf (T1 x kf) @ Yin^T, so each result row is a run of one output plane.
  const Microkernel* ukt;  // the ISA's wide kernel (NR over pixels)
  const float* wf;         // A as (T1, S1*P) or A2 (T1, q2), row-major
  int64_t kf;              // its K
  // With a bias: per t2, Wf with bias[t1*T2 + t2] as one more column ([T2][T1][kf + 1]),
  // and final_nchw's pixel panels get a row of ones, so the GEMM adds the bias.
  const float* wf_bias;    // null without a bias
  int64_t kfb;             // kf + 1 with a bias, else kf
  int64_t h, w, kh, kw, taps, kc, hw, wo, pixels, p_tile, cout;
  bool stage;  // strided-channel input: staged per tile into an NHWC patch (stage_patch)
  // Few input channels (e.g. an RGB stem): per tap the GEMM's K would be S2
  // (3), far too short for the microkernel; see tile_conv_rows.
  bool row_taps;
  // Taps per microkernel call in tile_conv_taps; 0: one call per tap and Cin
  // chunk (HSV_CPU_CONV_TAPS=per_tap, or kernels without MicrokernelTapsFn).
  int64_t tap_group;
  ConvParams cv;
  const float* x;
  int64_t sn, sc, sh, sw;  // input strides (elements): image, channel, row, column
  const float* bias_t;     // [T2][t1_pad]: bias[t1*T2 + t2], zeros without bias
  int64_t t1_pad;          // row length of the last GEMM's output per t2
  const float* zeros;      // kc floats: a padding row when sc == 1
  const float* zeros_strided;  // kc * sc floats (zero_span): a padding row when sc != 1, or null
  float* out;
  bool out_nhwc;
  const float* residual;   // the epilogue's residual, laid out like out, or null
  bool relu;               // the epilogue's ReLU
  bool epilogue;           // residual or relu: run_tile ends with tile_epilogue
};

// A tile: first pixel (over the batch), pixel count, and per pixel the
// input image's offset and the receptive field's top-left corner.
struct Tile {
  int64_t g0 = 0, np = 0;
  std::vector<int64_t> xoff, iy0, ix0;

  void set(const Problem& pb, int64_t item) {
    g0 = item * pb.p_tile;
    np = std::min(pb.p_tile, pb.pixels - g0);
    xoff.resize(pb.p_tile);
    iy0.resize(pb.p_tile);
    ix0.resize(pb.p_tile);
    for (int64_t p = 0; p < pb.p_tile; ++p) {
      if (p < np) {
        const int64_t img = (g0 + p) / pb.hw, q = (g0 + p) % pb.hw;
        xoff[p] = img * pb.sn;
        iy0[p] = (q / pb.wo) * pb.cv.stride[0] - pb.cv.padding[0];
        ix0[p] = (q % pb.wo) * pb.cv.stride[1] - pb.cv.padding[1];
      } else {  // past the batch end: a far-away origin, so every tap reads zeros
        xoff[p] = 0;
        iy0[p] = -(int64_t(1) << 40);
        ix0[p] = 0;
      }
    }
  }
};

// c (rows x g.n_pad, ld ldc) = init + a (rows x g.k, ld lda) @ B for the
// tile's row blocks; init is a row of g.n_pad floats or null (zeros).
// Row blocks outer: each block's MR rows of c are written whole, panel after
// panel, before the next block's. c is often the NHWC output itself (rows of
// Cout floats), and with panels outer every pass wrote 128-byte pieces of all
// the tile's rows: on channels_last 1x1 expansion layers (resnet50.layer2.0.conv3,
// 24 -> 512) that ran at 1.5-1.6x the composite chain's time, or 2.9x in some
// processes (it depended on where the output landed), against 0.87-1.15x with
// row blocks outer (batch 8 and 32, 1 and 2 threads; others within 2%, or faster).
// B's panels then stream from L2 once per row block; the block's rows stay in L1.
void tile_gemm(const Problem& pb, const Tile& t, const Panels& g, const float* a, int64_t lda, float* c, int64_t ldc,
               const float* init) {
  const float* rows[64];
  const int64_t nr = g.uk->nr;
  for (int64_t ib = 0; ib < t.np; ib += g.uk->mr) {
    for (int64_t i = 0; i < g.uk->mr; ++i) rows[i] = a + (ib + i) * lda;
    for (int64_t jb = 0; jb < g.n_pad / nr; ++jb)
      g.uk->fn(g.k, rows, 1, g.b + jb * g.k * nr, c + ib * ldc + jb * nr, ldc, false, init ? init + jb * nr : nullptr);
  }
}

// c (rows x conv.n_pad) = im2col(x[:, c_base : c_base + S2])[tile] @ conv's B.
// K is walked tap by tap and in Cin chunks of kc, so the chunk's slice of B
// (kc x NR) stays in L1 across all the tile's row blocks.
// Where tile_conv reads one channel group: channel c of pixel (iy, ix) of the
// tile's pixel i is at x + xoff[i] + iy * sh + ix * sw + c * sc.
struct Source {
  const float* x;
  int64_t sc, sh, sw;
  const int64_t* xoff;
};

// row_taps: per tap the GEMM's K would be S2 (3 for an RGB stem), too short
// for the microkernel. The input is NHWC holding only the conv's channels
// (S1 = 1), so a pixel's kernel row is kw * S2 contiguous floats, and K is
// walked by kernel row (K = kw * S2 per call, B's (tap, c) order) instead of
// by tap. A pixel whose kernel row crosses the left or right border gets that
// row copied into `gather` (MR x kw * S2) with zeros outside. (Copying every
// pixel's whole im2col row for one K = taps * S2 call measured no faster: the
// copies cost what the saved accumulator reloads did.)
void tile_conv_rows(const Problem& pb, const Tile& t, const Source& src, float* c, float* gather) {
  const Panels& g = pb.conv;
  const int64_t nr = g.uk->nr, mr = g.uk->mr, krow = pb.kw * pb.S2;
  const float* rows[64];
  for (int64_t ib = 0; ib < t.np; ib += mr) {
    for (int64_t dy = 0; dy < pb.kh; ++dy) {
      for (int64_t i = 0; i < mr; ++i) {
        const int64_t iy = t.iy0[ib + i] + dy * pb.cv.dilation[0], ix0 = t.ix0[ib + i];
        if (iy < 0 || iy >= pb.h) {
          rows[i] = pb.zeros;
          continue;
        }
        const float* sp = src.x + src.xoff[ib + i] + iy * src.sh;
        if (ix0 >= 0 && ix0 + pb.kw <= pb.w) {
          rows[i] = sp + ix0 * src.sw;
          continue;
        }
        float* gr = gather + i * krow;
        for (int64_t dx = 0; dx < pb.kw; ++dx) {
          const int64_t ix = ix0 + dx;
          const bool in = ix >= 0 && ix < pb.w;
          for (int64_t ch = 0; ch < pb.S2; ++ch) gr[dx * pb.S2 + ch] = in ? sp[ix * src.sw + ch] : 0.0f;
        }
        rows[i] = gr;
      }
      for (int64_t jb = 0; jb < g.panels(); ++jb) {
        const Microkernel& kj = g.kernel(jb);
        kj.fn(krow, rows, 1, g.panel(0, jb) + dy * krow * kj.nr, c + ib * g.n_pad + jb * nr, g.n_pad, dy > 0,
              nullptr);
      }
    }
  }
}

// Panel jb of tile_conv, pb.tap_group taps (all of each tap's S2 channels) per
// microkernel call: C stays in registers across them (MicrokernelTapsFn).
// src has unit-stride channels (see where tap_group is set).
void tile_conv_taps(const Problem& pb, const Tile& t, const Source& src, float* c, int64_t jb) {
  const Panels& g = pb.conv;
  const Microkernel& kj = g.kernel(jb);
  const int64_t mr = g.uk->mr, tg = pb.tap_group;
  const float* rows[kMaxTapRows];
  int64_t dys[kMaxTapRows], dxs[kMaxTapRows], offs[kMaxTapRows];
  // A pixel whose receptive field lies inside the image takes every tap at a fixed offset from its corner.
  const int64_t span_y = (pb.kh - 1) * pb.cv.dilation[0], span_x = (pb.kw - 1) * pb.cv.dilation[1];
  for (int64_t t0 = 0; t0 < pb.taps; t0 += tg) {
    const int64_t nt = std::min(tg, pb.taps - t0);
    const float* bslice = g.panel(0, jb) + t0 * pb.S2 * kj.nr;
    for (int64_t j = 0; j < nt; ++j) {
      dys[j] = ((t0 + j) / pb.kw) * pb.cv.dilation[0];
      dxs[j] = ((t0 + j) % pb.kw) * pb.cv.dilation[1];
      offs[j] = dys[j] * src.sh + dxs[j] * src.sw;
    }
    for (int64_t ib = 0; ib < t.np; ib += mr) {
      for (int64_t i = 0; i < mr; ++i) {
        const int64_t iy0 = t.iy0[ib + i], ix0 = t.ix0[ib + i];
        const float* image = src.x + src.xoff[ib + i];
        if (iy0 >= 0 && iy0 + span_y < pb.h && ix0 >= 0 && ix0 + span_x < pb.w) {
          const float* corner = image + iy0 * src.sh + ix0 * src.sw;
          for (int64_t j = 0; j < nt; ++j) rows[j * mr + i] = corner + offs[j];
          continue;
        }
        for (int64_t j = 0; j < nt; ++j) {  // (the corner itself may lie far outside: never formed)
          const int64_t iy = iy0 + dys[j], ix = ix0 + dxs[j];
          rows[j * mr + i] = iy >= 0 && iy < pb.h && ix >= 0 && ix < pb.w ? image + iy * src.sh + ix * src.sw
                                                                           : pb.zeros;
        }
      }
      kj.taps(nt, pb.S2, rows, 1, bslice, c + ib * g.n_pad + jb * g.uk->nr, g.n_pad, t0 > 0, nullptr);
    }
  }
}

void tile_conv(const Problem& pb, const Tile& t, const Source& src, float* c, float* gather) {
  if (pb.row_taps) return tile_conv_rows(pb, t, src, c, gather);
  const Panels& g = pb.conv;
  const int64_t nr = g.uk->nr, mr = g.uk->mr;  // the conv's kernel may have its own MR (Panels::uk->three)
  const float* rows[64];
  const float* xg = src.x;
  const int64_t sc = src.sc;
  for (int64_t jb = 0; jb < g.panels(); ++jb) {
    const Microkernel& kj = g.kernel(jb);  // the last panel may be a narrow one (Panels::tail)
    if (pb.tap_group > 0 && kj.taps != nullptr) {
      tile_conv_taps(pb, t, src, c, jb);
      continue;
    }
    for (int64_t tap = 0; tap < pb.taps; ++tap) {
      const int64_t dy = (tap / pb.kw) * pb.cv.dilation[0], dx = (tap % pb.kw) * pb.cv.dilation[1];
      for (int64_t c0 = 0; c0 < pb.S2; c0 += pb.kc) {
        const int64_t klen = std::min(pb.kc, pb.S2 - c0);
        const float* bslice = g.panel(0, jb) + (tap * pb.S2 + c0) * kj.nr;
        const bool acc = tap > 0 || c0 > 0;
        for (int64_t ib = 0; ib < t.np; ib += mr) {
          bool padded = false;
          for (int64_t i = 0; i < mr; ++i) {
            const int64_t iy = t.iy0[ib + i] + dy, ix = t.ix0[ib + i] + dx;
            const bool inside = iy >= 0 && iy < pb.h && ix >= 0 && ix < pb.w;
            rows[i] = inside ? xg + src.xoff[ib + i] + iy * src.sh + ix * src.sw + c0 * sc : nullptr;
            padded |= !inside;
          }
          float* cb = c + ib * g.n_pad + jb * nr;
          const float* zero_row = sc == 1 ? pb.zeros : pb.zeros_strided;
          if (!padded || zero_row != nullptr) {
            for (int64_t i = 0; i < mr; ++i) rows[i] = rows[i] ? rows[i] : zero_row;
            kj.fn(klen, rows, sc, bslice, cb, g.n_pad, acc, nullptr);
            continue;
          }
          // Strided channels next to the padding and no zero_span: one zero
          // vector cannot stand in for a strided row, so gather this block's rows.
          for (int64_t i = 0; i < mr; ++i) {
            float* gr = gather + i * pb.kc;
            for (int64_t k = 0; k < klen; ++k) gr[k] = rows[i] ? rows[i][k * sc] : 0.0f;
            rows[i] = gr;
          }
          kj.fn(klen, rows, 1, bslice, cb, g.n_pad, acc, nullptr);
        }
      }
    }
  }
}

// Strided-channel (e.g. NCHW) input: copies the input rows the tile reads, of
// channel group s1, into an NHWC patch (per image the tile touches: its input
// rows x W x S2), and returns the patch as the tile's Source. The patch is a
// few hundred KB at most (L2), so this costs one pass over the tile's input,
// where reading NCHW in place makes each microkernel row step a strided load
// and converting the whole input to NHWC up front is a full round trip
// through memory (measured slower than either on 56x56 layers).
Source stage_patch(const Problem& pb, const Tile& t, int64_t s1, std::vector<float>& patch,
                   std::vector<int64_t>& poff) {
  const int64_t span = (pb.kh - 1) * pb.cv.dilation[0] + 1;
  const int64_t row_len = pb.w * pb.S2;
  struct Seg { int64_t img, iy_lo, rows, off; };
  std::vector<Seg> segs;
  int64_t total = 0;
  for (int64_t i = 0; i < t.np;) {  // one segment per image in the tile
    const int64_t g = t.g0 + i, img = g / pb.hw;
    const int64_t last = std::min(t.np, (img + 1) * pb.hw - t.g0) - 1;  // tile index of the image's last pixel
    const int64_t oy_a = (g % pb.hw) / pb.wo, oy_b = ((t.g0 + last) % pb.hw) / pb.wo;
    const int64_t lo = std::max<int64_t>(0, oy_a * pb.cv.stride[0] - pb.cv.padding[0]);
    const int64_t hi = std::min(pb.h, oy_b * pb.cv.stride[0] - pb.cv.padding[0] + span);
    segs.push_back(Seg{img, lo, std::max<int64_t>(0, hi - lo), total});
    total += segs.back().rows * row_len;
    i = last + 1;
  }
  if (static_cast<int64_t>(patch.size()) < total) patch.resize(static_cast<size_t>(total));
  poff.resize(pb.p_tile);
  size_t si = 0;
  for (int64_t i = 0; i < pb.p_tile; ++i) {
    if (i >= t.np) {
      poff[i] = 0;  // past the batch end: its far-away origin never reads
      continue;
    }
    while ((t.g0 + i) / pb.hw != segs[si].img) ++si;
    poff[i] = segs[si].off - segs[si].iy_lo * row_len;
  }
  const ToPixelMajorFn copy = pb.conv.uk->to_pixel_major;
  for (const Seg& sg : segs) {
    const float* src = pb.x + sg.img * pb.sn + s1 * pb.S2 * pb.sc + sg.iy_lo * pb.sh;
    float* dst = patch.data() + sg.off;
    if (pb.sw == 1 && pb.sh == pb.w) {  // the segment's rows are one run of each plane
      copy(pb.S2, sg.rows * pb.w, src, pb.sc, dst, pb.S2);
    } else if (pb.sw == 1) {
      for (int64_t r = 0; r < sg.rows; ++r) copy(pb.S2, pb.w, src + r * pb.sh, pb.sc, dst + r * row_len, pb.S2);
    } else {  // strided pixels too (e.g. a sliced width): 16 channels per pass, 16 read streams
      constexpr int64_t kCb = 16;
      for (int64_t r = 0; r < sg.rows; ++r)
        for (int64_t c0 = 0; c0 < pb.S2; c0 += kCb) {
          const int64_t c1 = std::min(pb.S2, c0 + kCb);
          for (int64_t ix = 0; ix < pb.w; ++ix) {
            const float* sp = src + r * pb.sh + ix * pb.sw;
            float* dp = dst + (r * pb.w + ix) * pb.S2;
            for (int64_t c = c0; c < c1; ++c) dp[c] = sp[c * pb.sc];
          }
        }
    }
  }
  return Source{patch.data(), 1, row_len, pb.S2, poff.data()};
}

// Per-thread buffers, each p_tile rows.
struct Buffers {
  std::vector<float> q, ys, yall, r, z, gather, yt, block, zero_row, patch;
  std::vector<int64_t> poff;
  Buffers(const Problem& pb) {
    const auto n = [&](int64_t cols) { return static_cast<size_t>(pb.p_tile * cols); };
    if (pb.split_b) q.resize(n(pb.conv.n_pad));
    ys.resize(n(pb.split_b ? pb.b2.n_pad : pb.conv.n_pad));
    if (pb.S1 > 1) yall.resize(n(pb.T2 * pb.s1p));
    if (pb.split_a) r.resize(n(pb.a.n_pad));
    const int64_t gather_rows = std::max<int64_t>(pb.mr, pb.conv.uk->mr);
    gather.resize(static_cast<size_t>(gather_rows * (pb.row_taps ? pb.kw * pb.S2 : pb.kc)));
    if (pb.out_nhwc) {
      z.resize(n(pb.T2 * pb.t1_pad));
    } else {
      yt.resize(static_cast<size_t>(round_up(pb.p_tile, pb.ukt->nr) * pb.kfb));
      block.resize(static_cast<size_t>(pb.ukt->mr * pb.ukt->nr));
      zero_row.resize(static_cast<size_t>(pb.kfb), 0.0f);
    }
  }
};

// NHWC output: the tile Z [pix][t2][t1] -> channels t1*T2 + t2, written once.
void write_tile_nhwc(const Problem& pb, const Tile& t, const float* z) {
  const int64_t ldz = pb.T2 * pb.t1_pad;
  for (int64_t i = 0; i < t.np; ++i) {
    float* dst = pb.out + (t.g0 + i) * pb.cout;
    const float* zi = z + i * ldz;
    if (pb.T2 == 1) {
      std::memcpy(dst, zi, sizeof(float) * pb.cout);
      continue;
    }
    for (int64_t t2 = 0; t2 < pb.T2; ++t2)
      for (int64_t t1 = 0; t1 < pb.T1; ++t1) dst[t1 * pb.T2 + t2] = zi[t2 * pb.t1_pad + t1];
  }
}

// NCHW output, one t2: out[:, t1*T2 + t2, pixels] = bias + Wf @ Yin^T, where
// Yin row i (ld floats apart) holds pixel i's kf inputs. Yin is transposed
// into NR-pixel panels (kf x NR; Yin is a few times narrower than the output)
// so the microkernel's rows are output channels and its columns pixels: each
// MR x NR result block is MR runs of output planes. A block of MR whole rows
// and NR pixels of one image is written straight into the output; edge blocks
// go through a scratch block, copied out as runs (split where the tile crosses
// an image). The bias comes in as one more K step (Problem::wf_bias): adding it
// to each written block afterwards was 1.7% of a 64@56 layer's samples. Writing the output as
// pixel-major blocks instead would need a scalar transpose of the whole output,
// which measured slower than the GEMMs for a 1x1 256->1024 layer; copying every block out
// (before the direct writes) made a 1x1 64->256 layer at 56x56 1.5-2x slower
// than the composite chain, whose K = 12 GEMM writes its output in place.
void final_nchw(const Problem& pb, const Tile& t, const float* yin, int64_t ld, int64_t t2, Buffers& buf) {
  const Microkernel& uk = *pb.ukt;
  const int64_t nr = uk.nr, mr = uk.mr, kf = pb.kf, kfb = pb.kfb;
  const int64_t panels = div_up(t.np, nr);
  for (int64_t pn = 0; pn < panels; ++pn) {
    // panel[k][j] = Yin[pn * nr + j][k]: the register-transpose copy with the
    // panel's pixels as its "channels"; a last partial panel's pixel columns are zeros
    float* dst = buf.yt.data() + pn * kfb * nr;
    const int64_t valid = std::min(nr, t.np - pn * nr);
    if (valid < nr) std::fill(dst, dst + kf * nr, 0.0f);
    uk.to_pixel_major(valid, kf, yin + pn * nr * ld, ld, dst, nr);
    if (kfb > kf) std::fill(dst + kf * nr, dst + kfb * nr, 1.0f);  // the bias column's row
  }
  const float* rows[64];
  const float* wf = pb.wf_bias ? pb.wf_bias + t2 * pb.T1 * kfb : pb.wf;
  float* block = buf.block.data();
  const int64_t ldo = pb.T2 * pb.hw;  // between output channels c and c + T2
  for (int64_t c0 = 0; c0 < pb.T1; c0 += mr) {
    const int64_t nrows = std::min(mr, pb.T1 - c0);
    for (int64_t i = 0; i < mr; ++i) rows[i] = i < nrows ? wf + (c0 + i) * kfb : buf.zero_row.data();
    for (int64_t pn = 0; pn < panels; ++pn) {
      const float* panel = buf.yt.data() + pn * kfb * nr;
      const int64_t j0 = pn * nr, j1 = std::min(t.np, j0 + nr);
      const int64_t g = t.g0 + j0, img = g / pb.hw, q = g % pb.hw;
      float* o = pb.out + (img * pb.cout + c0 * pb.T2 + t2) * pb.hw + q;
      if (nrows == mr && j1 - j0 == nr && q + nr <= pb.hw) {
        uk.fn(kfb, rows, 1, panel, o, ldo, false, nullptr);
        continue;
      }
      uk.fn(kfb, rows, 1, panel, block, nr, false, nullptr);
      for (int64_t j = j0; j < j1;) {  // runs of pixels within one image
        const int64_t gj = t.g0 + j, im = gj / pb.hw, qj = gj % pb.hw;
        const int64_t len = std::min(j1 - j, pb.hw - qj);
        for (int64_t i = 0; i < nrows; ++i)
          std::memcpy(pb.out + (im * pb.cout + (c0 + i) * pb.T2 + t2) * pb.hw + qj, block + i * nr + (j - j0),
                      sizeof(float) * len);
        j += len;
      }
    }
  }
}

// The epilogue on the tile's output, just written and still in L2: a second
// pass over the whole output after the kernel cost up to 20% of a 1x1
// 64 -> 256 layer at 56x56, batch 8 (2-core EPYC), where the output is 26 MB.
void tile_epilogue(const Problem& pb, const Tile& t) {
  if (pb.out_nhwc) {  // the tile's pixels are one run of whole NHWC rows
    const int64_t off = t.g0 * pb.cout;
    epilogue_span(pb.out + off, pb.residual ? pb.residual + off : nullptr, t.np * pb.cout, pb.relu);
    return;
  }
  for (int64_t j = 0; j < t.np;) {  // runs of pixels within one image, per channel plane
    const int64_t g = t.g0 + j, img = g / pb.hw, q = g % pb.hw;
    const int64_t len = std::min(t.np - j, pb.hw - q);
    for (int64_t c = 0; c < pb.cout; ++c) {
      const int64_t off = (img * pb.cout + c) * pb.hw + q;
      epilogue_span(pb.out + off, pb.residual ? pb.residual + off : nullptr, len, pb.relu);
    }
    j += len;
  }
}

void run_tile(const Problem& pb, const Tile& t, Buffers& buf) {
  const int64_t ld_ys = pb.split_b ? pb.b2.n_pad : pb.conv.n_pad;
  for (int64_t s1 = 0; s1 < pb.S1; ++s1) {
    const Source src = pb.stage ? stage_patch(pb, t, s1, buf.patch, buf.poff)
                                : Source{pb.x + s1 * pb.S2 * pb.sc, pb.sc, pb.sh, pb.sw, t.xoff.data()};
    if (pb.split_b) {
      tile_conv(pb, t, src, buf.q.data(), buf.gather.data());
      tile_gemm(pb, t, pb.b2, buf.q.data(), pb.conv.n_pad, buf.ys.data(), ld_ys, nullptr);
    } else {
      tile_conv(pb, t, src, buf.ys.data(), buf.gather.data());
    }
    if (pb.S1 > 1) {  // Y[pix][t2][s1*P + p] = Y_s1[pix][t2*P + p]
      const int64_t ld_y = pb.T2 * pb.s1p;
      for (int64_t i = 0; i < t.np; ++i)
        for (int64_t t2 = 0; t2 < pb.T2; ++t2)
          std::memcpy(buf.yall.data() + i * ld_y + t2 * pb.s1p + s1 * pb.P, buf.ys.data() + i * ld_ys + t2 * pb.P,
                      sizeof(float) * pb.P);
    }
  }
  // Rows of the contraction (s1, p) for one t2: in Y, or straight in Y_s1 when S1 = 1.
  const float* y = pb.S1 > 1 ? buf.yall.data() : buf.ys.data();
  const int64_t ld_y = pb.S1 > 1 ? pb.T2 * pb.s1p : ld_ys;
  const int64_t t2_step = pb.S1 > 1 ? pb.s1p : pb.P;
  // NHWC with T2 = 1 and whole row blocks: the last GEMM writes the output rows in place.
  const bool direct = pb.out_nhwc && pb.T2 == 1 && pb.t1_pad == pb.T1 && t.np % pb.mr == 0;
  float* z = direct ? pb.out + t.g0 * pb.cout : buf.z.data();
  const int64_t ldz = pb.T2 * pb.t1_pad;
  for (int64_t t2 = 0; t2 < pb.T2; ++t2) {
    const float* yt2 = y + t2 * t2_step;
    if (pb.split_a) {
      tile_gemm(pb, t, pb.a, yt2, ld_y, buf.r.data(), pb.a.n_pad, nullptr);
      yt2 = buf.r.data();
    }
    const int64_t ld_in = pb.split_a ? pb.a.n_pad : ld_y;
    if (!pb.out_nhwc) {
      final_nchw(pb, t, yt2, ld_in, t2, buf);
      continue;
    }
    tile_gemm(pb, t, pb.split_a ? pb.a2 : pb.a, yt2, ld_in, z + t2 * pb.t1_pad, ldz, pb.bias_t + t2 * pb.t1_pad);
  }
  if (pb.out_nhwc && !direct) write_tile_nhwc(pb, t, buf.z.data());
  if (pb.epilogue) tile_epilogue(pb, t);
}

// Packed rows (t2, p) of a (P, T2, ...) factor: row t2*P + p reads row p*T2 + t2.
std::vector<int64_t> t2_major_rows(int64_t P, int64_t T2) {
  std::vector<int64_t> map(static_cast<size_t>(P * T2));
  for (int64_t t2 = 0; t2 < T2; ++t2)
    for (int64_t p = 0; p < P; ++p) map[t2 * P + p] = p * T2 + t2;
  return map;
}

}  // namespace

bool hsv_fused_supports(const at::Tensor& input, const std::string& kind) {
  return (kind == "hsv" || kind == "svd") && input.scalar_type() == at::kFloat && input.device().is_cpu();
}

at::Tensor hsv_fused_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const Microkernel& uk, const std::string& kind,
                             const Epilogue& epilogue) {
  const int64_t n = input.size(0);
  const at::MemoryFormat out_format = output_memory_format(input);
  if (n == 0) return at::empty(plan.out_shape, input.options().memory_format(out_format));
  const c10::optional<at::Tensor> residual =
      epilogue.residual ? c10::optional<at::Tensor>(*epilogue.residual) : c10::nullopt;
  auto finish = [&](at::Tensor out) {  // the epilogue after a path that does not run it per tile
    apply_epilogue_(out, residual, epilogue.relu);
    return out;
  };
  TORCH_CHECK(uk.mr <= 64 && (uk.narrow == nullptr || uk.narrow->mr == uk.mr) &&
                  (uk.three == nullptr || uk.three->mr <= uk.mr),
              "hsv::conv2d: inconsistent CPU microkernel table (MR)");
  for (const auto& f : factors)
    TORCH_CHECK_VALUE(f.scalar_type() == at::kFloat, "hsv::conv2d(kind='", kind,
                      "'): the fused CPU kernel needs float32 factors like the input, got ", f.scalar_type());

  Problem pb;
  pb.mr = uk.mr;
  const int64_t nf = static_cast<int64_t>(factors.size());
  // Kind "svd" [V (r, Cin, kh, kw), U (Cout, r)] is level-1 hsv with S1 = T2 = 1,
  // P = r: V and U already have B's and A's memory layout.
  const bool svd = kind == "svd";
  pb.split_b = !svd && factors[0].dim() == 4;
  const int64_t a_at = pb.split_b ? 2 : 1;
  pb.split_a = !svd && nf - a_at == 2;
  int64_t& kh = pb.kh;
  if (svd) {  // V is (r, Cin, kh, kw), or (r, Cin, kw) for a 1 x kw conv (separable_two_pass.cpp)
    const at::Tensor& V = factors[0];
    pb.P = V.size(0), pb.T2 = 1, pb.S2 = V.size(1);
    kh = V.dim() == 3 ? 1 : V.size(2), pb.kw = V.size(V.dim() - 1);
  } else if (pb.split_b) {
    const at::Tensor &B1 = factors[0], &B2 = factors[1];
    pb.S2 = B1.size(1), kh = B1.size(2), pb.kw = B1.size(3);
    pb.P = B2.size(0), pb.T2 = B2.size(1);
  } else {
    const at::Tensor& B = factors[0];
    pb.P = B.size(0), pb.T2 = B.size(1), pb.S2 = B.size(2), kh = B.size(3), pb.kw = B.size(4);
  }
  const at::Tensor& A = factors[a_at];
  pb.S1 = svd ? 1 : A.size(1);
  pb.T1 = pb.split_a ? factors[a_at + 1].size(0) : A.size(0);
  pb.taps = kh * pb.kw;
  pb.n1 = pb.P * pb.T2;
  pb.s1p = pb.S1 * pb.P;
  pb.cout = pb.T1 * pb.T2;

  // The SVD layout (one kh x kw conv Cin -> r, one 1x1 r -> Cout) has two paths with the pixels as the vector
  // axis: 1x1 layers on NCHW input as two GEMMs (pointwise_nchw.cpp) instead of strided channel reads here,
  // and convs with few input channels, e.g. an RGB stem (im2col_panels.cpp).
  const ConvParams& cv0 = plan.stages[0].conv;
  if (pb.S1 == 1 && pb.T2 == 1 && !pb.split_b && !pb.split_a) {
    if (out_format == at::MemoryFormat::Contiguous &&
        pointwise_nchw_applies(input, kh, pb.kw, cv0.stride, cv0.padding, pb.P))
      return finish(pointwise_nchw_forward(input, factors[0], A, bias, cv0.stride, uk));
    if (im2col_panels_applies(input, kh, pb.kw, cv0.stride, uk))
      return finish(im2col_panels_forward(input, factors[0], A, bias, kh, pb.kw, cv0, plan.out_shape, out_format,
                                          uk));
  }

  const std::vector<int64_t> rows_t2p = t2_major_rows(pb.P, pb.T2);
  if (pb.split_b) {
    const int64_t q1 = factors[0].size(0);
    pb.conv = make_panels(uk, factors[0], "hsv.B1", q1, pb.S2, pb.taps, nullptr, 1, true, true);
    pb.b2 = make_panels(uk, factors[1], "hsv.B2", pb.n1, q1, 1, &rows_t2p);
  } else {
    pb.conv = make_panels(uk, factors[0], "hsv.B", pb.n1, pb.S2, pb.taps, &rows_t2p, 1, true, true);
  }
  if (pb.split_a) {
    pb.a = make_panels(uk, A, "hsv.A1", A.size(0), pb.s1p);
    pb.a2 = make_panels(uk, factors[a_at + 1], "hsv.A2", pb.T1, A.size(0));
    pb.t1_pad = pb.a2.n_pad;
  } else {
    pb.a = make_panels(uk, A, "hsv.A", pb.T1, pb.s1p);
    pb.t1_pad = pb.a.n_pad;
  }

  // NCHW output: the last GEMM transposed (see final_nchw).
  pb.ukt = &uk;
  const at::Tensor wf = (pb.split_a ? factors[a_at + 1] : A).contiguous();
  pb.wf = wf.data_ptr<float>();
  pb.kf = pb.split_a ? factors[a_at + 1].size(1) : pb.s1p;

  pb.h = input.size(2);
  pb.w = input.size(3);
  pb.wo = plan.out_shape[3];
  pb.hw = plan.out_shape[2] * pb.wo;
  pb.cv = plan.stages[0].conv;
  pb.out_nhwc = out_format == at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(out_format));
  pb.out = out.data_ptr<float>();
  // Per tile when the residual lies like the output (else ATen's add after the kernel).
  const bool tile_residual = residual && residual->strides() == out.strides();
  pb.residual = tile_residual ? residual->data_ptr<float>() : nullptr;
  pb.relu = epilogue.relu && (tile_residual || !residual);
  pb.epilogue = pb.residual != nullptr || pb.relu;

  // Input with unit-stride channels (NHWC) is read in place. Other layouts:
  // staged per tile into an NHWC patch (stage_patch) when each staged value
  // feeds enough FMAs (conv N x taps / stride area >= 256) or the conv has
  // taps at stride 1; else read in place when each value is read only a few
  // times (taps x conv panels <= 9), else copied to NHWC once. Measured on
  // ResNet layers at batch 1 and 8, 1 thread, with the scalar staging copy:
  // staging won at 128@28 and S1 > 1 splits (x0.83-0.92), lost at 64@56 (N =
  // 16), stride 2 and 1x1 (x1.05-1.15), and was even with the whole copy at
  // 256@14 and 512@7. With the register-transpose copy (to_pixel_major) it
  // won at 64@56 too (batch 8: x0.90-0.92, batch 1: x0.95-0.97), and tied or
  // lost (x1.00-1.04) at stride 2. Re-measured at stride 2 with 2 threads
  // (2026-11-22): staging took 0.61-0.78 of the whole-input copy's time on
  // 3x3 stride-2 layers at 28x28 and 56x56 (64->128, 128->256, 256->256,
  // batch 8 and 32; the copy's 6-26 MB buffer is also fresh memory every
  // call) and 0.97-1.06 at 14x14, so any conv with taps stages now.
  // row_taps (tile_conv_rows) reads NHWC rows holding only the conv's channels:
  // other layouts are copied to that once (a stem's input is small). On
  // ResNet-50's stem (3 -> 64, 7x7 stride 2, rank 11), batch 8, 2 threads, it
  // took the layer from 13-15 ms to 4.5-5.5 (NHWC) and 6.9 (NCHW).
  pb.row_taps = pb.S2 <= kRowTapsMaxChannels && pb.kw > 1 && pb.S1 == 1 && pb.cv.dilation[1] == 1;
  const bool nhwc_rows = input.stride(1) == 1 && input.stride(3) == pb.S2;
  const bool strided = input.stride(1) != 1;
  const int64_t reloads = pb.taps * pb.conv.panels();
  const int64_t fma_per_staged = pb.conv.n_pad * pb.taps / (pb.cv.stride[0] * pb.cv.stride[1]);
  pb.stage = strided && !pb.row_taps && (fma_per_staged >= 256 || pb.taps > 1);
  const bool to_nhwc = pb.row_taps ? !nhwc_rows : (strided && !pb.stage && reloads > 9);
  const at::Tensor x = to_nhwc ? to_channels_last(input, uk) : input;
  pb.x = x.data_ptr<float>();
  pb.sn = x.stride(0);
  pb.sc = x.stride(1);
  pb.sh = x.stride(2);
  pb.sw = x.stride(3);

  std::vector<float> bias_t(static_cast<size_t>(pb.T2 * pb.t1_pad), 0.0f);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bias_c = bias->contiguous();
    const float* bsrc = bias_c.data_ptr<float>();
    for (int64_t t1 = 0; t1 < pb.T1; ++t1)
      for (int64_t t2 = 0; t2 < pb.T2; ++t2) bias_t[t2 * pb.t1_pad + t1] = bsrc[t1 * pb.T2 + t2];
  }
  pb.bias_t = bias_t.data();
  std::vector<float> wf_bias;
  pb.wf_bias = nullptr;
  pb.kfb = pb.kf;
  if (!pb.out_nhwc && bias.has_value() && bias->defined()) {
    pb.kfb = pb.kf + 1;
    wf_bias.resize(static_cast<size_t>(pb.T2 * pb.T1 * pb.kfb));
    for (int64_t t2 = 0; t2 < pb.T2; ++t2)
      for (int64_t t1 = 0; t1 < pb.T1; ++t1) {
        float* row = wf_bias.data() + (t2 * pb.T1 + t1) * pb.kfb;
        std::memcpy(row, pb.wf + t1 * pb.kf, sizeof(float) * pb.kf);
        row[pb.kf] = bias_t[t2 * pb.t1_pad + t1];
      }
    pb.wf_bias = wf_bias.data();
  }

  // Cin chunk of the conv GEMM: about 24 KB of packed B per chunk (L1 is
  // 32-48 KB), split evenly so no chunk is a short remainder.
  const int64_t kc_max = std::max<int64_t>(1, 6144 / pb.conv.uk->nr);
  pb.kc = div_up(pb.S2, div_up(pb.S2, kc_max));
  // A padding row: kc floats, or a whole kernel row for tile_conv_rows.
  const std::vector<float> zeros(static_cast<size_t>(std::max(pb.kc, pb.kw * pb.S2)), 0.0f);
  pb.zeros = zeros.data();
  pb.zeros_strided = (pb.sc != 1 && !pb.stage) ? zero_span(pb.kc * pb.sc) : nullptr;
  // Tap groups read unit-stride channels (NHWC input or the staged patch),
  // with pb.zeros (>= S2 floats) as the padding row. The first panel's kernel
  // is the full-width one; only a narrow tail panel may lack taps.
  pb.tap_group = 0;
  if (pb.taps > 1 && !pb.row_taps && (pb.sc == 1 || pb.stage) && pb.conv.uk->taps != nullptr &&
      env_choice("HSV_CPU_CONV_TAPS", {"grouped", "per_tap"}) == 0) {
    const int64_t most = std::max<int64_t>(1, std::min(kTapCallK / pb.S2, kMaxTapRows / pb.conv.uk->mr));
    pb.tap_group = div_up(pb.taps, div_up(pb.taps, most));  // even groups
  }
  if (pb.tap_group > 0 && n > 0 && pb.hw > 0) g_tap_group_runs.fetch_add(1, std::memory_order_relaxed);

  // Tiles of at most max_tile pixels (see the constants), as many as a multiple of the thread
  // count so every thread gets the same number (at::parallel_for hands out
  // contiguous ranges), each a whole number of MR row blocks. (Whole NR panels
  // for the transposed NCHW last GEMM, lcm(MR, NR) = 96 pixels, made tiles of
  // 192 and left one of two threads idle a third of the time at 512@7 batch 8.)
  pb.pixels = n * pb.hw;
  const int64_t threads = fused_threads(pb.pixels * pb.S1 * pb.conv.n_pad * pb.conv.k);
  const int64_t max_tile = pb.out_nhwc ? kMaxTilePixels : kMaxTilePixelsNchwOut;
  const int64_t tiles_wanted = threads * std::max<int64_t>(1, div_up(pb.pixels, threads * max_tile));
  // whole row blocks for both the conv's kernel and the others
  pb.p_tile = round_up(div_up(pb.pixels, tiles_wanted), std::lcm(pb.mr, pb.conv.uk->mr));
  const int64_t tiles = div_up(pb.pixels, pb.p_tile);

  at::parallel_for(0, tiles, threads == 1 ? tiles : 1, [&](int64_t begin, int64_t end) {
    Buffers buf(pb);
    Tile t;
    for (int64_t item = begin; item < end; ++item) {
      t.set(pb, item);
      run_tile(pb, t, buf);
    }
  });
  if (residual && !tile_residual) apply_epilogue_(out, residual, epilogue.relu);
  return out;
}

int64_t conv_tap_group_runs() { return g_tap_group_runs.load(std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace hsv
