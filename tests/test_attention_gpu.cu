// The CUDA decode attention (plan + run, split and unsplit) and merge kernels
// against the CPU ops on the same inputs. Skipped without a GPU.
//
// Tolerances, GPU vs CPU (both accumulate in float32, in different orders):
// |o_gpu - o_cpu| <= 2e-5 + rel * |o_cpu| with rel = 2e-5 for float32 output
// and one unit in the last place of the output type otherwise (2^-10 fp16,
// 2^-7 bf16: the two float results may round to neighbouring values);
// |lse_gpu - lse_cpu| <= 2e-5 * max(1, |lse_cpu|). A separate test with
// q = 0 makes every score 0, so lse = log(number of visible keys) exactly:
// one key too many or too few shows, however long the sequence.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/cuda/attention_decode.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/merge_states.cuh"
#include "kvkit/ops/attention_decode.hpp"
#include "kvkit/ops/merge_states.hpp"
#include "support/cuda_graph.hpp"
#include "support/paged_decode_problem.hpp"

using Catch::Matchers::Contains;
using kvkit::PagedDecodeParams;
using kvkit::PagedKVLayout;
using kvkit::cuda::DecodePlan;
using kvkit::cuda::DecodePlanOptions;
using kvkit::cuda::DeviceBuffer;

namespace {

template <class T> double rel_tolerance();
template <> double rel_tolerance<float>() { return 2e-5; }
template <> double rel_tolerance<kvkit::half>() { return 1.0 / 1024 * 1.01; }
template <> double rel_tolerance<kvkit::bfloat16>() { return 1.0 / 128 * 1.01; }

int num_sms() {
  int device = 0, sms = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

using kvkit::testing::DecodeCase;

// The shared inputs plus CPU and GPU outputs.
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
  std::vector<QT> o_cpu, o_gpu;
  std::vector<float> lse_cpu, lse_gpu;
  const QT poison = kvkit::from_float<QT>(-777.0f);

  DecodeProblem(const DecodeCase& cs, std::uint64_t seed) : Base(cs, seed) {
    o_cpu.assign(std::size_t(this->rows() * c.q_heads * (c.head_dim + kPad)), poison);
    o_gpu = o_cpu;
    lse_cpu.assign(std::size_t(this->rows() * c.q_heads), -777.0f);
    lse_gpu = lse_cpu;
  }

  // Params with host pointers (the CPU op's).
  PagedDecodeParams params() { return Base::params(o_cpu.data(), lse_cpu.data()); }

  void run_cpu() { kvkit::paged_decode_attention(params()); }

  // Device copies of every array; params() with device pointers.
  struct Device {
    DeviceBuffer q, k, v, table, lens, o, lse, workspace;
    PagedDecodeParams p;
  };
  Device upload() {
    Device d;
    d.q = DeviceBuffer::from_host(q);
    d.k = DeviceBuffer::from_host(k);
    d.v = DeviceBuffer::from_host(v);
    d.table = DeviceBuffer::from_host(block_table);
    d.lens = DeviceBuffer::from_host(seq_lens);
    d.o = DeviceBuffer::from_host(o_gpu);
    d.lse = DeviceBuffer::from_host(lse_gpu);
    d.p = params();
    d.p.q = d.q.data();
    d.p.k_cache = d.k.data();
    d.p.v_cache = d.v.data();
    d.p.page_table.block_table = d.table.template as<std::int32_t>();
    d.p.page_table.seq_lens = d.lens.template as<std::int32_t>();
    d.p.o = d.o.data();
    d.p.lse = d.lse.template as<float>();
    return d;
  }

  // Plans (from `plan_lens`, the host lengths; default: the real ones), runs
  // on the GPU and downloads o and lse. Returns the plan.
  DecodePlan run_gpu(const DecodePlanOptions& options, const std::vector<std::int32_t>* plan_lens = nullptr) {
    Device d = upload();
    const DecodePlan plan =
        kvkit::cuda::plan_decode(d.p, (plan_lens ? *plan_lens : seq_lens).data(), num_sms(), options);
    d.workspace = DeviceBuffer(plan.workspace_bytes);
    kvkit::cuda::run_decode(d.p, plan, d.workspace.data(), d.workspace.bytes(), nullptr);
    KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
    o_gpu = d.o.template to_host<QT>();
    lse_gpu = d.lse.template to_host<float>();
    return plan;
  }

  // GPU vs CPU on every row; the o padding must be untouched on both.
  void compare() const {
    const double rel = rel_tolerance<QT>();
    const std::int64_t rows = std::int64_t(seq_lens.size()) * c.q_len * c.q_heads;
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t t = r / c.q_heads;
      const int h = int(r % c.q_heads);
      const std::size_t base = std::size_t(r) * (c.head_dim + kPad);
      double worst = 0.0;
      int worst_d = 0;
      for (int d = 0; d < c.head_dim; ++d) {
        const double want = kvkit::to_float(o_cpu[base + d]);
        const double got = kvkit::to_float(o_gpu[base + d]);
        const double excess = std::fabs(got - want) - (2e-5 + rel * std::fabs(want));
        if (!(excess <= worst)) {
          worst = std::isnan(excess) ? INFINITY : excess;
          worst_d = d;
        }
      }
      if (worst > 0.0) {
        FAIL("seq " << t / c.q_len << " (len " << seq_lens[std::size_t(t / c.q_len)] << ") token "
                    << t % c.q_len << " head " << h << " dim " << worst_d << ": gpu "
                    << kvkit::to_float(o_gpu[base + worst_d]) << " cpu "
                    << kvkit::to_float(o_cpu[base + worst_d]));
      }
      for (int d = c.head_dim; d < c.head_dim + kPad; ++d) {
        if (std::memcmp(&o_gpu[base + d], &poison, sizeof(QT)) != 0) FAIL("o padding of row " << r << " was written");
      }
      const float want_lse = lse_cpu[std::size_t(r)];
      const float got_lse = lse_gpu[std::size_t(r)];
      if (std::isinf(want_lse)) {
        if (!(std::isinf(got_lse) && got_lse < 0)) FAIL("row " << r << ": lse " << got_lse << ", expected -inf");
      } else if (!(std::fabs(got_lse - want_lse) <= 2e-5 * std::max(1.0f, std::fabs(want_lse)))) {
        FAIL("row " << r << ": lse gpu " << got_lse << " cpu " << want_lse);
      }
    }
  }

