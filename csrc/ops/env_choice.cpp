#include "env_choice.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace hsv {

std::string env_value(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

size_t env_choice(const char* name, std::initializer_list<const char*> choices, size_t unset) {
  const std::string v = env_value(name);
  if (v.empty()) return unset;
  size_t i = 0;
  std::string listed;
  for (const char* c : choices) {
    if (v == c) return i;
    listed += (i++ ? ", '" : "'") + std::string(c) + "'";
  }
  TORCH_CHECK_VALUE(false, "hsv::conv2d: ", name, "='", v, "' is not one of ", listed);
  return unset;  // not reached
}

}  // namespace hsv
