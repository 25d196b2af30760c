// Torch glue of the CUDA frames_to_tensor: validates, builds the resampling plans on the host
// (the same plans as the CPU path, uploaded in one copy), allocates output and scratch, launches.
// Compiled only in CUDA builds (setup.py defines PLLAVA_FAST_WITH_CUDA).
#ifdef PLLAVA_FAST_WITH_CUDA

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "frames.h"
#include "frames_kernel.h"

namespace pllava_fast {

at::Tensor frames_to_tensor_cuda(const FramesCall& call) {
  const at::Tensor& fr = call.planes.y;
  TORCH_CHECK(fr.is_cuda(), "frames_to_tensor_cuda: frames must be a CUDA tensor, got ",
              fr.device());
  const c10::cuda::CUDAGuard guard(fr.device());
  const Geometry& g = call.g;
  const bool yuv = call.yuv;
  const int T = call.T, H = call.H, W = call.W;
  const FramePlans fp = make_frame_plans(H, W, g, /*ksize_multiple=*/1);

  // Pack the four plans into one int32 buffer -> one host-to-device copy.
  const AxisPlan* plans[4] = {&fp.h1, &fp.v1, &fp.h2, &fp.v2};
  std::vector<int32_t> packed;
  size_t offsets[4][3];
  for (int i = 0; i < 4; ++i) {
    offsets[i][0] = packed.size();
    packed.insert(packed.end(), plans[i]->xmin.begin(), plans[i]->xmin.end());
    offsets[i][1] = packed.size();
    packed.insert(packed.end(), plans[i]->count.begin(), plans[i]->count.end());
    offsets[i][2] = packed.size();
    packed.insert(packed.end(), plans[i]->k.begin(), plans[i]->k.end());
  }
  auto host = at::from_blob(packed.data(), {(int64_t)packed.size()}, at::kInt).pin_memory();
  auto dev = host.to(fr.device(), /*non_blocking=*/true);
  const int32_t* base = dev.data_ptr<int32_t>();
  cuda::DevicePlan dp[4];
  for (int i = 0; i < 4; ++i) {
    dp[i] = {plans[i]->in_start, plans[i]->in_len, plans[i]->n, plans[i]->ksize,
             base + offsets[i][0], base + offsets[i][1], base + offsets[i][2]};
  }

  cuda::Normalize norm;
  for (int c = 0; c < 3; ++c) {
    norm.mean[c] = call.mean[c];
    norm.std[c] = call.std[c];
  }
  const at::ScalarType dtype = call.dtype;
  const int out_dtype = dtype == at::kHalf       ? cuda::kOutFloat16
                        : dtype == at::kBFloat16 ? cuda::kOutBFloat16
                                                 : cuda::kOutFloat32;
  auto out = at::empty({T, 3, g.out, g.out}, fr.options().dtype(dtype));
  auto workspace = at::empty(
      {(int64_t)cuda::frames_workspace_bytes(T, dp[0], dp[1], dp[2], dp[3])},
      fr.options().dtype(at::kByte));
  const cudaError_t err = cuda::launch_frames_to_tensor(
      yuv ? nullptr : fr.data_ptr<uint8_t>(), yuv ? fr.data_ptr<uint8_t>() : nullptr,
      yuv ? call.planes.u.data_ptr<uint8_t>() : nullptr,
      yuv ? call.planes.v.data_ptr<uint8_t>() : nullptr, T, H, W, call.yc, dp[0], dp[1], dp[2],
      dp[3], norm, out_dtype, out.data_ptr(), workspace.data_ptr<uint8_t>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "frames_to_tensor_cuda: kernel launch failed: ",
              cudaGetErrorString(err));
  // No sync: the pinned `host` block is recorded on the stream by the caching host allocator,
  // so it is not reused before the copy has run.
  return out;
}

}  // namespace pllava_fast

#endif  // PLLAVA_FAST_WITH_CUDA
