// Decode attention over a paged cache and the merge of partial states, against
// a float64 reference (plain loops, softmax in double).
// Tolerances (relative to the largest |v|): fp32 1e-5, fp16 2e-3, bf16 1e-2.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/ops/attention_decode.hpp"
#include "kvkit/ops/merge_states.hpp"
#include "support/paged_decode_problem.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using Catch::Matchers::Contains;
using kvkit::PagedDecodeParams;
using kvkit::PagedKVLayout;

namespace {

template <class T> double tolerance();
template <> double tolerance<float>() { return 1e-5; }
template <> double tolerance<kvkit::half>() { return 2e-3; }
template <> double tolerance<kvkit::bfloat16>() { return 1e-2; }

using kvkit::testing::DecodeCase;

// The shared inputs plus this test's outputs and float64 reference.
template <class QT, class KVT>
struct DecodeProblem : kvkit::testing::PagedDecodeInputs<QT, KVT> {
  using Base = kvkit::testing::PagedDecodeInputs<QT, KVT>;
  using Base::c;
  using Base::k;
  using Base::v;
  using Base::q;
  using Base::layout;
  using Base::block_table;
  using Base::seq_lens;
  using Base::max_blocks;
  using Base::kPad;
  std::vector<QT> o;
  std::vector<float> lse;

  DecodeProblem(const DecodeCase& cs, std::uint64_t seed) : Base(cs, seed) {
    o.assign(std::size_t(this->rows() * c.q_heads * (c.head_dim + kPad)), kvkit::from_float<QT>(-777.0f));
    lse.assign(std::size_t(this->rows() * c.q_heads), -777.0f);
  }

  PagedDecodeParams params() { return Base::params(o.data(), lse.data()); }

  // float64 reference for row (t, head): o and lse.
  void reference(std::int64_t b, int i, int h, const PagedDecodeParams& p, std::vector<double>& out,
                 double& out_lse) const {
    const int group = c.q_heads / c.kv_heads;
    const std::int64_t t = b * c.q_len + i;
    const std::int64_t len = seq_lens[b];
    const std::int64_t q_pos = len - c.q_len + i;
    std::vector<double> scores;
    std::vector<std::int64_t> keys;
    for (std::int64_t kp = 0; kp < len; ++kp) {
      if (!kvkit::attention_visible(p, q_pos, kp)) continue;
      const std::int64_t slot = std::int64_t(block_table[b * max_blocks + kp / c.page_size]) * c.page_size + kp % c.page_size;
      const std::int64_t off = layout.slot_offset(slot, h / group);
      double dot = 0.0;
      for (int d = 0; d < c.head_dim; ++d) {
        dot += double(kvkit::to_float(q[(t * c.q_heads + h) * c.head_dim + d])) * double(kvkit::to_float(k[off + d]));
      }
      double s = dot * double(p.sm_scale);
      if (c.softcap > 0) s = c.softcap * std::tanh(s / c.softcap);
      scores.push_back(s);
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
      for (int d = 0; d < c.head_dim; ++d) out[d] += w * double(kvkit::to_float(v[keys[j] + d]));
    }
    out_lse = m + std::log(sum);
  }

