#pragma once
/// @file rope_config.hpp
/// Rotary position embedding (RoPE) configuration and frequency tables:
/// styles (NeoX rotate-half, GPT-J interleaved, partial rotary) and scalings
/// (linear, NTK-aware static and dynamic, YaRN incl. DeepSeek's mscale, Llama-3.1).
///
/// Frequencies are computed in float64. The formulas follow the published
/// methods as implemented by HF transformers' `modeling_rope_utils.py` (and,
/// for YaRN with mscale_all_dim, DeepSeek-V3's official `inference/model.py`),
/// so that a model configured here rotates exactly as it was trained.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvkit/core/error.hpp"

namespace kvkit {

/// π in double precision (M_PI is not standard C++).
inline constexpr double kPi = 3.14159265358979323846;

/// Which dimensions are rotated together.
enum class RopeStyle : std::uint8_t {
  kNeox,  ///< rotate-half: pairs (i, i + rotary_dim/2) — Llama, Qwen, Mistral, GPT-NeoX (HF)
  kGptJ,  ///< interleaved: pairs (2i, 2i + 1) — GPT-J, DeepSeek's official MLA rope, Meta's llama code
};

/// How the base frequencies are rescaled for longer contexts.
enum class RopeScalingType : std::uint8_t {
  kNone,
  kLinear,      ///< position interpolation: every frequency / factor
  kNtkStatic,   ///< NTK-aware: base * factor^(d / (d - 2))
  kNtkDynamic,  ///< NTK-aware with the factor grown from the current sequence length
  kYarn,        ///< YaRN: ramp between interpolation and extrapolation by wavelength
  kLlama3,      ///< Llama-3.1: low/high frequency factors around the original context
};

/// Parameters of the scaling; fields unused by a type are ignored.
struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  double factor = 1.0;
  /// Context length the model was pre-trained with (YaRN, Llama-3.1, dynamic NTK).
  std::int64_t original_max_position = 0;
  double yarn_beta_fast = 32.0;
  double yarn_beta_slow = 1.0;
  /// YaRN attention scale: HF's `mscale` / `mscale_all_dim` (DeepSeek). 0 = unset.
  double yarn_mscale = 0.0;
  double yarn_mscale_all_dim = 0.0;
  /// YaRN: round the correction range to whole dimensions (HF `truncate`, default true).
  bool yarn_truncate = true;
  double llama3_low_freq_factor = 1.0;
  double llama3_high_freq_factor = 4.0;
};

/// A model's RoPE: which dimensions rotate, how, and at what frequencies.
struct RopeConfig {
  int head_dim = 128;
  int rotary_dim = 128;  ///< leading dims rotated (partial rotary when < head_dim); even
  double base = 10000.0;
  RopeStyle style = RopeStyle::kNeox;
  RopeScaling scaling{};

  /// Throws kvkit::Error on an odd rotary_dim, rotary_dim > head_dim, a
  /// non-positive base or a scaling that lacks its parameters.
  void validate(const char* where = "kvkit::RopeConfig") const {
    check_argument(head_dim > 0, where, "head_dim", head_dim, "> 0");
    check_argument(rotary_dim > 0 && rotary_dim % 2 == 0, where, "rotary_dim", rotary_dim,
                   "a positive even number");
    check_argument(rotary_dim <= head_dim, where, "rotary_dim", rotary_dim, "<= head_dim (",
                   head_dim, ")");
    check_argument(base > 1.0 && std::isfinite(base), where, "base", base, "a finite value > 1");
    if (scaling.type != RopeScalingType::kNone) {
      check_argument(scaling.factor > 0.0 && std::isfinite(scaling.factor), where,
                     "scaling.factor", scaling.factor, "a finite value > 0");
    }
    const bool needs_original = scaling.type == RopeScalingType::kYarn ||
                                scaling.type == RopeScalingType::kLlama3 ||
                                scaling.type == RopeScalingType::kNtkDynamic;
    if (needs_original) {
      check_argument(scaling.original_max_position > 0, where, "scaling.original_max_position",
                     scaling.original_max_position, "> 0 for YaRN, Llama-3.1 and dynamic NTK");
    }
    if (scaling.type == RopeScalingType::kLlama3) {
      check_argument(scaling.llama3_high_freq_factor > scaling.llama3_low_freq_factor, where,
                     "scaling.llama3_high_freq_factor", scaling.llama3_high_freq_factor,
                     "> llama3_low_freq_factor (", scaling.llama3_low_freq_factor, ")");
    }
  }

