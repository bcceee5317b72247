// CUDA kernels of the fused MaskGIT decoding step (definition: musefast/reference/remask.py).
//
// remask_rows_kernel: one warp per (b, n) row, 8 rows per block. Each lane owns 8 consecutive
// tokens per step of 256 (one 16-byte load for fp16/bf16, two for fp32, when the row is
// 16-byte aligned), so the logits are read once, coalesced. Per lane: guided logits, an online
// max / sum of exp, and a running Gumbel-max over its tokens in increasing order (strict >,
// the lower token wins ties); the lanes are merged by warp shuffles at the end. Two Philox
// calls give the noise of a lane's 8 tokens (groups k/4 and k/4 + 1). A warp skips the noise
// of a 256-token step when no lane can beat the warp's best value so far (l / tau + G_max below
// it), which is exact and saves most of the work on peaked rows.
// Top-k: per row, the k-th largest logit by bisection over the ordered float bits (32 counting
// passes over the row, reading it from L2), then the usual pass with tokens below it dropped.
//
// remask_select_kernel: one block per image; keys (ordered confidence << 32 | n) are bitonic-
// sorted in shared memory (N <= 4096) and the first clamp(num_to_mask) positions stay masked.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../philox.h"
#include "remask.h"

namespace musefast {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kTokensPerLane = 8;
constexpr int kTokensPerStep = 32 * kTokensPerLane;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kFloatMax = 3.402823466e38f;
constexpr float kFiniteClamp = 3.0e38f;

__device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 8 consecutive values of a 16-byte-aligned row to float.
__device__ __forceinline__ void load8_aligned(const float* p, float out[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ void load8_aligned(const __half* p, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8_aligned(const __nv_bfloat16* p, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Guided, sanitized logits of tokens k..k+7 (-inf past K): l = u + g (c - u), NaN -> -inf,
// +inf -> FLT_MAX.
template <typename T>
__device__ __forceinline__ void guided8(const T* lc, const T* lu, int64_t k, int64_t K, bool vec, float g,
                                        float l[8]) {
  float u[8];
  if (vec && k + kTokensPerLane <= K) {
    load8_aligned(lc + k, l);
    if (lu) load8_aligned(lu + k, u);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const bool ok = k + i < K;
      l[i] = ok ? to_float(lc[k + i]) : 0.f;
      u[i] = (ok && lu) ? to_float(lu[k + i]) : 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float x = lu ? u[i] + g * (l[i] - u[i]) : l[i];
    x = (k + i < K && x == x) ? fminf(x, kFloatMax) : -inf();
    l[i] = x;
  }
}

__device__ __forceinline__ int32_t ordered_key(float x) {
  const int32_t bits = __float_as_int(x + 0.0f);  // -0.0 -> +0.0
  return bits < 0 ? bits ^ 0x7fffffff : bits;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// The k-th largest guided logit of a row (exact): largest ordered key t with #(key >= t) >= k.
template <typename T>
__device__ float topk_threshold(const T* lc, const T* lu, const RemaskRowsParams& p, bool vec, int lane) {
  int64_t lo = -2147483648LL, hi = 2147483648LL;
  for (int it = 0; it < 32; ++it) {
    const int64_t mid = lo + (hi - lo) / 2;
    int count = 0;
    for (int64_t k0 = 0; k0 < p.K; k0 += kTokensPerStep) {
      const int64_t k = k0 + lane * kTokensPerLane;
      float l[8];
      guided8(lc, lu, k, p.K, vec, p.guidance, l);
#pragma unroll
      for (int i = 0; i < 8; ++i) count += (k + i < p.K && ordered_key(l[i]) >= mid) ? 1 : 0;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) count += __shfl_xor_sync(kFullMask, count, o);
    if (count >= p.top_k) lo = mid; else hi = mid;
  }
  const int32_t key = static_cast<int32_t>(lo);
  return __int_as_float(key < 0 ? key ^ 0x7fffffff : key);
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) remask_rows_kernel(RemaskRowsParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= p.B * p.N) return;  // warp-uniform
  if (!p.masked[r]) {
    if (lane == 0) {
      p.out_tokens[r] = p.tokens[r];
      p.confidence[r] = inf();
    }
    return;
  }
  const int64_t b = r / p.N, n = r % p.N;
  const T* lc = static_cast<const T*>(p.logits) + b * p.stride_cb + n * p.stride_cn;
  const T* lu = p.uncond_logits ? static_cast<const T*>(p.uncond_logits) + b * p.stride_ub + n * p.stride_un
                                : nullptr;
  const bool vec = (reinterpret_cast<uintptr_t>(lc) % 16 == 0) && (!lu || reinterpret_cast<uintptr_t>(lu) % 16 == 0);
  const float threshold = p.top_k > 0 ? topk_threshold(lc, lu, p, vec, lane) : -inf();
  const uint32_t c3 = philox::counter_word3(philox::kStreamSample, p.step);

  float m = -inf(), s = 0.f;                  // lane's running max and sum exp(l - m)
  float best = -inf(), best_l = -inf();       // lane's best decision value and its logit
  int64_t best_idx = 0;
  float warp_best = -inf();
  for (int64_t k0 = 0; k0 < p.K; k0 += kTokensPerStep) {
    const int64_t k = k0 + lane * kTokensPerLane;
    float l[8];
    guided8(lc, lu, k, p.K, vec, p.guidance, l);
    float cmax = l[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) cmax = fmaxf(cmax, l[i]);
    if (cmax > m) {
      s = (m == -inf()) ? 0.f : s * __expf(m - cmax);
      m = cmax;
    }
    if (m != -inf()) {
#pragma unroll
      for (int i = 0; i < 8; ++i) s += __expf(l[i] - m);
    }
    if (p.sample) {
      const float bound = fminf(fmaxf(cmax * p.inv_tau, -kFiniteClamp), kFiniteClamp);
      const float so_far = fminf(fmaxf(warp_best, -kFiniteClamp), kFiniteClamp);
      const bool hopeful = bound + 17.0f + 2e-6f * fmaxf(fabsf(bound), fabsf(so_far)) >= so_far;
      if (__any_sync(kFullMask, hopeful)) {
        const uint32_t group = static_cast<uint32_t>(k / 4);
        const philox::Words w0 = philox::philox4x32_10(group, static_cast<uint32_t>(n), static_cast<uint32_t>(b),
                                                       c3, p.seed_lo, p.seed_hi);
        const philox::Words w1 = philox::philox4x32_10(group + 1, static_cast<uint32_t>(n),
                                                       static_cast<uint32_t>(b), c3, p.seed_lo, p.seed_hi);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float g = philox::gumbel(i < 4 ? w0.x[i] : w1.x[i - 4]);
          const float v = (l[i] >= threshold) ? l[i] * p.inv_tau + g : -inf();
          if (v > best) {
            best = v;
            best_idx = k + i;
            best_l = l[i];
          }
        }
      }
      warp_best = warp_max(best);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (l[i] > best) {
          best = l[i];
          best_idx = k + i;
          best_l = l[i];
        }
      }
    }
  }
  // merge lanes: max value, lowest token among equal values; softmax statistics
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, best, o);
    const int64_t oi = __shfl_xor_sync(kFullMask, best_idx, o);
    const float ol = __shfl_xor_sync(kFullMask, best_l, o);
    if (ov > best || (ov == best && oi < best_idx)) {
      best = ov;
      best_idx = oi;
      best_l = ol;
    }
  }
  const float row_max = warp_max(m);
  const float row_sum = warp_sum((m == -inf()) ? 0.f : s * __expf(m - row_max));
  if (lane != 0) return;
  float c;
  int64_t token;
  if (row_max == -inf()) {  // dead row: no usable logit
    token = 0;
    c = -inf();
  } else {
    token = best_idx;
    c = (best_l - row_max) - __logf(row_sum);
    if (c != -inf()) {
      if (p.confidence_prob) c = __expf(c);
      if (p.choice_temperature != 0.f) {
        const philox::Words w = philox::philox4x32_10(0, static_cast<uint32_t>(n), static_cast<uint32_t>(b),
                                                      philox::counter_word3(philox::kStreamChoice, p.step),
                                                      p.seed_lo, p.seed_hi);
        c = c + p.choice_temperature * philox::gumbel(w.x[0]);
      }
    }
  }
  p.out_tokens[r] = token;
  p.confidence[r] = c;
}

__device__ __forceinline__ uint32_t ordered_bits(float x) {
  const uint32_t u = __float_as_uint(x + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(1024) remask_select_kernel(const float* confidence, const bool* masked,
                                                             const int64_t* num_to_mask, bool* out_masked,
                                                             int64_t N, int padded) {
  __shared__ unsigned long long keys[kMaxSelectN];
  __shared__ int masked_count;
  const int64_t b = blockIdx.x;
  const float* conf = confidence + b * N;
  const bool* msk = masked + b * N;
  bool* out = out_masked + b * N;
  if (threadIdx.x == 0) masked_count = 0;
  __syncthreads();
  int local = 0;
  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    if (i < N) {
      keys[i] = (static_cast<unsigned long long>(ordered_bits(conf[i])) << 32) | static_cast<unsigned>(i);
      out[i] = false;
      local += msk[i] ? 1 : 0;
    } else {
      keys[i] = ~0ull;
    }
  }
  atomicAdd(&masked_count, local);
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool ascending = (i & size) == 0;
          const unsigned long long a = keys[i], c = keys[j];
          if ((a > c) == ascending) {
            keys[i] = c;
            keys[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  // known positions have confidence +inf, masked ones never: the first `keep` keys are masked
  const int64_t keep = min(max(num_to_mask[b], static_cast<int64_t>(0)), static_cast<int64_t>(masked_count));
  for (int64_t i = threadIdx.x; i < keep; i += blockDim.x) out[keys[i] & 0xffffffffu] = true;
}

template <typename T>
cudaError_t launch_rows_typed(const RemaskRowsParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.N;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks == 0) return cudaSuccess;
  remask_rows_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_remask_rows(const RemaskRowsParams& p, LogitsType type, cudaStream_t stream) {
  switch (type) {
    case LogitsType::kFloat32: return launch_rows_typed<float>(p, stream);
    case LogitsType::kFloat16: return launch_rows_typed<__half>(p, stream);
    case LogitsType::kBFloat16: return launch_rows_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_remask_select(const float* confidence, const bool* masked, const int64_t* num_to_mask,
                                 bool* out_masked, int64_t B, int64_t N, cudaStream_t stream) {
  if (N > kMaxSelectN) return cudaErrorInvalidValue;
  if (B == 0 || N == 0) return cudaSuccess;
  int padded = 1;
  while (padded < N) padded <<= 1;
  const int threads = padded < 1024 ? (padded < 32 ? 32 : padded) : 1024;
  remask_select_kernel<<<static_cast<unsigned>(B), threads, 0, stream>>>(confidence, masked, num_to_mask,
                                                                         out_masked, N, padded);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace musefast
