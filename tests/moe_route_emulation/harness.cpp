// Runs the MoE routing CUDA launcher (csrc/cuda/moe/moe_route_kernels.cu, host-emulated by
// ../mla_decode_emulation/emu.h) on inputs from a file. Driven by
// tests/test_moe_route_cuda_emulation.py.
//
//   harness IN OUT ORDER   ORDER: threads of a block run between barriers in order 0 forward,
//                          1 reverse, n > 1 random with seed n
// IN: int64 [T, E, top_k, n_group, topk_group, score_func, norm_topk_prob, has_bias],
//   float routed_scaling_factor, then logits [T, E] fp32, bias [E] fp32 (if has_bias).
// OUT: weights [T, K] fp32, indices [T, K] int64, scores [T, E] fp32.
// Outputs and scratch start poisoned (0xFF bytes: NaN / -1), so an unwritten element shows up.
// Each launch prints "launch gx gy gz threads dyn_smem static_smem" on stdout.
#include <fstream>
#include <vector>

#include "emu.h"
#include "moe_route_host.inc"  // csrc/cuda/moe/moe_route_kernels.cu after the rewrites

using namespace latentmoe;
using namespace latentmoe::cuda;

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const unsigned order = static_cast<unsigned>(std::atoi(argv[3]));
  emu::st().order = order;
  emu::st().rng.seed(order);
  std::ifstream in(argv[1], std::ios::binary);
  int64_t h[8];
  in.read(reinterpret_cast<char*>(h), sizeof h);
  float scale;
  in.read(reinterpret_cast<char*>(&scale), sizeof scale);
  const int64_t T = h[0], E = h[1], K = h[2];
  std::vector<float> logits(T * E), bias(h[7] ? E : 0);
  in.read(reinterpret_cast<char*>(logits.data()), static_cast<std::streamsize>(logits.size() * 4));
  in.read(reinterpret_cast<char*>(bias.data()), static_cast<std::streamsize>(bias.size() * 4));
  if (!in) emu::fail("short input file");
  moe::RouteParams p{static_cast<int>(E), static_cast<int>(K), static_cast<int>(h[3]), static_cast<int>(h[4]),
                     static_cast<int>(h[5]), h[6] != 0, scale};
  std::vector<float> scores(T * E), choice(T * E), weights(T * K);
  std::vector<int64_t> indices(T * K);
  for (auto* v : {&scores, &choice, &weights}) std::memset(v->data(), 0xFF, v->size() * 4);
  std::memset(indices.data(), 0xFF, indices.size() * 8);
  const cudaError_t err = launch_moe_route(logits.data(), h[7] ? bias.data() : nullptr, p, T, scores.data(),
                                           choice.data(), weights.data(), indices.data(), nullptr);
  for (const auto& r : emu::st().log) {
    std::printf("launch %u %u %u %u %zu %zu\n", r.grid.x, r.grid.y, r.grid.z, r.block.x * r.block.y * r.block.z,
                r.dyn_smem, r.static_smem);
  }
  if (err != cudaSuccess) {
    std::fprintf(stderr, "launch_moe_route returned %d\n", static_cast<int>(err));
    return 4;
  }
  std::ofstream o(argv[2], std::ios::binary);
  o.write(reinterpret_cast<const char*>(weights.data()), static_cast<std::streamsize>(weights.size() * 4));
  o.write(reinterpret_cast<const char*>(indices.data()), static_cast<std::streamsize>(indices.size() * 8));
  o.write(reinterpret_cast<const char*>(scores.data()), static_cast<std::streamsize>(scores.size() * 4));
  return 0;
}
