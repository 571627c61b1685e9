// gpt_decode: a serving-shaped decode loop for a small Llama-style model,
// built from kvkit's pieces. Read it as a tutorial, in two parts:
//
//   1. serving_loop.hpp, the engine: a KVCacheManager (which blocks hold whose
//      tokens) and, each step, admit arriving requests (reusing cached
//      prefixes), reserve cache slots for the tokens to compute (preempting
//      when out of blocks), run the model, sample, commit full blocks to the
//      prefix cache and free finished requests; then a summary (latency,
//      throughput, KV memory, prefix-cache hits);
//   2. this file, the model on one step's tokens: one paged K and V cache per
//      layer, fused RoPE + append into it, paged attention over it.
//
// kvkit does all cache work; the matmuls are plain loops (an engine would call
// its BLAS; gpt_decode_cuda.cu is the same flow on a GPU with cuBLAS).
// `--check` recomputes every sampled token's logits from scratch, with no
// cache and no kvkit code, and reports the largest difference.

#include <kvkit/kvkit.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "llama_model.hpp"
#include "serving_loop.hpp"

namespace {

// The model's forward pass over a step's tokens, with the paged K/V caches.
class CpuModel {
 public:
  CpuModel(const gpt::Config& cfg, const gpt::Weights& weights, const gpt::Options& opt)
      : cfg_(cfg),
        w_(weights),
        layout_(kvkit::PagedKVLayout::nhd(opt.num_blocks, opt.block_size, cfg.n_kv_heads, cfg.head_dim())),
        // llama2.c models rotate interleaved pairs with base 10000.
        rope_cfg_{cfg.head_dim(), cfg.head_dim(), 10000.0, kvkit::RopeStyle::kGptJ, {}},
        rope_table_(rope_cfg_, cfg.max_seq_len) {
    // One paged K and one paged V cache per layer, addressed by layout_, in
    // zeroed host memory with 2 MiB pages (HostCacheBuffer).
    const std::int64_t cache_bytes = layout_.num_pages * layout_.page_elements() * std::int64_t(sizeof(float));
    for (int l = 0; l < cfg.n_layers; ++l) {
      k_cache_.emplace_back(cache_bytes);
      v_cache_.emplace_back(cache_bytes);
    }
  }

  void copy_blocks(const std::vector<std::int64_t>& pairs) {
    for (int l = 0; l < cfg_.n_layers; ++l) {
      void* caches[2] = {k_cache_[l].data(), v_cache_[l].data()};
      kvkit::copy_blocks(layout_, {caches, 2, pairs.data(), std::int64_t(pairs.size() / 2), kvkit::DType::kFloat32});
    }
  }

