// Fused forward of kind "svd" (factors [V (r, Cin, kh, kw), U (Cout, r)]).
//
// The output pixels of the whole batch, in (N, Ho, Wo) order, are cut into
// tiles of P consecutive pixels; a tile may span images, so small images at
// larger batch still make full tiles (fewer passes over V^T). Per tile:
//   GEMM 1  T (P x r)    = im2col(x)[tile] (P x kh*kw*Cin) @ V^T
//           The im2col rows are never copied: the microkernel reads the Cin
//           values of one pixel under one tap in place, through one row
//           pointer per pixel and the input's channel stride (1 for NHWC,
//           H*W for NCHW); padding taps read a zero vector (or, for strided
//           channels, that row block is gathered). K is walked tap by tap.
//   GEMM 2  out (P x Cout) = bias + T @ U^T, T read straight from the
//           cache-resident tile buffer; the bias is the accumulators' start
//           value. NHWC outputs are written in place by the microkernel; NCHW
//           outputs get each MR x NR block transposed on the way out.
// Threads normally take whole tiles (both GEMMs back to back, T never leaves
// the core). When there are too few tiles to feed the threads (small images at
// batch 1), the two GEMMs run as two parallel phases split over column panels
// of r and Cout instead, so no tile has to shrink and re-read all of V.
// NHWC inputs are read in place; other layouts too when each input value is
// read only a few times, else they are copied to NHWC once per call.
// V^T and U^T are packed into NR-wide panels on every call; each GEMM takes
// the narrow microkernel when its N (r or Cout) is small against NR.
// TODO: cache the packed factors per (factor version, ISA) instead of packing
// on every call; a pixels-as-vectors orientation for NCHW and small ranks.
#include "svd_fused.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace hsv {
namespace cpu {
namespace {

constexpr int64_t kMaxTilePixels = 128;  // keeps the P x r tile of T in L1/L2

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Packs a weight w (rows, cin, taps...) into panels of nr rows, transposed for
// the microkernel and with K ordered (tap, cin) to match the NHWC row reads:
//   panel[p][tap * cin + c][j] = w[p*nr + j][c][tap], zero rows past the end.
// One pass, in blocks of 16 channels so the source lines being gathered (nr
// rows x 16 channels x taps) stay in L1 while every tap is written out.
// A matrix (rows, K) is the case taps = 1.
at::Tensor pack_panels(const at::Tensor& w, int64_t rows, int64_t cin, int64_t taps, int64_t nr) {
  const at::Tensor wc = w.contiguous();
  const float* src = wc.data_ptr<float>();
  const int64_t panels = (rows + nr - 1) / nr, K = cin * taps;
  at::Tensor packed = at::empty({panels * K * nr}, at::kFloat);
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* pd = dst + p * K * nr;
      const int64_t valid = std::min(nr, rows - p * nr);
      const float* ps = src + p * nr * K;
      for (int64_t c0 = 0; c0 < cin; c0 += 16) {
        const int64_t c1 = std::min(cin, c0 + 16);
        for (int64_t tap = 0; tap < taps; ++tap)
          for (int64_t c = c0; c < c1; ++c) {
            float* d = pd + (tap * cin + c) * nr;
            for (int64_t j = 0; j < valid; ++j) d[j] = ps[(j * cin + c) * taps + tap];
            for (int64_t j = valid; j < nr; ++j) d[j] = 0.0f;
          }
      }
    }
  });
  return packed;
}

// Everything one tile's GEMMs need, fixed for the call.
struct Problem {
  const Microkernel* uk1;  // GEMM 1 (N = r), NR = nr1
  const Microkernel* uk2;  // GEMM 2 (N = Cout), NR = nr2; same MR
  int64_t mr, nr1, nr2;
  int64_t h, w, cin, kw, taps, k1, r, r_pad, cout, cout_pad, hw, wo, pixels;
  ConvParams cv;
  int64_t p_tile, kc;
  const float* x;     // the input, read in place through its strides:
  int64_t sn, sc, sh, sw;  // (elements) image, channel, row, column
  const float* b1;    // packed V^T
  const float* b2;    // packed U^T
  const float* bias;  // cout_pad floats, zeros past cout (or without bias)
  const float* zeros; // cin floats (a padding row when sc == 1)
  float* out;
  bool out_nhwc;
};

