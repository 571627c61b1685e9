// CUDA layout ops equal the CPU ops bit for bit on the same random inputs.
// Each case runs the CPU op on host copies and the CUDA op on device copies
// of the same poisoned caches, then compares the whole caches. Skipped (exit
// code 77) where no GPU is present.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/cuda/append.cuh"
#include "kvkit/cuda/copy_blocks.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/gather.cuh"

using kvkit::DType;
using kvkit::KVStorage;
using kvkit::PagedKVLayout;
using kvkit::cuda::DeviceBuffer;

namespace {

std::vector<std::uint16_t> random_bits(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) x = std::uint16_t(rng());
  return v;
}

std::vector<std::int64_t> random_slots(std::int64_t n, std::int64_t num_slots, std::uint32_t seed) {
  std::vector<std::int64_t> all(static_cast<std::size_t>(num_slots));
  std::iota(all.begin(), all.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<std::int64_t> s(all.begin(), all.begin() + n);
  for (std::size_t t = 2; t < s.size(); t += 5) s[t] = -1;
  return s;
}

/// bf16 append of n tokens, source row stride `src_pad` elements beyond heads*hd.
template <class Layout>
void check_append(const Layout& layout, std::int64_t cache_elems, std::int64_t n,
                  std::int64_t src_pad, std::int64_t v_offset) {
  const std::int64_t heads = layout.num_heads, hd = layout.head_dim;
  const std::int64_t st = heads * hd + src_pad;
  const auto key = random_bits(std::size_t(n * st), 1), value = random_bits(std::size_t(n * st), 2);
  const std::vector<std::int64_t> slots = random_slots(n, layout.num_slots(), 3);
  const std::int64_t total = cache_elems + v_offset;
  std::vector<std::uint16_t> kc(std::size_t(total), 0xabcd), vc(std::size_t(total), 0xabcd);

  DeviceBuffer dk = DeviceBuffer::from_host(key), dv = DeviceBuffer::from_host(value);
  DeviceBuffer ds = DeviceBuffer::from_host(slots);
  DeviceBuffer dkc = DeviceBuffer::from_host(kc), dvc = DeviceBuffer::from_host(vc);

  auto args = kvkit::AppendKVArgs::dense(key.data(), value.data(), slots.data(), n, heads, hd,
                                         kc.data(), v_offset ? kc.data() + v_offset : vc.data(),
                                         DType::kBFloat16);
  args.key_stride_token = args.value_stride_token = st;
  kvkit::append_kv(layout, args);

  auto dargs = args;
  dargs.key = dk.data();
  dargs.value = dv.data();
  dargs.slot_mapping = ds.as<std::int64_t>();
  dargs.k_cache = dkc.data();
  dargs.v_cache = v_offset ? dkc.as<std::uint16_t>() + v_offset : dvc.data();
  kvkit::cuda::append_kv(layout, dargs, nullptr);
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(dkc.to_host<std::uint16_t>() == kc);
  CHECK(dvc.to_host<std::uint16_t>() == vc);
}

}  // namespace

TEST_CASE("cuda append_kv equals the CPU append on paged layouts") {
  const KVStorage storage = GENERATE(KVStorage::kSeparate, KVStorage::kInterleaved);
  const bool hnd = GENERATE(false, true);
  for (std::int64_t hd : {64, 96, 128, 256, 576, 7}) {  // 7: 14-byte rows, 2-byte copies
    for (std::int64_t ps : {1, 16}) {
      for (std::int64_t n : {std::int64_t(1), ps - 1, ps + 1, std::int64_t(33)}) {
        if (n < 1) continue;
        const auto l = hnd ? PagedKVLayout::hnd(8, ps, 7, hd, storage)
                           : PagedKVLayout::nhd(8, ps, 7, hd, storage);
        const std::int64_t elems = 8 * ps * 7 * hd * (storage == KVStorage::kInterleaved ? 2 : 1);
        if (n > l.num_slots()) continue;
        INFO("head_dim " << hd << " page_size " << ps << " tokens " << n);
        check_append(l, elems, n, 0, 0);
        check_append(l, elems, n, 8, l.v_offset);  // padded source rows
        check_append(l, elems, n, 3, l.v_offset);  // odd padding: narrow copy units
      }
    }
  }
}

TEST_CASE("cuda append_kv equals the CPU append on contiguous and ring layouts") {
  const auto tm = kvkit::ContiguousKVLayout::token_major(3, 17, 8, 128, true);
  check_append(tm, 3 * 17 * 8 * 128, 40, 0, 0);
  const auto hm = kvkit::ContiguousKVLayout::head_major(3, 17, 8, 128);
  check_append(hm, 3 * 17 * 8 * 128, 40, 0, 0);
}

