#include "pack.h"

#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <list>
#include <mutex>

namespace hsv {
namespace cpu {

at::Tensor pack_panels(const at::Tensor& w, int64_t rows, int64_t cin, int64_t taps, int64_t nr,
                       const std::vector<int64_t>* row_map) {
  const at::Tensor wc = w.contiguous();
  const float* src = wc.data_ptr<float>();
  const int64_t panels = (rows + nr - 1) / nr, K = cin * taps;
  at::Tensor packed = at::empty({panels * K * nr}, at::kFloat);
  float* dst = packed.data_ptr<float>();
  // In parallel only when there is enough to copy (a few hundred KB) to pay for waking the threads.
  const int64_t grain = panels * K * nr < (int64_t(1) << 16) ? panels : 1;
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    std::vector<const float*> row(static_cast<size_t>(nr));
    for (int64_t p = begin; p < end; ++p) {
      float* pd = dst + p * K * nr;
      const int64_t valid = std::min(nr, rows - p * nr);
      for (int64_t j = 0; j < valid; ++j) {
        const int64_t r = p * nr + j;
        row[j] = src + (row_map ? (*row_map)[r] : r) * K;
      }
      // Blocks of 16 channels, so the source lines being gathered (nr rows x
      // 16 channels x taps) stay in L1 while every tap is written out.
      for (int64_t c0 = 0; c0 < cin; c0 += 16) {
        const int64_t c1 = std::min(cin, c0 + 16);
        for (int64_t tap = 0; tap < taps; ++tap)
          for (int64_t c = c0; c < c1; ++c) {
            float* d = pd + (tap * cin + c) * nr;
            for (int64_t j = 0; j < valid; ++j) d[j] = row[j][c * taps + tap];
            for (int64_t j = valid; j < nr; ++j) d[j] = 0.0f;
          }
      }
    }
  });
  return packed;
}

namespace {

// How make_panels cuts N = rows columns: `full` panels of uk->nr (uk possibly
// its narrow or three-vector variant, microkernel_for_width), then at most one
// narrower tail panel.
struct PanelShape {
  const Microkernel* uk;
  const Microkernel* tail;
  int64_t full;
};

PanelShape panel_shape(const Microkernel& base, int64_t rows, int64_t groups, bool any_mr, bool tail) {
  PanelShape s{&microkernel_for_width(base, rows, any_mr), nullptr, 0};
  const int64_t nr = s.uk->nr, rem = rows % nr;
  // A narrow last panel where the remainder fits it: the padding it saves is
  // whole zero columns of FMAs (12.5% of a rank-112 conv stage at NR = 32).
  if (tail && groups == 1 && rows > nr && rem != 0 && s.uk->narrow != nullptr && rem <= s.uk->narrow->nr &&
      s.uk->narrow->mr == s.uk->mr) {
    s.tail = s.uk->narrow;
  }
  s.full = s.tail ? rows / nr : (rows + nr - 1) / nr;
  return s;
}

}  // namespace

std::vector<int64_t> panel_widths(const Microkernel& uk, int64_t rows, bool any_mr, bool tail) {
  const PanelShape s = panel_shape(uk, rows, 1, any_mr, tail);
  std::vector<int64_t> widths(static_cast<size_t>(s.full), s.uk->nr);
  if (s.tail) widths.push_back(s.tail->nr);
  return widths;
}

Panels make_panels(const Microkernel& uk, const at::Tensor& w, const std::string& role, int64_t rows, int64_t cin,
                   int64_t taps, const std::vector<int64_t>* row_map, int64_t groups, bool any_mr, bool tail) {
  Panels p;
  const PanelShape shape = panel_shape(uk, rows, groups, any_mr, tail);
  p.uk = shape.uk;
  p.tail = shape.tail;
  p.full = shape.full;
  const int64_t nr = p.uk->nr, rem = rows - p.full * nr;  // rem: the tail panel's rows (with a tail)
  p.n_pad = p.full * nr + (p.tail ? p.tail->nr : 0);
  p.k = cin * taps;
  p.group_stride = p.n_pad * p.k;
  const std::string layout = role + ":" + p.uk->isa + ":nr" + std::to_string(nr) +
                             (p.tail ? ":tail" + std::to_string(p.tail->nr) : "");
  p.packed = packed_cached(w, layout, [&] {
    if (p.tail) {  // the full panels, then the remaining rows (through row_map) as one narrow panel
      std::vector<int64_t> tail_rows(static_cast<size_t>(rem));
      for (int64_t j = 0; j < rem; ++j) tail_rows[j] = row_map ? (*row_map)[p.full * nr + j] : p.full * nr + j;
      return at::cat({pack_panels(w, p.full * nr, cin, taps, nr, row_map),
                      pack_panels(w, rem, cin, taps, p.tail->nr, &tail_rows)});
    }
    if (groups == 1) return pack_panels(w, rows, cin, taps, nr, row_map);
    const at::Tensor wg = w.contiguous().view({groups, rows * p.k});
    std::vector<at::Tensor> parts;
    for (int64_t g = 0; g < groups; ++g) parts.push_back(pack_panels(wg[g], rows, cin, taps, nr, row_map));
    return at::cat(parts);
  });
  p.b = p.packed.data_ptr<float>();
  return p;
}

