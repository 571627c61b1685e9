#pragma once
// A paged decode problem over a quantized (fp8 e4m3 / e5m2, int8) cache,
// shared by the CPU test (test_attention_quantized.cpp) and the GPU test
// (test_attention_quantized_gpu.cu): the float inputs of PagedDecodeInputs
// (the original values), quantized into 1-byte caches by quantize_append_kv
// with per-tensor, per-head or per-(token, head) scales. Unowned cache bytes
// hold 0x7F (NaN in e4m3 and e5m2) and unowned per-token scales -1, so
// reading one shows.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvkit/ops/quantize.hpp"
#include "support/paged_decode_problem.hpp"

namespace kvkit::testing {

inline const char* granularity_name(ScaleGranularity g) {
  return g == ScaleGranularity::kPerTensor ? "per tensor" : g == ScaleGranularity::kPerHead ? "per head" : "per token-head";
}

/// A float problem (the original values) and its quantized copy; o and lse
/// are poisoned (-777) host outputs.
template <class QT>
struct QuantizedDecodeInputs {
  testing::PagedDecodeInputs<QT, float> src;
  DType cache_dtype;
  ScaleGranularity granularity;
  std::vector<std::uint8_t> k8, v8;
  std::vector<float> k_scale, v_scale;  // static scales, or the [num_slots, heads] scale cache
  std::vector<QT> o;
  std::vector<float> lse;

  QuantizedDecodeInputs(const DecodeCase& c, std::uint64_t seed, DType dtype, ScaleGranularity g)
      : src(c, seed), cache_dtype(dtype), granularity(g) {
    const auto& layout = src.layout;
    // Unowned slots hold 0x7F (NaN in e4m3 and e5m2, 127 in int8), so reading one shows.
    k8.assign(std::size_t(layout.span_elements()), 0x7F);
    v8 = k8;
    const std::int64_t heads = c.kv_heads, dim = c.head_dim;
    // Token-major sources and the slot mapping of every cached token.
    std::vector<float> key, value;
    std::vector<std::int64_t> slots;
    for (std::size_t b = 0; b < src.seq_lens.size(); ++b) {
      for (std::int64_t t = 0; t < src.seq_lens[b]; ++t) {
        const std::int64_t slot = src.slot(b, t);
        slots.push_back(slot);
        for (std::int64_t h = 0; h < heads; ++h) {
          for (std::int64_t d = 0; d < dim; ++d) {
            key.push_back(src.k[layout.slot_offset(slot, h) + d]);
            value.push_back(src.v[layout.slot_offset(slot, h) + d]);
          }
        }
      }
    }
    // Static scales from the data's range (per head: each head its own),
    // times a factor so that per-tensor scales are not tight for every head.
    const std::int64_t num_slots = layout.num_pages * layout.page_size;
    if (g == ScaleGranularity::kPerTokenHead) {
      k_scale.assign(std::size_t(num_slots * heads), -1.0f);
      v_scale = k_scale;
    } else {
      const std::int64_t n = g == ScaleGranularity::kPerHead ? heads : 1;
      k_scale.assign(std::size_t(n), 0.0f);
      v_scale = k_scale;
      for (std::size_t i = 0; i < key.size(); ++i) {
        const std::size_t s = n == 1 ? 0 : (i / std::size_t(dim)) % std::size_t(heads);
        k_scale[s] = std::max(k_scale[s], std::fabs(key[i]));
        v_scale[s] = std::max(v_scale[s], std::fabs(value[i]));
      }
      for (std::size_t s = 0; s < k_scale.size(); ++s) {
        k_scale[s] = k_scale[s] * (1.0f + 0.25f * float(s)) / quantized_max(dtype);
        v_scale[s] = v_scale[s] * (1.0f + 0.5f * float(s)) / quantized_max(dtype);
      }
    }
    QuantizeAppendArgs a;
    a.key = key.data();
    a.value = value.data();
    a.key_stride_token = a.value_stride_token = heads * dim;
    a.key_stride_head = a.value_stride_head = dim;
    a.slot_mapping = slots.data();
    a.num_tokens = std::int64_t(slots.size());
    a.k_cache = k8.data();
    a.v_cache = v8.data();
    a.src_dtype = DType::kFloat32;
    a.cache_dtype = dtype;
    a.granularity = g;
    if (g == ScaleGranularity::kPerTokenHead) {
      a.k_scale_cache = k_scale.data();
      a.v_scale_cache = v_scale.data();
    } else {
      a.k_scale = k_scale.data();
      a.v_scale = v_scale.data();
    }
    quantize_append_kv(layout, a);
    o.assign(std::size_t(src.rows() * c.q_heads * (c.head_dim + src.kPad)), from_float<QT>(-777.0f));
    lse.assign(std::size_t(src.rows() * c.q_heads), -777.0f);
  }

  PagedDecodeParams params() {
    PagedDecodeParams p = src.params(o.data(), lse.data());
    p.k_cache = k8.data();
    p.v_cache = v8.data();
    p.kv_dtype = cache_dtype;
    p.kv_scale_granularity = granularity;
    p.k_scale = k_scale.data();
    p.v_scale = v_scale.data();
    return p;
  }

  double scale_at(const std::vector<float>& scales, std::int64_t slot, std::int64_t head) const {
    return scales[std::size_t(scale_index(granularity, slot, head, src.c.kv_heads))];
  }
};

}  // namespace kvkit::testing