TEST_CASE("cuda append_latent equals the CPU append_latent, page size 64") {
  const auto l = kvkit::LatentKVLayout::dense(4, 64, 512, 64);
  for (std::int64_t n : {1, 63, 65, 200}) {
    const auto c = random_bits(std::size_t(n * 512), 4), r = random_bits(std::size_t(n * 64), 5);
    const auto slots = random_slots(n, l.num_slots(), 6);
    std::vector<std::uint16_t> cache(4 * 64 * 576, 0x1234);
    auto dc = DeviceBuffer::from_host(c), dr = DeviceBuffer::from_host(r);
    auto ds = DeviceBuffer::from_host(slots), dcache = DeviceBuffer::from_host(cache);
    kvkit::AppendLatentArgs a{c.data(), r.data(), 512, 64, slots.data(), n, cache.data(),
                              DType::kBFloat16, DType::kBFloat16};
    kvkit::append_latent(l, a);
    a.c_kv = dc.data();
    a.k_pe = dr.data();
    a.slot_mapping = ds.as<std::int64_t>();
    a.cache = dcache.data();
    kvkit::cuda::append_latent(l, a, nullptr);
    CHECK(dcache.to_host<std::uint16_t>() == cache);
  }
}

TEST_CASE("cuda copy_blocks equals the CPU copy_blocks across caches") {
  for (const auto& l : {PagedKVLayout::nhd(12, 16, 8, 128), PagedKVLayout::hnd(12, 16, 3, 96),
                        PagedKVLayout::strided(12, 4, 3, 7, 200, 24, 8)}) {
    const std::size_t elems = std::size_t(l.span_elements());
    std::vector<std::vector<std::uint16_t>> host;
    std::vector<DeviceBuffer> dev;
    std::vector<void*> host_ptrs, dev_ptrs;
    for (std::uint32_t c = 0; c < 4; ++c) {
      host.push_back(random_bits(elems, 10 + c));
      dev.push_back(DeviceBuffer::from_host(host.back()));
    }
    for (std::size_t c = 0; c < 4; ++c) {
      host_ptrs.push_back(host[c].data());
      dev_ptrs.push_back(dev[c].data());
    }
    const std::vector<std::int64_t> pairs{0, 5, 3, 11, 0, 7, 9, 1};
    kvkit::copy_blocks(l, {host_ptrs.data(), 4, pairs.data(), 4, DType::kBFloat16});
    auto dptrs = DeviceBuffer::from_host(dev_ptrs);
    auto dpairs = DeviceBuffer::from_host(pairs);
    kvkit::cuda::copy_blocks(
        l, {dptrs.as<void*>(), 4, dpairs.as<std::int64_t>(), 4, DType::kBFloat16}, 256, nullptr);
    for (std::size_t c = 0; c < 4; ++c) CHECK(dev[c].to_host<std::uint16_t>() == host[c]);
  }
}

TEST_CASE("cuda gather_kv equals the CPU gather_kv") {
  for (const auto& l : {PagedKVLayout::nhd(6, 16, 8, 128), PagedKVLayout::hnd(6, 8, 7, 96)}) {
    const auto kc = random_bits(std::size_t(l.span_elements()), 20);
    const auto vc = random_bits(std::size_t(l.span_elements()), 21);
    const std::vector<std::int32_t> pages{5, 2, 0, 3};
    for (std::int64_t n : {std::int64_t(1), l.page_size + 1, 3 * l.page_size}) {
      const std::size_t out_elems = std::size_t(n * l.num_heads * l.head_dim);
      std::vector<std::uint16_t> ko(out_elems, 0x7777), vo(out_elems, 0x7777);
      auto dkc = DeviceBuffer::from_host(kc), dvc = DeviceBuffer::from_host(vc);
      auto dpages = DeviceBuffer::from_host(pages);
      auto dko = DeviceBuffer::from_host(ko), dvo = DeviceBuffer::from_host(vo);
      kvkit::GatherKVArgs a{kc.data(), vc.data(), pages.data(), n, ko.data(), vo.data(),
                            l.num_heads * l.head_dim, l.head_dim, DType::kBFloat16};
      kvkit::gather_kv(l, a);
      a = {dkc.data(), dvc.data(), dpages.as<std::int32_t>(), n, dko.data(), dvo.data(),
           l.num_heads * l.head_dim, l.head_dim, DType::kBFloat16};
      kvkit::cuda::gather_kv(l, a, nullptr);
      CHECK(dko.to_host<std::uint16_t>() == ko);
      CHECK(dvo.to_host<std::uint16_t>() == vo);
    }
  }
}
