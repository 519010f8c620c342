// Building blocks shared by the fused CUDA kernels (two_stage_fused.cu,
// tucker2_fused.cu): tile sizes, WMMA operand traits, cp.async copies, and
// the host-side device queries. Header-only, all inline or templates.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <utility>

#include "../chain/conv_chain.h"

namespace hsv {
namespace cuda {
namespace tiles {

using namespace nvcuda;

constexpr int kThreads = 128;  // 4 warps
constexpr int kTileM = 64;     // output pixels per CTA: 16 per warp
constexpr int kTileK = 32;     // K per stage-1 step
constexpr int kTileN = 64;     // output channels per stage-2 step
constexpr int kMaxRank = 128;  // padded rank limit: at most 8 accumulator tiles per warp
constexpr int kMaxRankTiles = kMaxRank / 16;
constexpr int kGatherPerThread = kTileK * kTileM / kThreads;
static_assert(kTileM == 16 * (kThreads / 32), "one 16-pixel column per warp");
static_assert(kTileK * kTileM % kThreads == 0, "the gathered tile splits evenly over the threads");

// Operand element type S on the device (the tensor's dtype) and its WMMA shape.
template <typename S>
struct Mma;
template <>
struct Mma<__half> {
  using Elem = __half;
  static constexpr int kK = 16;
};
template <>
struct Mma<__nv_bfloat16> {
  using Elem = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct Mma<float> {
  using Elem = wmma::precision::tf32;
  static constexpr int kK = 8;
};

template <typename S>
__device__ __forceinline__ S from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// conv2d_epilogue's tail on one value (epilogue_pass.h): v = conv + residual in
// fp32, rounded to S once (as ATen's add_ rounds it), then ReLU when asked;
// `r < 0` is false for NaN, so NaN stays NaN as in torch.relu.
template <typename S>
__device__ __forceinline__ S relu_rounded(float v, bool relu) {
  const S r = from_float<S>(v);
  return relu && to_float(r) < 0.0f ? from_float<S>(0.0f) : r;
}

// The tail on the 8 fp16/bf16 values of one 16-byte store: y holds the conv's
// values already rounded to S (as the unfused chain stores them); residual
// points at the residual's 8 at the same place, or is null. With neither a
// residual nor relu, y unchanged.
template <typename S>
__device__ __forceinline__ uint4 tail8(uint4 y, const S* residual, bool relu) {
  static_assert(sizeof(S) == 2, "16-byte stores of fp16/bf16");
  if (residual == nullptr && !relu) return y;
  uint4 r = make_uint4(0, 0, 0, 0);
  if (residual != nullptr) r = *reinterpret_cast<const uint4*>(residual);
  S* yv = reinterpret_cast<S*>(&y);
  const S* rv = reinterpret_cast<const S*>(&r);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    yv[i] = relu_rounded<S>(to_float(yv[i]) + (residual != nullptr ? to_float(rv[i]) : 0.0f), relu);
  }
  return y;
}

// The tail in place on 8 consecutive values in global memory, 16-byte aligned;
// residual likewise, or null.
template <typename S>
__device__ __forceinline__ void tail8_global(S* out, const S* residual, bool relu) {
  if constexpr (sizeof(S) == 2) {
    uint4* o = reinterpret_cast<uint4*>(out);
    *o = tail8<S>(*o, residual, relu);
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float4* o = reinterpret_cast<float4*>(out) + h;
      float4 v = *o;
      if (residual != nullptr) {
        const float4 r = reinterpret_cast<const float4*>(residual)[h];
        v.x += r.x;
        v.y += r.y;
        v.z += r.z;
        v.w += r.w;
      }
      v.x = relu_rounded<float>(v.x, relu);
      v.y = relu_rounded<float>(v.y, relu);
      v.z = relu_rounded<float>(v.z, relu);
      v.w = relu_rounded<float>(v.w, relu);
      *o = v;
    }
  }
}

__host__ __device__ constexpr inline int align128(int bytes) { return (bytes + 127) / 128 * 128; }

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}

// Waits for all of this thread's cp.async copies (commit + wait_group 0).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// 16 bytes when `full`, else 16 zero bytes (src-size 0: nothing is read, so
// src only has to be a valid address): padding taps and pixels past the end.
// Through L1 (.ca, not .cg): an implicit-im2col gather reads each input line
// once per kernel tap, and neighbouring taps of a tile hit the same lines.
__device__ __forceinline__ void cp_async16_zfill(void* smem_dst, const void* gmem_src, bool full) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int bytes = full ? 16 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(bytes) : "memory");
}

