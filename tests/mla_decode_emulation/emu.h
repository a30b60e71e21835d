// Host emulation of the CUDA features the MLA decode/append kernels and their launchers use, so
// the real csrc/cuda/mla/mla_kernels.cu (kernels AND host launch code) runs on a machine without a
// GPU. tests/test_mla_cuda_emulation.py rewrites only three constructs of the .cu source before
// including it: `extern __shared__ T x[];`, static `__shared__ T a[N], ...;` and `k<<<...>>>(args)`.
//
// Model: every CUDA thread of a block is a fiber (ucontext) on ONE OS thread; blocks run one after
// another. A fiber runs until it must wait at __syncthreads or a warp shuffle, then yields. So:
//   - __syncthreads is a real barrier; a barrier that not every thread of the block reaches (or
//     reached from different source lines) is reported as an error instead of hanging;
//   - a missing barrier shows up: between two barriers each fiber runs alone, in forward, reverse
//     or a seeded random order (chosen per run, reshuffled at every step), so a thread reading
//     shared memory another thread writes without a barrier in between reads a stale or poisoned
//     value in some order;
//   - shared memory (dynamic and static) starts as all-0xFF bytes: NaN as float, -1 as int;
//   - __shfl_xor_sync exchanges through per-warp slots between two warp barriers and checks that
//     the mask names every lane of the warp;
//   - launches check the configuration limits of an sm_90 device (block <= 1024 threads, grid y/z
//     <= 65535, dynamic shared memory <= the cudaFuncSetAttribute value (default 48 KiB), static +
//     dynamic <= 227 KiB) and report errors through cudaGetLastError like the runtime.
// bf16 / fp16 conversions round to nearest even (as cuda_bf16.h / cuda_fp16.h do). Device-only
// fast paths (__expf, rsqrtf under __CUDA_ARCH__) are NOT emulated: the host branches run.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// CUDA's vector types (their alignment matters: kernels read shared memory through them).
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef struct CUstream_st* cudaStream_t;

// ---- bf16 / fp16 storage types ------------------------------------------------------------------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__half) == 2, "2-byte storage types");

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                         // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  if (e == 0) return (sign ? -1.f : 1.f) * std::ldexp(static_cast<float>(m), -24);  // zero / subnormal, exact
  const uint32_t u = sign | (e == 31 ? 0x7f800000u : (e + 112) << 23) | (m << 13);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half(float f) {  // round to nearest even, as __float2half
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal half, round(|f| * 2^24) (1024 = smallest normal)
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(std::fabs(f) * 16777216.f)))};
  }
  a -= 0x38000000u;  // rebias the exponent (127 -> 15)
  a += 0xfffu + ((a >> 13) & 1u);
  return {static_cast<uint16_t>(sign | (a >> 13))};
}

namespace emu {

constexpr size_t kSmemOptin = 232448;   // sharedMemPerBlockOptin of H100 / H200 (227 KiB)
constexpr size_t kSmemDefault = 49152;  // dynamic limit without cudaFuncSetAttribute
constexpr size_t kStack = 256 * 1024;   // per fiber

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation error: %s\n", what);
  std::fflush(stderr);
  std::_Exit(3);
}

// An asynchronous global -> shared copy (__pipeline_memcpy_async) that has not landed yet.
struct PendingCopy {
  void* dst;
  const void* src;
  size_t n;
};

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  unsigned lin = 0;
  bool done = false;
  std::vector<PendingCopy> open;                 // issued since the last commit
  std::vector<std::vector<PendingCopy>> groups;  // committed, not yet waited for (oldest first)
};

struct LaunchRecord {
  dim3 grid, block;
  size_t dyn_smem, static_smem;
};

