// CUDA swap_blocks: device -> pinned host -> device round trip equals the
// CPU swap_blocks on host copies of the same caches, byte for byte, and
// pageable host memory is refused. Skipped (exit code 77) without a GPU.

#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/swap_blocks.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::KVStorage;
using kvkit::PagedKVLayout;
using kvkit::SwapDirection;
using kvkit::SwapPlan;
using kvkit::cuda::DeviceBuffer;

namespace {

constexpr std::uint16_t kPoison = 0xdead;
using Pairs = std::vector<std::pair<std::int64_t, std::int64_t>>;

std::vector<std::uint16_t> random_bits(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) x = std::uint16_t(rng());
  return v;
}

/// Page-locked host array of n uint16 values, freed on destruction.
class PinnedArray {
 public:
  explicit PinnedArray(std::size_t n) : n_(n) {
    KVKIT_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&data_), n * 2, cudaHostAllocDefault));
  }
  ~PinnedArray() { (void)cudaFreeHost(data_); }
  PinnedArray(const PinnedArray&) = delete;
  PinnedArray& operator=(const PinnedArray&) = delete;
  std::uint16_t* data() const { return data_; }
  std::vector<std::uint16_t> to_vector() const { return {data_, data_ + n_}; }

 private:
  std::uint16_t* data_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace

