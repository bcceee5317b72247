// One MaskGIT decoding step on the CPU: classifier-free guidance + sampling + confidence +
// re-masking (definition: musefast/reference/remask.py).
//
// Per masked row (b, n), in parallel over rows, the logits are read once:
//   pass 1: guided logits l = lu + g (lc - lu) (NaN -> -inf, +inf -> FLT_MAX) into a per-thread
//           row buffer (K floats, stays in L1/L2), and the row max m;
//   pass 2: over the buffer, the softmax denominator sum exp(l - m) and the Gumbel-max sample
//           argmax_k(l_k / tau + G_k), with Philox noise generated 8 groups (32 tokens) at a time
//           in AVX2 registers; tiles whose tokens cannot win (l / tau more than the Gumbel
//           range below the row max) skip the noise, exactly. Nothing of size B×N×K is written.
// Then, per image, std::nth_element picks the num_to_mask lowest confidences (ties -> lowest
// position), an O(N) partial selection instead of a sort.
//
// Vector math (exp, log) is our own float32 polynomial code on GCC vector extensions, so the
// loops vectorize without -ffast-math; it differs from torch's exp/log by an ulp at most,
// which only matters at floating-point near-ties (counted by the tests).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "philox.h"

namespace musefast {
namespace {

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kFloatMax = std::numeric_limits<float>::max();
constexpr int64_t kTile = 32;  // tokens per 8-lane Philox call (8 groups × 4 words)
// Width of the Gumbel noise range (philox::kGumbelMax - kGumbelMin = 19.45) with slack.
constexpr double kGumbelSpan = 20.0;

inline vf8 splat(float x) { return vf8{} + x; }
inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

// philox::log_positive on 8 lanes (same polynomial): natural log of positive normal floats.
inline vf8 vlog(vf8 x) {
  const vi8 bits = reinterpret_cast<vi8>(x);
  vi8 e = ((bits >> 23) & 0xff) - 126;  // x = m * 2^e, m in [0.5, 1)
  const vf8 m = reinterpret_cast<vf8>((bits & 0x007fffff) | 0x3f000000);
  const vi8 small = m < splat(0.707106781186547524f);
  e = small ? e - 1 : e;
  const vf8 f = small ? (m + m) - 1.0f : m - 1.0f;
  const vf8 z = f * f;
  vf8 y = splat(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const vf8 ef = __builtin_convertvector(e, vf8);
  y = y - 2.12194440e-4f * ef;
  y = y - 0.5f * z;
  return f + y + 0.693359375f * ef;
}

// exp(x) for x <= 0 (including -inf); 0 below the float32 normal range.
inline vf8 vexp_nonpositive(vf8 x) {
  const vi8 underflow = x < splat(-87.33654f);
  x = underflow ? splat(0.f) : x;
  const vf8 t = x * 1.44269504088896341f;
  const vf8 n = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer, n in [-126, 0]
  vf8 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi8 scale_bits = (__builtin_convertvector(n, vi8) + 127) << 23;
  const vf8 result = p * reinterpret_cast<vf8>(scale_bits);
  return underflow ? splat(0.f) : result;
}

// Philox words of 8 consecutive groups, transposed into token order: out[q] holds the 32-bit
// words of tokens 4*group0 + 8q + (0..7).
struct TileBits {
#ifdef __AVX2__
  __m256i q[4];
#else
  uint32_t w[kTile];
#endif
};

#ifdef __AVX2__
inline void mulhilo8(__m256i a, uint32_t m, __m256i& hi, __m256i& lo) {
  const __m256i mv = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32(a, mv);                        // lanes 0,2,4,6 (64-bit)
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mv);  // lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#endif

inline TileBits philox_tile(uint32_t group0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  TileBits out;
#ifdef __AVX2__
  __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(group0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1));
  __m256i x2 = _mm256_set1_epi32(static_cast<int>(c2));
  __m256i x3 = _mm256_set1_epi32(static_cast<int>(c3));
  for (int r = 0; r < philox::kRounds; ++r) {
    if (r) {
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(x0, philox::kM0, hi0, lo0);
    mulhilo8(x2, philox::kM1, hi1, lo1);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(k0)));
    x1 = lo1;
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(k1)));
    x3 = lo0;
  }
  // 4 words × 8 groups -> 4 vectors of 8 consecutive tokens (token 4g + j = word j of group g)
  const __m256i a = _mm256_unpacklo_epi32(x0, x1), b = _mm256_unpacklo_epi32(x2, x3);
  const __m256i c = _mm256_unpackhi_epi32(x0, x1), d = _mm256_unpackhi_epi32(x2, x3);
  const __m256i g04 = _mm256_unpacklo_epi64(a, b), g15 = _mm256_unpackhi_epi64(a, b);
  const __m256i g26 = _mm256_unpacklo_epi64(c, d), g37 = _mm256_unpackhi_epi64(c, d);
  out.q[0] = _mm256_permute2x128_si256(g04, g15, 0x20);
  out.q[1] = _mm256_permute2x128_si256(g26, g37, 0x20);
  out.q[2] = _mm256_permute2x128_si256(g04, g15, 0x31);
  out.q[3] = _mm256_permute2x128_si256(g26, g37, 0x31);
