// q/k RMSNorm + rotary embedding + head split of fused QKV projections on the CPU
// (ops.qk_norm_rope; the definition is musefast/reference/rope.py).
//
// One task per (batch, row) of a stream: the row's 3·H·D values are read once. Each q/k head is
// widened to float32 (fp16/bf16: in a scratch buffer), its mean square reduced in 8-wide GCC
// vectors, and its channel pairs normalised, weighted and rotated eight at a time (even/odd
// channels de-interleaved by shuffles), then narrowed straight into out[part, b, h, offset + l, :]:
// the (B, H, L, D) layout attention reads, each stream at its row offset of the joint sequence,
// so there is no later concatenation. v heads are copied into the same layout.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace musefast {
namespace {

typedef float vf8 __attribute__((vector_size(32)));

inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

struct Tables {
  const float* cos;
  const float* sin;
};

// A head's weights split into even and odd channels (one entry per pair), so the vector loop
// below multiplies whole vectors without shuffling the weights.
struct PairWeights {
  std::vector<float> even, odd;
  explicit PairWeights(const at::Tensor& w) {
    const auto wf = w.to(at::kFloat).contiguous();
    const float* p = wf.data_ptr<float>();
    for (int64_t i = 0; i < wf.numel() / 2; ++i) {
      even.push_back(p[2 * i]);
      odd.push_back(p[2 * i + 1]);
    }
  }
};

// One q/k head in float32: y = x / sqrt(mean(x²) + eps) · w, pairs rotated by (c, s) -> out.
// Eight pairs (16 channels) per step: two loads de-interleaved into even/odd vectors, the
// rotation as whole-vector products, re-interleaved for the store.
inline void norm_rotate(const float* x, const float* w0, const float* w1, const float* c, const float* s, int64_t D,
                        float eps, float* out) {
  const int64_t P = D / 2, P8 = P - P % 8;
  vf8 acc = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const vf8 v = load8(x + d);
    acc += v * v;
  }
  float ss = 0.f;
  for (int k = 0; k < 8; ++k) ss += acc[k];
  for (; d < D; ++d) ss += x[d] * x[d];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < P8; i += 8) {
    const vf8 a = load8(x + 2 * i), b = load8(x + 2 * i + 8);
    const vf8 y0 = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) * inv * load8(w0 + i);
    const vf8 y1 = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15) * inv * load8(w1 + i);
    const vf8 ci = load8(c + i), si = load8(s + i);
    const vf8 o0 = y0 * ci - y1 * si, o1 = y1 * ci + y0 * si;
    store8(out + 2 * i, __builtin_shufflevector(o0, o1, 0, 8, 1, 9, 2, 10, 3, 11));
    store8(out + 2 * i + 8, __builtin_shufflevector(o0, o1, 4, 12, 5, 13, 6, 14, 7, 15));
  }
  for (int64_t i = P8; i < P; ++i) {
    const float y0 = x[2 * i] * inv * w0[i], y1 = x[2 * i + 1] * inv * w1[i];
    out[2 * i] = y0 * c[i] - y1 * s[i];
    out[2 * i + 1] = y1 * c[i] + y0 * s[i];
  }
}

// Conversions to and from float32. bf16 by its bit pattern (round to nearest even, NaN kept
// NaN) in branch-free loops the compiler vectorises; c10's scalar conversion branches per value.
template <typename scalar_t>
void widen(const scalar_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

template <>
void widen<at::BFloat16>(const at::BFloat16* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(in[i].x) << 16;
    std::memcpy(out + i, &bits, sizeof(bits));
  }
}

template <typename scalar_t>
void narrow(const float* in, scalar_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(in[i]);
}

template <>
void narrow<at::BFloat16>(const float* in, at::BFloat16* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, in + i, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    out[i].x = static_cast<uint16_t>(in[i] != in[i] ? 0x7fc0u : rounded);
  }
}

