// Virtual contiguous KV cache on the GPU (CUDA driver virtual memory through
// runtime-obtained entry points): growth keeps data, the append kernel
// writes through the contiguous layout, shrink and release free chunks,
// the budget reports kOutOfMemory. Skipped (exit code 77) without a GPU.

#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <vector>

#include "kvkit/cuda/append.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/virtual_memory.hpp"
#include "kvkit/layout/virtual_kv_cache.hpp"

using kvkit::ResizeStatus;
using kvkit::VirtualCacheConfig;
using kvkit::cuda::DeviceBuffer;
using kvkit::cuda::DeviceVirtualMemory;
using DeviceCache = kvkit::VirtualKVCache<DeviceVirtualMemory>;

namespace {

std::vector<std::uint16_t> random_bits(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) x = std::uint16_t(rng());
  return v;
}

std::vector<std::uint16_t> read_tokens(const DeviceCache& cache, std::int64_t b, std::int64_t seq,
                                       std::int64_t first, std::int64_t count) {
  const std::int64_t bpt = cache.config().bytes_per_token;
  std::vector<std::uint16_t> out(std::size_t(count * bpt / 2));
  KVKIT_CUDA_CHECK(cudaMemcpy(out.data(), cache.token_address(b, seq, first), std::size_t(count * bpt),
                              cudaMemcpyDeviceToHost));
  return out;
}

}  // namespace

TEST_CASE("a device virtual cache grows by chunks, keeps its data and takes appends") {
  const std::int64_t heads = 8, hd = 128, es = 2;
  VirtualCacheConfig c;
  c.num_seqs = 4;
  c.max_tokens = 32768;  // 64 MiB per sequence and buffer: 512 MiB reserved
  c.bytes_per_token = heads * hd * es;
  c.num_buffers = 2;
  DeviceCache cache(c, DeviceVirtualMemory(0));
  const std::int64_t chunk = cache.chunk_bytes();
  CHECK(chunk % (2 << 20) == 0);  // 2 MiB on every current GPU
  CHECK(cache.reserved_bytes() == 2 * 4 * 32768 * c.bytes_per_token);
  CHECK(cache.mapped_bytes() == 0);

  // 1,000 tokens (2,000,000 bytes): one 2 MiB chunk per buffer.
  REQUIRE(cache.resize(1, 1000) == ResizeStatus::kOk);
  CHECK(cache.mapped_bytes() == 2 * chunk);
  const auto first = random_bits(std::size_t(1000 * heads * hd), 1);
  KVKIT_CUDA_CHECK(cudaMemcpy(cache.token_address(0, 1, 0), first.data(), first.size() * 2,
                              cudaMemcpyHostToDevice));

  // Grow to 5,000 tokens: the first 1,000 survive.
  REQUIRE(cache.resize(1, 5000) == ResizeStatus::kOk);
  const std::int64_t chunks = (5000 * c.bytes_per_token + chunk - 1) / chunk;
  CHECK(cache.mapped_chunks(1) == chunks);
  CHECK(cache.mapped_bytes() == 2 * chunks * chunk);
  CHECK(read_tokens(cache, 0, 1, 0, 1000) == first);

  // The append kernel writes tokens 4,990..4,999 of sequence 1 and 0..6 of
  // sequence 3 through the contiguous layout.
  REQUIRE(cache.ensure(3, 7) == ResizeStatus::kOk);
  const auto layout = cache.layout(heads, hd, es);
  std::vector<std::int64_t> slots;
  for (std::int64_t t = 4990; t < 5000; ++t) slots.push_back(layout.slot(1, t));
  for (std::int64_t t = 0; t < 7; ++t) slots.push_back(layout.slot(3, t));
  const std::int64_t n = std::int64_t(slots.size());
  const auto k = random_bits(std::size_t(n * heads * hd), 2), v = random_bits(k.size(), 3);
  DeviceBuffer dk = DeviceBuffer::from_host(k), dv = DeviceBuffer::from_host(v);
  DeviceBuffer ds = DeviceBuffer::from_host(slots);
  kvkit::cuda::append_kv(layout,
                         kvkit::AppendKVArgs::dense(dk.data(), dv.data(), ds.as<std::int64_t>(), n,
                                                    heads, hd, cache.buffer(0), cache.buffer(1),
                                                    kvkit::DType::kBFloat16),
                         nullptr);
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const std::size_t row = std::size_t(heads * hd);
  CHECK(read_tokens(cache, 0, 1, 4990, 10) == std::vector<std::uint16_t>(k.begin(), k.begin() + 10 * row));
  CHECK(read_tokens(cache, 1, 1, 4990, 10) == std::vector<std::uint16_t>(v.begin(), v.begin() + 10 * row));
  CHECK(read_tokens(cache, 0, 3, 0, 7) == std::vector<std::uint16_t>(k.begin() + 10 * row, k.end()));
  CHECK(read_tokens(cache, 0, 1, 0, 1000) == first);

  // Shrink and release give chunks back; the reservation stays.
  REQUIRE(cache.resize(1, 100) == ResizeStatus::kOk);
  CHECK(cache.mapped_chunks(1) == 1);
  CHECK(read_tokens(cache, 0, 1, 0, 100) == std::vector<std::uint16_t>(first.begin(), first.begin() + 100 * row));
  cache.release(1);
  cache.release(3);
  CHECK(cache.mapped_bytes() == 0);
  CHECK(cache.reserved_bytes() == 2 * 4 * 32768 * c.bytes_per_token);
}

TEST_CASE("a device virtual cache reports kOutOfMemory at its budget and recovers") {
  VirtualCacheConfig c;
  c.num_seqs = 2;
  c.max_tokens = 1 << 20;
  c.bytes_per_token = 64;
  c.num_buffers = 2;
  DeviceVirtualMemory backend(0);
  c.max_mapped_bytes = 4 * backend.granularity();
  DeviceCache cache(c, backend);
  const std::int64_t per_chunk = cache.chunk_bytes() / 64;
  REQUIRE(cache.resize(0, 2 * per_chunk) == ResizeStatus::kOk);  // 2 chunks x 2 buffers
  CHECK(cache.resize(1, 1) == ResizeStatus::kOutOfMemory);
  CHECK(cache.mapped_chunks(1) == 0);
  CHECK(cache.mapped_bytes() == 4 * cache.chunk_bytes());
  cache.release(0);
  CHECK(cache.resize(1, 1) == ResizeStatus::kOk);
  // The mapped chunk is usable memory.
  KVKIT_CUDA_CHECK(cudaMemset(cache.token_address(1, 1, 0), 0x7f, std::size_t(cache.chunk_bytes())));
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
}
