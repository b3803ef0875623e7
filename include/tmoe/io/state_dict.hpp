#pragma once
/// @file state_dict.hpp
/// @brief Saving and loading named tensors (a layer's parameters) as one safetensors file.
///
/// @code
/// tmoe::io::save("layer.safetensors", layer.parameters(), {{"step", "1000"}});
/// auto meta = tmoe::io::load("layer.safetensors", layer.parameters());  // strict: names and shapes must match
/// @endcode

#include <cstddef>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor_view.hpp"
#include "tmoe/io/dtype.hpp"
#include "tmoe/io/safetensors.hpp"

namespace tmoe::io {

/// How load() treats names that are on one side only. Shapes must always match.
enum class LoadMode {
  kStrict,        ///< every destination is in the file and every tensor in the file has a destination
  kAllowMissing,  ///< destinations missing from the file are left untouched; extra file tensors are errors
  kAllowExtra,    ///< tensors in the file without a destination are ignored; missing ones are errors
};

namespace detail {
/// "'a', 'b', 'c'" (at most ten names, then "and N more").
inline std::string name_list(const std::vector<std::string>& names) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < 10; ++i) {
    if (i) s += ", ";
    s += quote(names[i]);
  }
  if (names.size() > 10) s += " and " + std::to_string(names.size() - 10) + " more";
  return s;
}
}  // namespace detail

/// Writes `tensors` (and `metadata`) to `path` atomically, every tensor converted to `stored`.
/// `T` may be const-qualified.
/// @throws Error on duplicate or invalid names or an impossible conversion; IoError if writing fails.
template <IoScalar T>
void save(const std::filesystem::path& path, const NamedTensorViews<T>& tensors,
          const std::map<std::string, std::string>& metadata = {}, DType stored = dtype_of_v<T>) {
  SafetensorsWriter w;
  for (const auto& t : tensors) w.add(t.name, ConstTensorView<std::remove_const_t<T>, Cpu>(t.view), stored);
  for (const auto& [key, value] : metadata) w.set_metadata(key, value);
  w.write(path);
}

/// Reads `path` into the views of `into` by name, converting dtypes as SafetensorsFile::read_into does, and
/// returns the file's metadata. Everything is validated before any destination is written: if this throws,
/// no destination was modified.
/// @throws IoError if the file is unreadable or invalid, a destination is missing from the file (unless
/// kAllowMissing), the file has a tensor with no destination (unless kAllowExtra), or a dtype does not convert;
/// ShapeError if a tensor's shape differs from its destination's; Error if `into` repeats a name.
template <MutableIoScalar T>
std::map<std::string, std::string> load(const std::filesystem::path& path, const NamedTensorViews<T>& into,
                                        LoadMode mode = LoadMode::kStrict) {
  static constexpr std::string_view kOp = "tmoe::io::load";
  const SafetensorsFile file = SafetensorsFile::read(path);

  std::set<std::string, std::less<>> wanted;
  std::vector<std::string> missing;
  for (const auto& t : into) {
    if (!wanted.insert(t.name).second) {
      throw Error(tmoe::detail::message(kOp, "destination name " + detail::quote(t.name) + " appears twice"));
    }
    if (!file.contains(t.name)) missing.push_back(t.name);
  }
  if (!missing.empty() && mode != LoadMode::kAllowMissing) {
    throw IoError(
        tmoe::detail::message(kOp, detail::path_str(path) + ": missing tensor(s) " + detail::name_list(missing)));
  }
  std::vector<std::string> extra;
  for (const std::string& name : file.names()) {
    if (wanted.find(name) == wanted.end()) extra.push_back(name);
  }
  if (!extra.empty() && mode != LoadMode::kAllowExtra) {
    throw IoError(tmoe::detail::message(
        kOp, detail::path_str(path) + ": unexpected tensor(s) " + detail::name_list(extra) + " with no destination"));
  }

  for (const auto& t : into) {
    if (!file.contains(t.name)) continue;
    const TensorInfo& ti = file.info(t.name);
    if (!(ti.shape == t.view.shape())) {
      throw ShapeError(tmoe::detail::message(kOp, detail::path_str(path) + ": tensor " + detail::quote(t.name) +
                                                      " has shape " + ti.shape.to_string() + ", expected " +
                                                      t.view.shape().to_string() + " (the destination's shape)"));
    }
    file.check_readable<T>(t.name, t.view.shape());
  }
  for (const auto& t : into) {
    if (file.contains(t.name)) file.read_into(t.name, t.view);
  }
  return file.metadata();
}

}  // namespace tmoe::io
