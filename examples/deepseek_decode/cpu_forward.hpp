#pragma once
// The CPU forward pass of deepseek_decode (the Forward of deepseek_model.hpp):
// the model itself in the CPU build, and the reference the CUDA build's
// --check compares against. Plain loops for the GEMMs; kvkit for the rest:
//   - mla_compress writes [RMSNorm(c_kv) | RoPE(k_pe)] per token into the
//     paged bf16 latent cache; apply_rope rotates q_pe;
//   - prefill attends with the naive path: decompress K_nope = W_UK c_kv and
//     V = W_UV c_kv per head from the cached c_kv, then standard paged
//     attention over them (paged_decode_attention);
//   - decode attends with the absorbed path: q_lat = W_UKᵀ q_nope, one MQA-like
//     attention over the 576-wide latent rows (mla_decode_params +
//     mla_decode_attention), o = W_UV o_lat;
//   - moe_route (DeepSeek-V2 group-limited softmax), moe_dispatch_plan,
//     moe_gather and moe_combine move tokens to experts and back.
// With `check`, every decode step also runs the naive path and keeps the
// largest difference between the two attention outputs.

#include <kvkit/kvkit.hpp>
#include <kvkit/ops/mla_compress.hpp>
#include <kvkit/ops/mla_decode.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "../common/model_math.hpp"
#include "deepseek_model.hpp"

namespace deepseek {

// SwiGLU FFN with weights w1/w3 [hidden, dim] and w2 [dim, hidden]: out = W2 (silu(W1 x) * W3 x).
inline void swiglu(const float* w1, const float* w2, const float* w3, int dim, int hidden, const float* x,
                   float* out) {
  std::vector<float> a(static_cast<std::size_t>(hidden)), b(a.size());
  examples::matvec(a.data(), w1, x, hidden, dim);
  examples::matvec(b.data(), w3, x, hidden, dim);
  for (int i = 0; i < hidden; ++i) a[i] = examples::silu(a[i]) * b[i];
  examples::matvec(out, w2, a.data(), dim, hidden);
}

class CpuForward {
 public:
  CpuForward(const Model& m, const Options& opt, bool check)
      : m_(m),
        check_(check),
        layout_(kvkit::LatentKVLayout::dense(opt.num_blocks(), opt.block_size, m.mla.kv_lora_rank,
                                             m.mla.qk_rope_head_dim)),
        cache_(std::size_t(m.n_layers), std::vector<kvkit::bfloat16>(std::size_t(opt.num_blocks() * layout_.stride_page))),
        rope_(m.mla.rope, opt.max_len()),
        expert_load_(std::size_t(m.router.n_experts), 0) {}

  const std::vector<std::int64_t>& expert_load() const { return expert_load_; }
  /// Largest |absorbed - naive| over every decode step's attention outputs (with `check`).
  double max_check_diff() const { return max_check_diff_; }

