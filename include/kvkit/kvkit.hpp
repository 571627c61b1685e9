#pragma once
/// @file kvkit.hpp
/// Umbrella header for kvkit's host parts (no CUDA toolkit needed).

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/config.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/float8.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/core/tensor_view.hpp"
#include "kvkit/memory/block_hash.hpp"
#include "kvkit/memory/block_pool.hpp"
#include "kvkit/memory/capacity.hpp"
#include "kvkit/memory/kv_cache_manager.hpp"
// kvkit/memory/prefix_cache.hpp (block hashes) needs <xxhash.h>: include it yourself.
