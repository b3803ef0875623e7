#pragma once
/// @file subnetwork.hpp
/// @brief Per-task sub-network extraction (paper-spec 1.9): from a model whose stacks route by task, the dense model
/// that serves one task at the cost of a dense model and gives the full model's outputs for it.
///
/// In every task-routed MoE layer the task's gate is computed once (softmax of task_embedding[t] . Wg, top-K with
/// ties to the lower expert, the layer's normalization), experts e_1..e_K are kept, and they fold into one dense
/// FFN of width K * d_ff with no biases, exact because the activation acts elementwise:
///   wi' = [wi_e1 ; ... ; wi_eK]            (K F, C)   stacked along the hidden dimension
///   wo' = [w_1 wo_e1 , ... , w_K wo_eK]    (C, K F)   each expert's output projection scaled by its weight
///   wo' Act(wi' x) = sum_j w_j FFN_ej(x).
/// The router, the task embedding and every other expert are dropped. Token- and sentence-routed layers and all
/// non-expert weights are copied unchanged. The type is computed from the model's: `subnetwork_t<Model>`.
///
/// @code
/// using Model = tmoe::nn::TokenTask<32>;
/// Model model = tmoe::io::load_model<Model>("full.safetensors");
/// auto sub = tmoe::extract::subnetwork(model, /*task=*/3);       // tmoe::extract::subnetwork_t<Model>
/// tmoe::io::save_model("task3.safetensors", sub);                // the kept experts are in its metadata
/// @endcode

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/io/model_config.hpp"
#include "tmoe/nn/stack.hpp"
#include "tmoe/nn/transformer.hpp"

namespace tmoe::extract {

/// The pattern a stack has after extraction: task-routed MoeEvery stacks fold; the others stay.
template <nn::FfnPattern P>
struct extracted_pattern {
  using type = P;
};
template <int Every, class Cfg>
  requires std::is_same_v<typename Cfg::route_type, route::Task>
struct extracted_pattern<nn::MoeEvery<Every, Cfg>> {
  using type = nn::FoldedEvery<Every, Cfg>;
};
template <nn::FfnPattern P>
using extracted_pattern_t = typename extracted_pattern<P>::type;

/// Whether extraction folds this stack: task-routed MoE layers not folded already.
template <nn::FfnPattern P>
inline constexpr bool folds_v = nn::task_routed_v<P> && !P::folded;

template <class Model>
struct subnetwork_type;
template <nn::FfnPattern Enc, nn::FfnPattern Dec, class Scalar, DeviceTag Device>
struct subnetwork_type<nn::Transformer<Enc, Dec, Scalar, Device>> {
  static_assert(folds_v<Enc> || folds_v<Dec>,
                "extract::subnetwork_t<Model>: the model has no task-routed stack, so no layer is static per task "
                "and there is nothing to extract; route the decoder by task (e.g. nn::TokenTask<E>).");
  using type = nn::Transformer<extracted_pattern_t<Enc>, extracted_pattern_t<Dec>, Scalar, Device>;
};

/// The type of one task's sub-network of `Model`.
template <class Model>
using subnetwork_t = typename subnetwork_type<Model>::type;

/// Metadata key under which a sub-network records what it was extracted from and what it kept.
inline constexpr const char* kExtractedKey = "tmoe.extracted";

/// One folded layer: the experts kept (best first) and the weights folded into them.
struct KeptExperts {
  std::string layer;  ///< "decoder.layers.1"
  std::vector<std::int32_t> experts;
  std::vector<double> weights;
};

/// What a sub-network was extracted for.
struct Extraction {
  std::int64_t task = -1;
  std::string encoder, decoder;  ///< the source model's stack descriptions
  std::vector<KeptExperts> layers;

  [[nodiscard]] nlohmann::json to_json() const {
    nlohmann::json layers_json = nlohmann::json::array();
    for (const auto& l : layers) {
      layers_json.push_back({{"layer", l.layer}, {"experts", l.experts}, {"weights", l.weights}});
    }
    return {{"task", task}, {"source_encoder", encoder}, {"source_decoder", decoder}, {"layers", layers_json}};
  }

