// Launchers of the CUDA decoding-step kernels (csrc/cuda/remask.cu): raw pointers, sizes and a
// stream, no torch types, so the .cu compiles without torch's CUDA headers. The torch glue is
// csrc/cuda/remask_torch.cpp. Semantics: musefast/reference/remask.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace musefast {
namespace cuda {

enum class LogitsType { kFloat32, kFloat16, kBFloat16 };

struct RemaskRowsParams {
  const void* logits;         // (B, N, K), last dim contiguous
  const void* uncond_logits;  // same layout, or nullptr (no guidance)
  int64_t stride_cb, stride_cn, stride_ub, stride_un;  // in elements
  const int64_t* tokens;      // (B, N) contiguous
  const bool* masked;         // (B, N) contiguous
  int64_t* out_tokens;        // (B, N)
  float* confidence;          // (B, N): +inf at known positions
  int64_t B, N, K;
  float guidance;             // used only when uncond_logits != nullptr
  float inv_tau;              // 1 / temperature, rounded to float32
  bool sample;                // temperature > 0 (else argmax)
  float choice_temperature;
  int64_t top_k;              // 0 = no filter
  bool confidence_prob;
  uint32_t seed_lo, seed_hi, step;
};

// Pass over the logits: per masked row, the sampled token and its confidence.
cudaError_t launch_remask_rows(const RemaskRowsParams& p, LogitsType type, cudaStream_t stream);

// Largest N the block-level selection handles (one block per image, keys in shared memory).
constexpr int64_t kMaxSelectN = 4096;

// Per image: the clamp(num_to_mask[b], 0, #masked) lowest confidences stay masked, ties to the
// lowest position. out_masked (B, N) is fully written. Needs N <= kMaxSelectN.
cudaError_t launch_remask_select(const float* confidence, const bool* masked, const int64_t* num_to_mask,
                                 bool* out_masked, int64_t B, int64_t N, cudaStream_t stream);

}  // namespace cuda
}  // namespace musefast
