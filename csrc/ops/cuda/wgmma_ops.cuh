// Hopper warpgroup MMA (wgmma, sm_90a only) for the fused two-stage kernel
// (two_stage_wgmma.cu): the instruction wrappers, shared-memory matrix
// descriptors, and the fences and waits that order them.
//
// Operands in shared memory are K-major tiles in the 128-byte swizzle: row r
// of a tile holds 64 16-bit elements (128 bytes), its 16-byte piece c stored
// at piece position c ^ (r % 8), tiles 1024-byte aligned. A tile wider than 64
// elements in K is stored as consecutive 64-wide column blocks. The wrappers
// are one asm statement per (N, dtype), whose accumulator list must be spelled
// out: one macro makes them for N = 16, 32, 64, 128 (the padded ranks and the
// 64-channel output chunks) and fp16/bf16 inputs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace hsv {
namespace cuda {
namespace wgmma {

// Whether this compilation pass can emit wgmma: the sm_90a device pass (the
// host pass sees the declarations only).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HSV_WGMMA_DEVICE 1
#else
#define HSV_WGMMA_DEVICE 0
#endif

// Byte offset of 16-byte piece `piece` (0..7) of row `row` in a 128-byte-swizzled tile.
__host__ __device__ constexpr inline int swizzle128(int row, int piece) {
  return row * 128 + ((piece ^ (row & 7)) << 4);
}

#if HSV_WGMMA_DEVICE

// Descriptor of a K-major, 128-byte-swizzled operand starting at shared
// address `addr` (the tile's 1024-byte aligned base plus 32 bytes per k16
// step within a 64-wide column block): stride between 8-row groups 1024 bytes;
// the leading-dimension offset is unused for swizzled K-major operands.
__device__ __forceinline__ uint64_t desc_sw128(unsigned addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// Before the first wgmma of a batch: orders earlier register and shared-memory accesses before it.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}

// Shared memory written by ordinary stores or cp.async (the generic proxy) and
// read next by wgmma (the async proxy): each writing thread fences before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accesses to accumulator registers across a
// wgmma issue or wait (the hardware reads and writes them asynchronously).
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(unsigned (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

#define HSV_WGMMA_D8_AT(d, i)                                                                            \
  "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define HSV_WGMMA_D8(d) HSV_WGMMA_D8_AT(d, 0)
#define HSV_WGMMA_D16(d) HSV_WGMMA_D8_AT(d, 0), HSV_WGMMA_D8_AT(d, 8)
#define HSV_WGMMA_D32(d) HSV_WGMMA_D16(d), HSV_WGMMA_D8_AT(d, 16), HSV_WGMMA_D8_AT(d, 24)
#define HSV_WGMMA_D64(d)                                                                                      \
  HSV_WGMMA_D32(d), HSV_WGMMA_D8_AT(d, 32), HSV_WGMMA_D8_AT(d, 40), HSV_WGMMA_D8_AT(d, 48), HSV_WGMMA_D8_AT(d, 56)

// Wgmma<N, S>::ss: d (64 x N, fp32, this thread's N / 2 values in the mma.sync
// m16n8 accumulator order per n8 tile, warp w of the warpgroup holding rows
// 16 w ..) = A (64 x 16) @ B (16 x N) + (scale_d ? d : 0), A and B K-major in
// shared memory. ::rs: the same with A from registers, each warp's 16 rows as
// an mma.sync m16n8k16 A fragment.
template <int N, typename S>
struct Wgmma;

// The accumulators as asm operands %0 .. %(N / 2 - 1), one list per N; the operands
// after them are numbered from N / 2 on (SS_OPS / SS_P: the descriptors and
// scale_d of ss; RS_OPS / RS_P: the A registers, the B descriptor and scale_d of rs).
#define HSV_WGMMA_REGS8 "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define HSV_WGMMA_REGS16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define HSV_WGMMA_REGS32                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "                       \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define HSV_WGMMA_REGS64                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "                       \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "                        \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "                        \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

#define HSV_WGMMA_SPECIALIZE(N, S, TY, REGS, DREGS, SS_OPS, SS_P, RS_OPS, RS_P)                                      \
  template <>                                                                                                        \
  struct Wgmma<N, S> {                                                                                               \
    static __device__ __forceinline__ void ss(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d) {              \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_P ", 0;\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", " SS_OPS                  \
                   ", p, 1, 1, 0, 0;\n}\n"                                                                           \
                   : DREGS(d)                                                                                        \
                   : "l"(a), "l"(b), "r"(scale_d));                                                                  \
    }                                                                                                                \
    static __device__ __forceinline__ void rs(float (&d)[N / 2], const unsigned (&a)[4], uint64_t b,                 \
                                              int scale_d) {                                                         \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_P ", 0;\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", " RS_OPS                  \
                   ", p, 1, 1, 0;\n}\n"                                                                              \
                   : DREGS(d)                                                                                        \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                              \
    }                                                                                                                \
  };

#define HSV_WGMMA_FOR_BOTH_DTYPES(N, REGS, DREGS, SS_OPS, SS_P, RS_OPS, RS_P)                                        \
  HSV_WGMMA_SPECIALIZE(N, __nv_bfloat16, "bf16", REGS, DREGS, SS_OPS, SS_P, RS_OPS, RS_P)                            \
  HSV_WGMMA_SPECIALIZE(N, __half, "f16", REGS, DREGS, SS_OPS, SS_P, RS_OPS, RS_P)

HSV_WGMMA_FOR_BOTH_DTYPES(16, HSV_WGMMA_REGS8, HSV_WGMMA_D8, "%8, %9", "%10", "{%8, %9, %10, %11}, %12",
                          "%13")
HSV_WGMMA_FOR_BOTH_DTYPES(32, HSV_WGMMA_REGS16, HSV_WGMMA_D16, "%16, %17", "%18", "{%16, %17, %18, %19}, %20",
                          "%21")
HSV_WGMMA_FOR_BOTH_DTYPES(64, HSV_WGMMA_REGS32, HSV_WGMMA_D32, "%32, %33", "%34", "{%32, %33, %34, %35}, %36",
                          "%37")
HSV_WGMMA_FOR_BOTH_DTYPES(128, HSV_WGMMA_REGS64, HSV_WGMMA_D64, "%64, %65", "%66", "{%64, %65, %66, %67}, %68",
                          "%69")

#undef HSV_WGMMA_D8_AT
#undef HSV_WGMMA_D8
#undef HSV_WGMMA_D16
#undef HSV_WGMMA_D32
#undef HSV_WGMMA_D64
#undef HSV_WGMMA_REGS8
#undef HSV_WGMMA_REGS16
#undef HSV_WGMMA_REGS32
#undef HSV_WGMMA_REGS64
#undef HSV_WGMMA_SPECIALIZE
#undef HSV_WGMMA_FOR_BOTH_DTYPES

#endif  // HSV_WGMMA_DEVICE

}  // namespace wgmma
}  // namespace cuda
}  // namespace hsv
