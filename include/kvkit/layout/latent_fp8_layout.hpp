#pragma once
/// @file latent_fp8_layout.hpp
/// kvkit::LatentFp8Layout: the MLA latent cache in FlashMLA's fp8 row format
/// (DeepSeek-V3.2), 656 bytes per token and layer:
///
///   bytes [0, 512)    c_kv as 512 float8_e4m3 values, in 4 groups of 128
///   bytes [512, 528)  4 float32 scales, one per group: c_kv[d] = scale[d / 128] * e4m3[d]
///   bytes [528, 656)  k_pe as 64 bfloat16 values (not quantized: RoPE keys need the precision)
///
/// instead of 1,152 bytes in bf16. Quantization (mla_fp8_quantize_row):
/// scale_g = amax_g / 448 (448 = largest finite e4m3), e4m3 = round-to-nearest-even of
/// c_kv[d] / scale_g, saturating; an all-zero group stores scale 0. Hence
/// |dequantized - c_kv[d]| <= max(|c_kv[d]| / 16, amax_g / 458752) (3 mantissa
/// bits; the second term is half the subnormal step 2^-9 times scale_g).
///
/// The row math is KVKIT_HOST_DEVICE: the CPU ops (ops/mla_fp8.hpp, the fp8
/// path of ops/mla_decode.hpp), the CUDA append (cuda/mla_fp8.cuh) and the
/// CUDA decode (cuda/mla_decode.cuh) use the same functions. Strides are in bytes.

#include <cstdint>
#include <cstring>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/bits.hpp"
#include "kvkit/core/config.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/float8.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"

namespace kvkit {

/// The 656-byte row: widths and byte offsets of its three parts.
struct MlaFp8Row {
  static constexpr int kRank = 512;         ///< c_kv values (e4m3)
  static constexpr int kRopeDim = 64;       ///< k_pe values (bf16)
  static constexpr int kGroupSize = 128;    ///< c_kv values per scale
  static constexpr int kNumGroups = kRank / kGroupSize;
  static constexpr int kScalesOffset = kRank;                          ///< 512
  static constexpr int kRopeOffset = kScalesOffset + 4 * kNumGroups;   ///< 528
  static constexpr int kBytes = kRopeOffset + 2 * kRopeDim;            ///< 656
  static constexpr int kLatentDim = kRank + kRopeDim;                  ///< 576 values
  static constexpr float kE4m3Max = 448.0f;
};
static_assert(MlaFp8Row::kBytes == 656, "FlashMLA's fp8 latent row is 656 bytes");

/// Scale of group `g` of a row (host or device memory).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float mla_fp8_scale(const std::uint8_t* row, int g) {
  float s;
  std::memcpy(&s, row + MlaFp8Row::kScalesOffset + 4 * g, 4);
  return s;
}

/// Value `dim` (0..575) of a row, dequantized: scale * e4m3 for dim < 512,
/// the bf16 k_pe value after. Exact (one float product).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float mla_fp8_value(const std::uint8_t* row, int dim) {
  if (dim < MlaFp8Row::kRank) {
    return mla_fp8_scale(row, dim / MlaFp8Row::kGroupSize) * e4m3_bits_to_float(row[dim]);
  }
  std::uint16_t b;
  std::memcpy(&b, row + MlaFp8Row::kRopeOffset + 2 * (dim - MlaFp8Row::kRank), 2);
  return bfloat16_bits_to_float(b);
}

/// Scale of a c_kv group whose largest magnitude is `amax` (finite, >= 0).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float mla_fp8_group_scale(float amax) { return amax / MlaFp8Row::kE4m3Max; }

/// The e4m3 byte of c_kv value `v` in a group of scale `scale` (0 for an
/// all-zero group). Division, not a multiply by a rounded reciprocal: the
/// group's largest value lands on 448 (or saturates to it) rather than a
/// step below. Every writer of fp8 rows (CPU row, CPU vector path, CUDA
/// kernel) encodes with this rule, so their bytes are equal.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::uint8_t mla_fp8_encode(float v, float scale) {
  return scale > 0.0f ? float_to_e4m3_bits(v / scale) : std::uint8_t(0);
}