// Closes this thread's current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `Pending` of this thread's committed groups are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// Copies rows x cols elements (row stride src_ld in global memory, dst_ld in
// shared memory) in 16-byte pieces; cols * sizeof(S), both strides and both
// base addresses are multiples of 16 bytes.
template <typename S>
__device__ __forceinline__ void copy_tile_async(S* dst, int dst_ld, const S* src, long long src_ld, int rows,
                                                int cols) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(S));
  const int pieces_per_row = cols / kVec;
  for (int i = threadIdx.x; i < rows * pieces_per_row; i += kThreads) {
    const int row = i / pieces_per_row, piece = i - row * pieces_per_row;
    cp_async16(dst + row * dst_ld + piece * kVec, src + row * src_ld + piece * kVec);
  }
}

// The (k, m) coordinates of element e of a kTileK x kTileM gathered tile:
// consecutive threads walk K (channels) for a unit-stride channel input, so
// their loads are contiguous, and pixels otherwise.
__device__ __forceinline__ void gather_coords(int e, bool channels_fastest, int& kk, int& m) {
  if (channels_fastest) {
    kk = e % kTileK;
    m = e / kTileK;
  } else {
    m = e % kTileM;
    kk = e / kTileM;
  }
}

// Output pixel `pix` of the N*Ho*Wo pixels of a conv (p has the fields
// set_conv_geometry fills): its image n and the top-left input position
// (iy, ix) of its window, which lies in the padding where that is negative.
template <typename P>
__device__ __forceinline__ void pixel_origin(const P& p, long long pix, int& n, int& iy, int& ix) {
  const int hw = p.ho * p.wo;
  n = static_cast<int>(pix / hw);
  const int q = static_cast<int>(pix - static_cast<long long>(n) * hw);
  const int oy = q / p.wo, ox = q - oy * p.wo;
  iy = oy * p.stride_h - p.pad_h;
  ix = ox * p.stride_w - p.pad_w;
}

template <typename Frag>
__device__ __forceinline__ void round_to_tf32(Frag& f) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Split-K (batch 1, small images): when the pixel tiles alone leave SMs idle,
// split the first GEMM's K into as many parts as fill them, but keep each
// part's K at least the padded Cout, so the second GEMM that every part
// repeats (on its partial intermediate, summed into an fp32 buffer) costs no
// more than its first. k_step: the kernel's K per step.
inline int64_t auto_splits(int64_t blocks, int64_t k_pad, int64_t cout_pad, int64_t sms, int64_t k_step) {
  if (blocks >= sms) return 1;
  const int64_t by_work = std::max<int64_t>(1, k_pad / std::max<int64_t>(cout_pad, 4 * k_step));
  const int64_t to_fill = (sms + blocks - 1) / blocks;
  return std::min(by_work, to_fill);
}

// Fills the input and conv geometry fields that every fused kernel's Params
// has (same names in each), as 32-bit ints: the kernels' support checks keep
// per-image sizes in that range. cv: the plan stage of the spatial conv (the
// first for svd/hsv, the core for tucker2; the 1x1 stages keep the size).
template <typename P>
void set_conv_geometry(P& p, const at::Tensor& input, const Plan& plan, const ConvParams& cv, int64_t kw) {
  p.sn = input.stride(0);
  p.sh = input.stride(2);
  p.sw = input.stride(3);
  p.h = static_cast<int>(input.size(2));
  p.w = static_cast<int>(input.size(3));
  p.cin = static_cast<int>(input.size(1));
  p.kw = static_cast<int>(kw);
  p.stride_h = static_cast<int>(cv.stride[0]);
  p.stride_w = static_cast<int>(cv.stride[1]);
  p.pad_h = static_cast<int>(cv.padding[0]);
  p.pad_w = static_cast<int>(cv.padding[1]);
  p.dil_h = static_cast<int>(cv.dilation[0]);
  p.dil_w = static_cast<int>(cv.dilation[1]);
  p.ho = static_cast<int>(plan.out_shape[2]);
  p.wo = static_cast<int>(plan.out_shape[3]);
}

