// deepseek_decode_cuda: the CUDA build of deepseek_decode. The flags, the
// model and its random weights, the step loop (KVCacheManager, greedy
// sampling) and the summary are deepseek_model.hpp, the same code as the CPU
// build; this file is the forward pass on the GPU:
//
//   - weights, activations and the paged bf16 latent caches live in device
//     memory; activations are float32;
//   - GEMMs go through cuBLAS in float32 (no TF32): the projections, the
//     per-head W_UK / W_UV products (strided-batched over heads) and the
//     experts; RMSNorm, SwiGLU and the residual adds are the small kernels
//     of common/cuda_model_math.cuh (shared with gpt_decode_cuda);
//   - kvkit does the rest: cuda::mla_compress (RMSNorm c_kv + RoPE k_pe +
//     append), cuda::apply_rope (q_pe), the naive prefill path
//     (cuda::gather_kv of the cached rows, then cuda::plan_decode /
//     run_decode over the decompressed K/V), the absorbed decode
//     (cuda::plan_mla_decode / run_mla_decode over the latent cache),
//     cuda::moe_route, moe_dispatch_plan, moe_gather and moe_combine.
//
// Per step the host uploads token ids, positions, slots and the page table
// (a few KB), downloads each MoE layer's expert offsets (an engine would run
// a grouped GEMM that reads them on the device) and the logits.
//
// --check runs the CPU forward pass (cpu_forward.hpp) in the same binary on
// the same steps (the GPU's tokens) and compares every step's logits, and
// runs the GPU naive path next to the absorbed one at every decode step.
// Without a CUDA device it prints a message and exits with code 77.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <kvkit/cuda/attention_decode.cuh>
#include <kvkit/cuda/check.hpp>
#include <kvkit/cuda/device_buffer.hpp>
#include <kvkit/cuda/gather.cuh>
#include <kvkit/cuda/mla_compress.cuh>
#include <kvkit/cuda/mla_decode.cuh>
#include <kvkit/cuda/moe_dispatch.cuh>
#include <kvkit/cuda/moe_router.cuh>
#include <kvkit/cuda/rope.cuh>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "../common/cuda_model_math.cuh"
#include "cpu_forward.hpp"
#include "deepseek_model.hpp"

namespace {

using kvkit::cuda::DeviceBuffer;
constexpr const char* kProgram = "deepseek_decode_cuda";

/// GPU logits vs the CPU build's, per element: the two builds round
/// differently (GEMM and reduction orders, hence an occasional bf16 rounding
/// flip of a cached c_kv value). Perturbing the CPU pass by 1e-7..1e-6
/// relative moves its logits (|logit| <= ~5) by at most 3.3e-3; a wrong key,
/// head or scale moves them by O(0.1).
constexpr double kLogitTolerance = 1e-2;
/// GPU absorbed vs GPU naive attention output (the CPU build's --check bound).
constexpr double kAttentionTolerance = 1e-4;

#define DS_CUBLAS_CHECK(call) examples::gpu::check_cublas((call), #call, kProgram)

__global__ void to_bf16_kernel(std::uint16_t* out, const float* in, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    out[i] = kvkit::float_to_bfloat16_bits(in[i]);
}
__global__ void from_bf16_kernel(float* out, const std::uint16_t* in, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    out[i] = kvkit::bfloat16_bits_to_float(in[i]);
}
// K[t, h, nope + j] = latent[t, rank + j]: every head's key ends with the shared k_pe.
__global__ void broadcast_kpe_kernel(float* k, const float* latent, int tokens, int heads, int head_dim, int nope,
                                     int rank, int latent_dim) {
  const int rope = head_dim - nope;
  const std::int64_t n = std::int64_t(tokens) * heads * rope;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t j = i % rope, th = i / rope, t = th / heads;
    k[th * head_dim + nope + j] = latent[t * latent_dim + rank + j];
  }
}

