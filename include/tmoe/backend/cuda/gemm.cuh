#pragma once
/// @file gemm.cuh
/// @brief Row-major GEMMs through cuBLAS: float32 (TF32 only when the context allows it), float64, and bf16/f16
/// operands accumulating in float32, optionally writing float32 results.
///
/// cuBLAS is column-major; a row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T, so the operands
/// swap places and keep their transpose flags.

#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/core/gemm_shape.hpp"

namespace tmoe::backend::cuda {

/// One row-major operand of a (strided-batched) GEMM: pointer, leading dimension and batch stride, in elements.
template <class T>
struct GemmOperand {
  T* data = nullptr;
  std::int64_t ld = 0;
  std::int64_t batch_stride = 0;
};

/// Full precision ignores the context's TF32 permission: the MoE router uses it, since routing is discontinuous in
/// the logits and must not change with a math mode.
enum class GemmPrecision { kContext, kFull };

template <class In>
cublasComputeType_t compute_type(const CudaContext& ctx, GemmPrecision precision = GemmPrecision::kContext) noexcept {
  if constexpr (std::is_same_v<In, double>)
    return CUBLAS_COMPUTE_64F;
  else if constexpr (std::is_same_v<In, float>) {
    return ctx.allow_tf32() && precision == GemmPrecision::kContext ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  } else
    return CUBLAS_COMPUTE_32F;
}

constexpr cublasOperation_t cublas_op(Trans t) noexcept { return t == Trans::kN ? CUBLAS_OP_N : CUBLAS_OP_T; }

/// c[i] (m, n) = alpha * op(a[i]) (m, k) op(b[i]) (k, n) + beta * c[i], for i in [0, batch). Inputs are In; the
/// output is Out (In, or float for bf16/f16 inputs). Trusts its arguments: callers check shapes.
template <class In, class Out>
void gemm_strided_batched(CudaContext& ctx, std::int64_t m, std::int64_t n, std::int64_t k, GemmOperand<const In> a,
                          Trans ta, GemmOperand<const In> b, Trans tb, GemmOperand<Out> c, acc_t<In> alpha,
                          acc_t<In> beta, std::int64_t batch = 1, GemmPrecision precision = GemmPrecision::kContext) {
  static_assert(std::is_same_v<In, Out> || (std::is_same_v<Out, float> && !std::is_same_v<In, double>),
                "gemm: the output is the input type, or float for float, bf16 and f16 inputs");
  if (m == 0 || n == 0 || batch == 0) return;
  using Alpha = acc_t<In>;
  const Alpha al = alpha, be = beta;
  const auto lda = static_cast<int>(std::max<std::int64_t>(a.ld, 1));
  const auto ldb = static_cast<int>(std::max<std::int64_t>(b.ld, 1));
  const auto ldc = static_cast<int>(std::max<std::int64_t>(c.ld, 1));
  if (batch == 1) {
    TMOE_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), cublas_op(tb), cublas_op(ta), static_cast<int>(n), static_cast<int>(m),
                                   static_cast<int>(k), &al, b.data, data_type<In>(), ldb, a.data, data_type<In>(), lda,
                                   &be, c.data, data_type<Out>(), ldc, compute_type<In>(ctx, precision),
                                   CUBLAS_GEMM_DEFAULT));
  } else {
    TMOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(ctx.cublas(), cublas_op(tb), cublas_op(ta), static_cast<int>(n),
                                                 static_cast<int>(m), static_cast<int>(k), &al, b.data, data_type<In>(),
                                                 ldb, b.batch_stride, a.data, data_type<In>(), lda, a.batch_stride, &be,
                                                 c.data, data_type<Out>(), ldc, c.batch_stride, static_cast<int>(batch),
                                                 compute_type<In>(ctx, precision), CUBLAS_GEMM_DEFAULT));
  }
}

/// Checked entry point over rank-2 device views: c = alpha * op(a) op(b) + beta * c.
template <class S>
void gemm(CudaContext& ctx, TensorView<S, Cuda> c, ConstTensorView<S, Cuda> a, Trans ta, ConstTensorView<S, Cuda> b,
          Trans tb, acc_t<S> alpha = acc_t<S>(1), acc_t<S> beta = acc_t<S>(0)) {
  const GemmExtents e = gemm_extents<S, Cuda>(c, a, ta, b, tb);
  gemm_strided_batched<S, S>(ctx, e.m, e.n, e.k, {a.data(), a.dim(1), 0}, ta, {b.data(), b.dim(1), 0}, tb,
                             {c.data(), c.dim(1), 0}, alpha, beta);
}

}  // namespace tmoe::backend::cuda
