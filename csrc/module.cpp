// Python module entry point of musefast._C, the CPU part of the extension. The ops themselves
// are registered with TORCH_LIBRARY_FRAGMENT(musefast, ...) in their own files, so loading this
// module makes them visible as torch.ops.musefast.* (and to torch.compile). Their CUDA kernels
// are a separate library (csrc/cuda/, see musefast/_build.py) that needs this one loaded first.
#include <torch/extension.h>

#include <ATen/Parallel.h>

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(__AVX512F__)
  info["cpu_isa"] = "avx512";
#elif defined(__AVX2__)
  info["cpu_isa"] = "avx2";
#else
  info["cpu_isa"] = "baseline";
#endif
  info["parallel"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "musefast C++ kernels (ops live under torch.ops.musefast)";
  m.def("build_info", &build_info, "How this extension was compiled");
}
