// Codebook nearest-neighbour quantization on the CPU: argmin_k ||z_n - c_k||^2 without
// ever holding the N×K distance matrix.
//
// Ranking uses ||c_k||^2 - 2 z·c_k (||z||^2 is constant per row and added back only for
// the returned distance). The inner loop is a small GEMM micro-kernel: a tile of kRows rows
// against a block of kCodes codes held transposed (D × kCodes, contiguous), so each step
// over D is two vector loads, kRows broadcasts and 2·kRows FMAs on 8-wide vectors. The
// running min/argmin stays in vectors too (one lane per code of the block) and is reduced
// across lanes once per row at the end, lowest index first on ties.
// The codebook is walked in chunks that fit in L2 while a chunk of rows is swept over it.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <cstring>
#include <limits>
#include <vector>

namespace musefast {
namespace {

typedef float vfloat8 __attribute__((vector_size(32)));
typedef int vint8 __attribute__((vector_size(32)));

constexpr int kVecs = 3;                // 8-wide vectors of codes per block
constexpr int kCodes = 8 * kVecs;       // codes per block
constexpr int kRows = 4;                // rows per micro-tile: 12 accumulators + 3 code vectors
constexpr int kRowChunk = 32 * kRows;   // rows a thread sweeps over one codebook chunk
constexpr int64_t kL2Bytes = 192 * 1024;  // codebook bytes per chunk, sized to stay in L2

inline vfloat8 broadcast8(const float* p) {
#ifdef __AVX__
  return reinterpret_cast<vfloat8>(_mm256_broadcast_ss(p));  // one load uop, no shuffle
#else
  return vfloat8{} + *p;
#endif
}

inline vfloat8 load8(const float* p) {
  vfloat8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Codebook as float32, transposed per block: packed[b][d][j] = c[b*kCodes + j][d].
// Padding codes get +inf norm so they never win.
struct PackedCodebook {
  int64_t num_blocks;
  std::vector<float> values;  // num_blocks * D * kCodes
  std::vector<float> sqnorm;  // num_blocks * kCodes
};

template <typename scalar_t>
PackedCodebook pack_codebook(const scalar_t* cb, int64_t K, int64_t D) {
  PackedCodebook p;
  p.num_blocks = (K + kCodes - 1) / kCodes;
  p.values.assign(p.num_blocks * D * kCodes, 0.f);
  p.sqnorm.assign(p.num_blocks * kCodes, std::numeric_limits<float>::infinity());
  at::parallel_for(0, p.num_blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int j = 0; j < kCodes; ++j) {
        const int64_t k = b * kCodes + j;
        if (k >= K) break;
        float norm = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float v = static_cast<float>(cb[k * D + d]);
          p.values[(b * D + d) * kCodes + j] = v;
          norm += v * v;
        }
        p.sqnorm[b * kCodes + j] = norm;
      }
    }
  });
  return p;
}

// Running best of one row: per lane, the smallest score seen and the block it came from.
struct RowBest {
  vfloat8 score[kVecs];
  vint8 block[kVecs];
};

// One micro-tile: kRows rows (float32, d-major) against code blocks [b0, b1).
inline void micro_tile(const float* zt, int64_t D, const PackedCodebook& cb, int64_t b0, int64_t b1,
                       RowBest* best) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* cp = cb.values.data() + b * D * kCodes;
    vfloat8 acc[kRows][kVecs];
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[r][v] = vfloat8{};
    // zt is d-major (zt[d * kRows + r]) so a row's value is a single broadcast load.
#pragma GCC unroll 2
    for (int64_t d = 0; d < D; ++d) {
      vfloat8 c[kVecs];
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) c[v] = load8(cp + d * kCodes + 8 * v);
#pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
        const vfloat8 zr = broadcast8(zt + d * kRows + r);
#pragma GCC unroll 4
        for (int v = 0; v < kVecs; ++v) acc[r][v] += zr * c[v];
      }
    }
    const vint8 bv = vint8{} + static_cast<int>(b);
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      const vfloat8 norm = load8(cb.sqnorm.data() + b * kCodes + 8 * v);
#pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
        const vfloat8 s = norm - 2.f * acc[r][v];
        // strict < keeps the earliest block per lane: lowest index on ties
        const vint8 m = s < best[r].score[v];
        best[r].score[v] = m ? s : best[r].score[v];
        best[r].block[v] = m ? bv : best[r].block[v];
      }
    }
  }
}

