// Autograd kernels for latentmoe's ops without a backward (the inference ops, and the backward ops'
// own second derivatives): a gradient that reaches one raises RuntimeError naming the op and what
// to use instead, where torch would otherwise treat the op as non-differentiable (its inputs'
// gradients silently None, only a warning). In C++ as one boxed kernel: torch.library's Python
// register_autograd ran a Python function and a Python redispatch on every call, gradient or not
// (about 10-15 us per call; a decode step of MultiHeadLatentAttention makes four such calls).
//
// The kernel runs the op below autograd; only when grad mode is on and an input requires grad do
// its floating outputs get a grad_fn, an Error node whose backward raises the message.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace latentmoe {
namespace {

// torch's pointer to an autograd node: std::shared_ptr<Node> in older releases, c10::intrusive_ptr
// in newer ones (2.14); Edge::function has whichever this torch uses.
using NodePtr = decltype(torch::autograd::Edge::function);
template <typename P>
struct IsShared : std::false_type {};
template <typename N>
struct IsShared<std::shared_ptr<N>> : std::true_type {};

// An Error node (its backward raises msg) with the given next edges, as a P. (ErrorNode<P> depends
// on P, so only the branch this torch uses is instantiated.)
template <typename P>
using ErrorNode = std::conditional_t<sizeof(P) != 0, torch::autograd::Error, void>;
template <typename P>
P make_error_node(std::string msg, torch::autograd::edge_list edges) {
  if constexpr (IsShared<P>::value) return std::make_shared<ErrorNode<P>>(std::move(msg), std::move(edges));
  else return c10::make_intrusive<ErrorNode<P>>(std::move(msg), std::move(edges));
}

constexpr const char* kNoDouble = "double backward (second derivatives) is not supported";

// The op's name without the namespace ("latentmoe::mla_decode" -> "mla_decode").
std::string short_name(const c10::OperatorHandle& op) {
  const std::string& name = op.schema().name();
  return name.substr(name.find("::") + 2);
}

// The message for `op`: what it is and what to use where gradients are needed.
std::string why(const c10::OperatorHandle& handle) {
  const std::string op = short_name(handle);
  const char* text = kNoDouble;
  if (op == "linear_small" || op == "linear_f32")
    text = "has no backward (an inference op): use torch.nn.functional.linear where gradients are needed, or "
           "call it under torch.no_grad()";
  else if (op == "bmm_small")
    text = "has no backward (an inference op): use torch.bmm where gradients are needed, or call it under "
           "torch.no_grad()";
  else if (op == "mla_decode_absorbed" || op == "mla_decode")
    text = "has no backward (an inference op): train through latentmoe.ops.mla_prefill, or call it under "
           "torch.no_grad()";
  else if (op == "moe_pack_weight")
    text = "has no backward (packing is for inference)";
  else if (op == "moe_experts_packed")
    text = "has no backward (an inference op): train through latentmoe.ops.moe_experts on the HF-layout weights";
  return "latentmoe." + op + ": " + text;
}

// Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad): no latentmoe op has a
// forward derivative. A dual input (a tangent, no requires_grad) took the no-gradient path, and
// the outputs came back without a tangent: a zero jvp, silently. Raised instead, naming the op.
void refuse_forward_ad(const c10::OperatorHandle& op, const torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = *(first + static_cast<std::ptrdiff_t>(i));
    if (!v.isTensor() || !v.toTensor().defined() || !v.toTensor()._fw_grad(/*level=*/0).defined()) continue;
    TORCH_CHECK(false, "latentmoe.", short_name(op), ": argument '", args[i].name(),
                "' carries a forward-mode tangent, but the op has no forward derivative (torch.func.jvp / "
                "jacfwd and torch.autograd.forward_ad are not supported; its tangent would be dropped): "
                "use reverse mode (torch.autograd.grad, .backward(), torch.func.vjp)");
  }
}

// ADInplaceOrView kernel of the ops with a backward (their autograd kernels, autograd_functions.cpp,
// send every call on below autograd, dual inputs included): refuse_forward_ad, then on.
void forward_ad_check_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  refuse_forward_ad(op, stack);
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}

