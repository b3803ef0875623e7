#pragma once
/// @file elementwise.hpp
/// @brief Element-wise activation forward and backward over host views.

#include <cstdint>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"
#include "tmoe/nn/activation.hpp"

namespace tmoe::backend::cpu {

/// out = Act(in). `out` may alias `in`.
template <nn::Activation Act, class S>
void activation_forward(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> in) {
  if (out.numel() != in.numel()) {
    throw ShapeError("activation_forward: out " + out.shape().to_string() + " and in " + in.shape().to_string() +
                     " differ in element count");
  }
  S* o = out.data();
  const S* x = in.data();
  ctx.parallel_range(in.numel(), 4096, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) o[i] = Act::forward(x[i]);
  });
}

/// din = dout * Act'(pre), with `pre` the pre-activation. `din` may alias `dout`.
template <nn::Activation Act, class S>
void activation_backward(CpuContext& ctx, TensorView<S, Cpu> din, ConstTensorView<S, Cpu> dout,
                         ConstTensorView<S, Cpu> pre) {
  if (din.numel() != dout.numel() || pre.numel() != dout.numel()) {
    throw ShapeError("activation_backward: din " + din.shape().to_string() + ", dout " + dout.shape().to_string() +
                     " and pre " + pre.shape().to_string() + " must have equal element counts");
  }
  S* d = din.data();
  const S* g = dout.data();
  const S* x = pre.data();
  ctx.parallel_range(dout.numel(), 4096, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) d[i] = g[i] * Act::derivative(x[i]);
  });
}

/// y += alpha * x element-wise over equal element counts.
template <class S>
void axpy(CpuContext& ctx, TensorView<S, Cpu> y, ConstTensorView<S, Cpu> x, S alpha = S(1)) {
  if (y.numel() != x.numel()) {
    throw ShapeError("axpy: y " + y.shape().to_string() + " and x " + x.shape().to_string() +
                     " differ in element count");
  }
  S* o = y.data();
  const S* a = x.data();
  ctx.parallel_range(x.numel(), 4096, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) o[i] += alpha * a[i];
  });
}

/// out[r, :] += v for every row of out viewed as (rows, n), n = v.numel(): a bias add.
template <class S>
void add_row_vector(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> v) {
  const std::int64_t n = v.numel();
  if (out.rank() == 0 || out.dim(-1) != n) {
    throw ShapeError("add_row_vector: out " + out.shape().to_string() + " must have last dim " +
                     std::to_string(n) + " (v " + v.shape().to_string() + ")");
  }
  const std::int64_t rows = n == 0 ? 0 : out.numel() / n;
  ctx.parallel_range(rows, 64, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      S* o = out.data() + r * n;
      for (std::int64_t j = 0; j < n; ++j) o[j] += v.data()[j];
    }
  });
}

}  // namespace tmoe::backend::cpu
