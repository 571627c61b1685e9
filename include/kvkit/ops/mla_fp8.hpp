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
#include <type_traits>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/quantize_row_x86.hpp"
#include "kvkit/ops/token_chunks.hpp"

namespace kvkit {

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


/// mla_fp8_quantize_row for one finite source row, on the host, with the
/// vectorizable row kernels of quantize_row.hpp (bit-identical: the same
/// largest finite magnitude, the same division and round-to-nearest-even
/// encoding). Reads bfloat16 / half rows directly, without widening them
/// to a float row first. kAvx2Rows: see quantize_row_for_isa.
template <class T, bool kAvx2Rows = false>
KVKIT_FORCEINLINE void mla_fp8_quantize_row_host(const T* __restrict__ x, std::uint8_t* __restrict__ row) {
  for (int g = 0; g < MlaFp8Row::kNumGroups; ++g) {
    const T* v = x + g * MlaFp8Row::kGroupSize;
    const float scale = mla_fp8_group_scale(row_amax(v, MlaFp8Row::kGroupSize));
    std::uint8_t* out = row + g * MlaFp8Row::kGroupSize;
    if (scale > 0.0f) {
      quantize_row_for_isa<T, DType::kFloat8E4M3, kAvx2Rows>(v, MlaFp8Row::kGroupSize, scale, out);
    } else {
      std::memset(out, 0, MlaFp8Row::kGroupSize);
    }
    std::memcpy(row + MlaFp8Row::kScalesOffset + 4 * g, &scale, 4);
  }
  const T* k_pe = x + MlaFp8Row::kRank;
  std::uint16_t bits[MlaFp8Row::kRopeDim];
  for (int d = 0; d < MlaFp8Row::kRopeDim; ++d) {
    if constexpr (std::is_same_v<T, bfloat16>) {
      bits[d] = k_pe[d].bits;
    } else {
      bits[d] = float_to_bfloat16_bits(load_source(k_pe[d]));
    }
  }
  std::memcpy(row + MlaFp8Row::kRopeOffset, bits, sizeof(bits));
}

/// Quantizes tokens [first, end) of an fp8 latent append (after its checks)
/// into a 656-byte row in L1, then copies it to the slot's row, with
/// streaming stores for a large cache (see streaming_copy.hpp). Always
/// inlined into one function per ISA; every ISA writes the same bytes (the
/// encoder has no multiply-add to contract).
template <class T, bool kStreaming, bool kAvx2Rows>
KVKIT_FORCEINLINE void mla_fp8_append_tokens(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a,
                                             std::int64_t first, std::int64_t end) {
  alignas(64) std::uint8_t row[MlaFp8Row::kBytes];
  const T* src = static_cast<const T*>(a.latent);
  for (std::int64_t t = first; t < end; ++t) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0) continue;
    mla_fp8_quantize_row_host<T, kAvx2Rows>(src + t * a.latent_stride_token, row);
    copy_row<kStreaming>(a.cache + layout.slot_offset(slot), row, sizeof(row));
  }
  if (kStreaming) streaming_store_fence();
}

template <class T, bool kAvx2Rows = false>
KVKIT_FORCEINLINE void run_mla_fp8_append_tokens(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a,
                                                 std::int64_t first, std::int64_t end, bool streaming) {
  if (streaming) {
    mla_fp8_append_tokens<T, true, kAvx2Rows>(layout, a, first, end);
  } else {
    mla_fp8_append_tokens<T, false, kAvx2Rows>(layout, a, first, end);
  }
}

/// Quantizes tokens [first, end) with the widest ISA the CPU has (the AVX2
/// copy with quantize_row_avx2).
template <class T>
void mla_fp8_append_range(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a, std::int64_t first,
                          std::int64_t end, bool streaming) {
  constexpr X86Level kWidest = KVKIT_QUANTIZE_X86_DISPATCH ? X86Level::kAvx512 : X86Level::kBaseline;
  run_loops_on_widest_isa<kWidest, &run_mla_fp8_append_tokens<T>, &run_mla_fp8_append_tokens<T, true>,
                          &run_mla_fp8_append_tokens<T>>(layout, a, first, end, streaming);
}

