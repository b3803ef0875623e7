#pragma once
/// @file elementwise.cuh
/// @brief Element-wise device ops: activation forward and backward, axpy and the bias add (add_row_vector).
///
/// Each is one grid-stride kernel on the context's stream. Values are read into acc_t<S> (float for bf16 and f16),
/// computed there and rounded once on the store, so every element depends only on its own inputs.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"
#include "tmoe/nn/activation.hpp"

namespace tmoe::backend::cuda {

namespace detail {

inline constexpr int kElementwiseThreads = 256;

/// Blocks for a grid-stride loop over n items: enough to fill the device a few times over, never more than needed.
inline unsigned grid_stride_blocks(const CudaContext& ctx, std::int64_t n, int threads) noexcept {
  const auto cap = static_cast<unsigned>(std::max(1, ctx.multiprocessors()) * 16);
  return std::min(blocks_for(n, threads), cap);
}

template <nn::Activation Act, class S>
__global__ void __launch_bounds__(kElementwiseThreads)
    activation_forward_kernel(S* out, const S* in, std::int64_t n) {
  using A = acc_t<S>;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = S(Act::forward(static_cast<A>(in[i])));
  }
}

template <nn::Activation Act, class S>
__global__ void __launch_bounds__(kElementwiseThreads)
    activation_backward_kernel(S* din, const S* dout, const S* pre, std::int64_t n) {
  using A = acc_t<S>;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    din[i] = S(static_cast<A>(dout[i]) * Act::derivative(static_cast<A>(pre[i])));
  }
}

template <class S>
__global__ void __launch_bounds__(kElementwiseThreads)
    axpy_kernel(S* y, const S* x, acc_t<S> alpha, std::int64_t n) {
  using A = acc_t<S>;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = S(static_cast<A>(y[i]) + alpha * static_cast<A>(x[i]));
  }
}

/// Block (x: a tile of kElementwiseThreads columns, y: rows strided by gridDim.y); v is read once per thread.
template <class S>
__global__ void __launch_bounds__(kElementwiseThreads)
    add_row_vector_kernel(S* out, const S* v, std::int64_t rows, std::int64_t n) {
  using A = acc_t<S>;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const A b = static_cast<A>(v[j]);
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    S* o = out + r * n + j;
    *o = S(static_cast<A>(*o) + b);
  }
}

}  // namespace detail

/// out = Act(in) element-wise over equal element counts. `out` may alias `in`. @throws ShapeError otherwise.
template <nn::Activation Act, class S>
void activation_forward(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> in) {
  static_assert(is_cuda_scalar_v<S>, "activation_forward: scalars are float, double, bf16 or f16");
  if (out.numel() != in.numel()) {
    throw ShapeError("activation_forward: out " + out.shape().to_string() + " and in " + in.shape().to_string() +
                     " differ in element count");
  }
  const std::int64_t n = in.numel();
  if (n == 0) return;
  const int threads = detail::kElementwiseThreads;
  detail::activation_forward_kernel<Act, S>
      <<<detail::grid_stride_blocks(ctx, n, threads), threads, 0, ctx.stream()>>>(out.data(), in.data(), n);
  TMOE_CUDA_CHECK_LAUNCH("activation_forward_kernel");
}

/// din = dout * Act'(pre), with `pre` the pre-activation. `din` may alias `dout`. @throws ShapeError unless all
/// three have the same element count.
template <nn::Activation Act, class S>
void activation_backward(CudaContext& ctx, TensorView<S, Cuda> din, ConstTensorView<S, Cuda> dout,
                         ConstTensorView<S, Cuda> pre) {
  static_assert(is_cuda_scalar_v<S>, "activation_backward: scalars are float, double, bf16 or f16");
  if (din.numel() != dout.numel() || pre.numel() != dout.numel()) {
    throw ShapeError("activation_backward: din " + din.shape().to_string() + ", dout " + dout.shape().to_string() +
                     " and pre " + pre.shape().to_string() + " must have equal element counts");
  }
  const std::int64_t n = dout.numel();
  if (n == 0) return;
  const int threads = detail::kElementwiseThreads;
  detail::activation_backward_kernel<Act, S><<<detail::grid_stride_blocks(ctx, n, threads), threads, 0,
                                               ctx.stream()>>>(din.data(), dout.data(), pre.data(), n);
  TMOE_CUDA_CHECK_LAUNCH("activation_backward_kernel");
}

/// y += alpha * x element-wise over equal element counts. @throws ShapeError otherwise.
template <class S>
void axpy(CudaContext& ctx, TensorView<S, Cuda> y, ConstTensorView<S, Cuda> x, acc_t<S> alpha = acc_t<S>(1)) {
  static_assert(is_cuda_scalar_v<S>, "axpy: scalars are float, double, bf16 or f16");
  if (y.numel() != x.numel()) {
    throw ShapeError("axpy: y " + y.shape().to_string() + " and x " + x.shape().to_string() +
                     " differ in element count");
  }
  const std::int64_t n = x.numel();
  if (n == 0) return;
  const int threads = detail::kElementwiseThreads;
  detail::axpy_kernel<S>
      <<<detail::grid_stride_blocks(ctx, n, threads), threads, 0, ctx.stream()>>>(y.data(), x.data(), alpha, n);
  TMOE_CUDA_CHECK_LAUNCH("axpy_kernel");
}

/// out[r, :] += v for every row of out viewed as (rows, n), n = v.numel(): a bias add. @throws ShapeError unless
/// out's last dimension is n.
template <class S>
void add_row_vector(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> v) {
  static_assert(is_cuda_scalar_v<S>, "add_row_vector: scalars are float, double, bf16 or f16");
  const std::int64_t n = v.numel();
  if (out.rank() == 0 || out.dim(-1) != n) {
    throw ShapeError("add_row_vector: out " + out.shape().to_string() + " must have last dim " +
                     std::to_string(n) + " (v " + v.shape().to_string() + ")");
  }
  const std::int64_t rows = n == 0 ? 0 : out.numel() / n;
  if (rows == 0) return;
  const int threads = detail::kElementwiseThreads;
  const dim3 grid(blocks_for(n, threads), static_cast<unsigned>(std::min<std::int64_t>(rows, 65535)));
  detail::add_row_vector_kernel<S><<<grid, threads, 0, ctx.stream()>>>(out.data(), v.data(), rows, n);
  TMOE_CUDA_CHECK_LAUNCH("add_row_vector_kernel");
}

}  // namespace tmoe::backend::cuda
