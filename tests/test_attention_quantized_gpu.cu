// The CUDA decode attention over quantized caches (fp8 e4m3 / e5m2, int8
// written by quantize_append_kv) against the CPU op on the same bytes and
// scales, for every scale granularity, 1-byte dtype and q dtype; split and
// unsplit, NHD / HND, page 1 / 16, GQA 1 / 4 / 8, head_dim 64 / 128. The CPU
// op itself is checked against float64 in test_attention_quantized.cpp.
// Skipped without a GPU.
//
// Tolerances, GPU vs CPU: both dequantize exactly and accumulate in float32,
// but the GPU multiplies the score (and the weight) by the scale where the CPU
// scales each element, and sums in another order, so
//   |o_gpu - o_cpu| <= 2e-5 * max|v| + rel * |o_cpu|
// with max|v| the largest dequantized value in the cache, rel = 0 for float32
// q/o and one unit in the last place of the output type for float16 (2^-10)
// and bfloat16 (2^-7) q/o (the two float results may round to neighbouring
// values); |lse_gpu - lse_cpu| <= 2e-5 * max(1, |lse_cpu|), and lse = -inf on
// both for a row that sees no key.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvkit/cuda/attention_decode.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/ops/attention_decode.hpp"
#include "support/quantized_decode_problem.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::PagedDecodeParams;
using kvkit::ScaleGranularity;
using kvkit::cuda::DecodePlan;
using kvkit::cuda::DecodePlanOptions;
using kvkit::cuda::DeviceBuffer;
using kvkit::testing::DecodeCase;

