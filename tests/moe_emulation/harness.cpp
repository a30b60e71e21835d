// Runs the MoE CUDA launchers (launch_moe_route, launch_moe_route_backward, launch_moe_experts,
// launch_moe_sort_pairs, and the grouped path's launch_moe_swiglu / _combine / _zero_idle / _swiglu_backward:
// the .cu files' host launch code and kernels, host-emulated via shim.h) on inputs from a file
// and writes their outputs. Driven by tests/test_moe_cuda_emulation.py, which generates
// route_host.inc / experts_host.inc from the .cu sources. The expert sort (sorted_pairs, offsets,
// pos) is done by the ATen code of moe_binding.cpp; the test computes it with the same torch ops.
//
// route IN OUT:   int64 [T, E, K, n_group, topk_group, score_func, norm, has_bias, has_grad_scores],
//                 float scale, fp32 logits [T,E], bias [E]?, grad_weights [T,K], grad_scores [T,E]?
//                 -> fp32 weights [T,K], int64 indices [T,K], fp32 scores [T,E], fp32 grad_logits [T,E]
// experts IN OUT: int64 [dtype (0 fp32, 1 bf16, 2 fp16), T, K, E, H, I, misalign], x [T,H], int64
//                 sorted_pairs [S], offsets [E+1], pos [S], gate_up [E,2I,H], down [E,H,I],
//                 fp32 weights [S]  (x / gate_up / down as raw 4- or 2-byte elements)
//                 -> out [T,H], gate_up_out [S,2I] (raw elements of the dtype)
//                 The dtype buffers start 16-byte aligned, as torch's allocations do, except those
//                 named by the bits of misalign, which start one element past a 16-byte boundary
//                 (as a tensor view with a storage offset can): 1 x, 2 gate_up, 4 down,
//                 8 gate_up_out / act / y / out.
#include "shim.h"

#include "common/dtype.h"
#include "common/moe_math.h"
#include "route_host.inc"
#include "experts_host.inc"

#include <fstream>
#include <string>

using namespace latentmoe;

namespace {
template <typename V>
std::vector<V> read_vec(std::ifstream& f, size_t n, V fill = V{}) {
  std::vector<V> v(n, fill);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(V)));
  return v;
}
template <typename V>
void write_vec(std::ofstream& f, const std::vector<V>& v) {
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(V)));
}
std::vector<unsigned char> poisoned(size_t bytes) {
  std::vector<unsigned char> v(bytes + 2);
  emu::poison(v.data(), v.size());
  v.resize(bytes);
  return v;
}

int run_route(std::ifstream& in, std::ofstream& out) {
  int64_t h[9];
  float scale;
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  in.read(reinterpret_cast<char*>(&scale), sizeof(scale));
  const int64_t T = h[0], E = h[1], K = h[2];
  moe::RouteParams p{static_cast<int>(E), static_cast<int>(K), static_cast<int>(h[3]), static_cast<int>(h[4]),
                     static_cast<int>(h[5]), h[6] != 0, scale};
  auto logits = read_vec<float>(in, T * E);
  auto bias = h[7] ? read_vec<float>(in, E) : std::vector<float>();
  auto gw = read_vec<float>(in, T * K);
  auto gs = h[8] ? read_vec<float>(in, T * E) : std::vector<float>();
  if (!in) return std::fprintf(stderr, "short input\n"), 2;
  std::vector<float> scores(T * E, NAN), choice(T * E, NAN), weights(T * K, NAN), grad(T * E, NAN);
  std::vector<int64_t> indices(T * K, -7);
  if (cuda::launch_moe_route(logits.data(), h[7] ? bias.data() : nullptr, p, T, scores.data(), choice.data(),
                             weights.data(), indices.data(), nullptr) != cudaSuccess)
    return std::fprintf(stderr, "launch_moe_route failed\n"), 3;
  // The binding rebuilds the params of the backward from (E, K, score_func, norm, scale).
  moe::RouteParams pb{static_cast<int>(E), static_cast<int>(K), 1, 1, p.score_func, p.norm_topk_prob, scale};
  if (cuda::launch_moe_route_backward(gw.data(), h[8] ? gs.data() : nullptr, scores.data(), indices.data(),
                                      pb, T, grad.data(), nullptr) != cudaSuccess)
    return std::fprintf(stderr, "launch_moe_route_backward failed\n"), 3;
  write_vec(out, weights);
  write_vec(out, indices);
  write_vec(out, scores);
  write_vec(out, grad);
  return 0;
}

