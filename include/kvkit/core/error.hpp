#pragma once
/// @file error.hpp
/// kvkit::Error and the argument-checking helpers used at API boundaries.
///
/// Every message names where the check failed, the argument, its value and
/// what was expected, e.g.
///   kvkit::PagedKVLayout: argument 'page_size' = 3: expected a power of two
/// Checks format their message only when they fail, so they are cheap on the
/// success path; none are used inside kernels' inner loops.

#include <sstream>
#include <stdexcept>
#include <type_traits>
#include <string>
#include <utility>

namespace kvkit {

/// The one exception type kvkit throws for bad input and failed CUDA calls.
/// Running out of blocks is not an error: allocators report it in their result.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {

template <class T>
void append_value(std::ostringstream& out, const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    out << (value ? "true" : "false");
  } else if constexpr (std::is_same_v<T, signed char> || std::is_same_v<T, unsigned char> ||
                       std::is_same_v<T, char>) {
    out << static_cast<int>(value);
  } else if constexpr (std::is_pointer_v<T> && !std::is_same_v<T, const char*>) {
    if (value == nullptr) {
      out << "nullptr";
    } else {
      out << static_cast<const void*>(value);
    }
  } else {
    out << value;
  }
}

template <class... Pieces>
std::string concat(Pieces&&... pieces) {
  std::ostringstream out;
  (append_value(out, pieces), ...);
  return out.str();
}

}  // namespace detail

/// Throws kvkit::Error: "<where>: argument '<arg>' = <value>: expected <expected...>".
/// The expectation is given as pieces that are streamed together, so that
/// callers can mention other values without formatting them up front.
template <class T, class... Expected>
[[noreturn]] void fail_argument(const char* where, const char* arg, const T& value,
                                Expected&&... expected) {
  std::ostringstream out;
  out << where << ": argument '" << arg << "' = ";
  detail::append_value(out, value);
  out << ": expected ";
  (detail::append_value(out, expected), ...);
  throw Error(out.str());
}

/// Checks a precondition on one argument; see fail_argument for the message.
template <class T, class... Expected>
inline void check_argument(bool ok, const char* where, const char* arg, const T& value,
                           Expected&&... expected) {
  if (!ok) fail_argument(where, arg, value, std::forward<Expected>(expected)...);
}

/// Throws kvkit::Error for a failed precondition that involves several
/// arguments at once (e.g. "key and value shapes differ").
template <class... Pieces>
[[noreturn]] void fail(const char* where, Pieces&&... pieces) {
  throw Error(detail::concat(where, ": ", std::forward<Pieces>(pieces)...));
}

/// Checks a precondition; the message pieces are formatted only on failure.
template <class... Pieces>
inline void check(bool ok, const char* where, Pieces&&... pieces) {
  if (!ok) fail(where, std::forward<Pieces>(pieces)...);
}

/// True when x is a positive power of two.
template <class Int>
constexpr bool is_power_of_two(Int x) {
  return x > 0 && (x & (x - 1)) == 0;
}

}  // namespace kvkit
