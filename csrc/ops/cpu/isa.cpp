#include "isa.h"

#include <c10/util/Exception.h>

#include "../env_choice.h"

namespace hsv {
namespace cpu {
namespace {

const Microkernel* compiled(const std::string& isa) {
  if (isa == "avx512") return microkernel_avx512();
  if (isa == "avx2") return microkernel_avx2();
  if (isa == "scalar") return microkernel_scalar();
  return nullptr;
}

}  // namespace

Impl impl_from_env() {
  constexpr Impl kImpls[] = {Impl::Composite, Impl::Fused, Impl::Auto};
  return kImpls[env_choice("HSV_CPU_IMPL", {"composite", "fused", "auto"}, /*unset=*/1)];
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
  const size_t choice = env_choice("HSV_CPU_ISA", {"auto", "avx512", "avx2", "scalar"});
  static const char* const kNamed[] = {"", "avx512", "avx2", "scalar"};
  const std::string isa = choice == 0 ? best_isa() : kNamed[choice];
  const Microkernel* k = compiled(isa);
  TORCH_CHECK(k != nullptr, "hsv::conv2d: HSV_CPU_ISA='", isa, "' but this build has no ", isa, " kernel");
  TORCH_CHECK(cpu_supports(isa), "hsv::conv2d: HSV_CPU_ISA='", isa, "' but this CPU does not support ", isa,
              " (best available: '", best_isa(), "')");
  return *k;
}

}  // namespace cpu
}  // namespace hsv