struct State {
  dim3 grid, block, bidx;
  unsigned nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t sched;
  Fiber* cur = nullptr;
  uint64_t progress = 0;
  unsigned bar_count = 0;
  uint64_t bar_gen = 0;
  int bar_line = -1;
  std::vector<unsigned> warp_count;
  std::vector<uint64_t> warp_gen;
  std::vector<int> warp_line;
  std::vector<uint64_t> warp_slots;
  std::vector<uint32_t> mma_slots;  // per lane: a[4], b[2] of a warp-wide mma_16816
  std::vector<unsigned char> dyn;
  std::map<std::string, std::vector<unsigned char>> statics;
  size_t static_bytes = 0;
  std::map<const void*, int> max_dyn;
  std::map<const void*, size_t> static_of;  // static shared memory of each kernel launched so far
  cudaError_t last_error = cudaSuccess;
  std::function<void()> body;
  unsigned order = 0;  // fiber order within a sweep: 0 forward, 1 reverse, else random (seed)
  std::mt19937 rng;
  std::vector<unsigned> perm;
  std::vector<LaunchRecord> log;
};

inline State& st() {
  static State s;
  return s;
}

inline void yield() { swapcontext(&st().cur->ctx, &st().sched); }

inline unsigned warp_lanes(unsigned w) {
  const unsigned n = st().nthreads;
  return std::min(32u, n - w * 32);
}

inline void warp_barrier(int line) {
  State& s = st();
  const unsigned w = s.cur->lin / 32;
  if (s.warp_count[w] == 0) {
    s.warp_line[w] = line;
  } else if (s.warp_line[w] != line) {
    fail("lanes of one warp meet at different shuffle call sites");
  }
  const uint64_t g = s.warp_gen[w];
  ++s.progress;
  if (++s.warp_count[w] == warp_lanes(w)) {
    s.warp_count[w] = 0;
    ++s.warp_gen[w];
    return;
  }
  while (s.warp_gen[w] == g) yield();
}

inline unsigned block_lin(dim3 t) { return t.x + st().block.x * (t.y + st().block.y * t.z); }

template <typename T>
T* dyn_smem() {
  return reinterpret_cast<T*>(st().dyn.data());
}

// Static __shared__ array `key` of n elements: one per block, shared by its threads.
template <typename T>
T* static_smem(const char* key, size_t n) {
  State& s = st();
  auto it = s.statics.find(key);
  if (it == s.statics.end()) {
    it = s.statics.emplace(key, std::vector<unsigned char>(n * sizeof(T) + 16, 0xFF)).first;
    s.static_bytes += n * sizeof(T);
  }
  return reinterpret_cast<T*>(it->second.data());
}

inline void fiber_main() {
  State& s = st();
  s.body();
  if (!s.cur->open.empty() || !s.cur->groups.empty()) fail("a thread exited with asynchronous copies never waited for");
  s.cur->done = true;
  ++s.progress;
}  // uc_link returns to the scheduler

inline void run_block(size_t smem) {
  State& s = st();
  const unsigned n = s.nthreads, nw = (n + 31) / 32;
  s.dyn.assign(smem + 16, 0xFF);
  s.statics.clear();
  s.static_bytes = 0;
  s.bar_count = 0;
  s.warp_count.assign(nw, 0);
  s.warp_gen.assign(nw, 0);
  s.warp_line.assign(nw, -1);
  s.warp_slots.assign(nw * 32, ~uint64_t{0});
  s.mma_slots.assign(nw * 32 * 6, ~uint32_t{0});
  s.fibers.assign(n, Fiber{});
  if (s.stacks.size() < n) s.stacks.resize(n, std::vector<char>(kStack));
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.tid = dim3(i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y));
    f.lin = i;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[i].data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &s.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  unsigned live = n;
  s.perm.resize(n);
  std::iota(s.perm.begin(), s.perm.end(), 0u);
  if (s.order == 1) std::reverse(s.perm.begin(), s.perm.end());
  while (live > 0) {
    const uint64_t before = s.progress;
    if (s.order > 1) std::shuffle(s.perm.begin(), s.perm.end(), s.rng);
    for (unsigned k = 0; k < n; ++k) {
      Fiber& f = s.fibers[s.perm[k]];
      if (f.done) continue;
      s.cur = &f;
      swapcontext(&s.sched, &f.ctx);
      if (f.done) --live;
    }
    if (live > 0 && s.progress == before) {
      char msg[160];
      std::snprintf(msg, sizeof msg,
                    "deadlock in block (%u,%u,%u): %u of %u threads wait at a barrier the others never reach", s.bidx.x,
                    s.bidx.y, s.bidx.z, live, n);
      fail(msg);
    }
  }
  s.cur = nullptr;
}