  void forward(const Step& s, float* logits) {
    const kvkit::MlaConfig& c = m_.mla;
    const int H = c.n_heads, d = m_.dim, lat = c.latent_dim(), qk = c.qk_head_dim();
    const std::int64_t rows = s.rows;
    std::vector<float> x(std::size_t(rows) * d), n(static_cast<std::size_t>(d));
    for (std::int64_t r = 0; r < rows; ++r)
      std::memcpy(&x[std::size_t(r) * d], &m_.embedding[std::size_t(s.tokens[std::size_t(r)]) * d], sizeof(float) * d);

    for (int l = 0; l < m_.n_layers; ++l) {
      const Model::Layer& L = m_.layers[std::size_t(l)];
      std::vector<float> q(std::size_t(rows) * H * qk), kv_a(std::size_t(rows) * lat);
      for (std::int64_t r = 0; r < rows; ++r) {
        examples::rmsnorm(n.data(), &x[std::size_t(r) * d], L.attn_norm.data(), d);
        examples::matvec(&q[std::size_t(r) * H * qk], L.wq.data(), n.data(), H * qk, d);
        examples::matvec(&kv_a[std::size_t(r) * lat], L.wkv_a.data(), n.data(), lat, d);
      }
      // The cache is bf16, and mla_compress reads and writes one dtype.
      const std::vector<kvkit::bfloat16> kv_a16(kv_a.begin(), kv_a.end());
      // kvkit: RMSNorm c_kv + RoPE k_pe + append to the latent cache, one pass.
      kvkit::MlaCompressArgs ca;
      ca.kv_a = kv_a16.data();
      ca.kv_a_stride_token = lat;
      ca.norm_weight = L.kv_norm.data();
      ca.positions = s.positions.data();
      ca.slot_mapping = s.slots.data();
      ca.num_tokens = rows;
      ca.cache = cache_[std::size_t(l)].data();
      ca.dtype = kvkit::DType::kBFloat16;
      ca.rope_style = c.rope.style;
      ca.cos_sin_cache = rope_.data();
      ca.cache_positions = rope_.max_positions();
      ca.cache_rotary_dim = rope_.rotary_dim();
      kvkit::mla_compress(layout_, ca);
      // kvkit: rotate q_pe (the last 64 dims of each head) with the same decoupled RoPE.
      kvkit::RopeParams rq;
      rq.q = q.data() + c.qk_nope_head_dim;
      rq.q_token_stride = std::int64_t(H) * qk;
      rq.q_head_stride = qk;
      rq.num_q_heads = H;
      rq.positions = s.positions.data();
      rq.num_tokens = rows;
      rq.head_dim = rq.rotary_dim = c.qk_rope_head_dim;
      rq.style = c.rope.style;
      rope_.attach(rq);
      kvkit::apply_rope(rq);

      std::vector<float> attn;
      if (s.prefill) {
        naive(l, s, q, attn);
      } else {
        absorbed(l, s, q, attn);
        if (check_) {
          std::vector<float> reference;
          naive(l, s, q, reference);
          for (std::size_t i = 0; i < attn.size(); ++i)
            max_check_diff_ = std::max(max_check_diff_, double(std::fabs(attn[i] - reference[i])));
        }
      }
      std::vector<float> o(static_cast<std::size_t>(d));
      for (std::int64_t r = 0; r < rows; ++r) {
        examples::matvec(o.data(), L.wo.data(), &attn[std::size_t(r) * H * c.v_head_dim], d, H * c.v_head_dim);
        for (int i = 0; i < d; ++i) x[std::size_t(r) * d + i] += o[i];
      }
      ffn(l, rows, x);
    }
    // Logits of each request's last row.
    for (std::int64_t r = 0, b = 0; b < s.requests; ++b) {
      r += s.count[std::size_t(b)];
      examples::rmsnorm(n.data(), &x[std::size_t(r - 1) * d], m_.final_norm.data(), d);
      examples::matvec(logits + b * m_.vocab, m_.classifier.data(), n.data(), m_.vocab, d);
    }
  }

 private:
  // Naive path: decompress K = [W_UK c_kv | k_pe] and V = W_UV c_kv per head for
  // every cached token of each request, then standard paged attention over them.
  void naive(int l, const Step& s, const std::vector<float>& q, std::vector<float>& out) const {
    const kvkit::MlaConfig& c = m_.mla;
    const Model::Layer& L = m_.layers[std::size_t(l)];
    const int H = c.n_heads, rank = c.kv_lora_rank, kd = c.qk_head_dim();
    out.assign(std::size_t(s.rows) * H * c.v_head_dim, 0.0f);
    std::vector<float> row(static_cast<std::size_t>(c.latent_dim()));
    std::int64_t r0 = 0;
    for (int b = 0; b < s.requests; ++b) {
      const int len = s.seq_lens[std::size_t(b)], page = 16;
      const std::int64_t pages = (len + page - 1) / page;
      const auto kv_layout = kvkit::PagedKVLayout::nhd(pages, page, H, kd);
      std::vector<float> k(std::size_t(pages * kv_layout.page_elements()), 0.0f), v(k.size(), 0.0f);
      for (int t = 0; t < len; ++t) {
        const kvkit::bfloat16* cached = &cache_[std::size_t(l)][std::size_t(layout_.slot_offset(s.slot_of(b, t)))];
        for (std::size_t i = 0; i < row.size(); ++i) row[i] = float(cached[i]);
        for (int h = 0; h < H; ++h) {
          float* kr = &k[std::size_t(kv_layout.slot_offset(t, h))];
          float* vr = &v[std::size_t(kv_layout.slot_offset(t, h))];
          examples::matvec(kr, &L.w_uk[std::size_t(h) * c.qk_nope_head_dim * rank], row.data(), c.qk_nope_head_dim, rank);
          std::memcpy(kr + c.qk_nope_head_dim, row.data() + rank, sizeof(float) * c.qk_rope_head_dim);
          examples::matvec(vr, &L.w_uv[std::size_t(h) * c.v_head_dim * rank], row.data(), c.v_head_dim, rank);
        }
      }
      std::vector<std::int32_t> pt(static_cast<std::size_t>(pages));
      std::iota(pt.begin(), pt.end(), 0);
      kvkit::PagedDecodeParams p;
      p.q = &q[std::size_t(r0) * H * kd];
      p.q_stride_head = kd;
      p.q_stride_token = std::int64_t(H) * kd;
      p.k_cache = k.data();
      p.v_cache = v.data();
      p.layout = kv_layout;
      p.v_head_dim = c.v_head_dim;
      const std::int32_t len32 = len;
      p.page_table = {pt.data(), &len32, 1, pages, pages};
      p.q_len = int(s.count[std::size_t(b)]);
      p.num_q_heads = H;
      p.sm_scale = c.softmax_scale();
      p.o = &out[std::size_t(r0) * H * c.v_head_dim];
      p.o_stride_head = c.v_head_dim;
      p.o_stride_token = std::int64_t(H) * c.v_head_dim;
      kvkit::paged_decode_attention(p);
      r0 += s.count[std::size_t(b)];
    }
  }

