// The CUDA chunked prefill (plan_prefill + run_prefill, tensor cores)
// against the CPU paged_decode_attention with ragged queries (q_indptr) on
// the same inputs. Skipped without a GPU.
//
// Tolerances, GPU vs CPU, per query row (token, head), with scale = the
// largest |o_cpu| of the row:
//   |o_gpu - o_cpu| <= rel * scale + 1e-6, rel = 2e-2 for bf16, 3e-3 for fp16.
// Both paths accumulate in float32 from the same fp16/bf16 inputs; the GPU
// also rounds the softmax weights P to the input type before P·V (as
// FlashAttention does), a relative error of at most 2^-8 (bf16) or 2^-11
// (fp16) per weight, and both round o to the output type, where they may
// land one unit in the last place apart (2^-7 bf16, 2^-10 fp16, relative to
// the value). lse: |lse_gpu - lse_cpu| <= 2e-4 * max(1, |lse_cpu|). The test
// with q = 0 makes every score 0, so lse = log(number of visible keys)
// exactly: one key too many or too few shows, whatever the chunk.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvkit/cuda/attention_prefill.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/ops/attention_decode.hpp"
#include "support/cuda_graph.hpp"
#include "support/paged_decode_problem.hpp"

using Catch::Matchers::Contains;
using kvkit::PagedDecodeParams;
using kvkit::cuda::DeviceBuffer;
using kvkit::cuda::PrefillPlan;

namespace {

template <class T> double rel_tolerance();
template <> double rel_tolerance<kvkit::half>() { return 3e-3; }
template <> double rel_tolerance<kvkit::bfloat16>() { return 2e-2; }

struct PrefillCase {
  int head_dim = 128;
  int q_heads = 8;
  int kv_heads = 2;
  int page_size = 16;
  std::vector<int> chunks{1};    // new tokens per sequence
  std::vector<int> prefixes{0};  // cached tokens before them: seq_len = prefix + chunk
  int window = 0;
  int sinks = 0;
  float softcap = 0.0f;
  std::int64_t kv_begin = 0;
  std::int64_t kv_end = INT64_MAX;
  bool hnd = false;
  bool causal = true;
  bool ragged = true;   // false: no q_indptr, every chunk the same length (q_len)
  bool with_lse = true;
  int head_pad = 0;     // > 0: cache head rows padded (16-byte copies impossible)
  int q_pad = 0;        // > 0: q head rows padded likewise
  bool zero_q = false;  // every score 0
};

kvkit::testing::DecodeCase decode_case(const PrefillCase& c) {
  kvkit::testing::DecodeCase d;
  d.head_dim = c.head_dim;
  d.q_heads = c.q_heads;
  d.kv_heads = c.kv_heads;
  d.page_size = c.page_size;
  d.seq_lens.clear();
  for (std::size_t b = 0; b < c.chunks.size(); ++b) d.seq_lens.push_back(c.prefixes[b] + c.chunks[b]);
  d.q_len = 1;  // the queries are made below, one row per new token
  d.window = c.window;
  d.sinks = c.sinks;
  d.softcap = c.softcap;
  d.kv_begin = c.kv_begin;
  d.kv_end = c.kv_end;
  d.hnd = c.hnd;
  d.head_pad = c.head_pad;
  return d;
}

// The cache of the shared test inputs (pages scattered over a shuffled pool,
// unowned slots NaN), ragged queries, and CPU and GPU outputs.
template <class T>
struct PrefillProblem : kvkit::testing::PagedDecodeInputs<T, T> {
  using Base = kvkit::testing::PagedDecodeInputs<T, T>;
  using Base::kPad;
  PrefillCase pc;
  std::vector<std::int64_t> q_indptr;
  std::vector<T> queries;  // [tokens, q_heads, head_dim + q_pad]
  std::vector<T> o_cpu, o_gpu;
  std::vector<float> lse_cpu, lse_gpu;
  const T poison = kvkit::from_float<T>(-777.0f);

