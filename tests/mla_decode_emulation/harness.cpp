// Runs the MLA decode / append CUDA launchers (csrc/cuda/mla/mla_kernels.cu, host-emulated by
// emu.h) on inputs from a file. Driven by tests/test_mla_cuda_emulation.py.
//
//   harness decode IN OUT ORDER   ORDER: threads of a block run between barriers in order
//                                 0 forward, 1 reverse, n > 1 random with seed n
//   harness append IN OUT ORDER
//   harness convert IN OUT 0      fp32 values -> bf16 bits, fp16 bits, and both back to fp32
//   harness selftest divergent|early_exit|race|shuffle|too_much_smem|big_grid
//
// decode IN: int64 [dtype, B, Sq, H, C, R, paged, lmax_or_page_size, num_pages, max_pages, causal,
//   window, split_pe, sm_count, n_splits_override, max_seqlen (-1: checked call), kernel (MlaDecodeKernel)],
//   float scale, then
//   q_latent, q_pe, kv_cache,
//   pe_cache (if split_pe), int32 seqlens [B], int32 block_table [B, max_pages] (if paged).
//   Element arrays are raw dtype bytes (dtype 0 fp32, 1 bf16, 2 fp16, as common/dtype.h).
// decode OUT: int64 n_splits, out [B, Sq, H, C] (dtype bytes), lse [B, Sq, H] fp32.
// append IN: int64 [dtype, B, S, C, R, paged, lmax_or_page_size, num_pages, max_pages, interleave,
//   latent_sb, latent_ss, pe_sb, pe_ss], float eps, then kv_cache, kv_latent and k_pe (each the span
//   its strides reach: (B - 1) sb + (S - 1) ss + row elements), norm_weight, cos, sin, int32 seqlens,
//   int32 table.
// append OUT: the whole kv_cache after the call.
// Each launch prints "launch gx gy gz threads dyn_smem static_smem" on stdout.
//
// The workspace sizing and argument packing below mirror csrc/cuda/mla/mla_binding.cpp (a torch
// file this harness cannot compile); the split count comes from the real mla_decode_num_splits.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fstream>
#include <memory>

#include "emu.h"
#include "mla_kernels_host.inc"  // csrc/cuda/mla/mla_kernels.cu after the three rewrites

using namespace latentmoe;
using namespace latentmoe::cuda;