namespace {

template <class T> double rel_tolerance();
template <> double rel_tolerance<float>() { return 0.0; }
template <> double rel_tolerance<kvkit::half>() { return 1.0 / 1024 * 1.01; }
template <> double rel_tolerance<kvkit::bfloat16>() { return 1.0 / 128 * 1.01; }

int num_sms() {
  int device = 0, sms = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// The quantized inputs, the CPU op's outputs (Base::o, Base::lse) and the GPU's.
template <class QT>
struct GpuQuantizedProblem : kvkit::testing::QuantizedDecodeInputs<QT> {
  using Base = kvkit::testing::QuantizedDecodeInputs<QT>;
  using Base::src;
  const QT poison = kvkit::from_float<QT>(-777.0f);
  std::vector<QT> o_gpu;
  std::vector<float> lse_gpu;
  double v_max = 0.0;  // largest |dequantized v| of the cached tokens

  GpuQuantizedProblem(const DecodeCase& c, std::uint64_t seed, DType dtype, ScaleGranularity g)
      : Base(c, seed, dtype, g) {
    o_gpu = this->o;
    lse_gpu = this->lse;
    for (std::size_t b = 0; b < src.seq_lens.size(); ++b) {
      for (std::int64_t t = 0; t < src.seq_lens[b]; ++t) {
        const std::int64_t slot = src.slot(b, t);
        for (int h = 0; h < c.kv_heads; ++h) {
          const float scale = float(this->scale_at(this->v_scale, slot, h));
          for (int d = 0; d < c.head_dim; ++d) {
            const std::uint8_t stored = this->v8[std::size_t(src.layout.slot_offset(slot, h) + d)];
            v_max = std::max(v_max, std::fabs(double(kvkit::dequantize_value(stored, scale, dtype))));
          }
        }
      }
    }
  }

  void run_cpu() { kvkit::paged_decode_attention(this->params()); }

  struct Device {
    DeviceBuffer q, k, v, k_scale, v_scale, table, lens, o, lse, workspace;
    PagedDecodeParams p;
  };
  Device upload() {
    Device d;
    d.q = DeviceBuffer::from_host(src.q);
    d.k = DeviceBuffer::from_host(this->k8);
    d.v = DeviceBuffer::from_host(this->v8);
    d.k_scale = DeviceBuffer::from_host(this->k_scale);
    d.v_scale = DeviceBuffer::from_host(this->v_scale);
    d.table = DeviceBuffer::from_host(src.block_table);
    d.lens = DeviceBuffer::from_host(src.seq_lens);
    d.o = DeviceBuffer::from_host(o_gpu);
    d.lse = DeviceBuffer::from_host(lse_gpu);
    d.p = this->params();
    d.p.q = d.q.data();
    d.p.k_cache = d.k.data();
    d.p.v_cache = d.v.data();
    d.p.k_scale = d.k_scale.template as<float>();
    d.p.v_scale = d.v_scale.template as<float>();
    d.p.page_table.block_table = d.table.template as<std::int32_t>();
    d.p.page_table.seq_lens = d.lens.template as<std::int32_t>();
    d.p.o = d.o.data();
    d.p.lse = d.lse.template as<float>();
    return d;
  }

  DecodePlan run_gpu(const DecodePlanOptions& options) {
    o_gpu.assign(o_gpu.size(), poison);
    lse_gpu.assign(lse_gpu.size(), -777.0f);
    Device d = upload();
    const DecodePlan plan = kvkit::cuda::plan_decode(d.p, src.seq_lens.data(), num_sms(), options);
    d.workspace = DeviceBuffer(plan.workspace_bytes);
    kvkit::cuda::run_decode(d.p, plan, d.workspace.data(), d.workspace.bytes(), nullptr);
    KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
    o_gpu = d.o.template to_host<QT>();
    lse_gpu = d.lse.template to_host<float>();
    return plan;
  }

  // GPU vs CPU on every row; the o padding must be untouched.
  void compare() const {
    const auto& c = src.c;
    const int kPad = src.kPad;
    const double abs_tol = 2e-5 * v_max;
    const double rel = rel_tolerance<QT>();
    const std::int64_t rows = src.rows() * c.q_heads;
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t t = r / c.q_heads;
      const std::size_t base = std::size_t(r) * std::size_t(c.head_dim + kPad);
      for (int d = 0; d < c.head_dim; ++d) {
        const double want = kvkit::to_float(this->o[base + d]);
        const double got = kvkit::to_float(o_gpu[base + d]);
        if (!(std::fabs(got - want) <= abs_tol + rel * std::fabs(want))) {
          FAIL("seq " << t / c.q_len << " (len " << src.seq_lens[std::size_t(t / c.q_len)] << ") token "
                      << t % c.q_len << " head " << r % c.q_heads << " dim " << d << ": gpu " << got << " cpu "
                      << want << " (max |v| " << v_max << ")");
        }
      }
      for (int d = c.head_dim; d < c.head_dim + kPad; ++d) {
        if (std::memcmp(&o_gpu[base + d], &poison, sizeof(QT)) != 0) FAIL("o padding of row " << r << " was written");
      }
      const float want_lse = this->lse[std::size_t(r)];
      const float got_lse = lse_gpu[std::size_t(r)];
      if (std::isinf(want_lse)) {
        // A row that sees no key (kv_begin past its length): -inf on both
        // sides, where the difference below would be NaN and always fail.
        if (!(std::isinf(got_lse) && got_lse < 0)) FAIL("row " << r << ": lse gpu " << got_lse << ", expected -inf");
      } else if (!(std::fabs(got_lse - want_lse) <= 2e-5 * std::max(1.0f, std::fabs(want_lse)))) {
        FAIL("row " << r << ": lse gpu " << got_lse << " cpu " << want_lse);
      }
    }
  }

  // CPU once, then the GPU unsplit and split into chunks of `chunk` keys.
  void check_split_and_unsplit(std::int64_t chunk) {
    run_cpu();
    DecodePlanOptions unsplit;
    unsplit.max_splits = 1;
    {
      INFO("unsplit");
      const DecodePlan plan = run_gpu(unsplit);
      REQUIRE(plan.num_splits == 1);
      compare();
    }
    DecodePlanOptions split;
    split.chunk_keys = chunk;
    split.max_splits = kvkit::cuda::kMaxDecodeSplits;
    {
      INFO("split into chunks of " << chunk << " keys");
      const DecodePlan plan = run_gpu(split);
      REQUIRE(plan.num_splits > 1);
      compare();
    }
  }
};

template <class QT>
void check_quantized_matrix(DType dtype) {
  std::uint64_t seed = 700;
  for (ScaleGranularity g : {ScaleGranularity::kPerTensor, ScaleGranularity::kPerHead, ScaleGranularity::kPerTokenHead}) {
    for (int head_dim : {64, 128}) {
      for (int group : {1, 4, 8}) {
        for (int page_size : {1, 16}) {
          DecodeCase c;
          c.head_dim = head_dim;
          c.kv_heads = 2;
          c.q_heads = 2 * group;
          c.page_size = page_size;
          c.q_len = group == 4 ? 2 : 1;
          c.seq_lens = {c.q_len, 17, page_size + 1, 300, 1000};
          c.hnd = (seed % 2) == 0;
          INFO(kvkit::dtype_name(dtype) << ", " << kvkit::testing::granularity_name(g) << ", head_dim " << head_dim
                                        << " group " << group << " page_size " << page_size
                                        << (c.hnd ? " HND" : " NHD"));
          const std::int64_t chunk = 37 + std::int64_t(seed % 5) * 16;  // odd: chunks straddle tiles
          GpuQuantizedProblem<QT>(c, seed++, dtype, g).check_split_and_unsplit(chunk);
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("GPU decode over fp8 and int8 caches equals the CPU op for every granularity, layout and GQA ratio") {
  for (DType dtype : {DType::kFloat8E4M3, DType::kFloat8E5M2, DType::kInt8}) {
    DYNAMIC_SECTION(kvkit::dtype_name(dtype) << ", fp32 q") { check_quantized_matrix<float>(dtype); }
    DYNAMIC_SECTION(kvkit::dtype_name(dtype) << ", bf16 q") { check_quantized_matrix<kvkit::bfloat16>(dtype); }
    DYNAMIC_SECTION(kvkit::dtype_name(dtype) << ", fp16 q") { check_quantized_matrix<kvkit::half>(dtype); }
  }
}

TEST_CASE("GPU quantized decode: masks, other head_dims, long contexts and unaligned strides") {
  DecodeCase c;
  c.head_dim = 96;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.page_size = 16;
  c.seq_lens = {9, 200, 1000, 64};
  SECTION("window, sinks and q_len 3 with per-token scales") {
    c.window = 50;
    c.sinks = 4;
    c.q_len = 3;
    GpuQuantizedProblem<float>(c, 11, DType::kFloat8E4M3, ScaleGranularity::kPerTokenHead)
        .check_split_and_unsplit(16);
  }
  SECTION("key range [kv_begin, kv_end) and soft-cap, int8 per head") {
    c.kv_begin = 33;
    c.kv_end = 700;
    c.softcap = 5.0f;
    GpuQuantizedProblem<kvkit::bfloat16>(c, 12, DType::kInt8, ScaleGranularity::kPerHead).check_split_and_unsplit(64);
  }
  SECTION("head_dim 48 and 256 (1-byte tiles of 128 and 32 keys)") {
    for (int head_dim : {48, 256}) {
      c.head_dim = head_dim;
      INFO("head_dim " << head_dim);
      GpuQuantizedProblem<float>(c, 13, DType::kFloat8E5M2, ScaleGranularity::kPerTokenHead)
          .check_split_and_unsplit(100);
    }
  }
  SECTION("unaligned cache strides take the byte-wise copy path") {
    c.head_pad = 1;
    GpuQuantizedProblem<float>(c, 14, DType::kFloat8E4M3, ScaleGranularity::kPerTokenHead).check_split_and_unsplit(100);
  }
  SECTION("the plan's own split of a lone long sequence (Llama-3-8B heads)") {
    c.head_dim = 128;
    c.q_heads = 32;
    c.kv_heads = 8;
    c.seq_lens = {33000};
    GpuQuantizedProblem<kvkit::bfloat16> prob(c, 15, DType::kFloat8E4M3, ScaleGranularity::kPerTensor);
    prob.run_cpu();
    const DecodePlan plan = prob.run_gpu(DecodePlanOptions{});
    CHECK(plan.num_splits > 1);
    prob.compare();
  }
}

TEST_CASE("bad GPU quantized decode input raises a clear error and launches nothing") {
  DecodeCase c;
  c.seq_lens = {5, 300};
  GpuQuantizedProblem<float> prob(c, 1, DType::kFloat8E4M3, ScaleGranularity::kPerHead);
  auto d = prob.upload();
  PagedDecodeParams& p = d.p;
  const DecodePlan plan = kvkit::cuda::plan_decode(p, prob.src.seq_lens.data(), 132);
  DeviceBuffer workspace(plan.workspace_bytes + 4);
  SECTION("an fp8 cache without k scales") {
    p.k_scale = nullptr;
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes()),
                      Contains("'k_scale' = nullptr: expected a non-null pointer for a float8_e4m3 cache"));
  }
  SECTION("scales with a float cache") {
    p.kv_dtype = DType::kFloat32;
    CHECK_THROWS_WITH(kvkit::cuda::plan_decode(p, prob.src.seq_lens.data(), 132),
                      Contains("scales belong to float8 / int8 caches"));
  }
  SECTION("a plan made for another cache dtype") {
    p.kv_dtype = DType::kInt8;
    CHECK_THROWS_WITH(kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes()),
                      Contains("float32/float8_e4m3; expected the same as params") && Contains("float32/int8"));
  }
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const auto o_after = d.o.to_host<float>();
  CHECK(std::memcmp(o_after.data(), prob.o_gpu.data(), o_after.size() * sizeof(float)) == 0);
}
