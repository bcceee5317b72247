// CUDA kernels of vq_nearest: argmin_k ||z_n - c_k||^2 without the N×K distance matrix.
//
// Both kernels rank codes by ||c_k||^2 - 2 z·c_k (||z||^2 is constant per row and is added
// back only for the returned distance, clamped at 0; a NaN row keeps index 0 and distance
// NaN), stream the codebook in tiles and keep a running min/argmin per (thread, row) in
// registers. Each thread visits its codes in ascending order with a strict <, so it keeps
// the lowest index among equal scores; the final cross-thread reduction compares (score,
// index) pairs, so ties go to the lowest index.
//
// - fp16/bf16 on sm_80+: tensor cores via mma.sync.m16n8k16 (fp32 accumulation). A block
//   owns 128 rows, kept in shared memory for the whole sweep; the codebook is staged in
//   64-code × 64-dim tiles. Fragment layouts are the PTX ISA's ("Matrix Fragments for
//   mma.m16n8k16 with floating point type"), so the argmin runs on the accumulator registers
//   directly, without a round trip through shared memory.
// - fp32 (and fp16/bf16 where the tensor-core kernel cannot run): a tiled SIMT kernel of
//   exact fp32 FMAs (no TF32, whose 10-bit mantissa flips argmins), 128 rows × 128 codes per
//   block, 8×8 outputs per thread.
#include "vq.h"

#include <math_constants.h>

#include <climits>

namespace musefast {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// (score, index) order: the smaller score, then the smaller index.
__device__ __forceinline__ bool precedes(float s, int k, float best_s, int best_k) {
  return s < best_s || (s == best_s && k < best_k);
}

// Min over the lanes that differ in the bits of [1, width): all of them end with the result.
__device__ __forceinline__ void reduce_best(float& s, int& k, int width) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) {
    const float other_s = __shfl_xor_sync(0xffffffffu, s, offset);
    const int other_k = __shfl_xor_sync(0xffffffffu, k, offset);
    if (precedes(other_s, other_k, s, k)) {
      s = other_s;
      k = other_k;
    }
  }
}

