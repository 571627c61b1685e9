#pragma once
/// @file moe_router.cuh
/// CUDA mixture-of-experts router: one warp per token. Same pipeline and same
/// arithmetic as the CPU router (kvkit/ops/moe_router.hpp): scores use
/// moe_exp / moe_sigmoid and the canonical warp-order sum from
/// kvkit/ops/moe_scoring.hpp, ranking uses the same 64-bit keys, so the ids equal
/// the CPU's exactly and the weights agree to rounding.
///
/// Inputs are not checked for NaN/inf on the device. A NaN selection score ranks
/// below every number, so such an expert is chosen only when nothing else is
/// left; under softmax one NaN logit makes every score of its token NaN (ids are
/// then the lowest-index experts of the kept groups and all weights are NaN).
/// +inf under softmax behaves the same way (inf - inf = NaN).

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/cuda/check.hpp"
#include "kvkit/ops/moe_router_config.hpp"
#include "kvkit/ops/moe_scoring.hpp"

namespace kvkit::cuda {

/// Device pointers of one router call (plain data, passed to the kernel by value).
struct RouterParams {
  const void* logits = nullptr;            ///< float32 or bfloat16  // [num_tokens, n_experts]
  DType logits_dtype = DType::kFloat32;    ///< kFloat32 or kBFloat16
  std::int64_t num_tokens = 0;
  std::int64_t logits_row_stride = 0;      ///< elements between tokens (>= n_experts)
  const float* correction_bias = nullptr;  ///< [n_experts], required iff cfg.use_correction_bias
  std::int32_t* topk_ids = nullptr;        ///< output, contiguous  // [num_tokens, top_k]
  float* topk_weights = nullptr;           ///< output, contiguous  // [num_tokens, top_k]
};

/// Most groups the CUDA router supports (one group per lane).
inline constexpr int kMoeRouterMaxGroups = 32;

namespace moe_kernels {

inline constexpr int kWarp = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ std::uint64_t warp_max_u64(std::uint64_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const std::uint64_t other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

template <class T>
__device__ __forceinline__ float load_logit(const T* p) {
  return float(*p);
}

/// Shared memory per warp: scores and selection scores of every expert, plus the ids.
__host__ __device__ inline std::size_t router_smem_per_warp(int n_experts, int top_k) {
  return std::size_t(2 * n_experts + top_k) * 4;
}

template <class T>
__global__ void router_kernel(RouterConfig cfg, RouterParams p, int warps_per_block) {
  extern __shared__ float smem[];
  const int warp = int(threadIdx.x) / kWarp;
  const int lane = int(threadIdx.x) % kWarp;
  const std::int64_t token = std::int64_t(blockIdx.x) * warps_per_block + warp;
  if (token >= p.num_tokens) return;  // whole warps exit together
  const int n = cfg.n_experts;
  float* score = smem + std::size_t(warp) * (2 * n + cfg.top_k);
  float* select = score + n;
  int* ids = reinterpret_cast<int*>(select + n);
  const T* row = static_cast<const T*>(p.logits) + token * p.logits_row_stride;

  if (cfg.scoring == MoeScoring::kSoftmax) {
    float m = bits_to_float(0xff800000u);
    for (int e = lane; e < n; e += kWarp) {
      const float x = load_logit(row + e);
      score[e] = x;
      m = x > m ? x : m;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullMask, m, offset);
      m = other > m ? other : m;
    }
    // Lane partials in ascending expert order, then the butterfly: the order
    // moe_canonical_sum reproduces on the CPU.
    float partial = 0.0f;
    for (int e = lane; e < n; e += kWarp) {
      const float v = moe_exp(score[e] - m);
      score[e] = v;
      partial += v;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      partial = partial + __shfl_xor_sync(kFullMask, partial, offset);
    }
    for (int e = lane; e < n; e += kWarp) score[e] = score[e] / partial;
  } else {
    for (int e = lane; e < n; e += kWarp) score[e] = moe_sigmoid(load_logit(row + e));
  }
  for (int e = lane; e < n; e += kWarp) {
    select[e] = p.correction_bias != nullptr ? score[e] + p.correction_bias[e] : score[e];
  }
  __syncwarp();

  if (cfg.n_group > 1) {
    const int per_group = n / cfg.n_group;
    std::uint64_t key = 0;
    if (lane < cfg.n_group) {
      const float gs = moe_group_score(select + lane * per_group, per_group,
                                       cfg.group_score == MoeGroupScore::kTopTwoSum);
      key = moe_rank_key(gs, lane);
    }
    bool kept = false;
    for (int round = 0; round < cfg.topk_group; ++round) {
      const std::uint64_t best = warp_max_u64(key);
      if (best == key && lane < cfg.n_group) {
        kept = true;
        key = 0;
      }
    }
    __syncwarp();
    const float neg_inf = bits_to_float(0xff800000u);
    for (int g = 0; g < cfg.n_group; ++g) {
      const bool g_kept = __shfl_sync(kFullMask, kept, g);
      if (g_kept) continue;
      for (int i = lane; i < per_group; i += kWarp) select[g * per_group + i] = neg_inf;
    }
    __syncwarp();
  }

  // k rounds of warp arg-max; keys are distinct, so "below the last pick" means "not taken".
  std::uint64_t floor = ~std::uint64_t(0);
  for (int j = 0; j < cfg.top_k; ++j) {
    std::uint64_t best = 0;
    for (int e = lane; e < n; e += kWarp) {
      const std::uint64_t key = moe_rank_key(select[e], e);
      if (key < floor && key > best) best = key;
    }
    best = warp_max_u64(best);
    floor = best;
    if (lane == 0) ids[j] = moe_rank_key_index(best);
  }
  __syncwarp();

  if (lane == 0) {
    const int k = cfg.top_k;
    std::int32_t* out_ids = p.topk_ids + token * k;
    float* out_w = p.topk_weights + token * k;
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += score[ids[j]];
    for (int j = 0; j < k; ++j) {
      float w = score[ids[j]];
      if (cfg.renormalize && sum > 0.0f) w = w / sum;
      out_ids[j] = ids[j];
      out_w[j] = w * cfg.routed_scaling_factor;
    }
  }
}

}  // namespace moe_kernels

/// Routes p.num_tokens tokens on `stream` (asynchronous; no allocation).
/// Throws kvkit::Error for an invalid config, n_group > 32, too many experts for
/// shared memory (2 * n_experts + top_k floats per warp, at most 48 KiB), a
/// missing or unexpected bias pointer, null pointers, a row stride < n_experts,
/// or a launch failure.
inline void moe_route(const RouterConfig& cfg, const RouterParams& p, cudaStream_t stream) {
  constexpr const char* kWhere = "kvkit::cuda::moe_route";
  cfg.validate();
  check_argument(cfg.n_group <= kMoeRouterMaxGroups, kWhere, "cfg.n_group", cfg.n_group,
                 "<= ", kMoeRouterMaxGroups, " on the GPU");
  check_argument(p.logits_dtype == DType::kFloat32 || p.logits_dtype == DType::kBFloat16, kWhere,
                 "logits_dtype", p.logits_dtype, "float32 or bfloat16");
  check_argument(p.num_tokens >= 0, kWhere, "num_tokens", p.num_tokens, ">= 0");
  if (p.num_tokens == 0) return;
  check_argument(p.logits != nullptr, kWhere, "logits", p.logits, "a device pointer");
  check_argument(p.topk_ids != nullptr, kWhere, "topk_ids", p.topk_ids, "a device pointer");
  check_argument(p.topk_weights != nullptr, kWhere, "topk_weights", p.topk_weights,
                 "a device pointer");
  check_argument(p.logits_row_stride >= cfg.n_experts, kWhere, "logits_row_stride",
                 p.logits_row_stride, ">= n_experts (", cfg.n_experts, ")");
  if (cfg.use_correction_bias) {
    check_argument(p.correction_bias != nullptr, kWhere, "correction_bias", p.correction_bias,
                   "a device pointer (cfg.use_correction_bias is true)");
  } else {
    check_argument(p.correction_bias == nullptr, kWhere, "correction_bias", p.correction_bias,
                   "nullptr (cfg.use_correction_bias is false)");
  }
  constexpr std::size_t kMaxSmem = 48 * 1024;
  const std::size_t per_warp = moe_kernels::router_smem_per_warp(cfg.n_experts, cfg.top_k);
  check_argument(per_warp <= kMaxSmem, kWhere, "cfg.n_experts", cfg.n_experts,
                 "few enough experts for 48 KiB of shared memory per warp (2 * n_experts + top_k floats)");
  int warps = 4;
  while (warps > 1 && per_warp * std::size_t(warps) > kMaxSmem) warps /= 2;
  const std::int64_t blocks = (p.num_tokens + warps - 1) / warps;
  check_argument(blocks <= std::int64_t(INT32_MAX), kWhere, "num_tokens", p.num_tokens,
                 "fewer than 2^31 * warps per block");
  const std::size_t smem = per_warp * std::size_t(warps);
  if (p.logits_dtype == DType::kFloat32) {
    moe_kernels::router_kernel<float><<<unsigned(blocks), unsigned(warps * 32), smem, stream>>>(cfg, p, warps);
  } else {
    moe_kernels::router_kernel<bfloat16><<<unsigned(blocks), unsigned(warps * 32), smem, stream>>>(cfg, p, warps);
  }
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