  // Runs the op and compares every row; checks the o padding is untouched.
  void run_and_check() {
    const PagedDecodeParams p = params();
    kvkit::paged_decode_attention(p);
    const double tol = std::max(tolerance<QT>(), tolerance<KVT>());
    std::vector<double> ref;
    double ref_lse;
    for (std::size_t b = 0; b < seq_lens.size(); ++b) {
      for (int i = 0; i < c.q_len; ++i) {
        for (int h = 0; h < c.q_heads; ++h) {
          reference(std::int64_t(b), i, h, p, ref, ref_lse);
          const std::int64_t t = std::int64_t(b) * c.q_len + i;
          const QT* row = o.data() + t * p.o_stride_token + h * p.o_stride_head;
          double worst = 0.0;
          for (int d = 0; d < c.head_dim; ++d) {
            worst = std::max(worst, std::fabs(double(kvkit::to_float(row[d])) - ref[d]));
          }
          // |v| ~ N(0, 1): about 5 at most; use it as the scale of the error.
          if (!(worst <= tol * 5.0)) {
            FAIL("seq " << b << " (len " << seq_lens[b] << ") token " << i << " head " << h
                        << ": max |o - ref| = " << worst);
          }
          const float got_lse = lse[std::size_t(t * c.q_heads + h)];
          if (std::isinf(ref_lse)) {
            REQUIRE(std::isinf(got_lse));
          } else {
            REQUIRE(std::fabs(got_lse - ref_lse) <= 1e-4 * std::max(1.0, std::fabs(ref_lse)));
          }
          for (int d = c.head_dim; d < c.head_dim + kPad; ++d) {
            REQUIRE(kvkit::to_float(row[d]) == kvkit::to_float(kvkit::from_float<QT>(-777.0f)));
          }
        }
      }
    }
  }
};

template <class QT, class KVT>
void check_matrix() {
  std::uint64_t seed = 100;
  for (int head_dim : {64, 96, 128, 256}) {
    for (int group : {1, 4, 8, 16}) {
      for (int page_size : {1, 16, 64}) {
        DecodeCase c;
        c.head_dim = head_dim;
        c.kv_heads = 2;
        c.q_heads = 2 * group;
        c.page_size = page_size;
        c.seq_lens = {1, 2, std::max(1, page_size - 1), page_size + 1, 300};
        c.hnd = (seed % 2) == 0;
        INFO("head_dim " << head_dim << " group " << group << " page_size " << page_size
                         << (c.hnd ? " HND" : " NHD"));
        DecodeProblem<QT, KVT>(c, seed++).run_and_check();
      }
    }
  }
}

}  // namespace

TEST_CASE("paged decode attention matches float64 for every head_dim, GQA ratio, page size and dtype") {
  SECTION("fp32 q, fp32 kv") { check_matrix<float, float>(); }
  SECTION("bf16 q, bf16 kv") { check_matrix<kvkit::bfloat16, kvkit::bfloat16>(); }
  SECTION("fp16 q, fp16 kv") { check_matrix<kvkit::half, kvkit::half>(); }
  SECTION("fp32 q, bf16 kv") { check_matrix<float, kvkit::bfloat16>(); }
}

TEST_CASE("head sizes that are not a multiple of the vector chunk read fp32 and bf16 caches through float tiles") {
  // 40 and 80 are whole AVX2 chunks (16) or not, never whole AVX-512 ones
  // (32): the in-place bodies hand these calls to the tile body.
  std::uint64_t seed = 900;
  for (int head_dim : {40, 80}) {
    DecodeCase c;
    c.head_dim = head_dim;
    c.kv_heads = 2;
    c.q_heads = 8;
    c.page_size = 16;
    c.seq_lens = {1, 17, 300};
    INFO("head_dim " << head_dim);
    DecodeProblem<float, float>(c, seed++).run_and_check();
    DecodeProblem<kvkit::bfloat16, kvkit::bfloat16>(c, seed++).run_and_check();
    DecodeProblem<float, kvkit::bfloat16>(c, seed++).run_and_check();
    DecodeProblem<kvkit::half, kvkit::half>(c, seed++).run_and_check();
  }
}

TEST_CASE("paged decode attention handles long and wildly different sequence lengths") {
  DecodeCase c;
  c.head_dim = 64;
  c.q_heads = 4;
  c.kv_heads = 1;  // MQA
  c.page_size = 16;
  c.seq_lens = {33000, 1, 1000, 17};
  DecodeProblem<float, float>(c, 7).run_and_check();
}

TEST_CASE("sliding window, sinks, soft-cap and q_len > 1 follow the masking rule") {
  DecodeCase c;
  c.head_dim = 96;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.page_size = 16;
  c.seq_lens = {9, 200, 1000, 64};
  SECTION("window") {
    c.window = 50;
    DecodeProblem<float, float>(c, 11).run_and_check();
  }
  SECTION("window with sinks") {
    c.window = 50;
    c.sinks = 4;
    DecodeProblem<float, kvkit::bfloat16>(c, 12).run_and_check();
  }
  SECTION("soft-cap") {
    c.softcap = 5.0f;  // small enough to bend the scores
    DecodeProblem<float, float>(c, 13).run_and_check();
  }
  SECTION("speculative decoding: q_len 4, causal among the new tokens") {
    c.q_len = 4;
    DecodeProblem<float, float>(c, 14).run_and_check();
    c.q_len = 8;
    c.window = 30;
    c.sinks = 2;
    DecodeProblem<kvkit::bfloat16, kvkit::bfloat16>(c, 15).run_and_check();
  }
}