#else
  for (uint32_t g = 0; g < 8; ++g) {
    const philox::Words w = philox::philox4x32_10(group0 + g, c1, c2, c3, k0, k1);
    for (int j = 0; j < 4; ++j) out.w[4 * g + j] = w.x[j];
  }
#endif
  return out;
}

inline vf8 gumbel8(const TileBits& bits, int q) {
  vi8 x;
#ifdef __AVX2__
  x = reinterpret_cast<vi8>(bits.q[q]);
#else
  std::memcpy(&x, bits.w + 8 * q, sizeof(x));
#endif
  // u = ((x >> 9) * 2 + 1) * 2^-24, with a logical shift
  const vi8 odd = ((x >> 9) & 0x007fffff) * 2 + 1;
  const vf8 u = __builtin_convertvector(odd, vf8) * philox::kTwoPowMinus24;
  return -vlog(-vlog(u));
}

struct Params {
  int64_t B, N, K;
  float guidance;  // already rounded to float32
  bool cfg;
  float inv_tau;
  bool sample;  // tau > 0
  float choice_temperature;
  int64_t top_k;  // 0 = no filter
  bool confidence_prob;
  uint32_t k0, k1, step;
};

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// Guided, sanitized logits of one row into buf[0, K); returns the row max.
template <typename T>
float guided_row(const T* lc, const T* lu, const Params& p, float* buf) {
  const int64_t K = p.K;
  const vf8 g = splat(p.guidance);
  vf8 vmax = splat(-kInf);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    vf8 l, u;
    for (int i = 0; i < 8; ++i) l[i] = to_float(lc[k + i]);
    if (p.cfg) {
      for (int i = 0; i < 8; ++i) u[i] = to_float(lu[k + i]);
      l = u + g * (l - u);
    }
    l = (l != l) ? splat(-kInf) : l;  // NaN -> -inf
    l = (l > splat(kFloatMax)) ? splat(kFloatMax) : l;
    vmax = (l > vmax) ? l : vmax;
    store8(buf + k, l);
  }
  float m = -kInf;
  for (int i = 0; i < 8; ++i) m = std::max(m, vmax[i]);
  for (; k < K; ++k) {
    float l = to_float(lc[k]);
    if (p.cfg) {
      const float u = to_float(lu[k]);
      l = u + p.guidance * (l - u);
    }
    l = std::isnan(l) ? -kInf : std::min(l, kFloatMax);
    m = std::max(m, l);
    buf[k] = l;
  }
  return m;
}

