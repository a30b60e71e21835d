// The Python module latentmoe._C: importing it loads this library, which registers the ops with
// the dispatcher. It also records what it was built for, so latentmoe can refuse to run against
// another torch instead of failing on an undefined symbol.
#include <Python.h>

#include <exception>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifndef LATENTMOE_WITH_CUDA
#define LATENTMOE_WITH_CUDA 0
#endif

#include "common/settings.h"

// Takes a new snapshot of the LATENTMOE_* environment variables (see common/settings.h).
static PyObject* reload_settings(PyObject*, PyObject*) {
  latentmoe::settings::reload();
  Py_RETURN_NONE;
}

namespace latentmoe::cpu {
const char* active_cpu_isa();  // csrc/cpu/linear.cpp
bool bf16dp_active();          // csrc/cpu/moe.cpp
bool f32_gemm_preferred();     // csrc/cpu/linear_f32.cpp
}

static PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(latentmoe::cpu::active_cpu_isa()); }

static PyObject* cpu_bf16dp(PyObject*, PyObject*) { return PyBool_FromLong(latentmoe::cpu::bf16dp_active()); }

static PyObject* cpu_f32_gemm(PyObject*, PyObject*) {
  try {
    return PyBool_FromLong(latentmoe::cpu::f32_gemm_preferred());
  } catch (const c10::Error& e) {  // the message without the C++ backtrace
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// collapse_huge_pages(address, nbytes) -> the bytes of [address, address + nbytes) now on 2 MiB
// transparent huge pages: madvise(MADV_COLLAPSE) of the range's 2 MiB-aligned part, which keeps
// the data (the pages are copied into huge ones; Linux 6.1 on). 0 where no aligned 2 MiB fits;
// OSError with the kernel's errno where it refuses (no MADV_COLLAPSE, THP off, no huge page free).
static PyObject* collapse_huge_pages(PyObject*, PyObject* args) {
  unsigned long long address = 0, nbytes = 0;
  if (!PyArg_ParseTuple(args, "KK", &address, &nbytes)) return nullptr;
#if defined(__linux__)
  constexpr unsigned long long kHuge = 2ull << 20;
  const unsigned long long b = (address + kHuge - 1) & ~(kHuge - 1);
  const unsigned long long e = (address + nbytes) & ~(kHuge - 1);
  if (e <= b) return PyLong_FromUnsignedLongLong(0);
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
  int rc = 0;
  Py_BEGIN_ALLOW_THREADS  // copies the range's pages: ~1 ms per MiB
  rc = madvise(reinterpret_cast<void*>(b), static_cast<size_t>(e - b), MADV_COLLAPSE);
  Py_END_ALLOW_THREADS
  if (rc != 0) return PyErr_SetFromErrno(PyExc_OSError);
  return PyLong_FromUnsignedLongLong(e - b);
#else
  (void)address;
  (void)nbytes;
  PyErr_SetString(PyExc_OSError, "transparent huge pages need Linux");
  return nullptr;
#endif
}

static PyMethodDef latentmoe_methods[] = {
    {"collapse_huge_pages", collapse_huge_pages, METH_VARARGS,
     "collapse_huge_pages(address, nbytes): madvise(MADV_COLLAPSE) on the range's 2 MiB-aligned part; "
     "returns its bytes (OSError where the kernel refuses)."},
    {"reload_settings", reload_settings, METH_NOARGS, "Re-read the LATENTMOE_* environment variables."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The CPU micro-kernels' instantiation in use: 'avx2' or 'generic'."},
    {"cpu_bf16dp", cpu_bf16dp, METH_NOARGS,
     "Whether bf16 MoE experts run the AVX512_BF16 GEMMs (the CPU has them and LATENTMOE_CPU_ISA allows)."},
    {"cpu_f32_gemm", cpu_f32_gemm, METH_NOARGS,
     "Whether the modules' large fp32 CPU projections run linear_f32 (LATENTMOE_CPU_F32_GEMM; auto: AMD "
     "CPUs with AVX-512, where ATen's MKL sgemm runs AVX2 code)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef latentmoe_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "latentmoe compiled kernels", -1, latentmoe_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&latentmoe_module);
  if (m == nullptr) return nullptr;
  // The settings' snapshot now, while the import holds the GIL: taken at the first op call it
  // would run getenv with the GIL released, racing another thread's os.environ assignment.
  latentmoe::settings::current();
  PyModule_AddStringConstant(m, "torch_version", LATENTMOE_TORCH_VERSION);
  PyModule_AddIntConstant(m, "with_cuda", LATENTMOE_WITH_CUDA);
  PyModule_AddStringConstant(m, "cuda_archs", LATENTMOE_CUDA_ARCHS);
  PyModule_AddStringConstant(m, "cuda_version", LATENTMOE_CUDA_VERSION);
  return m;
}