TEST_CASE("split-KV: attending to two key ranges and merging equals attending to all") {
  DecodeCase c;
  c.head_dim = 128;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.page_size = 16;
  c.seq_lens = {2, 40, 777, 2048};
  c.q_len = 2;
  DecodeProblem<float, float> full(c, 21);
  full.run_and_check();
  for (std::int64_t split : {0, 1, 33, 500, 5000}) {
    DecodeProblem<float, float> part(c, 21);
    PagedDecodeParams p = part.params();
    std::vector<float> o_a(part.o.size()), lse_a(part.lse.size()), o_b(part.o.size()), lse_b(part.lse.size());
    p.o_stride_head = c.head_dim;  // dense rows for merge_states
    p.o_stride_token = std::int64_t(c.q_heads) * c.head_dim;
    p.kv_end = split;
    p.o = o_a.data();
    p.lse = lse_a.data();
    kvkit::paged_decode_attention(p);
    p.kv_begin = split;
    p.kv_end = INT64_MAX;
    p.o = o_b.data();
    p.lse = lse_b.data();
    kvkit::paged_decode_attention(p);
    const std::int64_t rows = std::int64_t(part.lse.size());
    kvkit::merge_states(o_a.data(), lse_a.data(), o_b.data(), lse_b.data(), o_a.data(), lse_a.data(), rows, c.head_dim);
    for (std::int64_t r = 0; r < rows; ++r) {
      REQUIRE(lse_a[r] == Approx(full.lse[r]).epsilon(1e-5));
      for (int d = 0; d < c.head_dim; ++d) {
        const float want = kvkit::to_float(full.o[r * (c.head_dim + full.kPad) + d]);
        REQUIRE(std::fabs(o_a[r * c.head_dim + d] - want) <= 1e-5f);
      }
    }
  }
}

TEST_CASE("merging states is associative and treats empty states as absent") {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  const int dim = 33, rows = 7;
  std::vector<float> o[3], lse[3];
  for (int s = 0; s < 3; ++s) {
    o[s].resize(rows * dim);
    lse[s].resize(rows);
    for (auto& x : o[s]) x = normal(rng);
    for (auto& x : lse[s]) x = 5.0f * normal(rng);
  }
  lse[2][3] = -INFINITY;  // an empty state
  std::vector<float> ab_o(rows * dim), ab_lse(rows), left_o(rows * dim), left_lse(rows);
  kvkit::merge_states(o[0].data(), lse[0].data(), o[1].data(), lse[1].data(), ab_o.data(), ab_lse.data(), rows, dim);
  kvkit::merge_states(ab_o.data(), ab_lse.data(), o[2].data(), lse[2].data(), left_o.data(), left_lse.data(), rows, dim);
  std::vector<float> bc_o(rows * dim), bc_lse(rows), right_o(rows * dim), right_lse(rows);
  kvkit::merge_states(o[1].data(), lse[1].data(), o[2].data(), lse[2].data(), bc_o.data(), bc_lse.data(), rows, dim);
  kvkit::merge_states(o[0].data(), lse[0].data(), bc_o.data(), bc_lse.data(), right_o.data(), right_lse.data(), rows, dim);
  // And all three at once with the variable-length merge.
  std::vector<float> all_o, all_lse;
  std::vector<std::int64_t> indptr = {0};
  for (int r = 0; r < rows; ++r) {
    for (int s = 0; s < 3; ++s) {
      all_o.insert(all_o.end(), o[s].begin() + r * dim, o[s].begin() + (r + 1) * dim);
      all_lse.push_back(lse[s][r]);
    }
    indptr.push_back(indptr.back() + 3);
  }
  std::vector<float> var_o(rows * dim), var_lse(rows);
  kvkit::merge_states_varlen(all_o.data(), all_lse.data(), indptr.data(), rows, dim, var_o.data(), var_lse.data());
  for (int r = 0; r < rows; ++r) {
    // float64 reference of the three-way merge.
    const double m = std::max({double(lse[0][r]), double(lse[1][r]), double(lse[2][r])});
    double sum = 0;
    for (int s = 0; s < 3; ++s) sum += std::exp(double(lse[s][r]) - m);
    CHECK(left_lse[r] == Approx(m + std::log(sum)).epsilon(1e-6));
    CHECK(right_lse[r] == Approx(left_lse[r]).epsilon(1e-6));
    CHECK(var_lse[r] == Approx(left_lse[r]).epsilon(1e-6));
    for (int d = 0; d < dim; ++d) {
      double want = 0;
      for (int s = 0; s < 3; ++s) want += std::exp(double(lse[s][r]) - m) / sum * o[s][r * dim + d];
      CHECK(std::fabs(left_o[r * dim + d] - want) <= 1e-5);
      CHECK(std::fabs(right_o[r * dim + d] - want) <= 1e-5);
      CHECK(std::fabs(var_o[r * dim + d] - want) <= 1e-5);
    }
  }
  // Two empty states merge to an empty state, without NaN.
  const float neg_inf = -INFINITY, zero = 0.0f;
  float out_o = 1.0f, out_lse = 1.0f;
  kvkit::merge_states(&zero, &neg_inf, &zero, &neg_inf, &out_o, &out_lse, 1, 1);
  CHECK(out_o == 0.0f);
  CHECK(std::isinf(out_lse));
}