  PrefillProblem(const PrefillCase& c, std::uint64_t seed) : Base(decode_case(c), seed), pc(c) {
    q_indptr.push_back(0);
    for (int n : c.chunks) q_indptr.push_back(q_indptr.back() + n);
    std::mt19937_64 rng(seed * 7919 + 1);
    std::normal_distribution<float> normal;
    queries.resize(std::size_t(tokens() * c.q_heads * q_stride_head()));
    for (auto& x : queries) x = kvkit::from_float<T>(c.zero_q ? 0.0f : normal(rng));
    o_cpu.assign(std::size_t(tokens() * c.q_heads * (c.head_dim + kPad)), poison);
    o_gpu = o_cpu;
    lse_cpu.assign(std::size_t(tokens() * c.q_heads), -777.0f);
    lse_gpu = lse_cpu;
  }

  std::int64_t tokens() const { return q_indptr.back(); }
  std::int64_t q_stride_head() const { return pc.head_dim + pc.q_pad; }

  // Params with host pointers for the given outputs.
  PagedDecodeParams params(T* o, float* lse) const {
    PagedDecodeParams p = Base::params(o, pc.with_lse ? lse : nullptr);
    p.q = queries.data();
    p.q_stride_head = q_stride_head();
    p.q_stride_token = std::int64_t(pc.q_heads) * q_stride_head();
    p.causal = pc.causal;
    if (pc.ragged) {
      p.q_indptr = q_indptr.data();
    } else {
      p.q_len = pc.chunks.front();
    }
    return p;
  }

  void run_cpu() { kvkit::paged_decode_attention(params(o_cpu.data(), lse_cpu.data())); }

  struct Device {
    DeviceBuffer q, k, v, table, lens, indptr, o, lse;
    PagedDecodeParams p;
  };
  // Device copies of every array; params with device pointers (q_indptr included).
  Device upload() const {
    Device d;
    d.q = DeviceBuffer::from_host(queries);
    d.k = DeviceBuffer::from_host(this->k);
    d.v = DeviceBuffer::from_host(this->v);
    d.table = DeviceBuffer::from_host(this->block_table);
    d.lens = DeviceBuffer::from_host(this->seq_lens);
    d.indptr = DeviceBuffer::from_host(q_indptr);
    d.o = DeviceBuffer::from_host(o_gpu);
    d.lse = DeviceBuffer::from_host(lse_gpu);
    d.p = params(d.o.template as<T>(), d.lse.template as<float>());
    d.p.q = d.q.data();
    d.p.k_cache = d.k.data();
    d.p.v_cache = d.v.data();
    d.p.page_table.block_table = d.table.template as<std::int32_t>();
    d.p.page_table.seq_lens = d.lens.template as<std::int32_t>();
    if (pc.ragged) d.p.q_indptr = d.indptr.template as<std::int64_t>();
    return d;
  }

  PrefillPlan plan_for(const PagedDecodeParams& device_params) const {
    return kvkit::cuda::plan_prefill(device_params, pc.ragged ? q_indptr.data() : nullptr, this->seq_lens.data());
  }

  // Plans, runs on the GPU, downloads o and lse.
  PrefillPlan run_gpu() {
    Device d = upload();
    const PrefillPlan plan = plan_for(d.p);
    kvkit::cuda::run_prefill(d.p, plan, nullptr);
    KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
    o_gpu = d.o.template to_host<T>();
    lse_gpu = d.lse.template to_host<float>();
    return plan;
  }

  // Sequence of a query token.
  std::size_t sequence_of(std::int64_t token) const {
    return std::size_t(std::upper_bound(q_indptr.begin(), q_indptr.end(), token) - q_indptr.begin() - 1);
  }

