// One-launch packing of the two-stage kernels' operands (see pack_two_stage.h).
// A grid-stride loop over the elements of Vp, then Up, then the bias: each
// thread computes where its element comes from (or that it is padding) and
// writes it, so the buffers need no zero-fill first.
#include "pack_two_stage.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "../env_choice.h"
#include "wmma_tiles.cuh"

namespace hsv {
namespace cuda {
namespace {

struct PackParams {
  const void* b;                // V as B (P, T2, Cin, kh, kw), through its strides
  long long bs0, bs1, bs2, bs3, bs4;
  const void* a;                // U as A (T1, P) kron I_T2, through its strides
  long long as0, as1;
  const void* bias;             // Cout values or nullptr
  long long bias_s;
  int p, t2, cin, kh, kw, t1;
  int rp, k_pad, cout_pad;
  void* vp;                     // (rp, k_pad) or nullptr
  void* up;                     // (cout_pad, rp) or nullptr
  float* bias_f;                // Cout floats or nullptr
};

template <typename S>
__global__ void pack_kernel(const PackParams p) {
  const long long r_all = static_cast<long long>(p.p) * p.t2, k_all = static_cast<long long>(p.kh) * p.kw * p.cin;
  const long long cout = static_cast<long long>(p.t1) * p.t2;
  const long long nv = p.vp != nullptr ? static_cast<long long>(p.rp) * p.k_pad : 0;
  const long long nu = p.up != nullptr ? static_cast<long long>(p.cout_pad) * p.rp : 0;
  const long long nb = p.bias_f != nullptr ? cout : 0;
  const S* b = static_cast<const S*>(p.b);
  const S* a = static_cast<const S*>(p.a);
  const S zero = tiles::from_float<S>(0.0f);
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < nv + nu + nb;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    if (e < nv) {  // Vp[r][(ty * kw + tx) * Cin + c] = V[r][c][ty][tx], r = pi * T2 + ti
      const long long r = e / p.k_pad, kk = e - r * p.k_pad;
      S v = zero;
      if (r < r_all && kk < k_all) {
        const long long tap = kk / p.cin, c = kk - tap * p.cin, ty = tap / p.kw, tx = tap - ty * p.kw;
        const long long pi = r / p.t2, ti = r - pi * p.t2;
        v = b[pi * p.bs0 + ti * p.bs1 + c * p.bs2 + ty * p.bs3 + tx * p.bs4];
      }
      static_cast<S*>(p.vp)[e] = v;
    } else if (e < nv + nu) {  // Up[co][r] = A[co / T2][r / T2] where co % T2 == r % T2
      const long long f = e - nv, co = f / p.rp, r = f - co * p.rp;
      S v = zero;
      if (co < cout && r < r_all && co % p.t2 == r % p.t2) v = a[(co / p.t2) * p.as0 + (r / p.t2) * p.as1];
      static_cast<S*>(p.up)[f] = v;
    } else {
      const long long f = e - nv - nu;
      p.bias_f[f] = tiles::to_float(static_cast<const S*>(p.bias)[f * p.bias_s]);
    }
  }
}

}  // namespace

bool pack_with_kernel() { return env_choice("HSV_CUDA_PACK", {"aten", "kernel"}, 1) == 1; }

void pack_two_stage(const at::Tensor& b5, const at::Tensor& a2, const at::Tensor& bias, const at::Tensor& vp,
                    const at::Tensor& up, const at::Tensor& bias_f) {
  TORCH_CHECK(b5.dim() == 5 && a2.dim() == 2 && a2.size(1) == b5.size(0) && a2.scalar_type() == b5.scalar_type(),
              "hsv::conv2d: pack_two_stage: factors of the wrong shape");
  const int64_t r_all = b5.size(0) * b5.size(1), cout = a2.size(0) * b5.size(1);
  const int64_t k_all = b5.size(2) * b5.size(3) * b5.size(4);
  PackParams p{};
  p.b = b5.data_ptr();
  p.bs0 = b5.stride(0), p.bs1 = b5.stride(1), p.bs2 = b5.stride(2), p.bs3 = b5.stride(3), p.bs4 = b5.stride(4);
  p.a = a2.data_ptr();
  p.as0 = a2.stride(0), p.as1 = a2.stride(1);
  p.p = static_cast<int>(b5.size(0)), p.t2 = static_cast<int>(b5.size(1)), p.cin = static_cast<int>(b5.size(2));
  p.kh = static_cast<int>(b5.size(3)), p.kw = static_cast<int>(b5.size(4)), p.t1 = static_cast<int>(a2.size(0));
  int64_t rp = 0, k_pad = 0, cout_pad = 0;
  if (vp.defined()) {
    TORCH_CHECK(vp.is_contiguous() && vp.dim() == 2 && vp.size(0) >= r_all && vp.size(1) >= k_all &&
                    vp.scalar_type() == b5.scalar_type(),
                "hsv::conv2d: pack_two_stage: vp buffer");
    rp = vp.size(0), k_pad = vp.size(1);
    p.vp = vp.data_ptr();
  }
  if (up.defined()) {
    TORCH_CHECK(up.is_contiguous() && up.dim() == 2 && up.size(0) >= cout && up.size(1) >= r_all &&
                    (rp == 0 || up.size(1) == rp) && up.scalar_type() == b5.scalar_type(),
                "hsv::conv2d: pack_two_stage: up buffer");
    rp = up.size(1), cout_pad = up.size(0);
    p.up = up.data_ptr();
  }
  if (bias_f.defined()) {
    TORCH_CHECK(bias.defined() && bias.dim() == 1 && bias.size(0) == cout && bias.scalar_type() == b5.scalar_type() &&
                    bias_f.is_contiguous() && bias_f.numel() == cout && bias_f.scalar_type() == at::kFloat,
                "hsv::conv2d: pack_two_stage: bias buffer");
    p.bias = bias.data_ptr();
    p.bias_s = bias.stride(0);
    p.bias_f = bias_f.data_ptr<float>();
  }
  p.rp = static_cast<int>(rp), p.k_pad = static_cast<int>(k_pad), p.cout_pad = static_cast<int>(cout_pad);
  const int64_t total = (p.vp ? rp * k_pad : 0) + (p.up ? cout_pad * rp : 0) + (p.bias_f ? cout : 0);
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(b5.device());
  const int device = b5.device().index();
  constexpr int kBlock = 256;
  const int64_t blocks = std::min<int64_t>((total + kBlock - 1) / kBlock, 8 * tiles::device_info(device).sms);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  switch (b5.scalar_type()) {
    case at::kHalf:
      pack_kernel<__half><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
      break;
    case at::kBFloat16:
      pack_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
      break;
    case at::kFloat:
      pack_kernel<float><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
      break;
    default:
      TORCH_CHECK(false, "hsv::conv2d: pack_two_stage: dtype ", b5.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace hsv
