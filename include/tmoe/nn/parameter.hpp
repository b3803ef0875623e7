#pragma once
/// @file parameter.hpp
/// @brief Parameter<Scalar, Device>: a trainable tensor and its gradient, and the named references optimizers,
/// gradient clipping and checkpoints walk over.
///
/// Gradient rule for every layer (llm.c style): backward ACCUMULATES into parameter gradients (`+=`), so
/// micro-batches add up until zero_grad(); activation gradients (`din`) are OVERWRITTEN.

#include <string>
#include <vector>

#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor.hpp"

namespace tmoe::nn {

template <class Scalar, DeviceTag Device>
struct Parameter {
  Tensor<Scalar, Device> value;
  Tensor<Scalar, Device> grad;  // same shape as value, zero-filled at allocation

  Parameter() = default;
  explicit Parameter(Shape shape) : value(shape), grad(shape) {}

  [[nodiscard]] const Shape& shape() const noexcept { return value.shape(); }
  [[nodiscard]] std::int64_t numel() const noexcept { return value.numel(); }
};

/// A parameter seen by name: what optimizers, clipping and checkpoints consume.
template <class Scalar, DeviceTag Device = Cpu>
struct ParameterRef {
  std::string name;
  TensorView<Scalar, Device> value;
  TensorView<Scalar, Device> grad;
};

template <class Scalar, DeviceTag Device = Cpu>
using ParameterRefs = std::vector<ParameterRef<Scalar, Device>>;

/// The named values of a parameter list, for io::save / io::load.
template <class Scalar, DeviceTag Device>
NamedTensorViews<Scalar, Device> values_of(const ParameterRefs<Scalar, Device>& params) {
  NamedTensorViews<Scalar, Device> out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back({p.name, p.value});
  return out;
}

/// Sets every gradient to zero (host tensors).
template <class Scalar>
void zero_grad(const ParameterRefs<Scalar, Cpu>& params) {
  for (const auto& p : params) {
    for (auto& g : p.grad.span()) g = Scalar(0);
  }
}

}  // namespace tmoe::nn