TEST_CASE("bad decode attention input raises a clear error and writes nothing") {
  DecodeCase c;
  c.q_heads = 8;
  c.kv_heads = 4;
  c.seq_lens = {5, 9};
  DecodeProblem<float, float> prob(c, 1);
  PagedDecodeParams p = prob.params();
  const std::vector<float> before = prob.o;
  SECTION("kv heads do not divide q heads") {
    p.num_q_heads = 6;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p),
                      Contains("'num_q_heads' = 6: expected a positive multiple of the kv heads (4)"));
  }
  SECTION("sequence length beyond the table") {
    prob.seq_lens[1] = 100;  // needs 7 pages; the table has 1 column
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("seq_lens"));
  }
  SECTION("q_len longer than the sequence") {
    p.q_len = 6;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("sequence 0 has seq_len 5 < q_len (6)"));
  }
  SECTION("unsupported cache dtype") {
    p.kv_dtype = kvkit::DType::kInt32;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'kv_dtype' = int32"));
  }
  SECTION("null output") {
    p.o = nullptr;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'o' = nullptr"));
  }
  SECTION("zero scale") {
    p.sm_scale = 0.0f;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'sm_scale' = 0"));
  }
  CHECK(std::memcmp(prob.o.data(), before.data(), before.size() * sizeof(float)) == 0);
}

TEST_CASE("cascade: a shared prefix attended once for all sequences, merged with each suffix, equals full attention") {
  // Four sequences share a 64-token prefix (the same four pages) and each has
  // its own suffix. Level 1 attends every sequence's query to the prefix in one
  // non-causal call; level 2 attends each query to its own suffix; merging the
  // two states gives attention over the whole sequence (FlashInfer's cascade).
  DecodeCase c;
  c.head_dim = 128;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.page_size = 16;
  const int prefix = 64, batch = 4;
  c.seq_lens = {prefix + 1, prefix + 17, prefix + 100, prefix + 33};
  DecodeProblem<float, float> prob(c, 31);
  // Make every sequence use sequence 0's prefix pages and copy its K/V there.
  for (int b = 1; b < batch; ++b) {
    for (int i = 0; i < prefix / c.page_size; ++i) prob.block_table[b * prob.max_blocks + i] = prob.block_table[i];
  }
  prob.run_and_check();  // the reference: full attention per sequence

  PagedDecodeParams full = prob.params();
  const std::int64_t rows = batch * c.q_heads;
  std::vector<float> o_prefix(rows * c.head_dim), lse_prefix(rows), o_suffix(rows * c.head_dim), lse_suffix(rows);
  // Level 1: one "sequence" (the prefix pages) whose q rows are the batch's queries.
  PagedDecodeParams shared = full;
  const std::int32_t prefix_len = prefix;
  shared.page_table = {prob.block_table.data(), &prefix_len, 1, prob.max_blocks, prob.max_blocks};
  shared.q_len = batch;
  shared.causal = false;
  shared.o = o_prefix.data();
  shared.o_stride_head = c.head_dim;
  shared.o_stride_token = std::int64_t(c.q_heads) * c.head_dim;
  shared.lse = lse_prefix.data();
  kvkit::paged_decode_attention(shared);
  // Level 2: each sequence's own keys after the prefix.
  PagedDecodeParams own = full;
  own.kv_begin = prefix;
  own.o = o_suffix.data();
  own.o_stride_head = c.head_dim;
  own.o_stride_token = std::int64_t(c.q_heads) * c.head_dim;
  own.lse = lse_suffix.data();
  kvkit::paged_decode_attention(own);
  kvkit::merge_states(o_prefix.data(), lse_prefix.data(), o_suffix.data(), lse_suffix.data(), o_prefix.data(),
                      lse_prefix.data(), rows, c.head_dim);
  for (std::int64_t r = 0; r < rows; ++r) {
    REQUIRE(lse_prefix[r] == Approx(prob.lse[r]).epsilon(1e-5));
    for (int d = 0; d < c.head_dim; ++d) {
      REQUIRE(std::fabs(o_prefix[r * c.head_dim + d] - prob.o[r * (c.head_dim + prob.kPad) + d]) <= 1e-5f);
    }
  }
}

