#pragma once
/// @file moe_router_config.hpp
/// kvkit::RouterConfig: what a mixture-of-experts gate does with its logits,
/// with presets for the common model families and validation.
///
/// The router pipeline, per token (all in fp32):
///   1. score_e = softmax(logits)_e  or  sigmoid(logit_e)            [n_experts]
///   2. select_e = score_e + correction_bias_e   (bias only if use_correction_bias)
///   3. group-limited selection (n_group > 1): group score = max(select) or the
///      sum of the group's top-2 select values; keep the best topk_group groups,
///      set select_e = -inf in the others (never 0.0: see moe.md, "HF mask bug")
///   4. topk_ids = the top_k experts by select, ties to the lower expert index
///   5. w_j = score[topk_ids_j] (the unbiased score); if renormalize, w_j /= sum_j w_j;
///      w_j *= routed_scaling_factor.

#include <cstdint>

#include "kvkit/core/error.hpp"

namespace kvkit {

/// Scoring function applied to the gate logits.
enum class MoeScoring : std::uint8_t {
  kSoftmax,  ///< softmax over all experts (Mixtral, Qwen, DeepSeek-V2)
  kSigmoid,  ///< independent sigmoid per expert (DeepSeek-V3)
};

/// How a group of experts is scored for group-limited routing.
enum class MoeGroupScore : std::uint8_t {
  kMax,        ///< the group's best selection score (DeepSeek-V2 "group_limited_greedy")
  kTopTwoSum,  ///< the sum of the group's two best selection scores (DeepSeek-V3 "noaux_tc")
};

/// Router configuration: a small value type; call validate() before use
/// (every kvkit router entry point does so itself).
struct RouterConfig {
  int n_experts = 0;                          ///< routed experts (shared experts are not routed)
  int top_k = 0;                              ///< experts chosen per token
  MoeScoring scoring = MoeScoring::kSoftmax;  ///< logits -> scores
  int n_group = 1;                            ///< expert groups; 1 = no group limit
  int topk_group = 1;                         ///< groups a token may pick from
  MoeGroupScore group_score = MoeGroupScore::kMax;
  bool use_correction_bias = false;  ///< add a per-expert bias to the scores for selection only
  bool renormalize = false;          ///< divide the chosen weights by their sum
  float routed_scaling_factor = 1.0f;  ///< multiplies the final weights

  /// Mixtral-8x7B / 8x22B: softmax, top-2 of 8, renormalized.
  /// Source: HF transformers MixtralSparseMoeBlock (softmax in fp32 over all experts,
  /// topk, then `routing_weights /= routing_weights.sum(-1)`).
  static RouterConfig mixtral(int n_experts = 8, int top_k = 2) {
    RouterConfig c;
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.scoring = MoeScoring::kSoftmax;
    c.renormalize = true;
    return c;
  }

  /// Qwen1.5-MoE-A2.7B / Qwen2-MoE: softmax, top-4 of 60, not renormalized
  /// (config norm_topk_prob = false). Qwen2-57B-A14B is qwen2_moe(64, 8).
  /// Source: HF transformers Qwen2MoeSparseMoeBlock (softmax over all experts, topk,
  /// renormalize only if norm_topk_prob). The shared expert and its sigmoid gate
  /// are outside the router: add their output through combine's `shared` input.
  static RouterConfig qwen2_moe(int n_experts = 60, int top_k = 4) {
    RouterConfig c;
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.scoring = MoeScoring::kSoftmax;
    c.renormalize = false;
    return c;
  }

  /// Qwen3-30B-A3B / Qwen3-235B-A22B: softmax, top-8 of 128, renormalized
  /// (norm_topk_prob = true). Source: HF transformers Qwen3MoeSparseMoeBlock.
  static RouterConfig qwen3_moe(int n_experts = 128, int top_k = 8) {
    RouterConfig c;
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.scoring = MoeScoring::kSoftmax;
    c.renormalize = true;
    return c;
  }

