// Python bindings of hpcomm._C: registration only.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "segment_copy.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hpcomm kernels: segment-table copies (see hpcomm/segments.py)";
  m.def("copy_segments", &hpcomm::copy_segments, "Apply a [n, 6] int64 segment table in place: dst = src or dst += src",
        pybind11::arg("src"), pybind11::arg("dst"), pybind11::arg("table"), pybind11::arg("accumulate") = false);
  m.def("is_cuda_compiled", []() {
#ifdef HPCOMM_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("compiled_backends", []() {
#ifdef HPCOMM_WITH_CUDA
    return std::vector<std::string>{"cpp", "cuda"};
#else
    return std::vector<std::string>{"cpp"};
#endif
  });
}