namespace {

std::ifstream in_file;

// Every buffer a kernel sees ends flush against an inaccessible page (and starts less than a page
// after another), so an access past either end faults; the SIGSEGV handler names it.
template <typename V>
class Guarded {
 public:
  explicit Guarded(size_t n, unsigned char fill) : n_(n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t body = (n * sizeof(V) + page - 1) / page * page;
    total_ = body + 2 * page;
    base_ =
        static_cast<unsigned char*>(mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) emu::fail("mmap");
    mprotect(base_, page, PROT_NONE);
    mprotect(base_ + page + body, page, PROT_NONE);
    p_ = reinterpret_cast<V*>(base_ + page + body - n * sizeof(V));
    std::memset(p_, fill, n * sizeof(V));
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  ~Guarded() { munmap(base_, total_); }
  V* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  size_t n_, total_;
  unsigned char* base_;
  V* p_;
};

template <typename V>
std::unique_ptr<Guarded<V>> read_vec(size_t n) {
  auto v = std::make_unique<Guarded<V>>(n, 0);
  in_file.read(reinterpret_cast<char*>(v->data()), static_cast<std::streamsize>(n * sizeof(V)));
  if (!in_file) emu::fail("short input file");
  return v;
}
std::unique_ptr<Guarded<unsigned char>> read_bytes(size_t n) { return read_vec<unsigned char>(n); }

template <typename V>
std::unique_ptr<Guarded<V>> poisoned(size_t n) {
  return std::make_unique<Guarded<V>>(n, 0xFF);
}  // NaN

void on_segv(int) {
  const char msg[] = "emulation error: out-of-bounds memory access (guard page)\n";
  if (write(2, msg, sizeof msg - 1) < 0) {
  }
  _Exit(5);
}

void print_log() {
  for (const auto& r : emu::st().log) {
    std::printf("launch %u %u %u %u %zu %zu\n", r.grid.x, r.grid.y, r.grid.z, r.block.x * r.block.y * r.block.z,
                r.dyn_smem, r.static_smem);
  }
}

int run_decode(const char* out_path) {
  int64_t h[17];
  in_file.read(reinterpret_cast<char*>(h), sizeof h);
  float scale;
  in_file.read(reinterpret_cast<char*>(&scale), sizeof scale);
  const auto dtype = static_cast<DType>(h[0]);
  const size_t es = h[0] == 0 ? 4 : 2;
  const int64_t B = h[1], Sq = h[2], H = h[3], C = h[4], R = h[5];
  const bool paged = h[6] != 0, split = h[12] != 0;
  const int64_t num_pages = h[8], max_pages = h[9];
  const int64_t lmax = paged ? 0 : h[7], page_size = paged ? h[7] : 0;
  const int64_t cache_rows = paged ? num_pages * page_size : B * lmax;
  const int64_t capacity = paged ? max_pages * page_size : lmax;
  const int64_t rows = Sq * H;
  auto q_latent = read_bytes(B * rows * C * es);
  auto q_pe = read_bytes(B * rows * R * es);
  auto kv = read_bytes(cache_rows * (split ? C : C + R) * es);
  auto pe = read_bytes(split ? cache_rows * R * es : 0);
  auto lens = read_vec<int32_t>(B);
  auto table = read_vec<int32_t>(paged ? B * max_pages : 0);

  // As the binding: the caller's max_seqlen (h[15] >= 0: unchecked call), else the longest row
  // from the host copy of cache_seqlens.
  int64_t max_seqlen = h[15];
  if (max_seqlen < 0) {
    max_seqlen = 0;
    for (int64_t b = 0; b < B; ++b) max_seqlen = std::max<int64_t>(max_seqlen, lens->data()[b]);
  }
  auto out = poisoned<unsigned char>(B * rows * C * es);
  auto lse = poisoned<float>(B * rows);
  if (mla_decode_smem_bytes(C, R) > emu::kSmemOptin) emu::fail("binding would reject: shared memory");
  if (C > mla_decode_max_c()) emu::fail("binding would reject: C too large");

  MlaDecodeArgs a{};
  a.q_latent = q_latent->data();
  a.q_pe = q_pe->data();
  a.kv_cache = kv->data();
  a.pe_src = split ? static_cast<const void*>(pe->data()) : static_cast<const void*>(kv->data() + C * es);
  a.kv_stride = split ? C : C + R;
  a.pe_stride = split ? R : C + R;
  a.seqlens = lens->data();
  a.block_table = paged ? table->data() : nullptr;
  a.out = out->data();
  a.lse = lse->data();
  a.B = B;
  a.Sq = Sq;
  a.H = H;
  a.C = C;
  a.R = R;
  a.lmax = lmax;
  a.page_size = page_size;
  a.max_pages = max_pages;
  a.num_pages = num_pages;
  a.capacity = capacity;
  a.max_seqlen = max_seqlen;
  a.scale = scale;
  a.causal = h[10] != 0;
  a.window = h[11];
  a.kernel = static_cast<int>(h[16]);
  // As the binding: the split count of the kernel that will run (or the test's override), then a
  // workspace of that size (left as garbage there: NaN here, so a partial the merge reads but no
  // split wrote shows up). No workspace for a single split (it writes out / lse itself), so any
  // access to one faults.
  const int64_t n_splits = h[14] > 0 ? h[14] : mla_decode_num_splits(dtype, a, static_cast<int>(h[13]));
  auto part_acc = poisoned<float>(B * n_splits * rows * C);
  auto part_m = poisoned<float>(B * n_splits * rows);
  auto part_l = poisoned<float>(B * n_splits * rows);
  a.part_acc = n_splits > 1 ? part_acc->data() : nullptr;
  a.part_m = n_splits > 1 ? part_m->data() : nullptr;
  a.part_l = n_splits > 1 ? part_l->data() : nullptr;
  a.n_splits = n_splits;
  const cudaError_t err = launch_mla_decode(dtype, a, nullptr);
  print_log();
  if (err != cudaSuccess) {
    std::fprintf(stderr, "launch_mla_decode returned %d\n", static_cast<int>(err));
    return 4;
  }
  std::ofstream o(out_path, std::ios::binary);
  o.write(reinterpret_cast<const char*>(&n_splits), sizeof n_splits);
  o.write(reinterpret_cast<const char*>(out->data()), static_cast<std::streamsize>(out->size()));
  o.write(reinterpret_cast<const char*>(lse->data()), static_cast<std::streamsize>(lse->size() * 4));
  return 0;
}

int run_append(const char* out_path) {
  int64_t h[14];
  in_file.read(reinterpret_cast<char*>(h), sizeof h);
  float eps;
  in_file.read(reinterpret_cast<char*>(&eps), sizeof eps);
  const auto dtype = static_cast<DType>(h[0]);
  const size_t es = h[0] == 0 ? 4 : 2;
  const int64_t B = h[1], S = h[2], C = h[3], R = h[4];
  const bool paged = h[5] != 0;
  const int64_t num_pages = h[7], max_pages = h[8];
  const int64_t lmax = paged ? 0 : h[6], page_size = paged ? h[6] : 0;
  const int64_t cache_rows = paged ? num_pages * page_size : B * lmax;
  auto cache = read_bytes(cache_rows * (C + R) * es);
  const int64_t latent_sb = h[10], latent_ss = h[11], pe_sb = h[12], pe_ss = h[13];
  auto latent = read_bytes(((B - 1) * latent_sb + (S - 1) * latent_ss + C) * es);
  auto k_pe = read_bytes(((B - 1) * pe_sb + (S - 1) * pe_ss + R) * es);
  auto w = read_bytes(C * es);
  auto cs = read_bytes(B * S * R * es);
  auto sn = read_bytes(B * S * R * es);
  auto lens = read_vec<int32_t>(B);
  auto table = read_vec<int32_t>(paged ? B * max_pages : 0);
  MlaAppendArgs a{};
  a.kv_cache = cache->data();
  a.kv_latent = latent->data();
  a.k_pe = k_pe->data();
  a.norm_weight = w->data();
  a.cos = cs->data();
  a.sin = sn->data();
  a.seqlens = lens->data();
  a.block_table = paged ? table->data() : nullptr;
  a.B = B;
  a.S = S;
  a.C = C;
  a.R = R;
  a.latent_sb = latent_sb;
  a.latent_ss = latent_ss;
  a.pe_sb = pe_sb;
  a.pe_ss = pe_ss;
  a.lmax = lmax;
  a.page_size = page_size;
  a.max_pages = max_pages;
  a.num_pages = num_pages;
  a.capacity = paged ? max_pages * page_size : lmax;
  a.eps = eps;
  a.interleave = h[9] != 0;
  const cudaError_t err = launch_mla_append_cache(dtype, a, nullptr);
  print_log();
  if (err != cudaSuccess) {
    std::fprintf(stderr, "launch_mla_append_cache returned %d\n", static_cast<int>(err));
    return 4;
  }
  std::ofstream o(out_path, std::ios::binary);
  o.write(reinterpret_cast<const char*>(cache->data()), static_cast<std::streamsize>(cache->size()));
  return 0;
}

// Kernels with the defects the emulation must report (checked by the test, so a broken emu.h
// cannot pass silently).
void bad_divergent_sync(int* flag) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  *flag = 1;
}
void bad_early_exit(int* flag) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  *flag = 1;
}
void racy_smem(float* out) {  // thread t reads what thread t ^ 1 wrote, with no barrier between
  float* s = ::emu::dyn_smem<float>();
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[threadIdx.x ^ 1u];
}
void shuffle_sum(float* out) { out[threadIdx.x] = warp_sum(static_cast<float>(threadIdx.x % 32)); }

