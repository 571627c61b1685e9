#pragma once
/// @file rope.hpp
/// RoPE on the CPU: the cos/sin table, in-place application to Q and K of a
/// ragged batch (positions per token), re-rotation of cached keys by a
/// position delta (llama.cpp's context shift, StreamingLLM's remapping), and
/// the conversion between interleaved and rotate-half dimension orders.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/prefetch.hpp"
#include "kvkit/core/x86_dispatch.hpp"
#include "kvkit/layout/stride_overlap.hpp"
#include "kvkit/ops/rope_config.hpp"
#include "kvkit/ops/rope_x86.hpp"
#include "kvkit/ops/rope_params.hpp"

namespace kvkit {

/// Owns a cos/sin table [max_positions, rotary_dim] in vLLM's layout (cos in
/// the first half of each row, sin in the second), computed in float64 and
/// rounded once to float, with the YaRN attention factor folded in.
class RopeCache {
 public:
  /// `sequence_length` is used by dynamic NTK only (see rope_inv_freq).
  RopeCache(const RopeConfig& config, std::int64_t max_positions, std::int64_t sequence_length = 0)
      : rotary_dim_(config.rotary_dim), max_positions_(max_positions) {
    check_argument(max_positions > 0, "kvkit::RopeCache", "max_positions", max_positions, "> 0");
    inv_freq_ = rope_inv_freq(config, sequence_length);
    attention_factor_ = rope_attention_factor(config);
    const int half = rotary_dim_ / 2;
    table_.resize(std::size_t(max_positions) * std::size_t(rotary_dim_));
    for (std::int64_t pos = 0; pos < max_positions; ++pos) {
      float* row = table_.data() + pos * rotary_dim_;
      for (int i = 0; i < half; ++i) {
        const double angle = std::fmod(double(pos) * inv_freq_[i], 2.0 * kPi);
        row[i] = float(std::cos(angle) * attention_factor_);
        row[half + i] = float(std::sin(angle) * attention_factor_);
      }
    }
  }

  /// [max_positions, rotary_dim] floats.
  const float* data() const { return table_.data(); }
  std::int64_t max_positions() const { return max_positions_; }
  int rotary_dim() const { return rotary_dim_; }
  /// Float64 inverse frequencies [rotary_dim / 2] (for on-the-fly angles).
  const std::vector<double>& inv_freq() const { return inv_freq_; }
  double attention_factor() const { return attention_factor_; }

  /// Points `params` at this table.
  void attach(RopeParams& params) const {
    params.cos_sin_cache = table_.data();
    params.cache_positions = max_positions_;
    params.inv_freq = inv_freq_.data();
    params.attention_factor = float(attention_factor_);
    params.cache_rotary_dim = rotary_dim_;
  }