namespace {

// What a cached entry remembers of one tensor it was computed from: a weak
// reference (so a freed tensor whose TensorImpl address is reused never
// matches) and the state the entry is valid for.
struct TensorState {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> owner;
  const c10::TensorImpl* impl;
  uint32_t version;
  const void* data;
  std::vector<int64_t> sizes, strides;

  explicit TensorState(const at::Tensor& t)
      : owner(t.getIntrusivePtr()), impl(t.unsafeGetTensorImpl()),
        version(t.unsafeGetTensorImpl()->version_counter().current_version()), data(t.data_ptr()),
        sizes(t.sizes().vec()), strides(t.strides().vec()) {}

  // t is this tensor, unchanged since (same version counter, data, sizes, strides).
  bool matches(const at::Tensor& t) const {
    return !owner.expired() && impl == t.unsafeGetTensorImpl() &&
           version == t.unsafeGetTensorImpl()->version_counter().current_version() && data == t.data_ptr() &&
           sizes == t.sizes().vec() && strides == t.strides().vec();
  }
};

struct Entry {
  TensorState w;
  std::string layout;
  std::vector<TensorState> deps;
  at::Tensor packed;
};

// A factorized layer has 2-4 factors and a model tens of layers; past this
// many entries the least recently used go.
constexpr size_t kMaxEntries = 512;

std::mutex g_mutex;
// Most recently used first. Never destroyed: entries may hold CUDA tensors
// (the fused CUDA kernels cache through here too), and freeing those from a
// static destructor at exit, after CUDA has shut down, aborts the process.
std::list<Entry>& g_entries = *new std::list<Entry>();

// The entry's tensor or one of its dependencies is gone: it can never match again.
bool orphaned(const Entry& e) {
  if (e.w.owner.expired()) return true;
  for (const auto& d : e.deps)
    if (d.owner.expired()) return true;
  return false;
}

bool deps_match(const Entry& e, at::TensorList deps) {
  if (e.deps.size() != deps.size()) return false;
  for (size_t i = 0; i < deps.size(); ++i)
    if (!e.deps[i].matches(deps[i])) return false;
  return true;
}

}  // namespace

at::Tensor packed_a_cached(const at::Tensor& w, int64_t mr) {
  const int64_t rows = w.size(0), k = w.numel() / rows;
  return packed_cached(w, "packed_a:mr" + std::to_string(mr), [&] { return pack_panels(w, rows, k, 1, mr); });
}

at::Tensor packed_cached(const at::Tensor& w, const std::string& layout, const std::function<at::Tensor()>& make,
                         at::TensorList deps) {
  if (w.is_inference()) return make();
  for (const auto& d : deps)
    if (d.is_inference()) return make();
  const c10::TensorImpl* impl = w.unsafeGetTensorImpl();
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_entries.begin(); it != g_entries.end();) {
      if (orphaned(*it)) {  // a tensor it was made from is gone (and its impl may be reused)
        it = g_entries.erase(it);
        continue;
      }
      if (it->w.impl == impl && it->layout == layout) {
        if (it->w.matches(w) && deps_match(*it, deps)) {
          g_entries.splice(g_entries.begin(), g_entries, it);
          return g_entries.front().packed;
        }
        it = g_entries.erase(it);  // stale: w or a dependency changed since it was packed
        continue;
      }
      ++it;
    }
  }
  at::Tensor packed = make();  // outside the lock: packing may run in parallel
  std::vector<TensorState> dep_states;
  for (const auto& d : deps) dep_states.emplace_back(d);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_entries.push_front(Entry{TensorState(w), layout, std::move(dep_states), packed});
  while (g_entries.size() > kMaxEntries) g_entries.pop_back();
  return packed;
}

int64_t clear_packed_cache() {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t n = static_cast<int64_t>(g_entries.size());
  g_entries.clear();
  return n;
}

int64_t packed_cache_size() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_entries.size());
}

}  // namespace cpu
}  // namespace hsv
