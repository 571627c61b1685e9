#pragma once
/// @file rope_params.hpp
/// The parameter struct of the RoPE ops, shared by the CPU op (ops/rope.hpp)
/// and the CUDA kernel (cuda/rope.cuh), and the per-position cos/sin lookup.

#include <cmath>
#include <cstdint>

#include "kvkit/core/config.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/ops/rope_math.hpp"

namespace kvkit {

/// In-place rotation of the query and key heads of a batch of tokens.
/// Element (token t, head h, dim d) of q is at q[t * q_token_stride + h * q_head_stride + d]
/// (strides in elements; dims are contiguous). Either q or k may be null.
struct RopeParams {
  void* q = nullptr;                ///< [num_tokens, num_q_heads, head_dim] (strided)
  std::int64_t q_token_stride = 0;
  std::int64_t q_head_stride = 0;
  int num_q_heads = 0;
  void* k = nullptr;                ///< [num_tokens, num_k_heads, head_dim] (strided)
  std::int64_t k_token_stride = 0;
  std::int64_t k_head_stride = 0;
  int num_k_heads = 0;
  const std::int64_t* positions = nullptr;  ///< [num_tokens]; for a key shift, the deltas
  std::int64_t num_tokens = 0;
  int head_dim = 0;
  int rotary_dim = 0;               ///< leading dims rotated; the rest are left bit-exact
  RopeStyle style = RopeStyle::kNeox;
  DType dtype = DType::kFloat32;    ///< of q and k: float32, float16 or bfloat16
  /// Either a cos/sin table [cache_positions, rotary_dim] (cos in the first
  /// half of each row, sin in the second: vLLM's cos_sin_cache layout) ...
  const float* cos_sin_cache = nullptr;
  std::int64_t cache_positions = 0;
  /// ... or, when cos_sin_cache is null, float64 inverse frequencies
  /// [rotary_dim / 2] and the YaRN attention factor, for on-the-fly angles.
  const double* inv_freq = nullptr;
  float attention_factor = 1.0f;
  /// The rotary_dim the table and inv_freq were made for (RopeCache::attach
  /// sets it); when > 0 it must equal rotary_dim, since rows of another
  /// width would be read past their end. 0: not checked (a table made
  /// elsewhere, which must then be [cache_positions, rotary_dim]).
  int cache_rotary_dim = 0;
};

/// cos and sin of pair `i` at `position` (negative positions rotate backwards).
/// From the table when present, else computed in float64 with the angle
/// reduced modulo 2π before rounding, so large positions (1e6 and beyond)
/// stay accurate to float precision.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE void rope_cos_sin(const RopeParams& p, std::int64_t position,
                                                      int i, float& cos_a, float& sin_a) {
  const std::int64_t magnitude = position < 0 ? -position : position;
  if (p.cos_sin_cache != nullptr) {
    const float* row = p.cos_sin_cache + magnitude * p.rotary_dim;
    cos_a = row[i];
    sin_a = row[p.rotary_dim / 2 + i];
  } else {
    const double angle = fmod(double(magnitude) * p.inv_freq[i], 2.0 * kPi);
    cos_a = float(cos(angle) * double(p.attention_factor));
    sin_a = float(sin(angle) * double(p.attention_factor));
  }
  if (position < 0) sin_a = -sin_a;
}

}  // namespace kvkit
