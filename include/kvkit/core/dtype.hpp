#pragma once
/// @file dtype.hpp
/// Runtime element types (kvkit::DType), their sizes and names, and the
/// mapping from C++ types to DType.

#include <cstddef>
#include <cstdint>
#include <ostream>
#include <type_traits>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/config.hpp"
#include "kvkit/core/float8.hpp"
#include "kvkit/core/half.hpp"

namespace kvkit {

/// Element type of a tensor or cache.
enum class DType : std::uint8_t {
  kFloat32,
  kFloat16,
  kBFloat16,
  kFloat8E4M3,
  kFloat8E5M2,
  kInt8,
  kUInt8,
  kInt32,
  kInt64,
};

/// Size of one element in bytes.
KVKIT_HOST_DEVICE constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat8E4M3: return 1;
    case DType::kFloat8E5M2: return 1;
    case DType::kInt8: return 1;
    case DType::kUInt8: return 1;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  return 0;
}

/// Short lowercase name: "float32", "float16", "bfloat16", "float8_e4m3", ...
constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat8E4M3: return "float8_e4m3";
    case DType::kFloat8E5M2: return "float8_e5m2";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown";
}

/// True for the floating-point types (fp32, fp16, bf16, fp8).
constexpr bool dtype_is_floating(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16 ||
         t == DType::kFloat8E4M3 || t == DType::kFloat8E5M2;
}

inline std::ostream& operator<<(std::ostream& out, DType t) { return out << dtype_name(t); }

/// dtype_of<T>: the DType of a C++ element type.
template <class T>
struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeOf<half> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeOf<bfloat16> { static constexpr DType value = DType::kBFloat16; };
template <> struct DTypeOf<float8_e4m3> { static constexpr DType value = DType::kFloat8E4M3; };
template <> struct DTypeOf<float8_e5m2> { static constexpr DType value = DType::kFloat8E5M2; };
template <> struct DTypeOf<std::int8_t> { static constexpr DType value = DType::kInt8; };
template <> struct DTypeOf<std::uint8_t> { static constexpr DType value = DType::kUInt8; };
template <> struct DTypeOf<std::int32_t> { static constexpr DType value = DType::kInt32; };
template <> struct DTypeOf<std::int64_t> { static constexpr DType value = DType::kInt64; };

template <class T>
inline constexpr DType dtype_of = DTypeOf<std::remove_cv_t<T>>::value;

/// Converts any kvkit element type to float (int types by value).
template <class T>
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float to_float(T v) {
  return static_cast<float>(v);
}

/// Converts float to a kvkit element type: floating types round to nearest
/// even (fp8 saturating to ±max finite); identity for float.
template <class T>
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE T from_float(float f) {
  return T(f);
}

}  // namespace kvkit
