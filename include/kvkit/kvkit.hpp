#pragma once
/// @file kvkit.hpp
/// Umbrella header for kvkit's host parts (no CUDA toolkit needed).

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/config.hpp"
#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/float8.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/core/tensor_view.hpp"
#include "kvkit/layout/capacity.hpp"
#include "kvkit/layout/contiguous_kv_layout.hpp"
#include "kvkit/layout/virtual_kv_cache.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/copy_blocks.hpp"
#include "kvkit/ops/gather.hpp"
#include "kvkit/ops/quantize.hpp"
#include "kvkit/ops/swap_blocks.hpp"