/// Whether token t's row holds an inf or NaN. bfloat16 and half rows: the
/// largest magnitude pattern reaches the format's inf pattern (a 16-bit max,
/// which even SSE2 has: two operations per 8 values, ~4x fewer than
/// widening to float). float rows: x - x is 0 for finite x and NaN
/// otherwise, and eight independent sums vectorize.
template <class T>
KVKIT_FORCEINLINE bool latent_row_has_nonfinite(const T* r) {
  if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, half>) {
    std::int16_t m = 0;
    for (int d = 0; d < MlaFp8Row::kLatentDim; ++d) {
      const auto a = std::int16_t(r[d].bits & 0x7fffu);
      m = m > a ? m : a;
    }
    return m >= kInfBits16<T>;
  } else {
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int d = 0; d < MlaFp8Row::kLatentDim; d += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += r[d + l] - r[d + l];
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) != 0.0f;
  }
}

/// The first token, padding excluded, with a slot beyond the cache or a
/// non-finite value; num_tokens when there is none. Threads share the
/// tokens where OpenMP is enabled (the rows are read once more, before
/// anything is written).
template <class T>
KVKIT_VECTORIZE std::int64_t first_bad_latent_token(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a) {
  const T* src = static_cast<const T*>(a.latent);
  std::int64_t first_bad = a.num_tokens;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) reduction(min : first_bad) if (a.num_tokens >= 256)
#endif
  for (std::int64_t t = 0; t < a.num_tokens; ++t) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0) continue;
    if ((slot >= layout.num_slots() || latent_row_has_nonfinite(src + t * a.latent_stride_token)) && t < first_bad) {
      first_bad = t;
    }
  }
  return first_bad;
}

/// mla_fp8_append with the stores chosen by `stores` (tests force each kind).
inline void mla_fp8_append_with(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a, StoreKind stores) {
  constexpr const char* kWhere = "kvkit::mla_fp8_append";
  validate_mla_fp8_append(layout, a, kWhere);
  if (a.num_tokens == 0) return;
  dispatch_dtype<FloatTypes>(a.dtype, kWhere, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Every check before the first write, so that a failed call changes nothing.
    const std::int64_t t = first_bad_latent_token<T>(layout, a);
    if (t < a.num_tokens) {
      const std::int64_t slot = a.slot_mapping[t];
      if (slot >= layout.num_slots()) {
        fail_argument(kWhere, ("slot_mapping[" + std::to_string(t) + "]").c_str(), slot, "< num_slots (",
                      layout.num_slots(), ") or negative (padding)");
      }
      const T* r = static_cast<const T*>(a.latent) + t * a.latent_stride_token;
      int column = 0;
      while (std::isfinite(to_float(r[column]))) ++column;
      fail(kWhere, "latent row ", t, " has a non-finite value at column ", column,
           "; expected finite values (fp8 scales come from the group's largest magnitude)");
    }
    const bool streaming = use_streaming_stores(stores, layout.num_slots() * std::int64_t(MlaFp8Row::kBytes));
    // Tokens are independent: OpenMP threads share them when the program
    // enables OpenMP (with duplicate slots, which token's row lands is
    // unspecified, as on the GPU).
    for_each_token_chunk(a.num_tokens, /*chunk=*/64, /*min_tokens_to_thread=*/193,
                         [&](std::int64_t first, std::int64_t end) {
                           mla_fp8_append_range<T>(layout, a, first, end, streaming);
                         });
  });
}

}  // namespace detail

/// Quantizes each token's latent row into its slot of the fp8 cache (scale
/// per 128 c_kv values = amax / 448, k_pe rounded to bf16: exact when the
/// input is bf16). Throws kvkit::Error, writing nothing, on a bad layout,
/// null pointers, a row stride < 576, a slot beyond the cache or a
/// non-finite input value (the first offending token is named). A cache of
/// at least kStreamingStoreMinCacheBytes is written with streaming stores,
/// as append_latent.
inline void mla_fp8_append(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a) {
  detail::mla_fp8_append_with(layout, a, detail::StoreKind::kAuto);
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