// Tokens with guided logit l < cut can never win the Gumbel-max of a row whose max logit gives
// top = m / tau: their l / tau + G (G <= 16.64) stays below the max token's m / tau + G
// (G >= -2.82). The cut is rounded down with slack for float rounding, so it never excludes
// a possible winner; such tokens skip the noise, which changes no result.
inline float skip_cut(double top, float inv_tau) {
  // Near the float32 range, l / tau may round to +inf and tie with the max: no skipping there.
  if (!(top < 0.5 * kFloatMax)) return -kInf;
  const double cut = (top - kGumbelSpan - 2e-6 * std::fabs(top) - 1e-3) / inv_tau;
  if (!(cut > -static_cast<double>(kFloatMax))) return -kInf;  // (also when tau is huge)
  return std::nextafter(static_cast<float>(cut), -kInf);
}

inline bool any_lane(vi8 mask) {
#ifdef __AVX__
  return !_mm256_testz_si256(reinterpret_cast<__m256i>(mask), reinterpret_cast<__m256i>(mask));
#else
  for (int i = 0; i < 8; ++i)
    if (mask[i]) return true;
  return false;
#endif
}

struct RowResult {
  int64_t token;
  float logprob;
};

// Sample one row from its guided logits buf[0, Kpad) (padded with -inf to a multiple of kTile).
RowResult sample_row(const float* buf, float m, int64_t Kpad, const Params& p, uint32_t b, uint32_t n,
                     float* scratch) {
  if (m == -kInf) return {0, -kInf};  // dead row: no usable logit
  float threshold = -kInf;
  if (p.top_k > 0 && p.top_k < p.K) {
    std::copy(buf, buf + p.K, scratch);
    std::nth_element(scratch, scratch + (p.top_k - 1), scratch + p.K, std::greater<float>());
    threshold = scratch[p.top_k - 1];
  }
  const uint32_t c3 = philox::counter_word3(philox::kStreamSample, p.step);
  const vf8 vm = splat(m), inv_tau = splat(p.inv_tau), vthr = splat(threshold);
  const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  vf8 sum = splat(0.f), best = splat(-kInf);
  vi8 best_idx = vi8{};
  // With guided (g ~ 10) or trained-model logits most tokens are below the cut.
  const vf8 vcut = splat(p.sample ? skip_cut(static_cast<double>(m) * p.inv_tau, p.inv_tau) : -kInf);
  for (int64_t t = 0; t < Kpad; t += kTile) {
    vf8 l[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      l[q] = load8(buf + t + 8 * q);
      sum += vexp_nonpositive(l[q] - vm);
    }
    if (p.sample) {
      vi8 hopeful[4];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) hopeful[q] = l[q] >= vcut;
      if (!any_lane(hopeful[0] | hopeful[1] | hopeful[2] | hopeful[3])) continue;
      const TileBits bits = philox_tile(static_cast<uint32_t>(t / 4), n, b, c3, p.k0, p.k1);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        if (!any_lane(hopeful[q])) continue;  // the logs of 8 tokens that cannot win
        vf8 v = l[q] * inv_tau + gumbel8(bits, q);
        v = (l[q] >= vthr) ? v : splat(-kInf);
        const vi8 better = v > best;  // strict: the earlier token of a lane wins ties
        best = better ? v : best;
        best_idx = better ? (lane + static_cast<int32_t>(t + 8 * q)) : best_idx;
      }
    } else {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const vi8 better = l[q] > best;
        best = better ? l[q] : best;
        best_idx = better ? (lane + static_cast<int32_t>(t + 8 * q)) : best_idx;
      }
    }
  }
  float s = 0.f, bv = -kInf;
  int64_t bi = 0;
  for (int i = 0; i < 8; ++i) {
    s += sum[i];
    if (best[i] > bv || (best[i] == bv && best_idx[i] < bi)) {
      bv = best[i];
      bi = best_idx[i];
    }
  }
  return {bi, (buf[bi] - m) - std::log(s)};
}