  // CPU once, then the GPU unsplit and split (chunks of `chunk` keys), each against the CPU.
  void check_split_and_unsplit(std::int64_t chunk) {
    run_cpu();
    DecodePlanOptions unsplit;
    unsplit.max_splits = 1;
    {
      INFO("unsplit");
      const DecodePlan plan = run_gpu(unsplit);
      REQUIRE(plan.num_splits == 1);
      REQUIRE(plan.workspace_bytes == 0);
      compare();
    }
    DecodePlanOptions split;
    split.chunk_keys = chunk;
    split.max_splits = kvkit::cuda::kMaxDecodeSplits;
    o_gpu.assign(o_gpu.size(), poison);
    lse_gpu.assign(lse_gpu.size(), -777.0f);
    {
      INFO("split into chunks of " << chunk << " keys");
      run_gpu(split);
      compare();
    }
  }
};

template <class QT, class KVT>
void check_matrix() {
  std::uint64_t seed = 100;
  for (int head_dim : {48, 64, 96, 128, 256}) {
    for (int group : {1, 4, 8, 16}) {
      for (int page_size : {1, 16, 64}) {
        DecodeCase c;
        c.head_dim = head_dim;
        c.kv_heads = 2;
        c.q_heads = 2 * group;
        c.page_size = page_size;
        c.seq_lens = {1, 2, std::max(1, page_size - 1), page_size + 1, 1000};
        c.hnd = (seed % 2) == 0;
        INFO("head_dim " << head_dim << " group " << group << " page_size " << page_size
                         << (c.hnd ? " HND" : " NHD"));
        const std::int64_t chunk = 37 + std::int64_t(seed % 5) * 16;  // odd: chunks straddle tiles
        DecodeProblem<QT, KVT>(c, seed++).check_split_and_unsplit(chunk);
      }
    }
  }
}

}  // namespace

TEST_CASE("GPU decode attention equals the CPU op for every head_dim, GQA ratio, page size and dtype") {
  SECTION("fp32 q, fp32 kv") { check_matrix<float, float>(); }
  SECTION("bf16 q, bf16 kv") { check_matrix<kvkit::bfloat16, kvkit::bfloat16>(); }
  SECTION("fp16 q, fp16 kv") { check_matrix<kvkit::half, kvkit::half>(); }
  SECTION("fp32 q, bf16 kv") { check_matrix<float, kvkit::bfloat16>(); }
}

