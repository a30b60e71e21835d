// Host emulation of the CUDA features the MoE kernels (csrc/cuda/moe/*.cu) use, so their logic
// (launch configuration, tile scheduling, indexing, bounds, epilogues) runs on machines without a
// GPU. Driven by tests/test_moe_cuda_emulation.py, which rewrites the .cu source mechanically:
//   * `k<<<grid, block, smem, stream>>>(args);`  ->
//         `emu_launch(grid, block, smem, stream, &k, [&] { k(args); });`
//     emu_launch runs the blocks one after another, each with one std::thread per CUDA thread
//     (the same threads are reused for every block of a launch).
//   * `extern __shared__ T name[];`  ->  a pointer to the launch's dynamic shared memory in the
//     same arena (the kernel's MaxDynamicSharedMemorySize attribute is checked, 48 KB without).
//   * `__shared__ T name[d0][d1];`  ->  a reference into a per-block arena, refilled before every
//     block with the bytes 0x7FC1 (a NaN as fp32, bf16 and fp16; a huge int64), so reads of
//     shared memory the kernel did not write show up as NaN / a crash.
// __syncthreads is a barrier over the block that reports (abort) a thread returning while others
// wait at it, i.e. divergent synchronisation, and times out if threads wait at different barriers.
// Warp shuffles are emulated through per-warp slots and barriers with the same xor
// butterfly as cuda_utils.cuh. nvcuda::wmma is emulated on whole 16x16 tiles held by lane 0 of
// each warp (fp32 accumulation in k order; the tensor cores' internal order differs); loads and
// stores check that all 32 lanes take part with the same pointer and ldm, and the API's
// documented pointer-alignment / leading-dimension requirements. Asynchronous copies
// (__pipeline_memcpy_async / commit / wait_prior) are deferred until the kernel waits for their
// batch, so a stage read before its wait still holds the poison. uint4 / float4 are 16-byte
// aligned structs.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x)

typedef int cudaError_t;
typedef void* cudaStream_t;
#define cudaSuccess 0
#define cudaErrorInvalidValue 1
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaGetDevice(int* dev) { return *dev = 0, cudaSuccess; }
// The emulated device allows 227 KB of shared memory per block (sm_90), or what the environment
// variable LATENTMOE_EMU_SMEM_OPTIN says (bytes), to drive the kernels' smaller configurations.
inline int emu_smem_optin() {
  const char* v = std::getenv("LATENTMOE_EMU_SMEM_OPTIN");
  return v != nullptr ? std::atoi(v) : 227 * 1024;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  return *value = emu_smem_optin(), cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  return std::memset(p, value, n), cudaSuccess;
}

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "emulation error: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// ---- half / bfloat16 as 16-bit storage with round-to-nearest-even conversions ------------------
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFF + ((u >> 16) & 1);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
inline __half __float2half(float f) {
  _Float16 h = static_cast<_Float16>(f);
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}

// ---- blocks, barriers, shared memory --------------------------------------------------------
namespace emu {
// A barrier over the threads of a block (or warp) that knows which threads have left the kernel:
// when every thread still running waits at it but some have returned, the code synchronises
// divergently (undefined on the GPU), which is reported instead of deadlocking.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void reset() { arrived_ = 0, finished_ = 0; }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lk(m_);
    ++arrived_;
    if (arrived_ + finished_ == n_) {
      if (finished_ > 0) emu_fail("__syncthreads / warp collective after some threads returned");
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    const uint64_t g = gen_;
    if (!cv_.wait_for(lk, std::chrono::seconds(30), [&] { return gen_ != g; }))
      emu_fail("barrier timeout (threads wait at different barriers?)");
  }
  void finish() {  // the calling thread left the kernel
    std::lock_guard<std::mutex> lk(m_);
    ++finished_;
    if (arrived_ > 0 && arrived_ + finished_ == n_)
      emu_fail("a thread returned while others wait at __syncthreads / a warp collective");
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, arrived_ = 0, finished_ = 0;
  uint64_t gen_ = 0;
};

constexpr size_t kArenaBytes = 227 * 1024;  // the most one block may have on sm_90
struct Block {
  Barrier* bar;
  std::vector<Barrier*> warp_bars;
  float* warp_slots;                 // [n_warps][32]
  uint64_t* warp_words;              // [n_warps][32]
  alignas(128) unsigned char arena[kArenaBytes];
};
inline Block* block = nullptr;
inline thread_local size_t shared_used = 0;
// The device's limits: 48 KB of static shared memory per block, dynamic shared memory above
// 48 KB only up to what cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize) allowed, and
// 227 KB in all (the arena is smaller: a kernel needing more fails here).
constexpr size_t kStaticLimit = 48 * 1024, kBlockLimit = 227 * 1024;
inline thread_local size_t static_used = 0;
inline size_t dynamic_bytes = 0;  // of the launch in progress
inline std::mutex attr_mutex;
inline std::map<const void*, int> max_dynamic_smem;
inline void* shared_alloc(size_t bytes, bool is_static = true) {
  const size_t off = (shared_used + 127) / 128 * 128;
  if (off + bytes > kArenaBytes) emu_fail("shared memory arena exhausted");
  shared_used = off + bytes;
  if (is_static && (static_used += bytes) > kStaticLimit) emu_fail("more than 48 KB of static shared memory");
  if (shared_used > kBlockLimit) emu_fail("more than 227 KB of shared memory per block");
  return block->arena + off;
}
// `extern __shared__ T name[];` (every thread gets the same block of dynamic_bytes).
inline void* dynamic_shared() { return shared_alloc(dynamic_bytes, false); }
inline void poison(void* p, size_t bytes) {
  auto* b = static_cast<unsigned char*>(p);
  for (size_t i = 0; i + 1 < bytes; i += 2) { b[i] = 0xC1; b[i + 1] = 0x7F; }  // little endian 0x7FC1
}
}  // namespace emu

