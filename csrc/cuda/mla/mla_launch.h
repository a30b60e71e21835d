// Launchers of the MLA CUDA kernels: raw pointers and a dtype tag, no torch types, so the .cu
// file compiles without torch headers. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace latentmoe::cuda {

// Shapes and pointers of one mla_decode call (see the schema in csrc/ops.cpp).
struct MlaDecodeArgs {
  const void* q_latent;       // [B, Sq, H, C]
  const void* q_pe;           // [B, Sq, H, R]
  const void* kv_cache;       // [B, lmax, C+R] or [num_pages, page_size, C+R] (rows of kv_stride)
  const void* pe_src;         // k_pe of row 0: kv_cache + C, or a separate pe_cache
  int64_t kv_stride, pe_stride;  // values per cache row of the c_kv and k_pe sources
  const int32_t* seqlens;     // [B]
  const int32_t* block_table; // [B, max_pages] or null
  void* out;                  // [B, Sq, H, C]
  float* lse;                 // [B, Sq, H]
  float* part_acc;            // workspace [B, n_splits, Sq*H, C]
  float* part_m;              // workspace [B, n_splits, Sq*H]
  float* part_l;              // workspace [B, n_splits, Sq*H]
  int64_t B, Sq, H, C, R;
  int64_t lmax, page_size, max_pages, num_pages, capacity;
  int64_t max_seqlen;         // >= every cache_seqlens entry (host-known): the splits cover [0, max_seqlen)
  float scale;
  bool causal;
  int64_t window;
  int64_t n_splits;
  bool stage_async;           // set by launch_mla_decode: cache rows come in by async 16-byte copies
  int kernel;                 // MlaDecodeKernel: which split kernel (kDecodeAuto picks)
};

// Split kernels of mla_decode. kDecodeAuto: the tensor-core kernel where it applies (bf16 / fp16, C and
// R multiples of 8, C <= 512, 16-byte aligned rows, an sm_80+ device), else the CUDA-core one.
// kDecodeCudaCores / kDecodeTensorCores force one (tests; LATENTMOE_MLA_DECODE_KERNEL=cuda_cores|tensor_cores in
// the binding); forcing tensor cores where they do not apply is cudaErrorInvalidValue.
enum MlaDecodeKernel : int { kDecodeAuto = 0, kDecodeCudaCores = 1, kDecodeTensorCores = 2 };

// Whether the tensor-core split kernel can run this call (dtype, shapes, alignment, device).
bool mla_decode_tensor_cores_apply(DType dtype, const MlaDecodeArgs& a);

// Number of key splits (blocks along the sequence, at most 1024) for the call `a` describes (its
// shapes, max_seqlen, pointers and kernel choice: the split kernel that will run sets the rows per
// block, and about one wave of blocks is the aim); the caller sizes the workspace and sets
// a.n_splits to it.
int64_t mla_decode_num_splits(DType dtype, const MlaDecodeArgs& a, int sm_count);

// Dynamic shared memory one split block needs for latent rank C and rope dim R (bytes).
size_t mla_decode_smem_bytes(int64_t C, int64_t R);

// Query rows (s, h) one split block handles: 16 for C <= 512, else 8.
int mla_decode_rows_per_block(int64_t C);

// Batch rows one mla_decode call takes (they run on grid z).
constexpr int64_t kMlaDecodeMaxBatch = 65535;

// Largest kv_lora_rank C the kernel supports (accumulator registers per thread).
int64_t mla_decode_max_c();

cudaError_t launch_mla_decode(DType dtype, const MlaDecodeArgs& a, cudaStream_t stream);

// Fused kv_a_layernorm + RoPE(k_pe) + cache write; one block per new token.
struct MlaAppendArgs {
  void* kv_cache;
  const void* kv_latent;  // [B, S, C], token (b, s)'s row at b * latent_sb + s * latent_ss
  const void* k_pe;       // [B, S, R], token (b, s)'s row at b * pe_sb + s * pe_ss
  const void* norm_weight;  // [C]
  const void* cos;        // [B, S, R]
  const void* sin;        // [B, S, R]
  const int32_t* seqlens;  // [B] tokens already cached
  const int32_t* block_table;  // [B, max_pages] or null
  int64_t B, S, C, R;
  int64_t latent_sb, latent_ss, pe_sb, pe_ss;  // element strides (rows themselves unit-stride)
  int64_t lmax, page_size, max_pages, num_pages, capacity;
  float eps;
  bool interleave;
};

cudaError_t launch_mla_append_cache(DType dtype, const MlaAppendArgs& a, cudaStream_t stream);

// mla_decode_absorbed's query rotation: out [B, S, H, R] (contiguous) = RoPE of q [B, S, H, N + R]'s
// last R values (contiguous q) with cos / sin rows [B or 1, S, R] (cs_batch: one per batch row),
// HF's rotate_half or interleaved pairing; fp32 math, rounded once to the dtype.
cudaError_t launch_mla_rope_queries(DType dtype, const void* q, const void* cos, const void* sin, bool cs_batch,
                                    int64_t B, int64_t S, int64_t H, int64_t N, int64_t R, bool interleave,
                                    void* out, cudaStream_t stream);

}  // namespace latentmoe::cuda
