// The HSV_* environment variables that pick an implementation or a setting,
// read on every call (a test or a benchmark switches them between calls).
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string>

namespace hsv {

// The variable's value, "" when unset.
std::string env_value(const char* name);

// The position of the variable's value in `choices`; unset or empty gives
// `unset`. Any other value throws c10::ValueError naming the variable, the
// value and the choices: "hsv::conv2d: NAME='v' is not one of 'a', 'b'".
size_t env_choice(const char* name, std::initializer_list<const char*> choices, size_t unset = 0);

}  // namespace hsv
