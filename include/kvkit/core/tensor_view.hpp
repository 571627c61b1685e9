#pragma once
/// @file tensor_view.hpp
/// kvkit::TensorView: a non-owning, strided view of host or device memory.
///
/// Shapes and strides are int64 and counted in elements (not bytes). The
/// constructor validates what it is given (rank, non-negative sizes and
/// strides, no null pointer behind a non-empty view, alignment to the element
/// size) and throws kvkit::Error naming the problem. A view never dereferences
/// its pointer, so it describes device memory just as well as host memory.

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <sstream>
#include <string>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"

namespace kvkit {

/// Largest rank a TensorView holds.
inline constexpr int kMaxTensorRank = 6;

/// A small fixed-capacity list of int64 sizes or strides.
struct Dims {
  std::int64_t values[kMaxTensorRank] = {};
  int count = 0;

  Dims() = default;
  Dims(std::initializer_list<std::int64_t> list) {
    check_argument(list.size() <= std::size_t(kMaxTensorRank), "kvkit::Dims", "rank",
                   list.size(), "at most ", kMaxTensorRank);
    for (std::int64_t v : list) values[count++] = v;
  }
  std::int64_t operator[](int i) const { return values[i]; }
  std::int64_t& operator[](int i) { return values[i]; }
  int size() const { return count; }
};

inline std::ostream& operator<<(std::ostream& out, const Dims& d) {
  out << '[';
  for (int i = 0; i < d.count; ++i) out << (i ? ", " : "") << d.values[i];
  return out << ']';
}

/// Row-major (C order) strides for a shape.
inline Dims contiguous_strides(const Dims& shape) {
  Dims strides;
  strides.count = shape.count;
  std::int64_t s = 1;
  for (int i = shape.count - 1; i >= 0; --i) {
    strides.values[i] = s;
    s *= shape.values[i] > 0 ? shape.values[i] : 1;
  }
  return strides;
}

/// Non-owning strided view: pointer + dtype + shape + strides (elements).
class TensorView {
 public:
  TensorView() = default;

  /// Contiguous row-major view.
  TensorView(void* data, DType dtype, Dims shape)
      : TensorView(data, dtype, shape, contiguous_strides(shape)) {}

  /// Strided view. Throws kvkit::Error if shape and strides differ in rank,
  /// a size or stride is negative, data is null while the view is non-empty,
  /// or data is not aligned to the element size.
  TensorView(void* data, DType dtype, Dims shape, Dims strides)
      : data_(data), dtype_(dtype), shape_(shape), strides_(strides) {
    constexpr const char* kWhere = "kvkit::TensorView";
    check(shape.size() == strides.size(), kWhere, "shape ", shape, " has rank ", shape.size(),
          " but strides ", strides, " have rank ", strides.size(), "; expected equal ranks");
    numel_ = 1;
    for (int i = 0; i < shape.size(); ++i) {
      if (shape[i] < 0) {
        fail(kWhere, "shape ", shape, " has size ", shape[i], " in dimension ", i,
             "; expected sizes >= 0");
      }
      if (strides[i] < 0) {
        fail(kWhere, "strides ", strides, " have stride ", strides[i], " in dimension ", i,
             "; expected strides >= 0");
      }
      numel_ *= shape[i];
    }
    if (numel_ > 0) {
      check_argument(data != nullptr, kWhere, "data", data, "a non-null pointer for shape ",
                     shape);
      check_argument(reinterpret_cast<std::uintptr_t>(data) % dtype_size(dtype) == 0, kWhere,
                     "data", data, "an address aligned to ", dtype_size(dtype), " bytes (",
                     dtype_name(dtype), ")");
    }
  }

  void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  int rank() const { return shape_.size(); }
  const Dims& shape() const { return shape_; }
  const Dims& strides() const { return strides_; }
  std::int64_t size(int dim) const { return shape_[dim]; }
  std::int64_t stride(int dim) const { return strides_[dim]; }
  std::int64_t numel() const { return numel_; }
  bool empty() const { return numel_ == 0; }

  /// True when the strides are row-major contiguous (size-1 dims ignored).
  bool is_contiguous() const {
    std::int64_t expected = 1;
    for (int i = rank() - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[i] != expected) return false;
      expected *= shape_[i];
    }
    return true;
  }

  /// Typed pointer; throws if T does not match the view's dtype.
  template <class T>
  T* data_as() const {
    check(dtype_of<T> == dtype_, "kvkit::TensorView::data_as", "view holds ",
          dtype_name(dtype_), " but ", dtype_name(dtype_of<T>), " was asked for");
    return static_cast<T*>(data_);
  }

  /// Element offset of an index (no bounds check: hot path).
  std::int64_t offset(std::initializer_list<std::int64_t> index) const {
    std::int64_t off = 0;
    int d = 0;
    for (std::int64_t i : index) off += i * strides_[d++];
    return off;
  }

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kFloat32;
  Dims shape_;
  Dims strides_;
  std::int64_t numel_ = 0;
};

/// Throws kvkit::Error unless `view` has `dtype`.
inline void expect_dtype(const TensorView& view, const char* where, const char* arg, DType dtype) {
  if (view.dtype() != dtype) {
    fail_argument(where, arg, view.dtype(), dtype_name(dtype));
  }
}

/// Throws kvkit::Error unless `view`'s shape equals `shape`; -1 in `shape`
/// matches any size.
inline void expect_shape(const TensorView& view, const char* where, const char* arg,
                         const Dims& shape) {
  bool ok = view.rank() == shape.size();
  for (int i = 0; ok && i < shape.size(); ++i) {
    ok = shape[i] < 0 || view.size(i) == shape[i];
  }
  if (!ok) {
    std::ostringstream expected;
    expected << "shape [";
    for (int i = 0; i < shape.size(); ++i) {
      expected << (i ? ", " : "");
      if (shape[i] < 0) {
        expected << '*';
      } else {
        expected << shape[i];
      }
    }
    expected << ']';
    fail(where, "argument '", arg, "' has shape ", view.shape(), ": expected ", expected.str());
  }
}

}  // namespace kvkit