TEST_CASE("GPU decode attention handles long and wildly different sequence lengths") {
  DecodeCase c;
  c.head_dim = 64;
  c.q_heads = 4;
  c.kv_heads = 1;  // MQA
  c.page_size = 16;
  c.seq_lens = {33000, 1, 1000, 17};
  DecodeProblem<float, float>(c, 7).check_split_and_unsplit(1024);
  SECTION("the plan's own choice splits a lone long sequence") {
    c.head_dim = 128;
    c.q_heads = 32;
    c.kv_heads = 8;
    c.seq_lens = {33000};
    DecodeProblem<kvkit::bfloat16, kvkit::bfloat16> prob(c, 8);
    prob.run_cpu();
    const DecodePlan plan = prob.run_gpu(DecodePlanOptions{});
    CHECK(plan.num_splits > 1);
    CHECK(plan.workspace_bytes > 0);
    prob.compare();
  }
  SECTION("a plan made for shorter sequences stays correct (longer last chunks)") {
    c.seq_lens = {5000, 3000, 40};
    DecodeProblem<float, kvkit::bfloat16> prob(c, 9);
    prob.run_cpu();
    const std::vector<std::int32_t> shorter = {1000, 600, 40};
    DecodePlanOptions options;
    options.chunk_keys = 256;
    const DecodePlan plan = prob.run_gpu(options, &shorter);
    CHECK(plan.num_splits == 4);
    prob.compare();
  }
}

TEST_CASE("GPU decode attention: window, sinks, soft-cap, key ranges and q_len > 1 follow the masking rule") {
  DecodeCase c;
  c.head_dim = 96;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.page_size = 16;
  c.seq_lens = {9, 200, 1000, 64};
  SECTION("window") {
    c.window = 50;
    DecodeProblem<float, float>(c, 11).check_split_and_unsplit(16);
  }
  SECTION("window with sinks") {
    c.window = 50;
    c.sinks = 4;
    DecodeProblem<float, kvkit::bfloat16>(c, 12).check_split_and_unsplit(7);
  }
  SECTION("soft-cap") {
    c.softcap = 5.0f;
    DecodeProblem<float, float>(c, 13).check_split_and_unsplit(100);
  }
  SECTION("key range [kv_begin, kv_end)") {
    c.kv_begin = 33;
    c.kv_end = 700;
    DecodeProblem<kvkit::half, kvkit::half>(c, 14).check_split_and_unsplit(64);
  }
  SECTION("speculative decoding: q_len 2 to 8, causal among the new tokens") {
    for (int q_len : {2, 4, 8}) {
      c.q_len = q_len;
      c.window = q_len == 8 ? 30 : 0;
      c.sinks = q_len == 8 ? 2 : 0;
      INFO("q_len " << q_len);
      DecodeProblem<float, float>(c, 15 + q_len).check_split_and_unsplit(50);
      DecodeProblem<kvkit::bfloat16, kvkit::bfloat16>(c, 25 + q_len).check_split_and_unsplit(128);
    }
  }
  SECTION("more query rows than one block holds (q_len 8 x group 16; MQA with 128 heads)") {
    c.head_dim = 128;
    c.q_len = 8;
    c.q_heads = 32;
    DecodeProblem<kvkit::bfloat16, kvkit::bfloat16>(c, 31).check_split_and_unsplit(300);
    c.q_len = 1;
    c.q_heads = 128;
    c.kv_heads = 1;
    DecodeProblem<float, kvkit::bfloat16>(c, 32).check_split_and_unsplit(300);
  }
  SECTION("unaligned cache strides take the element-wise copy path") {
    c.head_pad = 1;
    DecodeProblem<kvkit::bfloat16, kvkit::bfloat16>(c, 41).check_split_and_unsplit(100);
    c.head_pad = 3;
    c.q_len = 3;
    DecodeProblem<float, float>(c, 42).check_split_and_unsplit(100);
  }
}

