#pragma once
/// @file dispatch.hpp
/// Runtime DType -> compile-time C++ type dispatch, with a clear error for
/// types an op does not support.
///
///   kvkit::dispatch_dtype<kvkit::FloatTypes>(view.dtype(), "kvkit::append", "key",
///       [&](auto tag) { using T = typename decltype(tag)::type; run<T>(...); });

#include <cstdint>
#include <sstream>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"

namespace kvkit {

/// Carries a C++ type into a generic lambda.
template <class T>
struct TypeTag {
  using type = T;
};

/// A list of element types an op supports.
template <class... Ts>
struct TypeList {};

/// Types a cache of activations is stored in.
using FloatTypes = TypeList<float, half, bfloat16>;
/// The above plus the 8-bit floats.
using FloatAndFp8Types = TypeList<float, half, bfloat16, float8_e4m3, float8_e5m2>;
/// Index types of page tables and slot mappings.
using IndexTypes = TypeList<std::int32_t, std::int64_t>;

namespace detail {
template <class... Ts>
std::string dtype_names(TypeList<Ts...>) {
  std::ostringstream out;
  out << "one of {";
  int i = 0;
  ((out << (i++ ? ", " : "") << dtype_name(dtype_of<Ts>)), ...);
  out << '}';
  return out.str();
}
}  // namespace detail

namespace detail {
template <class T, class... Rest, class F>
decltype(auto) dispatch_known_dtype(TypeList<T, Rest...>, DType dtype, F&& f) {
  if constexpr (sizeof...(Rest) == 0) {
    return f(TypeTag<T>{});
  } else {
    if (dtype == dtype_of<T>) return f(TypeTag<T>{});
    return dispatch_known_dtype(TypeList<Rest...>{}, dtype, std::forward<F>(f));
  }
}

template <class... Ts>
constexpr bool contains_dtype(TypeList<Ts...>, DType dtype) {
  return ((dtype == dtype_of<Ts>) || ...);
}
}  // namespace detail

/// Calls `f(TypeTag<T>{})` for the T in `List` whose DType is `dtype`; throws
/// kvkit::Error naming `where`, `arg` and the supported types otherwise.
/// Returns what f returns (the same type for every T).
template <class List, class F>
decltype(auto) dispatch_dtype(DType dtype, const char* where, const char* arg, F&& f) {
  if (!detail::contains_dtype(List{}, dtype)) {
    fail_argument(where, arg, dtype, detail::dtype_names(List{}));
  }
  return detail::dispatch_known_dtype(List{}, dtype, std::forward<F>(f));
}

}  // namespace kvkit
