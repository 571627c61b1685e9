#pragma once
/// @file moe_dispatch.cuh
/// CUDA MoE dispatch (plan + gather) and combine. The plan has exactly the
/// layout of the CPU's kvkit::moe_dispatch_plan (kvkit/ops/moe_dispatch.hpp) and
/// is deterministic: a stable CUB radix sort of the pair indices by expert, a
/// binary search for each expert's segment and a CUB block scan for the padded
/// offsets; no atomics. All launchers are asynchronous on the given stream and
/// never allocate: the plan's scratch lives in a caller-provided workspace
/// whose size moe_dispatch_workspace_bytes gives up front, so a plan + gather +
/// expert GEMMs + combine sequence can be captured in a CUDA graph.
///
/// Device-side ids are not checked: an id outside [0, n_experts) is dropped
/// (pair_rows = -1, not counted in expert_counts or num_dropped).

#include <cuda_runtime.h>

#include <cub/cub.cuh>

#include <cstddef>
#include <cstdint>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/cuda/check.hpp"
#include "kvkit/ops/moe_dispatch.hpp"

namespace kvkit::cuda {

/// Device pointers of a dispatch plan (layout: see kvkit::DispatchPlanViews).
struct DispatchParams {
  const std::int32_t* topk_ids = nullptr;  ///< [num_tokens, top_k]
  std::int64_t num_tokens = 0;
  std::int32_t* expert_counts = nullptr;   ///< [n_experts]
  std::int32_t* expert_offsets = nullptr;  ///< [n_experts + 1]
  std::int32_t* sorted_pairs = nullptr;    ///< [moe_dispatch_max_rows]
  std::int32_t* pair_rows = nullptr;       ///< [num_tokens * top_k]
  std::int32_t* tile_experts = nullptr;    ///< [moe_dispatch_max_tiles], optional
  std::int32_t* num_dropped = nullptr;     ///< [1], optional: pairs dropped by the capacity
  void* workspace = nullptr;               ///< moe_dispatch_workspace_bytes bytes, 16-byte aligned
  std::size_t workspace_bytes = 0;
};

namespace moe_kernels {

inline std::size_t align_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }

/// Radix-sort bits that hold every key in [0, n_experts] (n_experts marks invalid ids).
inline int sort_end_bit(int n_experts) {
  int bits = 1;
  while (bits < 31 && (std::uint32_t(1) << bits) <= std::uint32_t(n_experts)) ++bits;
  return bits;
}

struct DispatchWorkspace {
  std::uint32_t* keys_in;
  std::uint32_t* keys_out;
  std::int32_t* values_in;
  std::int32_t* values_out;
  std::int32_t* segment_start;  // [n_experts] first sorted position of each expert
  void* cub_temp;
  std::size_t cub_bytes;
  std::size_t total_bytes;
};

inline std::size_t cub_sort_bytes(std::int64_t pairs, int n_experts) {
  std::size_t bytes = 0;
  KVKIT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const std::uint32_t*>(nullptr), static_cast<std::uint32_t*>(nullptr),
      static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr), pairs, 0,
      sort_end_bit(n_experts)));
  return bytes;
}

inline DispatchWorkspace carve_workspace(void* base, std::int64_t pairs, int n_experts) {
  constexpr std::size_t kAlign = 256;
  DispatchWorkspace w{};
  std::size_t off = 0;
  auto take = [&](std::size_t bytes) -> void* {
    // The size query passes base == nullptr: no arithmetic on a null pointer (UB).
    void* p = base != nullptr ? static_cast<void*>(static_cast<char*>(base) + off) : nullptr;
    off = align_up(off + bytes, kAlign);
    return p;
  };
  const std::size_t n = std::size_t(pairs > 0 ? pairs : 1);
  w.keys_in = static_cast<std::uint32_t*>(take(n * 4));
  w.keys_out = static_cast<std::uint32_t*>(take(n * 4));
  w.values_in = static_cast<std::int32_t*>(take(n * 4));
  w.values_out = static_cast<std::int32_t*>(take(n * 4));
  w.segment_start = static_cast<std::int32_t*>(take(std::size_t(n_experts) * 4));
  w.cub_bytes = cub_sort_bytes(pairs, n_experts);
  w.cub_temp = take(w.cub_bytes);
  w.total_bytes = off;
  return w;
}