TEST_CASE("GPU decode attention with every score 0 sees exactly the visible keys") {
  // q = 0: each visible key gets weight 1/count, so lse = log(count) and o is
  // the mean of the visible values. The visibility rule is written out here.
  DecodeCase c;
  c.head_dim = 128;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.page_size = 16;
  c.seq_lens = {4, 17, 777, 33000};
  c.zero_q = true;
  struct Mask {
    int q_len, window, sinks;
    std::int64_t kv_begin, kv_end;
  };
  for (const Mask m : {Mask{1, 0, 0, 0, INT64_MAX}, Mask{3, 100, 4, 0, INT64_MAX}, Mask{2, 0, 0, 10, 500},
                       Mask{4, 64, 1, 5, 32990}}) {
    c.q_len = m.q_len;
    c.window = m.window;
    c.sinks = m.sinks;
    c.kv_begin = m.kv_begin;
    c.kv_end = m.kv_end;
    INFO("q_len " << m.q_len << " window " << m.window << " sinks " << m.sinks << " keys [" << m.kv_begin << ", "
                  << m.kv_end << ")");
    DecodeProblem<float, kvkit::bfloat16> prob(c, 51);
    for (std::int64_t chunk : {std::int64_t(0), std::int64_t(333)}) {
      DecodePlanOptions options;
      options.chunk_keys = chunk;
      options.max_splits = chunk == 0 ? 1 : kvkit::cuda::kMaxDecodeSplits;
      prob.run_gpu(options);
      for (std::size_t b = 0; b < c.seq_lens.size(); ++b) {
        for (int i = 0; i < c.q_len; ++i) {
          const std::int64_t len = c.seq_lens[b];
          const std::int64_t q_pos = len - c.q_len + i;
          std::int64_t count = 0;
          std::vector<double> mean(std::size_t(c.head_dim), 0.0);
          for (std::int64_t kp = 0; kp < len; ++kp) {
            const bool causal = kp <= q_pos;
            const bool in_range = kp >= m.kv_begin && kp < m.kv_end;
            const bool in_window = m.window == 0 || q_pos - kp < m.window || kp < m.sinks;
            if (!(causal && in_range && in_window)) continue;
            ++count;
            const std::int64_t slot =
                std::int64_t(prob.block_table[b * prob.max_blocks + kp / c.page_size]) * c.page_size +
                kp % c.page_size;
            for (int d = 0; d < c.head_dim; ++d) {
              mean[d] += kvkit::to_float(prob.v[prob.layout.slot_offset(slot, 1) + d]);
            }
          }
          // Head 7 belongs to kv head 1 (group 4).
          const std::size_t row = (b * c.q_len + i) * c.q_heads + 7;
          INFO("seq " << b << " token " << i << " chunk " << chunk << ": " << count << " visible keys");
          const float lse = prob.lse_gpu[row];
          if (count == 0) {
            CHECK(std::isinf(lse));
            continue;
          }
          CHECK(std::fabs(double(lse) - std::log(double(count))) <= 2e-6 * std::log(double(count)) + 1e-7);
          double worst = 0.0;
          for (int d = 0; d < c.head_dim; ++d) {
            const double got = prob.o_gpu[row * (c.head_dim + prob.kPad) + d];
            worst = std::max(worst, std::fabs(got - mean[d] / double(count)));
          }
          CHECK(worst <= 1e-5);
        }
      }
    }
  }
}

