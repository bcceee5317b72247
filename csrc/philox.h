// Philox4x32-10 and the bits-to-float rules of the decoding step's RNG, shared by the C++ and
// CUDA kernels. The definition (counter layout, uniform and Gumbel transforms) lives in
// musefast/reference/philox.py; every backend must produce the same 32-bit words.
//
//   key  = (seed & 0xffffffff, seed >> 32)
//   ctr  = (group, n, b, (stream << 30) | step)
//   stream 0 (sampling): token k of row (b, n) uses word k % 4 of the call with group = k / 4
//   stream 1 (choice):   row (b, n) uses word 0 of the call with group = 0
//   u = ((x >> 9) * 2 + 1) * 2^-24  in [2^-24, 1 - 2^-24], exact in float32
//   gumbel = -log(-log(u))
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MUSEFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MUSEFAST_HOST_DEVICE inline
#endif

namespace musefast {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr uint32_t kStreamSample = 0;
constexpr uint32_t kStreamChoice = 1;
constexpr float kTwoPowMinus24 = 5.9604644775390625e-08f;

struct Words {
  uint32_t x[4];
};

MUSEFAST_HOST_DEVICE uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
MUSEFAST_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                         uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    if (r) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = mulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words{{c0, c1, c2, c3}};
}

MUSEFAST_HOST_DEVICE uint32_t float_as_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

MUSEFAST_HOST_DEVICE float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Natural log of a positive normal float, ~1 ulp (Cephes-style: x = f * 2^e with f in
// [sqrt(1/2), sqrt(2)), log(1 + (f - 1)) by a polynomial; accurate near 1, where -log(u) of a
// uniform close to 1 must keep its relative precision). Our own code rather than logf because
// nvcc's --use_fast_math turns logf into __logf, whose absolute error near 1 would distort the
// upper tail of the Gumbel noise. csrc/remask.cpp has the same polynomial on 8-wide vectors.
MUSEFAST_HOST_DEVICE float log_positive(float x) {
  const uint32_t bits = float_as_bits(x);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 126;  // x = m * 2^e, m in [0.5, 1)
  const float m = bits_as_float((bits & 0x007fffffu) | 0x3f000000u);
  float f;
  if (m < 0.707106781186547524f) {
    e -= 1;
    f = (m + m) - 1.0f;
  } else {
    f = m - 1.0f;
  }
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float ef = static_cast<float>(e);
  y = y - 2.12194440e-4f * ef;
  y = y - 0.5f * z;
  return f + y + 0.693359375f * ef;
}

MUSEFAST_HOST_DEVICE uint32_t counter_word3(uint32_t stream, uint32_t step) { return (stream << 30) | step; }

// Exact in float32: (2m + 1) < 2^24 converts exactly, the scaling by 2^-24 is exact.
MUSEFAST_HOST_DEVICE float uniform(uint32_t x) {
  return static_cast<float>(((x >> 9) << 1) | 1u) * kTwoPowMinus24;
}

// Standard Gumbel variate of a 32-bit word: -log(-log(u)), finite (|g| < 17).
MUSEFAST_HOST_DEVICE float gumbel(uint32_t x) { return -log_positive(-log_positive(uniform(x))); }

// Bounds of gumbel(x) over all words: -log(-log(2^-24)) = -2.8115, -log(-log(1 - 2^-24)) = 16.6355.
constexpr float kGumbelMin = -2.8116f;
constexpr float kGumbelMax = 16.6356f;

}  // namespace philox
}  // namespace musefast