template <typename T>
void remask_rows(const at::Tensor& logits, const at::Tensor* uncond, const Params& p, const bool* masked,
                 const int64_t* tokens_in, int64_t* tokens_out, float* confidence) {
  const T* lc_base = logits.data_ptr<T>();
  const T* lu_base = uncond ? uncond->data_ptr<T>() : nullptr;
  const int64_t sb = logits.stride(0), sn = logits.stride(1);
  const int64_t ub = uncond ? uncond->stride(0) : 0, un = uncond ? uncond->stride(1) : 0;
  const int64_t Kpad = (p.K + kTile - 1) / kTile * kTile;
  const uint32_t c3_choice = philox::counter_word3(philox::kStreamChoice, p.step);
  // ~2^18 logits (a few hundred µs) per thread at least: below that, waking a second thread
  // costs more than it saves, and far more on a busy machine.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / p.K);
  at::parallel_for(0, p.B * p.N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(Kpad), scratch;
    if (p.top_k > 0 && p.top_k < p.K) scratch.resize(p.K);
    std::fill(buf.begin() + p.K, buf.end(), -kInf);
    for (int64_t r = r0; r < r1; ++r) {
      if (!masked[r]) {
        tokens_out[r] = tokens_in[r];
        confidence[r] = kInf;
        continue;
      }
      const int64_t b = r / p.N, n = r % p.N;
      const float m = guided_row(lc_base + b * sb + n * sn, lu_base ? lu_base + b * ub + n * un : nullptr, p,
                                 buf.data());
      const RowResult res = sample_row(buf.data(), m, Kpad, p, static_cast<uint32_t>(b),
                                       static_cast<uint32_t>(n), scratch.data());
      tokens_out[r] = res.token;
      float c = res.logprob;
      if (c != -kInf) {
        if (p.confidence_prob) c = std::exp(c);
        if (p.choice_temperature != 0.f) {
          const philox::Words w = philox::philox4x32_10(0, static_cast<uint32_t>(n), static_cast<uint32_t>(b),
                                                        c3_choice, p.k0, p.k1);
          c = c + p.choice_temperature * philox::gumbel(w.x[0]);
        }
      }
      confidence[r] = c;
    }
  });
}