  // Absorbed path over the latent cache: q = [W_UKᵀ q_nope | q_pe] per head.
  void absorbed(int l, const Step& s, const std::vector<float>& q, std::vector<float>& out) const {
    const kvkit::MlaConfig& c = m_.mla;
    const Model::Layer& L = m_.layers[std::size_t(l)];
    const int H = c.n_heads, rank = c.kv_lora_rank, lat = c.latent_dim(), qk = c.qk_head_dim();
    const std::int64_t rows = s.rows;
    std::vector<float> q_nope(std::size_t(rows) * H * c.qk_nope_head_dim), q_abs(std::size_t(rows) * H * lat);
    for (std::int64_t r = 0; r < rows; ++r)
      for (int h = 0; h < H; ++h) {
        const float* src = &q[(std::size_t(r) * H + h) * qk];
        std::memcpy(&q_nope[(std::size_t(r) * H + h) * c.qk_nope_head_dim], src, sizeof(float) * c.qk_nope_head_dim);
        std::memcpy(&q_abs[(std::size_t(r) * H + h) * lat + rank], src + c.qk_nope_head_dim,
                    sizeof(float) * c.qk_rope_head_dim);
      }
    kvkit::mla_absorb_query(c, q_nope.data(), rows, L.w_uk.data(), q_abs.data(), std::int64_t(H) * lat, lat);
    std::vector<float> o_lat(std::size_t(rows) * H * rank);
    kvkit::PagedDecodeParams p =
        kvkit::mla_decode_params(c, layout_, cache_[std::size_t(l)].data(), kvkit::DType::kBFloat16);
    p.q = q_abs.data();
    p.q_stride_head = lat;
    p.q_stride_token = std::int64_t(H) * lat;
    p.page_table = {s.block_table.data(), s.seq_lens.data(), s.requests, s.max_blocks, s.max_blocks};
    p.o = o_lat.data();
    p.o_stride_head = rank;
    p.o_stride_token = std::int64_t(H) * rank;
    kvkit::mla_decode_attention(p);
    out.resize(std::size_t(rows) * H * c.v_head_dim);
    kvkit::mla_project_output(c, o_lat.data(), std::int64_t(H) * rank, rank, rows, L.w_uv.data(), out.data());
  }