int run_selftest(const std::string& which) {
  int flag = 0;
  std::vector<float> out(64, 0.f);
  if (which == "divergent") ::emu::launch(bad_divergent_sync, dim3(1), dim3(64), 0, nullptr, &flag);
  if (which == "early_exit") ::emu::launch(bad_early_exit, dim3(1), dim3(64), 0, nullptr, &flag);
  if (which == "race") ::emu::launch(racy_smem, dim3(1), dim3(64), 64 * 4, nullptr, out.data());
  if (which == "shuffle") ::emu::launch(shuffle_sum, dim3(1), dim3(64), 0, nullptr, out.data());
  if (which == "too_much_smem") ::emu::launch(racy_smem, dim3(1), dim3(64), 64 * 1024, nullptr, out.data());
  if (which == "big_grid") ::emu::launch(racy_smem, dim3(1, 70000), dim3(64), 256, nullptr, out.data());
  const cudaError_t err = cudaGetLastError();
  for (float v : out) std::printf("%g ", v);
  std::printf("\nerr %d\n", static_cast<int>(err));
  return 0;
}

// The bf16 / fp16 stand-ins: float -> bits (both types), then bits -> float.
int run_convert(const char* in_path, const char* out_path) {
  std::ifstream f(in_path, std::ios::binary | std::ios::ate);
  const size_t n = static_cast<size_t>(f.tellg()) / 4;
  f.seekg(0);
  std::vector<float> x(n);
  f.read(reinterpret_cast<char*>(x.data()), static_cast<std::streamsize>(n * 4));
  std::vector<uint16_t> hb(n), hh(n);
  std::vector<float> back_b(n), back_h(n);
  for (size_t i = 0; i < n; ++i) {
    const __nv_bfloat16 b = __float2bfloat16(x[i]);
    const __half h = __float2half(x[i]);
    hb[i] = b.bits;
    hh[i] = h.bits;
    back_b[i] = __bfloat162float(b);
    back_h[i] = __half2float(h);
  }
  std::ofstream o(out_path, std::ios::binary);
  o.write(reinterpret_cast<const char*>(hb.data()), static_cast<std::streamsize>(n * 2));
  o.write(reinterpret_cast<const char*>(hh.data()), static_cast<std::streamsize>(n * 2));
  o.write(reinterpret_cast<const char*>(back_b.data()), static_cast<std::streamsize>(n * 4));
  o.write(reinterpret_cast<const char*>(back_h.data()), static_cast<std::streamsize>(n * 4));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "selftest") return run_selftest(argv[2]);
  if (argc != 5) {
    std::fprintf(stderr, "usage: harness decode|append IN OUT ORDER\n");
    return 2;
  }
  in_file.open(argv[2], std::ios::binary);
  if (!in_file) emu::fail("cannot open input");
  emu::st().order = static_cast<unsigned>(std::atoi(argv[4]));
  emu::st().rng.seed(emu::st().order);
  signal(SIGSEGV, on_segv);
  const std::string mode = argv[1];
  if (mode == "decode") return run_decode(argv[3]);
  if (mode == "append") return run_append(argv[3]);
  if (mode == "convert") return run_convert(argv[2], argv[3]);
  std::fprintf(stderr, "unknown mode %s\n", argv[1]);
  return 2;
}