 private:
  int rotary_dim_;
  std::int64_t max_positions_;
  std::vector<double> inv_freq_;
  double attention_factor_ = 1.0;
  std::vector<float> table_;
};

namespace detail {

/// Checks everything about `p` that does not depend on position values.
inline void validate_rope_params(const RopeParams& p, const char* where, bool check_token_rows = true) {
  check_argument(p.num_tokens >= 0, where, "num_tokens", p.num_tokens, ">= 0");
  check_argument(p.head_dim > 0, where, "head_dim", p.head_dim, "> 0");
  check_argument(p.rotary_dim > 0 && p.rotary_dim % 2 == 0, where, "rotary_dim", p.rotary_dim,
                 "a positive even number");
  check_argument(p.rotary_dim <= p.head_dim, where, "rotary_dim", p.rotary_dim,
                 "<= head_dim (", p.head_dim, ")");
  check(p.q != nullptr || p.k != nullptr, where, "both q and k are null; expected at least one");
  if (p.q != nullptr) check_argument(p.num_q_heads > 0, where, "num_q_heads", p.num_q_heads, "> 0");
  if (p.k != nullptr) check_argument(p.num_k_heads > 0, where, "num_k_heads", p.num_k_heads, "> 0");
  // Rows (token, head) whose rotated dims overlap would be rotated twice, in
  // an order that differs between the CPU and the GPU: the rule of
  // PagedKVLayout::validate (detail::find_stride_overlap) over |stride|, with
  // rows of rotary_dim. Callers whose tokens go to cache slots (rope_append,
  // rope_shift_cache, MLA k_pe) check heads only.
  const auto rows_apart = [&](std::int64_t token_stride, std::int64_t tokens, std::int64_t head_stride,
                              std::int64_t heads) {
    if (!check_token_rows) tokens = 1;
    // |INT64_MIN| saturates: 2^63 - 1 still fails (overflow) for 2+ rows, as 2^63 would.
    const auto magnitude = [](std::int64_t s) { return s >= 0 ? s : s == INT64_MIN ? INT64_MAX : -s; };
    const StrideDim dims[2] = {{magnitude(head_stride), heads}, {magnitude(token_stride), tokens}};
    return find_stride_overlap(dims, p.rotary_dim).kind == StrideOverlapKind::kNone;
  };
  const auto check_rows = [&](const char* name, std::int64_t token_stride, std::int64_t head_stride, int heads) {
    check(rows_apart(token_stride, p.num_tokens, head_stride, heads), where, "argument '", name,
          "_head_stride' = ", head_stride, " / '", name, "_token_stride' = ", token_stride, ": rows of ", heads,
          " heads x ", p.num_tokens, " tokens overlap; expected them at least rotary_dim (", p.rotary_dim,
          ") apart");
  };
  if (p.q != nullptr) check_rows("q", p.q_token_stride, p.q_head_stride, p.num_q_heads);
  if (p.k != nullptr) check_rows("k", p.k_token_stride, p.k_head_stride, p.num_k_heads);
  if (p.num_tokens > 0) {
    check_argument(p.positions != nullptr, where, "positions", p.positions,
                   "a non-null pointer for ", p.num_tokens, " tokens");
  }
  check(p.cos_sin_cache != nullptr || p.inv_freq != nullptr, where,
        "neither cos_sin_cache nor inv_freq is set; expected one of them");
  check_argument(p.cache_rotary_dim == 0 || p.cache_rotary_dim == p.rotary_dim, where, "rotary_dim",
                 p.rotary_dim, "the rotary_dim of the attached RoPE table (", p.cache_rotary_dim, ")");
  dispatch_dtype<FloatTypes>(p.dtype, where, "dtype", [](auto) {});
}

// The style is resolved outside the inner loops so that each loop is a plain
// strided sweep the compiler vectorizes (rope_pair gives the same pairs).
template <class T>
KVKIT_FORCEINLINE void rotate_heads_body(T* base, std::int64_t head_stride, int num_heads,
                                         const RopeParams& p, const float* cos_row,
                                         const float* sin_row) {
  const int half = p.rotary_dim / 2;
  const std::int64_t step = p.style == RopeStyle::kNeox ? 1 : 2;        // between pairs
  const std::int64_t partner = p.style == RopeStyle::kNeox ? half : 1;  // within a pair
  for (int h = 0; h < num_heads; ++h) {
    T* x = base + h * head_stride;
    if (step == 1) {
      for (int i = 0; i < half; ++i) {
        float a = to_float(x[i]);
        float b = to_float(x[i + partner]);
        rope_rotate(a, b, cos_row[i], sin_row[i]);
        x[i] = from_float<T>(a);
        x[i + partner] = from_float<T>(b);
      }
    } else {
      for (int i = 0; i < half; ++i) {
        float a = to_float(x[2 * i]);
        float b = to_float(x[2 * i + 1]);
        rope_rotate(a, b, cos_row[i], sin_row[i]);
        x[2 * i] = from_float<T>(a);
        x[2 * i + 1] = from_float<T>(b);
      }
    }
  }
}

/// cos and sin of every pair at `position` (rope_cos_sin for i < rotary_dim / 2).
inline void load_cos_sin_row(const RopeParams& p, std::int64_t position, float* cos_row, float* sin_row) {
  for (int i = 0; i < p.rotary_dim / 2; ++i) rope_cos_sin(p, position, i, cos_row[i], sin_row[i]);
}

/// Rotates `num_heads` rows of `base` (rows head_stride apart) by one token's cos/sin.
template <class T>
KVKIT_VECTORIZE void rotate_heads(T* base, std::int64_t head_stride, int num_heads, const RopeParams& p,
                  const float* cos_row, const float* sin_row) {
#if KVKIT_X86_DISPATCH
  if (x86_level() != X86Level::kBaseline) {
    if (p.style == RopeStyle::kNeox) {
      // 16-bit rows by hand (F16C for float16); float rows vectorize well as is (ops/rope_x86.hpp).
      if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) {
        rotate_heads_neox_avx2(base, head_stride, num_heads, p.rotary_dim, cos_row, sin_row);
      } else {
        run_loop_avx2<&rotate_heads_body<T>>(base, head_stride, num_heads, p, cos_row, sin_row);
      }
      return;
    }
    // Interleaved pairs: the hand-written kernel for 16-bit rows (why not
    // float: see ops/rope_x86.hpp).
    if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, half>) {
      rotate_heads_interleaved_avx2(base, head_stride, num_heads, p.rotary_dim, cos_row, sin_row);
      return;
    }
  }
#endif
  rotate_heads_body(base, head_stride, num_heads, p, cos_row, sin_row);
}

