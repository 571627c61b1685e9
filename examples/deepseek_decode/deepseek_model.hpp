#pragma once
// What the CPU build (deepseek_decode.cpp) and the CUDA build
// (deepseek_decode_cuda.cu) of deepseek_decode share: the flags, the model
// (config and random weights, made on the host from the seed, so both builds
// run the same model), the step loop that owns the cache's bookkeeping, and
// the summary. Everything here runs on the host; each build supplies the
// forward pass over one step's tokens:
//
//   struct Forward {
//     // Run every layer on step.tokens (writing their latent rows at
//     // step.slots) and write the logits of each request's last row.
//     void forward(const deepseek::Step& step, float* logits);  // [requests, vocab]
//     // Routed (token, expert) pairs per expert so far.
//     const std::vector<std::int64_t>& expert_load() const;
//   };
//
// The model is a scaled-down DeepSeek-V2-Lite: MLA with the real latent
// widths (kv_lora_rank 512 + rope 64: the shape kvkit's GPU absorbed decode is
// built for), no query compression, 8 heads of qk 64 + 64 and v 128; a dense
// first layer, then MoE layers with one shared expert and DeepSeek-V2
// group-limited routing (16 experts in 4 groups, keep 2 groups, top-4). The
// latent cache is bfloat16 in both builds.

#include <kvkit/kvkit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace deepseek {

struct Options {
  int requests = 3, prompt_len = 40, gen = 16, block_size = 64;
  std::uint64_t seed = 7;
  bool check = false;
  int max_len() const { return prompt_len + gen; }
  std::int64_t blocks_per_seq() const { return (max_len() + block_size - 1) / block_size; }
  std::int32_t num_blocks() const { return std::int32_t(1 + requests * blocks_per_seq()); }
};

/// Throws kvkit::Error (its message without the program's name) on a bad flag.
inline Options parse_options(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto num = [&] {
      if (i + 1 >= argc) throw kvkit::Error("missing value for " + a);
      return std::atoi(argv[++i]);
    };
    if (a == "--check") opt.check = true;
    else if (a == "--random") continue;
    else if (a == "--requests") opt.requests = num();
    else if (a == "--prompt-len") opt.prompt_len = num();
    else if (a == "--gen") opt.gen = num();
    else if (a == "--block-size") opt.block_size = num();
    else if (a == "--seed") opt.seed = std::uint64_t(num());
    else throw kvkit::Error("unknown flag " + a +
                            " (flags: --check --requests N --prompt-len N --gen N --block-size N --seed S)");
  }
  kvkit::check(opt.requests >= 1 && opt.prompt_len >= 1 && opt.gen >= 1, "flags",
               "--requests, --prompt-len and --gen must be >= 1");
  kvkit::check(opt.block_size >= 1 && (opt.block_size & (opt.block_size - 1)) == 0, "flags",
               "--block-size must be a power of two");
  return opt;
}

struct Model {
  int dim = 256, n_layers = 3, vocab = 211, dense_hidden = 512;
  kvkit::MlaConfig mla;
  kvkit::RouterConfig router;
  int moe_hidden = 96, n_shared_experts = 1;
  std::vector<float> embedding, classifier, final_norm;  // [vocab, dim], [vocab, dim], [dim]
  struct Layer {
    std::vector<float> attn_norm;  // [dim]
    std::vector<float> wq;         // [heads * (nope + rope), dim]
    std::vector<float> wkv_a;      // [kv_lora_rank + rope, dim]
    std::vector<float> kv_norm;    // [kv_lora_rank]
    std::vector<float> w_uk;       // [heads, nope, kv_lora_rank]  (sliced from the checkpoint's wkv_b)
    std::vector<float> w_uv;       // [heads, v, kv_lora_rank]
    std::vector<float> wo;         // [dim, heads * v]
    std::vector<float> ffn_norm;   // [dim]
    std::vector<float> w1, w2, w3;  // dense FFN (layer 0) or shared experts: [hidden, dim], [dim, hidden], [hidden, dim]
    std::vector<float> gate;        // [n_experts, dim]
    std::vector<float> e1, e2, e3;  // routed experts: [E, hidden, dim], [E, dim, hidden], [E, hidden, dim]
  };
  std::vector<Layer> layers;
  int ffn_hidden(int layer) const { return layer == 0 ? dense_hidden : moe_hidden * n_shared_experts; }
};