  // GPU vs CPU on every row; o padding untouched; lse untouched when not requested.
  void compare() const {
    const double rel = rel_tolerance<T>();
    const int dim = pc.head_dim;
    for (std::int64_t t = 0; t < tokens(); ++t) {
      for (int h = 0; h < pc.q_heads; ++h) {
        const std::size_t base = std::size_t(t * pc.q_heads + h) * (dim + kPad);
        double scale = 0.0;
        for (int d = 0; d < dim; ++d) scale = std::max(scale, std::fabs(double(kvkit::to_float(o_cpu[base + d]))));
        double worst = 0.0;
        int worst_d = 0;
        for (int d = 0; d < dim; ++d) {
          const double want = kvkit::to_float(o_cpu[base + d]);
          const double got = kvkit::to_float(o_gpu[base + d]);
          const double excess = std::fabs(got - want) - (rel * scale + 1e-6);
          if (!(excess <= worst)) {
            worst = std::isnan(excess) ? INFINITY : excess;
            worst_d = d;
          }
        }
        const std::size_t b = sequence_of(t);
        if (worst > 0.0) {
          FAIL("seq " << b << " (prefix " << pc.prefixes[b] << ", chunk " << pc.chunks[b] << ") token "
                      << t - q_indptr[b] << " head " << h << " dim " << worst_d << ": gpu "
                      << kvkit::to_float(o_gpu[base + worst_d]) << " cpu " << kvkit::to_float(o_cpu[base + worst_d])
                      << " (row scale " << scale << ")");
        }
        for (int d = dim; d < dim + kPad; ++d) {
          if (std::memcmp(&o_gpu[base + d], &poison, sizeof(T)) != 0) FAIL("o padding of token " << t << " was written");
        }
        const std::size_t r = std::size_t(t * pc.q_heads + h);
        const float want_lse = lse_cpu[r];
        const float got_lse = lse_gpu[r];
        if (!pc.with_lse) {
          if (got_lse != -777.0f) FAIL("lse of token " << t << " head " << h << " was written without being asked for");
        } else if (std::isinf(want_lse)) {
          if (!(std::isinf(got_lse) && got_lse < 0)) FAIL("token " << t << " head " << h << ": lse " << got_lse << ", expected -inf");
        } else if (!(std::fabs(got_lse - want_lse) <= 2e-4 * std::max(1.0f, std::fabs(want_lse)))) {
          FAIL("seq " << b << " token " << t - q_indptr[b] << " head " << h << ": lse gpu " << got_lse << " cpu "
                      << want_lse);
        }
      }
    }
  }

