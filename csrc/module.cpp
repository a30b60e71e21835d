// The Python module latentmoe._C: importing it loads this library, which registers the ops with
// the dispatcher. It also records what it was built for, so latentmoe can refuse to run against
// another torch instead of failing on an undefined symbol.
#include <Python.h>

#ifndef LATENTMOE_WITH_CUDA
#define LATENTMOE_WITH_CUDA 0
#endif

static struct PyModuleDef latentmoe_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "latentmoe compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&latentmoe_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", LATENTMOE_TORCH_VERSION);
  PyModule_AddIntConstant(m, "with_cuda", LATENTMOE_WITH_CUDA);
  PyModule_AddStringConstant(m, "cuda_archs", LATENTMOE_CUDA_ARCHS);
  PyModule_AddStringConstant(m, "cuda_version", LATENTMOE_CUDA_VERSION);
  return m;
}