inline std::vector<float> randn(std::mt19937_64& rng, std::size_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

inline Model make_model(std::uint64_t seed) {
  Model m;
  m.mla.n_heads = 8;
  m.mla.q_lora_rank = 0;  // V2-Lite: no query compression
  m.mla.kv_lora_rank = 512;
  m.mla.qk_nope_head_dim = 64;
  m.mla.qk_rope_head_dim = 64;
  m.mla.v_head_dim = 128;
  m.mla.rope.head_dim = m.mla.rope.rotary_dim = 64;
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
    const int hidden = m.ffn_hidden(l);
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

/// One forward step: `count[b]` new tokens of every request b (its whole
/// prompt in the prefill step, then 1), rows in request order.
struct Step {
  bool prefill = false;
  int requests = 0;
  std::int64_t rows = 0;
  std::vector<std::int64_t> count, first;   // [requests]: new tokens, position of the first
  std::vector<std::int32_t> tokens;         // [rows] input token ids
  std::vector<std::int64_t> positions;      // [rows]
  std::vector<std::int64_t> slots;          // [rows] latent-cache slots (KVCacheManager)
  std::vector<std::int32_t> block_table;    // [requests, max_blocks]
  std::vector<std::int32_t> seq_lens;       // [requests], after this step's tokens
  std::int64_t max_blocks = 0;
  int block_size = 1;
  /// Cache slot of token t of request b.
  std::int64_t slot_of(int b, std::int64_t t) const {
    return std::int64_t(block_table[std::size_t(b * max_blocks + t / block_size)]) * block_size + t % block_size;
  }
};

/// Runs the requests (a prefill step, then gen - 1 decode steps, greedy) on
/// `forward` and prints the summary. Returns every request's tokens (prompt
/// then generated).
template <class Forward>
std::vector<std::vector<std::int32_t>> serve(const Options& opt, const Model& m, Forward& forward,
                                             const char* program) {
  kvkit::KVCacheManagerOptions mo;
  mo.num_blocks = opt.num_blocks();
  mo.block_size = opt.block_size;
  kvkit::KVCacheManager manager(mo);  // kvkit: the slots of the paged latent cache

  std::mt19937_64 rng(opt.seed + 1);
  std::vector<std::vector<std::int32_t>> tokens(std::size_t(opt.requests));
  std::vector<kvkit::SequenceId> seqs;
  for (auto& t : tokens) {
    for (int i = 0; i < opt.prompt_len; ++i) t.push_back(std::int32_t(rng() % std::uint64_t(m.vocab)));
    seqs.push_back(manager.create_sequence());
  }
  std::vector<float> logits(std::size_t(opt.requests) * m.vocab);
  for (int g = 0; g < opt.gen; ++g) {
    Step s;
    s.prefill = g == 0;
    s.requests = opt.requests;
    s.block_size = opt.block_size;
    s.max_blocks = opt.blocks_per_seq();
    for (int b = 0; b < opt.requests; ++b) {
      const std::int64_t n = s.prefill ? opt.prompt_len : 1;
      const std::int64_t first = std::int64_t(tokens[std::size_t(b)].size()) - n;
      std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
      kvkit::check(manager.reserve(seqs[std::size_t(b)], n, slots.data()), "deepseek::serve", "out of KV blocks (an engine would preempt)");
      s.slots.insert(s.slots.end(), slots.begin(), slots.end());
      for (std::int64_t i = 0; i < n; ++i) {
        s.positions.push_back(first + i);
        s.tokens.push_back(tokens[std::size_t(b)][std::size_t(first + i)]);
      }
      s.count.push_back(n);
      s.first.push_back(first);
      s.rows += n;
    }
    s.block_table.resize(std::size_t(opt.requests * s.max_blocks));
    s.seq_lens.resize(std::size_t(opt.requests));
    manager.build_block_table(seqs.data(), opt.requests, s.max_blocks, s.block_table.data(), s.seq_lens.data());
    forward.forward(s, logits.data());
    for (int b = 0; b < opt.requests; ++b) {  // greedy
      const float* row = &logits[std::size_t(b) * m.vocab];
      tokens[std::size_t(b)].push_back(std::int32_t(std::max_element(row, row + m.vocab) - row));
    }
  }

  const kvkit::MlaConfig& c = m.mla;
  std::printf("%s: %d requests x (%d prompt + %d generated) tokens, %d layers (1 dense + %d MoE)\n", program,
              opt.requests, opt.prompt_len, opt.gen, m.n_layers, m.n_layers - 1);
  std::printf("request 0 generated:");
  for (std::size_t i = std::size_t(opt.prompt_len); i < tokens[0].size(); ++i) std::printf(" %d", tokens[0][i]);
  std::printf("\n");
  const auto e = kvkit::mla_cache_elements(c, 2);
  std::printf("KV cache per token per layer: MLA %lld values (%lld bytes in bf16) vs MHA %lld, GQA(2) %lld, MQA %lld: "
              "MLA is %.1f%% of MHA\n",
              (long long)e.mla, (long long)(e.mla * 2), (long long)e.mha, (long long)e.gqa, (long long)e.mqa,
              100.0 * double(e.mla) / double(e.mha));
  const kvkit::MoeLoadStats ls = kvkit::moe_load_stats(forward.expert_load());
  std::printf("experts: %lld routed pairs over %d experts, max/mean load %.2f (expert %d busiest), min %lld\n",
              (long long)ls.total, m.router.n_experts, ls.max_over_mean, ls.max_expert, (long long)ls.min);
  for (const auto& seq : seqs) manager.free_sequence(seq);
  manager.check_invariants();
  return tokens;
}

}  // namespace deepseek
