#pragma once
/// @file named_tensor.hpp
/// @brief A tensor view with its stable dotted name ("decoder.layers.3.moe.experts.wi"): what layers expose
/// as parameters and what io/ saves and loads by name.

#include <string>
#include <vector>

#include "tmoe/core/tensor_view.hpp"

namespace tmoe {

template <class T, DeviceTag Device = Cpu>
struct NamedTensorView {
  std::string name;
  TensorView<T, Device> view;
};

/// A list of named views, e.g. a layer's parameters.
template <class T, DeviceTag Device = Cpu>
using NamedTensorViews = std::vector<NamedTensorView<T, Device>>;

}  // namespace tmoe
