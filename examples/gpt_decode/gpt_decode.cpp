// gpt_decode: a serving-shaped decode loop for a small Llama-style model,
// built from kvkit's pieces. Read it top to bottom as a tutorial:
//
//   1. the engine state: a KVCacheManager (which blocks hold whose tokens), one
//      paged K and V cache per layer, and a RoPE table;
//   2. each step: admit arriving requests (reusing cached prefixes), reserve
//      cache slots for the tokens to compute (preempting when out of blocks),
//      run the model on those tokens (fused RoPE + append into the paged cache,
//      paged attention), sample, commit full blocks to the prefix cache, and
//      free finished requests;
//   3. a summary: latency, throughput, KV memory and prefix-cache hits.
//
// kvkit does all cache work; the matmuls are plain loops (an engine would call
// its BLAS). `--check` recomputes every sampled token's logits from scratch,
// with no cache and no kvkit code, and reports the largest difference.

#include <kvkit/kvkit.hpp>
#include <kvkit/memory/prefix_cache.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "llama_model.hpp"
#include "tokenizer.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  gpt::Config model;
  std::string checkpoint, tokenizer, prompt;
  std::uint64_t seed = 42;
  int requests = 6;          // requests in the workload
  int shared_prefix = 40;    // tokens of a system prompt all requests share
  int prompt_len = 56;       // tokens per prompt, shared prefix included
  int max_new_tokens = 24;   // tokens to generate per request
  int arrival_gap = 2;       // steps between request arrivals
  int chunk = 32;            // prefill chunk: most prompt tokens a request computes per step
  int block_size = 16;       // tokens per KV block
  int num_blocks = 0;        // KV blocks (0: enough for every request at once)
  float temperature = 0.0f;  // 0: greedy
  float top_p = 0.9f;
  bool check = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "gpt_decode: %s\n"
               "usage: gpt_decode [--random] [--checkpoint model.bin [--tokenizer tokenizer.bin --prompt TEXT]]\n"
               "  model (with --random): --dim N --hidden N --layers N --heads N --kv-heads N --vocab N --max-context N\n"
               "  workload: --requests N --shared-prefix N --prompt-len N --gen N --arrival-gap N --chunk N\n"
               "  cache: --block-size N --num-blocks N   sampling: --temperature T --top-p P --seed S\n"
               "  --check: recompute each sampled token's logits without a cache and report the max difference\n",
               why);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) usage(("missing value for " + a).c_str());
      return argv[++i];
    };
    auto num = [&]() { return std::atoi(next()); };
    if (a == "--random") continue;
    else if (a == "--checkpoint") o.checkpoint = next();
    else if (a == "--tokenizer") o.tokenizer = next();
    else if (a == "--prompt") o.prompt = next();
    else if (a == "--dim") o.model.dim = num();
    else if (a == "--hidden") o.model.hidden_dim = num();
    else if (a == "--layers") o.model.n_layers = num();
    else if (a == "--heads") o.model.n_heads = num();
    else if (a == "--kv-heads") o.model.n_kv_heads = num();
    else if (a == "--vocab") o.model.vocab_size = num();
    else if (a == "--max-context") o.model.max_seq_len = num();
    else if (a == "--requests") o.requests = num();
    else if (a == "--shared-prefix") o.shared_prefix = num();
    else if (a == "--prompt-len") o.prompt_len = num();
    else if (a == "--gen") o.max_new_tokens = num();
    else if (a == "--arrival-gap") o.arrival_gap = num();
    else if (a == "--chunk") o.chunk = num();
    else if (a == "--block-size") o.block_size = num();
    else if (a == "--num-blocks") o.num_blocks = num();
    else if (a == "--temperature") o.temperature = float(std::atof(next()));
    else if (a == "--top-p") o.top_p = float(std::atof(next()));
    else if (a == "--seed") o.seed = std::strtoull(next(), nullptr, 10);
    else if (a == "--check") o.check = true;
    else usage(("unknown flag " + a).c_str());
  }
  if (o.requests < 1 || o.prompt_len < 1 || o.max_new_tokens < 1 || o.chunk < 1 || o.arrival_gap < 0)
    usage("--requests, --prompt-len, --gen and --chunk must be >= 1, --arrival-gap >= 0");
  o.shared_prefix = std::min(o.shared_prefix, o.prompt_len);
  return o;
}

