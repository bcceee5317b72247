// CUDA kernel of qk_norm_rope: q/k RMSNorm + rotary embedding + head split of a fused QKV
// projection (the definition is musefast/reference/rope.py).
//
// A block owns one (batch, row) of a stream; each warp takes q/k heads in turn, lane j the
// channel pairs (2i, 2i+1) with i = j, j+32, ...; the head's sum of squares is a warp shuffle
// reduction, and the second pass re-reads the pairs (from L1) to normalise, weight, rotate and
// store them in float32 math with one rounding. All threads then copy the v heads. The output is
// the (3, B, H, L_total, D) layout attention reads, at the stream's row offset.
#include "rope.h"

namespace musefast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                 RopeStream s) {
  const int64_t row_id = blockIdx.x;
  const int64_t b = row_id / s.L, l = row_id % s.L;
  const T* row = x + b * s.stride_b + l * s.stride_l;
  const int64_t pairs = s.D / 2;
  const int64_t part_stride = s.B * s.H * s.L_total * s.D;
  const float* c = s.cos + (s.offset + l) * pairs;
  const float* sn = s.sin + (s.offset + l) * pairs;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t unit = warp; unit < 2 * s.H; unit += warps) {  // unit = part · H + head, part 0 = q, 1 = k
    const int64_t part = unit / s.H, h = unit % s.H;
    const T* in = row + unit * s.D;
    const float* w = part == 0 ? s.wq : s.wk;
    T* dst = out + part * part_stride + ((b * s.H + h) * s.L_total + s.offset + l) * s.D;
    float ss = 0.f;
    for (int64_t i = lane; i < pairs; i += 32) {
      const float x0 = to_float(in[2 * i]), x1 = to_float(in[2 * i + 1]);
      ss += x0 * x0 + x1 * x1;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, offset);
    const float inv = rsqrtf(ss / static_cast<float>(s.D) + s.eps);
    for (int64_t i = lane; i < pairs; i += 32) {
      const float y0 = to_float(in[2 * i]) * inv * w[2 * i];
      const float y1 = to_float(in[2 * i + 1]) * inv * w[2 * i + 1];
      dst[2 * i] = from_float<T>(y0 * c[i] - y1 * sn[i]);
      dst[2 * i + 1] = from_float<T>(y1 * c[i] + y0 * sn[i]);
    }
  }
  const T* v = row + 2 * s.H * s.D;
  for (int64_t j = threadIdx.x; j < s.H * s.D; j += blockDim.x) {
    const int64_t h = j / s.D, d = j % s.D;
    out[2 * part_stride + ((b * s.H + h) * s.L_total + s.offset + l) * s.D + d] = v[j];
  }
}

template <typename T>
cudaError_t launch(const T* x, T* out, const RopeStream& s, cudaStream_t stream) {
  if (s.B * s.L == 0) return cudaSuccess;
  qk_norm_rope_kernel<T><<<static_cast<unsigned>(s.B * s.L), kThreads, 0, stream>>>(x, out, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_qk_norm_rope_f32(const float* x, float* out, const RopeStream& s, cudaStream_t stream) {
  return launch<float>(x, out, s, stream);
}

cudaError_t launch_qk_norm_rope_f16(const __half* x, __half* out, const RopeStream& s, cudaStream_t stream) {
  return launch<__half>(x, out, s, stream);
}

cudaError_t launch_qk_norm_rope_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, const RopeStream& s,
                                     cudaStream_t stream) {
  return launch<__nv_bfloat16>(x, out, s, stream);
}

}  // namespace musefast
