#pragma once
/// @file mla_fp8.hpp
/// The fp8 latent cache (layout/latent_fp8_layout.hpp, FlashMLA's 656-byte
/// rows) on the CPU: quantize-on-append of latent rows [c_kv | k_pe] (for
/// example the rows mla_compress wrote to a staging buffer, or any engine's
/// compressed rows) and the dequantizing gather back to [tokens, 576].

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/ops/quantize_row.hpp"

namespace kvkit {

namespace detail {

/// mla_fp8_quantize_row for finite rows on the host, with the vectorizable
/// row kernels of quantize_row.hpp (bit-identical: the same largest finite
/// magnitude, the same division and round-to-nearest-even encoding).
inline void mla_fp8_quantize_row_host(const float* x, std::uint8_t* row) {
  for (int g = 0; g < MlaFp8Row::kNumGroups; ++g) {
    const float* v = x + g * MlaFp8Row::kGroupSize;
    const float scale = mla_fp8_group_scale(row_amax(v, MlaFp8Row::kGroupSize));
    std::uint8_t* out = row + g * MlaFp8Row::kGroupSize;
    if (scale > 0.0f) {
      quantize_row<float, DType::kFloat8E4M3>(v, MlaFp8Row::kGroupSize, scale, out);
    } else {
      std::memset(out, 0, MlaFp8Row::kGroupSize);
    }
    std::memcpy(row + MlaFp8Row::kScalesOffset + 4 * g, &scale, 4);
  }
  for (int d = 0; d < MlaFp8Row::kRopeDim; ++d) {
    const std::uint16_t b = float_to_bfloat16_bits(x[MlaFp8Row::kRank + d]);
    std::memcpy(row + MlaFp8Row::kRopeOffset + 2 * d, &b, 2);
  }
}

}  // namespace detail

/// Arguments of mla_fp8_append.
struct MlaFp8AppendArgs {
  const void* latent = nullptr;                ///< [num_tokens, 576]: c_kv (512) | rotated k_pe (64), strided rows
  std::int64_t latent_stride_token = 0;        ///< elements between rows (>= 576)
  DType dtype = DType::kBFloat16;              ///< of latent: float32, float16, bfloat16
  const std::int64_t* slot_mapping = nullptr;  ///< [num_tokens]; < 0: padding (skipped)
  std::int64_t num_tokens = 0;
  std::uint8_t* cache = nullptr;               ///< laid out by the LatentFp8Layout
};

namespace detail {

/// The checks of an fp8 latent append that read no data (shared by the CPU op
/// and cuda::mla_fp8_append): layout, token count, pointers, row stride and
/// source dtype. Throws kvkit::Error naming `where`.
inline void validate_mla_fp8_append(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a, const char* where) {
  layout.validate(where);
  check_argument(a.num_tokens >= 0, where, "num_tokens", a.num_tokens, ">= 0");
  if (a.num_tokens == 0) return;
  check_argument(a.latent != nullptr, where, "latent", a.latent, "a non-null pointer");
  check_argument(a.slot_mapping != nullptr, where, "slot_mapping", a.slot_mapping, "a non-null pointer");
  check_argument(a.cache != nullptr, where, "cache", static_cast<const void*>(a.cache), "a non-null pointer");
  check_argument(a.latent_stride_token >= MlaFp8Row::kLatentDim, where, "latent_stride_token",
                 a.latent_stride_token, ">= 576 (c_kv 512 + k_pe 64)");
  check_argument(a.dtype == DType::kFloat32 || a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16, where,
                 "dtype", a.dtype, "float32, float16 or bfloat16");
}

}  // namespace detail

/// Quantizes each token's latent row into its slot of the fp8 cache (scale
/// per 128 c_kv values = amax / 448, k_pe rounded to bf16: exact when the
/// input is bf16). Throws kvkit::Error, writing nothing, on a bad layout,
/// null pointers, a row stride < 576, a slot beyond the cache or a
/// non-finite input value.
inline void mla_fp8_append(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a) {
  constexpr const char* kWhere = "kvkit::mla_fp8_append";
  detail::validate_mla_fp8_append(layout, a, kWhere);
  if (a.num_tokens == 0) return;
  dispatch_dtype<FloatTypes>(a.dtype, kWhere, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = static_cast<const T*>(a.latent);
    // Every check before the first write, so that a failed call changes nothing.
    for (std::int64_t t = 0; t < a.num_tokens; ++t) {
      const std::int64_t slot = a.slot_mapping[t];
      if (slot >= layout.num_slots()) {
        fail_argument(kWhere, ("slot_mapping[" + std::to_string(t) + "]").c_str(), slot, "< num_slots (",
                      layout.num_slots(), ") or negative (padding)");
      }
      if (slot < 0) continue;
      // x - x is 0 for finite x and NaN for inf or NaN: eight independent sums
      // vectorize, and only a row that fails is searched for its column.
      const T* r = src + t * a.latent_stride_token;
      float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int d = 0; d < MlaFp8Row::kLatentDim; d += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += to_float(r[d + l]) - to_float(r[d + l]);
      const float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      if (sum != 0.0f) {
        for (int d = 0; d < MlaFp8Row::kLatentDim; ++d) {
          if (!std::isfinite(to_float(r[d]))) {
            fail(kWhere, "latent row ", t, " has a non-finite value at column ", d,
                 "; expected finite values (fp8 scales come from the group's largest magnitude)");
          }
        }
      }
    }
    // Tokens are independent: OpenMP threads share them when the program enables OpenMP.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (a.num_tokens >= 256)
#endif
    for (std::int64_t t = 0; t < a.num_tokens; ++t) {
      const std::int64_t slot = a.slot_mapping[t];
      if (slot < 0) continue;
      float row[MlaFp8Row::kLatentDim];
      for (int d = 0; d < MlaFp8Row::kLatentDim; ++d) row[d] = to_float(src[t * a.latent_stride_token + d]);
      detail::mla_fp8_quantize_row_host(row, a.cache + layout.slot_offset(slot));
    }
  });
}

