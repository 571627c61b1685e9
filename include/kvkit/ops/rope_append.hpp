#pragma once
/// @file rope_append.hpp
/// Fused RoPE + append on the CPU: rotates the queries in place and writes the
/// rotated keys (and the values) into the cache in one pass over the tokens,
/// so the rotated keys never make a round trip through a temporary.

#include <cstdint>
#include <cstring>

#include "kvkit/ops/append.hpp"
#include "kvkit/ops/rope.hpp"

namespace kvkit {

namespace detail {

/// The rotation of the keys, described as if applied in place to the cache
/// (used to validate a fused rope + append with the RoPE checks).
template <class Layout>
RopeParams rope_keys_in_cache(const RopeParams& rope, const Layout& layout,
                              const AppendKVArgs& append) {
  RopeParams keys = rope;
  keys.q = nullptr;
  keys.k = append.k_cache;
  keys.num_k_heads = int(layout.num_heads);
  keys.k_head_stride = layout.stride_head;
  return keys;
}

/// Everything about a fused rope + append that can be checked without reading
/// positions or slot_mapping (so the CUDA launcher, whose arrays live on the
/// device, shares it). Throws kvkit::Error.
template <class Layout>
void validate_rope_append(const RopeParams& rope, const Layout& layout,
                          const AppendKVArgs& append, const char* where) {
  check_argument(rope.k == nullptr, where, "rope.k", rope.k,
                 "nullptr (keys come from append.key and go to the cache)");
  check_argument(rope.num_tokens == append.num_tokens, where, "rope.num_tokens", rope.num_tokens,
                 "append.num_tokens (", append.num_tokens, ")");
  check_argument(rope.head_dim == layout.head_dim, where, "rope.head_dim", rope.head_dim,
                 "the layout's head_dim (", layout.head_dim, ")");
  check(rope.dtype == append.src_dtype, where, "rope.dtype ", dtype_name(rope.dtype),
        " differs from append.src_dtype ", dtype_name(append.src_dtype), "; expected equal");
  validate_rope_params(rope_keys_in_cache(rope, layout, append), where, /*check_token_rows=*/false);
  if (rope.q != nullptr) validate_rope_params(rope, where);
  validate_append_kv(layout, append, where);
}

}  // namespace detail

/// For each token t: rotates q's heads in place (when rope.q is set), copies
/// key row t into the cache at append.slot_mapping[t] and rotates it there,
/// and copies value row t. Padding tokens (slot < 0) write nothing to the
/// cache (their queries are still rotated). The key source is left unchanged.
/// Bit for bit the same as apply_rope on (q, a copy of the keys) followed by
/// append_kv. `rope.k` must be null; positions come from rope.positions and
/// rope.num_tokens must equal append.num_tokens. `Layout` is PagedKVLayout or
/// ContiguousKVLayout. Throws kvkit::Error before writing anything on bad input.
template <class Layout>
void rope_append_kv(const RopeParams& rope, const Layout& layout, const AppendKVArgs& append) {
  constexpr const char* kWhere = "kvkit::rope_append_kv";
  detail::validate_rope_append(rope, layout, append, kWhere);
  detail::check_positions(rope, kWhere, /*allow_negative=*/false);
  detail::check_slots(append.slot_mapping, append.num_tokens, layout.num_slots(), kWhere);

  dispatch_dtype<FloatTypes>(rope.dtype, kWhere, "rope.dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::int64_t heads = layout.num_heads;
    const std::size_t row_bytes = std::size_t(layout.head_dim) * sizeof(T);
    T* k_cache = static_cast<T*>(append.k_cache);
    T* v_cache = static_cast<T*>(append.v_cache);
    const T* key = static_cast<const T*>(append.key);
    const T* value = static_cast<const T*>(append.value);
    // Tokens are independent (with duplicate slots, which token's row lands is
    // unspecified, as on the GPU): OpenMP threads share them when enabled.
#if defined(_OPENMP)
#pragma omp parallel if (rope.num_tokens >= 64)
#endif
    {
      std::vector<float> cos_row(static_cast<std::size_t>(rope.rotary_dim / 2)), sin_row(cos_row.size());
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (std::int64_t t = 0; t < rope.num_tokens; ++t) {
        detail::load_cos_sin_row(rope, rope.positions[t], cos_row.data(), sin_row.data());
        if (rope.q != nullptr) {
          detail::rotate_heads(static_cast<T*>(rope.q) + t * rope.q_token_stride, rope.q_head_stride,
                               rope.num_q_heads, rope, cos_row.data(), sin_row.data());
        }
        const std::int64_t slot = append.slot_mapping[t];
        if (slot < 0) continue;
        for (std::int64_t h = 0; h < heads; ++h) {
          std::memcpy(k_cache + layout.slot_offset(slot, h),
                      key + t * append.key_stride_token + h * append.key_stride_head, row_bytes);
          std::memcpy(v_cache + layout.slot_offset(slot, h),
                      value + t * append.value_stride_token + h * append.value_stride_head, row_bytes);
        }
        detail::rotate_heads(k_cache + layout.slot_offset(slot, 0), layout.stride_head, int(heads),
                             rope, cos_row.data(), sin_row.data());
      }
    }
  });
}

}  // namespace kvkit
