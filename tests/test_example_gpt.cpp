// The gpt_decode example's llama2.c checkpoint loader and tokenizer.

#include <catch2/catch.hpp>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "gpt_decode/llama_model.hpp"
#include "gpt_decode/tokenizer.hpp"

using Catch::Matchers::Contains;

namespace {

std::string temp_path(const char* name) { return std::string("/tmp/kvkit_test_") + name; }

gpt::Config small_config(bool shared) {
  gpt::Config c;
  c.dim = 16;
  c.hidden_dim = 24;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 11;
  c.max_seq_len = 8;
  c.shared_classifier = shared;
  return c;
}

void truncate_file(const std::string& path, long keep) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  bytes.resize(std::size_t(keep));
  std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
}

}  // namespace

TEST_CASE("a llama2.c checkpoint written by the example loads back exactly") {
  for (bool shared : {true, false}) {
    const gpt::Config c = small_config(shared);
    const gpt::Weights w = gpt::random_weights(c, 3);
    const std::string path = temp_path(shared ? "shared.bin" : "unshared.bin");
    gpt::save_llama2c(path, c, w);
    gpt::Config c2;
    gpt::Weights w2;
    gpt::load_llama2c(path, c2, w2);
    CHECK(c2.dim == 16);
    CHECK(c2.n_kv_heads == 2);
    CHECK(c2.vocab_size == 11);
    CHECK(c2.shared_classifier == shared);
    CHECK(w2.wq == w.wq);
    CHECK(w2.w2 == w.w2);
    CHECK(w2.rms_final == w.rms_final);
    CHECK(w2.classifier == w.classifier);
    std::remove(path.c_str());
  }
}

TEST_CASE("the checkpoint loader rejects missing, truncated, padded and corrupt files clearly") {
  const gpt::Config c = small_config(true);
  const std::string path = temp_path("bad.bin");
  gpt::save_llama2c(path, c, gpt::random_weights(c, 4));
  gpt::Config out;
  gpt::Weights w;
  SECTION("missing") {
    CHECK_THROWS_WITH(gpt::load_llama2c(temp_path("does_not_exist.bin"), out, w), Contains("cannot open checkpoint"));
  }
  SECTION("truncated weights") {
    truncate_file(path, 28 + 100);
    CHECK_THROWS_WITH(gpt::load_llama2c(path, out, w), Contains("is truncated"));
  }
  SECTION("truncated header") {
    truncate_file(path, 10);
    CHECK_THROWS_WITH(gpt::load_llama2c(path, out, w), Contains("shorter than the 28-byte llama2.c header"));
  }
  SECTION("trailing bytes") {
    std::ofstream(path, std::ios::binary | std::ios::app) << "extra";
    CHECK_THROWS_WITH(gpt::load_llama2c(path, out, w), Contains("bytes after the last weight"));
  }
  SECTION("corrupt header") {
    std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
    const std::int32_t heads = 5;  // 16 is not a multiple of 5
    f.seekp(12);
    f.write(reinterpret_cast<const char*>(&heads), 4);
    f.close();
    CHECK_THROWS_WITH(gpt::load_llama2c(path, out, w), Contains("invalid header") && Contains("n_heads"));
  }
  CHECK(out.dim == gpt::Config{}.dim);  // a failed load leaves the outputs alone
  std::remove(path.c_str());
}

TEST_CASE("the llama2.c tokenizer merges by score and decodes byte tokens") {
  // Vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces with scores.
  std::vector<std::pair<std::string, float>> vocab = {{"<unk>", 0}, {"<s>", 0}, {"</s>", 0}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab.push_back({name, 0});
  }
  for (const char* p : {" ", "h", "e", "l", "o", "he", "ll", "hell", "hello", " hello"}) {
    vocab.push_back({p, float(std::string(p).size())});  // longer pieces score higher
  }
  const std::string path = temp_path("tokenizer.bin");
  {
    std::ofstream f(path, std::ios::binary);
    const std::int32_t max_len = 8;
    f.write(reinterpret_cast<const char*>(&max_len), 4);
    for (auto& [piece, score] : vocab) {
      const std::int32_t len = std::int32_t(piece.size());
      f.write(reinterpret_cast<const char*>(&score), 4);
      f.write(reinterpret_cast<const char*>(&len), 4);
      f.write(piece.data(), len);
    }
  }
  const gpt::Tokenizer tok(path, int(vocab.size()));
  const auto ids = tok.encode("hello!", true);
  REQUIRE(ids.size() == 3);
  CHECK(ids[0] == gpt::Tokenizer::kBos);
  CHECK(tok.decode(ids[0], ids[1]) == "hello");  // " hello" after BOS loses its space
  CHECK(ids[2] == '!' + 3);                     // no piece for '!': byte token
  CHECK(tok.decode(ids[1], ids[2]) == "!");
  CHECK_THROWS_WITH(gpt::Tokenizer(path, int(vocab.size()) + 5), Contains("truncated or corrupt"));
  std::remove(path.c_str());
}
