// Environment switches of the kernels. The environment is read once, when latentmoe._C is
// imported (PyInit__C, holding the GIL), into an immutable snapshot; latentmoe.reload_settings()
// (tests, or a user who changes a variable later) takes a new one. A reload while an op runs in
// another thread can reach the op between two of its reads. Ops never call getenv themselves:
// glibc's getenv is not safe against another thread's setenv (os.environ assignments), which
// reallocates the environment while ops run with the GIL released.
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace latentmoe::settings {

// Every variable the kernels read.
inline constexpr const char* kNames[] = {
    "LATENTMOE_CPU_ISA",           "LATENTMOE_CPU_LOWP_GEMM",         "LATENTMOE_MOE_BACKWARD_GEMM",
    "LATENTMOE_MLA_PREFILL_FORWARD", "LATENTMOE_MLA_PREFILL_CHUNK",   "LATENTMOE_MLA_PREFILL_BWD_WINDOW",
    "LATENTMOE_MLA_DECODE_KERNEL", "LATENTMOE_CPU_F32_GEMM",     "LATENTMOE_MOE_FORWARD_GEMM",
    "LATENTMOE_MLA_PREFILL_BACKWARD",
};
inline constexpr int kCount = sizeof(kNames) / sizeof(kNames[0]);

struct Snapshot {
  bool set[kCount] = {};
  std::string value[kCount];
};

inline const Snapshot* read_environment() {
  auto* s = new Snapshot;
  for (int i = 0; i < kCount; ++i) {
    if (const char* v = std::getenv(kNames[i])) {
      s->set[i] = true;
      s->value[i] = v;
    }
  }
  return s;
}

inline std::atomic<const Snapshot*>& current() {
  static std::atomic<const Snapshot*> snapshot{read_environment()};  // first use, thread-safe
  return snapshot;
}

// A new snapshot of the environment. The previous one stays allocated (a few hundred bytes per
// reload): an op running in another thread may still be reading it.
inline void reload() { current().store(read_environment(), std::memory_order_release); }

// The snapshot's value of `name` (one of kNames), or null when unset.
inline const char* get(const char* name) {
  const Snapshot* s = current().load(std::memory_order_acquire);
  for (int i = 0; i < kCount; ++i)
    if (std::strcmp(kNames[i], name) == 0) return s->set[i] ? s->value[i].c_str() : nullptr;
  TORCH_CHECK(false, "latentmoe: internal error: unknown setting ", name);
  return nullptr;
}

// Index in `choices` of the value of environment variable `name`; unset or empty is choice 0
// (the default, e.g. "auto"). Any other value is a ValueError naming the op and the choices.
inline int choice(const char* op, const char* name, std::initializer_list<const char*> choices) {
  const char* v = get(name);
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