// One request of the workload and its progress.
struct Request {
  std::vector<std::int32_t> tokens;  // prompt, then generated tokens
  int prompt_len = 0;
  int generated = 0;
  int arrival_step = 0;
  enum State { kWaiting, kRunning, kPreempted, kDone } state = kWaiting;
  kvkit::SequenceId seq;
  std::int64_t computed = 0;  // tokens whose K/V are in the cache
  Clock::time_point arrived, last_token;
  double ttft_ms = 0;
  std::vector<double> tpot_ms;
};

// Work of one request in one step: compute K/V (and the next token's logits)
// for tokens [first, first + count).
struct Work {
  int request;
  std::int64_t first, count;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, std::size_t(p * double(v.size() - 1) + 0.5))];
}

std::int32_t sample(const std::vector<float>& logits, float temperature, float top_p, std::mt19937_64& rng) {
  if (temperature <= 0.0f) return std::int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  const float m = *std::max_element(logits.begin(), logits.end());
  std::vector<std::pair<float, std::int32_t>> probs(logits.size());
  float sum = 0.0f;
  for (std::size_t i = 0; i < logits.size(); ++i) sum += (probs[i].first = std::exp((logits[i] - m) / temperature));
  for (std::size_t i = 0; i < logits.size(); ++i) probs[i] = {probs[i].first / sum, std::int32_t(i)};
  std::sort(probs.begin(), probs.end(), [](auto a, auto b) { return a.first > b.first; });
  float mass = 0.0f;
  std::size_t keep = 0;
  while (keep < probs.size() && mass < top_p) mass += probs[keep++].first;
  float r = std::uniform_real_distribution<float>(0.0f, mass)(rng);
  for (std::size_t i = 0; i < keep; ++i) {
    if ((r -= probs[i].first) <= 0.0f) return probs[i].second;
  }
  return probs[keep - 1].second;
}

}  // namespace