TEST_CASE("GPU merge_states and merge_states_varlen equal the CPU merges") {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int dim : {1, 33, 128, 300}) {
    const int rows = 7;
    std::vector<float> o_a(rows * dim), o_b(rows * dim), lse_a(rows), lse_b(rows);
    for (auto* vec : {&o_a, &o_b}) {
      for (auto& x : *vec) x = normal(rng);
    }
    for (int r = 0; r < rows; ++r) {
      lse_a[r] = 5.0f * normal(rng);
      lse_b[r] = 5.0f * normal(rng);
    }
    lse_b[3] = -INFINITY;  // an empty state
    lse_a[5] = lse_b[5] = -INFINITY;
    INFO("head_dim " << dim);
    std::vector<float> want_o(rows * dim), want_lse(rows);
    kvkit::merge_states(o_a.data(), lse_a.data(), o_b.data(), lse_b.data(), want_o.data(), want_lse.data(), rows, dim);
    auto d_oa = DeviceBuffer::from_host(o_a);
    auto d_ob = DeviceBuffer::from_host(o_b);
    auto d_la = DeviceBuffer::from_host(lse_a);
    auto d_lb = DeviceBuffer::from_host(lse_b);
    // In place: the output is state a.
    kvkit::cuda::merge_states(d_oa.as<float>(), d_la.as<float>(), d_ob.as<float>(),
                                               d_lb.as<float>(), d_oa.as<float>(), d_la.as<float>(), rows, dim);
    const auto got_o = d_oa.to_host<float>();
    const auto got_lse = d_la.to_host<float>();
    for (int r = 0; r < rows; ++r) {
      if (std::isinf(want_lse[r])) {
        CHECK(std::isinf(got_lse[r]));
      } else {
        CHECK(std::fabs(got_lse[r] - want_lse[r]) <= 1e-6f * std::max(1.0f, std::fabs(want_lse[r])));
      }
      // 2e-6 as for varlen: CUDA's expf (2 ulp) and FMA contraction differ from
      // the host's by a few ulp of the weights, times |o_a| + |o_b| (up to ~6).
      for (int d = 0; d < dim; ++d) CHECK(std::fabs(got_o[r * dim + d] - want_o[r * dim + d]) <= 2e-6f);
    }

    // Variable number of states per row, including rows with none and one.
    const std::vector<int> counts = {3, 0, 1, 5, 2, 0, 40};
    std::vector<std::int64_t> indptr = {0};
    for (int n : counts) indptr.push_back(indptr.back() + n);
    const std::int64_t states = indptr.back();
    std::vector<float> so(std::size_t(states * dim)), sl(static_cast<std::size_t>(states));
    for (auto& x : so) x = normal(rng);
    for (auto& x : sl) x = 3.0f * normal(rng);
    sl[4] = -INFINITY;
    const std::int64_t n_rows = std::int64_t(counts.size());
    std::vector<float> vo(std::size_t(n_rows * dim)), vl(static_cast<std::size_t>(n_rows));
    kvkit::merge_states_varlen(so.data(), sl.data(), indptr.data(), n_rows, dim, vo.data(), vl.data());
    auto d_so = DeviceBuffer::from_host(so);
    auto d_sl = DeviceBuffer::from_host(sl);
    auto d_ip = DeviceBuffer::from_host(indptr);
    auto d_vo = DeviceBuffer::from_host(std::vector<float>(vo.size(), 123.0f));
    auto d_vl = DeviceBuffer::from_host(std::vector<float>(vl.size(), 123.0f));
    kvkit::cuda::merge_states_varlen(d_so.as<float>(), d_sl.as<float>(),
                                                      d_ip.as<std::int64_t>(), n_rows, dim, d_vo.as<float>(),
                                                      d_vl.as<float>());
    const auto gvo = d_vo.to_host<float>();
    const auto gvl = d_vl.to_host<float>();
    for (std::int64_t r = 0; r < n_rows; ++r) {
      INFO("varlen row " << r << " with " << counts[std::size_t(r)] << " states");
      if (std::isinf(vl[r])) {
        CHECK(std::isinf(gvl[r]));
      } else {
        CHECK(std::fabs(gvl[r] - vl[r]) <= 1e-6f * std::max(1.0f, std::fabs(vl[r])));
      }
      for (int d = 0; d < dim; ++d) CHECK(std::fabs(gvo[r * dim + d] - vo[r * dim + d]) <= 2e-6f);
    }
  }
}

TEST_CASE("GPU decode captured in a CUDA graph and replayed gives the same result; lse may be null") {
  // Split (decode + merge kernels) at head_dim 256, whose kernel asks for more
  // than 48 KiB of shared memory: run_decode sets that attribute while the
  // stream is being captured.
  DecodeCase c;
  c.head_dim = 256;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.seq_lens = {5, 700, 3001, 1};
  DecodeProblem<kvkit::bfloat16, kvkit::bfloat16> prob(c, 4242);
  prob.run_cpu();
  DecodePlanOptions split;
  split.chunk_keys = 256;
  split.max_splits = kvkit::cuda::kMaxDecodeSplits;
  auto d = prob.upload();
  SECTION("captured, replayed twice") {
    const DecodePlan plan = kvkit::cuda::plan_decode(d.p, prob.seq_lens.data(), num_sms(), split);
    REQUIRE(plan.num_splits > 1);
    d.workspace = DeviceBuffer(plan.workspace_bytes);
    kvkit::testing::capture_and_replay([&](cudaStream_t stream) {
      kvkit::cuda::run_decode(d.p, plan, d.workspace.data(), d.workspace.bytes(), stream);
    });
    prob.o_gpu = d.o.to_host<kvkit::bfloat16>();
    prob.lse_gpu = d.lse.to_host<float>();
    prob.compare();
  }
  SECTION("lse == nullptr, split and unsplit: o as before, the lse buffer untouched") {
    for (int max_splits : {1, kvkit::cuda::kMaxDecodeSplits}) {
      INFO("max_splits " << max_splits);
      split.max_splits = max_splits;
      kvkit::PagedDecodeParams p = d.p;
      p.lse = nullptr;
      DeviceBuffer o = DeviceBuffer::from_host(std::vector<kvkit::bfloat16>(prob.o_cpu.size(), prob.poison));
      p.o = o.data();
      const DecodePlan plan = kvkit::cuda::plan_decode(p, prob.seq_lens.data(), num_sms(), split);
      DeviceBuffer workspace(plan.workspace_bytes);
      kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes(), nullptr);
      KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
      prob.o_gpu = o.to_host<kvkit::bfloat16>();
      const std::vector<float> lse = d.lse.to_host<float>();
      CHECK(std::all_of(lse.begin(), lse.end(), [](float x) { return x == -777.0f; }));
      prob.lse_gpu = prob.lse_cpu;
      prob.compare();
    }
  }
}

