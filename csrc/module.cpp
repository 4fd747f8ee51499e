// The Python module sgflow._C. Importing it loads this library, whose static initialisers register
// the sgflow:: ops with the dispatcher (sgflow_ops.cpp); the module itself only says how it was built.
#include <Python.h>

static struct PyModuleDef sgflow_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "sgflow C++/CUDA kernels; the ops are torch.ops.sgflow.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&sgflow_c_module);
  if (mod == nullptr) return nullptr;
#ifdef SGFLOW_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(mod, "with_cuda", with_cuda) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