__global__ void dispatch_prepare_kernel(const std::int32_t* ids, std::int64_t pairs, int n_experts,
                                        std::uint32_t* keys, std::int32_t* values,
                                        std::int32_t* sorted_pairs, std::int64_t max_rows) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs || i < max_rows;
       i += stride) {
    if (i < pairs) {
      const std::int32_t id = ids[i];
      keys[i] = (id >= 0 && id < n_experts) ? std::uint32_t(id) : std::uint32_t(n_experts);
      values[i] = std::int32_t(i);
    }
    if (i < max_rows) sorted_pairs[i] = std::int32_t(pairs);  // sentinel until scattered
  }
}

__device__ __forceinline__ std::int32_t lower_bound(const std::uint32_t* keys, std::int32_t n,
                                                    std::uint32_t value) {
  std::int32_t lo = 0, hi = n;
  while (lo < hi) {
    const std::int32_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

inline constexpr int kOffsetsThreads = 1024;

__global__ void __launch_bounds__(kOffsetsThreads)
    dispatch_offsets_kernel(const std::uint32_t* sorted_keys, std::int32_t pairs, int n_experts,
                            int tile, int capacity, std::int32_t* segment_start,
                            std::int32_t* counts, std::int32_t* offsets, std::int32_t* num_dropped) {
  using BlockScan = cub::BlockScan<std::int32_t, kOffsetsThreads>;
  using BlockReduce = cub::BlockReduce<std::int32_t, kOffsetsThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  std::int32_t running = 0;
  std::int32_t dropped = 0;
  for (int base = 0; base < n_experts; base += kOffsetsThreads) {
    const int e = base + int(threadIdx.x);
    std::int32_t padded = 0;
    if (e < n_experts) {
      const std::int32_t start = lower_bound(sorted_keys, pairs, std::uint32_t(e));
      const std::int32_t count = lower_bound(sorted_keys, pairs, std::uint32_t(e + 1)) - start;
      const std::int32_t kept = capacity >= 0 && count > capacity ? capacity : count;
      padded = (kept + tile - 1) / tile * tile;
      segment_start[e] = start;
      counts[e] = count;
      dropped += count - kept;
    }
    std::int32_t exclusive = 0, aggregate = 0;
    BlockScan(scan_storage).ExclusiveSum(padded, exclusive, aggregate);
    if (e < n_experts) offsets[e] = running + exclusive;
    running += aggregate;
    __syncthreads();  // scan_storage is reused by the next chunk
  }
  const std::int32_t total_dropped = BlockReduce(reduce_storage).Sum(dropped);
  if (threadIdx.x == 0) {
    offsets[n_experts] = running;
    if (num_dropped != nullptr) *num_dropped = total_dropped;
  }
}

__global__ void dispatch_scatter_kernel(const std::uint32_t* sorted_keys,
                                        const std::int32_t* sorted_values, std::int64_t pairs,
                                        int n_experts, int capacity,
                                        const std::int32_t* segment_start,
                                        const std::int32_t* counts, const std::int32_t* offsets,
                                        std::int32_t* sorted_pairs, std::int32_t* pair_rows) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs; i += stride) {
    const std::uint32_t e = sorted_keys[i];
    const std::int32_t pair = sorted_values[i];
    if (e >= std::uint32_t(n_experts)) {
      pair_rows[pair] = -1;
      continue;
    }
    const std::int32_t rank = std::int32_t(i) - segment_start[e];
    const std::int32_t kept = capacity >= 0 && counts[e] > capacity ? capacity : counts[e];
    if (rank < kept) {
      const std::int32_t row = offsets[e] + rank;
      sorted_pairs[row] = pair;
      pair_rows[pair] = row;
    } else {
      pair_rows[pair] = -1;
    }
  }
}

__global__ void dispatch_tiles_kernel(const std::int32_t* offsets, int n_experts, int tile,
                                      std::int64_t num_tiles, std::int32_t* tile_experts) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  const std::int32_t used = offsets[n_experts];
  for (std::int64_t b = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < num_tiles; b += stride) {
    const std::int64_t row = b * tile;
    if (row >= used) {
      tile_experts[b] = -1;
      continue;
    }
    // Last expert whose segment starts at or before `row` (skips empty segments).
    int lo = 0, hi = n_experts + 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (offsets[mid] <= row) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    tile_experts[b] = lo - 1;
  }
}

