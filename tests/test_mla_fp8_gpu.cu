// The CUDA fp8 latent append (kvkit::cuda::mla_fp8_append) writes the same
// bytes as the CPU op (kvkit::mla_fp8_append): whole caches compared byte for
// byte after both ran on the same poisoned cache, so a byte the GPU writes
// that the CPU does not (or the reverse) fails as surely as a wrong one.
// float32 / float16 / bfloat16 sources; 1, 7, 33, 63, 64, 65 and 1,000
// tokens; pages of 64, 16, 4 and 1; padding slots; padded cache rows whose
// stride is only 4-byte aligned (the kernel's 32-bit store path); source rows
// not 16-byte aligned (its element-wise load path); hand-made rows with an
// all-zero group, exact 448s, rounding ties, saturation and subnormal e4m3.
// Then append -> absorbed decode on the GPU against the same on the CPU.
// Skipped without a GPU.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/mla_decode.cuh"
#include "kvkit/cuda/mla_fp8.cuh"
#include "kvkit/ops/mla_decode.hpp"
#include "kvkit/ops/mla_fp8.hpp"

using Catch::Matchers::Contains;
using kvkit::LatentFp8Layout;
using kvkit::MlaFp8AppendArgs;
using kvkit::cuda::DeviceBuffer;

namespace {

constexpr std::uint8_t kPoison = 0xEE;

// Latent rows whose four c_kv groups differ in magnitude (per-group scales
// matter), with some tiny values (subnormal e4m3) and, every 11th token, an
// all-zero group (scale 0).
template <class T>
std::vector<T> random_rows(std::int64_t tokens, std::int64_t stride, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  const float group_scale[4] = {0.05f, 1.0f, 7.0f, 0.3f};
  std::vector<T> rows(std::size_t(tokens * stride), kvkit::from_float<T>(12345.0f));  // gaps: never read
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (int d = 0; d < 576; ++d) {
      float x = d < 512 ? group_scale[d / 128] * normal(rng) * (d % 37 == 3 ? 1e-4f : 1.0f) : normal(rng);
      if (t % 11 == 5 && d >= 128 && d < 256) x = 0.0f;
      rows[std::size_t(t * stride + d)] = kvkit::from_float<T>(x);
    }
  }
  return rows;
}

// Distinct slots scattered over the cache; every 5th token is padding (-1).
std::vector<std::int64_t> scattered_slots(std::int64_t tokens, std::int64_t num_slots, std::mt19937& rng) {
  std::vector<std::int64_t> all(static_cast<std::size_t>(num_slots));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<std::int64_t> slots(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) slots[t] = t % 5 == 2 ? -1 : all[std::size_t(t)];
  return slots;
}

// Runs the CPU op and the GPU op on the same inputs and poisoned caches;
// requires equal bytes everywhere and that the appended rows changed.
// `src_offset` elements in front of the first row misalign the source.
template <class T>
void check_same_bytes(const LatentFp8Layout& layout, const std::vector<T>& rows, std::int64_t stride,
                      const std::vector<std::int64_t>& slots, std::int64_t src_offset = 0) {
  const std::int64_t tokens = std::int64_t(slots.size());
  std::vector<T> src(std::size_t(src_offset), kvkit::from_float<T>(0.0f));
  src.insert(src.end(), rows.begin(), rows.end());
  std::vector<std::uint8_t> cpu(std::size_t(layout.span_bytes()), kPoison);
  MlaFp8AppendArgs a;
  a.latent = src.data() + src_offset;
  a.latent_stride_token = stride;
  a.dtype = kvkit::dtype_of<T>;
  a.slot_mapping = slots.data();
  a.num_tokens = tokens;
  a.cache = cpu.data();
  kvkit::mla_fp8_append(layout, a);

  auto d_src = DeviceBuffer::from_host(src);
  auto d_slots = DeviceBuffer::from_host(slots);
  auto d_cache = DeviceBuffer::from_host(std::vector<std::uint8_t>(cpu.size(), kPoison));
  MlaFp8AppendArgs g = a;
  g.latent = d_src.template as<T>() + src_offset;
  g.slot_mapping = d_slots.as<std::int64_t>();
  g.cache = d_cache.as<std::uint8_t>();
  kvkit::cuda::mla_fp8_append(layout, g, nullptr);
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const auto gpu = d_cache.template to_host<std::uint8_t>();

  std::int64_t appended = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    ++appended;
    const std::uint8_t* row = cpu.data() + layout.slot_offset(slots[t]);
    // The k_pe part never equals the poison pattern (0xEEEE is bf16 -3.7e28).
    REQUIRE(std::memcmp(row + 528, std::vector<std::uint8_t>(128, kPoison).data(), 128) != 0);
  }
  REQUIRE(appended > 0);
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    if (gpu[i] != cpu[i]) {
      const std::int64_t in_row = std::int64_t(i) % layout.stride_slot;
      FAIL("byte " << i << " (page " << std::int64_t(i) / layout.stride_page << ", byte " << in_row
                   << " of its row): GPU 0x" << std::hex << int(gpu[i]) << ", CPU 0x" << int(cpu[i]));
    }
  }
}

