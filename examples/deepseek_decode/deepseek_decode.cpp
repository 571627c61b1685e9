// deepseek_decode: a scaled-down DeepSeek-V2-Lite-style model (MLA attention
// with decoupled RoPE, a dense first layer, then MoE layers with shared and
// group-limited routed experts) decoding a few requests with random weights.
//
// What kvkit does here:
//   - KVCacheManager hands out the slots of the paged latent cache;
//   - mla_compress writes [RMSNorm(c_kv) | RoPE(k_pe)] per token into it;
//   - prefill attends with the naive path: decompress K_nope and V per head
//     from the cached c_kv, then standard decode attention over them;
//   - decode attends with the absorbed path: q_lat = W_UKᵀ q_nope, one MQA-like
//     attention over the 576-style latent rows (mla_decode_params), o = W_UV o_lat;
//   - moe_route (DeepSeek-V2 group-limited softmax), moe_dispatch_plan,
//     moe_gather and moe_combine move tokens to experts and back.
// `--check` also runs the naive path at every decode step and reports the
// largest difference between the two attention outputs.

#include <kvkit/kvkit.hpp>
#include <kvkit/ops/mla_compress.hpp>
#include <kvkit/ops/mla_decode.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/model_math.hpp"

namespace {

using examples::matvec;
using examples::rmsnorm;

struct Model {
  int dim = 256, n_layers = 3, vocab = 211, dense_hidden = 512;
  kvkit::MlaConfig mla;  // set in main: 8 heads, kv_lora 64, nope 32, rope 16, v 32
  kvkit::RouterConfig router;
  int moe_hidden = 96, n_shared_experts = 1;
  std::vector<float> embedding, classifier, final_norm;
  struct Layer {
    std::vector<float> attn_norm, wq, wkv_a, kv_norm, w_uk, w_uv, wo, ffn_norm;
    std::vector<float> w1, w2, w3;          // dense FFN (layer 0) or shared experts
    std::vector<float> gate;                // [n_experts, dim]
    std::vector<float> e1, e2, e3;          // routed experts, [E, hidden, dim] / [E, dim, hidden] / [E, hidden, dim]
  };
  std::vector<Layer> layers;
};

std::vector<float> randn(std::mt19937_64& rng, std::size_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

Model make_model(std::uint64_t seed) {
  Model m;
  m.mla.n_heads = 8;
  m.mla.q_lora_rank = 0;  // V2-Lite: no query compression
  m.mla.kv_lora_rank = 64;
  m.mla.qk_nope_head_dim = 32;
  m.mla.qk_rope_head_dim = 16;
  m.mla.v_head_dim = 32;
  m.mla.rope.head_dim = m.mla.rope.rotary_dim = 16;
  m.mla.validate();
  // DeepSeek-V2 routing, scaled down: 16 experts in 4 groups, keep 2 groups, top-4.
  m.router = kvkit::RouterConfig::deepseek_v2(16, 4, 4, 2);
  std::mt19937_64 rng(seed);
  const std::size_t d = std::size_t(m.dim), H = std::size_t(m.mla.n_heads);
  const float s = 1.0f / std::sqrt(float(m.dim));
  m.embedding = randn(rng, std::size_t(m.vocab) * d, 1.0f);
  m.classifier = randn(rng, std::size_t(m.vocab) * d, s);
  m.final_norm.assign(d, 1.0f);
  const auto& c = m.mla;
  for (int l = 0; l < m.n_layers; ++l) {
    Model::Layer L;
    L.attn_norm.assign(d, 1.0f);
    L.ffn_norm.assign(d, 1.0f);
    L.kv_norm.assign(std::size_t(c.kv_lora_rank), 1.0f);
    L.wq = randn(rng, H * c.qk_head_dim() * d, s);
    L.wkv_a = randn(rng, std::size_t(c.latent_dim()) * d, s);
    std::vector<float> wkv_b = randn(rng, H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank,
                                     1.0f / std::sqrt(float(c.kv_lora_rank)));
    L.w_uk.resize(H * c.qk_nope_head_dim * c.kv_lora_rank);
    L.w_uv.resize(H * c.v_head_dim * c.kv_lora_rank);
    kvkit::mla_split_wkv_b(c, wkv_b.data(), L.w_uk.data(), L.w_uv.data());  // the checkpoint's wkv_b
    L.wo = randn(rng, d * H * c.v_head_dim, 1.0f / std::sqrt(float(H * c.v_head_dim)));
    const int hidden = l == 0 ? m.dense_hidden : m.moe_hidden * m.n_shared_experts;
    L.w1 = randn(rng, std::size_t(hidden) * d, s);
    L.w3 = randn(rng, std::size_t(hidden) * d, s);
    L.w2 = randn(rng, d * hidden, 1.0f / std::sqrt(float(hidden)));
    if (l > 0) {
      const std::size_t E = std::size_t(m.router.n_experts), mh = std::size_t(m.moe_hidden);
      L.gate = randn(rng, E * d, s);
      L.e1 = randn(rng, E * mh * d, s);
      L.e3 = randn(rng, E * mh * d, s);
      L.e2 = randn(rng, E * d * mh, 1.0f / std::sqrt(float(mh)));
    }
    m.layers.push_back(std::move(L));
  }
  return m;
}

// SwiGLU FFN with weights w1/w3 [hidden, dim] and w2 [dim, hidden]: out = W2 (silu(W1 x) * W3 x).
void swiglu(const float* w1, const float* w2, const float* w3, int dim, int hidden, const float* x, float* out) {
  std::vector<float> a(static_cast<std::size_t>(hidden)), b(a.size());
  matvec(a.data(), w1, x, hidden, dim);
  matvec(b.data(), w3, x, hidden, dim);
  for (int i = 0; i < hidden; ++i) a[i] = examples::silu(a[i]) * b[i];
  matvec(out, w2, a.data(), dim, hidden);
}

struct Options {
  int requests = 3, prompt_len = 40, gen = 16, block_size = 64;
  std::uint64_t seed = 7;
  bool check = false;
};

}  // namespace

int main(int argc, char** argv) try {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto num = [&] {
      if (i + 1 >= argc) throw kvkit::Error("deepseek_decode: missing value for " + a);
      return std::atoi(argv[++i]);
    };
    if (a == "--check") opt.check = true;
    else if (a == "--random") continue;
    else if (a == "--requests") opt.requests = num();
    else if (a == "--prompt-len") opt.prompt_len = num();
    else if (a == "--gen") opt.gen = num();
    else if (a == "--block-size") opt.block_size = num();
    else if (a == "--seed") opt.seed = std::uint64_t(num());
    else throw kvkit::Error("deepseek_decode: unknown flag " + a +
                            " (flags: --check --requests N --prompt-len N --gen N --block-size N --seed S)");
  }
  kvkit::check(opt.requests >= 1 && opt.prompt_len >= 1 && opt.gen >= 1, "deepseek_decode",
               "--requests, --prompt-len and --gen must be >= 1");
  const Model m = make_model(opt.seed);
  const kvkit::MlaConfig& c = m.mla;
  const int H = c.n_heads, d = m.dim, lat = c.latent_dim(), rank = c.kv_lora_rank;
  const int max_len = opt.prompt_len + opt.gen;