// Per image: the clamp(num_to_mask, 0, #masked) lowest confidences stay masked (ties -> lowest n).
void select_lowest(const float* confidence, const bool* masked, const int64_t* num_to_mask, int64_t B, int64_t N,
                   bool* masked_out) {
  at::parallel_for(0, B, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(N, 1)), [&](int64_t b0, int64_t b1) {
    std::vector<std::pair<float, int64_t>> cand;
    for (int64_t b = b0; b < b1; ++b) {
      cand.clear();
      for (int64_t n = 0; n < N; ++n)
        if (masked[b * N + n]) cand.emplace_back(confidence[b * N + n], n);
      const int64_t keep = std::min<int64_t>(std::max<int64_t>(num_to_mask[b], 0), cand.size());
      if (keep > 0 && keep < static_cast<int64_t>(cand.size()))
        std::nth_element(cand.begin(), cand.begin() + keep, cand.end());  // (confidence, n) order
      for (int64_t i = 0; i < keep; ++i) masked_out[b * N + cand[i].second] = true;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cfg_sample_remask_cpu(const at::Tensor& logits,
                                                         const c10::optional<at::Tensor>& uncond_logits,
                                                         const at::Tensor& tokens, const at::Tensor& masked,
                                                         const at::Tensor& num_to_mask, double guidance_scale,
                                                         double temperature, double choice_temperature,
                                                         int64_t top_k, bool confidence_prob, int64_t seed_lo,
                                                         int64_t seed_hi, int64_t step) {
  TORCH_CHECK(logits.dim() == 3, "cfg_sample_remask: logits must be (B, N, K)");
  TORCH_CHECK(logits.size(2) > 0, "cfg_sample_remask: K must be positive");
  TORCH_CHECK(temperature >= 0.0, "cfg_sample_remask: temperature must be >= 0");
  const int64_t B = logits.size(0), N = logits.size(1), K = logits.size(2);
  TORCH_CHECK(K < (int64_t{1} << 31), "cfg_sample_remask: K too large");
  auto lc = logits.stride(2) == 1 ? logits : logits.contiguous();
  c10::optional<at::Tensor> lu;
  if (uncond_logits.has_value()) {
    TORCH_CHECK(uncond_logits->sizes() == logits.sizes() && uncond_logits->scalar_type() == logits.scalar_type(),
                "cfg_sample_remask: uncond_logits must match logits in shape and dtype");
    lu = uncond_logits->stride(2) == 1 ? *uncond_logits : uncond_logits->contiguous();
  }
  TORCH_CHECK(tokens.sizes() == at::IntArrayRef({B, N}) && tokens.scalar_type() == at::kLong,
              "cfg_sample_remask: tokens must be (B, N) int64");
  TORCH_CHECK(masked.sizes() == at::IntArrayRef({B, N}) && masked.scalar_type() == at::kBool,
              "cfg_sample_remask: masked must be (B, N) bool");
  TORCH_CHECK(num_to_mask.dim() == 1 && num_to_mask.size(0) == B && num_to_mask.scalar_type() == at::kLong,
              "cfg_sample_remask: num_to_mask must be (B,) int64");
  const auto tok = tokens.contiguous();
  const auto msk = masked.contiguous();
  const auto ntm = num_to_mask.contiguous();

  Params p;
  p.B = B;
  p.N = N;
  p.K = K;
  p.guidance = static_cast<float>(guidance_scale);
  p.cfg = lu.has_value() && guidance_scale != 1.0;
  p.sample = temperature > 0.0;
  p.inv_tau = p.sample ? static_cast<float>(1.0 / temperature) : 0.f;
  p.choice_temperature = static_cast<float>(choice_temperature);
  p.top_k = top_k;
  p.confidence_prob = confidence_prob;
  p.k0 = static_cast<uint32_t>(seed_lo);
  p.k1 = static_cast<uint32_t>(seed_hi);
  p.step = static_cast<uint32_t>(step);

  auto tokens_out = at::empty({B, N}, tok.options());
  auto masked_out = at::zeros({B, N}, msk.options());
  auto confidence = at::empty({B, N}, lc.options().dtype(at::kFloat));
  if (B * N == 0) return {tokens_out, masked_out};
  const at::Tensor* lu_ptr = lu.has_value() ? &*lu : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "cfg_sample_remask_cpu", [&] {
    remask_rows<scalar_t>(lc, lu_ptr, p, msk.data_ptr<bool>(), tok.data_ptr<int64_t>(),
                          tokens_out.data_ptr<int64_t>(), confidence.data_ptr<float>());
  });
  select_lowest(confidence.data_ptr<float>(), msk.data_ptr<bool>(), ntm.data_ptr<int64_t>(), B, N,
                masked_out.data_ptr<bool>());
  return {tokens_out, masked_out};
}

// Shapes only (fake tensors, torch.compile): outputs are (B, N) like tokens and masked.
std::tuple<at::Tensor, at::Tensor> cfg_sample_remask_meta(const at::Tensor& logits,
                                                          const c10::optional<at::Tensor>& uncond_logits,
                                                          const at::Tensor& tokens, const at::Tensor& masked,
                                                          const at::Tensor& num_to_mask, double guidance_scale,
                                                          double temperature, double choice_temperature,
                                                          int64_t top_k, bool confidence_prob, int64_t seed_lo,
                                                          int64_t seed_hi, int64_t step) {
  TORCH_CHECK(logits.dim() == 3, "cfg_sample_remask: logits must be (B, N, K)");
  const auto shape = logits.sizes().slice(0, 2);
  return {at::empty(shape, tokens.options()), at::empty(shape, masked.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(musefast, m) {
  m.def(
      "cfg_sample_remask(Tensor logits, Tensor? uncond_logits, Tensor tokens, Tensor masked, Tensor num_to_mask, "
      "float guidance_scale, float temperature, float choice_temperature, int top_k, bool confidence_prob, "
      "int seed_lo, int seed_hi, int step) -> (Tensor tokens, Tensor masked)");
}

TORCH_LIBRARY_IMPL(musefast, CPU, m) { m.impl("cfg_sample_remask", &cfg_sample_remask_cpu); }

TORCH_LIBRARY_IMPL(musefast, Meta, m) { m.impl("cfg_sample_remask", &cfg_sample_remask_meta); }

}  // namespace musefast
