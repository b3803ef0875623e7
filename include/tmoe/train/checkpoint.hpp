#pragma once
/// @file checkpoint.hpp
/// @brief Checkpoints: a model's parameters, its optimizer's state and the training step in one safetensors file,
/// written atomically. The model's configuration and architecture go into `__metadata__` ("tmoe.model"), so loading
/// into a different model fails with a message naming the field; loading is strict (every tensor present, none
/// extra, every shape right) and validates everything before it writes anything. Resuming from a checkpoint
/// continues bit-identically: parameters, optimizer buffers and step counter are restored exactly, and every random
/// choice of a step is a function of (seed, step).
///
/// @code
/// tmoe::train::save_checkpoint("run/step-300.safetensors", model, optimizer, 300);
/// const std::int64_t step = tmoe::train::load_checkpoint("run/step-300.safetensors", model, optimizer);
/// @endcode

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>

#include "tmoe/core/error.hpp"
#include "tmoe/io/model_config.hpp"
#include "tmoe/io/safetensors.hpp"
#include "tmoe/io/state_dict.hpp"

namespace tmoe::train {

inline constexpr const char* kCheckpointModelKey = "tmoe.model";  // = io::kModelKey
inline constexpr const char* kCheckpointStepKey = "tmoe.step";

/// Writes parameters ("embedding.weight", ...), optimizer buffers ("optimizer.<name>.<buffer>") and metadata.
template <class Model, class Optimizer>
void save_checkpoint(const std::filesystem::path& path, Model& model, Optimizer& optimizer, std::int64_t step,
                     const std::map<std::string, std::string>& extra_metadata = {}) {
  using S = typename Model::scalar_type;
  auto views = model.parameters();
  auto state = optimizer.state("optimizer.");
  for (auto& t : state.tensors) views.push_back(t);
  std::map<std::string, std::string> metadata = extra_metadata;
  for (const auto& [k, v] : state.metadata) metadata[k] = v;
  metadata[kCheckpointModelKey] = io::model_config_json<Model>(model.config()).dump();
  metadata[kCheckpointStepKey] = std::to_string(step);
  io::save<S>(path, views, metadata);
}

/// Restores parameters and optimizer state; returns the step stored with them.
/// @throws IoError for an unreadable or corrupt file, a checkpoint of another model (naming the field), or a
///         missing or extra tensor; ShapeError for a wrongly shaped one. Nothing is modified when it throws.
template <class Model, class Optimizer>
std::int64_t load_checkpoint(const std::filesystem::path& path, Model& model, Optimizer& optimizer) {
  using S = typename Model::scalar_type;
  const auto file = io::SafetensorsFile::read_header(path);  // io::load below reads the data, once
  const auto& meta = file.metadata();
  const std::string where = "load_checkpoint: " + path.string();
  const auto model_it = meta.find(kCheckpointModelKey);
  const auto step_it = meta.find(kCheckpointStepKey);
  if (model_it == meta.end() || step_it == meta.end()) {
    throw IoError(where + ": not a tmoe checkpoint (no '" + std::string(kCheckpointModelKey) + "' and '" +
                  std::string(kCheckpointStepKey) + "' metadata)");
  }
  io::require_same_config(where, model_it->second, io::model_config_json<Model>(model.config()));
  std::int64_t step = 0;
  try {
    std::size_t used = 0;
    step = std::stoll(step_it->second, &used);
    if (used != step_it->second.size() || step < 0) throw std::invalid_argument("trailing characters");
  } catch (const std::exception&) {
    throw IoError(where + ": metadata '" + std::string(kCheckpointStepKey) + "' is '" + step_it->second +
                  "', expected a non-negative integer");
  }
  if (meta.find("optimizer.step") == meta.end() || meta.find("optimizer.type") == meta.end()) {
    throw IoError(where + ": no optimizer state metadata ('optimizer.step', 'optimizer.type')");
  }
  auto views = model.parameters();
  auto state = optimizer.state("optimizer.");
  for (auto& t : state.tensors) views.push_back(t);
  // Strict: validates every name, shape and dtype before copying anything.
  const auto loaded = io::load<S>(path, views);
  optimizer.load_metadata(loaded, "optimizer.");
  return step;
}

}  // namespace tmoe::train
