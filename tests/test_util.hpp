#pragma once
// Shared helpers for tmoe's tests: seeded random fills, relative-error checks, token-id tensors, parameter counts.

#include <algorithm>
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

/// rel_error over two tensors of the same shape, compared in double.
template <class S>
double rel_error(ConstTensorView<S, Cpu> a, ConstTensorView<S, Cpu> b) {
  const auto x = to_double<S>(a), y = to_double<S>(b);
  return rel_error(x.data(), y.data(), a.numel());
}

/// (rows, longest) token ids, each row padded with `pad`.
inline Tensor<std::int32_t, Cpu> pad_rows(const std::vector<std::vector<std::int32_t>>& rows, std::int32_t pad = 0) {
  std::size_t S = 0;
  for (const auto& r : rows) S = std::max(S, r.size());
  Tensor<std::int32_t, Cpu> t({static_cast<std::int64_t>(rows.size()), static_cast<std::int64_t>(S)});
  std::fill_n(t.data(), t.numel(), pad);
  for (std::size_t b = 0; b < rows.size(); ++b) std::copy(rows[b].begin(), rows[b].end(), t.data() + b * S);
  return t;
}

/// A rank-1 tensor of ids.
inline Tensor<std::int32_t, Cpu> id_tensor(const std::vector<std::int32_t>& v) {
  Tensor<std::int32_t, Cpu> t({static_cast<std::int64_t>(v.size())});
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

/// Elements over all of a model's (or layer's) parameters, as allocated.
template <class Model>
std::int64_t parameter_elements(Model& m) {
  std::int64_t n = 0;
  for (auto& p : m.parameters()) n += p.view.numel();
  return n;
}

}  // namespace tmoe::test
