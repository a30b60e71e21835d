// Environment switches of the kernels (read at each call, so tests can force either path).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace latentmoe::settings {

// Index in `choices` of the value of environment variable `name`; unset or empty is choice 0
// (the default, e.g. "auto"). Any other value is a ValueError naming the op and the choices.
inline int choice(const char* op, const char* name, std::initializer_list<const char*> choices) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  int i = 0;
  std::string allowed;
  for (const char* c : choices) {
    if (std::strcmp(v, c) == 0) return i;
    allowed += (i == 0 ? "" : (i + 1 == static_cast<int>(choices.size()) ? " or " : ", "));
    allowed += c;
    ++i;
  }
  TORCH_CHECK_VALUE(false, "latentmoe.", op, ": ", name, " must be ", allowed, ", not '", v, "'");
  return 0;
}

}  // namespace latentmoe::settings