template <class T>
void check_random(const LatentFp8Layout& layout, std::int64_t tokens, std::int64_t stride, unsigned seed,
                  std::int64_t src_offset = 0) {
  std::mt19937 rng(seed);
  const auto rows = random_rows<T>(tokens, stride, rng);
  const auto slots = scattered_slots(tokens, layout.num_slots(), rng);
  check_same_bytes<T>(layout, rows, stride, slots, src_offset);
}

}  // namespace

TEST_CASE("GPU fp8 latent append writes the CPU op's bytes: bf16 rows, pages of 64, odd token counts") {
  for (std::int64_t tokens : {1, 7, 33, 63, 64, 65, 1000}) {
    const auto layout = LatentFp8Layout::dense((tokens + 63) / 64 + 2, 64);
    check_random<kvkit::bfloat16>(layout, tokens, 576, 100 + unsigned(tokens));
  }
}

TEST_CASE("GPU fp8 latent append writes the CPU op's bytes: float32 and float16 rows, pages of 16 and 1") {
  check_random<float>(LatentFp8Layout::dense(5, 16), 33, 576, 1);
  check_random<float>(LatentFp8Layout::dense(1200, 1), 1000, 576, 2);
  check_random<kvkit::half>(LatentFp8Layout::dense(3, 16), 7, 576, 3);
  check_random<kvkit::half>(LatentFp8Layout::dense(70, 1), 65, 576, 4);
}

TEST_CASE("GPU fp8 latent append: padded cache rows (4- and 16-byte aligned) and unaligned source rows") {
  // 660-byte rows: only 4-byte aligned (32-bit stores); 672: 16-byte aligned, 16 bytes of padding each.
  check_random<kvkit::bfloat16>(LatentFp8Layout::strided(9, 4, 4 * 660, 660), 33, 576, 5);
  check_random<kvkit::bfloat16>(LatentFp8Layout::strided(9, 4, 4 * 672 + 16, 672), 33, 576, 6);
  // Source stride 580 (bf16: 1,160 bytes, 8-byte aligned) and 577; a source one element off alignment.
  check_random<kvkit::bfloat16>(LatentFp8Layout::dense(3, 16), 33, 580, 7);
  check_random<float>(LatentFp8Layout::dense(3, 16), 33, 577, 8);
  check_random<kvkit::half>(LatentFp8Layout::dense(3, 16), 33, 576, 9, 1);
}

