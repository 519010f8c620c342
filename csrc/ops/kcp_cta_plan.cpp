#include "kcp_cta_plan.h"

#include <c10/core/GradMode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <string>

#include "cpu/kernel_util.h"
#include "cpu/pack.h"

namespace hsv {
namespace {

// KcpParams holds ints (the kernel's indices).
int round_up(int64_t v, int64_t m) { return static_cast<int>(cpu::round_up(v, m)); }
int align128(int64_t v) { return round_up(v, 128); }

// The distinct input offsets taps o * stride + i * dil (o < tile, i < k) read, in
// increasing order, and each tap's index into them. False when there are too many.
bool halo_slots(int tile, int k, int stride, int dil, int* off, int* slot, int& count) {
  if (tile * k > kKcpMaxSlots) return false;
  count = 0;
  for (int o = 0; o < tile; ++o)
    for (int i = 0; i < k; ++i) off[count++] = o * stride + i * dil;
  std::sort(off, off + count);
  count = static_cast<int>(std::unique(off, off + count) - off);
  for (int o = 0; o < tile; ++o)
    for (int i = 0; i < k; ++i)
      slot[o * k + i] = static_cast<int>(std::lower_bound(off, off + count, o * stride + i * dil) - off);
  return true;
}

// Sets p's tile fields and shared-memory layout for one candidate; false if its slots do not fit.
bool lay_out(KcpParams& p, int tile_h, int tile_w, int nb, int hc) {
  p.tile_h = tile_h;
  p.tile_w = tile_w;
  p.nb = nb;
  p.p = tile_h * tile_w;
  if (!halo_slots(tile_h, p.kh, p.stride_h, p.dil_h, p.row_off, p.row_slot, p.nrows)) return false;
  if (!halo_slots(tile_w, p.kw, p.stride_w, p.dil_w, p.col_off, p.col_slot, p.ncols)) return false;
  p.hp = p.nrows * p.ncols;
  p.hpp = round_up(p.hp, 16);
  p.hc = std::min(hc, p.hpp);
  p.tiles_y = (p.ho + tile_h - 1) / tile_h;
  p.tiles_x = (p.wo + tile_w - 1) / tile_w;
  p.qnp = round_up(p.qn, nb);
  p.y_rows = p.merged ? p.coutp : p.t1p * p.T2;
  // a: a chunk's input and z0, later z3; b: z1, later z4
  const int64_t a = int64_t{2} * std::max<int64_t>(int64_t{p.s1p + nb} * p.hc * p.S2, int64_t{nb} * p.rp * p.p);
  const int64_t b = int64_t{2} * nb * std::max<int64_t>(int64_t{p.rp} * p.hpp, p.merged ? 0 : int64_t{p.T2} * p.p);
  const int64_t y = int64_t{4} * p.y_rows * p.p;
  const int64_t total = align128(a) + align128(b) + align128(y) + kKcpStageBytes;
  if (total > std::numeric_limits<int>::max() / 2) return false;
  p.off_a = 0;
  p.off_b = align128(a);
  p.off_y = p.off_b + align128(b);
  p.off_stage = p.off_y + align128(y);
  p.smem_bytes = p.off_stage + kKcpStageBytes;
  return true;
}

// Splits the qn blocks of a tile over `splits` CTAs (fewer where that would leave one empty).
void set_splits(KcpParams& p, int splits) {
  const int blocks = p.qnp / p.nb;
  p.split_blocks = (blocks + splits - 1) / splits;
  p.splits = (blocks + p.split_blocks - 1) / p.split_blocks;
  p.ws_split = static_cast<long long>(p.batch) * p.cout * p.ho * p.wo;
}

// Relative time of a launch with p's tile and splits, in units of about a
// thousandth of an SM clock: tensor-core MACs (about 1000 per SM clock for 16-bit
// operands), the depthwise taps at 8 units (SIMT), per CTA, times the waves of CTAs
// the device runs at once (as many per multiprocessor as fit in its shared memory);
// with splits, the workspace's traffic (~69 units per byte per SM from HBM) and the
// second launch (~2 us).
double cost(const KcpParams& p, int64_t smem_limit, int64_t sms) {
  double per_block = double(p.nb) * (double(p.s1p) * p.hp * p.S2 + double(p.rp) * p.S2 * p.hpp +
                                     8.0 * p.rp * p.p * p.kh * p.kw);
  per_block += double(p.s1p) * p.hp * p.S2 * 4 + 64.0 * ((p.hp + p.hc - 1) / p.hc);  // loads, barriers
  per_block += p.merged ? double(p.coutp) * p.nb * p.rp * p.p
                        : double(p.nb) * (double(p.T2) * p.rp * p.p + double(p.t1p) * p.T2 * p.p);
  per_block += 2.0 * p.y_rows * p.p * 4;  // the fp32 output tile in and out of the tensor cores
  const double per_cta = per_block * p.split_blocks;
  const long long ctas = static_cast<long long>(p.batch) * p.tiles_y * p.tiles_x * p.splits;
  const long long per_sm = std::max<long long>(1, std::min<long long>(smem_limit / p.smem_bytes, 8));
  const long long slots = std::max<long long>(1, sms) * per_sm;
  double total = double((ctas + slots - 1) / slots) * per_sm * per_cta;
  if (p.splits > 1) total += (8.0 * p.splits + 2.0) * p.ws_split * 69.0 / std::max<int64_t>(1, sms) + 2e6;
  return total;
}

at::Tensor padded(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor z = at::zeros(shape, t.options().dtype(dtype));
  at::Tensor dst = z;
  for (int64_t d = 0; d < t.dim(); ++d) dst = dst.narrow(d, 0, t.size(d));
  dst.copy_(t);
  return z;
}

}  // namespace

bool kcp_cta_geometry(const at::Tensor& input, at::TensorList factors, const Plan& plan, int64_t smem_limit,
                      int64_t sms, KcpParams& p, std::string* reason, const KcpTile* force) {
  auto no = [&](const std::string& why) {
    if (reason) *reason = why;
    return false;
  };
  const auto dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return no("dtype is not fp16/bf16");
  if (plan.stages.size() < 5) return no("not a kcp plan");
  if (input.size(0) > std::numeric_limits<int>::max()) return no("batch past the kernel's 32-bit index");
  p = KcpParams{};
  p.merged = factors.size() == 5;
  p.Q = static_cast<int>(factors[0].size(0));
  p.N = static_cast<int>(factors[0].size(1));
  p.S1 = static_cast<int>(factors[0].size(2));
  p.R = static_cast<int>(factors[1].size(1));
  p.S2 = static_cast<int>(factors[1].size(2));
  p.kh = static_cast<int>(factors[2].size(2));
  p.kw = static_cast<int>(factors[3].size(2));
  p.cout = static_cast<int>(plan.out_channels);
  if (!p.merged) {
    p.T2 = static_cast<int>(factors[4].size(1));
    p.T1 = static_cast<int>(factors[5].size(0));
  }
  if (p.S2 % 16 != 0) return no("S2 is not a multiple of 16");
  if (!p.merged && p.T2 % 16 != 0) return no("T2 is not a multiple of 16");
  p.qn = p.Q * p.N;
  p.s1p = round_up(p.S1, 16);
  p.rp = round_up(p.R, 16);
  p.t1p = round_up(p.T1, 16);
  p.coutp = round_up(p.cout, 16);
  p.batch = static_cast<int>(input.size(0));
  p.h = static_cast<int>(input.size(2));
  p.w = static_cast<int>(input.size(3));
  p.ho = static_cast<int>(plan.out_shape[2]);
  p.wo = static_cast<int>(plan.out_shape[3]);
  // the chain's stage 2 carries the height's conv parameters, stage 3 the width's
  const ConvParams& ch = plan.stages[2].conv;
  const ConvParams& cw = plan.stages[3].conv;
  p.stride_h = static_cast<int>(ch.stride[0]);
  p.pad_h = static_cast<int>(ch.padding[0]);
  p.dil_h = static_cast<int>(ch.dilation[0]);
  p.stride_w = static_cast<int>(cw.stride[1]);
  p.pad_w = static_cast<int>(cw.padding[1]);
  p.dil_w = static_cast<int>(cw.dilation[1]);
  // Offsets into the packed factors are ints (those into the input and output are 64-bit).
  if (int64_t{p.qn} * p.R * std::max(p.cout, p.T2) > std::numeric_limits<int>::max() / 4)
    return no("factors past the kernel's 32-bit offsets");

  if (force != nullptr) {
    if (force->tile_h * force->tile_w % 16 != 0 || force->nb % 16 != 0 || force->nb <= 0)
      return no("a forced tile needs tile_h * tile_w and nb to be positive multiples of 16");
    if (force->splits < 0) return no("a forced split count must not be negative (0 or 1: not split)");
    if (!lay_out(p, force->tile_h, force->tile_w, force->nb, 32)) return no("the forced tile has too many taps");
    if (p.smem_bytes > smem_limit) return no("the forced tile needs more shared memory than allowed");
    set_splits(p, std::max(1, std::min(force->splits, p.qnp / p.nb)));
    return true;
  }
  static const int kTiles[][2] = {{8, 8}, {4, 16}, {4, 8}, {2, 16}, {2, 8}, {4, 4}, {1, 16}};
  KcpParams best;
  double best_cost = -1;
  for (const auto& t : kTiles) {
    for (int nb : {16, 32})
      for (int hc : {64, 32, 16}) {
        KcpParams c = p;
        if (!lay_out(c, t[0], t[1], nb, hc) || c.smem_bytes > smem_limit) continue;
        for (int splits : {1, 2, 3, 4, 6, 8, 12, 16}) {
          if (splits > c.qnp / c.nb) break;
          set_splits(c, splits);
          if (c.splits != splits) continue;  // the same as a smaller count
          const double v = cost(c, smem_limit, sms);
          if (best_cost < 0 || v < best_cost) {
            best_cost = v;
            best = c;
          }
        }
      }
  }
  if (best_cost < 0) return no("no tile fits in shared memory");
  p = best;
  return true;
}

std::vector<at::Tensor> kcp_cta_pack(at::TensorList factors, const c10::optional<at::Tensor>& bias, KcpParams& p,
                                     bool cache) {
  const at::NoGradGuard no_grad;
  const at::ScalarType dt = factors[0].scalar_type();
  const std::string tag = std::string(c10::toString(dt)) + ":" + std::to_string(p.qnp) + "," +
                          std::to_string(p.s1p) + "," + std::to_string(p.rp) + "," + std::to_string(p.t1p) + "," +
                          std::to_string(p.coutp);
  auto packed = [&](const at::Tensor& f, const char* role, const std::function<at::Tensor()>& make) {
    return cache ? cpu::packed_cached(f, std::string("kcp_cta.") + role + ":" + tag, make) : make();
  };
  std::vector<at::Tensor> keep;
  keep.push_back(packed(factors[0], "bs", [&] {
    return padded(factors[0].reshape({p.qn, p.S1}), {p.qnp, p.s1p}, dt);
  }));
  keep.push_back(packed(factors[1], "as", [&] { return padded(factors[1], {p.N, p.rp, p.S2}, dt); }));
  keep.push_back(packed(factors[2], "ah", [&] { return factors[2].to(at::kFloat).contiguous(); }));
  keep.push_back(packed(factors[3], "aw", [&] { return factors[3].to(at::kFloat).contiguous(); }));
  p.bs = keep[0].data_ptr();
  p.as = keep[1].data_ptr();
  p.ah = keep[2].data_ptr<float>();
  p.aw = keep[3].data_ptr<float>();
  p.at = p.bt = p.m = nullptr;
  if (p.merged) {
    keep.push_back(packed(factors[4], "m", [&] {
      return padded(factors[4].reshape({p.cout, p.qn, p.R}), {p.coutp, p.qnp, p.rp}, dt);
    }));
    p.m = keep.back().data_ptr();
  } else {
    keep.push_back(packed(factors[4], "at", [&] { return padded(factors[4], {p.N, p.T2, p.rp}, dt); }));
    keep.push_back(packed(factors[5], "bt", [&] {
      return padded(factors[5].reshape({p.T1, p.qn}), {p.t1p, p.qnp}, dt);
    }));
    p.at = keep[keep.size() - 2].data_ptr();
    p.bt = keep.back().data_ptr();
  }
  p.bias = nullptr;
  if (bias.has_value() && bias->defined()) {
    keep.push_back(packed(*bias, "bias", [&] { return bias->to(at::kFloat).contiguous(); }));
    p.bias = keep.back().data_ptr<float>();
  }
  return keep;
}

at::Tensor kcp_cta_workspace(const at::Tensor& input, KcpParams& p) {
  p.ws = nullptr;
  if (p.splits <= 1) return at::Tensor();
  at::Tensor ws = at::empty({p.splits * p.ws_split}, input.options().dtype(at::kFloat));
  p.ws = ws.data_ptr<float>();
  return ws;
}

void kcp_cta_bind(const at::Tensor& input, const at::Tensor& out, KcpParams& p) {
  p.x = input.data_ptr();
  p.sn = input.stride(0);
  p.sc = input.stride(1);
  p.sh = input.stride(2);
  p.sw = input.stride(3);
  p.in_channels_fastest = input.stride(1) == 1 && input.size(1) > 1;
  p.out = out.data_ptr();
  p.on = out.stride(0);
  p.oc = out.stride(1);
  p.oh = out.stride(2);
  p.ow = out.stride(3);
  p.out_channels_fastest = out.stride(1) == 1 && out.size(1) > 1;
}

}  // namespace hsv
