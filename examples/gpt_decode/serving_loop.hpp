#pragma once
// The serving loop of gpt_decode, shared by the CPU build (gpt_decode.cpp)
// and the CUDA build (gpt_decode_cuda.cu): flags, the workload, the
// scheduler (admit, reserve, preempt, commit, sample, retire) and the
// summary. Everything here runs on the host; the model's forward pass over
// one step's tokens is the `Model` each build passes to serve():
//
//   struct Model {
//     // Copy-on-write page copies (src, dst) on every layer's K and V cache.
//     void copy_blocks(const std::vector<std::int64_t>& pairs);
//     // Run every layer on step.tokens (writing their K/V at step.slots) and
//     // return the logits of the last row of each work item in step.sampled.
//     void forward(const gpt::Step& step, float* logits);  // [sampled, vocab]
//   };

#include <kvkit/kvkit.hpp>
#include <kvkit/memory/prefix_cache.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>  // isatty

#include "llama_model.hpp"
#include "tokenizer.hpp"

namespace gpt {

using Clock = std::chrono::steady_clock;

struct Options {
  Config model;
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
  bool print_tokens = false;  // one "tokens <request>: ids..." line per request
  std::int64_t blocks_per_request() const { return (model.max_seq_len + block_size - 1) / block_size; }
};

[[noreturn]] inline void usage(const char* program, const char* why) {
  std::fprintf(stderr,
               "%s: %s\n"
               "usage: %s [--random] [--checkpoint model.bin [--tokenizer tokenizer.bin --prompt TEXT]]\n"
               "  model (with --random): --dim N --hidden N --layers N --heads N --kv-heads N --vocab N --max-context N\n"
               "  workload: --requests N --shared-prefix N --prompt-len N --gen N --arrival-gap N --chunk N\n"
               "  cache: --block-size N --num-blocks N   sampling: --temperature T --top-p P --seed S\n"
               "  --check: recompute each sampled token's logits without a cache and report the max difference\n"
               "  --print-tokens: print every request's generated token ids\n",
               program, why, program);
  std::exit(2);
}

inline Options parse_options(int argc, char** argv, const char* program) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) usage(program, ("missing value for " + a).c_str());
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
    else if (a == "--print-tokens") o.print_tokens = true;
    else usage(program, ("unknown flag " + a).c_str());
  }
  if (o.requests < 1 || o.prompt_len < 1 || o.max_new_tokens < 1 || o.chunk < 1 || o.arrival_gap < 0 ||
      o.block_size < 1)
    usage(program, "--requests, --prompt-len, --gen, --chunk and --block-size must be >= 1, --arrival-gap >= 0");
  o.shared_prefix = std::min(o.shared_prefix, o.prompt_len);
  return o;
}

// Loads the checkpoint or makes random weights, and sizes the block pool
// (opt.num_blocks; 0 means enough for every request at max context).
inline void load_model(Options& opt, Config& cfg, Weights& weights, const char* program) {
  cfg = opt.model;
  if (!opt.checkpoint.empty()) {
    load_llama2c(opt.checkpoint, cfg, weights);
    opt.model = cfg;
  } else {
    cfg.shared_classifier = false;
    cfg.validate();
    weights = random_weights(cfg, opt.seed);
  }
  std::printf("model: dim %d, %d layers, %d q heads / %d kv heads of %d, vocab %d, max context %d (%s)\n", cfg.dim,
              cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim(), cfg.vocab_size, cfg.max_seq_len,
              opt.checkpoint.empty() ? "random weights" : opt.checkpoint.c_str());
  if (opt.num_blocks == 0) opt.num_blocks = int(1 + opt.requests * opt.blocks_per_request());
  kvkit::check(opt.num_blocks >= 1 + opt.blocks_per_request(), program, "--num-blocks ", opt.num_blocks,
               " cannot hold one request of max context; expected >= ", 1 + opt.blocks_per_request());
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

// What the model computes in one step. Rows are (work item, token) in work
// order; row r of block_table / seq_lens belongs to work item r.
struct Step {
  std::vector<Work> work;
  std::vector<std::int32_t> tokens;       // [rows]
  std::vector<std::int64_t> positions;    // [rows]
  std::vector<std::int64_t> slots;        // [rows] cache slot of each row's K/V
  std::vector<std::int32_t> block_table;  // [work, max_blocks]
  std::vector<std::int32_t> seq_lens;     // [work], this step's tokens included
  std::int64_t max_blocks = 0;
  std::vector<int> sampled;               // work items that get logits (their last row)
  std::int64_t rows() const { return std::int64_t(tokens.size()); }
};

inline double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, std::size_t(p * double(v.size() - 1) + 0.5))];
}

