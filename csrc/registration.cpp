// Operator schemas of the modalmoe library. Kernels live in permute_cpu.cpp, grouped_mm.cpp,
// swiglu_cpu.cpp, topk_cpu.cpp and cuda/permute_binding.cpp; fake (meta) kernels and autograd are
// registered from modalmoe/ops.py.
#include <torch/library.h>

#include "permute.h"

#ifdef TORCH_EXTENSION_NAME
// Built by setup.py as the Python module modalmoe._C: importing it runs the static registrations.
#include <Python.h>

static PyObject* set_streaming_min_bytes(PyObject* /*self*/, PyObject* args) {
  long long bytes = 0;
  if (!PyArg_ParseTuple(args, "L", &bytes)) return nullptr;
  return PyLong_FromLongLong(modalmoe::set_streaming_min_bytes(bytes));
}

static PyMethodDef methods[] = {
    {"set_streaming_min_bytes", set_streaming_min_bytes, METH_VARARGS,
     "CPU ops reading + writing at least this many bytes store non-temporally (< 0: the last-level "
     "cache size); returns the previous setting."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C() {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "modalmoe custom ops", -1, methods};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(modalmoe, m) {
  m.set_python_module("modalmoe.ops.registration");
  m.def(
      "build_plan(Tensor topk_idx, int num_experts, int pad_multiple, int capacity) -> "
      "(Tensor counts, Tensor padded_counts, Tensor offsets, Tensor row_of, Tensor src_slot, "
      "Tensor dropped)");
  m.def(
      "permute_rows(Tensor x, Tensor topk_idx, int num_experts, int pad_multiple, int capacity) -> "
      "(Tensor x_perm, Tensor counts, Tensor padded_counts, Tensor offsets, Tensor row_of, "
      "Tensor src_slot, Tensor dropped)");
  m.def("gather_rows(Tensor x, Tensor src_slot, Tensor row_of, Tensor? weights) -> Tensor");
  m.def("combine_rows(Tensor y_perm, Tensor row_of, Tensor src_slot, Tensor? weights) -> Tensor");
  m.def("slot_dot(Tensor tokens, Tensor rows, Tensor row_of, ScalarType dtype) -> Tensor");
  m.def(
      "combine_rows_backward(Tensor grad, Tensor y_perm, Tensor row_of, Tensor src_slot, Tensor weights) -> "
      "(Tensor grad_y_perm, Tensor grad_weights)");
  m.def("grouped_mm(Tensor x, Tensor w, int[] offsets) -> Tensor");
  m.def("grouped_mm_weight_grad(Tensor x, Tensor grad, int[] offsets) -> Tensor");
  m.def("grouped_mm_weight_grad_out(Tensor x, Tensor grad, int[] offsets, Tensor(a!) out) -> ()");
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor");
  m.def("top_k_rows(Tensor scores, int k) -> Tensor");
}
