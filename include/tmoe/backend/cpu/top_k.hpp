#pragma once
/// @file top_k.hpp
/// @brief Per-row top-k with a compile-time K: the k largest values in descending order, ties to the lower
/// index, by K passes of an argmax that skips what was already taken (K is small: experts per token).

#include <cstdint>
#include <limits>
#include <string>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe::backend::cpu {

/// The top K of one row of n values. NaN never wins over a number.
template <int K, class S>
void top_k_row(const S* x, std::int64_t n, S* values, std::int32_t* indices) {
  for (int j = 0; j < K; ++j) {
    std::int64_t best = -1;
    for (std::int64_t e = 0; e < n; ++e) {
      bool taken = false;
      for (int p = 0; p < j; ++p) taken = taken || indices[p] == e;
      if (taken) continue;
      if (best < 0 || x[e] > x[best] || (x[best] != x[best] && x[e] == x[e])) best = e;
    }
    indices[j] = static_cast<std::int32_t>(best);
    values[j] = x[best];
  }
}

/// values/indices (rows, K) from in (rows, n), n >= K.
template <int K, class S>
void top_k_rows(CpuContext& ctx, TensorView<S, Cpu> values, TensorView<std::int32_t, Cpu> indices,
                ConstTensorView<S, Cpu> in) {
  static_assert(K >= 1, "top_k_rows<K>: K must be at least 1.");
  const std::int64_t n = in.rank() == 0 ? 1 : in.dim(-1);
  const std::int64_t rows = n == 0 ? 0 : in.numel() / n;
  if (n < K) {
    throw ShapeError("top_k_rows: rows of " + std::to_string(n) + " values cannot give the top " +
                     std::to_string(K) + " (input " + in.shape().to_string() + ")");
  }
  if (values.numel() != rows * K || indices.numel() != rows * K) {
    throw ShapeError("top_k_rows: expected values and indices of " + std::to_string(rows * K) +
                     " elements for input " + in.shape().to_string() + ", got " + values.shape().to_string() +
                     " and " + indices.shape().to_string());
  }
  ctx.parallel_range(rows, 64, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      top_k_row<K>(in.data() + r * n, n, values.data() + r * K, indices.data() + r * K);
    }
  });
}

}  // namespace tmoe::backend::cpu