/// Quantizes one latent row x = [c_kv (512) | k_pe (64)] (floats, finite)
/// into the 656 bytes at `row` (see the file comment).
KVKIT_HOST_DEVICE inline void mla_fp8_quantize_row(const float* x, std::uint8_t* row) {
  for (int g = 0; g < MlaFp8Row::kNumGroups; ++g) {
    const float* v = x + g * MlaFp8Row::kGroupSize;
    float amax = 0.0f;
    for (int i = 0; i < MlaFp8Row::kGroupSize; ++i) {
      const float a = v[i] < 0.0f ? -v[i] : v[i];
      amax = a > amax ? a : amax;
    }
    const float scale = mla_fp8_group_scale(amax);
    for (int i = 0; i < MlaFp8Row::kGroupSize; ++i) row[g * MlaFp8Row::kGroupSize + i] = mla_fp8_encode(v[i], scale);
    std::memcpy(row + MlaFp8Row::kScalesOffset + 4 * g, &scale, 4);
  }
  for (int d = 0; d < MlaFp8Row::kRopeDim; ++d) {
    const std::uint16_t b = float_to_bfloat16_bits(x[MlaFp8Row::kRank + d]);
    std::memcpy(row + MlaFp8Row::kRopeOffset + 2 * d, &b, 2);
  }
}

/// Paged fp8 latent cache of one layer: [pages, page_size] rows of 656
/// bytes, with byte strides (a row may be padded: stride_slot >= 656).
struct LatentFp8Layout {
  std::int64_t num_pages = 0;
  std::int64_t page_size = 1;    ///< tokens per page (power of two)
  std::int64_t stride_page = 0;  ///< bytes between pages
  std::int64_t stride_slot = 0;  ///< bytes between tokens (>= 656, a multiple of 4)
  int page_shift = 0;

  /// Byte offset of the row of (page, slot_in_page).
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t offset(std::int64_t page, std::int64_t slot_in_page) const {
    return page * stride_page + slot_in_page * stride_slot;
  }
  /// Byte offset of the row of global slot `slot`.
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t slot_offset(std::int64_t slot) const {
    return offset(slot >> page_shift, slot & (page_size - 1));
  }
  KVKIT_HOST_DEVICE std::int64_t num_slots() const { return num_pages * page_size; }
  /// Bytes an allocation for this layout needs.
  std::int64_t span_bytes() const { return as_bytes().span_elements(); }

  /// The rows as a one-head paged layout of 656 one-byte elements: for the
  /// byte-moving ops (copy_blocks, swap_blocks, gather) with DType::kUInt8.
  PagedKVLayout as_bytes() const { return view(MlaFp8Row::kBytes); }
  /// The rows as decode attention sees them: one kv head whose key is 576
  /// values wide, addressed in bytes (what mla_decode_params_fp8 puts in
  /// PagedDecodeParams::layout, with kv_dtype = kFloat8E4M3).
  PagedKVLayout as_decode_keys() const { return view(MlaFp8Row::kLatentDim); }

  /// Throws kvkit::Error on a non power-of-two page size, rows narrower than
  /// 656 bytes or not 4-byte aligned (the scales are float32), or strides
  /// that make rows or pages overlap.
  void validate(const char* where = "kvkit::LatentFp8Layout") const {
    check_argument(stride_slot >= MlaFp8Row::kBytes, where, "stride_slot", stride_slot,
                   ">= 656 (bytes of an fp8 latent row)");
    check_argument(stride_slot % 4 == 0 && stride_page % 4 == 0, where, "stride_slot", stride_slot,
                   "and stride_page (", stride_page, ") multiples of 4 bytes (float32 scales)");
    as_bytes().validate(where);
  }

  /// [pages, page_size, 656 bytes], densely packed.
  static LatentFp8Layout dense(std::int64_t num_pages, std::int64_t page_size) {
    return strided(num_pages, page_size, page_size * MlaFp8Row::kBytes, MlaFp8Row::kBytes);
  }
  /// Any byte strides.
  static LatentFp8Layout strided(std::int64_t num_pages, std::int64_t page_size, std::int64_t stride_page,
                                 std::int64_t stride_slot) {
    LatentFp8Layout l;
    l.num_pages = num_pages;
    l.page_size = page_size;
    l.stride_page = stride_page;
    l.stride_slot = stride_slot;
    l.page_shift = page_shift_of(page_size);
    l.validate("kvkit::LatentFp8Layout::strided");
    return l;
  }

 private:
  PagedKVLayout view(std::int64_t width) const {
    PagedKVLayout p;
    p.num_pages = num_pages;
    p.page_size = page_size;
    p.num_heads = 1;
    p.head_dim = width;
    p.stride_page = stride_page;
    p.stride_slot = stride_slot;
    p.stride_head = width;
    p.page_shift = page_shift;
    return p;
  }
};

}  // namespace kvkit
