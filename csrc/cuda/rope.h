// Launchers of the CUDA qk_norm_rope kernel (csrc/cuda/rope.cu). Pure CUDA runtime types, no torch:
// rope.cu must compile with plain nvcc on machines whose torch has no CUDA headers.
//
// Contract (all launchers): one stream x (B, L, 3·H·D) with unit stride along channels and row
// strides stride_b, stride_l (elements); wq, wk (D,) float32; cos, sin (L_total, D/2) float32
// contiguous; out (3, B, H, L_total, D) contiguous, this stream's rows written at [offset,
// offset + L). q/k: x / sqrt(mean(x²) + eps) · w per head, channel pairs rotated by the tables;
// v copied. D even, B·L < 2^31. Returns the launch error, if any.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace musefast {

struct RopeStream {
  int64_t stride_b, stride_l, B, L, H, D, offset, L_total;
  const float* wq;
  const float* wk;
  const float* cos;
  const float* sin;
  float eps;
};

cudaError_t launch_qk_norm_rope_f32(const float* x, float* out, const RopeStream& s, cudaStream_t stream);
cudaError_t launch_qk_norm_rope_f16(const __half* x, __half* out, const RopeStream& s, cudaStream_t stream);
cudaError_t launch_qk_norm_rope_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, const RopeStream& s,
                                     cudaStream_t stream);

}  // namespace musefast
