#pragma once
// A small Llama-style decoder for the gpt_decode example: configuration,
// weights (random from a seed, or a llama2.c checkpoint), the per-token math
// (RMSNorm, matmuls, SwiGLU) and a cache-free reference forward for --check.
// The KV cache, RoPE and attention over the cache come from kvkit; the GEMMs
// are plain loops (an engine would call its BLAS).

#include <kvkit/core/error.hpp>

#include "../common/model_math.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace gpt {

struct Config {
  int dim = 288;
  int hidden_dim = 768;
  int n_layers = 6;
  int n_heads = 6;
  int n_kv_heads = 6;
  int vocab_size = 512;
  int max_seq_len = 256;
  bool shared_classifier = true;
  int head_dim() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_dim(); }

  void validate() const {
    constexpr const char* kWhere = "gpt::Config";
    kvkit::check_argument(dim > 0 && n_heads > 0 && dim % n_heads == 0, kWhere, "dim", dim,
                          "a positive multiple of n_heads (", n_heads, ")");
    kvkit::check_argument(head_dim() % 2 == 0, kWhere, "dim / n_heads", head_dim(), "even (RoPE pairs)");
    kvkit::check_argument(n_kv_heads > 0 && n_heads % n_kv_heads == 0, kWhere, "n_kv_heads",
                          n_kv_heads, "a positive divisor of n_heads (", n_heads, ")");
    kvkit::check_argument(hidden_dim > 0, kWhere, "hidden_dim", hidden_dim, "> 0");
    kvkit::check_argument(n_layers > 0, kWhere, "n_layers", n_layers, "> 0");
    kvkit::check_argument(vocab_size > 0, kWhere, "vocab_size", vocab_size, "> 0");
    kvkit::check_argument(max_seq_len > 0, kWhere, "max_seq_len", max_seq_len, "> 0");
  }
};

// Weight matrices are row-major [out, in], as llama2.c stores them.
struct Weights {
  std::vector<float> token_embedding;  // [vocab, dim]
  std::vector<float> rms_att;          // [layers, dim]
  std::vector<float> wq, wk, wv, wo;   // [layers, dim, dim], [layers, kv_dim, dim] x2, [layers, dim, dim]
  std::vector<float> rms_ffn;          // [layers, dim]
  std::vector<float> w1, w2, w3;       // [layers, hidden, dim], [layers, dim, hidden], [layers, hidden, dim]
  std::vector<float> rms_final;        // [dim]
  std::vector<float> classifier;       // [vocab, dim] (a copy of the embedding when shared)
};

inline Weights random_weights(const Config& c, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto fill = [&](std::vector<float>& w, std::size_t n, float scale) {
    std::normal_distribution<float> normal(0.0f, scale);
    w.resize(n);
    for (float& x : w) x = normal(rng);
  };
  const std::size_t L = std::size_t(c.n_layers), d = std::size_t(c.dim), h = std::size_t(c.hidden_dim);
  const std::size_t kv = std::size_t(c.kv_dim()), v = std::size_t(c.vocab_size);
  Weights w;
  const float s = 1.0f / std::sqrt(float(c.dim));
  fill(w.token_embedding, v * d, 1.0f);
  w.rms_att.assign(L * d, 1.0f);
  w.rms_ffn.assign(L * d, 1.0f);
  w.rms_final.assign(d, 1.0f);
  fill(w.wq, L * d * d, s);
  fill(w.wk, L * kv * d, s);
  fill(w.wv, L * kv * d, s);
  fill(w.wo, L * d * d, s);
  fill(w.w1, L * h * d, s);
  fill(w.w2, L * d * h, 1.0f / std::sqrt(float(c.hidden_dim)));
  fill(w.w3, L * h * d, s);
  // An unshared classifier (c.shared_classifier false) keeps random models
  // from simply predicting their input token.
  if (c.shared_classifier) {
    w.classifier = w.token_embedding;
  } else {
    fill(w.classifier, v * d, s);
  }
  return w;
}

// ---------------------------------------------------------------- llama2.c checkpoints
// Format (Karpathy's llama2.c, "version 0"): 7 int32 (dim, hidden_dim,
// n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size
// means an unshared classifier), then float32 arrays: embedding, rms_att, wq,
// wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, two RoPE tables of
// [seq_len, head_dim / 2] (unused: kvkit computes its own), classifier if unshared.

