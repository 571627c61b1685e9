// The CUDA decode (plan_decode + run_decode, split and unsplit) over
// contiguous caches through contiguous_page_view, against the CPU op on the
// same view and the float64 reference. Skipped without a GPU.
// Tolerance GPU vs CPU (float32 q/o, both accumulate in float32 in different
// orders): |o_gpu - o_cpu| <= 2e-5 + 2e-5 |o_cpu|, |lse_gpu - lse_cpu| <= 2e-5 max(1, |lse|).

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kvkit/cuda/attention_decode.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/layout/contiguous_page_view.hpp"
#include "kvkit/ops/attention_decode.hpp"
#include "support/contiguous_decode_problem.hpp"

using kvkit::PagedDecodeParams;
using kvkit::cuda::DeviceBuffer;
using kvkit::testing::ContiguousCase;
using kvkit::testing::ContiguousDecodeProblem;

namespace {

int num_sms() {
  int device = 0, sms = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <class KVT>
void check_gpu(const ContiguousCase& c, std::uint64_t seed) {
  ContiguousDecodeProblem<KVT> prob(c, seed);
  const std::int64_t rows = std::int64_t(c.seq_lens.size()) * c.q_len * c.q_heads;
  std::vector<float> o_cpu(std::size_t(rows * c.head_dim), -777.0f), lse_cpu(std::size_t(rows), -777.0f);
  const PagedDecodeParams host = prob.params(o_cpu.data(), lse_cpu.data());
  kvkit::paged_decode_attention(host);
  prob.check(host, o_cpu, lse_cpu, 1e-5);

  DeviceBuffer k = DeviceBuffer::from_host(prob.k), v = DeviceBuffer::from_host(prob.v);
  DeviceBuffer q = DeviceBuffer::from_host(prob.q);
  DeviceBuffer table = DeviceBuffer::from_host(prob.block_table);
  DeviceBuffer lens = DeviceBuffer::from_host(prob.seq_lens);
  for (std::int64_t chunk_keys : {std::int64_t(0), std::int64_t(64)}) {
    DeviceBuffer o = DeviceBuffer::from_host(std::vector<float>(o_cpu.size(), -777.0f));
    DeviceBuffer lse = DeviceBuffer::from_host(std::vector<float>(lse_cpu.size(), -777.0f));
    PagedDecodeParams p = host;
    p.q = q.data();
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.page_table.block_table = table.as<std::int32_t>();
    p.page_table.seq_lens = lens.as<std::int32_t>();
    p.o = o.data();
    p.lse = lse.as<float>();
    kvkit::cuda::DecodePlanOptions options;
    options.chunk_keys = chunk_keys;
    const auto plan = kvkit::cuda::plan_decode(p, prob.seq_lens.data(), num_sms(), options);
    DeviceBuffer workspace(plan.workspace_bytes);
    kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes());
    KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
    const auto o_gpu = o.to_host<float>();
    const auto lse_gpu = lse.to_host<float>();
    INFO("chunk_keys " << chunk_keys << ", splits " << plan.num_splits);
    for (std::size_t i = 0; i < o_cpu.size(); ++i) {
      if (!(std::fabs(o_gpu[i] - o_cpu[i]) <= 2e-5 + 2e-5 * std::fabs(o_cpu[i]))) {
        FAIL("o[" << i << "] gpu " << o_gpu[i] << " cpu " << o_cpu[i]);
      }
    }
    for (std::size_t i = 0; i < lse_cpu.size(); ++i) {
      REQUIRE(std::fabs(lse_gpu[i] - lse_cpu[i]) <= 2e-5 * std::max(1.0f, std::fabs(lse_cpu[i])));
    }
  }
}

}  // namespace

TEST_CASE("cuda decode over a token-major contiguous cache of capacity 48 equals the CPU op") {
  ContiguousCase c;
  c.capacity = 48;
  c.head_dim = 128;
  c.seq_lens = {1, 33, 48, 17};
  check_gpu<kvkit::bfloat16>(c, 51);
}

TEST_CASE("cuda decode over a head-major contiguous cache of capacity 64 (q_len 3) equals the CPU op") {
  ContiguousCase c;
  c.head_major = true;
  c.capacity = 64;
  c.head_dim = 64;
  c.q_len = 3;
  c.seq_lens = {3, 64, 40};
  check_gpu<float>(c, 52);
}

TEST_CASE("cuda decode over a ring buffer with a sliding window equals the CPU op") {
  ContiguousCase c;
  c.ring = true;
  c.capacity = 48;
  c.head_dim = 128;
  c.window = 40;
  c.q_len = 2;
  c.seq_lens = {500, 49, 7};
  check_gpu<kvkit::bfloat16>(c, 53);
}
