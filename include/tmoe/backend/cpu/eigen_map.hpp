#pragma once
/// @file eigen_map.hpp
/// @brief Private. Eigen row-major maps over raw pointers with a leading dimension: no copies, and Eigen
/// never leaks into the public API.

// In a .cu file Eigen serves only the host-side CPU back-end; without this it would annotate its own functions for the
// device, and nvcc would warn about them.
#if defined(__CUDACC__) && !defined(EIGEN_NO_CUDA)
#define EIGEN_NO_CUDA
#endif
#include <Eigen/Core>
#include <cstdint>

namespace tmoe::backend::cpu {

template <class S>
using RowMajorMatrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class S>
using MatrixMap = Eigen::Map<RowMajorMatrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class S>
using ConstMatrixMap = Eigen::Map<const RowMajorMatrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// (rows, cols) row-major block starting at `p` whose rows are `ld` elements apart.
template <class S>
MatrixMap<S> map(S* p, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  return MatrixMap<S>(p, rows, cols, Eigen::OuterStride<>(ld));
}
template <class S>
ConstMatrixMap<S> map(const S* p, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  return ConstMatrixMap<S>(p, rows, cols, Eigen::OuterStride<>(ld));
}

}  // namespace tmoe::backend::cpu
