#pragma once
/// @file expert_usage.hpp
/// @brief extract::expert_usage: per MoE layer and per task, how often each expert is chosen over a data set, from
/// the routing plans of inference forwards. The paper's routing heatmaps (its gating analysis, paper-spec 1.13) are
/// drawn from this table; task ids come with each batch, so models that do not route by task are analysed the same
/// way.
///
/// A token "chooses" its K experts (before capacity: what the gate decided, not what was computed); padding chooses
/// nothing. count(l, t, e) sums those choices over task t's tokens; fraction = count / tokens, so a task's fractions
/// over experts sum to K.
///
/// @code
/// auto usage = tmoe::extract::expert_usage(ctx, model, batches);   // batches: nn::Batch with task ids
/// std::ofstream csv("usage.csv");
/// usage.write_csv(csv);   // layer,task,expert,count,tokens,fraction
/// @endcode

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/nn/transformer.hpp"

namespace tmoe::extract {

/// Choice counts of every MoE layer (not folded ones), by task and expert.
struct ExpertUsage {
  std::vector<std::string> layers;  ///< "encoder.layers.1", ..., then the decoder's
  std::vector<int> experts;         ///< E of each layer
  std::vector<int> top_k;           ///< K of each layer
  std::int64_t num_tasks = 0;
  std::vector<std::vector<std::int64_t>> counts;  ///< [layer][task * E + expert]
  std::vector<std::vector<std::int64_t>> tokens;  ///< [layer][task] routed (non-padding) tokens

  [[nodiscard]] std::int64_t count(std::size_t layer, std::int64_t task, std::int64_t expert) const {
    return counts.at(layer).at(static_cast<std::size_t>(task * experts.at(layer) + expert));
  }
  [[nodiscard]] std::int64_t tokens_of(std::size_t layer, std::int64_t task) const {
    return tokens.at(layer).at(static_cast<std::size_t>(task));
  }
  /// Fraction of task's tokens that chose `expert` (0 for a task with no tokens).
  [[nodiscard]] double fraction(std::size_t layer, std::int64_t task, std::int64_t expert) const {
    const std::int64_t n = tokens_of(layer, task);
    return n == 0 ? 0.0 : static_cast<double>(count(layer, task, expert)) / static_cast<double>(n);
  }

  /// One row per (layer, task, expert): layer,task,expert,count,tokens,fraction.
  void write_csv(std::ostream& out) const {
    out << "layer,task,expert,count,tokens,fraction\n";
    for (std::size_t l = 0; l < layers.size(); ++l) {
      for (std::int64_t t = 0; t < num_tasks; ++t) {
        for (int e = 0; e < experts[l]; ++e) {
          out << layers[l] << ',' << t << ',' << e << ',' << count(l, t, e) << ',' << tokens_of(l, t) << ','
              << fraction(l, t, e) << '\n';
        }
      }
    }
  }
};

namespace detail {
template <class Pattern, class Caches>
void add_stack_usage(ExpertUsage& u, std::size_t& layer, const std::string& stack, std::int64_t layers,
                     const Caches& caches, const std::int32_t* task_ids, std::int64_t columns, bool first) {
  if constexpr (Pattern::has_moe && !Pattern::folded) {
    constexpr int E = Pattern::moe_config::experts, K = Pattern::moe_config::top_k;
    for (std::int64_t i = 0; i < layers; ++i) {
      if (!Pattern::is_moe(i)) continue;
      if (first) {
        u.layers.push_back(stack + ".layers." + std::to_string(i));
        u.experts.push_back(E);
        u.top_k.push_back(K);
        u.counts.emplace_back(static_cast<std::size_t>(u.num_tasks * E), 0);
        u.tokens.emplace_back(static_cast<std::size_t>(u.num_tasks), 0);
      }
      const auto& plan = caches[static_cast<std::size_t>(i / Pattern::every)].ffn.ffn.plan;
      auto& counts = u.counts[layer];
      auto& tokens = u.tokens[layer];
      for (std::int64_t n = 0; n < plan.tokens; ++n) {
        const std::int32_t* ex = plan.expert.data() + n * K;
        if (ex[0] < 0) continue;  // padding
        const std::int64_t t = task_ids[n / columns];
        ++tokens[static_cast<std::size_t>(t)];
        for (int j = 0; j < K; ++j) ++counts[static_cast<std::size_t>(t * E + ex[j])];
      }
      ++layer;
    }
  }
}
}  // namespace detail

/// Runs inference forwards of `model` over `batches` and counts each MoE layer's expert choices per task.
/// @throws ShapeError if a batch has no task ids (one per sequence), an id outside [0, num_tasks), or
///         num_tasks is 0; or as Transformer::forward for a bad batch.
template <class Model>
ExpertUsage expert_usage(CpuContext& ctx, const Model& model, const std::vector<nn::Batch>& batches) {
  const auto& cfg = model.config();
  const std::string op = "extract::expert_usage";
  if (cfg.num_tasks <= 0) {
    throw ShapeError(op + ": the model's num_tasks is " + std::to_string(cfg.num_tasks) +
                     "; set it to the number of tasks the usage is counted over");
  }
  ExpertUsage u;
  u.num_tasks = cfg.num_tasks;
  typename Model::Cache cache;
  bool first = true;
  for (const auto& b : batches) {
    const std::int64_t B = b.source.rank() == 2 ? b.source.dim(0) : -1;
    if (b.task_ids.rank() != 1 || b.task_ids.dim(0) != B) {
      throw ShapeError(op + ": every batch needs task_ids of shape (" + std::to_string(B) + "), got " +
                       b.task_ids.shape().to_string());
    }
    for (std::int64_t i = 0; i < B; ++i) {
      const std::int32_t t = b.task_ids.data()[i];
      if (t < 0 || t >= cfg.num_tasks) {
        throw ShapeError(op + ": task id " + std::to_string(t) + " of row " + std::to_string(i) +
                         " is unknown; expected an id in [0, " + std::to_string(cfg.num_tasks) + ")");
      }
    }
    model.forward(ctx, b, cache);
    std::size_t layer = 0;
    detail::add_stack_usage<typename Model::encoder_pattern>(u, layer, "encoder", cfg.encoder_layers, cache.enc_moe,
                                                             b.task_ids.data(), b.source.dim(1), first);
    detail::add_stack_usage<typename Model::decoder_pattern>(u, layer, "decoder", cfg.decoder_layers, cache.dec_moe,
                                                             b.task_ids.data(), b.target_in.dim(1), first);
    first = false;
  }
  return u;
}

}  // namespace tmoe::extract