inline unsigned grid_for(std::int64_t n, int threads) {
  std::int64_t blocks = (n + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  return unsigned(blocks);
}

}  // namespace moe_kernels

/// Workspace bytes moe_dispatch_plan needs for `num_tokens` tokens (CUB's sort
/// scratch plus keys, values and segment starts). Host-only query, no allocation.
inline std::size_t moe_dispatch_workspace_bytes(const DispatchConfig& cfg, std::int64_t num_tokens) {
  cfg.validate();
  check_argument(num_tokens >= 0, "kvkit::cuda::moe_dispatch_workspace_bytes", "num_tokens",
                 num_tokens, ">= 0");
  return moe_kernels::carve_workspace(nullptr, num_tokens * cfg.top_k, cfg.n_experts).total_bytes;
}

/// Builds the dispatch plan of p.topk_ids on `stream`; same outputs as the CPU's
/// kvkit::moe_dispatch_plan. Sizes come from moe_dispatch_max_rows /
/// moe_dispatch_max_tiles for p.num_tokens. Throws kvkit::Error for a bad config,
/// null pointers, a workspace smaller than moe_dispatch_workspace_bytes, or a
/// failed launch.
inline void moe_dispatch_plan(const DispatchConfig& cfg, const DispatchParams& p, cudaStream_t stream) {
  constexpr const char* kWhere = "kvkit::cuda::moe_dispatch_plan";
  cfg.validate();
  check_argument(p.num_tokens >= 0, kWhere, "num_tokens", p.num_tokens, ">= 0");
  const std::int64_t pairs = p.num_tokens * cfg.top_k;
  const std::int64_t max_rows = moe_dispatch_max_rows(cfg, p.num_tokens);
  check_argument(max_rows <= std::int64_t(INT32_MAX), kWhere, "num_tokens", p.num_tokens,
                 "at most 2^31 - 1 rows after padding (int32 indices)");
  // Pair indices (sort values, the sentinel, pair_rows) are int32 too; with a
  // capacity max_rows does not bound them.
  check_argument(pairs <= std::int64_t(INT32_MAX), kWhere, "num_tokens", p.num_tokens,
                 "at most 2^31 - 1 (token, k) pairs (int32 pair indices)");
  check_argument(p.expert_counts != nullptr, kWhere, "expert_counts", p.expert_counts, "a device pointer");
  check_argument(p.expert_offsets != nullptr, kWhere, "expert_offsets", p.expert_offsets, "a device pointer");
  if (pairs > 0) {
    check_argument(p.topk_ids != nullptr, kWhere, "topk_ids", p.topk_ids, "a device pointer");
    check_argument(p.pair_rows != nullptr, kWhere, "pair_rows", p.pair_rows, "a device pointer");
  }
  // Written (sentinel) whenever it has rows: with tile > 1 even for 0 tokens.
  if (max_rows > 0) {
    check_argument(p.sorted_pairs != nullptr, kWhere, "sorted_pairs", p.sorted_pairs, "a device pointer");
  }
  const std::size_t needed = moe_dispatch_workspace_bytes(cfg, p.num_tokens);
  check_argument(p.workspace_bytes >= needed, kWhere, "workspace_bytes", p.workspace_bytes,
                 ">= moe_dispatch_workspace_bytes (", needed, ")");
  check_argument(p.workspace != nullptr && reinterpret_cast<std::uintptr_t>(p.workspace) % 16 == 0,
                 kWhere, "workspace", p.workspace, "a 16-byte aligned device pointer");
  const auto w = moe_kernels::carve_workspace(p.workspace, pairs, cfg.n_experts);
  constexpr int kThreads = 256;
  moe_kernels::dispatch_prepare_kernel<<<moe_kernels::grid_for(pairs > max_rows ? pairs : max_rows, kThreads),
                                         kThreads, 0, stream>>>(p.topk_ids, pairs, cfg.n_experts, w.keys_in,
                                                                w.values_in, p.sorted_pairs, max_rows);
  KVKIT_CUDA_CHECK(cudaGetLastError());
  if (pairs > 0) {
    std::size_t cub_bytes = w.cub_bytes;
    KVKIT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(w.cub_temp, cub_bytes, w.keys_in, w.keys_out,
                                                     w.values_in, w.values_out, pairs, 0,
                                                     moe_kernels::sort_end_bit(cfg.n_experts), stream));
  }
  moe_kernels::dispatch_offsets_kernel<<<1, moe_kernels::kOffsetsThreads, 0, stream>>>(
      w.keys_out, std::int32_t(pairs), cfg.n_experts, cfg.tile, cfg.capacity, w.segment_start,
      p.expert_counts, p.expert_offsets, p.num_dropped);
  KVKIT_CUDA_CHECK(cudaGetLastError());
  if (pairs > 0) {
    moe_kernels::dispatch_scatter_kernel<<<moe_kernels::grid_for(pairs, kThreads), kThreads, 0, stream>>>(
        w.keys_out, w.values_out, pairs, cfg.n_experts, cfg.capacity, w.segment_start, p.expert_counts,
        p.expert_offsets, p.sorted_pairs, p.pair_rows);
    KVKIT_CUDA_CHECK(cudaGetLastError());
  }
  if (p.tile_experts != nullptr) {
    const std::int64_t tiles = moe_dispatch_max_tiles(cfg, p.num_tokens);
    moe_kernels::dispatch_tiles_kernel<<<moe_kernels::grid_for(tiles, kThreads), kThreads, 0, stream>>>(
        p.expert_offsets, cfg.n_experts, cfg.tile, tiles, p.tile_experts);
    KVKIT_CUDA_CHECK(cudaGetLastError());
  }
}

