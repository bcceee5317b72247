// Torch glue of the CUDA decoding-step kernels (csrc/cuda/remask.cu): checks, layouts, the
// current stream and the selection fallback for N > kMaxSelectN. Built only against a CUDA
// build of torch; the op itself is defined in csrc/remask.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "remask.h"

namespace musefast {
namespace {

// Selection with torch ops (sort over (B, N) only): the same rule as the block-level kernel.
at::Tensor select_with_sort(const at::Tensor& confidence, const at::Tensor& masked, const at::Tensor& num_to_mask) {
  const int64_t N = confidence.size(1);
  const auto order = std::get<1>(confidence.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false));
  auto rank = at::empty_like(order);
  rank.scatter_(1, order, at::arange(N, order.options()).expand_as(order).contiguous());
  const auto keep = at::minimum(num_to_mask.clamp_min(0), masked.sum(1));
  return rank.lt(keep.unsqueeze(1)).logical_and_(masked);
}

std::tuple<at::Tensor, at::Tensor> cfg_sample_remask_cuda(const at::Tensor& logits,
                                                          const c10::optional<at::Tensor>& uncond_logits,
                                                          const at::Tensor& tokens, const at::Tensor& masked,
                                                          const at::Tensor& num_to_mask, double guidance_scale,
                                                          double temperature, double choice_temperature,
                                                          int64_t top_k, bool confidence_prob, int64_t seed_lo,
                                                          int64_t seed_hi, int64_t step) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3 && logits.size(2) > 0,
              "cfg_sample_remask: logits must be a (B, N, K) CUDA tensor with K > 0");
  TORCH_CHECK(temperature >= 0.0, "cfg_sample_remask: temperature must be >= 0");
  const int64_t B = logits.size(0), N = logits.size(1), K = logits.size(2);
  TORCH_CHECK(K < (int64_t{1} << 31) && N < (int64_t{1} << 32) && B < (int64_t{1} << 32),
              "cfg_sample_remask: sizes too large");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto lc = logits.stride(2) == 1 ? logits : logits.contiguous();
  at::Tensor lu;
  const bool cfg = uncond_logits.has_value() && guidance_scale != 1.0;
  if (cfg) {
    TORCH_CHECK(uncond_logits->sizes() == logits.sizes() && uncond_logits->scalar_type() == logits.scalar_type() &&
                    uncond_logits->device() == logits.device(),
                "cfg_sample_remask: uncond_logits must match logits in shape, dtype and device");
    lu = uncond_logits->stride(2) == 1 ? *uncond_logits : uncond_logits->contiguous();
  }
  TORCH_CHECK(tokens.sizes() == at::IntArrayRef({B, N}) && tokens.scalar_type() == at::kLong &&
                  tokens.device() == logits.device(),
              "cfg_sample_remask: tokens must be (B, N) int64 on the logits' device");
  TORCH_CHECK(masked.sizes() == at::IntArrayRef({B, N}) && masked.scalar_type() == at::kBool &&
                  masked.device() == logits.device(),
              "cfg_sample_remask: masked must be (B, N) bool on the logits' device");
  TORCH_CHECK(num_to_mask.dim() == 1 && num_to_mask.size(0) == B && num_to_mask.scalar_type() == at::kLong,
              "cfg_sample_remask: num_to_mask must be (B,) int64");
  const auto tok = tokens.contiguous();
  const auto msk = masked.contiguous();
  const auto ntm = num_to_mask.to(logits.device()).contiguous();

  musefast::cuda::LogitsType type;
  switch (lc.scalar_type()) {
    case at::kFloat: type = musefast::cuda::LogitsType::kFloat32; break;
    case at::kHalf: type = musefast::cuda::LogitsType::kFloat16; break;
    case at::kBFloat16: type = musefast::cuda::LogitsType::kBFloat16; break;
    default: TORCH_CHECK(false, "cfg_sample_remask: logits must be float32, float16 or bfloat16, got ", lc.scalar_type());
  }
  auto out_tokens = at::empty({B, N}, tok.options());
  auto confidence = at::empty({B, N}, lc.options().dtype(at::kFloat));
  if (B * N == 0) return {out_tokens, at::zeros({B, N}, msk.options())};

  musefast::cuda::RemaskRowsParams p;
  p.logits = lc.data_ptr();
  p.uncond_logits = cfg ? lu.data_ptr() : nullptr;
  p.stride_cb = lc.stride(0);
  p.stride_cn = lc.stride(1);
  p.stride_ub = cfg ? lu.stride(0) : 0;
  p.stride_un = cfg ? lu.stride(1) : 0;
  p.tokens = tok.data_ptr<int64_t>();
  p.masked = msk.data_ptr<bool>();
  p.out_tokens = out_tokens.data_ptr<int64_t>();
  p.confidence = confidence.data_ptr<float>();
  p.B = B;
  p.N = N;
  p.K = K;
  p.guidance = static_cast<float>(guidance_scale);
  p.sample = temperature > 0.0;
  p.inv_tau = p.sample ? static_cast<float>(1.0 / temperature) : 0.f;
  p.choice_temperature = static_cast<float>(choice_temperature);
  p.top_k = top_k;
  p.confidence_prob = confidence_prob;
  p.seed_lo = static_cast<uint32_t>(seed_lo);
  p.seed_hi = static_cast<uint32_t>(seed_hi);
  p.step = static_cast<uint32_t>(step);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(musefast::cuda::launch_remask_rows(p, type, stream));
  if (N <= musefast::cuda::kMaxSelectN) {
    auto out_masked = at::empty({B, N}, msk.options());
    C10_CUDA_CHECK(musefast::cuda::launch_remask_select(confidence.data_ptr<float>(), msk.data_ptr<bool>(),
                                                        ntm.data_ptr<int64_t>(), out_masked.data_ptr<bool>(), B,
                                                        N, stream));
    return {out_tokens, out_masked};
  }
  return {out_tokens, select_with_sort(confidence, msk, ntm)};
}

}  // namespace

TORCH_LIBRARY_IMPL(musefast, CUDA, m) { m.impl("cfg_sample_remask", &cfg_sample_remask_cuda); }

}  // namespace musefast
