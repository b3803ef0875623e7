#pragma once
/// @file activation.hpp
/// @brief Activation policies: Relu (the paper's), Gelu (erf form) and Silu.
///
/// Each policy has `forward(x)` and `derivative(x)` on scalars, usable from host and device code, and a
/// `name` for model metadata. Back-ends apply them element-wise; backward multiplies by derivative(x),
/// where x is the pre-activation.

#include <cmath>
#include <string_view>

#include "tmoe/config.hpp"

namespace tmoe::nn {

struct Relu {
  static constexpr std::string_view name = "relu";
  template <class T>
  TMOE_HOST_DEVICE static T forward(T x) noexcept {
    return x > T(0) ? x : T(0);
  }
  template <class T>
  TMOE_HOST_DEVICE static T derivative(T x) noexcept {
    return x > T(0) ? T(1) : T(0);
  }
};

/// GELU, x * Phi(x), in the exact erf form (PyTorch's default).
struct Gelu {
  static constexpr std::string_view name = "gelu";
  template <class T>
  TMOE_HOST_DEVICE static T forward(T x) noexcept {
    return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
  }
  template <class T>
  TMOE_HOST_DEVICE static T derivative(T x) noexcept {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
    return cdf + x * pdf;
  }
};

/// SiLU (swish), x * sigmoid(x).
struct Silu {
  static constexpr std::string_view name = "silu";
  template <class T>
  TMOE_HOST_DEVICE static T forward(T x) noexcept {
    return x / (T(1) + std::exp(-x));
  }
  template <class T>
  TMOE_HOST_DEVICE static T derivative(T x) noexcept {
    const T s = T(1) / (T(1) + std::exp(-x));
    return s * (T(1) + x * (T(1) - s));
  }
};

template <class A>
concept Activation = requires(float x) {
  { A::forward(x) };
  { A::derivative(x) };
  A::name;
};

}  // namespace tmoe::nn