template <typename K, typename... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, A... args) {
  State& s = st();
  const unsigned long long n = 1ull * block.x * block.y * block.z;
  if (n == 0 || n > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto it = s.max_dyn.find(reinterpret_cast<const void*>(kernel));
  const size_t limit = it == s.max_dyn.end() ? kSmemDefault : static_cast<size_t>(it->second);
  if (smem > limit) {
    s.last_error = cudaErrorInvalidValue;
    return;
  }
  s.grid = grid;
  s.block = block;
  s.nthreads = static_cast<unsigned>(n);
  s.body = [&] { kernel(args...); };
  size_t static_bytes = 0;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        s.bidx = dim3(x, y, z);
        run_block(smem);
        static_bytes = std::max(static_bytes, s.static_bytes);
      }
  if (static_bytes > kSmemDefault || static_bytes + smem > kSmemOptin) {
    fail("static + dynamic shared memory exceed what one sm_90 block may use");
  }
  // The runtime refuses (cudaErrorInvalidValue at cudaFuncSetAttribute) a dynamic limit that,
  // with the kernel's static shared memory, exceeds the opt-in budget.
  if (it != s.max_dyn.end() && static_bytes + static_cast<size_t>(it->second) > kSmemOptin) {
    fail("cudaFuncSetAttribute(MaxDynamicSharedMemorySize) + static shared memory exceed the opt-in budget");
  }
  s.static_of[reinterpret_cast<const void*>(kernel)] = static_bytes;
  s.log.push_back({grid, block, smem, static_bytes});
}

}  // namespace emu

#define threadIdx (::emu::st().cur->tid)
#define blockIdx (::emu::st().bidx)
#define blockDim (::emu::st().block)
#define gridDim (::emu::st().grid)

inline void __syncthreads(int line = __builtin_LINE()) {
  emu::State& s = emu::st();
  if (s.bar_count == 0) {
    s.bar_line = line;
  } else if (s.bar_line != line) {
    emu::fail("threads of one block meet at different __syncthreads call sites");
  }
  const uint64_t g = s.bar_gen;
  ++s.progress;
  if (++s.bar_count == s.nthreads) {
    s.bar_count = 0;
    ++s.bar_gen;
    return;
  }
  while (s.bar_gen == g) emu::yield();
}

inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  emu::State& s = emu::st();
  const unsigned n = emu::warp_lanes(s.cur->lin / 32);
  if (mask != (n == 32 ? 0xffffffffu : ((1u << n) - 1))) emu::fail("__syncwarp mask does not name exactly the warp's lanes");
  emu::warp_barrier(line);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, int line = __builtin_LINE()) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a small value");
  emu::State& s = emu::st();
  const unsigned lin = s.cur->lin, w = lin / 32, lane = lin % 32, n = emu::warp_lanes(w);
  const unsigned full = n == 32 ? 0xffffffffu : ((1u << n) - 1);
  if (mask != full) emu::fail("__shfl_xor_sync mask does not name exactly the warp's lanes");
  if (width != 32) emu::fail("__shfl_xor_sync width != 32 is not emulated");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  s.warp_slots[lin] = bits;
  emu::warp_barrier(line);
  const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  T r = v;
  if (src < n) std::memcpy(&r, &s.warp_slots[w * 32 + src], sizeof(T));
  emu::warp_barrier(line);
  return r;
}