// ------------------------------------------------------------------ gather

/// Device pointers of a gather: x_sorted[r] = x[sorted_pairs[r] / top_k], zeros for the sentinel.
struct GatherParams {
  const void* x = nullptr;  ///< [num_tokens, hidden]
  std::int64_t x_row_stride = 0;
  void* x_sorted = nullptr;  ///< [max_rows, hidden]
  std::int64_t x_sorted_row_stride = 0;
  DType dtype = DType::kBFloat16;  ///< float32, float16 or bfloat16 (both tensors)
  std::int64_t num_tokens = 0;
  std::int64_t hidden = 0;
  const std::int32_t* sorted_pairs = nullptr;  ///< [max_rows]
  std::int64_t max_rows = 0;
  int top_k = 0;
};

namespace moe_kernels {

/// Copies rows in units of U (16-byte vectors when rows and pointers allow).
template <class U>
__global__ void gather_kernel(const U* x, std::int64_t x_stride, U* out, std::int64_t out_stride,
                              const std::int32_t* sorted_pairs, std::int64_t max_rows,
                              std::int64_t row_units, std::int32_t sentinel, int top_k) {
  for (std::int64_t r = blockIdx.x; r < max_rows; r += gridDim.x) {
    const std::int32_t pair = sorted_pairs[r];
    U* dst = out + r * out_stride;
    if (pair >= sentinel || pair < 0) {
      for (std::int64_t i = threadIdx.x; i < row_units; i += blockDim.x) dst[i] = U{};
    } else {
      const U* src = x + std::int64_t(pair / top_k) * x_stride;
      for (std::int64_t i = threadIdx.x; i < row_units; i += blockDim.x) dst[i] = src[i];
    }
  }
}

template <class U>
void launch_gather(const GatherParams& p, std::size_t esize, cudaStream_t stream) {
  const std::int64_t per_unit = std::int64_t(sizeof(U) / esize);
  const std::int64_t units = p.hidden / per_unit;
  int threads = 128;
  while (threads > 32 && std::int64_t(threads) / 2 >= units) threads /= 2;
  const std::int64_t blocks = p.max_rows < 65535 * 16 ? p.max_rows : 65535 * 16;
  gather_kernel<U><<<unsigned(blocks), unsigned(threads), 0, stream>>>(
      static_cast<const U*>(p.x), p.x_row_stride / per_unit, static_cast<U*>(p.x_sorted),
      p.x_sorted_row_stride / per_unit, p.sorted_pairs, p.max_rows, units,
      std::int32_t(p.num_tokens * p.top_k), p.top_k);
}

inline bool vector_ok(const void* ptr, std::int64_t stride_elems, std::int64_t hidden, std::size_t esize) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && (stride_elems * std::int64_t(esize)) % 16 == 0 &&
         (hidden * std::int64_t(esize)) % 16 == 0;
}

}  // namespace moe_kernels

