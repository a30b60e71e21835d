// Host emulation of the few CUDA features the MLA prefill kernels use, so their logic (indexing,
// barriers, masking, reductions) is tested on machines without a GPU: one std::thread per CUDA
// thread, std::barrier for __syncthreads, a per-warp exchange for shuffles, std::atomic_ref for
// atomicAdd. Shared memory starts as NaN in every block so reads of unwritten slots show up. fp32
// only. Blocks run one after another (in grid order).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#include <algorithm>
using std::min; using std::max;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
struct EmuBlock {
  std::barrier<>* block_bar;
  std::vector<std::barrier<>*> warp_bars;
  float* warp_slots;  // [n_warps][32]
  float* smem;
};
inline thread_local EmuBlock* emu_block = nullptr;
inline void __syncthreads() { emu_block->block_bar->arrive_and_wait(); }
typedef int cudaError_t; typedef void* cudaStream_t;
struct alignas(16) float4 { float x, y, z, w; };  // CUDA's float4: 16-byte aligned (vector loads)
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
#define cudaSuccess 0
namespace latentmoe::cuda {
inline float to_float(float v) { return v; }
template <typename T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
inline float warp_reduce(float v, bool is_max) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* slots = emu_block->warp_slots + warp * 32;
  slots[lane] = v;
  emu_block->warp_bars[warp]->arrive_and_wait();
  float r = slots[0];
  for (int k = 1; k < 32; ++k) r = is_max ? std::fmax(r, slots[k]) : r + slots[k];
  emu_block->warp_bars[warp]->arrive_and_wait();
  return r;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warp_bars[threadIdx.x >> 5]->arrive_and_wait(); }
inline float warp_sum(float v) { return warp_reduce(v, false); }
inline float warp_max(float v) { return warp_reduce(v, true); }
}  // namespace latentmoe::cuda
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
template <typename F>
void emu_launch(unsigned blocks, unsigned threads, size_t smem_bytes, F kernel) {
  blockDim.x = threads; gridDim.x = blocks;
  std::vector<float> smem(smem_bytes / 4 + 1, std::nanf(""));  // NaN: reading unwritten smem shows up
  std::vector<float> slots((threads / 32) * 32);
  for (unsigned b = 0; b < blocks; ++b) {
    std::fill(smem.begin(), smem.end(), std::nanf(""));  // each block starts from NaN, not from the last block's data
    std::barrier<> bar(threads);
    std::vector<std::barrier<>*> wb;
    for (unsigned w = 0; w < threads / 32; ++w) wb.push_back(new std::barrier<>(32));
    EmuBlock blk{&bar, wb, slots.data(), smem.data()};
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t)
      ts.emplace_back([&, t, b] { threadIdx.x = t; blockIdx.x = b; emu_block = &blk; kernel(); });
    for (auto& t : ts) t.join();
    for (auto* w : wb) delete w;
  }
}