  // Presets (the values in each model's config.json).
  /// Llama-3-8B / 70B: NeoX, base 500000, no scaling.
  static RopeConfig llama3() { return {128, 128, 500000.0, RopeStyle::kNeox, {}}; }
  /// Llama-3.1 / 3.2 / 3.3: Llama-3 with factor 8 around an 8192-token original context.
  static RopeConfig llama3_1() {
    RopeConfig c = llama3();
    c.scaling.type = RopeScalingType::kLlama3;
    c.scaling.factor = 8.0;
    c.scaling.original_max_position = 8192;
    c.scaling.llama3_low_freq_factor = 1.0;
    c.scaling.llama3_high_freq_factor = 4.0;
    return c;
  }
  /// DeepSeek-V2/V3 decoupled RoPE: 64-dim q_pe/k_pe, interleaved pairs as the
  /// official weights expect, YaRN factor 40 from a 4096-token original context,
  /// mscale = mscale_all_dim = 1 (so cos/sin are unscaled and the softmax scale
  /// is multiplied by yarn_softmax_mscale()^2). V2 uses factor 40, V3 factor 40.
  static RopeConfig deepseek_yarn() {
    RopeConfig c{64, 64, 10000.0, RopeStyle::kGptJ, {}};
    c.scaling.type = RopeScalingType::kYarn;
    c.scaling.factor = 40.0;
    c.scaling.original_max_position = 4096;
    c.scaling.yarn_beta_fast = 32.0;
    c.scaling.yarn_beta_slow = 1.0;
    c.scaling.yarn_mscale = 1.0;
    c.scaling.yarn_mscale_all_dim = 1.0;
    return c;
  }
};

/// YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1).
inline double yarn_get_mscale(double factor, double mscale = 1.0) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

/// The factor YaRN multiplies cos and sin by (HF's `attention_factor`):
/// mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set
/// (DeepSeek: 1), else mscale(factor). 1 for every other scaling.
inline double rope_attention_factor(const RopeConfig& c) {
  if (c.scaling.type != RopeScalingType::kYarn) return 1.0;
  if (c.scaling.yarn_mscale != 0.0 && c.scaling.yarn_mscale_all_dim != 0.0) {
    return yarn_get_mscale(c.scaling.factor, c.scaling.yarn_mscale) /
           yarn_get_mscale(c.scaling.factor, c.scaling.yarn_mscale_all_dim);
  }
  return yarn_get_mscale(c.scaling.factor);
}

/// DeepSeek's extra softmax-scale factor: softmax_scale *= m * m with
/// m = mscale(factor, mscale_all_dim) (official inference/model.py). 1 unless
/// YaRN with mscale_all_dim is configured.
inline double yarn_softmax_mscale(const RopeConfig& c) {
  if (c.scaling.type != RopeScalingType::kYarn || c.scaling.yarn_mscale_all_dim == 0.0) return 1.0;
  return yarn_get_mscale(c.scaling.factor, c.scaling.yarn_mscale_all_dim);
}

/// Inverse frequencies [rotary_dim / 2], float64: pair i rotates by
/// position * inv_freq[i] radians. `sequence_length` matters only for dynamic
/// NTK (the longest sequence the table is used for; below the original context
/// no scaling applies). Throws kvkit::Error on an invalid config.
inline std::vector<double> rope_inv_freq(const RopeConfig& c, std::int64_t sequence_length = 0) {
  c.validate("kvkit::rope_inv_freq");
  const int half = c.rotary_dim / 2;
  const double d = double(c.rotary_dim);
  const RopeScaling& s = c.scaling;
  double base = c.base;
  if (s.type == RopeScalingType::kNtkStatic) {
    base = c.base * std::pow(s.factor, d / (d - 2.0));
  } else if (s.type == RopeScalingType::kNtkDynamic && sequence_length > s.original_max_position) {
    // HF's dynamic NTK: base * ((factor * L / L0) - (factor - 1))^(d / (d - 2)).
    const double grow = s.factor * double(sequence_length) / double(s.original_max_position) -
                        (s.factor - 1.0);
    base = c.base * std::pow(grow, d / (d - 2.0));
  }
  std::vector<double> inv(half);
  for (int i = 0; i < half; ++i) inv[i] = 1.0 / std::pow(base, 2.0 * i / d);

  if (s.type == RopeScalingType::kLinear) {
    for (double& f : inv) f /= s.factor;
  } else if (s.type == RopeScalingType::kYarn) {
    // Dimensions with fewer than beta_slow rotations over the original context
    // are interpolated (/ factor); more than beta_fast, extrapolated (kept);
    // a linear ramp in between (YaRN, arXiv 2309.00071).
    const double original = double(s.original_max_position);
    const auto correction_dim = [&](double rotations) {
      return d * std::log(original / (rotations * 2.0 * kPi)) / (2.0 * std::log(c.base));
    };
    double low = correction_dim(s.yarn_beta_fast);
    double high = correction_dim(s.yarn_beta_slow);
    if (s.yarn_truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, d - 1.0);
    if (low == high) high += 0.001;  // avoid a zero-width ramp
    for (int i = 0; i < half; ++i) {
      const double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1.0 - ramp;
      inv[i] = inv[i] / s.factor * (1.0 - extrapolation) + inv[i] * extrapolation;
    }
  } else if (s.type == RopeScalingType::kLlama3) {
    const double original = double(s.original_max_position);
    const double low_freq_wavelen = original / s.llama3_low_freq_factor;
    const double high_freq_wavelen = original / s.llama3_high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2.0 * kPi / f;
      if (wavelen > low_freq_wavelen) {
        f /= s.factor;  // low frequencies: interpolate
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth = (original / wavelen - s.llama3_low_freq_factor) /
                              (s.llama3_high_freq_factor - s.llama3_low_freq_factor);
        f = (1.0 - smooth) * f / s.factor + smooth * f;
      }  // high frequencies: unchanged
    }
  }
  return inv;
}

}  // namespace kvkit
