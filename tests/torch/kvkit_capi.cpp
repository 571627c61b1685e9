// A small C interface to some of kvkit's CPU ops, loaded with ctypes by
// crosscheck.py, which compares them with PyTorch and Hugging Face
// transformers: an independent reference for the formulas (RoPE frequencies
// and scaling, rotation pairing, MoE routing, GQA decode attention).
//
// Every function returns 0 on success and 1 after a kvkit::Error, whose
// message kvkit_last_error() returns.

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "kvkit/ops/attention_decode.hpp"
#include "kvkit/ops/mla_compress.hpp"
#include "kvkit/ops/mla_decode.hpp"
#include "kvkit/ops/moe_router.hpp"
#include "kvkit/ops/rope.hpp"
#include "gpt_decode/llama_model.hpp"

namespace {

thread_local std::string g_error;

template <class F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}

/// scaling: 0 none, 1 linear, 2 NTK static, 3 NTK dynamic, 4 YaRN, 5 Llama-3.1 (RopeScalingType).
/// extra: [beta_fast, beta_slow, mscale, mscale_all_dim, low_freq_factor, high_freq_factor, truncate].
kvkit::RopeConfig rope_config(int head_dim, int rotary_dim, double base, int style, int scaling, double factor,
                              std::int64_t original_max_position, const double* extra) {
  kvkit::RopeConfig c;
  c.head_dim = head_dim;
  c.rotary_dim = rotary_dim;
  c.base = base;
  c.style = style == 0 ? kvkit::RopeStyle::kNeox : kvkit::RopeStyle::kGptJ;
  c.scaling.type = static_cast<kvkit::RopeScalingType>(scaling);
  c.scaling.factor = factor;
  c.scaling.original_max_position = original_max_position;
  c.scaling.yarn_beta_fast = extra[0];
  c.scaling.yarn_beta_slow = extra[1];
  c.scaling.yarn_mscale = extra[2];
  c.scaling.yarn_mscale_all_dim = extra[3];
  c.scaling.llama3_low_freq_factor = extra[4];
  c.scaling.llama3_high_freq_factor = extra[5];
  c.scaling.yarn_truncate = extra[6] != 0.0;
  return c;
}

/// Rotates float32 rows x [tokens, heads, config.head_dim] in place with `cache`.
void rotate_rows(const kvkit::RopeConfig& c, const kvkit::RopeCache& cache, const std::int64_t* positions,
                 std::int64_t tokens, int heads, float* x) {
  kvkit::RopeParams p;
  p.k = x;
  p.k_token_stride = std::int64_t(heads) * c.head_dim;
  p.k_head_stride = c.head_dim;
  p.num_k_heads = heads;
  p.positions = positions;
  p.num_tokens = tokens;
  p.head_dim = c.head_dim;
  p.rotary_dim = c.rotary_dim;
  p.style = c.style;
  p.dtype = kvkit::DType::kFloat32;
  cache.attach(p);
  kvkit::apply_rope(p);
}

}  // namespace

