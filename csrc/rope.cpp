// q/k RMSNorm + rotary embedding + head split of fused QKV projections on the CPU
// (ops.qk_norm_rope; the definition is musefast/reference/rope.py).
//
// One task per (batch, row) of a stream: the row's 3·H·D values are read once. Each q/k head is
// widened to float32 in a scratch buffer, its mean square reduced with at::vec, and its channel
// pairs normalised, weighted and rotated in one loop (stride-2 pairs, which the compiler
// vectorises), then narrowed straight into out[part, b, h, offset + l, :] — the (B, H, L, D)
// layout attention reads, each stream at its row offset of the joint sequence, so there is no
// later concatenation. v heads are copied into the same layout.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <vector>

namespace musefast {
namespace {

using Vec = at::vec::Vectorized<float>;

struct Tables {
  const float* cos;
  const float* sin;
};

template <typename scalar_t>
void stream_rows(const at::Tensor& x, const float* wq, const float* wk, Tables t, int64_t H, int64_t D, float eps,
                 int64_t offset, int64_t L_total, scalar_t* out) {
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
        const float* w = part == 0 ? wq : wk;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* in = row + (part * H + h) * D;
          scalar_t* dst = out + part * part_stride + ((b * H + h) * L_total + offset + l) * D;
          if (part == 2) {
            std::copy(in, in + D, dst);
            continue;
          }
          at::vec::convert(in, xf, D);
          const float ss = at::vec::map_reduce_all<float>([](Vec v) { return v * v; },
                                                          [](Vec a, Vec v) { return a + v; }, xf, D);
          const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
          for (int64_t i = 0; i < P; ++i) {
            const float y0 = xf[2 * i] * inv * w[2 * i];
            const float y1 = xf[2 * i + 1] * inv * w[2 * i + 1];
            yf[2 * i] = y0 * c[i] - y1 * s[i];
            yf[2 * i + 1] = y1 * c[i] + y0 * s[i];
          }
          at::vec::convert(yf, dst, D);
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
    const auto wq = q_weight[i].to(at::kFloat).contiguous();
    const auto wk = k_weight[i].to(at::kFloat).contiguous();
    TORCH_CHECK(wq.numel() == D && wk.numel() == D, "qk_norm_rope: weights must have D elements");
    if (x.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "qk_norm_rope_cpu", [&] {
        stream_rows<scalar_t>(x, wq.data_ptr<float>(), wk.data_ptr<float>(), tables, heads, D,
                              static_cast<float>(eps), offset, L_total, out.data_ptr<scalar_t>());
      });
    }
    offset += x.size(1);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(musefast, m) {
  m.def("qk_norm_rope(Tensor[] qkv, Tensor[] q_weight, Tensor[] k_weight, Tensor cos, Tensor sin, int heads, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(musefast, CPU, m) { m.impl("qk_norm_rope", &qk_norm_rope_cpu); }

}  // namespace musefast
