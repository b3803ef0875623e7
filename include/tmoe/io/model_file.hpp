#pragma once
/// @file model_file.hpp
/// @brief Whole models as safetensors files: every parameter under its dotted name, the configuration and
/// architecture as JSON in `__metadata__["tmoe.model"]`, and the model's own metadata (Transformer::metadata(), for
/// example what extraction kept) beside it. Writing is atomic; reading validates everything before it fills any
/// parameter.
///
/// @code
/// tmoe::io::save_model("model.safetensors", model);
/// auto info = tmoe::io::read_model_info("model.safetensors");   // config + architecture, no tensors read
/// auto loaded = tmoe::io::load_model<tmoe::nn::TokenTask<32>>("model.safetensors");
/// @endcode

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "tmoe/core/error.hpp"
#include "tmoe/io/model_config.hpp"
#include "tmoe/io/safetensors.hpp"
#include "tmoe/io/state_dict.hpp"

namespace tmoe::io {

/// Metadata key of the configuration JSON (shared with train::save_checkpoint).
inline constexpr const char* kModelKey = "tmoe.model";

/// What a model file says about itself, read from its header alone.
struct ModelInfo {
  nn::TransformerConfig config;
  std::string encoder;  ///< pattern_description of the encoder stack ("dense", "token/E=32/K=2/every=2", ...)
  std::string decoder;
  std::string scalar;   ///< "f32" or "f64"
  std::map<std::string, std::string> metadata;  ///< everything in __metadata__, tmoe.model included
  std::int64_t parameters = 0;                  ///< elements over all tensors (optimizer state excluded)
};

/// Reads a model file's header (or a checkpoint's); the tensor data is not read.
/// @throws IoError if the file is missing, unreadable, not safetensors (header, offsets or size inconsistent), or has
///         no valid "tmoe.model" entry.
inline ModelInfo read_model_info(const std::filesystem::path& path) {
  const SafetensorsFile file = SafetensorsFile::read_header(path);
  const std::string where = path.string();
  const auto& meta = file.metadata();
  const auto it = meta.find(kModelKey);
  if (it == meta.end()) {
    throw IoError(where + ": not a tmoe model (no '" + std::string(kModelKey) + "' entry in __metadata__)");
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception& e) {
    throw IoError(where + ": the stored model configuration is not valid JSON (" + e.what() + ")");
  }
  ModelInfo info;
  info.config = transformer_config_from_json(where, j);
  for (const char* key : {"encoder", "decoder", "scalar"}) {
    if (!j.contains(key) || !j[key].is_string()) {
      throw IoError(where + ": the stored model configuration has no string '" + key + "'");
    }
  }
  info.encoder = j["encoder"].get<std::string>();
  info.decoder = j["decoder"].get<std::string>();
  info.scalar = j["scalar"].get<std::string>();
  info.metadata = meta;
  for (const std::string& name : file.names()) {
    if (name.rfind("optimizer.", 0) == 0) continue;
    info.parameters += file.info(name).shape.numel();
  }
  return info;
}

/// Writes the model's parameters (converted to `stored`), its configuration and its metadata to `path`,
/// atomically. `extra_metadata` is added on top of model.metadata().
template <class Model>
void save_model(const std::filesystem::path& path, Model& model,
                const std::map<std::string, std::string>& extra_metadata = {},
                DType stored = dtype_of_v<typename Model::scalar_type>) {
  using S = typename Model::scalar_type;
  std::map<std::string, std::string> metadata = model.metadata();
  for (const auto& [k, v] : extra_metadata) metadata[k] = v;
  metadata[kModelKey] = model_config_json<Model>(model.config()).dump();
  save<S>(path, model.parameters(), metadata, stored);
}

/// Fills an existing model from `path`: the file must have been written for this model type and configuration
/// (a checkpoint's optimizer state is ignored). Restores model.metadata() from the file.
/// @throws IoError naming the field for another model's file, a missing or extra tensor, or a corrupt file;
///         ShapeError for a wrongly shaped tensor. The model is unchanged when it throws.
template <class Model>
void load_model_into(const std::filesystem::path& path, Model& model) {
  using S = typename Model::scalar_type;
  const ModelInfo info = read_model_info(path);
  require_same_config("load_model: " + path.string(), info.metadata.at(kModelKey),
                      model_config_json<Model>(model.config()));
  const bool checkpoint = info.metadata.count("tmoe.step") != 0;
  const auto meta = load<S>(path, model.parameters(), checkpoint ? LoadMode::kAllowExtra : LoadMode::kStrict);
  model.metadata().clear();
  for (const auto& [k, v] : meta) {
    if (k != kModelKey && k != "tmoe.step" && k.rfind("optimizer.", 0) != 0) model.metadata()[k] = v;
  }
}

/// Constructs a model from the configuration stored in `path` and loads its parameters.
/// @throws IoError if the file was written for another architecture (naming the field), or as load_model_into.
template <class Model>
Model load_model(const std::filesystem::path& path) {
  const ModelInfo info = read_model_info(path);
  require_same_config("load_model: " + path.string(), info.metadata.at(kModelKey),
                      model_config_json<Model>(info.config));
  Model model(info.config);
  load_model_into(path, model);
  return model;
}

}  // namespace tmoe::io