/// Dequantizes the rows of `slots` ([num_tokens] slot ids, host memory) of
/// the fp8 cache into out ([num_tokens, 576] of out_dtype, rows
/// out_stride_token elements apart): c_kv = scale * e4m3, k_pe as stored.
/// For the naive (prefill) path and for tests. Throws kvkit::Error, writing
/// nothing, on a bad layout, null pointers, a stride < 576, an unsupported
/// dtype or a slot outside [0, num_slots).
inline void mla_fp8_gather(const LatentFp8Layout& layout, const std::uint8_t* cache, const std::int64_t* slots,
                           std::int64_t num_tokens, void* out, DType out_dtype, std::int64_t out_stride_token) {
  constexpr const char* kWhere = "kvkit::mla_fp8_gather";
  layout.validate(kWhere);
  check_argument(num_tokens >= 0, kWhere, "num_tokens", num_tokens, ">= 0");
  if (num_tokens == 0) return;
  check(cache != nullptr && slots != nullptr && out != nullptr, kWhere,
        "a null pointer among cache, slots, out; expected all non-null");
  check_argument(out_stride_token >= MlaFp8Row::kLatentDim, kWhere, "out_stride_token", out_stride_token,
                 ">= 576");
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    if (slots[t] < 0 || slots[t] >= layout.num_slots()) {
      fail_argument(kWhere, ("slots[" + std::to_string(t) + "]").c_str(), slots[t], "in [0, ", layout.num_slots(), ")");
    }
  }
  dispatch_dtype<FloatTypes>(out_dtype, kWhere, "out_dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(out);
    for (std::int64_t t = 0; t < num_tokens; ++t) {
      const std::uint8_t* row = cache + layout.slot_offset(slots[t]);
      for (int d = 0; d < MlaFp8Row::kLatentDim; ++d) {
        dst[t * out_stride_token + d] = from_float<T>(mla_fp8_value(row, d));
      }
    }
  });
}

}  // namespace kvkit