template <typename scalar_t>
void vq_nearest_rows(const scalar_t* z, int64_t N, int64_t D, int64_t K, const PackedCodebook& cb,
                     int64_t* out_idx, float* out_dist) {
  const int64_t chunk_blocks =
      std::max<int64_t>(1, kL2Bytes / (D * kCodes * static_cast<int64_t>(sizeof(float))));
  const int64_t num_chunks = (N + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> zbuf(kRowChunk * D);
    std::vector<RowBest> best(kRowChunk);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t r0 = chunk * kRowChunk;
      const int64_t rows = std::min<int64_t>(kRowChunk, N - r0);
      // float32 copy of the rows; missing rows of the last tile are zeros (results dropped)
      // tile t holds rows t*kRows.. as zbuf[t*kRows*D + d*kRows + r] (d-major within a tile)
      std::fill(zbuf.begin(), zbuf.end(), 0.f);
      for (int64_t i = 0; i < rows; ++i) {
        float* tile = zbuf.data() + (i / kRows) * kRows * D + (i % kRows);
        for (int64_t d = 0; d < D; ++d) tile[d * kRows] = static_cast<float>(z[(r0 + i) * D + d]);
      }
      const float inf = std::numeric_limits<float>::infinity();
      for (auto& rb : best) {
        for (int v = 0; v < kVecs; ++v) {
          rb.score[v] = vfloat8{} + inf;
          rb.block[v] = vint8{};
        }
      }
      const int64_t tiles = (rows + kRows - 1) / kRows;
      for (int64_t b0 = 0; b0 < cb.num_blocks; b0 += chunk_blocks) {
        const int64_t b1 = std::min(cb.num_blocks, b0 + chunk_blocks);
        for (int64_t t = 0; t < tiles; ++t)
          micro_tile(zbuf.data() + t * kRows * D, D, cb, b0, b1, best.data() + t * kRows);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float best_score = inf;
        int64_t best_k = 0;
        for (int j = 0; j < kCodes; ++j) {
          const float s = best[r].score[j / 8][j % 8];
          const int64_t k = static_cast<int64_t>(best[r].block[j / 8][j % 8]) * kCodes + j;
          if (s < best_score || (s == best_score && k < best_k)) {
            best_score = s;
            best_k = k;
          }
        }
        const float* tile = zbuf.data() + (r / kRows) * kRows * D + (r % kRows);
        float znorm = 0.f;
        for (int64_t d = 0; d < D; ++d) znorm += tile[d * kRows] * tile[d * kRows];
        out_idx[r0 + r] = std::min<int64_t>(best_k, K - 1);
        const float dist = znorm + best_score;  // NaN rows stay NaN (and get index 0)
        out_dist[r0 + r] = dist < 0.f ? 0.f : dist;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, "vq_nearest: z (N, D) and codebook (K, D) expected");
  TORCH_CHECK(z.size(1) == codebook.size(1), "vq_nearest: D mismatch");
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "vq_nearest: z and codebook dtypes differ");
  TORCH_CHECK(codebook.size(0) > 0, "vq_nearest: empty codebook");
  const auto zc = z.contiguous();
  const auto cbc = codebook.contiguous();
  const int64_t N = zc.size(0), D = zc.size(1), K = cbc.size(0);
  auto idx = at::empty({N}, zc.options().dtype(at::kLong));
  auto dist = at::empty({N}, zc.options().dtype(at::kFloat));
  if (N == 0) return {idx, dist};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "vq_nearest_cpu", [&] {
    const auto packed = pack_codebook(cbc.data_ptr<scalar_t>(), K, D);
    vq_nearest_rows(zc.data_ptr<scalar_t>(), N, D, K, packed, idx.data_ptr<int64_t>(), dist.data_ptr<float>());
  });
  return {idx, dist};
}

// Shapes and dtypes only (fake tensors): what torch.compile and torch.library.opcheck trace with.
std::tuple<at::Tensor, at::Tensor> vq_nearest_meta(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, "vq_nearest: z (N, D) and codebook (K, D) expected");
  return {at::empty({z.size(0)}, z.options().dtype(at::kLong)), at::empty({z.size(0)}, z.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(musefast, m) {
  m.def("vq_nearest(Tensor z, Tensor codebook) -> (Tensor indices, Tensor distances)");
}

TORCH_LIBRARY_IMPL(musefast, CPU, m) { m.impl("vq_nearest", &vq_nearest_cpu); }

TORCH_LIBRARY_IMPL(musefast, Meta, m) { m.impl("vq_nearest", &vq_nearest_meta); }

}  // namespace musefast
