#pragma once
/// @file ops.cuh
/// @brief Ops<Cuda>: the CUDA back-end's one surface, op for op the same as Ops<Cpu> (backend/cpu/ops.hpp).
///
/// Destination first, then inputs. Every op is queued on the context's stream and returns at once; nothing here
/// copies to the host or synchronizes. Scalars are float, double, bf16 or f16; bf16 and f16 accumulate in float.

#include <cstdint>

#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/elementwise.cuh"
#include "tmoe/backend/cuda/gather_scatter.cuh"
#include "tmoe/backend/cuda/gemm.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/backend/cuda/reduce.cuh"
#include "tmoe/backend/cuda/top_k.cuh"
#include "tmoe/core/ops.hpp"
#include "tmoe/nn/activation.hpp"

namespace tmoe {

template <>
struct Ops<Cuda> {
  using Context = CudaContext;

  /// c (M, N) = alpha * op(a) op(b) + beta * c; float32 uses TF32 only if ctx.allow_tf32().
  template <class S>
  static void gemm(CudaContext& ctx, TensorView<S, Cuda> c, ConstTensorView<S, Cuda> a, Trans ta,
                   ConstTensorView<S, Cuda> b, Trans tb, backend::cuda::acc_t<S> alpha = 1,
                   backend::cuda::acc_t<S> beta = 0) {
    backend::cuda::gemm<S>(ctx, c, a, ta, b, tb, alpha, beta);
  }

  /// Row softmax over the last dimension (max-subtracted). `out` may alias `in`.
  template <class S>
  static void softmax(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> in) {
    backend::cuda::softmax_rows<S>(ctx, out, in);
  }

  /// Layer normalization over the last dimension; stores mean and rstd per row.
  template <class S>
  static void layernorm(CudaContext& ctx, TensorView<S, Cuda> out, TensorView<S, Cuda> mean,
                        TensorView<S, Cuda> rstd, ConstTensorView<S, Cuda> in, ConstTensorView<S, Cuda> gamma,
                        ConstTensorView<S, Cuda> beta, backend::cuda::acc_t<S> eps) {
    backend::cuda::layernorm_forward<S>(ctx, out, mean, rstd, in, gamma, beta, eps);
  }

  /// out = Act(in) element-wise.
  template <nn::Activation Act, class S>
  static void activation(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> in) {
    backend::cuda::activation_forward<Act, S>(ctx, out, in);
  }

  /// din = dout * Act'(pre).
  template <nn::Activation Act, class S>
  static void activation_backward(CudaContext& ctx, TensorView<S, Cuda> din, ConstTensorView<S, Cuda> dout,
                                  ConstTensorView<S, Cuda> pre) {
    backend::cuda::activation_backward<Act, S>(ctx, din, dout, pre);
  }

  /// out[r] = src[index[r]]; I is int32 or int64. Indices are not range-checked (they stay on the device).
  template <class S, class I>
  static void gather_rows(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> src,
                          ConstTensorView<I, Cuda> index) {
    backend::cuda::gather_rows<S, I>(ctx, out, src, index);
  }

  /// out[index[r]] += src[r], in increasing r; I is int32 or int64. Indices are not range-checked.
  template <class S, class I>
  static void scatter_add_rows(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> src,
                               ConstTensorView<I, Cuda> index) {
    backend::cuda::scatter_add_rows<S, I>(ctx, out, src, index);
  }

  /// Per-row top-K values (descending) and indices, ties to the lower index.
  template <int K, class S>
  static void top_k(CudaContext& ctx, TensorView<S, Cuda> values, TensorView<std::int32_t, Cuda> indices,
                    ConstTensorView<S, Cuda> in) {
    backend::cuda::top_k_rows<K, S>(ctx, values, indices, in);
  }

  /// din = y * (dout - rowsum(dout * y)): backward of a row softmax with output y. din may alias dout.
  template <class S>
  static void softmax_backward(CudaContext& ctx, TensorView<S, Cuda> din, ConstTensorView<S, Cuda> dout,
                               ConstTensorView<S, Cuda> y) {
    backend::cuda::softmax_backward_rows<S>(ctx, din, dout, y);
  }

  /// Layer-norm backward: din overwritten, dgamma and dbeta accumulated. din may alias dout.
  template <class S>
  static void layernorm_backward(CudaContext& ctx, TensorView<S, Cuda> din, TensorView<S, Cuda> dgamma,
                                 TensorView<S, Cuda> dbeta, ConstTensorView<S, Cuda> dout,
                                 ConstTensorView<S, Cuda> in, ConstTensorView<S, Cuda> mean,
                                 ConstTensorView<S, Cuda> rstd, ConstTensorView<S, Cuda> gamma) {
    backend::cuda::layernorm_backward<S>(ctx, din, dgamma, dbeta, dout, in, mean, rstd, gamma);
  }

  /// out (n) += sum over rows of in (rows, n).
  template <class S>
  static void row_sum_accumulate(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> in) {
    backend::cuda::row_sum_accumulate<S>(ctx, out, in);
  }

  /// out (rows, n) += v (n) on every row.
  template <class S>
  static void add_row_vector(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> v) {
    backend::cuda::add_row_vector<S>(ctx, out, v);
  }

  /// y += alpha * x.
  template <class S>
  static void axpy(CudaContext& ctx, TensorView<S, Cuda> y, ConstTensorView<S, Cuda> x,
                   backend::cuda::acc_t<S> alpha = 1) {
    backend::cuda::axpy<S>(ctx, y, x, alpha);
  }
};

}  // namespace tmoe
