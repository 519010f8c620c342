// Packing factor matrices into the microkernels' B-panel layout, and a cache
// of packed factors so a layer packs its (static) factors once, not per call.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "ukernel.h"

namespace hsv {
namespace cpu {

// Packs w, read as (rows, cin, taps) row-major, into panels of nr rows,
// transposed for the microkernel and with K ordered (tap, cin) to match
// NHWC row reads:
//   panel[p][tap * cin + c][j] = w[src(p*nr + j)][c][tap], zero rows past `rows`,
// where src(j) = row_map[j] when row_map is given (a row permutation), else j.
// A matrix (rows, K) is the case taps = 1.
at::Tensor pack_panels(const at::Tensor& w, int64_t rows, int64_t cin, int64_t taps, int64_t nr,
                       const std::vector<int64_t>* row_map = nullptr);

// The packed B operand of one GEMM stage of a fused kernel, or of `groups`
// GEMMs of one shape: N = rows columns padded to n_pad (whole panels of its
// microkernel's NR), K = cin * taps; group g's panels start at b + g * group_stride.
// With a tail (make_panels(..., tail=true)), the last panel is narrower: `full`
// panels of uk's NR, then one of tail->nr (uk's narrow variant, same MR), so a
// rank of 112 is 3 x 32 + 16 columns instead of 4 x 32 with 16 of padding.
struct Panels {
  const Microkernel* uk = nullptr;  // uk, or its narrow variant when that wastes less (microkernel_for_width)
  const Microkernel* tail = nullptr;  // the last panel's kernel, when it is narrower than uk
  int64_t full = 0;                   // panels of uk->nr columns (all of them without a tail)
  int64_t n_pad = 0, k = 0, group_stride = 0;
  at::Tensor packed;  // keeps the panels alive
  const float* b = nullptr;
  int64_t nr() const { return uk->nr; }
  int64_t panels() const { return full + (tail != nullptr ? 1 : 0); }
  const Microkernel& kernel(int64_t jb) const { return jb < full ? *uk : *tail; }
  // panel jb starts at column jb * uk->nr (the tail follows the full panels)
  const float* panel(int64_t g, int64_t jb) const { return b + g * group_stride + jb * k * uk->nr; }
};

// w read as (groups, rows, cin, taps) row-major, each group packed by
// pack_panels (row_map applies within a group), cached against w (packed_cached)
// under `role` plus the microkernel's ISA and NR; role names the factor's part
// in its kernel (e.g. "hsv.B", "kcp.as"). any_mr: the caller takes its row
// blocks from the panels' kernel (Panels::uk->mr), so microkernel_for_width may
// pick a kernel with another MR. tail: the caller runs each panel with
// Panels::kernel(jb), so the last panel may be a narrow one (one group only).
Panels make_panels(const Microkernel& uk, const at::Tensor& w, const std::string& role, int64_t rows, int64_t cin,
                   int64_t taps = 1, const std::vector<int64_t>* row_map = nullptr, int64_t groups = 1,
                   bool any_mr = false, bool tail = false);

// The column widths of the panels make_panels(uk, ..., rows, ..., groups = 1,
// any_mr, tail) cuts (for tests: which kernels a conv stage of that rank runs).
std::vector<int64_t> panel_widths(const Microkernel& uk, int64_t rows, bool any_mr, bool tail);

// The packed form of w that `make` computes, cached against w (CPU or CUDA
// tensors: the fused CUDA kernels cache their packed factors here too): a later call
// with the same tensor (same TensorImpl, still alive), unchanged since (same
// version counter, data pointer, sizes and strides) and the same `layout`
// string (which must name everything the packing depends on: sizes, NR, row
// order) returns the cached tensor. When `make` reads other tensors too (a
// product of factors), pass them as deps: the entry then also needs each of
// them to be the same tensor in the same state, else it is recomputed.
// Inference tensors have no version counter and are packed on every call.
// Writes that bypass the version counter (e.g. through `w.data` in Python) are
// not seen: call clear_packed_cache() after them.
at::Tensor packed_cached(const at::Tensor& w, const std::string& layout, const std::function<at::Tensor()>& make,
                         at::TensorList deps = {});

// w read as (w.size(0), the rest) row-major, in the packed-A layout of the
// strided and b_rows microkernels (row blocks of mr rows, each k-major:
// pack_panels with mr for nr), cached against w (packed_cached).
at::Tensor packed_a_cached(const at::Tensor& w, int64_t mr);

// Drops every cached packed factor. Returns how many there were.
int64_t clear_packed_cache();

// How many packed factors the cache holds (entries whose tensor is gone are
// dropped lazily, so this may count a few of them).
int64_t packed_cache_size();

}  // namespace cpu
}  // namespace hsv
