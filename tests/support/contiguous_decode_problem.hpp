#pragma once
// Inputs of a decode over a contiguous cache (ContiguousKVLayout) read through
// contiguous_page_view, shared by the CPU test (test_attention_contiguous.cpp)
// and the GPU test (test_attention_contiguous_gpu.cu): every row that holds no
// position is NaN (so reading one shows); a ring buffer is written position
// after position, so that wrapped rows hold the latest position; random float
// queries; the float64 reference reads position kp at its contiguous row and
// fails if the call sees a position the ring has overwritten.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/layout/contiguous_page_view.hpp"
#include "kvkit/ops/attention_params.hpp"

namespace kvkit::testing {

struct ContiguousCase {
  int head_dim = 64;
  int q_heads = 8;
  int kv_heads = 2;
  std::int64_t capacity = 48;
  bool head_major = false;
  bool ring = false;
  int head_pad = 0;  // > 0: token-major with head rows padded (arbitrary strides)
  std::vector<int> seq_lens{1};
  int q_len = 1;
  int window = 0;
  int extra_seqs = 1;  // cache sequences no batch row reads (NaN everywhere)
};

template <class KVT>
struct ContiguousDecodeProblem {
  ContiguousCase c;
  ContiguousKVLayout cl;
  ContiguousPageView view;
  std::vector<KVT> k, v;
  std::vector<std::int32_t> seq_lens, block_table;
  std::int64_t max_blocks = 0;
  std::vector<std::int32_t> seq_ids;  // cache sequence of each batch row
  std::vector<float> q;

  ContiguousDecodeProblem(const ContiguousCase& cs, std::uint64_t seed) : c(cs) {
    const std::int64_t seqs = std::int64_t(c.seq_lens.size()) + c.extra_seqs;
    if (c.head_pad > 0) {
      const std::int64_t head = c.head_dim + c.head_pad;
      cl = ContiguousKVLayout::make(seqs, c.capacity, c.kv_heads, c.head_dim, c.capacity * c.kv_heads * head,
                                    c.kv_heads * head, head, c.ring);
    } else if (c.head_major) {
      cl = ContiguousKVLayout::head_major(seqs, c.capacity, c.kv_heads, c.head_dim, c.ring);
    } else {
      cl = ContiguousKVLayout::token_major(seqs, c.capacity, c.kv_heads, c.head_dim, c.ring);
    }
    view = contiguous_page_view(cl);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    k.assign(std::size_t(seqs * cl.stride_seq), from_float<KVT>(std::numeric_limits<float>::quiet_NaN()));
    v = k;
    // Batch row b reads cache sequence b + extra_seqs (the first ones stay NaN).
    for (std::size_t b = 0; b < c.seq_lens.size(); ++b) {
      seq_lens.push_back(c.seq_lens[b]);
      for (std::int64_t pos = 0; pos < c.seq_lens[b]; ++pos) {
        for (int h = 0; h < c.kv_heads; ++h) {
          for (int d = 0; d < c.head_dim; ++d) {
            k[std::size_t(key_offset(b, pos, h) + d)] = from_float<KVT>(normal(rng));
            v[std::size_t(key_offset(b, pos, h) + d)] = from_float<KVT>(normal(rng));
          }
        }
      }
      max_blocks = std::max(max_blocks, view.blocks_for(c.seq_lens[b]));
    }
    for (std::size_t b = 0; b < c.seq_lens.size(); ++b) seq_ids.push_back(std::int32_t(b + c.extra_seqs));
    block_table.assign(std::size_t(std::max<std::int64_t>(1, std::int64_t(c.seq_lens.size()) * max_blocks)), -1);
    q.resize(std::size_t(std::int64_t(c.seq_lens.size()) * c.q_len * c.q_heads * c.head_dim));
    for (auto& x : q) x = normal(rng);
  }

  /// Element offset of dim 0 of (batch row b, position pos, kv head h) in the contiguous cache.
  std::int64_t key_offset(std::size_t b, std::int64_t pos, int h) const {
    const std::int64_t seq = std::int64_t(b) + c.extra_seqs;
    return cl.offset(seq, c.ring ? pos % c.capacity : pos, h, 0);
  }

