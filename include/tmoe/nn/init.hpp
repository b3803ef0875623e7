#pragma once
/// @file init.hpp
/// @brief Parameter initializers for the nn layers, all drawn from tmoe::Philox (no global RNG).
///
/// Element i of a tensor filled with (seed, stream) comes from Philox(seed).block(i, stream), so a layer's
/// initial values depend only on its seed. Composite layers give each sub-layer its own seed with
/// `sub_seed(seed, index)`.
///
/// @code
/// tmoe::nn::fill_uniform(w.view(), /*seed=*/7, /*stream=*/0, /*bound=*/0.1);   // U(-0.1, 0.1)
/// @endcode

#include <cstdint>

#include "tmoe/core/random.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe::nn {

/// t = U(-bound, bound), element i from Philox(seed).block(i, stream) (53-bit uniforms).
template <class Scalar>
void fill_uniform(TensorView<Scalar, Cpu> t, std::uint64_t seed, std::uint64_t stream, double bound) {
  const Philox rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const auto w = rng.block(static_cast<std::uint64_t>(i), stream);
    t.data()[i] = static_cast<Scalar>(bound * (2.0 * uniform01(w[0], w[1]) - 1.0));
  }
}

/// t = N(0, sigma^2), element i from Philox(seed).block(i, stream).
template <class Scalar>
void fill_normal(TensorView<Scalar, Cpu> t, std::uint64_t seed, std::uint64_t stream, double sigma) {
  const Philox rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const auto w = rng.block(static_cast<std::uint64_t>(i), stream);
    t.data()[i] = static_cast<Scalar>(sigma * static_cast<double>(normal01(w[0], w[1])));
  }
}

/// t = value everywhere.
template <class Scalar>
void fill_constant(TensorView<Scalar, Cpu> t, Scalar value) {
  for (auto& v : t.span()) v = value;
}

/// A seed for sub-layer `index` of a layer seeded with `seed`: a Philox draw, so sub-layers are decorrelated.
constexpr std::uint64_t sub_seed(std::uint64_t seed, std::uint64_t index) noexcept {
  constexpr std::uint64_t kSubSeedStream = 0x5EED5EEDu;
  const auto w = Philox(seed).block(index, kSubSeedStream);
  return (static_cast<std::uint64_t>(w[0]) << 32) | w[1];
}

}  // namespace tmoe::nn
