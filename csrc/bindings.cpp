// Python entry points of pllava_fast._C. The op schema (pllava_fast::frames_to_tensor), its fake
// and the per-device dispatch live in pllava_fast/ops/frames.py; these are the kernels it calls.
#include <optional>
#include <vector>

#include <torch/extension.h>

#include "frames.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

// pybind11 hands the list arguments over as vectors; the device entry points take the checked
// call, so both share this one front (validation, contiguous planes, normalization constants).
template <at::Tensor (*Run)(const pllava_fast::FramesCall&)>
at::Tensor frames_entry(const at::Tensor& frames, const OptTensor& u, const OptTensor& v,
                        int64_t matrix, bool full_range, const std::vector<int64_t>& geometry,
                        const std::vector<double>& mean, const std::vector<double>& std,
                        at::ScalarType dtype) {
  return Run(pllava_fast::check_frames_call(frames, u, v, matrix, full_range, geometry, mean, std,
                                            dtype));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pllava-fast C++/CUDA kernels (use them through pllava_fast.ops)";
  const char* doc =
      "frames_to_tensor(frames, u, v, matrix, full_range, geometry, mean, std, dtype): decoded "
      "frames (RGB (T,H,W,3) uint8, or a Y plane (T,H,W) with u/v planes (T,(H+1)//2,(W+1)//2)) "
      "-> (T, 3, out, out) normalized model input";
  m.def("frames_to_tensor_cpu", &frames_entry<pllava_fast::frames_to_tensor_cpu>, doc);
#ifdef PLLAVA_FAST_WITH_CUDA
  m.def("frames_to_tensor_cuda", &frames_entry<pllava_fast::frames_to_tensor_cuda>, doc);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