TEST_CASE("GPU fp8 latent append: zero groups, exact 448, rounding ties, saturation, e4m3 subnormals") {
  std::vector<float> rows(4 * 576, 0.0f);
  // Token 0: group 0 all zero (scale 0); group 1 amax 448 (scale 1): ties
  // between e4m3 steps (17 = 16 + 1: the tie of 16 and 18 goes to 16;
  // 19 -> 20), negative zero; group 2 amax 1 (scale 1/448): values whose
  // quotient lands on and beyond 448 after rounding; group 3 tiny values in
  // the subnormal range of the quotient.
  float* x = rows.data();
  x[128] = 448.0f;
  x[129] = 17.0f;
  x[130] = -19.0f;
  x[131] = -0.0f;
  x[132] = 0.0009765625f;  // 2^-10: half the smallest subnormal step of scale 1 -> tie to 0
  x[133] = 0.0029296875f;  // 1.5 * 2^-9: tie between 1 and 2 subnormal steps -> 2 (even)
  x[256] = 1.0f;
  x[257] = -0.99999994f;
  x[258] = 0.9999f;
  x[384] = 3e-6f;
  x[385] = 1e-8f;
  x[386] = -2.5e-7f;
  for (int d = 0; d < 64; ++d) x[512 + d] = 1.0f + float(d) / 3.0f;  // k_pe: rounded to bf16
  // Token 1: every value equal (all bytes 448); token 2: alternating signs; token 3: all zero.
  for (int d = 0; d < 576; ++d) rows[576 + d] = 0.75f;
  for (int d = 0; d < 576; ++d) rows[2 * 576 + d] = (d % 2 ? -1.0f : 1.0f) * float(d + 1) * 0.01f;
  const auto layout = LatentFp8Layout::dense(2, 4);
  check_same_bytes<float>(layout, rows, 576, {5, 0, 7, 2});
  // The pinned bytes of token 0 (also on the CPU): checks that the comparison compares something.
  std::vector<std::uint8_t> row(656);
  kvkit::mla_fp8_quantize_row(rows.data(), row.data());
  CHECK(row[0] == 0x00);
  CHECK(row[128] == 0x7E);  // 448
  CHECK(row[129] == 0x58);  // 16
  CHECK(row[130] == 0xDA);  // -20
  CHECK(row[131] == 0x80);  // -0
  CHECK(row[132] == 0x00);  // 2^-10: tie -> 0
  CHECK(row[133] == 0x02);  // 1.5 * 2^-9: tie -> 2 * 2^-9
}

TEST_CASE("GPU fp8 latent append skips padding and, unlike the CPU op, slots beyond the cache") {
  const auto layout = LatentFp8Layout::dense(2, 4);
  std::mt19937 rng(12);
  const auto rows = random_rows<kvkit::bfloat16>(3, 576, rng);
  const std::vector<std::int64_t> slots{-1, 8, -7};  // 8 = num_slots: out of range
  auto d_rows = DeviceBuffer::from_host(rows);
  auto d_slots = DeviceBuffer::from_host(slots);
  auto d_cache = DeviceBuffer::from_host(std::vector<std::uint8_t>(std::size_t(layout.span_bytes()), kPoison));
  MlaFp8AppendArgs g;
  g.latent = d_rows.data();
  g.latent_stride_token = 576;
  g.dtype = kvkit::DType::kBFloat16;
  g.slot_mapping = d_slots.as<std::int64_t>();
  g.num_tokens = 3;
  g.cache = d_cache.as<std::uint8_t>();
  kvkit::cuda::mla_fp8_append(layout, g);
  const auto after = d_cache.to_host<std::uint8_t>();
  REQUIRE(std::all_of(after.begin(), after.end(), [](std::uint8_t b) { return b == kPoison; }));
}

TEST_CASE("GPU fp8 latent append rejects bad arguments before launching") {
  const auto layout = LatentFp8Layout::dense(2, 4);
  DeviceBuffer d_rows(576 * 4 * 2), d_slots(8 * 2), d_cache(std::size_t(layout.span_bytes()) + 4);
  MlaFp8AppendArgs g;
  g.latent = d_rows.data();
  g.latent_stride_token = 576;
  g.dtype = kvkit::DType::kBFloat16;
  g.slot_mapping = d_slots.as<std::int64_t>();
  g.num_tokens = 2;
  g.cache = d_cache.as<std::uint8_t>();
  SECTION("a row stride below 576") {
    g.latent_stride_token = 575;
    CHECK_THROWS_WITH(kvkit::cuda::mla_fp8_append(layout, g), Contains("'latent_stride_token' = 575"));
  }
  SECTION("a null source") {
    g.latent = nullptr;
    CHECK_THROWS_WITH(kvkit::cuda::mla_fp8_append(layout, g), Contains("'latent'"));
  }
  SECTION("an fp8 source") {
    g.dtype = kvkit::DType::kFloat8E4M3;
    CHECK_THROWS_WITH(kvkit::cuda::mla_fp8_append(layout, g), Contains("'dtype' = float8_e4m3"));
  }
  SECTION("a cache pointer that is not 4-byte aligned") {
    g.cache = d_cache.as<std::uint8_t>() + 2;
    CHECK_THROWS_WITH(kvkit::cuda::mla_fp8_append(layout, g), Contains("4-byte aligned"));
  }
  SECTION("rows narrower than 656 bytes") {
    LatentFp8Layout bad = layout;
    bad.stride_slot = 652;
    CHECK_THROWS_WITH(kvkit::cuda::mla_fp8_append(bad, g), Contains("'stride_slot' = 652"));
  }
  REQUIRE(cudaGetLastError() == cudaSuccess);
}

