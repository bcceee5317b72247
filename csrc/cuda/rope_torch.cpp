// Torch glue of the CUDA qk_norm_rope kernel (csrc/cuda/rope.cu): checks, unit channel stride,
// float32 weights, the current stream and dtype dispatch, one launch per stream. Built only
// against a CUDA build of torch; the op itself is defined in csrc/rope.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "rope.h"

namespace musefast {
namespace {

at::Tensor qk_norm_rope_cuda(at::TensorList qkv, at::TensorList q_weight, at::TensorList k_weight,
                             const at::Tensor& cos, const at::Tensor& sin, int64_t heads, double eps) {
  TORCH_CHECK(!qkv.empty() && q_weight.size() == qkv.size() && k_weight.size() == qkv.size(),
              "qk_norm_rope: one q_weight and one k_weight per qkv stream expected");
  const at::Tensor& first = qkv[0];
  TORCH_CHECK(first.is_cuda() && heads > 0 && first.dim() == 3 && first.size(2) % (6 * heads) == 0,
              "qk_norm_rope: qkv must be a CUDA tensor (B, L, 3*heads*D) with D even");
  const int64_t B = first.size(0), width = first.size(2), D = width / (3 * heads);
  int64_t L_total = 0;
  for (const auto& x : qkv) {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == B && x.size(2) == width && x.scalar_type() == first.scalar_type() &&
                    x.device() == first.device(),
                "qk_norm_rope: every qkv stream must be (B, L, 3*heads*D) of one dtype on one device");
    L_total += x.size(1);
  }
  TORCH_CHECK(cos.device() == first.device() && sin.device() == first.device() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.sizes() == at::IntArrayRef({L_total, D / 2}) && sin.sizes() == cos.sizes(),
              "qk_norm_rope: cos and sin must be float32 (L_total, D/2) on qkv's device");
  const c10::cuda::CUDAGuard guard(first.device());
  const auto cos_c = cos.contiguous();
  const auto sin_c = sin.contiguous();
  auto out = at::empty({3, B, heads, L_total, D}, first.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t offset = 0;
  for (size_t i = 0; i < qkv.size(); ++i) {
    const auto x = qkv[i].stride(2) == 1 ? qkv[i] : qkv[i].contiguous();
    TORCH_CHECK(B * x.size(1) <= std::numeric_limits<int>::max(), "qk_norm_rope: B*L must be < 2^31 on CUDA");
    const auto wq = q_weight[i].to(first.device(), at::kFloat).contiguous();
    const auto wk = k_weight[i].to(first.device(), at::kFloat).contiguous();
    TORCH_CHECK(wq.numel() == D && wk.numel() == D, "qk_norm_rope: weights must have D elements");
    const RopeStream s{x.stride(0), x.stride(1), B, x.size(1), heads, D, offset, L_total,
                       wq.data_ptr<float>(), wk.data_ptr<float>(), cos_c.data_ptr<float>(), sin_c.data_ptr<float>(),
                       static_cast<float>(eps)};
    cudaError_t err;
    switch (x.scalar_type()) {
      case at::kFloat:
        err = launch_qk_norm_rope_f32(x.data_ptr<float>(), out.data_ptr<float>(), s, stream);
        break;
      case at::kHalf:
        err = launch_qk_norm_rope_f16(reinterpret_cast<const __half*>(x.data_ptr<at::Half>()),
                                      reinterpret_cast<__half*>(out.data_ptr<at::Half>()), s, stream);
        break;
      case at::kBFloat16:
        err = launch_qk_norm_rope_bf16(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>()),
                                       reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), s, stream);
        break;
      default:
        TORCH_CHECK(false, "qk_norm_rope: qkv must be float32, float16 or bfloat16, got ", x.scalar_type());
    }
    C10_CUDA_CHECK(err);
    offset += x.size(1);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(musefast, CUDA, m) { m.impl("qk_norm_rope", &qk_norm_rope_cuda); }

}  // namespace musefast
