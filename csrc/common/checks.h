// Argument checks that name the op and the argument. ValueError for what users get wrong
// (TORCH_CHECK_VALUE), RuntimeError for device placement (TORCH_CHECK).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>

namespace latentmoe::checks {

inline std::string dtype_list(std::initializer_list<at::ScalarType> types) {
  std::string s;
  for (auto t : types) {
    if (!s.empty()) s += ", ";
    s += c10::toString(t);
  }
  return s;
}

// A required tensor passed as None (an undefined tensor here): named, before any use of it would
// fail with a message that names nothing ("tensor does not have a device").
inline void defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "latentmoe.", op, ": argument '", name, "' is None; a tensor is required");
}

// fp32, bf16 or fp16.
inline void floating(const char* op, const char* name, const at::Tensor& t) {
  defined(op, name, t);
  auto d = t.scalar_type();
  TORCH_CHECK_VALUE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, "latentmoe.", op,
                    ": argument '", name, "' must be float32, bfloat16 or float16, got ", d);
}

inline void dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  defined(op, name, t);
  TORCH_CHECK_VALUE(t.scalar_type() == want, "latentmoe.", op, ": argument '", name,
                    "' must have dtype ", want, ", got ", t.scalar_type());
}

inline void same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  defined(op, name, t);
  defined(op, ref_name, ref);
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), "latentmoe.", op, ": argument '", name,
                    "' has dtype ", t.scalar_type(), " but '", ref_name, "' has dtype ",
                    ref.scalar_type(), "; they must match");
}

inline void same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                        const at::Tensor& ref) {
  defined(op, name, t);
  defined(op, ref_name, ref);
  TORCH_CHECK(t.device() == ref.device(), "latentmoe.", op, ": argument '", name, "' is on ",
              t.device(), " but '", ref_name, "' is on ", ref.device(),
              "; all tensors must be on one device");
}

inline void dim(const char* op, const char* name, const at::Tensor& t, int64_t want) {
  defined(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == want, "latentmoe.", op, ": argument '", name, "' must be ", want,
                    "-D, got shape ", t.sizes());
}

inline void size(const char* op, const char* name, const at::Tensor& t, int64_t d, int64_t want,
                 const char* what) {
  defined(op, name, t);
  TORCH_CHECK_VALUE(t.size(d) == want, "latentmoe.", op, ": argument '", name, "' dim ", d,
                    " must be ", want, " (", what, "), got shape ", t.sizes());
}

inline void contiguous(const char* op, const char* name, const at::Tensor& t) {
  defined(op, name, t);
  TORCH_CHECK_VALUE(t.is_contiguous(), "latentmoe.", op, ": argument '", name,
                    "' must be contiguous (call .contiguous()), got strides ", t.strides());
}

// Rows of unit stride, any other strides (e.g. a slice of the last dim of a wider tensor).
inline void rows_contiguous(const char* op, const char* name, const at::Tensor& t) {
  defined(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "latentmoe.", op, ": argument '", name,
                    "' must have a contiguous last dim (stride 1; other dims may be strided), got strides ",
                    t.strides());
}

inline void nonempty(const char* op, const char* name, const at::Tensor& t) {
  defined(op, name, t);
  TORCH_CHECK_VALUE(t.numel() > 0, "latentmoe.", op, ": argument '", name,
                    "' is empty (shape ", t.sizes(), ")");
}

// A private contiguous copy of a small index tensor (lengths, a block table), made after its
// metadata checks: the values a CPU kernel checks are then the values it reads, even if another
// thread changes the caller's tensor meanwhile (B + B * max_pages int32s: nothing next to the op).
// (An undefined tensor, a None from Python, stays undefined for the checks to name.)
inline at::Tensor private_copy(const at::Tensor& t) {
  return t.defined() ? t.clone(at::MemoryFormat::Contiguous) : t;
}
inline std::optional<at::Tensor> private_copy(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(private_copy(*t)) : std::nullopt;
}

}  // namespace latentmoe::checks