void forbid_backward_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  refuse_forward_ad(op, stack);
  const size_t n_args = op.schema().arguments().size();
  const size_t n_out = op.schema().returns().size();
  std::vector<at::Tensor> inputs;
  bool needs_grad = false;
  if (at::GradMode::is_enabled()) {
    for (auto it = stack->end() - static_cast<std::ptrdiff_t>(n_args); it != stack->end(); ++it) {
      if (!it->isTensor()) continue;
      const at::Tensor& t = it->toTensor();
      if (!t.defined()) continue;
      inputs.push_back(t);
      needs_grad = needs_grad || t.requires_grad();
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (!needs_grad) return;
  const NodePtr node = make_error_node<NodePtr>(why(op), torch::autograd::collect_next_edges(inputs));
  for (auto it = stack->end() - static_cast<std::ptrdiff_t>(n_out); it != stack->end(); ++it) {
    if (!it->isTensor()) continue;
    const at::Tensor& t = it->toTensor();
    if (t.defined() && torch::autograd::isDifferentiableType(t.scalar_type())) torch::autograd::set_history(t, node);
  }
}

// mla_append_cache writes into kv_cache (Tensor(a!)) and has no backward. With grad mode on, an
// input that requires grad raises here, before anything is written: the write would cut the
// cache's values off from their gradients (kv_latent, k_pe, ...) or overwrite a tensor autograd
// tracks (kv_cache itself). Under torch.no_grad() the op just runs, as torch's in-place ops do.
// Its ADInplaceOrView kernel (below) bumps kv_cache's version counter.
void mutating_no_grad_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  refuse_forward_ad(op, stack);
  if (at::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const auto first = stack->end() - static_cast<std::ptrdiff_t>(args.size());
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& v = *(first + static_cast<std::ptrdiff_t>(i));
      if (!v.isTensor() || !v.toTensor().defined() || !v.toTensor().requires_grad()) continue;
      const bool written = args[i].alias_info() != nullptr && args[i].alias_info()->isWrite();
      TORCH_CHECK(false, "latentmoe.", short_name(op), ": argument '", args[i].name(),
                  "' requires grad, but the op ", written ? "writes into it in place and " : "",
                  "has no backward (an inference op): call it under torch.no_grad() or pass detached tensors");
    }
  }
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView kernel of an op that writes into its Tensor(a!) arguments and returns nothing:
// each written tensor's version counter is bumped, so a backward that saved it before the write
// (mla_prefill's, which saves the cache) raises instead of running on the new contents. (torch's
// autogradNotImplementedInplaceOrViewFallback bumps only arguments that are also returned.) An
// inference tensor outside inference mode is refused before anything is written; torch's in-place
// ops refuse it too, after writing.
void bump_written_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(args.size());
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].alias_info() == nullptr || !args[i].alias_info()->isWrite()) continue;
    const c10::IValue& v = *(first + static_cast<std::ptrdiff_t>(i));
    if (!v.isTensor() || !v.toTensor().defined()) continue;
    const at::Tensor& t = v.toTensor();
    if (t.is_inference() && !c10::InferenceMode::is_enabled()) {
      TORCH_CHECK(false, "latentmoe.", short_name(op), ": argument '", args[i].name(),
                  "' is an inference tensor (made under torch.inference_mode()), which may not be written in place ",
                  "outside inference mode; run the op under torch.inference_mode() or pass a normal tensor (e.g. a ",
                  "clone made outside inference mode)");
    }
    written.push_back(t);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::increment_version(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(latentmoe, ADInplaceOrView, m) {
  m.impl("mla_append_cache", torch::CppFunction::makeFromBoxedFunction<&bump_written_kernel>());
  for (const char* op : {"rms_norm", "add_rms_norm", "mla_prefill", "moe_route", "moe_experts"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&forward_ad_check_kernel>());
}

TORCH_LIBRARY_IMPL(latentmoe, Autograd, m) {
  m.impl("mla_append_cache", torch::CppFunction::makeFromBoxedFunction<&mutating_no_grad_kernel>());
  for (const char* op : {"linear_small", "linear_f32", "bmm_small", "mla_decode", "mla_decode_absorbed", "moe_pack_weight",
                         "moe_experts_packed", "rms_norm_backward", "mla_prefill_backward", "moe_route_backward",
                         "moe_experts_backward"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&forbid_backward_kernel>());
}

}  // namespace latentmoe