extern "C" {

const char* kvkit_last_error() { return g_error.c_str(); }

/// inv_freq [rotary_dim / 2] and the attention factor (cos/sin multiplier).
int kvkit_rope_inv_freq(int head_dim, int rotary_dim, double base, int scaling, double factor,
                        std::int64_t original_max_position, const double* extra, std::int64_t sequence_length,
                        double* inv_freq, double* attention_factor) {
  return guarded([&] {
    const kvkit::RopeConfig c =
        rope_config(head_dim, rotary_dim, base, 0, scaling, factor, original_max_position, extra);
    const std::vector<double> f = kvkit::rope_inv_freq(c, sequence_length);
    for (std::size_t i = 0; i < f.size(); ++i) inv_freq[i] = f[i];
    *attention_factor = kvkit::rope_attention_factor(c);
  });
}

/// Rotates x [tokens, heads, head_dim] (float32, in place) with the table
/// of max_position rows; style 0 = NeoX (rotate-half), 1 = GPT-J (interleaved).
int kvkit_apply_rope(int head_dim, int rotary_dim, double base, int style, int scaling, double factor,
                     std::int64_t original_max_position, const double* extra, std::int64_t max_position,
                     const std::int64_t* positions, std::int64_t tokens, int heads, float* x) {
  return guarded([&] {
    const kvkit::RopeConfig c =
        rope_config(head_dim, rotary_dim, base, style, scaling, factor, original_max_position, extra);
    rotate_rows(c, kvkit::RopeCache(c, max_position), positions, tokens, heads, x);
  });
}

/// Routes logits [tokens, n_experts] (float32). scoring 0 softmax / 1 sigmoid;
/// group_score 0 max / 1 sum of the top two; bias null or [n_experts].
int kvkit_moe_route(int n_experts, int top_k, int scoring, int n_group, int topk_group, int group_score,
                    int renormalize, float routed_scaling_factor, const float* logits, const float* bias,
                    std::int64_t tokens, std::int32_t* ids, float* weights) {
  return guarded([&] {
    kvkit::RouterConfig c;
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.scoring = scoring == 0 ? kvkit::MoeScoring::kSoftmax : kvkit::MoeScoring::kSigmoid;
    c.n_group = n_group;
    c.topk_group = topk_group;
    c.group_score = group_score == 0 ? kvkit::MoeGroupScore::kMax : kvkit::MoeGroupScore::kTopTwoSum;
    c.use_correction_bias = bias != nullptr;
    c.renormalize = renormalize != 0;
    c.routed_scaling_factor = routed_scaling_factor;
    using kvkit::DType;
    using kvkit::TensorView;
    const TensorView bias_view =
        bias != nullptr ? TensorView(const_cast<float*>(bias), DType::kFloat32, {n_experts}) : TensorView();
    kvkit::moe_route(c, TensorView(const_cast<float*>(logits), DType::kFloat32, {tokens, n_experts}), bias_view,
                     TensorView(ids, DType::kInt32, {tokens, top_k}),
                     TensorView(weights, DType::kFloat32, {tokens, top_k}));
  });
}

/// Decode attention, one query token per sequence, float32 throughout:
/// q [batch, q_heads, head_dim]; k/v caches NHD [pages, page_size, kv_heads, head_dim];
/// block_table [batch, max_blocks]; o [batch, q_heads, head_dim]; lse [batch, q_heads].
int kvkit_decode(const float* q, const float* k_cache, const float* v_cache, std::int64_t num_pages, int page_size,
                 int kv_heads, int head_dim, int q_heads, const std::int32_t* block_table,
                 const std::int32_t* seq_lens, std::int64_t batch, std::int64_t max_blocks, float sm_scale,
                 int window, int num_sinks, float logit_softcap, float* o, float* lse) {
  return guarded([&] {
    kvkit::PagedDecodeParams p;
    p.q = q;
    p.q_stride_token = std::int64_t(q_heads) * head_dim;
    p.q_stride_head = head_dim;
    p.k_cache = k_cache;
    p.v_cache = v_cache;
    p.layout = kvkit::PagedKVLayout::nhd(num_pages, page_size, kv_heads, head_dim);
    p.page_table = {block_table, seq_lens, batch, max_blocks, max_blocks};
    p.num_q_heads = q_heads;
    p.sm_scale = sm_scale;
    p.window = window;
    p.num_sinks = num_sinks;
    p.logit_softcap = logit_softcap;
    p.o = o;
    p.o_stride_token = std::int64_t(q_heads) * head_dim;
    p.o_stride_head = head_dim;
    p.lse = lse;
    kvkit::paged_decode_attention(p);
  });
}

/// DeepSeek MLA through kvkit, as an engine composes it, for the last of
/// `tokens` tokens at positions 0 .. tokens-1: mla_compress writes every
/// token's kv_a [tokens, 512 + 64] (the engine's GEMM output: c_kv before its
/// RMSNorm, k_pe before RoPE) into a paged float32 latent cache (pages of
/// 64); the last token's q_pe is rotated, q_nope absorbed through W_UK;
/// mla_decode_attention; the output projected through W_UV.
/// q: [tokens, heads, nope + 64] before RoPE; wkv_b: [heads * (nope + v_dim), 512]
/// (the official / transformers kv_b_proj layout); yarn_factor 0: no scaling,
/// else DeepSeek's YaRN (beta 32 / 1) with the given mscales. out: [heads, v_dim].
int kvkit_mla_last_token(int heads, int nope, int v_dim, double rope_base, double yarn_factor,
                         std::int64_t original_max_position, double mscale, double mscale_all_dim, const float* q,
                         const float* kv_a, const float* norm_weight, float norm_eps, const float* wkv_b,
                         std::int64_t tokens, float* out) {
  return guarded([&] {
    kvkit::MlaConfig c;
    c.n_heads = heads;
    c.q_lora_rank = 0;  // the query projections are the caller's GEMMs
    c.qk_nope_head_dim = nope;
    c.v_head_dim = v_dim;
    c.rope = kvkit::RopeConfig{64, 64, rope_base, kvkit::RopeStyle::kGptJ, {}};
    if (yarn_factor > 0.0) {
      c.rope.scaling.type = kvkit::RopeScalingType::kYarn;
      c.rope.scaling.factor = yarn_factor;
      c.rope.scaling.original_max_position = original_max_position;
      c.rope.scaling.yarn_mscale = mscale;
      c.rope.scaling.yarn_mscale_all_dim = mscale_all_dim;
    }
    const int rank = c.kv_lora_rank, lat = c.latent_dim(), qk = c.qk_head_dim();
    const kvkit::RopeCache rope(c.rope, tokens);

    const std::int64_t page = 64, pages = (tokens + page - 1) / page;
    const auto layout = kvkit::LatentKVLayout::dense(pages, page, rank, c.qk_rope_head_dim);
    std::vector<float> cache(std::size_t(pages * page * lat));
    std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens));
    for (std::int64_t t = 0; t < tokens; ++t) positions[std::size_t(t)] = t;
    kvkit::MlaCompressArgs a;
    a.kv_a = kv_a;
    a.kv_a_stride_token = lat;
    a.norm_weight = norm_weight;
    a.norm_eps = norm_eps;
    a.positions = positions.data();
    a.slot_mapping = positions.data();  // token t in slot t
    a.num_tokens = tokens;
    a.cache = cache.data();
    a.dtype = kvkit::DType::kFloat32;
    a.rope_style = c.rope.style;
    a.cos_sin_cache = rope.data();
    a.cache_positions = rope.max_positions();
    a.cache_rotary_dim = rope.rotary_dim();
    kvkit::mla_compress(layout, a);

    // The last token's query: q_pe rotated at its position, q_nope absorbed.
    const float* q_last = q + (tokens - 1) * heads * qk;
    std::vector<float> q_nope(std::size_t(heads * nope)), q_pe(std::size_t(heads * 64));
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < nope; ++i) q_nope[std::size_t(h * nope + i)] = q_last[h * qk + i];
      for (int i = 0; i < 64; ++i) q_pe[std::size_t(h * 64 + i)] = q_last[h * qk + nope + i];
    }
    rotate_rows(c.rope, rope, positions.data() + (tokens - 1), 1, heads, q_pe.data());
    std::vector<float> w_uk(std::size_t(heads) * nope * rank), w_uv(std::size_t(heads) * v_dim * rank);
    kvkit::mla_split_wkv_b(c, wkv_b, w_uk.data(), w_uv.data());
    std::vector<float> q_dec(std::size_t(heads * lat));
    kvkit::mla_absorb_query(c, q_nope.data(), 1, w_uk.data(), q_dec.data(), std::int64_t(heads) * lat, lat);
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < 64; ++i) q_dec[std::size_t(h * lat + rank + i)] = q_pe[std::size_t(h * 64 + i)];
    }

    std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
    for (std::int64_t i = 0; i < pages; ++i) table[std::size_t(i)] = std::int32_t(i);
    const std::int32_t len = std::int32_t(tokens);
    std::vector<float> o_lat(std::size_t(heads * rank));
    kvkit::PagedDecodeParams p = kvkit::mla_decode_params(c, layout, cache.data(), kvkit::DType::kFloat32);
    p.q = q_dec.data();
    p.q_stride_token = std::int64_t(heads) * lat;
    p.q_stride_head = lat;
    p.page_table = {table.data(), &len, 1, pages, pages};
    p.o = o_lat.data();
    p.o_stride_token = std::int64_t(heads) * rank;
    p.o_stride_head = rank;
    p.q_dtype = kvkit::DType::kFloat32;
    kvkit::mla_decode_attention(p);
    kvkit::mla_project_output(c, o_lat.data(), std::int64_t(heads) * rank, rank, 1, w_uv.data(), out);
  });
}

/// The gpt_decode example's reading of a llama2.c checkpoint: loads `path`
/// (gpt::load_llama2c) and writes the logits [vocab] of the last of `n`
/// tokens from its no-cache reference forward (gpt::reference_last_logits,
/// RoPE base 10000, interleaved pairs as llama2.c). The example's --check
/// ties its kvkit-cached serving path to this forward.
int kvkit_llama2c_last_logits(const char* path, const std::int32_t* tokens, std::int64_t n, float* logits) {
  return guarded([&] {
    gpt::Config c;
    gpt::Weights w;
    gpt::load_llama2c(path, c, w);
    const std::vector<float> out = gpt::reference_last_logits(c, w, std::vector<std::int32_t>(tokens, tokens + n), 10000.0);
    for (std::size_t i = 0; i < out.size(); ++i) logits[i] = out[i];
  });
}

}  // extern "C"