// What the fused kernels' checks need to know of a device, read once per device.
// (Through the runtime, not ATen/cuda/CUDAContext.h, whose cuSPARSE/cuBLAS
// headers are not in every CUDA toolkit this builds with.)
struct DeviceInfo {
  int major = 0;
  int sms = 0;
  int64_t smem_optin = 0;
};

inline DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> known;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  DeviceInfo d;
  int smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  d.smem_optin = smem;
  known[device] = d;
  return d;
}

// Lets `kernel` use all the dynamic shared memory the device allows (above
// 48 KB a kernel must opt in), once per (kernel, device): later launches, CUDA
// graph captures included, make no attribute call.
inline void allow_max_dynamic_smem(const void* kernel, int device) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  const int limit = static_cast<int>(device_info(device).smem_optin);
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, device})) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  done.insert({kernel, device});
}

// The operand fields that the channels_last two-stage kernels' params share
// (same names in two_stage_nhwc.cu, two_stage_mma.cu and two_stage_wgmma.cu):
// input, conv geometry, packed factors (vp (rp, k), up (cout_pad, rp)), fp32
// bias or none, and the channels_last output.
template <typename P>
void set_two_stage_operands(P& p, const at::Tensor& input, const at::Tensor& vp, const at::Tensor& up,
                            const at::Tensor& bias_f, const at::Tensor& out, const Plan& plan, int64_t k, int64_t kw,
                            int64_t cout) {
  p.x = input.data_ptr();
  set_conv_geometry(p, input, plan, plan.stages[0].conv, kw);
  p.pixels = input.size(0) * plan.out_shape[2] * plan.out_shape[3];
  p.k = static_cast<int>(k);
  p.cout = static_cast<int>(cout);
  p.cout_pad = static_cast<int>(up.size(0));
  p.vp = vp.data_ptr();
  p.up = up.data_ptr();
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.residual = nullptr;  // no tail unless the caller sets one (set_tail)
  p.relu = false;
}

// conv2d_epilogue's tail for a channels_last kernel's stores (epilogue_pass.h):
// the residual (same layout as the output, or null) and the ReLU flag.
template <typename P>
void set_tail(P& p, const void* residual, bool relu) {
  p.residual = residual;
  p.relu = relu;
}

// The packed factors the mma and wgmma kernels take (`kernel` names which in
// the message): vp (rp, k) and up (cout_pad, rp), contiguous, rp one of the
// instantiated padded ranks 16, 32, 64, 128, cout_pad a multiple of
// `cout_chunk`, and rp * k within 32-bit offsets.
inline void check_packed_factors(const at::Tensor& vp, const at::Tensor& up, int64_t k, int64_t cout_chunk,
                                 const char* kernel) {
  const int64_t rp = vp.size(0);
  TORCH_CHECK((rp == 16 || rp == 32 || rp == 64 || rp == 128) && vp.size(1) == k && up.size(1) == rp &&
                  up.size(0) % cout_chunk == 0 && vp.is_contiguous() && up.is_contiguous(),
              "hsv::conv2d: ", kernel, ": packed factors of the wrong shape");
  TORCH_CHECK(rp * k <= std::numeric_limits<int>::max(), "hsv::conv2d: ", kernel,
              ": factor too large for 32-bit offsets");
}

// Launches fn(p) as `ctas` CTAs of `threads` threads with `bytes` of dynamic
// shared memory, in clusters of `cluster` CTAs along x (a cluster of 1 is a
// plain launch), on the device's current stream; launch errors are checked.
template <typename P>
void launch_in_clusters(void (*fn)(const P), const P& p, int64_t ctas, int threads, int bytes, int64_t cluster,
                        int device) {
  allow_max_dynamic_smem(reinterpret_cast<const void*>(fn), device);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(bytes);
  cfg.stream = c10::cuda::getCurrentCUDAStream(device);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fn, p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace tiles
}  // namespace cuda
}  // namespace hsv