// A dtype buffer of `bytes` bytes starting 16-byte aligned, or one element past that.
struct Buf {
  std::vector<unsigned char> storage;
  unsigned char* p;
  Buf(size_t bytes, size_t shift, bool poison) : storage(bytes + 32) {
    if (poison) emu::poison(storage.data(), storage.size());
    const auto base = reinterpret_cast<uintptr_t>(storage.data());
    p = storage.data() + ((16 - base % 16) % 16) + shift;
  }
};

int run_experts(std::ifstream& in, std::ofstream& out) {
  int64_t h[7];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const int64_t T = h[1], K = h[2], E = h[3], H = h[4], I = h[5], S = T * K, mis = h[6];
  const DType dt = static_cast<DType>(h[0]);
  const size_t el = dt == DType::kFloat32 ? 4 : 2;
  auto shift = [&](int bit) { return (mis & bit) ? el : 0; };
  auto read_buf = [&](size_t bytes, int bit) {
    Buf b(bytes, shift(bit), false);
    in.read(reinterpret_cast<char*>(b.p), static_cast<std::streamsize>(bytes));
    return b;
  };
  auto x = read_buf(T * H * el, 1);
  auto sorted_pairs = read_vec<int64_t>(in, S);
  auto offsets = read_vec<int64_t>(in, E + 1);
  auto pos = read_vec<int64_t>(in, S);
  auto gu = read_buf(E * 2 * I * H * el, 2);
  auto dn = read_buf(E * H * I * el, 4);
  auto w = read_vec<float>(in, S);
  if (!in) return std::fprintf(stderr, "short input\n"), 2;
  // Scratch and outputs start as NaN (at::empty on the GPU is uninitialised too).
  auto tile_start = poisoned((E + 1) * sizeof(int));
  Buf gate_up_out(S * 2 * I * el, shift(8), true), act(S * I * el, shift(8), true);
  Buf y(S * H * el, shift(8), true), o(T * H * el, shift(8), true);
  const cudaError_t err = cuda::launch_moe_experts(
      dt, x.p, sorted_pairs.data(), offsets.data(), pos.data(), gu.p, dn.p, w.data(), T, K, E, H, I,
      reinterpret_cast<int*>(tile_start.data()), gate_up_out.p, act.p, y.p, o.p, nullptr);
  if (err != cudaSuccess) return std::fprintf(stderr, "launch_moe_experts failed\n"), 3;
  out.write(reinterpret_cast<const char*>(o.p), static_cast<std::streamsize>(T * H * el));
  out.write(reinterpret_cast<const char*>(gate_up_out.p), static_cast<std::streamsize>(S * 2 * I * el));
  return 0;
}
// sort IN OUT: int64 [S, E], ids [S] -> int64 sorted_pairs [S], offsets [E+1], pos [S].
int run_sort(std::ifstream& in, std::ofstream& out) {
  int64_t h[2];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const int64_t S = h[0], E = h[1];
  auto ids = read_vec<int64_t>(in, S);
  if (!in) return std::fprintf(stderr, "short input\n"), 2;
  std::vector<int64_t> sorted_pairs(S, -7), offsets(E + 1, -7), pos(S, -7);
  if (cuda::launch_moe_sort_pairs(ids.data(), S, E, sorted_pairs.data(), offsets.data(), pos.data(),
                                  nullptr) != cudaSuccess)
    return std::fprintf(stderr, "launch_moe_sort_pairs failed\n"), 3;
  write_vec(out, sorted_pairs);
  write_vec(out, offsets);
  write_vec(out, pos);
  return 0;
}

// swiglu IN OUT: int64 [dtype, S, I, misalign], gate_up_out [S, 2I] -> act [S, I] (raw elements);
// misalign 1 shifts both buffers one element off 16 bytes.
int run_swiglu(std::ifstream& in, std::ofstream& out) {
  int64_t h[4];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const DType dt = static_cast<DType>(h[0]);
  const int64_t S = h[1], I = h[2];
  const size_t el = dt == DType::kFloat32 ? 4 : 2, shift = h[3] ? el : 0;
  Buf gu(S * 2 * I * el, shift, false), act(S * I * el, shift, true);
  in.read(reinterpret_cast<char*>(gu.p), static_cast<std::streamsize>(S * 2 * I * el));
  if (!in) return std::fprintf(stderr, "short input\n"), 2;
  if (cuda::launch_moe_swiglu(dt, gu.p, S, I, act.p, nullptr) != cudaSuccess)
    return std::fprintf(stderr, "launch_moe_swiglu failed\n"), 3;
  out.write(reinterpret_cast<const char*>(act.p), static_cast<std::streamsize>(S * I * el));
  return 0;
}