inline void save_llama2c(const std::string& path, const Config& c, const Weights& w) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  kvkit::check(f != nullptr, "gpt::save_llama2c", "cannot open '", path, "' for writing");
  const std::int32_t header[7] = {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                                  c.shared_classifier ? c.vocab_size : -c.vocab_size, c.max_seq_len};
  bool ok = std::fwrite(header, sizeof(header), 1, f) == 1;
  auto put = [&](const std::vector<float>& v) {
    ok = ok && (v.empty() || std::fwrite(v.data(), sizeof(float), v.size(), f) == v.size());
  };
  for (auto* v : {&w.token_embedding, &w.rms_att, &w.wq, &w.wk, &w.wv, &w.wo, &w.rms_ffn, &w.w1,
                  &w.w2, &w.w3, &w.rms_final}) {
    put(*v);
  }
  put(std::vector<float>(std::size_t(c.max_seq_len) * std::size_t(c.head_dim()), 0.0f));  // RoPE tables
  if (!c.shared_classifier) put(w.classifier);
  ok = std::fclose(f) == 0 && ok;
  kvkit::check(ok, "gpt::save_llama2c", "writing '", path, "' failed");
}

// Reads and validates a checkpoint; throws kvkit::Error naming the file and
// what is wrong (missing, truncated, trailing bytes, implausible header).
inline void load_llama2c(const std::string& path, Config& c, Weights& w) {
  constexpr const char* kWhere = "gpt::load_llama2c";
  std::FILE* f = std::fopen(path.c_str(), "rb");
  kvkit::check(f != nullptr, kWhere, "cannot open checkpoint '", path, "'");
  std::int32_t h[7];
  if (std::fread(h, sizeof(h), 1, f) != 1) {
    std::fclose(f);
    kvkit::fail(kWhere, "'", path, "' is shorter than the 28-byte llama2.c header");
  }
  Config cfg;
  cfg.dim = h[0];
  cfg.hidden_dim = h[1];
  cfg.n_layers = h[2];
  cfg.n_heads = h[3];
  cfg.n_kv_heads = h[4];
  cfg.shared_classifier = h[5] > 0;
  cfg.vocab_size = h[5] > 0 ? h[5] : -h[5];
  cfg.max_seq_len = h[6];
  try {
    cfg.validate();
    for (int i = 0; i < 7; ++i) {
      kvkit::check(i == 5 || h[i] <= (1 << 20), kWhere, "header field ", i, " = ", h[i],
                   " is implausible; expected a llama2.c checkpoint");
    }
  } catch (const kvkit::Error& e) {
    std::fclose(f);
    kvkit::fail(kWhere, "'", path, "' has an invalid header: ", e.what());
  }
  const std::size_t L = std::size_t(cfg.n_layers), d = std::size_t(cfg.dim),
                    hd = std::size_t(cfg.hidden_dim), kv = std::size_t(cfg.kv_dim()),
                    v = std::size_t(cfg.vocab_size);
  Weights out;
  bool ok = true;
  auto get = [&](std::vector<float>& dst, std::size_t n) {
    dst.resize(n);
    ok = ok && std::fread(dst.data(), sizeof(float), n, f) == n;
  };
  get(out.token_embedding, v * d);
  get(out.rms_att, L * d);
  get(out.wq, L * d * d);
  get(out.wk, L * kv * d);
  get(out.wv, L * kv * d);
  get(out.wo, L * d * d);
  get(out.rms_ffn, L * d);
  get(out.w1, L * hd * d);
  get(out.w2, L * d * hd);
  get(out.w3, L * hd * d);
  get(out.rms_final, d);
  std::vector<float> rope_tables;
  get(rope_tables, std::size_t(cfg.max_seq_len) * std::size_t(cfg.head_dim()));
  if (cfg.shared_classifier) {
    out.classifier = out.token_embedding;
  } else {
    get(out.classifier, v * d);
  }
  const bool at_end = ok && std::fgetc(f) == EOF;
  std::fclose(f);
  kvkit::check(ok, kWhere, "'", path, "' is truncated: the header promises more weights than the file holds");
  kvkit::check(at_end, kWhere, "'", path, "' has bytes after the last weight; expected a llama2.c checkpoint of this header");
  c = cfg;
  w = std::move(out);
}

// ---------------------------------------------------------------- per-token math

using examples::matvec;
using examples::rmsnorm;