// <cuda_pipeline.h> primitives. Issuing a copy poisons its destination (0xFF bytes: NaN) and the
// data lands only when its thread waits for its group, so a read of the destination between the
// issue and the wait (or by another thread before a barrier) sees poison: that catches a copy
// issued into a buffer other threads still read, as well as a read before the wait.
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n, size_t zfill = 0) {
  if (zfill != 0) emu::fail("__pipeline_memcpy_async zero-fill is not emulated");
  if (n != 4 && n != 8 && n != 16) emu::fail("__pipeline_memcpy_async size must be 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(dst) % n != 0 || reinterpret_cast<uintptr_t>(src) % n != 0) {
    emu::fail("__pipeline_memcpy_async pointers must be aligned to the copy size");
  }
  std::memset(dst, 0xFF, n);
  emu::st().cur->open.push_back({dst, src, n});
}
inline void __pipeline_commit() {
  emu::Fiber& f = *emu::st().cur;
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
inline void __pipeline_wait_prior(size_t keep) {
  emu::Fiber& f = *emu::st().cur;
  while (f.groups.size() > keep) {
    for (const emu::PendingCopy& c : f.groups.front()) std::memcpy(c.dst, c.src, c.n);
    f.groups.erase(f.groups.begin());
  }
}

enum cudaDeviceAttr : int { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidValue;
  if (attr == cudaDevAttrComputeCapabilityMajor) {
    *value = 9;  // sm_90
    return cudaSuccess;
  }
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = static_cast<int>(emu::kSmemOptin);
  return cudaSuccess;
}

struct cudaFuncAttributes {
  size_t sharedSizeBytes;  // static shared memory: known here once the kernel has run (else 0)
  int ptxVersion;          // the emulated build targets sm_90
  int binaryVersion;
};
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* kernel) {
  const auto it = emu::st().static_of.find(reinterpret_cast<const void*>(kernel));
  attr->sharedSizeBytes = it == emu::st().static_of.end() ? 0 : it->second;
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  return cudaSuccess;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > emu::kSmemOptin) {
    return cudaErrorInvalidValue;
  }
  emu::st().max_dyn[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::st().last_error;
  emu::st().last_error = cudaSuccess;
  return e;
}

// ---- tensor-core MMA (csrc/cuda/common/mma.cuh) --------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col with fp32 accumulators, as a warp collective: every lane
// deposits its A and B registers, and after a warp barrier each lane rebuilds the 16x16 A and
// 16x8 B tiles from all 32 lanes (the PTX ISA's fragment layouts, documented in mma.cuh) and
// computes its own four D values (products summed in k order in fp32, then added to d). A warp
// with fewer than 32 lanes, or lanes arriving from different call sites, is an error.
#define LATENTMOE_EMULATED_MMA 1
namespace latentmoe::cuda {
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int line = __builtin_LINE()) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "16-bit operands");
  emu::State& s = emu::st();
  const unsigned lin = s.cur->lin, w = lin / 32, lane = lin % 32;
  if (emu::warp_lanes(w) != 32) emu::fail("mma_16816 needs a full warp");
  uint32_t* mine = &s.mma_slots[static_cast<size_t>(lin) * 6];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  emu::warp_barrier(line);
  auto half_of = [](uint32_t reg, int hi) {
    const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFFu);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __bfloat162float(__nv_bfloat16{bits});
    } else {
      return __half2float(__half{bits});
    }
  };
  const uint32_t* warp_regs = &s.mma_slots[static_cast<size_t>(w) * 32 * 6];
  // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 * (k >= 8), half k % 2.
  auto A = [&](int row, int k) {
    const int ln = (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half_of(warp_regs[ln * 6 + reg], k % 2);
  };
  // B[k][n]: lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  auto B = [&](int k, int n) {
    const int ln = n * 4 + (k % 8) / 2;
    return half_of(warp_regs[ln * 6 + 4 + (k >= 8 ? 1 : 0)], k % 2);
  };
  const int g = static_cast<int>(lane / 4), t = static_cast<int>(lane % 4);
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] += acc;
  }
  emu::warp_barrier(line);  // every lane has read the slots before any lane writes them again
}
}  // namespace latentmoe::cuda
