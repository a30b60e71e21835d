// Transparent huge pages for the CPU kernels' large fresh buffers.
//
// A buffer over glibc's largest mmap threshold (32 MiB on 64-bit Linux) is a fresh mapping on
// every allocation, so each call that returns one pays a page fault per 4 KiB page as the kernel
// first writes it: the weight gradients of moe_experts' backward (E x 3 x I x H values: 553 MB
// in fp32 at h1024 / i704 / E = 64) took ~180 ms to allocate and touch that way, ~40 ms on 2 MiB
// pages (2 Zen 3 cores), and the whole backward 370-390 ms against 210-220 (512 tokens). Such
// buffers ask for huge pages on their 2 MiB-aligned part before anything is written: the same
// advice PyTorch's THP_MEM_ALLOC_ENABLE=1 gives every large tensor. Smaller buffers come from
// glibc's heap, reused from call to call (their pages fault once), and are left alone.
// Advice only: where the kernel has THP off or no huge page is free, the pages stay 4 KiB.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace latentmoe::cpu {

// Buffers from this size on get the advice in empty_huge.
constexpr size_t kHugePagesMinBytes = size_t{32} << 20;

// Ask for transparent huge pages (2 MiB) on the 2 MiB-aligned part of [p, p + bytes), which
// must not have been written yet to gain anything (touched pages stay as they are).
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// at::empty, with huge pages asked for when it is at least kHugePagesMinBytes (a CPU tensor the
// caller writes in full).
inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.nbytes() >= kHugePagesMinBytes) advise_huge_pages(t.mutable_data_ptr(), t.nbytes());
  return t;
}

}  // namespace latentmoe::cpu