/// How far ahead run_rope prefetches strided rows: 1 and 4 measured about the
/// same as 2 on Zen 4, 8 no better than none.
inline constexpr std::int64_t kRopePrefetchTokens = 2;

/// Asks for the rotated part of every head row of a token (for writing).
template <class T>
inline void prefetch_rotated_rows(const T* base, std::int64_t head_stride, int num_heads, int rotary_dim) {
  const int row_bytes = rotary_dim * int(sizeof(T));
  for (int h = 0; h < num_heads; ++h) {
    const char* row = reinterpret_cast<const char*>(base + h * head_stride);
    for (int b = 0; b < row_bytes; b += 64) prefetch_line_for_write(row + b);
  }
}

template <class T>
void run_rope(const RopeParams& p) {
  // Tokens are independent: OpenMP threads share them when the program enables OpenMP.
#if defined(_OPENMP)
#pragma omp parallel if (p.num_tokens >= 64)
#endif
  {
  std::vector<float> cos_row(std::size_t(p.rotary_dim / 2)), sin_row(cos_row.size());
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
  for (std::int64_t t = 0; t < p.num_tokens; ++t) {
    load_cos_sin_row(p, p.positions[t], cos_row.data(), sin_row.data());
    // Rows with gaps between them (DeepSeek's q_pe: 64 of each 192-wide
    // head) leave the hardware prefetcher behind: ask for a later token's.
    if (p.q != nullptr && p.q_head_stride > p.rotary_dim && t + kRopePrefetchTokens < p.num_tokens) {
      prefetch_rotated_rows(static_cast<const T*>(p.q) + (t + kRopePrefetchTokens) * p.q_token_stride,
                            p.q_head_stride, p.num_q_heads, p.rotary_dim);
    }
    if (p.q != nullptr) {
      rotate_heads(static_cast<T*>(p.q) + t * p.q_token_stride, p.q_head_stride, p.num_q_heads, p,
                   cos_row.data(), sin_row.data());
    }
    if (p.k != nullptr) {
      rotate_heads(static_cast<T*>(p.k) + t * p.k_token_stride, p.k_head_stride, p.num_k_heads, p,
                   cos_row.data(), sin_row.data());
    }
  }
  }
}

inline void check_positions(const RopeParams& p, const char* where, bool allow_negative) {
  for (std::int64_t t = 0; t < p.num_tokens; ++t) {
    const std::int64_t pos = p.positions[t];
    if (!allow_negative && pos < 0) {
      fail(where, "argument 'positions[", t, "]' = ", pos, ": expected >= 0");
    }
    // |INT64_MIN| is not an int64: negating it (here and in rope_cos_sin) overflows.
    if (pos == INT64_MIN) {
      fail(where, "argument 'positions[", t, "]' = ", pos, ": expected |position| < 2^63");
    }
    const std::int64_t magnitude = pos < 0 ? -pos : pos;
    if (p.cos_sin_cache != nullptr && magnitude >= p.cache_positions) {
      fail(where, "argument 'positions[", t, "]' = ", pos, ": expected |position| < ",
           p.cache_positions, " (the cos/sin table's length)");
    }
  }
}

}  // namespace detail