  /// @throws IoError naming `source` if the text is not an extraction record.
  static Extraction from_json(const std::string& source, const std::string& text) {
    Extraction e;
    try {
      const auto j = nlohmann::json::parse(text);
      e.task = j.at("task").get<std::int64_t>();
      e.encoder = j.at("source_encoder").get<std::string>();
      e.decoder = j.at("source_decoder").get<std::string>();
      for (const auto& l : j.at("layers")) {
        e.layers.push_back({l.at("layer").get<std::string>(), l.at("experts").get<std::vector<std::int32_t>>(),
                            l.at("weights").get<std::vector<double>>()});
      }
    } catch (const nlohmann::json::exception& ex) {
      throw IoError(source + ": metadata '" + std::string(kExtractedKey) + "' is not a valid extraction record (" +
                    ex.what() + ")");
    }
    return e;
  }
};

/// The extraction record of a sub-network (from its metadata), if it has one.
template <class Model>
bool extraction_of(const Model& model, Extraction& out) {
  const auto it = model.metadata().find(kExtractedKey);
  if (it == model.metadata().end()) return false;
  out = Extraction::from_json("model metadata", it->second);
  return true;
}

namespace detail {
template <class Scalar>
const NamedTensorView<Scalar>& find_view(const NamedTensorViews<Scalar>& views, const std::string& name) {
  for (const auto& v : views) {
    if (v.name == name) return v;
  }
  throw Error("extract::subnetwork: the model has no parameter '" + name + "'");
}

// Folds the task's experts of every task-routed MoE block of one stack into the sub-network's parameters.
template <class Pattern, class Scalar, class GetBlock>
void fold_stack(CpuContext& ctx, const std::string& stack, std::int64_t layers, std::int64_t task,
                GetBlock&& block_of, const NamedTensorViews<Scalar>& src, const NamedTensorViews<Scalar>& dst,
                Extraction& record) {
  if constexpr (folds_v<Pattern>) {
    for (std::int64_t i = 0; i < layers; ++i) {
      if (!Pattern::is_moe(i)) continue;
      const std::string p = stack + ".layers." + std::to_string(i);
      const auto& layer = block_of(i).ffn();
      const auto route = layer.task_route(ctx, task);
      constexpr int K = Pattern::moe_config::top_k;
      const auto& wi = find_view(src, p + ".moe.experts.wi");  // (E, F, C)
      const auto& wo = find_view(src, p + ".moe.experts.wo");  // (E, C, F)
      const auto& fwi = find_view(dst, p + ".ffn.wi.weight");  // (K F, C)
      const auto& fwo = find_view(dst, p + ".ffn.wo.weight");  // (C, K F)
      const std::int64_t F = wi.view.dim(1), C = wi.view.dim(2);
      KeptExperts kept{p, {}, {}};
      for (int j = 0; j < K; ++j) {
        const std::int64_t e = route.experts[static_cast<std::size_t>(j)];
        const Scalar w = static_cast<Scalar>(route.weights[static_cast<std::size_t>(j)]);
        kept.experts.push_back(static_cast<std::int32_t>(e));
        kept.weights.push_back(static_cast<double>(route.weights[static_cast<std::size_t>(j)]));
        std::copy_n(wi.view.data() + e * F * C, F * C, fwi.view.data() + j * F * C);
        for (std::int64_t c = 0; c < C; ++c) {
          const Scalar* s = wo.view.data() + (e * C + c) * F;
          Scalar* d = fwo.view.data() + c * K * F + j * F;
          for (std::int64_t f = 0; f < F; ++f) d[f] = w * s[f];
        }
      }
      record.layers.push_back(std::move(kept));
    }
  }
}
}  // namespace detail

/// Builds task `task`'s sub-network of `model` (see the file comment). The result's metadata holds the model's
/// metadata plus the extraction record under kExtractedKey.
/// @throws ShapeError if `task` is not in [0, num_tasks).
template <class Model>
subnetwork_t<Model> subnetwork(CpuContext& ctx, Model& model, std::int64_t task) {
  using Sub = subnetwork_t<Model>;
  using Enc = typename Model::encoder_pattern;
  using Dec = typename Model::decoder_pattern;
  const auto& config = model.config();
  if (task < 0 || task >= config.num_tasks) {
    throw ShapeError("extract::subnetwork: unknown task id " + std::to_string(task) + "; the model has tasks [0, " +
                     std::to_string(config.num_tasks) + ")");
  }
  Sub sub(config);
  const auto src = model.parameters();
  const auto dst = sub.parameters();
  for (const auto& d : dst) {
    for (const auto& s : src) {
      if (s.name != d.name) continue;
      if (!(s.view.shape() == d.view.shape())) {
        throw Error("extract::subnetwork: parameter '" + d.name + "' is " + s.view.shape().to_string() +
                    " in the model but " + d.view.shape().to_string() + " in the sub-network");
      }
      std::copy_n(s.view.data(), s.view.numel(), d.view.data());
    }
  }
  Extraction record;
  record.task = task;
  record.encoder = io::pattern_description<Enc>();
  record.decoder = io::pattern_description<Dec>();
  using S = typename Model::scalar_type;
  detail::fold_stack<Enc, S>(
      ctx, "encoder", config.encoder_layers, task, [&](std::int64_t i) -> const auto& { return model.encoder_moe_block(i); },
      src, dst, record);
  detail::fold_stack<Dec, S>(
      ctx, "decoder", config.decoder_layers, task, [&](std::int64_t i) -> const auto& { return model.decoder_moe_block(i); },
      src, dst, record);
  sub.metadata() = model.metadata();
  sub.metadata()[kExtractedKey] = record.to_json().dump();
  return sub;
}

/// As above, on one thread.
template <class Model>
subnetwork_t<Model> subnetwork(Model& model, std::int64_t task) {
  CpuContext ctx{1};
  return subnetwork(ctx, model, task);
}

}  // namespace tmoe::extract