  void forward(const gpt::Step& s, float* logits) {
    const int hd = cfg_.head_dim(), kv_heads = cfg_.n_kv_heads, q_heads = cfg_.n_heads, d = cfg_.dim;
    const std::int64_t rows = s.rows();
    std::vector<float> x(std::size_t(rows) * d);
    for (std::int64_t r = 0; r < rows; ++r)
      std::memcpy(&x[std::size_t(r) * d], &w_.token_embedding[std::size_t(s.tokens[r]) * d], sizeof(float) * d);

    std::vector<float> n(static_cast<std::size_t>(d)), q(std::size_t(rows) * d), k(std::size_t(rows) * cfg_.kv_dim()),
        v(k.size()), att(q.size()), o(static_cast<std::size_t>(d));
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const std::size_t dd = std::size_t(d) * d, kvdd = std::size_t(cfg_.kv_dim()) * d;
      for (std::int64_t r = 0; r < rows; ++r) {
        gpt::rmsnorm(n.data(), &x[std::size_t(r) * d], w_.rms_att.data() + std::size_t(l) * d, d);
        gpt::matvec(&q[std::size_t(r) * d], w_.wq.data() + l * dd, n.data(), d, d);
        gpt::matvec(&k[std::size_t(r) * cfg_.kv_dim()], w_.wk.data() + l * kvdd, n.data(), cfg_.kv_dim(), d);
        gpt::matvec(&v[std::size_t(r) * cfg_.kv_dim()], w_.wv.data() + l * kvdd, n.data(), cfg_.kv_dim(), d);
      }
      // kvkit: rotate q in place and write rotated k and v into the paged cache.
      kvkit::RopeParams rope;
      rope.q = q.data();
      rope.q_token_stride = d;
      rope.q_head_stride = hd;
      rope.num_q_heads = q_heads;
      rope.positions = s.positions.data();
      rope.num_tokens = rows;
      rope.head_dim = hd;
      rope.rotary_dim = hd;
      rope.style = rope_cfg_.style;
      rope.dtype = kvkit::DType::kFloat32;
      rope_table_.attach(rope);
      kvkit::rope_append_kv(rope, layout_,
                            kvkit::AppendKVArgs::dense(k.data(), v.data(), s.slots.data(), rows, kv_heads, hd,
                                                       k_cache_[l].data(), v_cache_[l].data(), kvkit::DType::kFloat32));
      // kvkit: paged attention. Each work item is one sequence of the page
      // table with q_len = its token count (causal within the chunk).
      std::int64_t row = 0;
      for (std::size_t w = 0; w < s.work.size(); ++w) {
        kvkit::PagedDecodeParams p;
        p.q = &q[std::size_t(row) * d];
        p.q_stride_head = hd;
        p.q_stride_token = d;
        p.k_cache = k_cache_[l].data();
        p.v_cache = v_cache_[l].data();
        p.layout = layout_;
        p.page_table = {&s.block_table[w * std::size_t(s.max_blocks)], &s.seq_lens[w], 1, s.max_blocks, s.max_blocks};
        p.q_len = int(s.work[w].count);
        p.num_q_heads = q_heads;
        p.sm_scale = 1.0f / std::sqrt(float(hd));
        p.o = &att[std::size_t(row) * d];
        p.o_stride_head = hd;
        p.o_stride_token = d;
        kvkit::paged_decode_attention(p);
        row += s.work[w].count;
      }
      for (std::int64_t r = 0; r < rows; ++r) {
        gpt::matvec(o.data(), w_.wo.data() + l * dd, &att[std::size_t(r) * d], d, d);
        for (int i = 0; i < d; ++i) x[std::size_t(r) * d + i] += o[i];
        gpt::ffn(cfg_, w_, l, &x[std::size_t(r) * d]);
      }
    }
    // Logits of the last row of each sampled work item.
    std::vector<std::int64_t> last_row(s.work.size());
    for (std::size_t w = 0, row = 0; w < s.work.size(); ++w) last_row[w] = std::int64_t(row += std::size_t(s.work[w].count)) - 1;
    for (std::size_t i = 0; i < s.sampled.size(); ++i)
      gpt::logits_of(cfg_, w_, &x[std::size_t(last_row[std::size_t(s.sampled[i])]) * d], logits + i * std::size_t(cfg_.vocab_size));
  }

 private:
  const gpt::Config& cfg_;
  const gpt::Weights& w_;
  kvkit::PagedKVLayout layout_;
  kvkit::RopeConfig rope_cfg_;
  kvkit::RopeCache rope_table_;
  std::vector<kvkit::HostCacheBuffer> k_cache_, v_cache_;
};

}  // namespace

int main(int argc, char** argv) try {
  gpt::Options opt = gpt::parse_options(argc, argv, "gpt_decode");
  gpt::Config cfg;
  gpt::Weights weights;
  gpt::load_model(opt, cfg, weights, "gpt_decode");
  CpuModel model(cfg, weights, opt);
  return gpt::serve(opt, cfg, weights, model);
} catch (const kvkit::Error& e) {
  std::fprintf(stderr, "gpt_decode: %s\n", e.what());
  return 1;
}
