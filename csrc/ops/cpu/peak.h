// Microbenchmarks that put the fused kernels' speed in context: the core's
// fp32 FMA peak, and what one register-blocked microkernel reaches on
// L1-resident operands. Both run on the calling thread only.
#pragma once

#include <string>

namespace hsv {
namespace cpu {

// Single-core fp32 FMA throughput in GFLOP/s (2 FLOP per lane per FMA) for
// isa = "avx512" | "avx2" | "scalar": enough independent accumulator chains to
// hide FMA latency on two FMA ports, no loads. Runs about `seconds` and returns
// the best of its timed chunks (the least disturbed by other processes).
double fma_peak_gflops(const std::string& isa, double seconds);

// GFLOP/s of the fused kernels' microkernel for isa (variant "wide", the MR x
// NR one, "narrow" or "three", see ukernel.h) on one MR x K by K x NR product,
// repeated with the C block accumulated in place: A rows (unit stride), packed
// B and C all stay in L1 for K up to a few hundred. Best of its timed chunks, as above.
// Variants "strided" and "strided_short" time the wide kernel's strided GEMMs
// (MicrokernelStridedFn) the same way, with B at row stride NR and C stored;
// "b_rows" and "b_rows_short" the same B read through one pointer per row
// (MicrokernelBRowsFn).
double microkernel_gflops(const std::string& isa, int64_t k, double seconds, const std::string& variant);

}  // namespace cpu
}  // namespace hsv