inline void __syncthreads() { emu::block->bar->arrive_and_wait(); }

template <typename F>
cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) emu_fail("cudaFuncSetAttribute: attribute not emulated");
  if (value < 0 || static_cast<size_t>(value) > emu::kBlockLimit || value > emu_smem_optin())
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(emu::attr_mutex);
  emu::max_dynamic_smem[reinterpret_cast<const void*>(fn)] = value;
  return cudaSuccess;
}

// ---- 16-byte vector types ---------------------------------------------------------------------
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };

// ---- asynchronous copies (<cuda_pipeline_primitives.h>) ----------------------------------------
// Copies are deferred, as on the GPU: __pipeline_memcpy_async records the copy in the thread's
// open batch, __pipeline_commit closes the batch, and __pipeline_wait_prior(n) performs every
// committed batch but the newest n. Until then the shared destination keeps its poison, so a
// read of a stage the kernel has not waited for shows up as NaN. Copies must go from global to
// shared memory, 4, 8 or 16 bytes with both addresses aligned to the size.
namespace emu {
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
};
inline thread_local std::vector<AsyncCopy> open_batch;
inline thread_local std::deque<std::vector<AsyncCopy>> committed_batches;
inline void reset_pipeline() {
  open_batch.clear();
  committed_batches.clear();
}
}  // namespace emu

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill = 0) {
  if (bytes != 4 && bytes != 8 && bytes != 16) emu_fail("__pipeline_memcpy_async size not 4, 8 or 16");
  if (zfill != 0) emu_fail("__pipeline_memcpy_async zero fill is not emulated");
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (d % bytes != 0 || s % bytes != 0) emu_fail("__pipeline_memcpy_async address not aligned to its size");
  const auto a = reinterpret_cast<uintptr_t>(emu::block->arena);
  if (d < a || d + bytes > a + emu::kArenaBytes) emu_fail("__pipeline_memcpy_async destination not in shared memory");
  if (s >= a && s < a + emu::kArenaBytes) emu_fail("__pipeline_memcpy_async source in shared memory");
  emu::open_batch.push_back({dst, src, bytes});
}
inline void __pipeline_commit() {
  emu::committed_batches.push_back(std::move(emu::open_batch));
  emu::open_batch.clear();
}
inline void __pipeline_wait_prior(size_t n) {
  while (emu::committed_batches.size() > n) {
    for (const auto& c : emu::committed_batches.front()) std::memcpy(c.dst, c.src, c.bytes);
    emu::committed_batches.pop_front();
  }
}

template <typename F>
void emu_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, const void* fn, F&& kernel) {
  if (block.y != 1 || block.z != 1 || grid.z != 1) emu_fail("only 1-D blocks and 2-D grids are emulated");
  {
    std::lock_guard<std::mutex> lk(emu::attr_mutex);
    const auto it = emu::max_dynamic_smem.find(fn);
    const size_t allowed = it != emu::max_dynamic_smem.end() ? static_cast<size_t>(it->second) : emu::kStaticLimit;
    if (smem > allowed) emu_fail("dynamic shared memory above the kernel's MaxDynamicSharedMemorySize");
  }
  emu::dynamic_bytes = smem;
  const unsigned nt = block.x;
  if (nt == 0 || nt > 1024 || grid.x == 0 || grid.y == 0 || grid.y > 65535u)
    emu_fail("bad launch configuration");
  blockDim = block;
  gridDim = grid;
  auto* blk = new emu::Block;
  emu::Barrier bar(static_cast<int>(nt));
  std::barrier<> start(nt), end(nt);
  blk->bar = &bar;
  for (unsigned w = 0; w < (nt + 31) / 32; ++w)
    blk->warp_bars.push_back(new emu::Barrier(static_cast<int>(std::min(32u, nt - 32 * w))));
  std::vector<float> slots((nt + 31) / 32 * 32);
  blk->warp_slots = slots.data();
  std::vector<uint64_t> words(slots.size());
  blk->warp_words = words.data();
  emu::block = blk;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < nt; ++t)
    ts.emplace_back([&, t] {
      threadIdx = dim3(t);
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          if (t == 0) {
            emu::poison(blk->arena, emu::kArenaBytes);
            bar.reset();
            for (auto* w : blk->warp_bars) w->reset();
          }
          start.arrive_and_wait();
          blockIdx = dim3(bx, by);
          emu::shared_used = 0;
          emu::static_used = 0;
          emu::reset_pipeline();
          kernel();
          bar.finish();
          blk->warp_bars[t / 32]->finish();
          end.arrive_and_wait();
        }
    });
  for (auto& t : ts) t.join();
  for (auto* w : blk->warp_bars) delete w;
  delete blk;
}

