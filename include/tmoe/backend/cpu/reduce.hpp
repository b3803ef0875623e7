#pragma once
/// @file reduce.hpp
/// @brief Row-wise softmax and layer normalization over the last dimension.

#include <cmath>
#include <cstdint>
#include <limits>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe::backend::cpu {

/// Rows of `x` viewed as (rows, last dim).
template <class T, class D>
std::int64_t last_dim(const TensorView<T, D>& x) {
  return x.rank() == 0 ? 1 : x.dim(-1);
}

/// out[r, :] = softmax(in[r, :]) over the last dimension, max-subtracted. `out` may alias `in`.
template <class S>
void softmax_rows(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> in) {
  if (!(out.shape() == in.shape())) {
    throw ShapeError("softmax_rows: out " + out.shape().to_string() + " must match in " + in.shape().to_string());
  }
  const std::int64_t cols = last_dim(in);
  const std::int64_t rows = cols == 0 ? 0 : in.numel() / cols;
  ctx.parallel_range(rows, 64, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const S* x = in.data() + r * cols;
      S* y = out.data() + r * cols;
      S mx = -std::numeric_limits<S>::infinity();
      for (std::int64_t j = 0; j < cols; ++j) mx = x[j] > mx ? x[j] : mx;
      S sum = 0;
      for (std::int64_t j = 0; j < cols; ++j) {
        y[j] = std::exp(x[j] - mx);
        sum += y[j];
      }
      const S inv = S(1) / sum;
      for (std::int64_t j = 0; j < cols; ++j) y[j] *= inv;
    }
  });
}

/// out = (in - mean) * rstd * gamma + beta over the last dimension (C). Writes mean and rstd per row
/// (what backward needs). `out` may alias `in`.
template <class S>
void layernorm_forward(CpuContext& ctx, TensorView<S, Cpu> out, TensorView<S, Cpu> mean, TensorView<S, Cpu> rstd,
                       ConstTensorView<S, Cpu> in, ConstTensorView<S, Cpu> gamma, ConstTensorView<S, Cpu> beta,
                       S eps) {
  const std::int64_t c = last_dim(in);
  const std::int64_t rows = c == 0 ? 0 : in.numel() / c;
  if (!(out.shape() == in.shape()) || gamma.numel() != c || beta.numel() != c || mean.numel() != rows ||
      rstd.numel() != rows) {
    throw ShapeError("layernorm_forward: for in " + in.shape().to_string() + " expected out of the same shape, " +
                     "gamma and beta of " + std::to_string(c) + " and mean/rstd of " + std::to_string(rows) +
                     " elements; got out " + out.shape().to_string() + ", gamma " + gamma.shape().to_string() +
                     ", beta " + beta.shape().to_string() + ", mean " + mean.shape().to_string() + ", rstd " +
                     rstd.shape().to_string());
  }
  ctx.parallel_range(rows, 16, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const S* x = in.data() + r * c;
      S* y = out.data() + r * c;
      S m = 0;
      for (std::int64_t j = 0; j < c; ++j) m += x[j];
      m /= static_cast<S>(c);
      S v = 0;
      for (std::int64_t j = 0; j < c; ++j) v += (x[j] - m) * (x[j] - m);
      v /= static_cast<S>(c);
      const S rs = S(1) / std::sqrt(v + eps);
      for (std::int64_t j = 0; j < c; ++j) y[j] = (x[j] - m) * rs * gamma.data()[j] + beta.data()[j];
      mean.data()[r] = m;
      rstd.data()[r] = rs;
    }
  });
}

}  // namespace tmoe::backend::cpu