// ---------------------------------------------------------------------------------------
// SIMT kernel (any dtype, exact fp32 arithmetic).
// ---------------------------------------------------------------------------------------
constexpr int kSimtThreads = 256;  // 16 (codes) × 16 (rows)
constexpr int kSimtBM = 128;       // rows per block: 8 per thread, as 2 groups of 4
constexpr int kSimtBN = 128;       // codes per tile: 8 per thread, as 2 groups of 4
constexpr int kSimtBK = 8;         // dims per shared-memory stage
constexpr int kSimtPad = 4;        // keeps float4 alignment, spreads the transposed stores

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    vq_nearest_simt_kernel(const T* __restrict__ z, const T* __restrict__ cb,
                           const float* __restrict__ cb_sqnorm, int64_t N, int K, int D,
                           int64_t* __restrict__ out_idx, float* __restrict__ out_dist) {
  // Transposed ([dim][row]) so a thread reads its 4 consecutive rows/codes as one float4.
  __shared__ __align__(16) float zs[kSimtBK][kSimtBM + kSimtPad];
  __shared__ __align__(16) float cs[kSimtBK][kSimtBN + kSimtPad];
  __shared__ __align__(16) float norms[kSimtBN];
  __shared__ float z_sqnorm[kSimtBM];

  const int tid = threadIdx.x;
  const int tx = tid % 16;  // code group
  const int ty = tid / 16;  // row group
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kSimtBM;

  {  // ||z||^2 of the block's rows: a warp per row at a time, lanes stride over D.
    const int warp = tid / 32, lane = tid % 32;
    for (int r = warp; r < kSimtBM; r += kSimtThreads / 32) {
      const int64_t row = row0 + r;
      float s = 0.f;
      if (row < N) {
        for (int d = lane; d < D; d += 32) {
          const float v = to_float(z[row * D + d]);
          s = fmaf(v, v, s);
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (lane == 0) z_sqnorm[r] = s;
    }
  }

  // Thread-owned rows/codes: local index i < 4 -> 4*group + i; i >= 4 -> 64 + 4*group + i-4.
  auto local = [](int group, int i) { return (i < 4 ? 0 : 64) + 4 * group + (i & 3); };

  float best[8];
  int best_k[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best[i] = CUDART_INF_F;
    best_k[i] = 0;
  }

  for (int k0 = 0; k0 < K; k0 += kSimtBN) {
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    for (int d0 = 0; d0 < D; d0 += kSimtBK) {
      __syncthreads();  // the previous stage (and epilogue) is done with zs/cs/norms
#pragma unroll
      for (int i = 0; i < kSimtBM * kSimtBK / kSimtThreads; ++i) {
        const int e = tid + i * kSimtThreads;
        const int r = e / kSimtBK, kk = e % kSimtBK;  // 8 threads read 8 consecutive dims
        const int d = d0 + kk;
        const int64_t row = row0 + r;
        const int code = k0 + r;
        zs[kk][r] = (row < N && d < D) ? to_float(z[row * D + d]) : 0.f;
        cs[kk][r] = (code < K && d < D) ? to_float(cb[static_cast<int64_t>(code) * D + d]) : 0.f;
      }
      if (d0 == 0 && tid < kSimtBN) {
        const int code = k0 + tid;
        norms[tid] = code < K ? cb_sqnorm[code] : CUDART_INF_F;  // padding codes never win
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSimtBK; ++kk) {
        const float4 a0 = *reinterpret_cast<const float4*>(&zs[kk][4 * ty]);
        const float4 a1 = *reinterpret_cast<const float4*>(&zs[kk][64 + 4 * ty]);
        const float4 b0 = *reinterpret_cast<const float4*>(&cs[kk][4 * tx]);
        const float4 b1 = *reinterpret_cast<const float4*>(&cs[kk][64 + 4 * tx]);
        const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }

#pragma unroll
    for (int j = 0; j < 8; ++j) {  // ascending code order
      const int c = local(tx, j);
      const float norm = norms[c];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float s = fmaf(-2.f, acc[i][j], norm);
        if (s < best[i]) {
          best[i] = s;
          best_k[i] = k0 + c;
        }
      }
    }
  }

  __syncthreads();  // z_sqnorm is visible (also when the loops above ran once)
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    reduce_best(best[i], best_k[i], 16);  // the 16 code groups of a row share a half-warp
    const int r = local(ty, i);
    const int64_t row = row0 + r;
    if (tx == 0 && row < N) {
      out_idx[row] = best_k[i];
      // Clamp rounding below 0, but keep NaN (a NaN row: index 0, distance NaN): fmaxf
      // would return 0 for it.
      const float dist = z_sqnorm[r] + best[i];
      out_dist[row] = dist < 0.f ? 0.f : dist;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel (fp16 / bf16, sm_80+).
// ---------------------------------------------------------------------------------------
constexpr int kMmaThreads = 128;  // 4 warps, each 32 rows × all 64 codes of a tile
constexpr int kMmaBM = 128;       // rows per block, resident in shared memory
constexpr int kMmaBN = 64;        // codes per tile
constexpr int kMmaBK = 64;        // dims per codebook stage
constexpr int kMmaPad = 8;        // halves of row padding: conflict-free 32-bit fragment loads
constexpr int kLdc = kMmaBK + kMmaPad;

inline size_t mma_smem_bytes(int64_t d_pad) {
  return static_cast<size_t>(kMmaBM) * (d_pad + kMmaPad) * 2 + static_cast<size_t>(kMmaBN) * kLdc * 2 +
         (kMmaBN + kMmaBM) * sizeof(float);
}

template <bool kBf16>
__device__ __forceinline__ float bits_to_float(uint16_t bits) {
  if constexpr (kBf16) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// c += a · b for one 16×8×16 tile; fp32 accumulation.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Copies a rows × d_len tile of 16-bit values (row stride D in global memory, ld in shared
// memory) and zero-fills rows >= rows_valid and dims >= D. vec: 16-byte loads (D % 8 == 0
// and 16-byte aligned base).
__device__ __forceinline__ void stage_tile(uint16_t* dst, int ld, const uint16_t* __restrict__ src,
                                           int64_t rows_valid, int rows, int D, int d0, int d_len,
                                           bool vec) {
  if (vec) {
    const int groups = d_len / 8;
    for (int e = threadIdx.x; e < rows * groups; e += blockDim.x) {
      const int r = e / groups, d = d0 + (e % groups) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows_valid && d < D) v = *reinterpret_cast<const uint4*>(src + r * static_cast<int64_t>(D) + d);
      *reinterpret_cast<uint4*>(dst + r * ld + (d - d0)) = v;
    }
  } else {
    for (int e = threadIdx.x; e < rows * d_len; e += blockDim.x) {
      const int r = e / d_len, d = d0 + e % d_len;
      dst[r * ld + (d - d0)] = (r < rows_valid && d < D) ? src[r * static_cast<int64_t>(D) + d] : uint16_t{0};
    }
  }
}

template <bool kBf16>
__global__ void __launch_bounds__(kMmaThreads)
    vq_nearest_mma_kernel(const uint16_t* __restrict__ z, const uint16_t* __restrict__ cb,
                          const float* __restrict__ cb_sqnorm, int64_t N, int K, int D, int d_pad,
                          bool vec, int64_t* __restrict__ out_idx, float* __restrict__ out_dist) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const int ldz = d_pad + kMmaPad;
  uint16_t* zs = reinterpret_cast<uint16_t*>(smem);            // [kMmaBM][ldz]
  uint16_t* cs = zs + kMmaBM * ldz;                              // [kMmaBN][kLdc]
  float* norms = reinterpret_cast<float*>(cs + kMmaBN * kLdc);   // [kMmaBN]
  float* z_sqnorm = norms + kMmaBN;                              // [kMmaBM]

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // PTX groupID, threadID_in_group
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMmaBM;
  const int wrow = warp * 32;

  // The block's rows, zero-padded to d_pad dims and kMmaBM rows, stay for the whole sweep.
  stage_tile(zs, ldz, z + row0 * D, N - row0, kMmaBM, D, 0, d_pad, vec);
  __syncthreads();
  {
    float s = 0.f;
    for (int d = 0; d < D; ++d) {
      const float v = bits_to_float<kBf16>(zs[tid * ldz + d]);
      s = fmaf(v, v, s);
    }
    z_sqnorm[tid] = s;  // kMmaThreads == kMmaBM: one row per thread
  }

  // Running best of this thread's rows wrow + 16*mi + 8*h + g, over its codes.
  float best[4];
  int best_k[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = CUDART_INF_F;
    best_k[i] = 0;
  }

  for (int k0 = 0; k0 < K; k0 += kMmaBN) {
    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

    for (int d0 = 0; d0 < d_pad; d0 += kMmaBK) {
      const int d_len = min(kMmaBK, d_pad - d0);  // a multiple of 16
      __syncthreads();  // everyone is done with the previous codebook stage and norms
      stage_tile(cs, kLdc, cb + static_cast<int64_t>(k0) * D, K - k0, kMmaBN, D, d0, d_len, vec);
      if (d0 == 0 && tid < kMmaBN) norms[tid] = k0 + tid < K ? cb_sqnorm[k0 + tid] : CUDART_INF_F;
      __syncthreads();
      for (int ks = 0; ks < d_len; ks += 16) {
        // A (16×16, row-major): a0 (g, 2t..2t+1), a1 (g+8, ..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
        uint32_t a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const uint16_t* p = zs + (wrow + 16 * mi + g) * ldz + d0 + ks + 2 * t;
          a[mi][0] = load_pair(p);
          a[mi][1] = load_pair(p + 8 * ldz);
          a[mi][2] = load_pair(p + 8);
          a[mi][3] = load_pair(p + 8 * ldz + 8);
        }
        // B (16×8, "col"): b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); cs is [code][dim].
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          const uint16_t* q = cs + (8 * ni + g) * kLdc + ks + 2 * t;
          const uint32_t b0 = load_pair(q), b1 = load_pair(q + 8);
          mma_16816<kBf16>(acc[0][ni], a[0], b0, b1);
          mma_16816<kBf16>(acc[1][ni], a[1], b0, b1);
        }
      }
    }

    // C (16×8): c0, c1 at (g, 2t), (g, 2t+1); c2, c3 at (g+8, 2t), (g+8, 2t+1).
#pragma unroll
    for (int ni = 0; ni < 8; ++ni) {  // ascending code order
      const int c = 8 * ni + 2 * t;
      const float n0 = norms[c], n1 = norms[c + 1];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float s0 = fmaf(-2.f, acc[mi][ni][2 * h], n0);
          const float s1 = fmaf(-2.f, acc[mi][ni][2 * h + 1], n1);
          float& b = best[2 * mi + h];
          int& bk = best_k[2 * mi + h];
          if (s0 < b) {
            b = s0;
            bk = k0 + c;
          }
          if (s1 < b) {
            b = s1;
            bk = k0 + c + 1;
          }
        }
    }
  }

  __syncthreads();  // z_sqnorm is visible
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    reduce_best(best[i], best_k[i], 4);  // the quad (t = 0..3) shares rows
    const int r = wrow + 16 * (i / 2) + 8 * (i % 2) + g;
    const int64_t row = row0 + r;
    if (t == 0 && row < N) {
      out_idx[row] = best_k[i];
      // Clamp rounding below 0, but keep NaN (a NaN row: index 0, distance NaN): fmaxf
      // would return 0 for it.
      const float dist = z_sqnorm[r] + best[i];
      out_dist[row] = dist < 0.f ? 0.f : dist;
    }
  }