// One tile: first pixel (over the batch), pixel count, and per pixel the
// input image's offset and the receptive field's top-left corner.
struct Tile {
  int64_t g0, np;
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

// GEMM 1 for column panel jb of T (ld r_pad). K is walked tap by tap and, for
// wide Cin, in chunks, so the chunk's slice of V^T (kc x NR) stays in L1
// across all the tile's row blocks.
void gemm1_panel(const Problem& pb, const Tile& t, int64_t jb, float* t_buf, float* gather) {
  const float* rows[64];
  for (int64_t tap = 0; tap < pb.taps; ++tap) {
    const int64_t dy = (tap / pb.kw) * pb.cv.dilation[0], dx = (tap % pb.kw) * pb.cv.dilation[1];
    for (int64_t c0 = 0; c0 < pb.cin; c0 += pb.kc) {
      const int64_t klen = std::min(pb.kc, pb.cin - c0);
      const float* bslice = pb.b1 + (jb * pb.k1 + tap * pb.cin + c0) * pb.nr1;
      for (int64_t ib = 0; ib < t.np; ib += pb.mr) {
        bool padded = false;
        for (int64_t i = 0; i < pb.mr; ++i) {
          const int64_t iy = t.iy0[ib + i] + dy, ix = t.ix0[ib + i] + dx;
          const bool inside = iy >= 0 && iy < pb.h && ix >= 0 && ix < pb.w;
          rows[i] = inside ? pb.x + t.xoff[ib + i] + iy * pb.sh + ix * pb.sw + c0 * pb.sc : nullptr;
          padded |= !inside;
        }
        float* c = t_buf + ib * pb.r_pad + jb * pb.nr1;
        const bool acc = tap > 0 || c0 > 0;
        if (!padded || pb.sc == 1) {
          for (int64_t i = 0; i < pb.mr; ++i) rows[i] = rows[i] ? rows[i] : pb.zeros;
          pb.uk1->fn(klen, rows, pb.sc, bslice, c, pb.r_pad, acc, nullptr);
          continue;
        }
        // Strided channels (e.g. NCHW) next to the padding: one zero vector
        // cannot stand in for a strided row, so gather this block's rows.
        for (int64_t i = 0; i < pb.mr; ++i) {
          float* g = gather + i * pb.kc;
          for (int64_t k = 0; k < klen; ++k) g[k] = rows[i] ? rows[i][k * pb.sc] : 0.0f;
          rows[i] = g;
        }
        pb.uk1->fn(klen, rows, 1, bslice, c, pb.r_pad, acc, nullptr);
      }
    }
  }
}

// GEMM 2 for column panel ob of the output. Full blocks of an NHWC output are
// written in place; edge blocks and NCHW outputs go through an MR x NR scratch
// block (transposed on the way for NCHW).
void gemm2_panel(const Problem& pb, const Tile& t, int64_t ob, const float* t_buf, float* block) {
  const float* rows[64];
  const int64_t o0 = ob * pb.nr2, ncols = std::min(pb.nr2, pb.cout - o0);
  const float* bpanel = pb.b2 + ob * pb.r * pb.nr2;
  for (int64_t ib = 0; ib < t.np; ib += pb.mr) {
    for (int64_t i = 0; i < pb.mr; ++i) rows[i] = t_buf + (ib + i) * pb.r_pad;
    const int64_t nrows = std::min(pb.mr, t.np - ib);
    float* nhwc = pb.out + (t.g0 + ib) * pb.cout + o0;
    if (pb.out_nhwc && nrows == pb.mr && ncols == pb.nr2) {
      pb.uk2->fn(pb.r, rows, 1, bpanel, nhwc, pb.cout, false, pb.bias + o0);
      continue;
    }
    pb.uk2->fn(pb.r, rows, 1, bpanel, block, pb.nr2, false, pb.bias + o0);
    if (pb.out_nhwc) {
      for (int64_t i = 0; i < nrows; ++i)
        for (int64_t j = 0; j < ncols; ++j) nhwc[i * pb.cout + j] = block[i * pb.nr2 + j];
    } else {
      float* dst[64];  // per row: its (image, pixel) in the NCHW output, channel o0
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t g = t.g0 + ib + i;
        dst[i] = pb.out + ((g / pb.hw) * pb.cout + o0) * pb.hw + g % pb.hw;
      }
      for (int64_t j = 0; j < ncols; ++j)
        for (int64_t i = 0; i < nrows; ++i) dst[i][j * pb.hw] = block[i * pb.nr2 + j];
    }
  }
}

}  // namespace

bool svd_fused_supports(const at::Tensor& input, const std::string& kind) {
  return kind == "svd" && input.scalar_type() == at::kFloat && input.device().is_cpu();
}