  /// Params over the view (host pointers); fills the block table. o: [rows, q_heads, head_dim] float.
  PagedDecodeParams params(float* o, float* lse) {
    PagedDecodeParams p;
    p.q = q.data();
    p.q_stride_head = c.head_dim;
    p.q_stride_token = std::int64_t(c.q_heads) * c.head_dim;
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.layout = view.layout;
    p.q_len = c.q_len;
    p.window = c.window;
    p.num_q_heads = c.q_heads;
    p.sm_scale = float(1.0 / std::sqrt(double(c.head_dim)));
    p.o = o;
    p.o_stride_head = c.head_dim;
    p.o_stride_token = std::int64_t(c.q_heads) * c.head_dim;
    p.lse = lse;
    p.q_dtype = DType::kFloat32;
    p.kv_dtype = dtype_of<KVT>;
    p.page_table = fill_contiguous_page_table(view, seq_lens.data(), std::int64_t(seq_lens.size()),
                                              block_table.data(), max_blocks, contiguous_access(p),
                                              seq_ids.data());
    return p;
  }

  /// float64 reference of row (b, i, h): o and lse. Fails if a visible
  /// position was overwritten in a ring.
  void reference(std::size_t b, int i, int h, const PagedDecodeParams& p, std::vector<double>& out,
                 double& out_lse) const {
    const int group = c.q_heads / c.kv_heads;
    const std::int64_t len = seq_lens[b];
    const std::int64_t q_pos = len - c.q_len + i;
    const std::int64_t t = std::int64_t(b) * c.q_len + i;
    std::vector<double> scores;
    std::vector<std::int64_t> keys;
    for (std::int64_t kp = 0; kp < len; ++kp) {
      if (!attention_visible(p, q_pos, kp)) continue;
      REQUIRE(kp >= cl.first_held_position(len));
      const std::int64_t off = key_offset(b, kp, h / group);
      double dot = 0.0;
      for (int d = 0; d < c.head_dim; ++d) {
        dot += double(q[std::size_t((t * c.q_heads + h) * c.head_dim + d)]) * double(to_float(k[std::size_t(off + d)]));
      }
      scores.push_back(dot * double(p.sm_scale));
      keys.push_back(off);
    }
    out.assign(std::size_t(c.head_dim), 0.0);
    if (scores.empty()) {
      out_lse = -INFINITY;
      return;
    }
    const double m = *std::max_element(scores.begin(), scores.end());
    double sum = 0.0;
    for (double s : scores) sum += std::exp(s - m);
    for (std::size_t j = 0; j < scores.size(); ++j) {
      const double w = std::exp(scores[j] - m) / sum;
      for (int d = 0; d < c.head_dim; ++d) out[std::size_t(d)] += w * double(to_float(v[std::size_t(keys[j] + d)]));
    }
    out_lse = m + std::log(sum);
  }

  /// Compares o / lse (as written by some op for params(o, lse)) with the reference.
  void check(const PagedDecodeParams& p, const std::vector<float>& o, const std::vector<float>& lse,
             double tol) const {
    std::vector<double> ref;
    double ref_lse = 0.0;
    for (std::size_t b = 0; b < seq_lens.size(); ++b) {
      for (int i = 0; i < c.q_len; ++i) {
        for (int h = 0; h < c.q_heads; ++h) {
          reference(b, i, h, p, ref, ref_lse);
          const std::int64_t t = std::int64_t(b) * c.q_len + i;
          double worst = 0.0;
          for (int d = 0; d < c.head_dim; ++d) {
            worst = std::max(worst, std::fabs(double(o[std::size_t((t * c.q_heads + h) * c.head_dim + d)]) - ref[std::size_t(d)]));
          }
          // |v| ~ N(0, 1): about 5 at most; the scale of the error.
          if (!(worst <= tol * 5.0)) {
            FAIL("seq " << b << " (len " << seq_lens[b] << ") token " << i << " head " << h
                        << ": max |o - ref| = " << worst);
          }
          REQUIRE(std::fabs(lse[std::size_t(t * c.q_heads + h)] - ref_lse) <= 1e-4 * std::max(1.0, std::fabs(ref_lse)));
        }
      }
    }
  }
};

}  // namespace kvkit::testing
