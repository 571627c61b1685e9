#pragma once
/// @file attention_prefill.cuh
/// Chunked prefill over a paged KV cache on the GPU with tensor cores: the
/// CUDA twin of kvkit::paged_decode_attention with ragged queries
/// (q_indptr), taking the same PagedDecodeParams with device pointers and the
/// same masking rule (attention_visible) and score (attention_logit).
///
///   PrefillPlan plan = plan_prefill(params, host_q_indptr, host_seq_lens);  // host only
///   run_prefill(params, plan, stream);                                      // no alloc, no sync
///
/// Sequence b's query tokens are rows [q_indptr[b], q_indptr[b+1]) of q and
/// o; they are the last q_count tokens of its seq_lens[b] (their K/V already
/// appended), at positions seq_len - q_count + i, so they attend to the
/// cached prefix and causally to each other.
///
/// Kernel (FlashAttention-2 style): one block of 8 warps per (sequence, kv
/// head, tile of 128 query rows), rows being (token, q head of the group)
/// pairs, token-major, so that every K/V tile serves the whole GQA group.
/// Each warp owns 16 rows. The block streams tiles of 64 keys (K and V) from
/// the paged cache into shared memory with 16-byte cp.async copies, two
/// stages deep; S = Q Kᵀ and O += P V run on mma.sync.m16n8k16 (fp16/bf16
/// operands, fp32 accumulators) with operands loaded by ldmatrix, and the
/// online softmax stays in registers (each thread holds two rows' running
/// max and partial sum). Shared-memory rows are padded by 16 bytes, so the
/// eight row addresses of an ldmatrix phase fall in distinct banks.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvkit/core/error.hpp"
#include "kvkit/cuda/attention_decode.cuh"  // copy_unit_16, cp_async_commit / wait
#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/prefill_plan.hpp"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/ops/attention_params.hpp"

namespace kvkit::cuda {

namespace detail {

template <int kHeadDim>
struct PrefillTraits {
  static constexpr int kWarps = kPrefillRowsPerBlock / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kPrefillRowsPerBlock;  // query rows per block
  static constexpr int kBlockN = 64;                    // keys per tile
  static constexpr int kStride = kHeadDim + 8;          // shared row, elements (16-byte pad)
  static constexpr int kUnits = kHeadDim / 8;           // 16-byte units per row
  static constexpr int kKChunks = kHeadDim / 16;        // k steps of S = Q K^T
  static constexpr int kDimBlocks = kHeadDim / 8;       // n blocks of O
  static constexpr int kKeyBlocks = kBlockN / 8;        // n blocks of S
  // sQ [kBlockM][kStride], then two stages of sK [kBlockN][kStride] and sV [kBlockN][kStride].
  static constexpr std::size_t kSmemBytes = std::size_t(kBlockM + 4 * kBlockN) * kStride * 2;