template <typename scalar_t>
void stream_rows(const at::Tensor& x, const PairWeights& wq, const PairWeights& wk, Tables t, int64_t H, int64_t D,
                 float eps, int64_t offset, int64_t L_total, scalar_t* out) {
  const int64_t B = x.size(0), L = x.size(1), P = D / 2;
  const int64_t sb = x.stride(0), sl = x.stride(1);
  const int64_t part_stride = B * H * L_total * D;
  const scalar_t* src = x.data_ptr<scalar_t>();
  at::parallel_for(0, B * L, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * D);
    float* xf = scratch.data();
    float* yf = scratch.data() + D;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L, l = r % L;
      const scalar_t* row = src + b * sb + l * sl;
      const float* c = t.cos + (offset + l) * P;
      const float* s = t.sin + (offset + l) * P;
      for (int64_t part = 0; part < 3; ++part) {
        const PairWeights& w = part == 0 ? wq : wk;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* in = row + (part * H + h) * D;
          scalar_t* dst = out + part * part_stride + ((b * H + h) * L_total + offset + l) * D;
          if (part == 2) {
            std::copy(in, in + D, dst);
            continue;
          }
          if constexpr (std::is_same_v<scalar_t, float>) {
            norm_rotate(in, w.even.data(), w.odd.data(), c, s, D, eps, dst);
          } else {
            widen(in, xf, D);
            norm_rotate(xf, w.even.data(), w.odd.data(), c, s, D, eps, yf);
            narrow(yf, dst, D);
          }
        }
      }
    }
  });
}

at::Tensor qk_norm_rope_cpu(at::TensorList qkv, at::TensorList q_weight, at::TensorList k_weight,
                            const at::Tensor& cos, const at::Tensor& sin, int64_t heads, double eps) {
  TORCH_CHECK(!qkv.empty() && q_weight.size() == qkv.size() && k_weight.size() == qkv.size(),
              "qk_norm_rope: one q_weight and one k_weight per qkv stream expected");
  const at::Tensor& first = qkv[0];
  TORCH_CHECK(heads > 0 && first.dim() == 3 && first.size(2) % (6 * heads) == 0,
              "qk_norm_rope: qkv must be (B, L, 3*heads*D) with D even");
  const int64_t B = first.size(0), width = first.size(2), D = width / (3 * heads);
  int64_t L_total = 0;
  for (const auto& x : qkv) {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == B && x.size(2) == width && x.scalar_type() == first.scalar_type(),
                "qk_norm_rope: every qkv stream must be (B, L, 3*heads*D) of one dtype");
    L_total += x.size(1);
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == at::IntArrayRef({L_total, D / 2}) && sin.sizes() == cos.sizes(),
              "qk_norm_rope: cos and sin must be contiguous float32 (L_total, D/2)");
  auto out = at::empty({3, B, heads, L_total, D}, first.options());
  const Tables tables{cos.data_ptr<float>(), sin.data_ptr<float>()};
  int64_t offset = 0;
  for (size_t i = 0; i < qkv.size(); ++i) {
    const auto x = qkv[i].stride(2) == 1 ? qkv[i] : qkv[i].contiguous();
    TORCH_CHECK(q_weight[i].numel() == D && k_weight[i].numel() == D, "qk_norm_rope: weights must have D elements");
    const PairWeights wq(q_weight[i]), wk(k_weight[i]);
    if (x.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "qk_norm_rope_cpu", [&] {
        stream_rows<scalar_t>(x, wq, wk, tables, heads, D,
                              static_cast<float>(eps), offset, L_total, out.data_ptr<scalar_t>());
      });
    }
    offset += x.size(1);
  }
  return out;
}

// Shapes and dtypes only (fake tensors): what torch.compile and torch.library.opcheck trace with.
at::Tensor qk_norm_rope_meta(at::TensorList qkv, at::TensorList q_weight, at::TensorList k_weight,
                             const at::Tensor& cos, const at::Tensor& sin, int64_t heads, double eps) {
  TORCH_CHECK(!qkv.empty() && heads > 0 && qkv[0].dim() == 3, "qk_norm_rope: qkv must be (B, L, 3*heads*D) streams");
  int64_t L_total = 0;
  for (const auto& x : qkv) L_total += x.size(1);
  const at::Tensor& first = qkv[0];
  return at::empty({3, first.size(0), heads, L_total, first.size(2) / (3 * heads)}, first.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(musefast, m) {
  m.def("qk_norm_rope(Tensor[] qkv, Tensor[] q_weight, Tensor[] k_weight, Tensor cos, Tensor sin, int heads, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(musefast, CPU, m) { m.impl("qk_norm_rope", &qk_norm_rope_cpu); }

TORCH_LIBRARY_IMPL(musefast, Meta, m) { m.impl("qk_norm_rope", &qk_norm_rope_meta); }

}  // namespace musefast
