#pragma once
/// @file kvkit.hpp
/// Umbrella header for kvkit's host parts (no CUDA toolkit needed).
/// kvkit/memory/prefix_cache.hpp (block hashes) needs xxHash's header: include
/// it yourself and link kvkit::prefix_cache. CUDA ops live in kvkit/cuda/*.cuh.

// core: macros, errors, numeric types, views
#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/config.hpp"
#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/float8.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/core/tensor_view.hpp"

// memory: block pool, sequences, prefix cache bookkeeping, capacity planning
#include "kvkit/memory/block_hash.hpp"
#include "kvkit/memory/block_pool.hpp"
#include "kvkit/memory/capacity_planner.hpp"
#include "kvkit/memory/kv_cache_manager.hpp"
#include "kvkit/memory/radix_index.hpp"

// layout: where each cache element lives
#include "kvkit/layout/capacity.hpp"
#include "kvkit/layout/contiguous_kv_layout.hpp"
#include "kvkit/layout/contiguous_page_view.hpp"
#include "kvkit/layout/host_cache_buffer.hpp"
#include "kvkit/layout/virtual_kv_cache.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"

// ops: CPU implementations
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/attention_decode.hpp"
#include "kvkit/ops/copy_blocks.hpp"
#include "kvkit/ops/gather.hpp"
#include "kvkit/ops/merge_states.hpp"
#include "kvkit/ops/mla_compress.hpp"
#include "kvkit/ops/mla_config.hpp"
#include "kvkit/ops/mla_decode.hpp"
#include "kvkit/ops/mla_fp8.hpp"
#include "kvkit/ops/moe_combine.hpp"
#include "kvkit/ops/moe_dispatch.hpp"
#include "kvkit/ops/moe_router.hpp"
#include "kvkit/ops/moe_stats.hpp"
#include "kvkit/ops/quantize.hpp"
#include "kvkit/ops/rope.hpp"
#include "kvkit/ops/rope_append.hpp"
#include "kvkit/ops/swap_blocks.hpp"
