// gpt_decode_cuda: the CUDA build of gpt_decode. The engine (serving_loop.hpp:
// flags, workload, KVCacheManager, prefix cache, chunked prefill, preemption,
// sampling, summary) is the same code as the CPU build and runs on the host;
// this file is the model's forward pass on the GPU:
//
//   - weights, activations and the paged K/V caches live in device memory,
//     all float32;
//   - GEMMs go through cuBLAS (cublasSgemm, float32 math, no TF32), so that
//     greedy tokens match the CPU build's;
//   - RMSNorm, SwiGLU and the residual adds are small kernels
//     (common/cuda_model_math.cuh, shared with deepseek_decode_cuda);
//   - everything that touches the cache is kvkit's: cuda::rope_append_kv
//     (rotate q, write rotated k and v at the reserved slots),
//     cuda::plan_decode / cuda::run_decode (paged attention) and
//     cuda::copy_blocks (copy-on-write copies).
//
// Per step the host uploads the step's token ids, positions, slots and page
// table (a few KB), and downloads the logits of the sampled rows.
// Without a CUDA device it prints a message and exits with code 77.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <kvkit/cuda/attention_decode.cuh>
#include <kvkit/cuda/check.hpp>
#include <kvkit/cuda/copy_blocks.cuh>
#include <kvkit/cuda/device_buffer.hpp>
#include <kvkit/cuda/rope.cuh>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "../common/cuda_model_math.cuh"
#include "llama_model.hpp"
#include "serving_loop.hpp"