class GpuForward {
 public:
  GpuForward(const deepseek::Model& m, const deepseek::Options& opt, bool check)
      : m_(m),
        check_(check),
        layout_(kvkit::LatentKVLayout::dense(opt.num_blocks(), opt.block_size, m.mla.kv_lora_rank,
                                             m.mla.qk_rope_head_dim)),
        max_rows_(std::int64_t(opt.requests) * opt.prompt_len),
        max_len_(opt.max_len()),
        expert_load_(std::size_t(m.router.n_experts), 0) {
    const kvkit::MlaConfig& c = m.mla;
    kvkit::check(c.kv_lora_rank == 512 && c.qk_rope_head_dim == 64 && c.qk_head_dim() == c.v_head_dim, kProgram,
                 "the GPU path needs kv_lora_rank 512 + rope 64 (run_mla_decode) and qk_nope + qk_rope = v_head_dim "
                 "(run_decode's naive path)");
    KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, 0));
    DS_CUBLAS_CHECK(cublasCreate(&cublas_));
    DS_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_PEDANTIC_MATH));  // plain float32, no TF32

    embedding_ = DeviceBuffer::from_host(m.embedding);
    classifier_ = DeviceBuffer::from_host(m.classifier);
    final_norm_ = DeviceBuffer::from_host(m.final_norm);
    for (const auto& L : m.layers) {
      LayerWeights w;
      const auto put = [](DeviceBuffer& dst, const std::vector<float>& src) {
        if (!src.empty()) dst = DeviceBuffer::from_host(src);  // layer 0 has no gate or routed experts
      };
      put(w.attn_norm, L.attn_norm);
      put(w.wq, L.wq);
      put(w.wkv_a, L.wkv_a);
      put(w.kv_norm, L.kv_norm);
      put(w.w_uk, L.w_uk);
      put(w.w_uv, L.w_uv);
      put(w.wo, L.wo);
      put(w.ffn_norm, L.ffn_norm);
      put(w.w1, L.w1);
      put(w.w2, L.w2);
      put(w.w3, L.w3);
      put(w.gate, L.gate);
      put(w.e1, L.e1);
      put(w.e2, L.e2);
      put(w.e3, L.e3);
      layers_.push_back(std::move(w));
      // One latent cache per layer, zeroed so that unwritten rows hold numbers.
      caches_.emplace_back(std::size_t(layout_.num_pages * layout_.stride_page) * sizeof(std::uint16_t));
      KVKIT_CUDA_CHECK(cudaMemset(caches_.back().data(), 0, caches_.back().bytes()));
    }
    // The CPU build's cos/sin table (DeepSeek YaRN, interleaved pairs), uploaded once.
    const kvkit::RopeCache table(c.rope, max_len_);
    rope_ = DeviceBuffer::from_host(
        std::vector<float>(table.data(), table.data() + table.max_positions() * table.rotary_dim()));

    const std::size_t R = std::size_t(max_rows_), f = sizeof(float), H = std::size_t(c.n_heads);
    const std::size_t d = std::size_t(m.dim), lat = std::size_t(c.latent_dim());
    int hidden = 0;
    for (int l = 0; l < m.n_layers; ++l) hidden = std::max(hidden, m.ffn_hidden(l));
    x_ = DeviceBuffer(R * d * f);
    n_ = DeviceBuffer(R * d * f);
    q_ = DeviceBuffer(R * H * c.qk_head_dim() * f);
    kv_a_ = DeviceBuffer(R * lat * f);
    kv_a16_ = DeviceBuffer(R * lat * 2);
    q_abs_ = DeviceBuffer(R * H * lat * f);
    o_lat_ = DeviceBuffer(R * H * c.kv_lora_rank * f);
    attn_ = DeviceBuffer(R * H * c.v_head_dim * f);
    attn_ref_ = DeviceBuffer(R * H * c.v_head_dim * f);
    o_ = DeviceBuffer(R * d * f);
    ffn_ = DeviceBuffer(R * d * f);
    a_ = DeviceBuffer(R * std::size_t(hidden) * f);
    b_ = DeviceBuffer(R * std::size_t(hidden) * f);
    // The naive path's per-request scratch: latent rows, decompressed K and V in pages of 16.
    naive_pages_ = (max_len_ + kNaivePage - 1) / kNaivePage;
    const std::size_t naive_tokens = std::size_t(naive_pages_ * kNaivePage);
    latent16_ = DeviceBuffer(std::size_t(max_len_) * lat * 2);
    latent32_ = DeviceBuffer(std::size_t(max_len_) * lat * f);
    k_naive_ = DeviceBuffer(naive_tokens * H * c.qk_head_dim() * f);
    v_naive_ = DeviceBuffer(naive_tokens * H * c.v_head_dim * f);
    KVKIT_CUDA_CHECK(cudaMemset(k_naive_.data(), 0, k_naive_.bytes()));
    KVKIT_CUDA_CHECK(cudaMemset(v_naive_.data(), 0, v_naive_.bytes()));
    std::vector<std::int32_t> identity(static_cast<std::size_t>(naive_pages_));
    std::iota(identity.begin(), identity.end(), 0);
    naive_table_ = DeviceBuffer::from_host(identity);
    // MoE buffers for the largest step.
    const int E = m.router.n_experts, K = m.router.top_k;
    dispatch_ = {E, K, 1, -1};
    const std::int64_t moe_rows = kvkit::moe_dispatch_max_rows(dispatch_, max_rows_);
    gate_logits_ = DeviceBuffer(R * std::size_t(E) * f);
    topk_ids_ = DeviceBuffer(R * std::size_t(K) * 4);
    topk_weights_ = DeviceBuffer(R * std::size_t(K) * f);
    expert_counts_ = DeviceBuffer(std::size_t(E) * 4);
    expert_offsets_ = DeviceBuffer(std::size_t(E + 1) * 4);
    sorted_pairs_ = DeviceBuffer(std::size_t(moe_rows) * 4);
    pair_rows_ = DeviceBuffer(R * std::size_t(K) * 4);
    dispatch_workspace_ = DeviceBuffer(kvkit::cuda::moe_dispatch_workspace_bytes(dispatch_, max_rows_));
    x_sorted_ = DeviceBuffer(std::size_t(moe_rows) * d * f);
    y_sorted_ = DeviceBuffer(std::size_t(moe_rows) * d * f);
    ea_ = DeviceBuffer(std::size_t(moe_rows) * std::size_t(m.moe_hidden) * f);
    eb_ = DeviceBuffer(std::size_t(moe_rows) * std::size_t(m.moe_hidden) * f);
    // Step inputs and outputs.
    tokens_ = DeviceBuffer(R * 4);
    positions_ = DeviceBuffer(R * 8);
    slots_ = DeviceBuffer(R * 8);
    table_ = DeviceBuffer(std::size_t(opt.requests * opt.blocks_per_seq()) * 4);
    seq_lens_ = DeviceBuffer(std::size_t(opt.requests) * 4);
    last_rows_ = DeviceBuffer(std::size_t(opt.requests) * 4);
    final_ = DeviceBuffer(std::size_t(opt.requests) * d * f);
    logits_ = DeviceBuffer(std::size_t(opt.requests) * std::size_t(m.vocab) * f);
  }
  ~GpuForward() { (void)cublasDestroy(cublas_); }
  GpuForward(const GpuForward&) = delete;
  GpuForward& operator=(const GpuForward&) = delete;

  const std::vector<std::int64_t>& expert_load() const { return expert_load_; }
  /// Largest |absorbed - naive| over every decode step's attention outputs (with `check`).
  double max_check_diff() const { return max_check_diff_; }

  void forward(const deepseek::Step& s, float* logits) {
    const kvkit::MlaConfig& c = m_.mla;
    const int H = c.n_heads, d = m_.dim, lat = c.latent_dim(), qk = c.qk_head_dim();
    const std::int64_t rows = s.rows;
    kvkit::check(rows <= max_rows_, kProgram, "step of ", rows, " rows; expected at most ", max_rows_);
    upload(tokens_, s.tokens);
    upload(positions_, s.positions);
    upload(slots_, s.slots);
    upload(table_, s.block_table);
    upload(seq_lens_, s.seq_lens);
    plan_step(s);

    examples::gpu::embed(f(x_), f(embedding_), tokens_.as<std::int32_t>(), rows, d);
    for (int l = 0; l < m_.n_layers; ++l) {
      const LayerWeights& L = layers_[std::size_t(l)];
      examples::gpu::rmsnorm(f(n_), f(x_), nullptr, f(L.attn_norm), rows, d);
      gemm(f(q_), f(L.wq), f(n_), rows, H * qk, d);
      gemm(f(kv_a_), f(L.wkv_a), f(n_), rows, lat, d);
      // The cache is bf16, and mla_compress reads and writes one dtype.
      to_bf16_kernel<<<examples::gpu::grid_for(rows * lat), examples::gpu::kThreads>>>(
          kv_a16_.as<std::uint16_t>(), f(kv_a_), rows * lat);
      KVKIT_CUDA_CHECK(cudaGetLastError());
      // kvkit: RMSNorm c_kv + RoPE k_pe + append to the latent cache, one kernel.
      kvkit::MlaCompressArgs ca;
      ca.kv_a = kv_a16_.data();
      ca.kv_a_stride_token = lat;
      ca.norm_weight = f(L.kv_norm);
      ca.positions = positions_.as<std::int64_t>();
      ca.slot_mapping = slots_.as<std::int64_t>();
      ca.num_tokens = rows;
      ca.cache = caches_[std::size_t(l)].data();
      ca.dtype = kvkit::DType::kBFloat16;
      ca.rope_style = c.rope.style;
      ca.cos_sin_cache = f(rope_);
      ca.cache_positions = max_len_;
      kvkit::cuda::mla_compress(layout_, ca);
      // kvkit: rotate q_pe (the last 64 dims of each head) with the same table.
      kvkit::RopeParams rq;
      rq.q = f(q_) + c.qk_nope_head_dim;
      rq.q_token_stride = std::int64_t(H) * qk;
      rq.q_head_stride = qk;
      rq.num_q_heads = H;
      rq.positions = positions_.as<std::int64_t>();
      rq.num_tokens = rows;
      rq.head_dim = rq.rotary_dim = c.qk_rope_head_dim;
      rq.style = c.rope.style;
      rq.dtype = kvkit::DType::kFloat32;
      rq.cos_sin_cache = f(rope_);
      rq.cache_positions = max_len_;
      kvkit::cuda::apply_rope(rq);

      if (s.prefill) {
        naive(l, s, f(attn_));
      } else {
        absorbed(l, s, f(attn_));
        if (check_) {
          naive(l, s, f(attn_ref_));
          const std::size_t n = std::size_t(rows) * H * c.v_head_dim;
          std::vector<float> got(n), want(n);
          attn_.copy_to_host(got.data(), n * sizeof(float));
          attn_ref_.copy_to_host(want.data(), n * sizeof(float));
          for (std::size_t i = 0; i < n; ++i)
            max_check_diff_ = std::max(max_check_diff_, double(std::fabs(got[i] - want[i])));
        }
      }
      gemm(f(o_), f(L.wo), f(attn_), rows, d, H * c.v_head_dim);
      examples::gpu::add(f(x_), f(o_), rows * d);
      ffn(l, rows);
    }
    // Logits of each request's last row.
    std::vector<std::int32_t> last_rows;
    std::int64_t end = 0;
    for (int b = 0; b < s.requests; ++b) last_rows.push_back(std::int32_t((end += s.count[std::size_t(b)]) - 1));
    upload(last_rows_, last_rows);
    examples::gpu::rmsnorm(f(final_), f(x_), last_rows_.as<std::int32_t>(), f(final_norm_), s.requests, d);
    gemm(f(logits_), f(classifier_), f(final_), s.requests, m_.vocab, d);
    logits_.copy_to_host(logits, std::size_t(s.requests) * m_.vocab * sizeof(float));
  }

 private:
  static constexpr int kNaivePage = 16;
  struct LayerWeights {
    DeviceBuffer attn_norm, wq, wkv_a, kv_norm, w_uk, w_uv, wo, ffn_norm, w1, w2, w3, gate, e1, e2, e3;
  };
  struct Attention {
    kvkit::PagedDecodeParams params;
    kvkit::cuda::DecodePlan plan;
  };

  static float* f(const DeviceBuffer& b) { return b.as<float>(); }
  template <class T>
  static void upload(DeviceBuffer& dst, const std::vector<T>& src) {
    if (!src.empty()) dst.copy_from_host(src.data(), src.size() * sizeof(T));
  }
  void gemm(float* y, const float* w, const float* x, std::int64_t rows, int out, int in) {
    examples::gpu::gemm(cublas_, y, w, x, rows, out, in, kProgram);
  }
  // One GEMM per head (column-major, as cuBLAS sees it): C_h = op(A_h) B_h,
  // A_h = A + h * stride_a, B_h = B + h * stride_b, C_h = C + h * stride_c.
  void per_head(cublasOperation_t op_a, int m, int n, int k, const float* a, int lda, long long stride_a,
                const float* b, int ldb, long long stride_b, float* c, int ldc, long long stride_c) {
    if (n == 0) return;
    const float one = 1.0f, zero = 0.0f;
    DS_CUBLAS_CHECK(cublasSgemmStridedBatched(cublas_, op_a, CUBLAS_OP_N, m, n, k, &one, a, lda, stride_a, b, ldb,
                                              stride_b, &zero, c, ldc, stride_c, m_.mla.n_heads));
  }
  void grow_workspace(std::size_t bytes) {
    if (bytes > workspace_.bytes()) workspace_ = DeviceBuffer(bytes);
  }

  // Plans made once per step on the host (the lengths are the step's), used
  // by every layer: the absorbed call over all requests, and one naive call
  // per request (prefill, or decode with --check).
  void plan_step(const deepseek::Step& s) {
    const kvkit::MlaConfig& c = m_.mla;
    const int H = c.n_heads, lat = c.latent_dim(), rank = c.kv_lora_rank, qk = c.qk_head_dim();
    naive_.clear();
    if (!s.prefill) {
      kvkit::PagedDecodeParams& p = absorbed_params_;
      p = kvkit::mla_decode_params(c, layout_, caches_[0].data(), kvkit::DType::kBFloat16);
      p.q = f(q_abs_);
      p.q_dtype = kvkit::DType::kFloat32;
      p.q_stride_head = lat;
      p.q_stride_token = std::int64_t(H) * lat;
      p.q_len = 1;
      p.page_table = {table_.as<std::int32_t>(), seq_lens_.as<std::int32_t>(), s.requests, s.max_blocks, s.max_blocks};
      p.o = f(o_lat_);
      p.o_stride_head = rank;
      p.o_stride_token = std::int64_t(H) * rank;
      absorbed_plan_ = kvkit::cuda::plan_mla_decode(p, s.seq_lens.data(), num_sms_);
      grow_workspace(absorbed_plan_.workspace_bytes);
    }
    if (!s.prefill && !check_) return;
    const auto kv_layout = kvkit::PagedKVLayout::nhd(naive_pages_, kNaivePage, H, qk);
    std::int64_t r0 = 0;
    for (int b = 0; b < s.requests; ++b) {
      Attention call;
      kvkit::PagedDecodeParams& p = call.params;
      p.q = f(q_) + r0 * H * qk;
      p.q_stride_head = qk;
      p.q_stride_token = std::int64_t(H) * qk;
      p.k_cache = k_naive_.data();
      p.v_cache = v_naive_.data();
      p.layout = kv_layout;
      p.v_head_dim = c.v_head_dim;
      p.page_table = {naive_table_.as<std::int32_t>(), seq_lens_.as<std::int32_t>() + b, 1, naive_pages_, naive_pages_};
      p.q_len = int(s.count[std::size_t(b)]);
      p.num_q_heads = H;
      p.sm_scale = c.softmax_scale();
      p.o_stride_head = c.v_head_dim;
      p.o_stride_token = std::int64_t(H) * c.v_head_dim;
      p.o = nullptr;  // set per call (attn_ or attn_ref_), offset by r0
      call.plan = kvkit::cuda::plan_decode(p, &s.seq_lens[std::size_t(b)], num_sms_);
      grow_workspace(call.plan.workspace_bytes);
      naive_.push_back(call);
      r0 += s.count[std::size_t(b)];
    }
  }

  // Naive path, request by request: gather its cached latent rows, decompress
  // K = [W_UK c_kv | k_pe] and V = W_UV c_kv per head, attend (run_decode).
  void naive(int l, const deepseek::Step& s, float* out) {
    const kvkit::MlaConfig& c = m_.mla;
    const LayerWeights& L = layers_[std::size_t(l)];
    const int H = c.n_heads, rank = c.kv_lora_rank, lat = c.latent_dim(), qk = c.qk_head_dim(), nope = c.qk_nope_head_dim;
    std::int64_t r0 = 0;
    for (int b = 0; b < s.requests; ++b) {
      const int len = s.seq_lens[std::size_t(b)];
      kvkit::GatherKVArgs g;
      g.k_cache = caches_[std::size_t(l)].data();
      g.pages = table_.as<std::int32_t>() + std::int64_t(b) * s.max_blocks;
      g.num_tokens = len;
      g.key_out = latent16_.data();
      g.out_stride_token = lat;
      g.out_stride_head = lat;
      g.dtype = kvkit::DType::kBFloat16;
      kvkit::cuda::gather_kv(layout_.as_paged(), g, nullptr);
      from_bf16_kernel<<<examples::gpu::grid_for(std::int64_t(len) * lat), examples::gpu::kThreads>>>(
          f(latent32_), latent16_.as<std::uint16_t>(), std::int64_t(len) * lat);
      KVKIT_CUDA_CHECK(cudaGetLastError());
      // K_nope[t, h, :] = W_UK[h] c_kv[t]; V[t, h, :] = W_UV[h] c_kv[t] (W row-major [.., rank]).
      per_head(CUBLAS_OP_T, nope, len, rank, f(L.w_uk), rank, (long long)nope * rank, f(latent32_), lat, 0,
               f(k_naive_), H * qk, qk);
      per_head(CUBLAS_OP_T, c.v_head_dim, len, rank, f(L.w_uv), rank, (long long)c.v_head_dim * rank, f(latent32_),
               lat, 0, f(v_naive_), H * c.v_head_dim, c.v_head_dim);
      broadcast_kpe_kernel<<<examples::gpu::grid_for(std::int64_t(len) * H * c.qk_rope_head_dim),
                             examples::gpu::kThreads>>>(f(k_naive_), f(latent32_), len, H, qk, nope, rank, lat);
      KVKIT_CUDA_CHECK(cudaGetLastError());
      Attention& call = naive_[std::size_t(b)];
      call.params.o = out + r0 * H * c.v_head_dim;
      kvkit::cuda::run_decode(call.params, call.plan, workspace_.data(), workspace_.bytes());
      r0 += s.count[std::size_t(b)];
    }
  }

  // Absorbed path: q = [W_UKᵀ q_nope | q_pe] per head, one attention call over
  // the latent cache of every request, then o = W_UV o_lat per head.
  void absorbed(int l, const deepseek::Step& s, float* out) {
    const kvkit::MlaConfig& c = m_.mla;
    const LayerWeights& L = layers_[std::size_t(l)];
    const int H = c.n_heads, rank = c.kv_lora_rank, lat = c.latent_dim(), qk = c.qk_head_dim(), nope = c.qk_nope_head_dim;
    const int rows = int(s.rows);
    // q_lat[r, h, :] = W_UK[h]ᵀ q_nope[r, h, :]
    per_head(CUBLAS_OP_N, rank, rows, nope, f(L.w_uk), rank, (long long)nope * rank, f(q_), H * qk, qk, f(q_abs_),
             H * lat, lat);
    // q_abs[r, h, 512:576] = q_pe[r, h, :]
    KVKIT_CUDA_CHECK(cudaMemcpy2DAsync(f(q_abs_) + rank, std::size_t(lat) * sizeof(float), f(q_) + nope,
                                       std::size_t(qk) * sizeof(float), std::size_t(c.qk_rope_head_dim) * sizeof(float),
                                       std::size_t(rows) * H, cudaMemcpyDeviceToDevice, nullptr));
    absorbed_params_.k_cache = absorbed_params_.v_cache = caches_[std::size_t(l)].data();
    kvkit::cuda::run_mla_decode(absorbed_params_, absorbed_plan_, workspace_.data(), workspace_.bytes());
    // out[r, h, :] = W_UV[h] o_lat[r, h, :]
    per_head(CUBLAS_OP_T, c.v_head_dim, rows, rank, f(L.w_uv), rank, (long long)c.v_head_dim * rank, f(o_lat_),
             H * rank, rank, out, H * c.v_head_dim, c.v_head_dim);
  }

  // x += FFN(RMSNorm(x)): dense in layer 0; shared expert + routed experts after.
  void ffn(int l, std::int64_t rows) {
    const LayerWeights& L = layers_[std::size_t(l)];
    const int d = m_.dim, hidden = m_.ffn_hidden(l);
    examples::gpu::rmsnorm(f(n_), f(x_), nullptr, f(L.ffn_norm), rows, d);
    gemm(f(a_), f(L.w1), f(n_), rows, hidden, d);
    gemm(f(b_), f(L.w3), f(n_), rows, hidden, d);
    examples::gpu::swiglu(f(a_), f(b_), rows * hidden);
    gemm(f(ffn_), f(L.w2), f(a_), rows, d, hidden);
    if (l > 0) {
      const int E = m_.router.n_experts, K = m_.router.top_k, mh = m_.moe_hidden;
      gemm(f(gate_logits_), f(L.gate), f(n_), rows, E, d);
      kvkit::cuda::RouterParams rp;
      rp.logits = gate_logits_.data();
      rp.logits_dtype = kvkit::DType::kFloat32;
      rp.num_tokens = rows;
      rp.logits_row_stride = E;
      rp.topk_ids = topk_ids_.as<std::int32_t>();
      rp.topk_weights = f(topk_weights_);
      kvkit::cuda::moe_route(m_.router, rp, nullptr);
      kvkit::cuda::DispatchParams dp;
      dp.topk_ids = topk_ids_.as<std::int32_t>();
      dp.num_tokens = rows;
      dp.expert_counts = expert_counts_.as<std::int32_t>();
      dp.expert_offsets = expert_offsets_.as<std::int32_t>();
      dp.sorted_pairs = sorted_pairs_.as<std::int32_t>();
      dp.pair_rows = pair_rows_.as<std::int32_t>();
      dp.workspace = dispatch_workspace_.data();
      dp.workspace_bytes = dispatch_workspace_.bytes();
      kvkit::cuda::moe_dispatch_plan(dispatch_, dp, nullptr);
      const std::int64_t moe_rows = kvkit::moe_dispatch_max_rows(dispatch_, rows);
      kvkit::cuda::GatherParams gp;
      gp.x = n_.data();
      gp.x_row_stride = d;
      gp.x_sorted = x_sorted_.data();
      gp.x_sorted_row_stride = d;
      gp.dtype = kvkit::DType::kFloat32;
      gp.num_tokens = rows;
      gp.hidden = d;
      gp.sorted_pairs = sorted_pairs_.as<std::int32_t>();
      gp.max_rows = moe_rows;
      gp.top_k = K;
      kvkit::cuda::moe_gather(gp, nullptr);
      // The experts, each on its contiguous segment of x_sorted.
      std::vector<std::int32_t> offsets(std::size_t(E + 1));
      expert_offsets_.copy_to_host(offsets.data(), offsets.size() * sizeof(std::int32_t));
      for (int e = 0; e < E; ++e) {
        const std::int64_t first = offsets[std::size_t(e)], n = offsets[std::size_t(e + 1)] - first;
        expert_load_[std::size_t(e)] += n;
        if (n == 0) continue;
        const std::int64_t w = std::int64_t(e) * mh * d;
        gemm(f(ea_), f(L.e1) + w, f(x_sorted_) + first * d, n, mh, d);
        gemm(f(eb_), f(L.e3) + w, f(x_sorted_) + first * d, n, mh, d);
        examples::gpu::swiglu(f(ea_), f(eb_), n * mh);
        gemm(f(y_sorted_) + first * d, f(L.e2) + w, f(ea_), n, d, mh);
      }
      // ffn = shared expert + Σ_k w[t,k] y[row(t,k)]
      kvkit::cuda::CombineParams cp;
      cp.y_sorted = y_sorted_.data();
      cp.y_row_stride = d;
      cp.pair_rows = pair_rows_.as<std::int32_t>();
      cp.topk_weights = f(topk_weights_);
      cp.shared = ffn_.data();
      cp.shared_row_stride = d;
      cp.out = ffn_.data();
      cp.out_row_stride = d;
      cp.dtype = kvkit::DType::kFloat32;
      cp.num_tokens = rows;
      cp.hidden = d;
      cp.top_k = K;
      kvkit::cuda::moe_combine(cp, nullptr);
    }
    examples::gpu::add(f(x_), f(ffn_), rows * d);
  }

  const deepseek::Model& m_;
  bool check_;
  kvkit::LatentKVLayout layout_;
  std::int64_t max_rows_, max_len_, naive_pages_ = 0;
  int num_sms_ = 0;
  cublasHandle_t cublas_ = nullptr;
  kvkit::DispatchConfig dispatch_{};
  std::vector<std::int64_t> expert_load_;
  double max_check_diff_ = 0.0;

  DeviceBuffer embedding_, classifier_, final_norm_, rope_;
  std::vector<LayerWeights> layers_;
  std::vector<DeviceBuffer> caches_;  // one paged bf16 latent cache per layer
  DeviceBuffer x_, n_, q_, kv_a_, kv_a16_, q_abs_, o_lat_, attn_, attn_ref_, o_, ffn_, a_, b_;
  DeviceBuffer latent16_, latent32_, k_naive_, v_naive_, naive_table_;
  DeviceBuffer gate_logits_, topk_ids_, topk_weights_, expert_counts_, expert_offsets_, sorted_pairs_, pair_rows_,
      dispatch_workspace_, x_sorted_, y_sorted_, ea_, eb_;
  DeviceBuffer tokens_, positions_, slots_, table_, seq_lens_, last_rows_, final_, logits_, workspace_;
  kvkit::PagedDecodeParams absorbed_params_;
  kvkit::cuda::MlaDecodePlan absorbed_plan_;
  std::vector<Attention> naive_;
};

