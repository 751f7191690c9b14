// Operator schemas of the modalmoe library. Kernels live in permute_cpu.cpp, grouped_mm.cpp and
// cuda/permute_binding.cpp; fake (meta) kernels and autograd are registered from modalmoe/ops.py.
#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME
// Built by setup.py as the Python module modalmoe._C: importing it runs the static registrations.
#include <Python.h>

extern "C" PyObject* PyInit__C() {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "modalmoe custom ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(modalmoe, m) {
  m.set_python_module("modalmoe.ops");
  m.def(
      "build_plan(Tensor topk_idx, int num_experts, int pad_multiple, int capacity) -> "
      "(Tensor counts, Tensor padded_counts, Tensor offsets, Tensor row_of, Tensor src_slot, "
      "Tensor dropped)");
  m.def("gather_rows(Tensor x, Tensor src_slot, Tensor row_of, Tensor? weights) -> Tensor");
  m.def("combine_rows(Tensor y_perm, Tensor row_of, Tensor src_slot, Tensor? weights) -> Tensor");
  m.def("slot_dot(Tensor tokens, Tensor rows, Tensor row_of, ScalarType dtype) -> Tensor");
  m.def("grouped_mm(Tensor x, Tensor w, int[] offsets) -> Tensor");
  m.def("grouped_mm_weight_grad(Tensor x, Tensor grad, int[] offsets) -> Tensor");
}
