// CUDA quantize-append and dequantize-gather equal the CPU ops bit for bit
// (stored bytes, written scales, dequantized floats) on the same inputs,
// specials (inf, NaN, ±0, huge values) included. Skipped without a GPU.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/quantize.cuh"

using kvkit::DType;
using kvkit::PagedKVLayout;
using kvkit::ScaleGranularity;
using kvkit::cuda::DeviceBuffer;

TEST_CASE("cuda quantize_append_kv and dequantize_gather_kv equal the CPU ops") {
  const DType cache = GENERATE(DType::kFloat8E4M3, DType::kFloat8E5M2, DType::kInt8);
  const ScaleGranularity g = GENERATE(ScaleGranularity::kPerTensor, ScaleGranularity::kPerHead,
                                      ScaleGranularity::kPerTokenHead);
  const DType src = GENERATE(DType::kFloat32, DType::kBFloat16);
  const std::int64_t heads = 7, hd = GENERATE(64, 128, 576);
  const auto layout = PagedKVLayout::nhd(4, 16, heads, hd);
  const std::int64_t n = 40;
  std::mt19937 rng(17);
  std::uniform_real_distribution<float> unit(-300.0f, 300.0f);
  std::vector<float> kf(std::size_t(n * heads * hd)), vf(kf.size());
  for (auto& x : kf) x = unit(rng);
  for (auto& x : vf) x = unit(rng);
  kf[3] = std::numeric_limits<float>::infinity();
  kf[5] = std::nanf("");
  kf[7] = -0.0f;
  vf[9] = 1e30f;
  std::vector<std::uint16_t> kb(kf.size()), vb(vf.size());
  for (std::size_t i = 0; i < kf.size(); ++i) {
    kb[i] = kvkit::bfloat16(kf[i]).bits;
    vb[i] = kvkit::bfloat16(vf[i]).bits;
  }
  const void* kh = src == DType::kFloat32 ? static_cast<const void*>(kf.data()) : kb.data();
  const void* vh = src == DType::kFloat32 ? static_cast<const void*>(vf.data()) : vb.data();
  const std::size_t src_bytes = kf.size() * kvkit::dtype_size(src);
  std::vector<std::int64_t> slots;
  for (std::int64_t t = 0; t < n; ++t) slots.push_back(t % 5 == 4 ? -1 : (t * 13) % 64);
  std::vector<std::uint8_t> kc(std::size_t(layout.span_elements()), 0xA5), vc(kc.size(), 0xA5);
  std::vector<float> ks, vs;
  if (g == ScaleGranularity::kPerTokenHead) {
    ks.assign(std::size_t(64 * heads), -1.0f);
    vs = ks;
  } else {
    for (std::int64_t h = 0; h < (g == ScaleGranularity::kPerHead ? heads : 1); ++h) {
      ks.push_back(0.37f * float(h + 1));
      vs.push_back(0.11f * float(h + 2));
    }
  }
  DeviceBuffer dk(src_bytes), dv(src_bytes);
  dk.copy_from_host(kh, src_bytes);
  dv.copy_from_host(vh, src_bytes);
  auto ds = DeviceBuffer::from_host(slots);
  auto dkc = DeviceBuffer::from_host(kc), dvc = DeviceBuffer::from_host(vc);
  auto dks = DeviceBuffer::from_host(ks), dvs = DeviceBuffer::from_host(vs);

  kvkit::QuantizeAppendArgs a;
  a.key = kh;
  a.value = vh;
  a.key_stride_token = a.value_stride_token = heads * hd;
  a.key_stride_head = a.value_stride_head = hd;
  a.slot_mapping = slots.data();
  a.num_tokens = n;
  a.k_cache = kc.data();
  a.v_cache = vc.data();
  a.src_dtype = src;
  a.cache_dtype = cache;
  a.granularity = g;
  const bool dyn = g == ScaleGranularity::kPerTokenHead;
  if (dyn) {
    a.k_scale_cache = ks.data();
    a.v_scale_cache = vs.data();
  } else {
    a.k_scale = ks.data();
    a.v_scale = vs.data();
  }
  kvkit::quantize_append_kv(layout, a);

  auto d = a;
  d.key = dk.data();
  d.value = dv.data();
  d.slot_mapping = ds.as<std::int64_t>();
  d.k_cache = dkc.data();
  d.v_cache = dvc.data();
  if (dyn) {
    d.k_scale_cache = dks.as<float>();
    d.v_scale_cache = dvs.as<float>();
  } else {
    d.k_scale = dks.as<float>();
    d.v_scale = dvs.as<float>();
  }
  kvkit::cuda::quantize_append_kv(layout, d, nullptr);
  CHECK(dkc.to_host<std::uint8_t>() == kc);
  CHECK(dvc.to_host<std::uint8_t>() == vc);
  if (dyn) {
    CHECK(dks.to_host<float>() == ks);
    CHECK(dvs.to_host<float>() == vs);
  }

  // Dequantize a sequence over pages 1, 3, 0.
  const std::vector<std::int32_t> pages{1, 3, 0};
  const std::int64_t m = 37;
  std::vector<float> ko(std::size_t(m * heads * hd), -7.0f), vo(ko.size(), -7.0f);
  auto dpages = DeviceBuffer::from_host(pages);
  auto dko = DeviceBuffer::from_host(ko), dvo = DeviceBuffer::from_host(vo);
  kvkit::DequantizeGatherArgs q{kc.data(), vc.data(), pages.data(), m, ko.data(), vo.data(),
                                heads * hd, hd, cache, g, ks.data(), vs.data()};
  kvkit::dequantize_gather_kv(layout, q);
  q = {dkc.data(), dvc.data(), dpages.as<std::int32_t>(), m, dko.as<float>(), dvo.as<float>(),
       heads * hd, hd, cache, g, dks.as<float>(), dvs.as<float>()};
  kvkit::cuda::dequantize_gather_kv(layout, q, nullptr);
  const auto gk = dko.to_host<float>(), gv = dvo.to_host<float>();
  // NaN codes dequantize to NaN on both sides, but the payload is not
  // comparable: the GPU's multiply returns the canonical NaN (0x7fffffff)
  // where x86 keeps the operand's (0x7fc00000).
  const auto same = [](float a, float b) {
    return (a != a && b != b) || kvkit::float_to_bits(a) == kvkit::float_to_bits(b);
  };
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < ko.size(); ++i) {
    mismatches += !same(gk[i], ko[i]);
    mismatches += !same(gv[i], vo[i]);
  }
  CHECK(mismatches == 0);
}
