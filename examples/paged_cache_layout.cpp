// paged_cache_layout: allocate a paged KV cache for a Llama-3-8B-shaped layer
// and print how it is laid out: shapes, strides, bytes per token and per page,
// and where one token's keys live.
//
// A paged cache stores K and V in fixed-size pages ("blocks") of page_size
// tokens. NHD order is [pages, page_size, kv_heads, head_dim]: one token's
// heads are contiguous, which makes appending a token a single row copy.

#include <kvkit/kvkit.hpp>

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  // Llama-3-8B: 8 KV heads of 128 dims; 16-token pages; room for 64 pages.
  const std::int64_t num_pages = argc > 1 ? std::atoll(argv[1]) : 64;
  const std::int64_t page_size = 16, kv_heads = 8, head_dim = 128;
  kvkit::check_argument(num_pages > 0, "paged_cache_layout", "num_pages", num_pages, "> 0");

  std::vector<kvkit::bfloat16> k_pages(std::size_t(num_pages * page_size * kv_heads * head_dim));
  std::vector<kvkit::bfloat16> v_pages(k_pages.size());
  const kvkit::TensorView k(k_pages.data(), kvkit::DType::kBFloat16,
                            {num_pages, page_size, kv_heads, head_dim});
  const kvkit::TensorView v(v_pages.data(), kvkit::DType::kBFloat16,
                            {num_pages, page_size, kv_heads, head_dim});

  const std::int64_t elem = std::int64_t(kvkit::dtype_size(k.dtype()));
  const std::int64_t bytes_per_token = 2 * kv_heads * head_dim * elem;  // K and V
  std::printf("paged KV cache, NHD, %s\n", kvkit::dtype_name(k.dtype()));
  std::printf("  K shape   [pages, page_size, kv_heads, head_dim] = [%lld, %lld, %lld, %lld]\n",
              (long long)k.size(0), (long long)k.size(1), (long long)k.size(2), (long long)k.size(3));
  std::printf("  K strides (elements)                           = [%lld, %lld, %lld, %lld]\n",
              (long long)k.stride(0), (long long)k.stride(1), (long long)k.stride(2),
              (long long)k.stride(3));
  std::printf("  bytes per token (K+V): %lld; per page: %lld; whole cache: %.1f MiB\n",
              (long long)bytes_per_token, (long long)(bytes_per_token * page_size),
              double(bytes_per_token * page_size * num_pages) / (1 << 20));

  // A token's slot index is page * page_size + offset (vLLM's slot mapping).
  const std::int64_t slot = 37;
  const std::int64_t page = slot / page_size, offset = slot % page_size;
  std::printf("  slot %lld -> page %lld, offset %lld; K[head 3] starts at element %lld\n",
              (long long)slot, (long long)page, (long long)offset,
              (long long)k.offset({page, offset, 3, 0}));
  return v.numel() == k.numel() ? 0 : 1;
}
