// Launchers of the CUDA vq_nearest kernels (csrc/cuda/vq.cu). Pure CUDA runtime types, no
// torch: vq.cu must compile with plain nvcc on machines whose torch has no CUDA headers.
//
// Contract (all launchers): z (N, D) and codebook (K, D) row-major contiguous, same dtype;
// cb_sqnorm (K,) float32 = ||codebook[k]||^2; outputs (N,) int64 indices and float32 squared
// distances (clamped at 0). argmin_k ||z_n - c_k||^2, lowest index on ties (up to fp
// near-ties). Requires K >= 1, 1 <= D, K and D < 2^31. Returns the launch error, if any.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace musefast {

cudaError_t launch_vq_nearest_f32(const float* z, const float* codebook, const float* cb_sqnorm,
                                  int64_t N, int64_t K, int64_t D, int64_t* out_idx,
                                  float* out_dist, cudaStream_t stream);

cudaError_t launch_vq_nearest_f16(const __half* z, const __half* codebook, const float* cb_sqnorm,
                                  int64_t N, int64_t K, int64_t D, int64_t* out_idx,
                                  float* out_dist, cudaStream_t stream);

cudaError_t launch_vq_nearest_bf16(const __nv_bfloat16* z, const __nv_bfloat16* codebook,
                                   const float* cb_sqnorm, int64_t N, int64_t K, int64_t D,
                                   int64_t* out_idx, float* out_dist, cudaStream_t stream);

}  // namespace musefast
