#pragma once
// Shared helpers for tmoe's tests: seeded random fills and relative-error checks.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tmoe/core/random.hpp"
#include "tmoe/core/tensor.hpp"

namespace tmoe::test {

/// Fills `t` with uniform values in [lo, hi) from Philox(seed), element i from counter i.
template <class S>
void fill_uniform(TensorView<S, Cpu> t, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  const Philox rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const auto w = rng.block(static_cast<std::uint64_t>(i), 0xC0FFEEu);
    t.data()[i] = static_cast<S>(lo + (hi - lo) * uniform01(w[0], w[1]));
  }
}

/// max_i |a_i - b_i| / max(max_i |b_i|, floor): a relative error over the whole tensor.
inline double rel_error(const double* a, const double* b, std::int64_t n, double floor = 1e-30) {
  double diff = 0, scale = floor;
  for (std::int64_t i = 0; i < n; ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

template <class S>
std::vector<double> to_double(ConstTensorView<S, Cpu> t) {
  std::vector<double> v(static_cast<std::size_t>(t.numel()));
  for (std::int64_t i = 0; i < t.numel(); ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(t.data()[i]);
  return v;
}

}  // namespace tmoe::test