TEST_CASE("bad GPU decode input raises a clear error and launches nothing") {
  DecodeCase c;
  c.q_heads = 8;
  c.kv_heads = 4;
  c.seq_lens = {5, 900};
  DecodeProblem<float, float> prob(c, 1);
  auto d = prob.upload();
  PagedDecodeParams& p = d.p;
  DecodePlanOptions options;
  options.chunk_keys = 128;
  const DecodePlan plan = kvkit::cuda::plan_decode(p, prob.seq_lens.data(), 132, options);
  REQUIRE(plan.num_splits == 8);
  DeviceBuffer workspace(plan.workspace_bytes);
  SECTION("unsupported head_dim") {
    DecodeCase odd = c;
    odd.head_dim = 80;
    DecodeProblem<float, float> other(odd, 2);
    CHECK_THROWS_WITH(kvkit::cuda::plan_decode(other.params(), other.seq_lens.data(), 132),
                      Contains("'layout.head_dim' = 80: expected one of {48, 64, 96, 128, 256} on the GPU"));
  }
  SECTION("dtype pair without a kernel") {
    p.q_dtype = kvkit::DType::kFloat16;
    p.kv_dtype = kvkit::DType::kBFloat16;
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes()),
                      Contains("q_dtype float16 with kv_dtype bfloat16: expected equal dtypes"));
  }
  SECTION("unsupported cache dtype") {
    p.kv_dtype = kvkit::DType::kInt32;
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes()),
                      Contains("'kv_dtype' = int32"));
  }
  SECTION("no workspace for a split plan") {
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, nullptr, 0), Contains("'workspace' = nullptr"));
  }
  SECTION("too small a workspace") {
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, workspace.data(), plan.workspace_bytes - 4),
                      Contains("'workspace_bytes' = "));
  }
  SECTION("a plan made for another shape") {
    p.page_table.batch_size = 1;
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes()),
                      Contains("the plan was made for batch 2"));
  }
  SECTION("kv heads do not divide q heads") {
    p.num_q_heads = 6;
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes()),
                      Contains("'num_q_heads' = 6: expected a positive multiple of the kv heads (4)"));
  }
  SECTION("host lengths shorter than q_len or beyond the page table") {
    p.q_len = 6;
    CHECK_THROWS_WITH(kvkit::cuda::plan_decode(p, prob.seq_lens.data(), 132),
                      Contains("sequence 0 has seq_len 5 < q_len (6)"));
    p.q_len = 1;
    const std::vector<std::int32_t> too_long = {5, 100000};
    CHECK_THROWS_WITH(kvkit::cuda::plan_decode(p, too_long.data(), 132), Contains("host_seq_lens[1] = 100000"));
  }
  SECTION("null output") {
    p.o = nullptr;
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes()),
                      Contains("'o' = nullptr"));
  }
  SECTION("bad merge inputs") {
    CHECK_THROWS_WITH(kvkit::cuda::merge_states(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 3, 8),
                      Contains("a null pointer"));
    CHECK_THROWS_WITH(kvkit::cuda::merge_states_varlen(nullptr, nullptr, nullptr, 3, 0, nullptr, nullptr),
                      Contains("'head_dim' = 0"));
  }
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const auto o_after = d.o.to_host<float>();
  CHECK(std::memcmp(o_after.data(), prob.o_gpu.data(), o_after.size() * sizeof(float)) == 0);
}
