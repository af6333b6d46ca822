// Python bindings of hpcomm._C: registration only. hpcomm/segments.py prepares tables and calls these.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "segment_copy.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::arg;
  m.doc() = "hpcomm kernels: segment-table copies (see hpcomm/segments.py)";
  m.def("apply_segments_cpu", &hpcomm::apply_segments_cpu,
        "Apply a checked [n, 6] int64 segment table in place on CPU tensors: dst = src or dst += src", arg("src"),
        arg("dst"), arg("table"), arg("accumulate") = false);
  m.def("chunk_ends", &hpcomm::chunk_ends, "Inclusive prefix sums of the CUDA work items of a CPU [n, 6] table",
        arg("table"));
  m.def("copy_segments_by_items", &hpcomm::copy_segments_by_items,
        "Copy on CPU through the CUDA kernel's work items (tests the shared index arithmetic)", arg("src"),
        arg("dst"), arg("table"), arg("chunk_ends"));
#ifdef HPCOMM_WITH_CUDA
  m.def("launch_segments_cuda", &hpcomm::launch_segments_cuda,
        "Launch the CUDA segment kernel with a prepared device table and chunk_ends (no checks of rows, no sync)",
        arg("src"), arg("dst"), arg("table"), arg("chunk_ends"), arg("total_items"), arg("accumulate") = false);
#endif
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
