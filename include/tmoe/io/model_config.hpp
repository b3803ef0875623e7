#pragma once
/// @file model_config.hpp
/// @brief A Transformer's configuration as JSON, for safetensors `__metadata__`: the run-time sizes plus a
/// description of the compile-time architecture (routing per stack, experts, top-k), so a checkpoint can refuse to
/// load into a model it was not written for, naming the field that differs.

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>

#include "tmoe/core/error.hpp"
#include "tmoe/moe/config.hpp"
#include "tmoe/nn/stack.hpp"
#include "tmoe/nn/transformer.hpp"

namespace tmoe::io {

/// "dense", or "token/E=32/K=2/every=2" style, for one stack pattern.
template <nn::FfnPattern P>
std::string pattern_description() {
  if constexpr (!P::has_moe) {
    return "dense";
  } else {
    using Cfg = typename P::moe_config;
    std::string d = Cfg::route_type::name;
    d += "/E=";
    d += std::to_string(Cfg::experts);
    d += "/K=";
    d += std::to_string(Cfg::top_k);
    d += "/every=";
    d += std::to_string(P::every);
    if constexpr (P::folded) d += "/folded";
    return d;
  }
}

/// The model's configuration and architecture as one JSON object.
template <class Model>
nlohmann::json model_config_json(const nn::TransformerConfig& c) {
  return nlohmann::json{{"vocab_size", c.vocab_size},
                        {"d_model", c.d_model},
                        {"d_ff", c.d_ff},
                        {"heads", c.heads},
                        {"encoder_layers", c.encoder_layers},
                        {"decoder_layers", c.decoder_layers},
                        {"max_length", c.max_length},
                        {"dropout", c.dropout},
                        {"num_tasks", c.num_tasks},
                        {"moe_group_size", c.moe_group_size},
                        {"pad_id", c.pad_id},
                        {"bos_id", c.bos_id},
                        {"eos_id", c.eos_id},
                        {"encoder", pattern_description<typename Model::encoder_pattern>()},
                        {"decoder", pattern_description<typename Model::decoder_pattern>()},
                        {"scalar", sizeof(typename Model::scalar_type) == 8 ? "f64" : "f32"}};
}

/// The run-time sizes stored by model_config_json.
/// @throws IoError naming `source` and the field that is missing or has the wrong type.
inline nn::TransformerConfig transformer_config_from_json(const std::string& source, const nlohmann::json& j) {
  if (!j.is_object()) throw IoError(source + ": the stored model configuration is not a JSON object");
  nn::TransformerConfig c;
  auto integer = [&](const char* key, auto& field) {
    if (!j.contains(key) || !j[key].is_number_integer()) {
      throw IoError(source + ": the stored model configuration has no integer '" + key + "'" +
                    (j.contains(key) ? ", found " + j[key].dump() : std::string()));
    }
    field = j[key].get<std::remove_reference_t<decltype(field)>>();
  };
  integer("vocab_size", c.vocab_size);
  integer("d_model", c.d_model);
  integer("d_ff", c.d_ff);
  integer("heads", c.heads);
  integer("encoder_layers", c.encoder_layers);
  integer("decoder_layers", c.decoder_layers);
  integer("max_length", c.max_length);
  integer("num_tasks", c.num_tasks);
  integer("moe_group_size", c.moe_group_size);
  integer("pad_id", c.pad_id);
  integer("bos_id", c.bos_id);
  integer("eos_id", c.eos_id);
  if (!j.contains("dropout") || !j["dropout"].is_number()) {
    throw IoError(source + ": the stored model configuration has no number 'dropout'");
  }
  c.dropout = j["dropout"].get<double>();
  return c;
}

/// @throws IoError naming `source` and the first field whose value differs (or is missing) between a stored
///         configuration and the model's.
inline void require_same_config(const std::string& source, const std::string& stored_text,
                                const nlohmann::json& expected) {
  nlohmann::json stored;
  try {
    stored = nlohmann::json::parse(stored_text);
  } catch (const nlohmann::json::exception& e) {
    throw IoError(source + ": the stored model configuration is not valid JSON (" + e.what() + ")");
  }
  if (!stored.is_object()) throw IoError(source + ": the stored model configuration is not a JSON object");
  for (const auto& [key, value] : expected.items()) {
    if (!stored.contains(key)) {
      throw IoError(source + ": the stored model configuration has no '" + key + "'; this model has " + value.dump());
    }
    if (stored[key] != value) {
      throw IoError(source + ": written for a different model: " + key + " is " + stored[key].dump() +
                    " in the file but " + value.dump() + " in this model");
    }
  }
}

}  // namespace tmoe::io