  /// DeepSeek-V2 (236B): softmax, 160 experts in 8 groups, keep the best 3 groups
  /// by their max score, top-6, not renormalized, weights x16.
  /// Source: deepseek-ai/DeepSeek-V2 modeling_deepseek.py MoEGate
  /// (topk_method "group_limited_greedy", norm_topk_prob false, routed_scaling_factor 16.0:
  /// the weights are scaled when they are not renormalized) and DeepSeek-V3's
  /// inference/model.py Gate (group score = amax when there is no bias).
  static RouterConfig deepseek_v2(int n_experts = 160, int top_k = 6, int n_group = 8,
                                  int topk_group = 3) {
    RouterConfig c;
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.scoring = MoeScoring::kSoftmax;
    c.n_group = n_group;
    c.topk_group = topk_group;
    c.group_score = MoeGroupScore::kMax;
    c.renormalize = false;
    c.routed_scaling_factor = 16.0f;
    return c;
  }

  /// DeepSeek-V3 / R1 (671B): sigmoid, correction bias for selection only, 256
  /// experts in 8 groups, keep 4 groups by the sum of their top-2, top-8,
  /// renormalized, weights x2.5.
  /// Source: deepseek-ai/DeepSeek-V3 inference/model.py Gate (sigmoid, `scores + bias`
  /// for selection, group score `topk(2).sum`, -inf mask, weights gathered from the
  /// original scores, `weights /= weights.sum()` for sigmoid, `weights *= route_scale`),
  /// config n_group 8, topk_group 4, routed_scaling_factor 2.5; vLLM grouped_topk agrees.
  static RouterConfig deepseek_v3(int n_experts = 256, int top_k = 8, int n_group = 8,
                                  int topk_group = 4) {
    RouterConfig c;
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.scoring = MoeScoring::kSigmoid;
    c.n_group = n_group;
    c.topk_group = topk_group;
    c.group_score = MoeGroupScore::kTopTwoSum;
    c.use_correction_bias = true;
    c.renormalize = true;
    c.routed_scaling_factor = 2.5f;
    return c;
  }

  /// Experts per group.
  int experts_per_group() const { return n_group > 0 ? n_experts / n_group : 0; }

  /// Throws kvkit::Error naming the first inconsistent field: n_experts < 1,
  /// top_k outside [1, n_experts], n_group < 1, n_experts not divisible by n_group,
  /// topk_group outside [1, n_group], a top-2 group score with fewer than 2 experts
  /// per group, top_k larger than the experts in topk_group groups, or a
  /// non-finite or non-positive routed_scaling_factor.
  void validate() const {
    constexpr const char* kWhere = "kvkit::RouterConfig::validate";
    check_argument(n_experts >= 1, kWhere, "n_experts", n_experts, ">= 1");
    check_argument(top_k >= 1 && top_k <= n_experts, kWhere, "top_k", top_k,
                   "1 <= top_k <= n_experts (", n_experts, ")");
    check_argument(n_group >= 1, kWhere, "n_group", n_group, ">= 1");
    check_argument(n_experts % n_group == 0, kWhere, "n_group", n_group,
                   "a divisor of n_experts (", n_experts, ")");
    check_argument(topk_group >= 1 && topk_group <= n_group, kWhere, "topk_group", topk_group,
                   "1 <= topk_group <= n_group (", n_group, ")");
    if (n_group > 1 && group_score == MoeGroupScore::kTopTwoSum) {
      check_argument(experts_per_group() >= 2, kWhere, "n_group", n_group,
                     "at least 2 experts per group for the top-2-sum group score (n_experts = ",
                     n_experts, ")");
    }
    check_argument(top_k <= topk_group * experts_per_group(), kWhere, "top_k", top_k,
                   "<= topk_group * experts per group (", topk_group, " * ", experts_per_group(),
                   ")");
    const float s = routed_scaling_factor;
    check_argument(s > 0.0f && s - s == 0.0f, kWhere, "routed_scaling_factor", s,
                   "a finite value > 0");
  }
};

}  // namespace kvkit