  static_assert(kHeadDim % 16 == 0, "head_dim must be a multiple of the mma k step");
  static_assert(kBlockN % 16 == 0, "key tiles are whole k steps of O += P V");
};

/// Launch-time values besides the params.
struct PrefillLaunch {
  int group = 1;           ///< q heads per kv head
  int max_q_tiles = 0;     ///< grid x
  bool q_async = true;     ///< q pointer and strides allow 16-byte cp.async
  bool kv_async = true;    ///< cache pointers and strides allow 16-byte cp.async
};

/// D += A B for one m16n8k16 step: A [16 x 16] row-major in 4 registers, B
/// [16 x 8] column-major in 2, C/D [16 x 8] float in 4 (PTX ISA fragment
/// layouts: with g = lane / 4, c = lane % 4, register a0 holds A(g, 2c..2c+1),
/// a1 A(g+8, 2c..), a2 A(g, 2c+8..), a3 A(g+8, 2c+8..); b0 holds B(2c..2c+1, g),
/// b1 B(2c+8.., g); d0, d1 are D(g, 2c), D(g, 2c+1) and d2, d3 the same
/// columns of row g+8). The lower-numbered element sits in the low half.
template <class T>
__device__ KVKIT_FORCEINLINE void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                            std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a GPU before sm_80: no fp16/bf16 m16n8k16 (compile for sm_80 or newer)
#else
  (void)d;
  (void)a;
  (void)b0;
  (void)b1;
#endif
}

/// ldmatrix .x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of
/// 8x8 matrix i; register i of lane l receives row l / 4, elements
/// 2 (l % 4) and 2 (l % 4) + 1 of matrix i. With .trans (kTrans), the
/// transposed matrix: elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
template <bool kTrans>
__device__ KVKIT_FORCEINLINE void ldmatrix_x4(std::uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = unsigned(__cvta_generic_to_shared(smem_row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#else
  (void)smem_row;
  r[0] = r[1] = r[2] = r[3] = 0u;
#endif
}

/// Two floats as a packed pair of T: `lo` in the low 16 bits.
template <class T>
__device__ KVKIT_FORCEINLINE std::uint32_t pack2(float lo, float hi) {
  return std::uint32_t(T(lo).bits) | (std::uint32_t(T(hi).bits) << 16);
}

/// Sum and max over the four lanes of a quad (lanes that hold one mma row).
__device__ KVKIT_FORCEINLINE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ KVKIT_FORCEINLINE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int kHeadDim, class T>
__global__ void __launch_bounds__(PrefillTraits<kHeadDim>::kThreads, 1)
    paged_prefill_kernel(const PagedDecodeParams p, const PrefillLaunch L) {
  using Tr = PrefillTraits<kHeadDim>;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kStride = Tr::kStride;
  constexpr int kUnits = Tr::kUnits;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ uint4 smem[];
  T* s_q = reinterpret_cast<T*>(smem);              // [kBlockM][kStride]
  T* s_kv = s_q + std::size_t(kBlockM) * kStride;   // [2 stages][K, V][kBlockN][kStride]

  // Block -> (sequence, kv head, row tile). The last row tiles of a chunk see
  // the most keys (causal), so they are started first.
  const int group = L.group;
  const std::int64_t b = blockIdx.y / p.layout.num_heads;
  const std::int64_t kv_head = blockIdx.y % p.layout.num_heads;
  const std::int64_t tile = std::int64_t(L.max_q_tiles) - 1 - blockIdx.x;
  const std::int64_t q_begin = attention_q_begin(p, b);
  const std::int64_t q_count = attention_q_count(p, b);
  const std::int64_t all_rows = q_count * group;
  const std::int64_t row0 = tile * kBlockM;
  if (row0 >= all_rows) return;
  const int rows = all_rows - row0 < kBlockM ? int(all_rows - row0) : kBlockM;
  const std::int64_t seq_len = p.page_table.seq_len(b);
  const std::int64_t pos0 = seq_len - q_count;  // position of the chunk's first token
  const std::int64_t q_pos_lo = pos0 + row0 / group;
  const std::int64_t q_pos_hi = pos0 + (row0 + rows - 1) / group;
  const AttentionKeySpan span = attention_key_span(p, seq_len, q_pos_lo, q_pos_hi);
  const std::int64_t num_tiles = prefill_num_key_tiles(span, kBlockN);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // mma group: rows g and g + 8 of the warp's 16
  const int c = lane % 4;  // thread in group: columns 2c, 2c + 1 of each n block

  // Q rows -> shared memory (zeros beyond the chunk).
  {
    const T* q_base = static_cast<const T*>(p.q);
    for (int u = tid; u < kBlockM * kUnits; u += kThreads) {
      const int r = u / kUnits;
      const int unit = u - r * kUnits;
      T* dst = s_q + r * kStride + unit * 8;
      if (r < rows) {
        const std::int64_t row = row0 + r;
        const std::int64_t token = q_begin + row / group;
        const std::int64_t head = kv_head * group + row % group;
        copy_unit_16(dst, q_base + token * p.q_stride_token + head * p.q_stride_head + unit * 8, L.q_async, 2);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }

  const std::int32_t* pages = p.page_table.pages(b);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  // Key tile t -> stage t % 2. Rows past the tile's keys are zeros, so that
  // masked products (P = 0) never meet stale NaN or inf in V.
  const auto load_tile = [&](std::int64_t t) {
    std::int64_t first = 0;
    int n = 0;
    prefill_key_tile(span, kBlockN, t, first, n);
    T* dst_k = s_kv + std::size_t(t % 2) * 2 * kBlockN * kStride;
    T* dst_v = dst_k + kBlockN * kStride;
    for (int u = tid; u < 2 * kBlockN * kUnits; u += kThreads) {
      const bool is_v = u >= kBlockN * kUnits;
      const int w = is_v ? u - kBlockN * kUnits : u;
      const int j = w / kUnits;
      const int unit = w - j * kUnits;
      T* dst = (is_v ? dst_v : dst_k) + j * kStride + unit * 8;
      if (j < n) {
        const std::int64_t off =
            p.layout.slot_offset(token_slot(pages, first + j, p.layout.page_shift), kv_head) + unit * 8;
        copy_unit_16(dst, (is_v ? v_cache : k_cache) + off, L.kv_async, 2);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };

  // This thread's two rows (h = 0: row g, h = 1: row g + 8 of the warp).
  std::int64_t q_pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    q_pos[h] = pos0 + (row0 + (r < rows ? r : rows - 1)) / group;
  }
  float o_acc[Tr::kDimBlocks][4];
#pragma unroll
  for (int nb = 0; nb < Tr::kDimBlocks; ++nb) {
#pragma unroll
    for (int i = 0; i < 4; ++i) o_acc[nb][i] = 0.0f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the logits (natural units)
  float row_sum[2] = {0.0f, 0.0f};            // this thread's part of Σ exp(logit - max)

  // ldmatrix row addresses that depend on the lane only (PrefillLdmatrixLanes):
  // Q rows of this warp, k step kk at + kk * 16; K at keys 16 jp, dims 16 kk ->
  // (b0, b1) of key blocks 2 jp and 2 jp + 1; V (.trans) at keys 16 kk, dims
  // 16 dp -> (b0, b1) of dim blocks 2 dp and 2 dp + 1.
  using Lanes = PrefillLdmatrixLanes;
  const T* q_frag_row = s_q + (warp * 16 + Lanes::q_row(lane)) * kStride + Lanes::q_col(lane);
  const int k_frag_offset = Lanes::k_row(lane) * kStride + Lanes::k_col(lane);
  const int v_frag_offset = Lanes::v_row(lane) * kStride + Lanes::v_col(lane);

  if (num_tiles > 0) load_tile(0);
  cp_async_commit();  // group: Q and tile 0
  for (std::int64_t t = 0; t < num_tiles; ++t) {
    if (t + 1 < num_tiles) load_tile(t + 1);  // its stage was freed by the barrier ending t - 1
    cp_async_commit();
    cp_async_wait<1>();  // everything but tile t + 1 has landed
    __syncthreads();

    std::int64_t first = 0;
    int n = 0;
    prefill_key_tile(span, kBlockN, t, first, n);
    const T* s_k = s_kv + std::size_t(t % 2) * 2 * kBlockN * kStride;
    const T* s_v = s_k + kBlockN * kStride;

    // S = Q K^T: [16 rows][kBlockN keys] per warp, in C fragments.
    float s[Tr::kKeyBlocks][4];
#pragma unroll
    for (int nb = 0; nb < Tr::kKeyBlocks; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nb][i] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < Tr::kKChunks; ++kk) {
      std::uint32_t a[4];
      ldmatrix_x4<false>(a, q_frag_row + kk * 16);
#pragma unroll
      for (int jp = 0; jp < kBlockN / 16; ++jp) {
        std::uint32_t bk[4];
        ldmatrix_x4<false>(bk, s_k + jp * 16 * kStride + kk * 16 + k_frag_offset);
        mma_16816<T>(s[2 * jp], a, bk[0], bk[1]);
        mma_16816<T>(s[2 * jp + 1], a, bk[2], bk[3]);
      }
    }

    // Scores, mask and online softmax. Element (nb, i): row g + 8 (i / 2),
    // key first + nb * 8 + 2c + (i % 2).
    const std::int64_t last = first + n - 1;
    const bool all_visible = n == kBlockN && attention_keys_all_visible(p, q_pos_lo, q_pos_hi, first, last);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < Tr::kKeyBlocks; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2;
        const int j = nb * 8 + 2 * c + (i % 2);
        const bool visible = all_visible || (j < n && attention_visible(p, q_pos[h], first + j));
        s[nb][i] = visible ? attention_logit(p, s[nb][i]) : -INFINITY;
        tile_max[h] = fmaxf(tile_max[h], s[nb][i]);
      }
    }
    float factor[2], base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m = fmaxf(row_max[h], quad_max(tile_max[h]));
      base[h] = m == -INFINITY ? 0.0f : m;  // a row that has seen nothing keeps P = 0, no NaN
      factor[h] = exp2f((row_max[h] - base[h]) * kLog2e);  // 0 when row_max was -inf
      row_max[h] = m;
      row_sum[h] *= factor[h];
    }
#pragma unroll
    for (int nb = 0; nb < Tr::kKeyBlocks; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2;
        s[nb][i] = exp2f((s[nb][i] - base[h]) * kLog2e);
        row_sum[h] += s[nb][i];
      }
    }
#pragma unroll
    for (int nb = 0; nb < Tr::kDimBlocks; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o_acc[nb][i] *= factor[i / 2];
    }

    // O += P V. P's C fragments of key blocks 2 kk and 2 kk + 1 are the A
    // fragment of k step kk: a0 = (row g, keys 2c..), a1 = (row g + 8, keys 2c..),
    // a2 = (row g, keys 8 + 2c..), a3 = (row g + 8, keys 8 + 2c..).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      std::uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        std::uint32_t bv[4];
        ldmatrix_x4<true>(bv, s_v + kk * 16 * kStride + dp * 16 + v_frag_offset);
        mma_16816<T>(o_acc[2 * dp], a, bv[0], bv[1]);
        mma_16816<T>(o_acc[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before tile t + 2 overwrites it
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (no key tiles: the Q copies)

  // o = O / Σ, lse = max + log Σ; rows past the chunk are not written.
  T* o_base = static_cast<T*>(p.o);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float sum = quad_sum(row_sum[h]);
    const int r = warp * 16 + g + 8 * h;
    if (r >= rows) continue;
    const std::int64_t row = row0 + r;
    const std::int64_t token = q_begin + row / group;
    const std::int64_t head = kv_head * group + row % group;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* dst = o_base + token * p.o_stride_token + head * p.o_stride_head;
#pragma unroll
    for (int nb = 0; nb < Tr::kDimBlocks; ++nb) {
      dst[nb * 8 + 2 * c] = T(o_acc[nb][2 * h] * inv);
      dst[nb * 8 + 2 * c + 1] = T(o_acc[nb][2 * h + 1] * inv);
    }
    if (c == 0 && p.lse != nullptr) {
      p.lse[token * p.num_q_heads + head] = sum > 0.0f ? row_max[h] + logf(sum) : -INFINITY;
    }
  }
}

}  // namespace detail

/// Runs chunked-prefill attention on `stream` as planned: writes o (and lse
/// if requested) for every query row, like kvkit::paged_decode_attention
/// with the same params. All pointers in `p` are device pointers, q_indptr
/// included (see prefill_plan.hpp). Neither allocates nor synchronizes, so
/// it can be captured in a CUDA graph. Throws kvkit::Error (launching
/// nothing) on invalid params, head_dim or dtypes the kernel is not built
/// for, a plan made for another shape, or head_dim 128 on a GPU with less
/// than 102 KiB of shared memory per block (sm_86 / sm_89); or on a failed
/// launch.
inline void run_prefill(const PagedDecodeParams& p, const PrefillPlan& plan, cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::run_prefill";
  detail::validate_cuda_prefill_shapes(p, kWhere);
  const bool ragged = p.q_indptr != nullptr;
  const bool same_shape = plan.batch_size == p.page_table.batch_size && plan.ragged == ragged &&
                          (ragged || plan.q_len == p.q_len) && plan.num_q_heads == p.num_q_heads &&
                          plan.num_kv_heads == p.layout.num_heads && plan.head_dim == p.layout.head_dim &&
                          plan.q_dtype == p.q_dtype && plan.kv_dtype == p.kv_dtype;
  if (!same_shape) {
    fail(kWhere, "the plan was made for batch ", plan.batch_size, ", ",
         plan.ragged ? "ragged queries (q_indptr)" : "uniform queries (no q_indptr)", ", ", plan.num_q_heads, "/",
         plan.num_kv_heads, " heads, head_dim ", plan.head_dim, ", ", plan.q_dtype, "/", plan.kv_dtype,
         "; expected the same as params (batch ", p.page_table.batch_size, ", ",
         ragged ? "ragged queries (q_indptr)" : "uniform queries (no q_indptr)", ", ", p.num_q_heads, "/",
         p.layout.num_heads, " heads, head_dim ", p.layout.head_dim, ", ", p.q_dtype, "/", p.kv_dtype,
         "): call plan_prefill again");
  }
  check_argument(plan.max_q_tiles >= 0 && p.page_table.batch_size * plan.num_kv_heads <= 65535, kWhere,
                 "plan.max_q_tiles", plan.max_q_tiles, "a plan made by plan_prefill");
  if (plan.max_q_tiles == 0 || p.page_table.batch_size == 0) return;

  detail::PrefillLaunch L;
  L.group = p.num_q_heads / int(p.layout.num_heads);
  L.max_q_tiles = plan.max_q_tiles;
  const std::uint64_t es = dtype_size(p.q_dtype);
  L.q_async = detail::copy_unit_bytes({detail::address_of(p.q), std::uint64_t(p.q_stride_token) * es,
                                       std::uint64_t(p.q_stride_head) * es}) == 16;
  L.kv_async = detail::copy_unit_bytes({detail::address_of(p.k_cache), detail::address_of(p.v_cache),
                                        std::uint64_t(p.layout.stride_page) * es,
                                        std::uint64_t(p.layout.stride_slot) * es,
                                        std::uint64_t(p.layout.stride_head) * es}) == 16;
  const dim3 grid(unsigned(plan.max_q_tiles), unsigned(p.page_table.batch_size * plan.num_kv_heads));
  detail::dispatch_prefill(p.layout.head_dim, p.q_dtype, p.kv_dtype, kWhere, [&](auto dim, auto tag) {
    constexpr int kHeadDim = decltype(dim)::value;
    using T = typename decltype(tag)::type;
    using Tr = detail::PrefillTraits<kHeadDim>;
    const auto kernel = detail::paged_prefill_kernel<kHeadDim, T>;
    detail::check_smem_optin(Tr::kSmemBytes, kWhere,
                             "head_dim 128 needs sm_80 / sm_87 / sm_90 or newer (head_dim <= 96 fits 99 KiB)");
    // Above 48 KiB of dynamic shared memory needs an opt-in (a per-function
    // attribute, not a stream operation: allowed while a graph is captured).
    KVKIT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmemBytes)));
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, L);
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
