#pragma once
/// @file reduce.hpp
/// @brief Row-wise softmax and layer normalization over the last dimension.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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

/// din[r, :] = y[r, :] * (dout[r, :] - <dout[r, :], y[r, :]>): the gradient through a row softmax whose
/// output was y (rows, n). A row of zeros in y (a fully masked row) gives zeros. `din` may alias `dout`.
template <class S>
void softmax_backward_rows(CpuContext& ctx, TensorView<S, Cpu> din, ConstTensorView<S, Cpu> dout,
                           ConstTensorView<S, Cpu> y) {
  if (!(din.shape() == y.shape()) || !(dout.shape() == y.shape())) {
    throw ShapeError("softmax_backward_rows: din " + din.shape().to_string() + " and dout " +
                     dout.shape().to_string() + " must match y " + y.shape().to_string());
  }
  const std::int64_t cols = last_dim(y);
  const std::int64_t rows = cols == 0 ? 0 : y.numel() / cols;
  ctx.parallel_range(rows, 64, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const S* p = y.data() + r * cols;
      const S* g = dout.data() + r * cols;
      S* d = din.data() + r * cols;
      S dot = 0;
      for (std::int64_t j = 0; j < cols; ++j) dot += g[j] * p[j];
      for (std::int64_t j = 0; j < cols; ++j) d[j] = p[j] * (g[j] - dot);
    }
  });
}

/// Layer-norm backward over the last dimension (C), given forward's input, mean and rstd (one per row):
///   xhat = (x - mean) * rstd,  g = dout * gamma
///   din    = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))      (overwritten)
///   dgamma += sum over rows of dout * xhat,  dbeta += sum over rows of dout   (accumulated)
/// din is computed by row blocks and dgamma/dbeta by column slabs, each element summed in row order on one
/// thread, so the result does not depend on the thread count. `din` may alias `dout`.
template <class S>
void layernorm_backward(CpuContext& ctx, TensorView<S, Cpu> din, TensorView<S, Cpu> dgamma, TensorView<S, Cpu> dbeta,
                        ConstTensorView<S, Cpu> dout, ConstTensorView<S, Cpu> in, ConstTensorView<S, Cpu> mean,
                        ConstTensorView<S, Cpu> rstd, ConstTensorView<S, Cpu> gamma) {
  const std::int64_t c = last_dim(in);
  const std::int64_t rows = c == 0 ? 0 : in.numel() / c;
  if (!(din.shape() == in.shape()) || !(dout.shape() == in.shape()) || gamma.numel() != c ||
      dgamma.numel() != c || dbeta.numel() != c || mean.numel() != rows || rstd.numel() != rows) {
    throw ShapeError("layernorm_backward: for in " + in.shape().to_string() + " expected din and dout of the same " +
                     "shape, gamma, dgamma and dbeta of " + std::to_string(c) + " and mean/rstd of " +
                     std::to_string(rows) + " elements; got din " + din.shape().to_string() + ", dout " +
                     dout.shape().to_string() + ", gamma " + gamma.shape().to_string() + ", dgamma " +
                     dgamma.shape().to_string() + ", dbeta " + dbeta.shape().to_string() + ", mean " +
                     mean.shape().to_string() + ", rstd " + rstd.shape().to_string());
  }
  // Parameter gradients first (din may alias dout). Each call's sums are formed apart and then added, so calling
  // backward twice gives exactly twice the gradient.
  ctx.parallel_range(c, 16, [&](std::int64_t c0, std::int64_t c1) {
    std::vector<S> sum_gx(static_cast<std::size_t>(c1 - c0), S(0)), sum_g(static_cast<std::size_t>(c1 - c0), S(0));
    for (std::int64_t r = 0; r < rows; ++r) {
      const S* x = in.data() + r * c;
      const S* g = dout.data() + r * c;
      const S m = mean.data()[r], rs = rstd.data()[r];
      for (std::int64_t j = c0; j < c1; ++j) {
        sum_gx[static_cast<std::size_t>(j - c0)] += g[j] * (x[j] - m) * rs;
        sum_g[static_cast<std::size_t>(j - c0)] += g[j];
      }
    }
    for (std::int64_t j = c0; j < c1; ++j) {
      dgamma.data()[j] += sum_gx[static_cast<std::size_t>(j - c0)];
      dbeta.data()[j] += sum_g[static_cast<std::size_t>(j - c0)];
    }
  });
  ctx.parallel_range(rows, 16, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const S* x = in.data() + r * c;
      const S* g = dout.data() + r * c;
      S* d = din.data() + r * c;
      const S m = mean.data()[r], rs = rstd.data()[r];
      S mean_g = 0, mean_gx = 0;
      for (std::int64_t j = 0; j < c; ++j) {
        const S gj = g[j] * gamma.data()[j];
        mean_g += gj;
        mean_gx += gj * (x[j] - m) * rs;
      }
      mean_g /= static_cast<S>(c);
      mean_gx /= static_cast<S>(c);
      for (std::int64_t j = 0; j < c; ++j) {
        const S xhat = (x[j] - m) * rs;
        d[j] = rs * (g[j] * gamma.data()[j] - mean_g - xhat * mean_gx);
      }
    }
  });
}

/// out[j] += sum_r in[r, j] over the rows of in viewed as (rows, n), n = out.numel(): a bias gradient.
/// Each thread owns a column slab and sums its rows in order, then adds the sums to out.
template <class S>
void row_sum_accumulate(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> in) {
  const std::int64_t n = out.numel();
  if (in.rank() == 0 || last_dim(in) != n) {
    throw ShapeError("row_sum_accumulate: in " + in.shape().to_string() + " must have last dim " +
                     std::to_string(n) + " (out " + out.shape().to_string() + ")");
  }
  const std::int64_t rows = n == 0 ? 0 : in.numel() / n;
  ctx.parallel_range(n, 16, [&](std::int64_t c0, std::int64_t c1) {
    std::vector<S> sum(static_cast<std::size_t>(c1 - c0), S(0));
    for (std::int64_t r = 0; r < rows; ++r) {
      const S* x = in.data() + r * n;
      for (std::int64_t j = c0; j < c1; ++j) sum[static_cast<std::size_t>(j - c0)] += x[j];
    }
    for (std::int64_t j = c0; j < c1; ++j) out.data()[j] += sum[static_cast<std::size_t>(j - c0)];
  });
}

}  // namespace tmoe::backend::cpu