at::Tensor svd_fused_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const Microkernel& uk) {
  const at::Tensor& V = factors[0];
  const at::Tensor& U = factors[1];
  const int64_t n = input.size(0);
  const at::MemoryFormat out_format = output_memory_format(input);
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(out_format));
  if (n == 0) return out;
  TORCH_CHECK(uk.mr <= 64 && (uk.narrow == nullptr || uk.narrow->mr == uk.mr),
              "hsv::conv2d: inconsistent CPU microkernel table (MR)");

  Problem pb;
  pb.r = V.size(0);
  pb.cin = V.size(1);
  pb.kw = V.size(3);
  pb.taps = V.size(2) * pb.kw;
  pb.k1 = pb.taps * pb.cin;
  pb.cout = U.size(0);
  pb.uk1 = &microkernel_for_width(uk, pb.r);
  pb.uk2 = &microkernel_for_width(uk, pb.cout);
  pb.mr = uk.mr;
  pb.nr1 = pb.uk1->nr;
  pb.nr2 = pb.uk2->nr;
  pb.r_pad = round_up(pb.r, pb.nr1);
  pb.cout_pad = round_up(pb.cout, pb.nr2);
  pb.h = input.size(2);
  pb.w = input.size(3);
  pb.wo = plan.out_shape[3];
  pb.hw = plan.out_shape[2] * pb.wo;
  pb.cv = plan.stages[0].conv;
  pb.out_nhwc = out_format == at::MemoryFormat::ChannelsLast;
  pb.out = out.data_ptr<float>();

  // The input is read in place through its strides when its channels are
  // unit-stride (NHWC), or when each input value is read only a few times
  // (taps x r panels <= 9): measured on 3x3 ResNet layers, strided NCHW reads
  // beat a layout copy for one r panel and lose from two on. Otherwise the
  // input is copied to NHWC once.
  const int64_t reloads = pb.taps * (pb.r_pad / pb.nr1);
  const at::Tensor x =
      (input.stride(1) == 1 || reloads <= 9) ? input : input.contiguous(at::MemoryFormat::ChannelsLast);
  pb.x = x.data_ptr<float>();
  pb.sn = x.stride(0);
  pb.sc = x.stride(1);
  pb.sh = x.stride(2);
  pb.sw = x.stride(3);
  // GEMM 1 operand: V^T.
  const at::Tensor b1 = pack_panels(V, pb.r, pb.cin, pb.taps, pb.nr1);
  // GEMM 2 operand: U^T, K = r.
  const at::Tensor b2 = pack_panels(U, pb.cout, pb.r, 1, pb.nr2);
  pb.b1 = b1.data_ptr<float>();
  pb.b2 = b2.data_ptr<float>();
  // Bias padded to whole panels (zeros without bias): the accumulator start of GEMM 2.
  std::vector<float> bias_pad(static_cast<size_t>(pb.cout_pad), 0.0f);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bias_c = bias->contiguous();
    std::copy(bias_c.data_ptr<float>(), bias_c.data_ptr<float>() + pb.cout, bias_pad.begin());
  }
  pb.bias = bias_pad.data();
  const std::vector<float> zeros(static_cast<size_t>(std::max<int64_t>(pb.cin, 1)), 0.0f);
  pb.zeros = zeros.data();

  // Cin chunk of GEMM 1: about 24 KB of packed V^T per chunk (L1 is 32-48 KB),
  // split evenly so no chunk is a short remainder.
  const int64_t kc_max = std::max<int64_t>(1, 6144 / pb.nr1);
  const int64_t chunks = std::max<int64_t>(1, (pb.cin + kc_max - 1) / kc_max);
  pb.kc = std::max<int64_t>(1, (pb.cin + chunks - 1) / chunks);

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  pb.pixels = n * pb.hw;
  pb.p_tile = round_up(std::min(kMaxTilePixels, pb.pixels), pb.mr);
  const int64_t tiles = (pb.pixels + pb.p_tile - 1) / pb.p_tile;
  const int64_t t_floats = pb.p_tile * pb.r_pad;

  if (tiles >= 2 * threads || threads == 1) {
    // Whole tiles per thread: T stays in this core's cache between the GEMMs.
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> t_buf(static_cast<size_t>(t_floats));
      std::vector<float> block(static_cast<size_t>(pb.mr * pb.nr2));
      std::vector<float> gather(static_cast<size_t>(pb.mr * pb.kc));
      Tile t;
      for (int64_t item = begin; item < end; ++item) {
        t.set(pb, item);
        for (int64_t jb = 0; jb < pb.r_pad / pb.nr1; ++jb) gemm1_panel(pb, t, jb, t_buf.data(), gather.data());
        for (int64_t ob = 0; ob < pb.cout_pad / pb.nr2; ++ob) gemm2_panel(pb, t, ob, t_buf.data(), block.data());
      }
    });
    return out;
  }

  // Too few tiles for the threads: T for all tiles (at most 2 * threads tiles,
  // so small) is built in one parallel phase over (tile, r panel), then the
  // output in a second over (tile, Cout panel).
  std::vector<float> t_all(static_cast<size_t>(tiles * t_floats));
  const int64_t r_panels = pb.r_pad / pb.nr1, c_panels = pb.cout_pad / pb.nr2;
  at::parallel_for(0, tiles * r_panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gather(static_cast<size_t>(pb.mr * pb.kc));
    Tile t;
    for (int64_t item = begin; item < end; ++item) {
      t.set(pb, item / r_panels);
      gemm1_panel(pb, t, item % r_panels, t_all.data() + (item / r_panels) * t_floats, gather.data());
    }
  });
  at::parallel_for(0, tiles * c_panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block(static_cast<size_t>(pb.mr * pb.nr2));
    Tile t;
    for (int64_t item = begin; item < end; ++item) {
      t.set(pb, item / c_panels);
      gemm2_panel(pb, t, item % c_panels, t_all.data() + (item / c_panels) * t_floats, block.data());
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace hsv