/// Gathers rows into expert-sorted order on `stream` (see GatherParams).
/// Uses 16-byte copies when pointers, strides and the row size are multiples of
/// 16 bytes. Throws kvkit::Error for null pointers, bad sizes or a launch failure.
inline void moe_gather(const GatherParams& p, cudaStream_t stream) {
  constexpr const char* kWhere = "kvkit::cuda::moe_gather";
  check_argument(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16,
                 kWhere, "dtype", p.dtype, "float32, float16 or bfloat16");
  check_argument(p.top_k >= 1, kWhere, "top_k", p.top_k, ">= 1");
  check_argument(p.num_tokens >= 0 && p.hidden >= 0 && p.max_rows >= 0, kWhere, "sizes",
                 p.num_tokens, " tokens, hidden ", p.hidden, ", max_rows ", p.max_rows, ": expected >= 0");
  if (p.max_rows == 0 || p.hidden == 0) return;
  check_argument(p.x_sorted != nullptr, kWhere, "x_sorted", p.x_sorted, "a device pointer");
  check_argument(p.sorted_pairs != nullptr, kWhere, "sorted_pairs", p.sorted_pairs, "a device pointer");
  check_argument(p.x != nullptr || p.num_tokens == 0, kWhere, "x", p.x, "a device pointer");
  check_argument(p.x_row_stride >= p.hidden, kWhere, "x_row_stride", p.x_row_stride, ">= hidden (", p.hidden, ")");
  check_argument(p.x_sorted_row_stride >= p.hidden, kWhere, "x_sorted_row_stride", p.x_sorted_row_stride,
                 ">= hidden (", p.hidden, ")");
  const std::size_t esize = dtype_size(p.dtype);
  if (moe_kernels::vector_ok(p.x, p.x_row_stride, p.hidden, esize) &&
      moe_kernels::vector_ok(p.x_sorted, p.x_sorted_row_stride, p.hidden, esize)) {
    moe_kernels::launch_gather<uint4>(p, esize, stream);
  } else if (esize == 4) {
    moe_kernels::launch_gather<std::uint32_t>(p, esize, stream);
  } else {
    moe_kernels::launch_gather<std::uint16_t>(p, esize, stream);
  }
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

// ------------------------------------------------------------------ combine

/// Device pointers of a combine:
/// out[t] = sum_j w[t, j] * y_sorted[pair_rows[t*k + j]] (+ shared[t]), j ascending, fp32 accumulation.
/// Products are not fused into the sums (no FMA), so `out` equals the CPU's moe_combine bit for bit
/// (which avoids FMAs too, unless the host code is built with -mfma / -march=native).
struct CombineParams {
  const void* y_sorted = nullptr;  ///< [max_rows, hidden]
  std::int64_t y_row_stride = 0;
  const std::int32_t* pair_rows = nullptr;  ///< [num_tokens * top_k], -1 = dropped
  const float* topk_weights = nullptr;      ///< [num_tokens, top_k]
  const void* shared = nullptr;             ///< [num_tokens, hidden], optional
  std::int64_t shared_row_stride = 0;
  void* out = nullptr;  ///< [num_tokens, hidden]; may alias `shared`
  std::int64_t out_row_stride = 0;
  DType dtype = DType::kBFloat16;  ///< float32, float16 or bfloat16 (y, shared, out)
  std::int64_t num_tokens = 0;
  std::int64_t hidden = 0;
  int top_k = 0;
};

namespace moe_kernels {

template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <class T, int kVec>
__global__ void combine_kernel(CombineParams p) {
  using P = Pack<T, kVec>;
  const std::int64_t units = p.hidden / kVec;
  for (std::int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    const std::int32_t* rows = p.pair_rows + t * p.top_k;
    const float* w = p.topk_weights + t * p.top_k;
    for (std::int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      float acc[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
      // Unrolled so that the k row loads are in flight together.
#pragma unroll 8
      for (int j = 0; j < p.top_k; ++j) {
        const std::int32_t r = rows[j];
        if (r < 0) continue;
        const float wj = w[j];
        const P y = reinterpret_cast<const P*>(static_cast<const T*>(p.y_sorted) + r * p.y_row_stride)[u];
        // __fmul_rn: never contracted into an FMA, so the sums round as the
        // CPU's (mul, then add) and the result equals moe_combine's bits.
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += __fmul_rn(wj, float(y.v[i]));
      }
      if (p.shared != nullptr) {
        const P s = reinterpret_cast<const P*>(static_cast<const T*>(p.shared) + t * p.shared_row_stride)[u];
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += float(s.v[i]);
      }
      P o;
#pragma unroll
      for (int i = 0; i < kVec; ++i) o.v[i] = T(acc[i]);
      reinterpret_cast<P*>(static_cast<T*>(p.out) + t * p.out_row_stride)[u] = o;
    }
  }
}

template <class T>
void launch_combine(const CombineParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / int(sizeof(T));
  const std::size_t esize = sizeof(T);
  const bool vec = vector_ok(p.y_sorted, p.y_row_stride, p.hidden, esize) &&
                   vector_ok(p.out, p.out_row_stride, p.hidden, esize) &&
                   (p.shared == nullptr || vector_ok(p.shared, p.shared_row_stride, p.hidden, esize));
  const std::int64_t units = vec ? p.hidden / kVec : p.hidden;
  int threads = 256;
  while (threads > 32 && std::int64_t(threads) / 2 >= units) threads /= 2;
  const std::int64_t blocks = p.num_tokens < 65535 * 16 ? p.num_tokens : 65535 * 16;
  if (vec) {
    combine_kernel<T, kVec><<<unsigned(blocks), unsigned(threads), 0, stream>>>(p);
  } else {
    combine_kernel<T, 1><<<unsigned(blocks), unsigned(threads), 0, stream>>>(p);
  }
}

}  // namespace moe_kernels

/// Combines expert outputs into token order on `stream` (see CombineParams).
/// Throws kvkit::Error for null pointers, bad sizes or a launch failure.
inline void moe_combine(const CombineParams& p, cudaStream_t stream) {
  constexpr const char* kWhere = "kvkit::cuda::moe_combine";
  check_argument(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16,
                 kWhere, "dtype", p.dtype, "float32, float16 or bfloat16");
  check_argument(p.top_k >= 1, kWhere, "top_k", p.top_k, ">= 1");
  check_argument(p.num_tokens >= 0 && p.hidden >= 0, kWhere, "sizes", p.num_tokens, " tokens, hidden ",
                 p.hidden, ": expected >= 0");
  if (p.num_tokens == 0 || p.hidden == 0) return;
  check_argument(p.y_sorted != nullptr, kWhere, "y_sorted", p.y_sorted, "a device pointer");
  check_argument(p.pair_rows != nullptr, kWhere, "pair_rows", p.pair_rows, "a device pointer");
  check_argument(p.topk_weights != nullptr, kWhere, "topk_weights", p.topk_weights, "a device pointer");
  check_argument(p.out != nullptr, kWhere, "out", p.out, "a device pointer");
  check_argument(p.y_row_stride >= p.hidden, kWhere, "y_row_stride", p.y_row_stride, ">= hidden (", p.hidden, ")");
  check_argument(p.out_row_stride >= p.hidden, kWhere, "out_row_stride", p.out_row_stride, ">= hidden (", p.hidden, ")");
  if (p.shared != nullptr) {
    check_argument(p.shared_row_stride >= p.hidden, kWhere, "shared_row_stride", p.shared_row_stride,
                   ">= hidden (", p.hidden, ")");
  }
  switch (p.dtype) {
    case DType::kFloat32: moe_kernels::launch_combine<float>(p, stream); break;
    case DType::kFloat16: moe_kernels::launch_combine<half>(p, stream); break;
    default: moe_kernels::launch_combine<bfloat16>(p, stream); break;
  }
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
