#pragma once
// Float64 reference for small floating-point formats, written from the
// definitions (IEEE-754 binary16, bfloat16, OCP FP8 E4M3/E5M2) rather than
// from bit tricks, so that kvkit's conversions are checked independently.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvkit::testing {

struct SmallFloatFormat {
  const char* name;
  int exp_bits;
  int man_bits;
  bool ieee_specials;       // top exponent = inf/NaN (IEEE); else only all-ones is NaN (E4M3)
  std::uint32_t canonical_nan;  // what float NaN converts to (CUDA's canonical NaN)

  int bias() const { return (1 << (exp_bits - 1)) - 1; }
  std::uint32_t sign_bit() const { return 1u << (exp_bits + man_bits); }
  std::uint32_t code_count() const { return 1u << (exp_bits + man_bits + 1); }
  std::uint32_t max_finite_code() const {
    const std::uint32_t top = (1u << (exp_bits + man_bits)) - 1;  // all ones, positive
    return ieee_specials ? top - (1u << man_bits) : top - 1;
  }
  /// Overflow without saturation: the code after max finite is inf (IEEE) or NaN (E4M3).
  std::uint32_t overflow_code() const { return max_finite_code() + 1; }

  /// The value a bit pattern denotes, by the format's definition.
  double decode(std::uint32_t code) const {
    const bool negative = (code & sign_bit()) != 0;
    const std::uint32_t e = (code >> man_bits) & ((1u << exp_bits) - 1);
    const std::uint32_t m = code & ((1u << man_bits) - 1);
    const std::uint32_t e_max = (1u << exp_bits) - 1;
    double value;
    if (ieee_specials && e == e_max) {
      value = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
    } else if (!ieee_specials && e == e_max && m == (1u << man_bits) - 1) {
      value = std::numeric_limits<double>::quiet_NaN();
    } else if (e == 0) {
      value = std::ldexp(double(m), 1 - bias() - man_bits);
    } else {
      value = std::ldexp(1.0 + std::ldexp(double(m), -man_bits), int(e) - bias());
    }
    return negative ? -value : value;
  }
};

inline const SmallFloatFormat kHalfFormat{"float16", 5, 10, true, 0x7fff};
inline const SmallFloatFormat kBFloat16Format{"bfloat16", 8, 7, true, 0x7fff};
inline const SmallFloatFormat kE4M3Format{"float8_e4m3", 4, 3, false, 0x7f};
inline const SmallFloatFormat kE5M2Format{"float8_e5m2", 5, 2, true, 0x7f};

/// Round-to-nearest-even by search over the format's representable values.
class RoundingReference {
 public:
  explicit RoundingReference(const SmallFloatFormat& format) : format_(format) {
    for (std::uint32_t c = 0; c <= format.max_finite_code(); ++c) values_.push_back(format.decode(c));
    // One step past the largest finite value: rounding up to it means overflow.
    const double top = values_.back();
    values_.push_back(top + (top - values_[values_.size() - 2]));
  }

  /// Expected bit pattern for x. `saturate`: clamp overflow to ±max finite.
  std::uint32_t round(double x, bool saturate) const {
    if (std::isnan(x)) return format_.canonical_nan;
    const std::uint32_t sign = std::signbit(x) ? format_.sign_bit() : 0u;
    const double a = std::fabs(x);
    const std::uint32_t over = saturate ? format_.max_finite_code() : format_.overflow_code();
    if (a >= values_.back()) return sign | over;
    // values_[lo] <= a < values_[lo + 1]
    const auto it = std::upper_bound(values_.begin(), values_.end(), a);
    const std::uint32_t hi = std::uint32_t(it - values_.begin());
    const std::uint32_t lo = hi - 1;
    const double down = a - values_[lo];
    const double up = values_[hi] - a;
    std::uint32_t code;
    if (down < up) {
      code = lo;
    } else if (up < down) {
      code = hi;
    } else {
      code = (lo & 1u) ? hi : lo;
    }
    if (code > format_.max_finite_code()) code = over;
    return sign | code;
  }

  /// Midpoints between consecutive non-negative representable values (the ties).
  std::vector<double> midpoints() const {
    std::vector<double> out;
    for (std::size_t i = 0; i + 1 < values_.size(); ++i) out.push_back(0.5 * (values_[i] + values_[i + 1]));
    return out;
  }

 private:
  SmallFloatFormat format_;
  std::vector<double> values_;  // non-negative finite values by code, plus one overflow step
};

}  // namespace kvkit::testing
