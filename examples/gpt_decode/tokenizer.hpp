#pragma once
// llama2.c's tokenizer.bin: a SentencePiece-style vocabulary with merge
// scores. Format: int32 max_token_length, then per token: float score,
// int32 length, the bytes. Encoding follows llama2.c: a leading space, one
// token per UTF-8 character (or <0xXX> byte tokens, ids 3..258), then the
// highest-scoring adjacent merge, repeatedly.

#include <kvkit/core/error.hpp>

#include <cstdint>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <vector>

namespace gpt {

class Tokenizer {
 public:
  static constexpr std::int32_t kBos = 1;

  Tokenizer(const std::string& path, int vocab_size) {
    constexpr const char* kWhere = "gpt::Tokenizer";
    std::FILE* f = std::fopen(path.c_str(), "rb");
    kvkit::check(f != nullptr, kWhere, "cannot open tokenizer '", path, "'");
    std::int32_t max_len = 0;
    bool ok = std::fread(&max_len, sizeof(max_len), 1, f) == 1;
    for (int i = 0; ok && i < vocab_size; ++i) {
      float score = 0;
      std::int32_t len = 0;
      ok = std::fread(&score, sizeof(score), 1, f) == 1 && std::fread(&len, sizeof(len), 1, f) == 1 &&
           len >= 0 && len <= 4096;
      std::string piece(static_cast<std::size_t>(ok ? len : 0), '\0');
      ok = ok && (len == 0 || std::fread(piece.data(), 1, piece.size(), f) == piece.size());
      pieces_.push_back(piece);
      scores_.push_back(score);
      ids_.emplace(piece, i);
    }
    std::fclose(f);
    kvkit::check(ok, kWhere, "'", path, "' is truncated or corrupt (expected ", vocab_size, " tokens)");
  }

  int vocab_size() const { return int(pieces_.size()); }

  std::vector<std::int32_t> encode(const std::string& text, bool bos) const {
    std::vector<std::int32_t> out;
    if (bos) out.push_back(kBos);
    if (text.empty()) return out;
    if (auto it = ids_.find(" "); it != ids_.end()) out.push_back(it->second);
    for (std::size_t i = 0; i < text.size();) {
      std::size_t n = 1;  // bytes of this UTF-8 character
      while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xc0) == 0x80) ++n;
      const auto it = ids_.find(text.substr(i, n));
      if (it != ids_.end()) {
        out.push_back(it->second);
      } else {
        for (std::size_t b = 0; b < n; ++b) out.push_back(std::int32_t(static_cast<unsigned char>(text[i + b])) + 3);
      }
      i += n;
    }
    const std::size_t first = bos ? 1 : 0;
    while (true) {
      float best = -1e30f;
      std::int32_t best_id = -1;
      std::size_t best_at = 0;
      for (std::size_t i = first; i + 1 < out.size(); ++i) {
        const auto it = ids_.find(pieces_[out[i]] + pieces_[out[i + 1]]);
        if (it != ids_.end() && scores_[it->second] > best) {
          best = scores_[it->second];
          best_id = it->second;
          best_at = i;
        }
      }
      if (best_id < 0) break;
      out[best_at] = best_id;
      out.erase(out.begin() + std::ptrdiff_t(best_at + 1));
    }
    return out;
  }

  /// Text of `token` following `previous` (llama2.c drops the space after BOS
  /// and turns <0xXX> byte tokens back into bytes).
  std::string decode(std::int32_t previous, std::int32_t token) const {
    if (token < 0 || token >= vocab_size()) return "?";
    std::string piece = pieces_[token];
    if (previous == kBos && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
    unsigned byte = 0;
    if (piece.size() == 6 && std::sscanf(piece.c_str(), "<0x%02X>", &byte) == 1) {
      return std::string(1, char(byte));
    }
    return piece;
  }

 private:
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, std::int32_t> ids_;
};

}  // namespace gpt
