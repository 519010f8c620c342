// Which CUDA forward runs: HSV_CUDA_IMPL = auto (default) | composite | fused,
// read on every call so a process (a test, a benchmark) can switch between them.
// "fused" runs a hand-written fused kernel where one exists for the kind, dtype
// and shape, and the composite chain (cuDNN convs) otherwise. "auto", with
// torch.backends.cudnn.benchmark on, runs whichever of fused and composite timed
// faster on the first call of the layer configuration; without it, fused only
// where the H100 measurements had it faster (conv2d_cuda.cu).
// Plain C++ (no CUDA headers), so module.cpp can report on it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hsv {
namespace cuda {

enum class Impl { Auto, Composite, Fused };

// Throws c10::ValueError naming HSV_CUDA_IMPL on any other value.
Impl impl_from_env();

// HSV_CUDA_NHWC = auto (default) | mma | wmma | wgmma: which channels_last
// two-stage kernel runs (two_stage_mma.h, two_stage_nhwc.h, two_stage_wgmma.h);
// throws c10::ValueError naming HSV_CUDA_NHWC on other values.
enum class NhwcKernel { Auto, Mma, Wmma, Wgmma };
NhwcKernel nhwc_kernel_from_env();

// HSV_CUDA_FOLD = off (default) | on: whether the kinds that fold into the
// two-stage form (../fold_two_stage.h) run the two-stage fused kernels on their
// folded factors. Off until those runs have been tested on a GPU. Throws
// c10::ValueError naming HSV_CUDA_FOLD on other values.
bool fold_from_env();

// HSV_CUDA_KCP = off (default) | on: whether kind "kcp" may run its fused
// kernel (kcp_cuda.h). Off until it has been tested on a GPU. Throws
// c10::ValueError naming HSV_CUDA_KCP on other values.
bool kcp_from_env();

// The K step (channels of one tap per pipeline step) of the mma and wgmma
// kernels for Cin input channels: 64 where Cin % 64 == 0, else 32;
// HSV_CUDA_MMA_KSTEP = auto (default) | 32 | 64 forces it where Cin allows.
// Throws c10::ValueError naming HSV_CUDA_MMA_KSTEP on other values.
int mma_k_step(int64_t cin);

// HSV_CUDA_SPLIT_K = auto (default) | a positive integer: how many parts the
// two-stage fused kernel (svd, hsv) splits its first GEMM's K into (clamped to
// what the shape allows); auto chooses by a small model (two_stage_fused.cu). Returns 0 for auto; throws
// c10::ValueError naming HSV_CUDA_SPLIT_K on other values.
int64_t split_k_from_env();

// How many times a fused CUDA kernel was launched in this process: tests use it
// to tell a fused run from a silent fallback to the composite chain.
int64_t fused_launch_count();
void count_fused_launch();

// How many of those launches took the two-stage kernel's channels_last fast
// path (two_stage_nhwc.h): tests use it to know which kernel they checked.
int64_t nhwc_launch_count();
void count_nhwc_launch();

// How many of those ran the Hopper mma.sync kernel (two_stage_mma.h) rather
// than the WMMA one.
int64_t mma_launch_count();
void count_mma_launch();

// How many ran the wgmma kernel (two_stage_wgmma.h): HSV_CUDA_NHWC=wgmma only.
int64_t wgmma_launch_count();
void count_wgmma_launch();

// How many fused launches ran folded factors (HSV_CUDA_FOLD=on).
int64_t fold_launch_count();
void count_fold_launch();

// How many fused launches ran the kcp kernel (HSV_CUDA_KCP=on).
int64_t kcp_launch_count();
void count_kcp_launch();

// The kinds that have a fused CUDA kernel (with HSV_CUDA_FOLD=on the folded ones, with HSV_CUDA_KCP=on kcp).
std::vector<std::string> fused_kinds();

}  // namespace cuda
}  // namespace hsv
