#pragma once
/// @file ops.hpp
/// @brief Ops<Cpu>: the CPU back-end's one surface. Layers call only these.
///
/// Destination first, then inputs (llm.c style); nothing here allocates on the hot path except where noted.

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/backend/cpu/elementwise.hpp"
#include "tmoe/backend/cpu/gather_scatter.hpp"
#include "tmoe/backend/cpu/gemm.hpp"
#include "tmoe/backend/cpu/reduce.hpp"
#include "tmoe/backend/cpu/top_k.hpp"
#include "tmoe/core/ops.hpp"

namespace tmoe {

template <>
struct Ops<Cpu> {
  using Context = CpuContext;

  /// c (M, N) = alpha * op(a) op(b) + beta * c.
  template <class S>
  static void gemm(CpuContext& ctx, TensorView<S, Cpu> c, ConstTensorView<S, Cpu> a, Trans ta,
                   ConstTensorView<S, Cpu> b, Trans tb, S alpha = S(1), S beta = S(0)) {
    backend::cpu::gemm<S>(ctx, c, a, ta, b, tb, alpha, beta);
  }

  /// Row softmax over the last dimension.
  template <class S>
  static void softmax(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> in) {
    backend::cpu::softmax_rows<S>(ctx, out, in);
  }

  /// Layer normalization over the last dimension; stores mean and rstd per row.
  template <class S>
  static void layernorm(CpuContext& ctx, TensorView<S, Cpu> out, TensorView<S, Cpu> mean, TensorView<S, Cpu> rstd,
                        ConstTensorView<S, Cpu> in, ConstTensorView<S, Cpu> gamma, ConstTensorView<S, Cpu> beta,
                        S eps) {
    backend::cpu::layernorm_forward<S>(ctx, out, mean, rstd, in, gamma, beta, eps);
  }

  /// out = Act(in) element-wise.
  template <nn::Activation Act, class S>
  static void activation(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> in) {
    backend::cpu::activation_forward<Act, S>(ctx, out, in);
  }

  /// din = dout * Act'(pre).
  template <nn::Activation Act, class S>
  static void activation_backward(CpuContext& ctx, TensorView<S, Cpu> din, ConstTensorView<S, Cpu> dout,
                                  ConstTensorView<S, Cpu> pre) {
    backend::cpu::activation_backward<Act, S>(ctx, din, dout, pre);
  }

  /// out[r] = src[index[r]].
  template <class S, class I>
  static void gather_rows(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> src,
                          ConstTensorView<I, Cpu> index) {
    backend::cpu::gather_rows<S, I>(ctx, out, src, index);
  }

  /// out[index[r]] += src[r], in increasing r.
  template <class S, class I>
  static void scatter_add_rows(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> src,
                               ConstTensorView<I, Cpu> index) {
    backend::cpu::scatter_add_rows<S, I>(ctx, out, src, index);
  }

  /// Per-row top-K values (descending) and indices, ties to the lower index.
  template <int K, class S>
  static void top_k(CpuContext& ctx, TensorView<S, Cpu> values, TensorView<std::int32_t, Cpu> indices,
                    ConstTensorView<S, Cpu> in) {
    backend::cpu::top_k_rows<K, S>(ctx, values, indices, in);
  }
  /// din = y * (dout - rowsum(dout * y)): backward of a row softmax with output y. din may alias dout.
  template <class S>
  static void softmax_backward(CpuContext& ctx, TensorView<S, Cpu> din, ConstTensorView<S, Cpu> dout,
                               ConstTensorView<S, Cpu> y) {
    backend::cpu::softmax_backward_rows<S>(ctx, din, dout, y);
  }

  /// Layer-norm backward: din overwritten, dgamma and dbeta accumulated.
  template <class S>
  static void layernorm_backward(CpuContext& ctx, TensorView<S, Cpu> din, TensorView<S, Cpu> dgamma,
                                 TensorView<S, Cpu> dbeta, ConstTensorView<S, Cpu> dout, ConstTensorView<S, Cpu> in,
                                 ConstTensorView<S, Cpu> mean, ConstTensorView<S, Cpu> rstd,
                                 ConstTensorView<S, Cpu> gamma) {
    backend::cpu::layernorm_backward<S>(ctx, din, dgamma, dbeta, dout, in, mean, rstd, gamma);
  }

  /// out (n) += sum over rows of in (rows, n).
  template <class S>
  static void row_sum_accumulate(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> in) {
    backend::cpu::row_sum_accumulate<S>(ctx, out, in);
  }

  /// out (rows, n) += v (n) on every row.
  template <class S>
  static void add_row_vector(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> v) {
    backend::cpu::add_row_vector<S>(ctx, out, v);
  }

  /// y += alpha * x.
  template <class S>
  static void axpy(CpuContext& ctx, TensorView<S, Cpu> y, ConstTensorView<S, Cpu> x, S alpha = S(1)) {
    backend::cpu::axpy<S>(ctx, y, x, alpha);
  }
};

}  // namespace tmoe