TEST_CASE("cuda swap_blocks out to pinned host memory and back equals the CPU swap") {
  const KVStorage device_storage = GENERATE(KVStorage::kSeparate, KVStorage::kInterleaved);
  const std::int64_t ps = 16, heads = 8, hd = 128, dev_pages = 64, host_pages = 24;
  const auto dev_layout = PagedKVLayout::nhd(dev_pages, ps, heads, hd, device_storage);
  const auto host_layout = PagedKVLayout::nhd(host_pages, ps, heads, hd);
  const std::int64_t layers = 3;
  const std::size_t dev_elems = std::size_t(dev_layout.span_elements() + dev_layout.v_offset);
  const std::size_t host_elems = std::size_t(host_layout.span_elements());

  // Swap out: a run of 5 pages, scattered single pages; swap in elsewhere.
  Pairs out{{10, 0}, {11, 1}, {12, 2}, {13, 3}, {14, 4}, {40, 9}, {3, 20}, {63, 7}};
  Pairs in;
  for (std::size_t i = 0; i < out.size(); ++i) in.emplace_back(out[i].second, std::int64_t(30 + 2 * i));
  const auto plan_out = SwapPlan::make(SwapDirection::kDeviceToHost, out, dev_pages, host_pages);
  const auto plan_in = SwapPlan::make(SwapDirection::kHostToDevice, in, host_pages, dev_pages);

  std::vector<std::vector<std::uint16_t>> dev_init;
  std::vector<DeviceBuffer> dev, dev_back;
  std::vector<std::unique_ptr<PinnedArray>> host;
  std::vector<void*> dev_ptrs, dev_back_ptrs, host_ptrs;
  std::vector<std::vector<std::uint16_t>> cpu_dev, cpu_dev_back, cpu_host;
  std::vector<void*> cpu_dev_ptrs, cpu_dev_back_ptrs, cpu_host_ptrs;
  for (std::int64_t l = 0; l < layers; ++l) {
    dev_init.push_back(random_bits(dev_elems, std::uint32_t(3 + l)));
    dev.push_back(DeviceBuffer::from_host(dev_init.back()));
    dev_back.push_back(DeviceBuffer::from_host(std::vector<std::uint16_t>(dev_elems, kPoison)));
    host.push_back(std::make_unique<PinnedArray>(host_elems));
    std::fill(host.back()->data(), host.back()->data() + host_elems, kPoison);
    cpu_dev.push_back(dev_init.back());
    cpu_dev_back.emplace_back(dev_elems, kPoison);
    cpu_host.emplace_back(host_elems, kPoison);
  }
  // One cache per layer: its K (at offset 0). The interleaved device layout
  // has a page pitch of two pages, so its runs go through cudaMemcpy2DAsync;
  // the separate one is packed on both sides (one cudaMemcpyAsync per run).
  const bool inter = device_storage == KVStorage::kInterleaved;
  for (std::int64_t l = 0; l < layers; ++l) {
    dev_ptrs.push_back(dev[std::size_t(l)].data());
    dev_back_ptrs.push_back(dev_back[std::size_t(l)].data());
    host_ptrs.push_back(host[std::size_t(l)]->data());
    cpu_dev_ptrs.push_back(cpu_dev[std::size_t(l)].data());
    cpu_dev_back_ptrs.push_back(cpu_dev_back[std::size_t(l)].data());
    cpu_host_ptrs.push_back(cpu_host[std::size_t(l)].data());
  }
  const std::int64_t n = layers;
  kvkit::cuda::swap_blocks(dev_layout, host_layout, plan_out,
                           {dev_ptrs.data(), host_ptrs.data(), n, DType::kBFloat16}, nullptr);
  kvkit::cuda::swap_blocks(host_layout, dev_layout, plan_in,
                           {host_ptrs.data(), dev_back_ptrs.data(), n, DType::kBFloat16}, nullptr);
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  kvkit::swap_blocks(dev_layout, host_layout, plan_out,
                     {cpu_dev_ptrs.data(), cpu_host_ptrs.data(), n, DType::kBFloat16});
  kvkit::swap_blocks(host_layout, dev_layout, plan_in,
                     {cpu_host_ptrs.data(), cpu_dev_back_ptrs.data(), n, DType::kBFloat16});
  for (std::int64_t l = 0; l < layers; ++l) {
    CHECK(host[std::size_t(l)]->to_vector() == cpu_host[std::size_t(l)]);
    CHECK(dev_back[std::size_t(l)].to_host<std::uint16_t>() == cpu_dev_back[std::size_t(l)]);
    // The source device cache is untouched.
    CHECK(dev[std::size_t(l)].to_host<std::uint16_t>() == dev_init[std::size_t(l)]);
  }
  // With an interleaved device layout, V pages travel too when the V pointer is listed.
  if (inter) {
    void* dv[1] = {dev[0].as<std::uint16_t>() + dev_layout.v_offset};
    void* hv[1] = {host[1]->data()};
    kvkit::cuda::swap_blocks(dev_layout, host_layout, plan_out, {dv, hv, 1, DType::kBFloat16}, nullptr);
    KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<std::uint16_t> expect = cpu_host[1];
    void* cdv[1] = {cpu_dev[0].data() + dev_layout.v_offset};
    void* chv[1] = {expect.data()};
    kvkit::swap_blocks(dev_layout, host_layout, plan_out, {cdv, chv, 1, DType::kBFloat16});
    CHECK(host[1]->to_vector() == expect);
  }
}

TEST_CASE("cuda swap_blocks refuses pageable host memory and host pointers on the device side") {
  const auto layout = PagedKVLayout::nhd(4, 16, 2, 64);
  const auto plan = SwapPlan::make(SwapDirection::kDeviceToHost, Pairs{{0, 1}}, 4, 4);
  DeviceBuffer dev(std::size_t(layout.span_elements()) * 2);
  std::vector<std::uint16_t> pageable(std::size_t(layout.span_elements()), kPoison);
  void* d[1] = {dev.data()};
  void* h[1] = {pageable.data()};
  CHECK_THROWS_WITH(kvkit::cuda::swap_blocks(layout, layout, plan, {d, h, 1, DType::kBFloat16}, nullptr),
                    Contains("expected page-locked host memory"));
  const auto plan_in = SwapPlan::make(SwapDirection::kHostToDevice, Pairs{{0, 1}}, 4, 4);
  PinnedArray pinned(std::size_t(layout.span_elements()));
  void* p[1] = {pinned.data()};
  CHECK_THROWS_WITH(kvkit::cuda::swap_blocks(layout, layout, plan_in, {p, p, 1, DType::kBFloat16}, nullptr),
                    Contains("expected device memory"));
}
