// Registers the compiled MSDeformAttn kernels as the operators
// torch.ops.detr_plus_C.msda_forward / msda_backward (CPU here, CUDA in
// cuda/msda_cuda.cu) and gives the Python module `projects_detr_plus.ops._C`
// a couple of introspection helpers. The public, autograd- and
// torch.compile-aware op is defined in Python (projects_detr_plus/ops/msda.py)
// on top of these.
#include <torch/extension.h>
#include <torch/library.h>

#include "msda.h"

TORCH_LIBRARY(detr_plus_C, m) {
  m.def(
      "msda_forward(Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "msda_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(detr_plus_C, CPU, m) {
  m.impl("msda_forward", &detr_plus::msda_forward_cpu);
  m.impl("msda_backward", &detr_plus::msda_backward_cpu);
}

namespace {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DETR+ compiled multi-scale deformable attention kernels";
  m.def("has_cuda", &has_cuda,
        "Whether the CUDA kernels were compiled into this extension");
  m.def("cpu_isa", &detr_plus::msda_cpu_isa,
        "SIMD variant of the CPU kernel used on this machine");
}
