// Which CPU kernels run: HSV_CPU_IMPL picks the implementation of the forward
// op, HSV_CPU_ISA forces one microkernel (for tests and comparisons). Both are
// read on every call so a process can switch between them.
#pragma once

#include <string>

#include "ukernel.h"

namespace hsv {
namespace cpu {

enum class Impl { Composite, Fused, Auto };

// HSV_CPU_IMPL = fused (default) | composite | auto. Throws on other values.
Impl impl_from_env();

// Whether this CPU (and OS) can run the ISA: "avx512", "avx2" or "scalar".
bool cpu_supports(const std::string& isa);

// The best microkernel this build has and this CPU runs, or the one that
// HSV_CPU_ISA = avx512 | avx2 | scalar | auto forces. Throws when the forced
// ISA is not compiled in or the CPU lacks it.
const Microkernel& select_microkernel();

// The ISA select_microkernel() picks with HSV_CPU_ISA unset.
std::string best_isa();

}  // namespace cpu
}  // namespace hsv