#endif  // compiled out below sm_80: the launcher never picks this kernel there
}

// ---------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------
bool sizes_ok(int64_t N, int64_t K, int64_t D) {
  return N >= 0 && K >= 1 && D >= 1 && K <= INT_MAX && D <= INT_MAX &&
         (N + kSimtBM - 1) / kSimtBM <= INT_MAX;
}

template <typename T>
cudaError_t launch_simt(const T* z, const T* codebook, const float* cb_sqnorm, int64_t N, int64_t K,
                        int64_t D, int64_t* out_idx, float* out_dist, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((N + kSimtBM - 1) / kSimtBM);
  vq_nearest_simt_kernel<T><<<blocks, kSimtThreads, 0, stream>>>(
      z, codebook, cb_sqnorm, N, static_cast<int>(K), static_cast<int>(D), out_idx, out_dist);
  return cudaGetLastError();
}

// fp16/bf16: the tensor-core kernel where it was compiled for sm_80+ (checked on the binary
// actually loaded, not on the device, so a compute_75 PTX JIT-ed for an sm_80 device stays
// correct) and its resident row tile fits in shared memory; the SIMT kernel otherwise.
template <bool kBf16, typename T>
cudaError_t launch_16bit(const T* z, const T* codebook, const float* cb_sqnorm, int64_t N, int64_t K,
                         int64_t D, int64_t* out_idx, float* out_dist, cudaStream_t stream) {
  if (!sizes_ok(N, K, D)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  auto kernel = vq_nearest_mma_kernel<kBf16>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  int device = 0, smem_optin = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess)
    return err;
  const int64_t d_pad = (D + 15) / 16 * 16;
  const size_t smem = mma_smem_bytes(d_pad);
  if (attr.ptxVersion < 80 || attr.binaryVersion < 80 || smem > static_cast<size_t>(smem_optin)) {
    return launch_simt<T>(z, codebook, cb_sqnorm, N, K, D, out_idx, out_dist, stream);
  }
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const bool vec = D % 8 == 0 && reinterpret_cast<uintptr_t>(z) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(codebook) % 16 == 0;
  const unsigned blocks = static_cast<unsigned>((N + kMmaBM - 1) / kMmaBM);
  kernel<<<blocks, kMmaThreads, smem, stream>>>(
      reinterpret_cast<const uint16_t*>(z), reinterpret_cast<const uint16_t*>(codebook), cb_sqnorm, N,
      static_cast<int>(K), static_cast<int>(D), static_cast<int>(d_pad), vec, out_idx, out_dist);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_vq_nearest_f32(const float* z, const float* codebook, const float* cb_sqnorm, int64_t N,
                                  int64_t K, int64_t D, int64_t* out_idx, float* out_dist,
                                  cudaStream_t stream) {
  if (!sizes_ok(N, K, D)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  return launch_simt<float>(z, codebook, cb_sqnorm, N, K, D, out_idx, out_dist, stream);
}

cudaError_t launch_vq_nearest_f16(const __half* z, const __half* codebook, const float* cb_sqnorm, int64_t N,
                                  int64_t K, int64_t D, int64_t* out_idx, float* out_dist,
                                  cudaStream_t stream) {
  return launch_16bit<false>(z, codebook, cb_sqnorm, N, K, D, out_idx, out_dist, stream);
}

cudaError_t launch_vq_nearest_bf16(const __nv_bfloat16* z, const __nv_bfloat16* codebook,
                                   const float* cb_sqnorm, int64_t N, int64_t K, int64_t D,
                                   int64_t* out_idx, float* out_dist, cudaStream_t stream) {
  return launch_16bit<true>(z, codebook, cb_sqnorm, N, K, D, out_idx, out_dist, stream);
}

}  // namespace musefast
