// kvkit::Error messages and TensorView validation.

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/tensor_view.hpp"

using Catch::Matchers::Contains;
using kvkit::Dims;
using kvkit::DType;
using kvkit::TensorView;

TEST_CASE("argument errors name the place, the argument, the value and the expectation") {
  try {
    kvkit::check_argument(kvkit::is_power_of_two(3), "kvkit::PagedKVLayout", "page_size", 3,
                          "a power of two");
    FAIL("no exception");
  } catch (const kvkit::Error& e) {
    CHECK(std::string(e.what()) ==
          "kvkit::PagedKVLayout: argument 'page_size' = 3: expected a power of two");
  }
  // The expectation may mention other values; pieces are formatted only on failure.
  CHECK_THROWS_WITH(kvkit::check_argument(false, "f", "slot", std::int64_t(1024), "< num_slots (",
                                          1024, ")"),
                    "f: argument 'slot' = 1024: expected < num_slots (1024)");
  CHECK_NOTHROW(kvkit::check_argument(true, "f", "x", 1, "anything"));
  CHECK_THROWS_AS(kvkit::fail("f", "two things disagree"), kvkit::Error);
  CHECK_THROWS_WITH(kvkit::check(false, "f", "a=", 1, " b=", 2), "f: a=1 b=2");
}

TEST_CASE("a contiguous tensor view has row-major strides") {
  std::vector<float> data(2 * 3 * 4);
  TensorView v(data.data(), DType::kFloat32, {2, 3, 4});
  CHECK(v.rank() == 3);
  CHECK(v.numel() == 24);
  CHECK(v.stride(0) == 12);
  CHECK(v.stride(1) == 4);
  CHECK(v.stride(2) == 1);
  CHECK(v.is_contiguous());
  CHECK(v.offset({1, 2, 3}) == 23);
  CHECK(v.data_as<float>() == data.data());
  CHECK_THROWS_WITH(v.data_as<std::int32_t>(), Contains("holds float32") && Contains("int32"));
}

TEST_CASE("a strided tensor view describes a slice of a larger buffer") {
  std::vector<std::uint16_t> data(10 * 8);
  // Every other row of a [10, 8] fp16 matrix, first 5 columns.
  TensorView v(data.data(), DType::kFloat16, {5, 5}, {16, 1});
  CHECK(v.numel() == 25);
  CHECK_FALSE(v.is_contiguous());
  CHECK(v.offset({4, 4}) == 68);
}

TEST_CASE("tensor views reject mismatched shapes and strides, null data and misalignment") {
  std::vector<float> data(16);
  SECTION("rank mismatch") {
    CHECK_THROWS_WITH(TensorView(data.data(), DType::kFloat32, {4, 4}, {4}),
                      Contains("shape [4, 4] has rank 2 but strides [4] have rank 1"));
  }
  SECTION("negative size") {
    CHECK_THROWS_WITH(TensorView(data.data(), DType::kFloat32, {4, -1}),
                      Contains("size -1 in dimension 1"));
  }
  SECTION("negative stride") {
    CHECK_THROWS_WITH(TensorView(data.data(), DType::kFloat32, {4, 4}, {-4, 1}),
                      Contains("stride -4 in dimension 0"));
  }
  SECTION("null pointer with non-zero sizes") {
    CHECK_THROWS_WITH(TensorView(nullptr, DType::kFloat32, {4, 4}),
                      Contains("argument 'data' = nullptr") && Contains("non-null"));
    // An empty view may be null.
    CHECK_NOTHROW(TensorView(nullptr, DType::kFloat32, {0, 4}));
  }
  SECTION("misaligned pointer") {
    auto* bytes = reinterpret_cast<unsigned char*>(data.data());
    CHECK_THROWS_WITH(TensorView(bytes + 2, DType::kFloat32, {2}),
                      Contains("aligned to 4 bytes (float32)"));
    CHECK_NOTHROW(TensorView(bytes + 2, DType::kFloat16, {2}));
  }
  SECTION("rank above the maximum") {
    CHECK_THROWS_WITH((Dims{1, 1, 1, 1, 1, 1, 1}), Contains("'rank' = 7: expected at most 6"));
  }
}

TEST_CASE("expect_shape and expect_dtype explain a mismatch") {
  std::vector<float> data(4 * 8 * 64);
  TensorView key(data.data(), DType::kFloat32, {4, 8, 64});
  CHECK_NOTHROW(kvkit::expect_shape(key, "kvkit::append", "key", {4, 8, 64}));
  CHECK_NOTHROW(kvkit::expect_shape(key, "kvkit::append", "key", {-1, 8, 64}));
  CHECK_THROWS_WITH(kvkit::expect_shape(key, "kvkit::append", "key", {4, 8, 128}),
                    "kvkit::append: argument 'key' has shape [4, 8, 64]: expected shape [4, 8, 128]");
  CHECK_THROWS_WITH(kvkit::expect_shape(key, "kvkit::append", "key", {-1, 64}),
                    Contains("expected shape [*, 64]"));
  CHECK_THROWS_WITH(kvkit::expect_dtype(key, "kvkit::append", "key", DType::kBFloat16),
                    "kvkit::append: argument 'key' = float32: expected bfloat16");
}

TEST_CASE("dtype dispatch runs the matching type and rejects unsupported dtypes clearly") {
  const auto size_of = [](auto tag) { return sizeof(typename decltype(tag)::type); };
  CHECK(kvkit::dispatch_dtype<kvkit::FloatTypes>(DType::kBFloat16, "f", "x", size_of) == 2);
  CHECK(kvkit::dispatch_dtype<kvkit::FloatTypes>(DType::kFloat32, "f", "x", size_of) == 4);
  CHECK(kvkit::dispatch_dtype<kvkit::FloatAndFp8Types>(DType::kFloat8E5M2, "f", "x", size_of) == 1);
  CHECK_THROWS_WITH(
      kvkit::dispatch_dtype<kvkit::FloatTypes>(DType::kInt8, "kvkit::append", "key", size_of),
      "kvkit::append: argument 'key' = int8: expected one of {float32, float16, bfloat16}");
}