namespace {

int num_sms() {
  int device = 0, sms = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

// A prefill of each sequence's prompt, then one decode token each (its row
// appended, then attention), on the GPU with kvkit::cuda ops and on the CPU
// with the CPU ops, from the same bf16 rows. The caches must be equal bytes;
// the outputs agree within the GPU decode test's tolerance (float32 output:
// |o_gpu - o_cpu| <= 2e-5 * max|c_kv| + 1e-4 |o_cpu|; lse 2e-5 relative).
TEST_CASE("GPU fp8 append -> absorbed decode equals the CPU append -> decode") {
  kvkit::MlaConfig config = kvkit::MlaConfig::deepseek_v3();
  config.n_heads = 16;
  const int page = 64;
  const std::vector<int> prompt{1, 64, 300, 1000};
  const std::int64_t batch = std::int64_t(prompt.size());
  std::int64_t max_blocks = 0, pages = 1;
  for (int len : prompt) {
    max_blocks = std::max<std::int64_t>(max_blocks, (len + 1 + page - 1) / page);
    pages += (len + 1 + page - 1) / page;
  }
  const auto layout = LatentFp8Layout::dense(pages, page);
  std::mt19937 rng(21);
  std::vector<std::int32_t> pool(static_cast<std::size_t>(pages));
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<std::int32_t> table(std::size_t(batch * max_blocks), -1), lens;
  std::size_t next = 0;
  std::vector<std::int64_t> prefill_slots, decode_slots;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (int t = 0; t <= prompt[b]; ++t) {
      if (t % page == 0) table[b * max_blocks + t / page] = pool[next++];
      const std::int64_t slot = std::int64_t(table[b * max_blocks + t / page]) * page + t % page;
      (t < prompt[b] ? prefill_slots : decode_slots).push_back(slot);
    }
    lens.push_back(prompt[b] + 1);
  }
  const auto prefill_rows = random_rows<kvkit::bfloat16>(std::int64_t(prefill_slots.size()), 576, rng);
  const auto decode_rows = random_rows<kvkit::bfloat16>(batch, 576, rng);
  float vmax = 0.0f;
  for (const auto* rows : {&prefill_rows, &decode_rows})
    for (std::size_t i = 0; i < rows->size(); ++i)
      if (i % 576 < 512) vmax = std::max(vmax, std::fabs(kvkit::to_float((*rows)[i])));
  std::normal_distribution<float> normal;
  std::vector<float> q(std::size_t(batch) * config.n_heads * 576);
  for (auto& v : q) v = 0.5f * normal(rng);

  // CPU
  std::vector<std::uint8_t> cache(std::size_t(layout.span_bytes()), 0xFF);  // NaN rows where nothing was appended
  MlaFp8AppendArgs a;
  a.latent_stride_token = 576;
  a.dtype = kvkit::DType::kBFloat16;
  a.latent = prefill_rows.data();
  a.slot_mapping = prefill_slots.data();
  a.num_tokens = std::int64_t(prefill_slots.size());
  a.cache = cache.data();
  kvkit::mla_fp8_append(layout, a);
  a.latent = decode_rows.data();
  a.slot_mapping = decode_slots.data();
  a.num_tokens = batch;
  kvkit::mla_fp8_append(layout, a);
  std::vector<float> o_cpu(std::size_t(batch) * config.n_heads * 512, -777.0f), lse_cpu(std::size_t(batch) * config.n_heads);
  kvkit::PagedDecodeParams p = kvkit::mla_decode_params_fp8(config, layout, cache.data());
  p.q = q.data();
  p.q_dtype = kvkit::DType::kFloat32;
  p.q_stride_head = 576;
  p.q_stride_token = std::int64_t(config.n_heads) * 576;
  p.q_len = 1;
  p.o = o_cpu.data();
  p.o_stride_head = 512;
  p.o_stride_token = std::int64_t(config.n_heads) * 512;
  p.lse = lse_cpu.data();
  p.page_table = {table.data(), lens.data(), batch, max_blocks, max_blocks};
  kvkit::mla_decode_attention(p);

  // GPU
  auto d_cache = DeviceBuffer::from_host(std::vector<std::uint8_t>(cache.size(), 0xFF));
  auto d_prefill_rows = DeviceBuffer::from_host(prefill_rows);
  auto d_prefill_slots = DeviceBuffer::from_host(prefill_slots);
  auto d_decode_rows = DeviceBuffer::from_host(decode_rows);
  auto d_decode_slots = DeviceBuffer::from_host(decode_slots);
  auto d_q = DeviceBuffer::from_host(q);
  auto d_table = DeviceBuffer::from_host(table);
  auto d_lens = DeviceBuffer::from_host(lens);
  auto d_o = DeviceBuffer::from_host(std::vector<float>(o_cpu.size(), -777.0f));
  auto d_lse = DeviceBuffer(lse_cpu.size() * sizeof(float));
  MlaFp8AppendArgs g = a;
  g.cache = d_cache.as<std::uint8_t>();
  g.latent = d_prefill_rows.data();
  g.slot_mapping = d_prefill_slots.as<std::int64_t>();
  g.num_tokens = std::int64_t(prefill_slots.size());
  kvkit::cuda::mla_fp8_append(layout, g);
  g.latent = d_decode_rows.data();
  g.slot_mapping = d_decode_slots.as<std::int64_t>();
  g.num_tokens = batch;
  kvkit::cuda::mla_fp8_append(layout, g);
  kvkit::PagedDecodeParams gp = kvkit::mla_decode_params_fp8(config, layout, d_cache.as<std::uint8_t>());
  gp.q = d_q.data();
  gp.q_dtype = p.q_dtype;
  gp.q_stride_head = p.q_stride_head;
  gp.q_stride_token = p.q_stride_token;
  gp.q_len = 1;
  gp.o = d_o.data();
  gp.o_stride_head = p.o_stride_head;
  gp.o_stride_token = p.o_stride_token;
  gp.lse = d_lse.as<float>();
  gp.page_table = {d_table.as<std::int32_t>(), d_lens.as<std::int32_t>(), batch, max_blocks, max_blocks};
  const auto plan = kvkit::cuda::plan_mla_decode(gp, lens.data(), num_sms());
  DeviceBuffer workspace(std::max<std::size_t>(plan.workspace_bytes, 4));
  kvkit::cuda::run_mla_decode(gp, plan, workspace.data(), plan.workspace_bytes);
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());

  REQUIRE(d_cache.to_host<std::uint8_t>() == cache);
  const auto o_gpu = d_o.to_host<float>();
  const auto lse_gpu = d_lse.to_host<float>();
  for (std::size_t i = 0; i < o_cpu.size(); ++i) {
    if (!(std::fabs(double(o_gpu[i]) - o_cpu[i]) <= 2e-5 * vmax + 1e-4 * std::fabs(double(o_cpu[i])))) {
      FAIL("o[" << i << "] (row " << i / 512 << "): GPU " << o_gpu[i] << ", CPU " << o_cpu[i]);
    }
  }
  for (std::size_t r = 0; r < lse_cpu.size(); ++r) {
    REQUIRE(std::fabs(double(lse_gpu[r]) - lse_cpu[r]) <= 2e-5 * std::max(1.0, std::fabs(double(lse_cpu[r]))));
  }
}