TEST_CASE("ragged queries: one call with q_indptr equals one call per sequence (chunked prefill batch)") {
  // Sequences with 1, 5, 0 and 17 new tokens (the last ones of their cached
  // lengths), as a scheduler mixes decode tokens and prefill chunks.
  DecodeCase c;
  c.head_dim = 64;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.page_size = 16;
  c.seq_lens = {9, 40, 3, 100};
  const std::vector<std::int64_t> q_counts = {1, 5, 0, 17};
  std::vector<std::int64_t> indptr = {0};
  for (auto n : q_counts) indptr.push_back(indptr.back() + n);
  const std::int64_t rows = indptr.back();
  c.q_len = 17;  // the inputs' q buffer must hold the largest sequence's rows; ignored with q_indptr
  DecodeProblem<float, float> prob(c, 77);
  // Queries packed row after row: use the first `rows` token rows of prob.q.
  std::vector<float> o(std::size_t(rows * c.q_heads * c.head_dim), -5.0f), lse(std::size_t(rows * c.q_heads));
  PagedDecodeParams p = prob.params();
  p.q_indptr = indptr.data();
  p.o = o.data();
  p.o_stride_head = c.head_dim;
  p.o_stride_token = std::int64_t(c.q_heads) * c.head_dim;
  p.lse = lse.data();
  kvkit::paged_decode_attention(p);
  for (std::size_t b = 0; b < q_counts.size(); ++b) {
    if (q_counts[b] == 0) continue;
    PagedDecodeParams one = prob.params();
    one.page_table.block_table = prob.block_table.data() + b * prob.max_blocks;
    one.page_table.seq_lens = prob.seq_lens.data() + b;
    one.page_table.batch_size = 1;
    one.q_len = int(q_counts[b]);
    one.q = prob.q.data() + indptr[b] * c.q_heads * c.head_dim;
    std::vector<float> o1(std::size_t(q_counts[b] * c.q_heads * c.head_dim)), l1(std::size_t(q_counts[b] * c.q_heads));
    one.o = o1.data();
    one.o_stride_head = c.head_dim;
    one.o_stride_token = std::int64_t(c.q_heads) * c.head_dim;
    one.lse = l1.data();
    kvkit::paged_decode_attention(one);
    for (std::size_t i = 0; i < o1.size(); ++i) REQUIRE(o[std::size_t(indptr[b] * c.q_heads * c.head_dim) + i] == o1[i]);
    for (std::size_t i = 0; i < l1.size(); ++i) REQUIRE(lse[std::size_t(indptr[b] * c.q_heads) + i] == l1[i]);
  }
  SECTION("bad indptr") {
    indptr[2] = 0;  // decreasing: {0, 1, 0, 6, 23}
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'q_indptr[2]' = 0: expected >= q_indptr[1] (1)"));
  }
  SECTION("more new tokens than the sequence holds") {
    indptr = {0, 10, 10, 10, 10};  // sequence 0 holds 9 tokens
    p.q_indptr = indptr.data();
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("sequence 0 has seq_len 9 < q_len (10)"));
  }
  SECTION("one sequence of many ragged rows still needs a token stride (q_len is ignored)") {
    const std::vector<std::int64_t> one_seq = {0, 5};
    p.q_indptr = one_seq.data();
    p.page_table.batch_size = 1;
    p.q_len = 1;
    p.q_stride_token = 0;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'q_stride_token' = 0"));
    p.q_stride_token = std::int64_t(c.q_heads) * c.head_dim;
    p.o_stride_token = 0;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'o_stride_token' = 0"));
  }
}