// combine IN OUT: int64 [dtype, T, K, E, H, misalign], y [T*K, H] (raw), fp32 weights [T*K],
// int64 pos [T*K], offsets [E+1] -> out [T, H] (raw); misalign 1 shifts y and out.
int run_combine(std::ifstream& in, std::ofstream& out) {
  int64_t h[6];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const DType dt = static_cast<DType>(h[0]);
  const int64_t T = h[1], K = h[2], E = h[3], H = h[4], S = T * K;
  const size_t el = dt == DType::kFloat32 ? 4 : 2, shift = h[5] ? el : 0;
  Buf y(S * H * el, shift, false), o(T * H * el, shift, true);
  in.read(reinterpret_cast<char*>(y.p), static_cast<std::streamsize>(S * H * el));
  auto w = read_vec<float>(in, S);
  auto pos = read_vec<int64_t>(in, S);
  auto offsets = read_vec<int64_t>(in, E + 1);
  if (!in) return std::fprintf(stderr, "short input\n"), 2;
  if (cuda::launch_moe_combine(dt, y.p, w.data(), pos.data(), offsets.data(), E, T, K, H, o.p, nullptr) !=
      cudaSuccess)
    return std::fprintf(stderr, "launch_moe_combine failed\n"), 3;
  out.write(reinterpret_cast<const char*>(o.p), static_cast<std::streamsize>(T * H * el));
  return 0;
}

// swiglu_bwd IN OUT: int64 [dtype, S, E, I], gate_up_out [S, 2I] and gau [S, I] (raw), fp32 w_s [S],
// int64 offsets [E+1] -> gh [S, 2I] (raw), fp32 grad_w [S].
int run_swiglu_bwd(std::ifstream& in, std::ofstream& out) {
  int64_t h[4];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const DType dt = static_cast<DType>(h[0]);
  const int64_t S = h[1], E = h[2], I = h[3];
  const size_t el = dt == DType::kFloat32 ? 4 : 2;
  Buf gu(S * 2 * I * el, 0, false), gau(S * I * el, 0, false), gh(S * 2 * I * el, 0, true);
  in.read(reinterpret_cast<char*>(gu.p), static_cast<std::streamsize>(S * 2 * I * el));
  in.read(reinterpret_cast<char*>(gau.p), static_cast<std::streamsize>(S * I * el));
  auto w = read_vec<float>(in, S);
  auto offsets = read_vec<int64_t>(in, E + 1);
  if (!in) return std::fprintf(stderr, "short input\n"), 2;
  std::vector<float> gw(S, NAN);
  if (cuda::launch_moe_swiglu_backward(dt, gu.p, gau.p, w.data(), offsets.data(), E, S, I, gh.p, gw.data(),
                                       nullptr) != cudaSuccess)
    return std::fprintf(stderr, "launch_moe_swiglu_backward failed\n"), 3;
  out.write(reinterpret_cast<const char*>(gh.p), static_cast<std::streamsize>(S * 2 * I * el));
  write_vec(out, gw);
  return 0;
}

// zero_idle IN OUT: int64 [E, bytes_per_expert, shift], data [E * bytes_per_expert] bytes,
// offsets [E+1] -> data; shift: bytes past a 16-byte boundary where data starts.
int run_zero_idle(std::ifstream& in, std::ofstream& out) {
  int64_t h[3];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const int64_t E = h[0], bytes = h[1];
  Buf d(E * bytes, static_cast<size_t>(h[2]), false);
  in.read(reinterpret_cast<char*>(d.p), static_cast<std::streamsize>(E * bytes));
  auto offsets = read_vec<int64_t>(in, E + 1);
  if (!in) return std::fprintf(stderr, "short input\n"), 2;
  if (cuda::launch_moe_zero_idle(d.p, bytes, offsets.data(), E, nullptr) != cudaSuccess)
    return std::fprintf(stderr, "launch_moe_zero_idle failed\n"), 3;
  out.write(reinterpret_cast<const char*>(d.p), static_cast<std::streamsize>(E * bytes));
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) return std::fprintf(stderr, "usage: harness route|experts|sort|swiglu|combine|zero_idle|swiglu_bwd IN OUT\n"), 2;
  std::ifstream in(argv[2], std::ios::binary);
  std::ofstream out(argv[3], std::ios::binary);
  const std::string mode = argv[1];
  if (mode == "route") return run_route(in, out);
  if (mode == "experts") return run_experts(in, out);
  if (mode == "sort") return run_sort(in, out);
  if (mode == "swiglu") return run_swiglu(in, out);
  if (mode == "combine") return run_combine(in, out);
  if (mode == "zero_idle") return run_zero_idle(in, out);
  if (mode == "swiglu_bwd") return run_swiglu_bwd(in, out);
  return std::fprintf(stderr, "unknown mode\n"), 2;
}