// --check: the GPU drives the loop (its greedy tokens); the CPU forward pass
// runs the same steps and every step's logits are compared.
struct CheckedForward {
  GpuForward& gpu;
  deepseek::CpuForward& cpu;
  int vocab;
  double max_logit_diff = 0.0;
  int rows = 0, same_argmax = 0;

  void forward(const deepseek::Step& s, float* logits) {
    gpu.forward(s, logits);
    std::vector<float> reference(std::size_t(s.requests) * vocab);
    cpu.forward(s, reference.data());
    for (int b = 0; b < s.requests; ++b) {
      const float* g = logits + std::size_t(b) * vocab;
      const float* c = reference.data() + std::size_t(b) * vocab;
      for (int i = 0; i < vocab; ++i) max_logit_diff = std::max(max_logit_diff, double(std::fabs(g[i] - c[i])));
      same_argmax += std::max_element(g, g + vocab) - g == std::max_element(c, c + vocab) - c;
      ++rows;
    }
  }
  const std::vector<std::int64_t>& expert_load() const { return gpu.expert_load(); }
};

}  // namespace

int main(int argc, char** argv) try {
  const deepseek::Options opt = deepseek::parse_options(argc, argv);
  if (kvkit::cuda::device_count() == 0) {
    std::printf("%s: SKIPPED: no CUDA device is present\n", kProgram);
    return 77;
  }
  const deepseek::Model model = deepseek::make_model(opt.seed);
  GpuForward gpu(model, opt, opt.check);
  if (!opt.check) {
    deepseek::serve(opt, model, gpu, kProgram);
    return 0;
  }
  deepseek::CpuForward cpu(model, opt, /*check=*/false);
  CheckedForward checked{gpu, cpu, model.vocab};
  deepseek::serve(opt, model, checked, kProgram);
  const bool attention_ok = gpu.max_check_diff() <= kAttentionTolerance;
  const bool logits_ok = checked.max_logit_diff <= kLogitTolerance;
  std::printf("check: max |absorbed - naive| attention output on the GPU = %.3g (%s, tolerance %.0e)\n",
              gpu.max_check_diff(), attention_ok ? "ok" : "FAILED", kAttentionTolerance);
  std::printf("check: max |GPU - CPU| logits = %.3g over %d rows (%s, tolerance %.0e); same greedy token in %d of %d\n",
              checked.max_logit_diff, checked.rows, logits_ok ? "ok" : "FAILED", kLogitTolerance, checked.same_argmax,
              checked.rows);
  return attention_ok && logits_ok ? 0 : 1;
} catch (const kvkit::Error& e) {
  std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
  return 1;
}
