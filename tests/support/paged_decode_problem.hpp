#pragma once
// Inputs of a paged decode-attention test, shared by the CPU test
// (test_attention.cpp) and the GPU test (test_attention_gpu.cu): a paged
// cache whose sequences' pages are scattered over a shuffled pool, every slot
// no sequence owns holding NaN (so reading one shows), random queries, and the
// PagedDecodeParams that describe them (host pointers).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/ops/attention_params.hpp"

namespace kvkit::testing {

struct DecodeCase {
  int head_dim = 128;
  int q_heads = 8;
  int kv_heads = 2;
  int page_size = 16;
  std::vector<int> seq_lens{1};
  int q_len = 1;
  int window = 0;
  int sinks = 0;
  float softcap = 0.0f;
  std::int64_t kv_begin = 0;
  std::int64_t kv_end = INT64_MAX;
  bool hnd = false;
  int head_pad = 0;     // > 0: kv head rows padded by this many elements (unaligned strides)
  bool zero_q = false;  // every score 0: lse counts the visible keys
};

template <class QT, class KVT>
struct PagedDecodeInputs {
  DecodeCase c;
  PagedKVLayout layout;
  std::vector<KVT> k, v;
  std::vector<std::int32_t> block_table, seq_lens;
  std::int64_t max_blocks = 0;
  std::vector<QT> q;
  static constexpr int kPad = 3;  // o rows are padded by this many elements

  PagedDecodeInputs(const DecodeCase& cs, std::uint64_t seed) : c(cs) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    std::int64_t pages_needed = 0;
    for (int len : c.seq_lens) {
      const std::int64_t n = (len + c.page_size - 1) / c.page_size;
      pages_needed += n;
      max_blocks = std::max(max_blocks, n);
    }
    const std::int64_t num_pages = pages_needed + 3;
    if (c.head_pad > 0) {
      const std::int64_t head = c.head_dim + c.head_pad;
      layout = PagedKVLayout::strided(num_pages, c.page_size, c.kv_heads, c.head_dim,
                                      c.page_size * c.kv_heads * head, c.kv_heads * head, head);
    } else {
      layout = c.hnd ? PagedKVLayout::hnd(num_pages, c.page_size, c.kv_heads, c.head_dim)
                     : PagedKVLayout::nhd(num_pages, c.page_size, c.kv_heads, c.head_dim);
    }
    const KVT nan = from_float<KVT>(std::numeric_limits<float>::quiet_NaN());
    k.assign(std::size_t(layout.span_elements()), nan);
    v = k;
    std::vector<std::int32_t> pool(static_cast<std::size_t>(num_pages));
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    block_table.assign(std::size_t(std::max<std::int64_t>(1, std::int64_t(c.seq_lens.size()) * max_blocks)), -1);
    std::size_t next = 0;
    for (std::size_t b = 0; b < c.seq_lens.size(); ++b) {
      seq_lens.push_back(c.seq_lens[b]);
      for (int t = 0; t < c.seq_lens[b]; ++t) {
        if (t % c.page_size == 0) block_table[b * max_blocks + t / c.page_size] = pool[next++];
        const std::int64_t slot = std::int64_t(block_table[b * max_blocks + t / c.page_size]) * c.page_size + t % c.page_size;
        for (int h = 0; h < c.kv_heads; ++h) {
          for (int d = 0; d < c.head_dim; ++d) {
            k[layout.slot_offset(slot, h) + d] = from_float<KVT>(normal(rng));
            v[layout.slot_offset(slot, h) + d] = from_float<KVT>(normal(rng));
          }
        }
      }
    }
    q.resize(std::size_t(rows() * c.q_heads * c.head_dim));
    for (auto& x : q) x = from_float<QT>(c.zero_q ? 0.0f : normal(rng));
  }

  /// Query tokens: batch * q_len.
  std::int64_t rows() const { return std::int64_t(c.seq_lens.size()) * c.q_len; }

  /// Slot of token `t` of sequence `b`.
  std::int64_t slot(std::size_t b, std::int64_t t) const {
    return std::int64_t(block_table[b * max_blocks + t / c.page_size]) * c.page_size + t % c.page_size;
  }

  /// Params with host pointers; o rows are padded by kPad (o_stride_head = head_dim + kPad).
  PagedDecodeParams params(QT* o, float* lse) const {
    PagedDecodeParams p;
    p.q = q.data();
    p.q_stride_head = c.head_dim;
    p.q_stride_token = std::int64_t(c.q_heads) * c.head_dim;
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.layout = layout;
    p.page_table.block_table = block_table.data();
    p.page_table.seq_lens = seq_lens.data();
    p.page_table.batch_size = std::int64_t(seq_lens.size());
    p.page_table.max_blocks = max_blocks;
    p.page_table.stride_batch = max_blocks;
    p.q_len = c.q_len;
    p.num_q_heads = c.q_heads;
    p.sm_scale = float(1.0 / std::sqrt(double(c.head_dim)));
    p.window = c.window;
    p.num_sinks = c.sinks;
    p.logit_softcap = c.softcap;
    p.kv_begin = c.kv_begin;
    p.kv_end = c.kv_end;
    p.o = o;
    p.o_stride_head = c.head_dim + kPad;
    p.o_stride_token = std::int64_t(c.q_heads) * (c.head_dim + kPad);
    p.lse = lse;
    p.q_dtype = dtype_of<QT>;
    p.kv_dtype = dtype_of<KVT>;
    return p;
  }
};

}  // namespace kvkit::testing
