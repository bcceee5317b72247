// Torch glue of the CUDA vq_nearest kernels (csrc/cuda/vq.cu): checks, contiguity, the
// current stream, dtype dispatch and the fp32 codebook norms. Built only against a CUDA
// build of torch; the op itself is defined in csrc/vq.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "vq.h"

namespace musefast {
namespace {

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.is_cuda() && codebook.is_cuda(), "vq_nearest: z and codebook must be CUDA tensors");
  TORCH_CHECK(z.device() == codebook.device(), "vq_nearest: z is on ", z.device(), " but codebook is on ",
              codebook.device());
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, "vq_nearest: z (N, D) and codebook (K, D) expected, got ",
              z.sizes(), " and ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), "vq_nearest: z's D (", z.size(1), ") != codebook's D (",
              codebook.size(1), ")");
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "vq_nearest: z and codebook dtypes differ (",
              z.scalar_type(), " vs ", codebook.scalar_type(), ")");
  TORCH_CHECK(codebook.size(0) > 0, "vq_nearest: empty codebook");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(codebook.size(0) <= kIntMax && codebook.size(1) <= kIntMax,
              "vq_nearest: codebook too large for the CUDA kernel (K and D must be < 2^31)");

  const c10::cuda::CUDAGuard guard(z.device());
  const auto zc = z.contiguous();
  const auto cbc = codebook.contiguous();
  const int64_t N = zc.size(0), D = zc.size(1), K = cbc.size(0);
  auto idx = at::empty({N}, zc.options().dtype(at::kLong));
  auto dist = at::empty({N}, zc.options().dtype(at::kFloat));
  if (N == 0) return {idx, dist};
  if (D == 0) return {idx.zero_(), dist.zero_()};  // every code is at distance 0: the first wins

  // Squares in fp32 (exact for fp16/bf16 values), so ranking does not round them to 16 bits.
  const auto cb_sqnorm = cbc.to(at::kFloat).square().sum(1).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t* out_idx = idx.data_ptr<int64_t>();
  float* out_dist = dist.data_ptr<float>();
  const float* norms = cb_sqnorm.data_ptr<float>();
  cudaError_t err;
  switch (zc.scalar_type()) {
    case at::kFloat:
      err = launch_vq_nearest_f32(zc.data_ptr<float>(), cbc.data_ptr<float>(), norms, N, K, D, out_idx, out_dist,
                                  stream);
      break;
    case at::kHalf:
      err = launch_vq_nearest_f16(reinterpret_cast<const __half*>(zc.data_ptr<at::Half>()),
                                  reinterpret_cast<const __half*>(cbc.data_ptr<at::Half>()), norms, N, K, D,
                                  out_idx, out_dist, stream);
      break;
    case at::kBFloat16:
      err = launch_vq_nearest_bf16(reinterpret_cast<const __nv_bfloat16*>(zc.data_ptr<at::BFloat16>()),
                                   reinterpret_cast<const __nv_bfloat16*>(cbc.data_ptr<at::BFloat16>()), norms, N,
                                   K, D, out_idx, out_dist, stream);
      break;
    default:
      TORCH_CHECK(false, "vq_nearest: z must be float32, float16 or bfloat16, got ", zc.scalar_type());
  }
  C10_CUDA_CHECK(err);
  return {idx, dist};
}

}  // namespace

TORCH_LIBRARY_IMPL(musefast, CUDA, m) { m.impl("vq_nearest", &vq_nearest_cuda); }

}  // namespace musefast