  // ---------------------------------------------------------------- the latent cache
  const std::int64_t blocks_per_seq = (max_len + opt.block_size - 1) / opt.block_size;
  kvkit::KVCacheManagerOptions mo;
  mo.num_blocks = std::int32_t(1 + opt.requests * blocks_per_seq);
  mo.block_size = opt.block_size;
  kvkit::KVCacheManager manager(mo);
  const auto layout = kvkit::LatentKVLayout::dense(mo.num_blocks, opt.block_size, rank, c.qk_rope_head_dim);
  std::vector<std::vector<float>> cache(std::size_t(m.n_layers), std::vector<float>(std::size_t(mo.num_blocks * layout.stride_page)));
  const kvkit::RopeCache rope(c.rope, max_len);

  std::mt19937_64 rng(opt.seed + 1);
  std::vector<std::vector<std::int32_t>> tokens(std::size_t(opt.requests));
  std::vector<kvkit::SequenceId> seqs;
  for (auto& t : tokens) {
    for (int i = 0; i < opt.prompt_len; ++i) t.push_back(std::int32_t(rng() % std::uint64_t(m.vocab)));
    seqs.push_back(manager.create_sequence());
  }
  std::vector<std::int64_t> expert_load(std::size_t(m.router.n_experts), 0);
  double max_check_diff = 0.0;