  // x += FFN(RMSNorm(x)): dense in layer 0; shared expert + routed experts after.
  void ffn(int l, std::int64_t rows, std::vector<float>& x) {
    const Model::Layer& L = m_.layers[std::size_t(l)];
    const int d = m_.dim;
    std::vector<float> xn(std::size_t(rows) * d), out(std::size_t(rows) * d);
    for (std::int64_t r = 0; r < rows; ++r)
      examples::rmsnorm(&xn[std::size_t(r) * d], &x[std::size_t(r) * d], L.ffn_norm.data(), d);
    for (std::int64_t r = 0; r < rows; ++r)
      swiglu(L.w1.data(), L.w2.data(), L.w3.data(), d, m_.ffn_hidden(l), &xn[std::size_t(r) * d], &out[std::size_t(r) * d]);
    if (l > 0) {
      const int E = m_.router.n_experts, K = m_.router.top_k;
      std::vector<float> logits(std::size_t(rows) * E), weights(std::size_t(rows) * K);
      std::vector<std::int32_t> ids(std::size_t(rows) * K);
      for (std::int64_t r = 0; r < rows; ++r)
        examples::matvec(&logits[std::size_t(r) * E], L.gate.data(), &xn[std::size_t(r) * d], E, d);
      kvkit::moe_route(m_.router, kvkit::TensorView(logits.data(), kvkit::DType::kFloat32, {rows, E}),
                       kvkit::TensorView(ids.data(), kvkit::DType::kInt32, {rows, K}),
                       kvkit::TensorView(weights.data(), kvkit::DType::kFloat32, {rows, K}));
      const kvkit::TensorView id_view(ids.data(), kvkit::DType::kInt32, {rows, K});
      const auto load = kvkit::moe_expert_load(id_view, E);
      for (int e = 0; e < E; ++e) expert_load_[std::size_t(e)] += load[std::size_t(e)];
      kvkit::DispatchConfig dc{E, K, 1, -1};
      const std::int64_t max_rows = kvkit::moe_dispatch_max_rows(dc, rows);
      std::vector<std::int32_t> counts(static_cast<std::size_t>(E)), offsets(std::size_t(E + 1)),
          sorted(static_cast<std::size_t>(max_rows)), pair_rows(std::size_t(rows * K));
      kvkit::moe_dispatch_plan(dc, id_view,
                               {kvkit::TensorView(counts.data(), kvkit::DType::kInt32, {E}),
                                kvkit::TensorView(offsets.data(), kvkit::DType::kInt32, {E + 1}),
                                kvkit::TensorView(sorted.data(), kvkit::DType::kInt32, {max_rows}),
                                kvkit::TensorView(pair_rows.data(), kvkit::DType::kInt32, {rows * K}),
                                kvkit::TensorView()});
      std::vector<float> x_sorted(std::size_t(max_rows) * d), y_sorted(x_sorted.size(), 0.0f);
      kvkit::moe_gather(kvkit::TensorView(xn.data(), kvkit::DType::kFloat32, {rows, d}),
                        kvkit::TensorView(sorted.data(), kvkit::DType::kInt32, {max_rows}), K,
                        kvkit::TensorView(x_sorted.data(), kvkit::DType::kFloat32, {max_rows, d}));
      // The experts: each runs on its contiguous segment (an engine: one grouped GEMM).
      const std::size_t mh = std::size_t(m_.moe_hidden);
      for (int e = 0; e < E; ++e)
        for (std::int32_t row = offsets[std::size_t(e)]; row < offsets[std::size_t(e + 1)]; ++row)
          swiglu(&L.e1[std::size_t(e) * mh * d], &L.e2[std::size_t(e) * d * mh], &L.e3[std::size_t(e) * mh * d], d,
                 m_.moe_hidden, &x_sorted[std::size_t(row) * d], &y_sorted[std::size_t(row) * d]);
      // out = shared expert + Σ_k w[t,k] y[row(t,k)]
      kvkit::moe_combine(kvkit::TensorView(y_sorted.data(), kvkit::DType::kFloat32, {max_rows, d}),
                         kvkit::TensorView(pair_rows.data(), kvkit::DType::kInt32, {rows * K}),
                         kvkit::TensorView(weights.data(), kvkit::DType::kFloat32, {rows, K}),
                         kvkit::TensorView(out.data(), kvkit::DType::kFloat32, {rows, d}),
                         kvkit::TensorView(out.data(), kvkit::DType::kFloat32, {rows, d}));
    }
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += out[i];
  }

  const Model& m_;
  bool check_;
  kvkit::LatentKVLayout layout_;
  std::vector<std::vector<kvkit::bfloat16>> cache_;  // one paged bf16 latent cache per layer
  kvkit::RopeCache rope_;
  std::vector<std::int64_t> expert_load_;
  double max_check_diff_ = 0.0;
};

}  // namespace deepseek
