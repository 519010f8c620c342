#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace hsv {
namespace cpu {
namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

const Microkernel* compiled(const std::string& isa) {
  if (isa == "avx512") return microkernel_avx512();
  if (isa == "avx2") return microkernel_avx2();
  if (isa == "scalar") return microkernel_scalar();
  return nullptr;
}

}  // namespace

Impl impl_from_env() {
  const std::string v = env("HSV_CPU_IMPL");
  if (v == "composite") return Impl::Composite;
  if (v.empty() || v == "fused") return Impl::Fused;
  if (v == "auto") return Impl::Auto;
  TORCH_CHECK_VALUE(false, "hsv::conv2d: HSV_CPU_IMPL='", v, "' is not one of 'composite', 'fused', 'auto'");
}

bool cpu_supports(const std::string& isa) {
  if (isa == "scalar") return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}

std::string best_isa() {
  for (const char* isa : {"avx512", "avx2"}) {
    if (compiled(isa) && cpu_supports(isa)) return isa;
  }
  return "scalar";
}

const Microkernel& select_microkernel() {
  std::string isa = env("HSV_CPU_ISA");
  if (isa.empty() || isa == "auto") isa = best_isa();
  TORCH_CHECK_VALUE(isa == "avx512" || isa == "avx2" || isa == "scalar", "hsv::conv2d: HSV_CPU_ISA='", isa,
                    "' is not one of 'avx512', 'avx2', 'scalar', 'auto'");
  const Microkernel* k = compiled(isa);
  TORCH_CHECK(k != nullptr, "hsv::conv2d: HSV_CPU_ISA='", isa, "' but this build has no ", isa, " kernel");
  TORCH_CHECK(cpu_supports(isa), "hsv::conv2d: HSV_CPU_ISA='", isa, "' but this CPU does not support ", isa,
              " (best available: '", best_isa(), "')");
  return *k;
}

}  // namespace cpu
}  // namespace hsv
