#include "channels_last_copy.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "isa.h"
#include "kernel_util.h"

namespace hsv {
namespace cpu {

at::Tensor to_channels_last(const at::Tensor& x, const Microkernel& uk) {
  TORCH_CHECK_VALUE(x.dim() == 4, "to_channels_last: expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "to_channels_last: expected a CPU tensor, got one on ", x.device());
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
  const bool planes = x.scalar_type() == at::kFloat && (w == 1 || x.stride(3) == 1) && (h == 1 || x.stride(2) == w);
  if (!planes || x.numel() == 0) return x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  // Chunks of pixels whose NHWC rows (chunk x C floats) stay in L2 while the
  // 16-channel passes fill them in.
  const int64_t chunk = std::max<int64_t>(16, round_up(std::max<int64_t>(1, 65536 / std::max<int64_t>(c, 1)), 16));
  const int64_t per_image = div_up(hw, chunk), items = n * per_image;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t sn = x.stride(0), sc = x.stride(1);
  const int64_t threads = fused_threads(x.numel() * 4);  // a copy: ~4 "MACs" of time per float
  at::parallel_for(0, items, threads == 1 ? items : 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t img = it / per_image, p0 = (it % per_image) * chunk, np = std::min(chunk, hw - p0);
      uk.to_pixel_major(c, np, src + img * sn + p0, sc, dst + (img * hw + p0) * c, c);
    }
  });
  return out;
}

at::Tensor to_channels_last_selected(const at::Tensor& x) { return to_channels_last(x, select_microkernel()); }

}  // namespace cpu
}  // namespace hsv