/// Rotates q and k in place: token t's heads by angle positions[t] * inv_freq.
/// Throws kvkit::Error (before changing anything) on bad sizes, a negative
/// position, or a position beyond the cos/sin table.
inline void apply_rope(const RopeParams& p) {
  constexpr const char* kWhere = "kvkit::apply_rope";
  detail::validate_rope_params(p, kWhere);
  detail::check_positions(p, kWhere, /*allow_negative=*/false);
  dispatch_dtype<FloatTypes>(p.dtype, kWhere, "dtype",
                             [&](auto tag) { detail::run_rope<typename decltype(tag)::type>(p); });
}

/// Re-rotates cached keys in place by a per-token position delta
/// (`p.positions` holds the deltas, which may be negative): a key rotated for
/// position x becomes the key rotated for x + delta. Rotations compose, so
/// this equals apply_rope at the new position up to float rounding.
/// `p.q` must be null. Throws kvkit::Error before changing anything on bad input.
inline void rope_shift_keys(const RopeParams& p) {
  constexpr const char* kWhere = "kvkit::rope_shift_keys";
  check_argument(p.q == nullptr, kWhere, "q", p.q, "nullptr (only keys are shifted)");
  check_argument(p.k != nullptr, kWhere, "k", p.k, "a non-null pointer");
  detail::validate_rope_params(p, kWhere);
  detail::check_positions(p, kWhere, /*allow_negative=*/true);
  dispatch_dtype<FloatTypes>(p.dtype, kWhere, "dtype",
                             [&](auto tag) { detail::run_rope<typename decltype(tag)::type>(p); });
}

/// Reorders the first `rotary_dim` dims of each of `rows` vectors in place
/// between the interleaved order (x0, y0, x1, y1, ...; DeepSeek's official
/// weights, RopeStyle::kGptJ) and the rotate-half order (x0, x1, ..., y0, y1,
/// ...; HF transformers' DeepSeek port, RopeStyle::kNeox). Rotating in one
/// order and converting equals converting and rotating in the other, so
/// attention scores agree; only the stored layout differs.
template <class T>
void rope_reorder_dims(T* data, std::int64_t rows, std::int64_t row_stride, int rotary_dim,
                       RopeStyle from, RopeStyle to) {
  constexpr const char* kWhere = "kvkit::rope_reorder_dims";
  check_argument(rotary_dim > 0 && rotary_dim % 2 == 0, kWhere, "rotary_dim", rotary_dim,
                 "a positive even number");
  check_argument(rows >= 0, kWhere, "rows", rows, ">= 0");
  check_argument(rows == 0 || data != nullptr, kWhere, "data", data, "a non-null pointer");
  // Rows closer than rotary_dim overlap, and reordering one in place scrambles its neighbour.
  check_argument(rows <= 1 || row_stride >= rotary_dim, kWhere, "row_stride", row_stride,
                 ">= rotary_dim (", rotary_dim, ") when rows > 1");
  if (from == to) return;
  std::vector<T> tmp(static_cast<std::size_t>(rotary_dim));
  const int half = rotary_dim / 2;
  for (std::int64_t r = 0; r < rows; ++r) {
    T* x = data + r * row_stride;
    for (int i = 0; i < half; ++i) {
      const RopePair src = rope_pair(from, rotary_dim, i);
      const RopePair dst = rope_pair(to, rotary_dim, i);
      tmp[dst.first] = x[src.first];
      tmp[dst.second] = x[src.second];
    }
    for (int d = 0; d < rotary_dim; ++d) x[d] = tmp[d];
  }
}

}  // namespace kvkit