  void check() {
    run_cpu();
    run_gpu();
    compare();
  }
};

// Chunks of 1, 15, 16, 17 (around a 16-token mma row block), 100 and 257 (a
// 128-row tile +- for most groups) plus an empty chunk, on cached prefixes of
// 0, 1, 63 and 1000 tokens, rotated by `seed` so that every chunk meets every
// prefix across the matrix.
PrefillCase ragged_batch(std::uint64_t seed) {
  PrefillCase c;
  c.chunks = {1, 15, 16, 17, 100, 257, 0};
  const int prefixes[4] = {0, 1, 63, 1000};
  c.prefixes.clear();
  for (std::size_t i = 0; i + 1 < c.chunks.size(); ++i) c.prefixes.push_back(prefixes[(i + seed) % 4]);
  c.prefixes.push_back(7);  // the empty chunk's sequence has cached tokens but no query
  return c;
}

template <class T>
void check_matrix() {
  std::uint64_t seed = 1;
  for (int head_dim : {64, 128}) {
    for (int group : {1, 4, 8}) {
      for (int page_size : {1, 16, 64}) {
        for (bool hnd : {false, true}) {
          PrefillCase c = ragged_batch(seed);
          c.head_dim = head_dim;
          c.kv_heads = 2;
          c.q_heads = 2 * group;
          c.page_size = page_size;
          c.hnd = hnd;
          INFO("head_dim " << head_dim << " group " << group << " page_size " << page_size << (hnd ? " HND" : " NHD")
                           << " seed " << seed);
          PrefillProblem<T>(c, seed++).check();
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("GPU prefill equals the CPU op on ragged chunks over cached prefixes, for every layout, page size, GQA "
          "ratio, head_dim and dtype") {
  SECTION("bf16") { check_matrix<kvkit::bfloat16>(); }
  SECTION("fp16") { check_matrix<kvkit::half>(); }
}

TEST_CASE("GPU prefill with head_dim 96, MQA and many row tiles") {
  PrefillCase c = ragged_batch(3);
  c.head_dim = 96;
  c.q_heads = 16;
  c.kv_heads = 1;  // MQA: the 257-token chunk has 4112 rows, 33 tiles
  PrefillProblem<kvkit::bfloat16>(c, 61).check();
  c.hnd = true;
  c.page_size = 64;
  PrefillProblem<kvkit::half>(c, 62).check();
}

TEST_CASE("GPU prefill: window, sinks, soft-cap, key ranges and non-causal attention follow the masking rule") {
  PrefillCase c = ragged_batch(2);
  c.head_dim = 128;
  c.q_heads = 8;
  c.kv_heads = 2;
  SECTION("window shorter than a chunk, with sinks") {
    c.window = 50;
    c.sinks = 4;
    PrefillProblem<kvkit::bfloat16>(c, 71).check();
    c.hnd = true;
    PrefillProblem<kvkit::half>(c, 72).check();
  }
  SECTION("window longer than the chunks, one sink") {
    c.window = 300;
    c.sinks = 1;
    PrefillProblem<kvkit::bfloat16>(c, 73).check();
  }
  SECTION("window without sinks; a window of 1 (each token sees itself)") {
    c.window = 64;
    PrefillProblem<kvkit::half>(c, 74).check();
    c.window = 1;
    PrefillProblem<kvkit::bfloat16>(c, 75).check();
  }
  SECTION("soft-cap") {
    c.softcap = 5.0f;
    PrefillProblem<kvkit::bfloat16>(c, 76).check();
    c.window = 40;
    c.sinks = 2;
    PrefillProblem<kvkit::half>(c, 77).check();
  }
  SECTION("key range [kv_begin, kv_end): rows that see nothing get o = 0, lse = -inf") {
    c.kv_begin = 33;
    c.kv_end = 700;
    PrefillProblem<kvkit::bfloat16>(c, 78).check();
    c.kv_begin = 1000;
    c.kv_end = 1010;
    PrefillProblem<kvkit::half>(c, 79).check();
  }
  SECTION("non-causal (the shared-prefix level of cascade attention)") {
    c.causal = false;
    PrefillProblem<kvkit::bfloat16>(c, 80).check();
  }
}

TEST_CASE("GPU prefill without q_indptr, without lse, and with unaligned strides") {
  PrefillCase c;
  c.head_dim = 128;
  c.q_heads = 32;
  c.kv_heads = 8;
  c.chunks = {200, 200, 200};
  c.prefixes = {0, 63, 1000};
  SECTION("uniform q_len, no lse requested") {
    c.ragged = false;
    c.with_lse = false;
    PrefillProblem<kvkit::bfloat16>(c, 81).check();
  }
  SECTION("cache and q head rows padded by one element: element-wise copies") {
    c.head_pad = 1;
    c.q_pad = 1;
    c.chunks = {1, 130, 17};
    PrefillProblem<kvkit::half>(c, 82).check();
    c.q_pad = 0;
    PrefillProblem<kvkit::bfloat16>(c, 83).check();
  }
}

TEST_CASE("GPU prefill with every score 0 sees exactly the visible keys") {
  // q = 0: each visible key gets weight 1 (exact in fp16), so lse =
  // log(count) and o is the mean of the visible values. The rule is written
  // out here, independently of attention_visible.
  PrefillCase c;
  c.head_dim = 64;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.page_size = 16;
  c.chunks = {1, 40, 300, 129};
  c.prefixes = {0, 5, 77, 1000};
  c.zero_q = true;
  struct Mask {
    int window, sinks;
    std::int64_t kv_begin, kv_end;
  };
  for (const Mask m : {Mask{0, 0, 0, INT64_MAX}, Mask{100, 4, 0, INT64_MAX}, Mask{0, 0, 10, 500},
                       Mask{64, 1, 5, 1100}, Mask{1, 0, 0, INT64_MAX}}) {
    c.window = m.window;
    c.sinks = m.sinks;
    c.kv_begin = m.kv_begin;
    c.kv_end = m.kv_end;
    INFO("window " << m.window << " sinks " << m.sinks << " keys [" << m.kv_begin << ", " << m.kv_end << ")");
    PrefillProblem<kvkit::half> prob(c, 91);
    prob.run_gpu();
    for (std::size_t b = 0; b < c.chunks.size(); ++b) {
      const std::int64_t len = c.prefixes[b] + c.chunks[b];
      for (int i = 0; i < c.chunks[b]; ++i) {
        const std::int64_t q_pos = len - c.chunks[b] + i;
        std::int64_t count = 0;
        std::vector<double> mean(std::size_t(c.head_dim), 0.0);
        for (std::int64_t kp = 0; kp < len; ++kp) {
          const bool causal = kp <= q_pos;
          const bool in_range = kp >= m.kv_begin && kp < m.kv_end;
          const bool in_window = m.window == 0 || q_pos - kp < m.window || kp < m.sinks;
          if (!(causal && in_range && in_window)) continue;
          ++count;
          for (int d = 0; d < c.head_dim; ++d) mean[d] += kvkit::to_float(prob.v[prob.layout.slot_offset(prob.slot(b, kp), 1) + d]);
        }
        // Head 3 belongs to kv head 1 (group 2).
        const std::size_t row = std::size_t(prob.q_indptr[b] + i) * c.q_heads + 3;
        INFO("seq " << b << " token " << i << ": " << count << " visible keys");
        const float lse = prob.lse_gpu[row];
        if (count == 0) {
          CHECK((std::isinf(lse) && lse < 0));
          continue;
        }
        CHECK(std::fabs(double(lse) - std::log(double(count))) <= 2e-6 * std::log(double(count)) + 1e-6);
        double worst = 0.0;
        for (int d = 0; d < c.head_dim; ++d) {
          const double want = mean[d] / double(count);
          const double got = kvkit::to_float(prob.o_gpu[row * (c.head_dim + prob.kPad) + d]);
          worst = std::max(worst, std::fabs(got - want) - (std::fabs(want) / 1024.0 + 1e-5));
        }
        CHECK(worst <= 0.0);
      }
    }
  }
}

TEST_CASE("GPU prefill captured in a CUDA graph and replayed gives the same result") {
  PrefillCase c = ragged_batch(1);
  c.q_heads = 8;
  c.kv_heads = 2;
  PrefillProblem<kvkit::bfloat16> prob(c, 95);
  prob.run_cpu();
  auto d = prob.upload();
  const PrefillPlan plan = prob.plan_for(d.p);
  kvkit::testing::capture_and_replay([&](cudaStream_t stream) { kvkit::cuda::run_prefill(d.p, plan, stream); });
  prob.o_gpu = d.o.to_host<kvkit::bfloat16>();
  prob.lse_gpu = d.lse.to_host<float>();
  prob.compare();
}

TEST_CASE("bad GPU prefill input raises a clear error and launches nothing") {
  PrefillCase c;
  c.chunks = {10, 20};
  c.prefixes = {5, 0};
  PrefillProblem<kvkit::bfloat16> prob(c, 99);
  auto d = prob.upload();
  PagedDecodeParams& p = d.p;
  const PrefillPlan plan = prob.plan_for(p);
  SECTION("a plan made for another shape") {
    PrefillPlan other = plan;
    other.batch_size = 1;
    CHECK_THROWS_WITH(kvkit::cuda::run_prefill(p, other), Contains("the plan was made for batch 1"));
    p.q_indptr = nullptr;
    p.q_len = 10;
    CHECK_THROWS_WITH(kvkit::cuda::run_prefill(p, plan), Contains("uniform queries (no q_indptr)"));
  }
  SECTION("float32 q and cache") {
    p.q_dtype = p.kv_dtype = kvkit::DType::kFloat32;
    CHECK_THROWS_WITH(kvkit::cuda::run_prefill(p, plan), Contains("'q_dtype' = float32: expected one of {float16, bfloat16}"));
  }
  SECTION("unsupported head_dim") {
    PrefillCase odd = c;
    odd.head_dim = 80;
    PrefillProblem<kvkit::bfloat16> other(odd, 2);
    auto od = other.upload();
    CHECK_THROWS_WITH(other.plan_for(od.p), Contains("'layout.head_dim' = 80: expected one of {64, 96, 128}"));
    CHECK_THROWS_WITH(kvkit::cuda::run_prefill(od.p, plan), Contains("'layout.head_dim' = 80"));
  }
  SECTION("null output") {
    p.o = nullptr;
    CHECK_THROWS_WITH(kvkit::cuda::run_prefill(p, plan), Contains("'o' = nullptr"));
  }
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const auto o_after = d.o.to_host<kvkit::bfloat16>();
  CHECK(std::memcmp(o_after.data(), prob.o_gpu.data(), o_after.size() * sizeof(kvkit::bfloat16)) == 0);
}
