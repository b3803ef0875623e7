#pragma once
/// @file gemm_shape.hpp
/// @brief Trans and the shape check every back-end's GEMM entry point shares.

#include <cstdint>
#include <string>

#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe {

/// Whether a GEMM operand is used as stored or transposed.
enum class Trans { kN, kT };

/// Extents of c (m, n) = op(a) (m, k) op(b) (k, n).
struct GemmExtents {
  std::int64_t m = 0, n = 0, k = 0;
};

/// Checks rank-2 operands with matching extents. @throws ShapeError naming every extent otherwise.
template <class S, DeviceTag D>
GemmExtents gemm_extents(const TensorView<S, D>& c, const TensorView<const S, D>& a, Trans ta,
                         const TensorView<const S, D>& b, Trans tb) {
  if (a.rank() != 2 || b.rank() != 2 || c.rank() != 2) {
    throw ShapeError("gemm: expected rank-2 operands, got a " + a.shape().to_string() + ", b " + b.shape().to_string() +
                     ", c " + c.shape().to_string());
  }
  const std::int64_t m = ta == Trans::kN ? a.dim(0) : a.dim(1);
  const std::int64_t ka = ta == Trans::kN ? a.dim(1) : a.dim(0);
  const std::int64_t kb = tb == Trans::kN ? b.dim(0) : b.dim(1);
  const std::int64_t n = tb == Trans::kN ? b.dim(1) : b.dim(0);
  if (ka != kb || c.dim(0) != m || c.dim(1) != n) {
    throw ShapeError("gemm: op(a) is [" + std::to_string(m) + ", " + std::to_string(ka) + "] and op(b) is [" +
                     std::to_string(kb) + ", " + std::to_string(n) + "], so c must be [" + std::to_string(m) + ", " +
                     std::to_string(n) + "] with equal inner extents; got c " + c.shape().to_string());
  }
  return {m, n, ka};
}

}  // namespace tmoe