TEST_CASE("one sequence of MQA splits its q heads over the threads and still matches float64") {
  // With fewer sequences than threads the CPU op splits kv heads, then the q
  // heads of each group; 4 threads force both kinds of split here.
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  omp_set_num_threads(4);
#endif
  for (int kv_heads : {1, 2}) {
    DecodeCase c;
    c.head_dim = 64;
    c.kv_heads = kv_heads;
    c.q_heads = 32;
    c.page_size = 16;
    c.q_len = 2;
    c.seq_lens = {300};
    INFO("kv_heads " << kv_heads);
    DecodeProblem<float, kvkit::bfloat16>(c, 77 + std::uint64_t(kv_heads)).run_and_check();
  }
#if defined(_OPENMP)
  omp_set_num_threads(saved);
#endif
}

#if defined(__GNUC__) || defined(__clang__)
namespace {
// Units in the last place between two floats of the same sign.
std::int64_t ulps_apart(float a, float b) {
  std::int32_t ia = 0, ib = 0;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::abs(std::int64_t(ia) - std::int64_t(ib));
}

template <class V>
void check_vector_exp(const std::vector<float>& xs, float minus) {
  constexpr int kLanes = kvkit::detail::kLanes<V>;
  for (std::size_t i = 0; i + kLanes <= xs.size(); i += kLanes) {
    float lanes[kLanes];
    std::copy(xs.begin() + std::ptrdiff_t(i), xs.begin() + std::ptrdiff_t(i + kLanes), lanes);
    kvkit::detail::exp_nonpositive_in_place<V>(lanes, minus);
    for (int l = 0; l < kLanes; ++l) {
      const float x = xs[i + std::size_t(l)] - minus;
      const float scalar = kvkit::detail::exp_nonpositive(x);
      INFO("x = " << x << ", lanes " << kLanes);
      if (std::isnan(x)) {
        CHECK(std::isnan(lanes[l]));
        continue;
      }
      // The same operations lane by lane; one ulp allows a compiler that
      // contracts a multiply-add in one form and not the other.
      CHECK(ulps_apart(lanes[l], scalar) <= 1);
      if (x < -87.3f) {
        CHECK(lanes[l] == 0.0f);
      } else {
        const double want = std::exp(double(x));
        CHECK(std::abs(double(lanes[l]) - want) <= 4e-7 * want);
      }
    }
  }
}
}  // namespace

TEST_CASE("the decode softmax's vector exp equals its scalar exp and float64 exp") {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> wide(-100.0f, 0.0f), narrow(-1.0f, 0.0f);
  std::vector<float> xs = {0.0f, -0.0f, -1e-30f, -87.0f, -87.29f, -87.3f, -87.31f, -88.0f, -1e30f,
                           -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                           -0.34657359f, -0.34657362f, -0.69314718f};
  while (xs.size() % 16 != 0) xs.push_back(narrow(rng));
  for (int i = 0; i < 4096; ++i) xs.push_back(i % 2 == 0 ? wide(rng) : narrow(rng));
  check_vector_exp<kvkit::detail::Vec4>(xs, 0.0f);
  check_vector_exp<kvkit::detail::Vec8>(xs, 0.0f);
  check_vector_exp<kvkit::detail::Vec16>(xs, 0.0f);
  // As the softmax calls it: a score minus the running max.
  std::vector<float> scores;
  for (int i = 0; i < 1024; ++i) scores.push_back(3.5f + wide(rng) * 0.2f);
  check_vector_exp<kvkit::detail::Vec8>(scores, 3.5f);
}
#endif
