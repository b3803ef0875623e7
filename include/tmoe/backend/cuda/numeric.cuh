#pragma once
/// @file numeric.cuh
/// @brief Scalar types on the device: the accumulation type, cuBLAS type tags and launch-size helpers.
///
/// bf16 and f16 are tmoe's own 16-bit storage types (layout-identical to __nv_bfloat16 and __half). Kernels read
/// them with `static_cast<float>` and write them with `S(float)`, the same round-to-nearest-even conversion the CPU
/// back-end uses, so both back-ends round identically.

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>
#include <type_traits>

#include "tmoe/core/bf16.hpp"
#include "tmoe/core/f16.hpp"

namespace tmoe::backend::cuda {

/// Accumulation type: double for double, float for everything else.
template <class S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <class S>
inline constexpr bool is_cuda_scalar_v =
    std::is_same_v<S, float> || std::is_same_v<S, double> || std::is_same_v<S, bf16> || std::is_same_v<S, f16>;

/// The cudaDataType of a tmoe scalar.
template <class S>
constexpr cudaDataType_t data_type() noexcept {
  static_assert(is_cuda_scalar_v<S>, "tmoe CUDA back-end: scalars are float, double, bf16 or f16");
  if constexpr (std::is_same_v<S, float>)
    return CUDA_R_32F;
  else if constexpr (std::is_same_v<S, double>)
    return CUDA_R_64F;
  else if constexpr (std::is_same_v<S, bf16>)
    return CUDA_R_16BF;
  else
    return CUDA_R_16F;
}

/// Blocks of `threads` covering `n` items, at least 1 and at most the grid's x limit.
inline unsigned blocks_for(std::int64_t n, int threads) noexcept {
  std::int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > 2147483647) b = 2147483647;
  return static_cast<unsigned>(b);
}

}  // namespace tmoe::backend::cuda
