#pragma once
// Per-token math the examples' models share: matrix-vector products, RMSNorm,
// SiLU. Plain loops: kvkit does not own GEMMs; an engine calls its BLAS here.

#include <cmath>
#include <cstddef>

namespace examples {

// out[o] = sum_i w[o * in + i] * x[i] for o < out_dim (w row-major [out, in]).
inline void matvec(float* out, const float* w, const float* x, int out_dim, int in_dim) {
  for (int o = 0; o < out_dim; ++o) {
    const float* row = w + std::size_t(o) * in_dim;
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums: the loop vectorizes
    int i = 0;
    for (; i + 8 <= in_dim; i += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += row[i + l] * x[i + l];
    float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (; i < in_dim; ++i) sum += row[i] * x[i];
    out[o] = sum;
  }
}

inline void rmsnorm(float* out, const float* x, const float* weight, int n, float eps = 1e-5f) {
  double ss = 0.0;
  for (int i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(float(ss / n) + eps);
  for (int i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace examples