namespace {

using kvkit::cuda::DeviceBuffer;

#define GPT_CUBLAS_CHECK(call) examples::gpu::check_cublas((call), #call, "gpt_decode_cuda")

// ---------------------------------------------------------------- the model on the GPU
class GpuModel {
 public:
  GpuModel(const gpt::Config& cfg, const gpt::Weights& w, const gpt::Options& opt)
      : cfg_(cfg),
        layout_(kvkit::PagedKVLayout::nhd(opt.num_blocks, opt.block_size, cfg.n_kv_heads, cfg.head_dim())),
        max_rows_(std::int64_t(opt.requests) * opt.chunk),
        max_blocks_(opt.blocks_per_request()) {
    const int hd = cfg.head_dim();
    kvkit::check(hd == 48 || hd == 64 || hd == 96 || hd == 128 || hd == 256, "gpt_decode_cuda",
                 "head_dim (--dim / --heads) is ", hd,
                 "; kvkit's CUDA decode attention is built for head_dim 48, 64, 96, 128 or 256 (e.g. --dim 384 --heads 6)");
    KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, 0));
    GPT_CUBLAS_CHECK(cublasCreate(&cublas_));
    // Plain float32 math (no TF32): greedy tokens must match the CPU build.
    GPT_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_PEDANTIC_MATH));
    for (const std::vector<float>* v : {&w.token_embedding, &w.rms_att, &w.wq, &w.wk, &w.wv, &w.wo, &w.rms_ffn, &w.w1,
                                         &w.w2, &w.w3, &w.rms_final, &w.classifier}) {
      weights_.push_back(DeviceBuffer::from_host(*v));
    }
    // The same cos/sin table as the CPU build (llama2.c: interleaved pairs,
    // base 10000), uploaded once.
    const kvkit::RopeCache table({cfg.head_dim(), cfg.head_dim(), 10000.0, kvkit::RopeStyle::kGptJ, {}}, cfg.max_seq_len);
    rope_table_ = DeviceBuffer::from_host(std::vector<float>(table.data(), table.data() + table.max_positions() * cfg.head_dim()));
    // One paged K and V cache per layer; zeroed so that unwritten slots hold numbers.
    const std::size_t cache_bytes = std::size_t(layout_.num_pages * layout_.page_elements()) * sizeof(float);
    std::vector<void*> cache_ptrs;
    for (int l = 0; l < cfg.n_layers; ++l) {
      for (auto* caches : {&k_cache_, &v_cache_}) {
        caches->emplace_back(cache_bytes);
        KVKIT_CUDA_CHECK(cudaMemset(caches->back().data(), 0, cache_bytes));
        cache_ptrs.push_back(caches->back().data());
      }
    }
    cache_ptrs_ = DeviceBuffer::from_host(cache_ptrs);
    // Activations for the largest step: every request computing a full chunk.
    const std::size_t rows = std::size_t(max_rows_), f = sizeof(float);
    x_ = DeviceBuffer(rows * cfg.dim * f);
    n_ = DeviceBuffer(rows * cfg.dim * f);
    q_ = DeviceBuffer(rows * cfg.dim * f);
    k_ = DeviceBuffer(rows * cfg.kv_dim() * f);
    v_ = DeviceBuffer(rows * cfg.kv_dim() * f);
    att_ = DeviceBuffer(rows * cfg.dim * f);
    o_ = DeviceBuffer(rows * cfg.dim * f);
    a_ = DeviceBuffer(rows * cfg.hidden_dim * f);
    b_ = DeviceBuffer(rows * cfg.hidden_dim * f);
    tokens_ = DeviceBuffer(rows * sizeof(std::int32_t));
    positions_ = DeviceBuffer(rows * sizeof(std::int64_t));
    slots_ = DeviceBuffer(rows * sizeof(std::int64_t));
    table_ = DeviceBuffer(std::size_t(opt.requests) * std::size_t(max_blocks_) * sizeof(std::int32_t));
    seq_lens_ = DeviceBuffer(std::size_t(opt.requests) * sizeof(std::int32_t));
    last_rows_ = DeviceBuffer(std::size_t(opt.requests) * sizeof(std::int32_t));
    final_ = DeviceBuffer(std::size_t(opt.requests) * cfg.dim * f);
    logits_ = DeviceBuffer(std::size_t(opt.requests) * cfg.vocab_size * f);
  }
  ~GpuModel() { (void)cublasDestroy(cublas_); }
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  void copy_blocks(const std::vector<std::int64_t>& pairs) {
    const std::int64_t num_pairs = std::int64_t(pairs.size() / 2);
    kvkit::validate_copy_pairs(pairs.data(), num_pairs, layout_.num_pages, "gpt_decode_cuda");
    const DeviceBuffer device_pairs = DeviceBuffer::from_host(pairs);
    kvkit::cuda::copy_blocks(layout_,
                             {cache_ptrs_.as<void*>(), 2 * std::int64_t(cfg_.n_layers), device_pairs.as<std::int64_t>(),
                              num_pairs, kvkit::DType::kFloat32},
                             256, nullptr);
    KVKIT_CUDA_CHECK(cudaDeviceSynchronize());  // before device_pairs is freed
  }

  void forward(const gpt::Step& s, float* logits) {
    const int d = cfg_.dim, hd = cfg_.head_dim(), kvd = cfg_.kv_dim(), hidden = cfg_.hidden_dim;
    const std::int64_t rows = s.rows();
    kvkit::check(rows <= max_rows_, "gpt_decode_cuda", "step of ", rows, " rows; expected at most ", max_rows_);
    // Rows stay in work order. run_decode takes one q_len per call, so the
    // single-token items (decode steps) are batched into calls of
    // consecutive items, and each longer prefill chunk gets its own call.
    upload(tokens_, s.tokens);
    upload(positions_, s.positions);
    upload(slots_, s.slots);
    upload(table_, s.block_table);
    upload(seq_lens_, s.seq_lens);
    std::vector<Attention> calls = plan_attention(s);

    examples::gpu::embed(f(x_), f(weights_[kEmbedding]), tokens_.as<std::int32_t>(), rows, d);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      rmsnorm(f(n_), f(x_), nullptr, layer(kRmsAtt, l, d), rows);
      gemm(f(q_), layer(kWq, l, std::int64_t(d) * d), f(n_), rows, d, d);
      gemm(f(k_), layer(kWk, l, std::int64_t(kvd) * d), f(n_), rows, kvd, d);
      gemm(f(v_), layer(kWv, l, std::int64_t(kvd) * d), f(n_), rows, kvd, d);
      // kvkit: rotate q in place and write rotated k and v into the paged cache.
      kvkit::RopeParams rope;
      rope.q = f(q_);
      rope.q_token_stride = d;
      rope.q_head_stride = hd;
      rope.num_q_heads = cfg_.n_heads;
      rope.positions = positions_.as<std::int64_t>();
      rope.num_tokens = rows;
      rope.head_dim = hd;
      rope.rotary_dim = hd;
      rope.style = kvkit::RopeStyle::kGptJ;
      rope.dtype = kvkit::DType::kFloat32;
      rope.cos_sin_cache = f(rope_table_);
      rope.cache_positions = cfg_.max_seq_len;
      kvkit::cuda::rope_append_kv(rope, layout_,
                                  kvkit::AppendKVArgs::dense(f(k_), f(v_), slots_.as<std::int64_t>(), rows,
                                                             cfg_.n_kv_heads, hd, k_cache_[l].data(),
                                                             v_cache_[l].data(), kvkit::DType::kFloat32));
      // kvkit: paged attention, one call per planned group.
      for (Attention& call : calls) {
        call.params.k_cache = k_cache_[l].data();
        call.params.v_cache = v_cache_[l].data();
        kvkit::cuda::run_decode(call.params, call.plan, workspace_.data(), workspace_.bytes());
      }
      gemm(f(o_), layer(kWo, l, std::int64_t(d) * d), f(att_), rows, d, d);
      add(f(x_), f(o_), rows * d);
      rmsnorm(f(n_), f(x_), nullptr, layer(kRmsFfn, l, d), rows);
      gemm(f(a_), layer(kW1, l, std::int64_t(hidden) * d), f(n_), rows, hidden, d);
      gemm(f(b_), layer(kW3, l, std::int64_t(hidden) * d), f(n_), rows, hidden, d);
      examples::gpu::swiglu(f(a_), f(b_), rows * hidden);
      gemm(f(o_), layer(kW2, l, std::int64_t(d) * hidden), f(a_), rows, d, hidden);
      add(f(x_), f(o_), rows * d);
    }
    // Logits of the last row of each sampled work item.
    const std::int64_t m = std::int64_t(s.sampled.size());
    if (m == 0) return;
    std::vector<std::int32_t> last_rows, row_end(s.work.size());
    for (std::size_t w = 0, row = 0; w < s.work.size(); ++w) row_end[w] = std::int32_t(row += std::size_t(s.work[w].count));
    for (int w : s.sampled) last_rows.push_back(row_end[std::size_t(w)] - 1);
    upload(last_rows_, last_rows);
    rmsnorm(f(final_), f(x_), last_rows_.as<std::int32_t>(), f(weights_[kRmsFinal]), m);
    gemm(f(logits_), f(weights_[kClassifier]), f(final_), m, cfg_.vocab_size, d);
    KVKIT_CUDA_CHECK(cudaMemcpy(logits, logits_.data(), std::size_t(m) * cfg_.vocab_size * sizeof(float),
                                cudaMemcpyDeviceToHost));
  }

 private:
  enum WeightIndex { kEmbedding, kRmsAtt, kWq, kWk, kWv, kWo, kRmsFfn, kW1, kW2, kW3, kRmsFinal, kClassifier };
  struct Attention {
    kvkit::PagedDecodeParams params;
    kvkit::cuda::DecodePlan plan;
  };

  static float* f(const DeviceBuffer& b) { return b.as<float>(); }
  float* layer(WeightIndex i, int l, std::int64_t elements) const { return f(weights_[i]) + l * elements; }

  template <class T>
  static void upload(DeviceBuffer& dst, const std::vector<T>& src) {
    if (!src.empty()) dst.copy_from_host(src.data(), src.size() * sizeof(T));
  }

  void gemm(float* y, const float* w, const float* x, std::int64_t rows, int out, int in) {
    examples::gpu::gemm(cublas_, y, w, x, rows, out, in, "gpt_decode_cuda");
  }
  void rmsnorm(float* out, const float* x, const std::int32_t* src_rows, const float* weight, std::int64_t rows) {
    examples::gpu::rmsnorm(out, x, src_rows, weight, rows, cfg_.dim);
  }
  void add(float* x, const float* y, std::int64_t n) { examples::gpu::add(x, y, n); }

  // The step's attention calls (made once per step, reused by every layer):
  // runs of consecutive single-token items as one batched q_len = 1 call,
  // each longer item alone with q_len = its chunk. plan_decode reads the
  // host copy of the lengths; the workspace grows to the largest plan.
  std::vector<Attention> plan_attention(const gpt::Step& s) {
    std::vector<Attention> calls;
    const int hd = cfg_.head_dim(), d = cfg_.dim;
    std::int64_t row = 0;
    for (std::size_t w = 0; w < s.work.size();) {
      std::size_t end = w + 1;
      if (s.work[w].count == 1) {
        while (end < s.work.size() && s.work[end].count == 1) ++end;
      }
      Attention call;
      kvkit::PagedDecodeParams& p = call.params;
      p.q = f(q_) + row * d;
      p.q_stride_head = hd;
      p.q_stride_token = d;
      p.k_cache = k_cache_[0].data();
      p.v_cache = v_cache_[0].data();
      p.layout = layout_;
      p.page_table = {table_.as<std::int32_t>() + std::int64_t(w) * s.max_blocks, seq_lens_.as<std::int32_t>() + w,
                      std::int64_t(end - w), s.max_blocks, s.max_blocks};
      p.q_len = int(s.work[w].count);
      p.num_q_heads = cfg_.n_heads;
      p.sm_scale = 1.0f / std::sqrt(float(hd));
      p.o = f(att_) + row * d;
      p.o_stride_head = hd;
      p.o_stride_token = d;
      call.plan = kvkit::cuda::plan_decode(p, &s.seq_lens[w], num_sms_);
      if (call.plan.workspace_bytes > workspace_.bytes()) workspace_ = DeviceBuffer(call.plan.workspace_bytes);
      for (std::size_t i = w; i < end; ++i) row += s.work[i].count;
      calls.push_back(call);
      w = end;
    }
    return calls;
  }

  const gpt::Config& cfg_;
  kvkit::PagedKVLayout layout_;
  std::int64_t max_rows_, max_blocks_;
  int num_sms_ = 0;
  cublasHandle_t cublas_ = nullptr;
  std::vector<DeviceBuffer> weights_;  // in WeightIndex order
  DeviceBuffer rope_table_;
  std::vector<DeviceBuffer> k_cache_, v_cache_;
  DeviceBuffer cache_ptrs_;  // [layers * 2] device pointers, for copy_blocks
  DeviceBuffer x_, n_, q_, k_, v_, att_, o_, a_, b_;
  DeviceBuffer tokens_, positions_, slots_, table_, seq_lens_, last_rows_, final_, logits_, workspace_;
};

}  // namespace

int main(int argc, char** argv) try {
  gpt::Options opt = gpt::parse_options(argc, argv, "gpt_decode_cuda");
  if (kvkit::cuda::device_count() == 0) {
    std::printf("gpt_decode_cuda: SKIPPED: no CUDA device is present\n");
    return 77;
  }
  gpt::Config cfg;
  gpt::Weights weights;
  gpt::load_model(opt, cfg, weights, "gpt_decode_cuda");
  int code = 0;
  {
    GpuModel model(cfg, weights, opt);
    code = gpt::serve(opt, cfg, weights, model);
  }
  return code;
} catch (const kvkit::Error& e) {
  std::fprintf(stderr, "gpt_decode_cuda: %s\n", e.what());
  return 1;
}