  // One forward step: `count[b]` new tokens of every request b (the prompt, then 1).
  auto step = [&](bool prefill) {
    std::vector<std::int64_t> count(std::size_t(opt.requests)), first(count.size()), slots, positions;
    std::int64_t rows = 0;
    for (int b = 0; b < opt.requests; ++b) {
      first[b] = std::int64_t(tokens[b].size()) - (prefill ? opt.prompt_len : 1);
      count[b] = prefill ? opt.prompt_len : 1;
      std::vector<std::int64_t> s(static_cast<std::size_t>(count[b]));
      kvkit::check(manager.reserve(seqs[b], count[b], s.data()), "deepseek_decode", "out of KV blocks");
      slots.insert(slots.end(), s.begin(), s.end());
      for (std::int64_t i = 0; i < count[b]; ++i) positions.push_back(first[b] + i);
      rows += count[b];
    }
    std::vector<std::int32_t> table(std::size_t(opt.requests * blocks_per_seq)), lens(std::size_t(opt.requests));
    manager.build_block_table(seqs.data(), opt.requests, blocks_per_seq, table.data(), lens.data());

    std::vector<float> x(std::size_t(rows) * d), n(static_cast<std::size_t>(d));
    for (std::int64_t r = 0, b = 0; b < opt.requests; ++b)
      for (std::int64_t i = 0; i < count[b]; ++i, ++r)
        std::memcpy(&x[std::size_t(r) * d], &m.embedding[std::size_t(tokens[b][std::size_t(first[b] + i)]) * d], sizeof(float) * d);

    for (int l = 0; l < m.n_layers; ++l) {
      const Model::Layer& L = m.layers[std::size_t(l)];
      std::vector<float> q(std::size_t(rows) * H * c.qk_head_dim()), kv_a(std::size_t(rows) * lat);
      for (std::int64_t r = 0; r < rows; ++r) {
        rmsnorm(n.data(), &x[std::size_t(r) * d], L.attn_norm.data(), d);
        matvec(&q[std::size_t(r) * H * c.qk_head_dim()], L.wq.data(), n.data(), H * c.qk_head_dim(), d);
        matvec(&kv_a[std::size_t(r) * lat], L.wkv_a.data(), n.data(), lat, d);
      }
      // kvkit: RMSNorm c_kv + RoPE k_pe + append to the latent cache, one pass.
      kvkit::MlaCompressArgs ca;
      ca.kv_a = kv_a.data();
      ca.kv_a_stride_token = lat;
      ca.norm_weight = L.kv_norm.data();
      ca.positions = positions.data();
      ca.slot_mapping = slots.data();
      ca.num_tokens = rows;
      ca.cache = cache[std::size_t(l)].data();
      ca.dtype = kvkit::DType::kFloat32;
      ca.rope_style = c.rope.style;
      ca.cos_sin_cache = rope.data();
      ca.cache_positions = rope.max_positions();
      kvkit::mla_compress(layout, ca);
      // kvkit: rotate q_pe (the last 16 dims of each head) with the same decoupled RoPE.
      kvkit::RopeParams rq;
      rq.q = q.data() + c.qk_nope_head_dim;
      rq.q_token_stride = std::int64_t(H) * c.qk_head_dim();
      rq.q_head_stride = c.qk_head_dim();
      rq.num_q_heads = H;
      rq.positions = positions.data();
      rq.num_tokens = rows;
      rq.head_dim = rq.rotary_dim = c.qk_rope_head_dim;
      rq.style = c.rope.style;
      rope.attach(rq);
      kvkit::apply_rope(rq);

      // Naive path: decompress K = [W_UK c_kv | k_pe] and V = W_UV c_kv per head for
      // every cached token of each request, then standard decode attention over them.
      auto naive = [&](std::vector<float>& out) {
        out.assign(std::size_t(rows) * H * c.v_head_dim, 0.0f);
        std::int64_t r0 = 0;
        for (int b = 0; b < opt.requests; ++b) {
          const int len = lens[std::size_t(b)], kd = c.qk_head_dim(), page = 16;
          const std::int64_t pages = (len + page - 1) / page;
          const auto kv_layout = kvkit::PagedKVLayout::nhd(pages, page, H, kd);
          std::vector<float> k(std::size_t(pages * kv_layout.page_elements()), 0.0f), v(k.size(), 0.0f);
          for (int t = 0; t < len; ++t) {
            const std::int64_t slot = manager.slot_of(seqs[std::size_t(b)], t);
            const float* row = &cache[std::size_t(l)][std::size_t(layout.slot_offset(slot))];
            for (int h = 0; h < H; ++h) {
              float* kr = &k[std::size_t(kv_layout.slot_offset(t, h))];
              float* vr = &v[std::size_t(kv_layout.slot_offset(t, h))];
              matvec(kr, &L.w_uk[std::size_t(h) * c.qk_nope_head_dim * rank], row, c.qk_nope_head_dim, rank);
              std::memcpy(kr + c.qk_nope_head_dim, row + rank, sizeof(float) * c.qk_rope_head_dim);
              matvec(vr, &L.w_uv[std::size_t(h) * c.v_head_dim * rank], row, c.v_head_dim, rank);
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
          p.v_head_dim = c.v_head_dim;  // V rows are narrower than K rows
          const std::int32_t len32 = len;
          p.page_table = {pt.data(), &len32, 1, pages, pages};
          p.q_len = int(count[std::size_t(b)]);
          p.num_q_heads = H;
          p.sm_scale = c.softmax_scale();
          p.o = &out[std::size_t(r0) * H * c.v_head_dim];
          p.o_stride_head = c.v_head_dim;
          p.o_stride_token = std::int64_t(H) * c.v_head_dim;
          kvkit::paged_decode_attention(p);
          r0 += count[std::size_t(b)];
        }
      };
      std::vector<float> attn;
      if (prefill) {
        naive(attn);
      } else {
        // Absorbed path over the latent cache: q = [W_UKᵀ q_nope | q_pe] per head.
        std::vector<float> q_nope(std::size_t(rows) * H * c.qk_nope_head_dim), q_abs(std::size_t(rows) * H * lat);
        for (std::int64_t r = 0; r < rows; ++r)
          for (int h = 0; h < H; ++h) {
            const float* src = &q[(std::size_t(r) * H + h) * c.qk_head_dim()];
            std::memcpy(&q_nope[(std::size_t(r) * H + h) * c.qk_nope_head_dim], src, sizeof(float) * c.qk_nope_head_dim);
            std::memcpy(&q_abs[(std::size_t(r) * H + h) * lat + rank], src + c.qk_nope_head_dim, sizeof(float) * c.qk_rope_head_dim);
          }
        kvkit::mla_absorb_query(c, q_nope.data(), rows, L.w_uk.data(), q_abs.data(), std::int64_t(H) * lat, lat);
        std::vector<float> o_lat(std::size_t(rows) * H * rank);
        kvkit::PagedDecodeParams p = kvkit::mla_decode_params(c, layout, cache[std::size_t(l)].data(), kvkit::DType::kFloat32);
        p.q = q_abs.data();
        p.q_stride_head = lat;
        p.q_stride_token = std::int64_t(H) * lat;
        p.page_table = {table.data(), lens.data(), opt.requests, blocks_per_seq, blocks_per_seq};
        p.o = o_lat.data();
        p.o_stride_head = rank;
        p.o_stride_token = std::int64_t(H) * rank;
        kvkit::paged_decode_attention(p);
        attn.resize(std::size_t(rows) * H * c.v_head_dim);
        kvkit::mla_project_output(c, o_lat.data(), std::int64_t(H) * rank, rank, rows, L.w_uv.data(), attn.data());
        if (opt.check) {
          std::vector<float> reference;
          naive(reference);
          for (std::size_t i = 0; i < attn.size(); ++i)
            max_check_diff = std::max(max_check_diff, double(std::fabs(attn[i] - reference[i])));
        }
      }
      std::vector<float> o(static_cast<std::size_t>(d));
      for (std::int64_t r = 0; r < rows; ++r) {
        matvec(o.data(), L.wo.data(), &attn[std::size_t(r) * H * c.v_head_dim], d, H * c.v_head_dim);
        for (int i = 0; i < d; ++i) x[std::size_t(r) * d + i] += o[i];
      }

      // FFN: dense in layer 0; MoE (shared expert + routed experts) after.
      std::vector<float> xn(std::size_t(rows) * d), ffn(std::size_t(rows) * d);
      for (std::int64_t r = 0; r < rows; ++r) rmsnorm(&xn[std::size_t(r) * d], &x[std::size_t(r) * d], L.ffn_norm.data(), d);
      const int shared_hidden = l == 0 ? m.dense_hidden : m.moe_hidden * m.n_shared_experts;
      for (std::int64_t r = 0; r < rows; ++r)
        swiglu(L.w1.data(), L.w2.data(), L.w3.data(), d, shared_hidden, &xn[std::size_t(r) * d], &ffn[std::size_t(r) * d]);
      if (l > 0) {
        const int E = m.router.n_experts, K = m.router.top_k;
        std::vector<float> logits(std::size_t(rows) * E), weights(std::size_t(rows) * K);
        std::vector<std::int32_t> ids(std::size_t(rows) * K);
        for (std::int64_t r = 0; r < rows; ++r) matvec(&logits[std::size_t(r) * E], L.gate.data(), &xn[std::size_t(r) * d], E, d);
        kvkit::moe_route(m.router, kvkit::TensorView(logits.data(), kvkit::DType::kFloat32, {rows, E}),
                         kvkit::TensorView(ids.data(), kvkit::DType::kInt32, {rows, K}),
                         kvkit::TensorView(weights.data(), kvkit::DType::kFloat32, {rows, K}));
        const kvkit::TensorView id_view(ids.data(), kvkit::DType::kInt32, {rows, K});
        const auto load = kvkit::moe_expert_load(id_view, E);
        for (int e = 0; e < E; ++e) expert_load[std::size_t(e)] += load[std::size_t(e)];
        kvkit::DispatchConfig dc{E, K, 1, -1};
        const std::int64_t max_rows = kvkit::moe_dispatch_max_rows(dc, rows);
        std::vector<std::int32_t> counts(static_cast<std::size_t>(E)), offsets(std::size_t(E + 1)), sorted(static_cast<std::size_t>(max_rows)), pair_rows(std::size_t(rows * K));
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
        const std::size_t mh = std::size_t(m.moe_hidden);
        for (int e = 0; e < E; ++e)
          for (std::int32_t row = offsets[std::size_t(e)]; row < offsets[std::size_t(e + 1)]; ++row)
            swiglu(&L.e1[std::size_t(e) * mh * d], &L.e2[std::size_t(e) * d * mh], &L.e3[std::size_t(e) * mh * d], d,
                   m.moe_hidden, &x_sorted[std::size_t(row) * d], &y_sorted[std::size_t(row) * d]);
        // out = shared expert + Σ_k w[t,k] y[row(t,k)]
        kvkit::moe_combine(kvkit::TensorView(y_sorted.data(), kvkit::DType::kFloat32, {max_rows, d}),
                           kvkit::TensorView(pair_rows.data(), kvkit::DType::kInt32, {rows * K}),
                           kvkit::TensorView(weights.data(), kvkit::DType::kFloat32, {rows, K}),
                           kvkit::TensorView(ffn.data(), kvkit::DType::kFloat32, {rows, d}),
                           kvkit::TensorView(ffn.data(), kvkit::DType::kFloat32, {rows, d}));
      }
      for (std::size_t i = 0; i < x.size(); ++i) x[i] += ffn[i];
    }
    // Greedy next token from each request's last row.
    std::int64_t r = 0;
    std::vector<float> logits(static_cast<std::size_t>(m.vocab));
    for (int b = 0; b < opt.requests; ++b) {
      r += count[std::size_t(b)];
      rmsnorm(n.data(), &x[std::size_t(r - 1) * d], m.final_norm.data(), d);
      matvec(logits.data(), m.classifier.data(), n.data(), m.vocab, d);
      tokens[std::size_t(b)].push_back(std::int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin()));
    }
  };

  step(/*prefill=*/true);
  for (int g = 1; g < opt.gen; ++g) step(/*prefill=*/false);

  // ---------------------------------------------------------------- summary
  std::printf("deepseek_decode: %d requests x (%d prompt + %d generated) tokens, %d layers (1 dense + %d MoE)\n",
              opt.requests, opt.prompt_len, opt.gen, m.n_layers, m.n_layers - 1);
  std::printf("request 0 generated:");
  for (std::size_t i = std::size_t(opt.prompt_len); i < tokens[0].size(); ++i) std::printf(" %d", tokens[0][i]);
  std::printf("\n");
  const auto e = kvkit::mla_cache_elements(c, 2);
  std::printf("KV cache per token per layer: MLA %lld values (%lld bytes in fp32) vs MHA %lld, GQA(2) %lld, MQA %lld: MLA is %.1f%% of MHA\n",
              (long long)e.mla, (long long)(e.mla * 4), (long long)e.mha, (long long)e.gqa, (long long)e.mqa,
              100.0 * double(e.mla) / double(e.mha));
  const kvkit::MoeLoadStats ls = kvkit::moe_load_stats(expert_load);
  std::printf("experts: %lld routed pairs over %d experts, max/mean load %.2f (expert %d busiest), min %lld\n",
              (long long)ls.total, m.router.n_experts, ls.max_over_mean, ls.max_expert, (long long)ls.min);
  for (const auto& s : seqs) manager.free_sequence(s);
  manager.check_invariants();
  if (opt.check) {
    const bool ok = max_check_diff <= 1e-4;
    std::printf("check: max |absorbed - naive| attention output = %.3g (%s, tolerance 1e-4)\n", max_check_diff,
                ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
  }
  return 0;
} catch (const kvkit::Error& e) {
  std::fprintf(stderr, "deepseek_decode: %s\n", e.what());
  return 1;
}