// The feed-forward block, in place on the residual x: x += W2 (silu(W1 n) * W3 n), n = rmsnorm(x).
inline void ffn(const Config& c, const Weights& w, int layer, float* x) {
  std::vector<float> n(static_cast<std::size_t>(c.dim)), a(static_cast<std::size_t>(c.hidden_dim)), b(a.size());
  rmsnorm(n.data(), x, w.rms_ffn.data() + std::size_t(layer) * c.dim, c.dim);
  const std::size_t hd = std::size_t(c.hidden_dim) * c.dim;
  matvec(a.data(), w.w1.data() + layer * hd, n.data(), c.hidden_dim, c.dim);
  matvec(b.data(), w.w3.data() + layer * hd, n.data(), c.hidden_dim, c.dim);
  for (int i = 0; i < c.hidden_dim; ++i) a[i] = examples::silu(a[i]) * b[i];
  std::vector<float> out(static_cast<std::size_t>(c.dim));
  matvec(out.data(), w.w2.data() + layer * hd, a.data(), c.dim, c.hidden_dim);
  for (int i = 0; i < c.dim; ++i) x[i] += out[i];
}

inline void logits_of(const Config& c, const Weights& w, const float* x, float* logits) {
  std::vector<float> n(static_cast<std::size_t>(c.dim));
  rmsnorm(n.data(), x, w.rms_final.data(), c.dim);
  matvec(logits, w.classifier.data(), n.data(), c.vocab_size, c.dim);
}

// ---------------------------------------------------------------- reference forward (no cache)

// Logits of the last token of `tokens`, recomputed from scratch with dense
// causal attention in float64 softmax and RoPE angles computed directly —
// no kvkit code involved. Used by --check.
inline std::vector<float> reference_last_logits(const Config& c, const Weights& w,
                                                const std::vector<std::int32_t>& tokens, double rope_base) {
  const int T = int(tokens.size()), d = c.dim, hdim = c.head_dim(), kvd = c.kv_dim();
  const int group = c.n_heads / c.n_kv_heads;
  std::vector<float> x(std::size_t(T) * d);
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < d; ++i) x[std::size_t(t) * d + i] = w.token_embedding[std::size_t(tokens[t]) * d + i];
  std::vector<float> q(std::size_t(T) * d), k(std::size_t(T) * kvd), v(std::size_t(T) * kvd), n(d), att(d), o(d);
  auto rotate = [&](float* vec, int heads, int pos) {  // interleaved pairs, as llama2.c
    for (int hh = 0; hh < heads; ++hh)
      for (int j = 0; j < hdim / 2; ++j) {
        const double angle = double(pos) * std::pow(rope_base, -2.0 * j / hdim);
        const double cs = std::cos(angle), sn = std::sin(angle);
        float& a = vec[hh * hdim + 2 * j];
        float& b = vec[hh * hdim + 2 * j + 1];
        const double a0 = a, b0 = b;
        a = float(a0 * cs - b0 * sn);
        b = float(b0 * cs + a0 * sn);
      }
  };
  for (int l = 0; l < c.n_layers; ++l) {
    for (int t = 0; t < T; ++t) {
      rmsnorm(n.data(), &x[std::size_t(t) * d], w.rms_att.data() + std::size_t(l) * d, d);
      matvec(&q[std::size_t(t) * d], w.wq.data() + std::size_t(l) * d * d, n.data(), d, d);
      matvec(&k[std::size_t(t) * kvd], w.wk.data() + std::size_t(l) * kvd * d, n.data(), kvd, d);
      matvec(&v[std::size_t(t) * kvd], w.wv.data() + std::size_t(l) * kvd * d, n.data(), kvd, d);
      rotate(&q[std::size_t(t) * d], c.n_heads, t);
      rotate(&k[std::size_t(t) * kvd], c.n_kv_heads, t);
    }
    for (int t = 0; t < T; ++t) {
      for (int hh = 0; hh < c.n_heads; ++hh) {
        const int kvh = hh / group;
        std::vector<double> s(static_cast<std::size_t>(t + 1));
        double m = -1e300;
        for (int j = 0; j <= t; ++j) {
          double dot = 0;
          for (int e = 0; e < hdim; ++e) dot += double(q[std::size_t(t) * d + hh * hdim + e]) * k[std::size_t(j) * kvd + kvh * hdim + e];
          s[j] = dot / std::sqrt(double(hdim));
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - m));
        for (int e = 0; e < hdim; ++e) {
          double acc = 0;
          for (int j = 0; j <= t; ++j) acc += s[j] / sum * v[std::size_t(j) * kvd + kvh * hdim + e];
          att[hh * hdim + e] = float(acc);
        }
      }
      matvec(o.data(), w.wo.data() + std::size_t(l) * d * d, att.data(), d, d);
      for (int i = 0; i < d; ++i) x[std::size_t(t) * d + i] += o[i];
    }
    for (int t = 0; t < T; ++t) ffn(c, w, l, &x[std::size_t(t) * d]);
  }
  std::vector<float> logits(static_cast<std::size_t>(c.vocab_size));
  logits_of(c, w, &x[std::size_t(T - 1) * d], logits.data());
  return logits;
}

}  // namespace gpt