// ---- device helpers of cuda/common/cuda_utils.cuh ---------------------------------------------
namespace latentmoe::cuda {
inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }
template <typename T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> inline __half from_float<__half>(float v) { return __float2half(v); }

// The xor butterfly of cuda_utils.cuh (v += shfl_xor(v, o), o = 16..1), every lane's value
// computed from the 32 inputs in the same order as on the GPU.
inline float warp_butterfly(float v, bool is_max) {
  if (blockDim.x % 32 != 0) emu_fail("warp shuffle in a partial warp");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* slots = emu::block->warp_slots + warp * 32;
  slots[lane] = v;
  emu::block->warp_bars[warp]->arrive_and_wait();
  float r[32], nr[32];
  std::memcpy(r, slots, sizeof(r));
  emu::block->warp_bars[warp]->arrive_and_wait();
  for (int o = 16; o > 0; o >>= 1) {
    for (int j = 0; j < 32; ++j) nr[j] = is_max ? std::fmax(r[j], r[j ^ o]) : r[j] + r[j ^ o];
    std::memcpy(r, nr, sizeof(r));
  }
  return r[lane];
}
inline float warp_sum(float v) { return warp_butterfly(v, false); }
inline float warp_max(float v) { return warp_butterfly(v, true); }
}  // namespace latentmoe::cuda

// Warp intrinsics (full warps only): __shfl_xor_sync exchanges through the warp's word slots
// between two warp barriers; __syncwarp is a warp barrier.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a small value");
  if (mask != 0xffffffffu || blockDim.x % 32 != 0) emu_fail("__shfl_xor_sync: only full warps are emulated");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t* w = emu::block->warp_words + warp * 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w[lane] = bits;
  emu::block->warp_bars[warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, &w[lane ^ lane_mask], sizeof(T));
  emu::block->warp_bars[warp]->arrive_and_wait();
  return r;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu || blockDim.x % 32 != 0) emu_fail("__syncwarp: only full warps are emulated");
  emu::block->warp_bars[threadIdx.x >> 5]->arrive_and_wait();
}

// ---- nvcuda::wmma on whole tiles --------------------------------------------------------------
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float v[rows * cols];  // logical [rows][cols]; meaningful in lane 0 only
};

inline bool lane0() { return (threadIdx.x & 31) == 0; }

// A warp-wide operation: every lane of the warp must call it with the same pointer and ldm.
inline void check_warp_uniform(const void* p, unsigned ldm) {
  if (blockDim.x % 32 != 0) emu_fail("wmma in a partial warp");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t* w = emu::block->warp_words + warp * 32;
  w[lane] = reinterpret_cast<uintptr_t>(p) ^ (static_cast<uint64_t>(ldm) << 48);
  emu::block->warp_bars[warp]->arrive_and_wait();
  for (int j = 0; j < 32; ++j)
    if (w[j] != w[lane]) emu_fail("wmma load/store with lane-dependent pointer or ldm");
  emu::block->warp_bars[warp]->arrive_and_wait();
}

template <typename T>
void check_ptr(const T* p, unsigned ldm) {
  check_warp_uniform(p, ldm);
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu_fail("wmma pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu_fail("wmma ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (auto& x : f.v) x = v;
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same_v<std::remove_cv_t<P>, T>, "wmma load of another element type");
  check_ptr(p, ldm);
  if (!lane0()) return;
  using Fr = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < Fr::rows; ++r)
    for (int c = 0; c < Fr::cols; ++c) {
      const P& x = std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r];
      f.v[r * Fr::cols + c] = latentmoe::cuda::to_float(x);
    }
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!lane0()) return;
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.v[i * N + j];
      for (int k = 0; k < K; ++k) acc = std::fma(a.v[i * K + k], b.v[k * N + j], acc);
      out[i * N + j] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  check_ptr(p, ldm);
  if (!lane0()) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i * N + j];
}
}  // namespace nvcuda::wmma
