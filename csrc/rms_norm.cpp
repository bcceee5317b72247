// RMSNorm with aMUSEd's modulation in one pass over the activations, on the CPU:
//   y[b, n, :] = x[b, n, :] * rsqrt(mean(x[b, n, :]^2) + eps) * scale[b, :] + shift[b, :]
// scale and shift are optional (B, C) tensors (the AdaNorm modulation, with the norm's own weight
// already folded into scale; a plain RMSNorm passes its weight as a (1, C) scale). torch's CPU
// rms_norm is a composite of about seven passes (to float32, pow, mean, rsqrt, mul, type_as,
// weight); here each row is read twice (sum of squares, then the output) and written once, with
// float32 arithmetic and one rounding to the output dtype.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>

namespace musefast {
namespace {

template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, const scalar_t* scale, const scalar_t* shift, scalar_t* y,
                   int64_t rows_per_batch, int64_t scale_batch_stride, int64_t C, double eps,
                   int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x + r * C;
    scalar_t* yr = y + r * C;
    float sum = 0.f;
    for (int64_t c = 0; c < C; ++c) {  // vectorised by the compiler (-O3 -march=native)
      const float v = static_cast<float>(xr[c]);
      sum += v * v;
    }
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(C) + static_cast<float>(eps));
    const int64_t b = r / rows_per_batch;
    const scalar_t* sr = scale ? scale + b * scale_batch_stride : nullptr;
    const scalar_t* tr = shift ? shift + b * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      float v = static_cast<float>(xr[c]) * inv;
      if (sr) v *= static_cast<float>(sr[c]);
      if (tr) v += static_cast<float>(tr[c]);
      yr[c] = static_cast<scalar_t>(v);
    }
  }
}

at::Tensor rms_norm_modulate_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                                 const c10::optional<at::Tensor>& shift, double eps) {
  TORCH_CHECK(x.dim() == 3, "rms_norm_modulate: x must be (B, N, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rms_norm_modulate: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  auto check = [&](const c10::optional<at::Tensor>& t, const char* name, bool one_row_ok) {
    if (!t.has_value()) return at::Tensor();
    TORCH_CHECK(t->dim() == 2 && t->size(1) == C && (t->size(0) == B || (one_row_ok && t->size(0) == 1)),
                "rms_norm_modulate: ", name, " must be (B, C)", one_row_ok ? " or (1, C)" : "", ", got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "rms_norm_modulate: ", name, " must have x's dtype");
    return t->contiguous();
  };
  const at::Tensor s = check(scale, "scale", true), t = check(shift, "shift", false);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t scale_batch_stride = s.defined() && s.size(0) == B ? C : 0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_modulate", [&] {
    const scalar_t* sp = s.defined() ? s.data_ptr<scalar_t>() : nullptr;
    const scalar_t* tp = t.defined() ? t.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
      rms_norm_rows<scalar_t>(xp, sp, tp, yp, N, scale_batch_stride, C, eps, begin, end);
    });
  });
  return y;
}

// Shape and dtype only (fake tensors): what torch.compile and torch.library.opcheck trace with.
at::Tensor rms_norm_modulate_meta(const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                                  const c10::optional<at::Tensor>& shift, double eps) {
  TORCH_CHECK(x.dim() == 3, "rms_norm_modulate: x must be (B, N, C), got ", x.sizes());
  return at::empty(x.sizes(), x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(musefast, m) {
  m.def("rms_norm_modulate(Tensor x, Tensor? scale, Tensor? shift, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(musefast, CPU, m) { m.impl("rms_norm_modulate", &rms_norm_modulate_cpu); }

TORCH_LIBRARY_IMPL(musefast, Meta, m) { m.impl("rms_norm_modulate", &rms_norm_modulate_meta); }

}  // namespace musefast
