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
#include "kvkit/ops/moe_combine.hpp"
#include "kvkit/ops/moe_dispatch.hpp"
#include "kvkit/ops/moe_router.hpp"
#include "kvkit/ops/moe_router_config.hpp"
#include "kvkit/ops/moe_scoring.hpp"
#include "kvkit/ops/moe_stats.hpp"