inline std::int32_t sample(const float* logits, int vocab, float temperature, float top_p, std::mt19937_64& rng) {
  if (temperature <= 0.0f) return std::int32_t(std::max_element(logits, logits + vocab) - logits);
  const float m = *std::max_element(logits, logits + vocab);
  std::vector<std::pair<float, std::int32_t>> probs(static_cast<std::size_t>(vocab));
  float sum = 0.0f;
  for (int i = 0; i < vocab; ++i) sum += (probs[i].first = std::exp((logits[i] - m) / temperature));
  for (int i = 0; i < vocab; ++i) probs[i] = {probs[i].first / sum, std::int32_t(i)};
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

// Runs the workload through `model` and prints the summary. Returns the exit
// code: 1 when --check found a difference above its tolerance, else 0.
template <class Model>
int serve(const Options& opt, const Config& cfg, const Weights& weights, Model& model) {
  // ---------------------------------------------------------------- workload
  std::mt19937_64 rng(opt.seed);
  std::vector<Request> requests(std::size_t(opt.requests));
  std::vector<std::int32_t> system_prompt(std::size_t(opt.shared_prefix));
  for (auto& t : system_prompt) t = std::int32_t(rng() % std::uint64_t(cfg.vocab_size));
  std::unique_ptr<Tokenizer> tokenizer;
  if (!opt.tokenizer.empty()) tokenizer = std::make_unique<Tokenizer>(opt.tokenizer, cfg.vocab_size);
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
  const std::int64_t blocks_per_request = opt.blocks_per_request();
  kvkit::KVCacheManagerOptions mopt;
  mopt.num_blocks = opt.num_blocks;
  mopt.block_size = B;
  kvkit::KVCacheManager manager(mopt);  // block 0 is the null block

  // ---------------------------------------------------------------- the loop
  std::mt19937_64 sampler(opt.seed + 1);
  double max_check_diff = 0.0;
  std::int64_t generated_total = 0, peak_blocks = 0, peak_active = 0, preemptions = 0;
  std::vector<float> logits;
  const auto start = Clock::now();
  const bool progress_on_tty = isatty(fileno(stderr)) != 0;
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
    Step s;
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
              std::none_of(s.work.begin(), s.work.end(), [&](const Work& w) { return w.request == j; })) victim = j;
        }
        if (victim < 0) { victim = i; }
        manager.preempt_recompute(requests[victim].seq);
        requests[victim].state = Request::kPreempted;
        requests[victim].computed = 0;
        ++preemptions;
        if (victim == i) break;
      }
      if (r.state != Request::kRunning) continue;
      if (r.computed + count == std::int64_t(r.tokens.size())) s.sampled.push_back(int(s.work.size()));
      s.work.push_back({i, r.computed, count});
      s.slots.insert(s.slots.end(), mine.begin(), mine.end());
      for (std::int64_t t = r.computed; t < r.computed + count; ++t) {
        s.tokens.push_back(r.tokens[std::size_t(t)]);
        s.positions.push_back(t);
      }
    }
    // Copy-on-write copies (none in this workload unless requests fork) run
    // on every layer's K and V before this step writes the cache.
    const kvkit::BlockTransfers transfers = manager.take_transfers();
    if (!transfers.copies.empty()) model.copy_blocks(kvkit::block_copy_pairs(transfers.copies));
    if (s.work.empty()) continue;

    // 3. The model on this step's tokens, through the page table of the
    //    step's sequences (lengths include this step's tokens).
    std::vector<kvkit::SequenceId> seqs;
    for (const Work& w : s.work) seqs.push_back(requests[w.request].seq);
    s.max_blocks = blocks_per_request;
    s.block_table.resize(s.work.size() * std::size_t(blocks_per_request));
    s.seq_lens.resize(s.work.size());
    manager.build_block_table(seqs.data(), std::int64_t(seqs.size()), blocks_per_request, s.block_table.data(),
                              s.seq_lens.data());
    logits.resize(s.sampled.size() * std::size_t(cfg.vocab_size));
    model.forward(s, logits.data());

    // 4. Commit full blocks to the prefix cache; sample where a request's last
    //    known token was computed; retire finished requests.
    std::size_t next_sampled = 0;
    for (std::size_t wi = 0; wi < s.work.size(); ++wi) {
      const Work& w = s.work[wi];
      Request& r = requests[w.request];
      r.computed += w.count;
      const std::int64_t full = r.computed / B;
      const std::int64_t committed = std::int64_t(manager.committed_hashes(r.seq).size());
      if (full > committed) {
        std::vector<kvkit::BlockHash> hashes(static_cast<std::size_t>(full));
        kvkit::hash_blocks(r.tokens.data(), full * B, B, hashes.data());
        manager.commit_blocks(r.seq, hashes.data() + committed, full - committed);
      }
      if (next_sampled == s.sampled.size() || s.sampled[next_sampled] != int(wi)) continue;  // prompt not finished
      const float* row_logits = &logits[next_sampled++ * std::size_t(cfg.vocab_size)];
      if (opt.check) {
        const auto ref = reference_last_logits(cfg, weights, r.tokens, 10000.0);
        for (std::size_t i = 0; i < ref.size(); ++i) max_check_diff = std::max(max_check_diff, double(std::fabs(ref[i] - row_logits[i])));
      }
      const std::int32_t next = sample(row_logits, cfg.vocab_size, opt.temperature, opt.top_p, sampler);
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
      // One progress line rewritten in place on a terminal; a line each in a log.
      std::fprintf(stderr, "%sstep %d: %lld tokens generated, %d sequences, %d/%d blocks used%s",
                   progress_on_tty ? "\r" : "", step, (long long)generated_total, stats.num_sequences,
                   stats.device.num_used, stats.device.num_blocks, progress_on_tty ? "" : "\n");
    }
  }
  if (progress_on_tty) std::fprintf(stderr, "\n");
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
  if (opt.print_tokens) {  // machine-readable: the CPU-vs-GPU test compares these lines
    for (std::size_t q = 0; q < requests.size(); ++q) {
      std::printf("tokens %zu:", q);
      for (std::size_t i = std::size_t(requests[q].prompt_len); i < requests[q].tokens.size(); ++i) std::printf(" %d", requests[q].tokens[i]);
      std::printf("\n");
    }
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
}

}  // namespace gpt