int main(int argc, char** argv) try {
  Options opt = parse(argc, argv);

  // ---------------------------------------------------------------- model
  gpt::Config cfg = opt.model;
  gpt::Weights weights;
  if (!opt.checkpoint.empty()) {
    gpt::load_llama2c(opt.checkpoint, cfg, weights);
  } else {
    cfg.shared_classifier = false;
    cfg.validate();
    weights = gpt::random_weights(cfg, opt.seed);
  }
  const int hd = cfg.head_dim(), kv_heads = cfg.n_kv_heads, q_heads = cfg.n_heads, d = cfg.dim;
  std::printf("model: dim %d, %d layers, %d q heads / %d kv heads of %d, vocab %d, max context %d (%s)\n", d,
              cfg.n_layers, q_heads, kv_heads, hd, cfg.vocab_size, cfg.max_seq_len,
              opt.checkpoint.empty() ? "random weights" : opt.checkpoint.c_str());

  // ---------------------------------------------------------------- workload
  std::mt19937_64 rng(opt.seed);
  std::vector<Request> requests(std::size_t(opt.requests));
  std::vector<std::int32_t> system_prompt(std::size_t(opt.shared_prefix));
  for (auto& t : system_prompt) t = std::int32_t(rng() % std::uint64_t(cfg.vocab_size));
  std::unique_ptr<gpt::Tokenizer> tokenizer;
  if (!opt.tokenizer.empty()) tokenizer = std::make_unique<gpt::Tokenizer>(opt.tokenizer, cfg.vocab_size);
  for (int r = 0; r < opt.requests; ++r) {
    Request& req = requests[r];
    if (tokenizer && !opt.prompt.empty()) {
      req.tokens = tokenizer->encode(opt.prompt, /*bos=*/true);  // every request: the same text prompt
    } else {
      req.tokens = system_prompt;
      while (int(req.tokens.size()) < opt.prompt_len) req.tokens.push_back(std::int32_t(rng() % std::uint64_t(cfg.vocab_size)));
    }
    req.prompt_len = int(req.tokens.size());
    req.arrival_step = r * opt.arrival_gap;
    kvkit::check(req.prompt_len + opt.max_new_tokens <= cfg.max_seq_len, "gpt_decode", "prompt (", req.prompt_len,
                 ") + --gen (", opt.max_new_tokens, ") exceeds the max context ", cfg.max_seq_len);
  }

  // ---------------------------------------------------------------- engine state
  const int B = opt.block_size;
  const std::int64_t blocks_per_request = (cfg.max_seq_len + B - 1) / B;
  if (opt.num_blocks == 0) opt.num_blocks = int(1 + opt.requests * blocks_per_request);
  kvkit::check(opt.num_blocks >= 1 + blocks_per_request, "gpt_decode", "--num-blocks ", opt.num_blocks,
               " cannot hold one request of max context; expected >= ", 1 + blocks_per_request);
  kvkit::KVCacheManagerOptions mopt;
  mopt.num_blocks = opt.num_blocks;
  mopt.block_size = B;
  kvkit::KVCacheManager manager(mopt);  // block 0 is the null block
  const auto layout = kvkit::PagedKVLayout::nhd(opt.num_blocks, B, kv_heads, hd);
  std::vector<std::vector<float>> k_cache(std::size_t(cfg.n_layers)), v_cache(std::size_t(cfg.n_layers));
  for (int l = 0; l < cfg.n_layers; ++l) {
    k_cache[l].assign(std::size_t(layout.num_pages * layout.page_elements()), 0.0f);
    v_cache[l].assign(k_cache[l].size(), 0.0f);
  }
  // llama2.c models rotate interleaved pairs with base 10000.
  const kvkit::RopeConfig rope_cfg{hd, hd, 10000.0, kvkit::RopeStyle::kGptJ, {}};
  const kvkit::RopeCache rope_table(rope_cfg, cfg.max_seq_len);

  // ---------------------------------------------------------------- the loop
  std::mt19937_64 sampler(opt.seed + 1);
  double max_check_diff = 0.0;
  std::int64_t generated_total = 0, peak_blocks = 0, peak_active = 0, preemptions = 0;
  const auto start = Clock::now();
  int step = 0;
  auto done = [&] { return std::all_of(requests.begin(), requests.end(), [](const Request& r) { return r.state == Request::kDone; }); };
  for (; !done(); ++step) {
    // 1. Admit arrivals: a new sequence first takes whatever prefix of its
    //    prompt is already cached (whole blocks, keeping one token to compute).
    for (Request& r : requests) {
      if (r.state != Request::kWaiting || r.arrival_step > step) continue;
      r.seq = manager.create_sequence();
      r.arrived = Clock::now();
      std::vector<kvkit::BlockHash> hashes(std::size_t(r.prompt_len / B));
      const std::int64_t n = kvkit::hash_blocks(r.tokens.data(), r.prompt_len - 1, B, hashes.data());
      r.computed = manager.attach_prefix(r.seq, hashes.data(), n).num_tokens;
      r.state = Request::kRunning;
    }
    // 2. Reserve slots, oldest request first. Out of blocks: preempt the newest
    //    running request by recomputation (its cached blocks stay reusable).
    std::vector<Work> work;
    std::vector<std::int64_t> slots;
    for (int i = 0; i < opt.requests; ++i) {
      Request& r = requests[i];
      if (r.state == Request::kPreempted) {
        r.computed = manager.resume_from_cache(r.seq).num_tokens;
        r.state = Request::kRunning;
      }
      if (r.state != Request::kRunning) continue;
      const std::int64_t count = std::min<std::int64_t>(opt.chunk, std::int64_t(r.tokens.size()) - r.computed);
      std::vector<std::int64_t> mine(static_cast<std::size_t>(count));
      while (!manager.reserve(r.seq, count, mine.data())) {
        int victim = -1;
        for (int j = opt.requests - 1; j >= 0 && victim < 0; --j) {
          if (j != i && requests[j].state == Request::kRunning && requests[j].computed > 0 &&
              std::none_of(work.begin(), work.end(), [&](const Work& w) { return w.request == j; })) victim = j;
        }
        if (victim < 0) { victim = i; }
        manager.preempt_recompute(requests[victim].seq);
        requests[victim].state = Request::kPreempted;
        requests[victim].computed = 0;
        ++preemptions;
        if (victim == i) break;
      }
      if (r.state != Request::kRunning) continue;
      work.push_back({i, r.computed, count});
      slots.insert(slots.end(), mine.begin(), mine.end());
    }
    // Copy-on-write copies (none in this workload unless requests fork) run
    // on every layer's K and V before this step writes the cache.
    const kvkit::BlockTransfers transfers = manager.take_transfers();
    if (!transfers.copies.empty()) {
      std::vector<std::int64_t> pairs;
      for (const auto& c : transfers.copies) pairs.insert(pairs.end(), {c.src, c.dst});
      for (int l = 0; l < cfg.n_layers; ++l) {
        void* caches[2] = {k_cache[l].data(), v_cache[l].data()};
        kvkit::copy_blocks(layout, {caches, 2, pairs.data(), std::int64_t(transfers.copies.size()), kvkit::DType::kFloat32});
      }
    }
    if (work.empty()) continue;

    // 3. The model on this step's tokens. Rows are (request, token) in work order.
    std::int64_t rows = 0;
    for (const Work& w : work) rows += w.count;
    std::vector<std::int64_t> positions;
    std::vector<float> x(std::size_t(rows) * d);
    {
      std::int64_t row = 0;
      for (const Work& w : work)
        for (std::int64_t t = 0; t < w.count; ++t, ++row) {
          const std::int32_t tok = requests[w.request].tokens[std::size_t(w.first + t)];
          positions.push_back(w.first + t);
          std::memcpy(&x[std::size_t(row) * d], &weights.token_embedding[std::size_t(tok) * d], sizeof(float) * d);
        }
    }
    // Page table of the step's sequences (lengths include this step's tokens).
    std::vector<kvkit::SequenceId> seqs;
    for (const Work& w : work) seqs.push_back(requests[w.request].seq);
    std::vector<std::int32_t> table(work.size() * std::size_t(blocks_per_request)), seq_lens(work.size());
    manager.build_block_table(seqs.data(), std::int64_t(seqs.size()), blocks_per_request, table.data(), seq_lens.data());

    std::vector<float> n(static_cast<std::size_t>(d)), q(std::size_t(rows) * d), k(std::size_t(rows) * cfg.kv_dim()),
        v(k.size()), att(q.size()), o(static_cast<std::size_t>(d));
    for (int l = 0; l < cfg.n_layers; ++l) {
      const std::size_t dd = std::size_t(d) * d, kvdd = std::size_t(cfg.kv_dim()) * d;
      for (std::int64_t r = 0; r < rows; ++r) {
        gpt::rmsnorm(n.data(), &x[std::size_t(r) * d], weights.rms_att.data() + std::size_t(l) * d, d);
        gpt::matvec(&q[std::size_t(r) * d], weights.wq.data() + l * dd, n.data(), d, d);
        gpt::matvec(&k[std::size_t(r) * cfg.kv_dim()], weights.wk.data() + l * kvdd, n.data(), cfg.kv_dim(), d);
        gpt::matvec(&v[std::size_t(r) * cfg.kv_dim()], weights.wv.data() + l * kvdd, n.data(), cfg.kv_dim(), d);
      }
      // kvkit: rotate q in place and write rotated k and v into the paged cache.
      kvkit::RopeParams rope;
      rope.q = q.data();
      rope.q_token_stride = d;
      rope.q_head_stride = hd;
      rope.num_q_heads = q_heads;
      rope.positions = positions.data();
      rope.num_tokens = rows;
      rope.head_dim = hd;
      rope.rotary_dim = hd;
      rope.style = rope_cfg.style;
      rope.dtype = kvkit::DType::kFloat32;
      rope_table.attach(rope);
      kvkit::rope_append_kv(rope, layout,
                            kvkit::AppendKVArgs::dense(k.data(), v.data(), slots.data(), rows, kv_heads, hd,
                                                       k_cache[l].data(), v_cache[l].data(), kvkit::DType::kFloat32));
      // kvkit: paged attention. Each work item is one sequence of the page
      // table with q_len = its token count (causal within the chunk).
      std::int64_t row = 0;
      for (std::size_t w = 0; w < work.size(); ++w) {
        kvkit::PagedDecodeParams p;
        p.q = &q[std::size_t(row) * d];
        p.q_stride_head = hd;
        p.q_stride_token = d;
        p.k_cache = k_cache[l].data();
        p.v_cache = v_cache[l].data();
        p.layout = layout;
        p.page_table = {&table[w * std::size_t(blocks_per_request)], &seq_lens[w], 1, blocks_per_request,
                        blocks_per_request};
        p.q_len = int(work[w].count);
        p.num_q_heads = q_heads;
        p.sm_scale = 1.0f / std::sqrt(float(hd));
        p.o = &att[std::size_t(row) * d];
        p.o_stride_head = hd;
        p.o_stride_token = d;
        kvkit::paged_decode_attention(p);
        row += work[w].count;
      }
      for (std::int64_t r = 0; r < rows; ++r) {
        gpt::matvec(o.data(), weights.wo.data() + l * dd, &att[std::size_t(r) * d], d, d);
        for (int i = 0; i < d; ++i) x[std::size_t(r) * d + i] += o[i];
        gpt::ffn(cfg, weights, l, &x[std::size_t(r) * d]);
      }
    }

    // 4. Sample where a request's last known token was computed; commit full
    //    blocks to the prefix cache; retire finished requests.
    std::int64_t row = 0;
    for (const Work& w : work) {
      Request& r = requests[w.request];
      row += w.count;
      r.computed += w.count;
      const std::int64_t full = r.computed / B;
      const std::int64_t committed = std::int64_t(manager.committed_hashes(r.seq).size());
      if (full > committed) {
        std::vector<kvkit::BlockHash> hashes(static_cast<std::size_t>(full));
        kvkit::hash_blocks(r.tokens.data(), full * B, B, hashes.data());
        manager.commit_blocks(r.seq, hashes.data() + committed, full - committed);
      }
      if (r.computed < std::int64_t(r.tokens.size())) continue;  // prompt not finished yet
      std::vector<float> logits(static_cast<std::size_t>(cfg.vocab_size));
      gpt::logits_of(cfg, weights, &x[std::size_t(row - 1) * d], logits.data());
      if (opt.check) {
        const auto ref = gpt::reference_last_logits(cfg, weights, r.tokens, 10000.0);
        for (std::size_t i = 0; i < ref.size(); ++i) max_check_diff = std::max(max_check_diff, double(std::fabs(ref[i] - logits[i])));
      }
      const std::int32_t next = sample(logits, opt.temperature, opt.top_p, sampler);
      const auto now = Clock::now();
      if (r.generated == 0) {
        r.ttft_ms = std::chrono::duration<double, std::milli>(now - r.arrived).count();
      } else {
        r.tpot_ms.push_back(std::chrono::duration<double, std::milli>(now - r.last_token).count());
      }
      r.last_token = now;
      r.tokens.push_back(next);
      ++r.generated;
      ++generated_total;
      if (r.generated == opt.max_new_tokens) {
        manager.free_sequence(r.seq);
        r.state = Request::kDone;
      }
    }
    const kvkit::KVCacheStats stats = manager.stats();
    peak_blocks = std::max<std::int64_t>(peak_blocks, stats.device.num_used);
    peak_active = std::max<std::int64_t>(peak_active, stats.num_sequences);
    if (step % 20 == 0) {
      std::fprintf(stderr, "\rstep %d: %lld tokens generated, %d sequences, %d/%d blocks used", step,
                   (long long)generated_total, stats.num_sequences, stats.device.num_used, stats.device.num_blocks);
    }
  }
  std::fprintf(stderr, "\n");
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  // ---------------------------------------------------------------- summary
  if (tokenizer) {
    const Request& r = requests[0];
    std::printf("request 0: ");
    for (std::size_t i = 1; i < r.tokens.size(); ++i) std::printf("%s", tokenizer->decode(r.tokens[i - 1], r.tokens[i]).c_str());
    std::printf("\n");
  } else {
    std::printf("request 0 generated:");
    for (std::size_t i = std::size_t(requests[0].prompt_len); i < requests[0].tokens.size(); ++i) std::printf(" %d", requests[0].tokens[i]);
    std::printf("\n");
  }
  std::vector<double> ttft, tpot;
  for (const Request& r : requests) {
    ttft.push_back(r.ttft_ms);
    tpot.insert(tpot.end(), r.tpot_ms.begin(), r.tpot_ms.end());
  }
  const kvkit::KVCacheStats stats = manager.stats();
  const double lookups = double(stats.device.hits + stats.device.misses);
  std::printf("requests: %d in %d steps, %lld tokens generated, %.1f tokens/s\n", opt.requests, step,
              (long long)generated_total, double(generated_total) / seconds);
  std::printf("TTFT: p50 %.2f ms, p99 %.2f ms; TPOT: p50 %.2f ms, p99 %.2f ms\n", percentile(ttft, 0.5),
              percentile(ttft, 0.99), percentile(tpot, 0.5), percentile(tpot, 0.99));
  std::printf("KV blocks at peak: %lld of %d (%d tokens each); a contiguous max-length cache for the %lld "
              "concurrent requests would take %lld\n",
              (long long)peak_blocks, opt.num_blocks, B, (long long)peak_active, (long long)(peak_active * blocks_per_request));
  std::printf("prefix cache: %lld of %.0f looked-up blocks hit (%.0f%%); %lld preemptions\n", (long long)stats.device.hits,
              lookups, lookups > 0 ? 100.0 * double(stats.device.hits) / lookups : 0.0, (long long)preemptions);
  manager.check_invariants();
  if (opt.check) {
    const bool ok = max_check_diff <= 1e-4;
    std::printf("check: max |logits - cache-free reference| = %.3g (%s, tolerance 1e-4)\n", max_check_diff, ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
  }
  return 0;
} catch (const kvkit::Error& e) {
  std::fprintf(stderr, "gpt_decode: %s\n", e.what());
  return 1;
}
