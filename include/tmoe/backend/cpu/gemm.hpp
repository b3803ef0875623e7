#pragma once
/// @file gemm.hpp
/// @brief GEMM on row-major data through Eigen products over maps (no copies).
///
/// c (M, N) = alpha * op(a) * op(b) + beta * c, with op(x) = x or x^T. `gemm_serial` runs on the calling
/// thread and is the building block of parallel regions; `gemm` splits the output across the context's
/// threads along its larger dimension (rows when M is large, column slabs when M is small, as in decoding),
/// with a fixed partition so results depend only on the thread count.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/backend/cpu/eigen_map.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/gemm_shape.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe {

namespace backend::cpu {

/// A row-major matrix operand: pointer, stored extents and leading dimension.
template <class S>
struct MatrixRef {
  S* data;
  std::int64_t rows, cols, ld;
};

/// Rows of `c = a * b^T` (2 up to this many) computed by streaming b instead of Eigen's GEMM. Eigen packs b into
/// panels on every call and its micro-kernel wants many rows of a; with a few rows (decoding, tokens spread over
/// many experts) packing costs as much as the arithmetic while the weights stream at memory speed anyway. One row
/// goes to Eigen's GEMV, which already streams.
inline constexpr std::int64_t kStreamRows = 16;

namespace detail {

/// A cache line of S as a GCC/Clang vector: one AVX-512 register, two AVX or four SSE ones, whatever the target
/// has. Values of this type never cross a function boundary, which keeps the ABI independent of the target.
template <class S>
struct Lanes {
  static constexpr int kCount = 64 / static_cast<int>(sizeof(S));
  typedef S type __attribute__((vector_size(64)));  // NOLINT(modernize-use-using): the attribute needs typedef
};

/// c(i, j) = alpha * dot(a_i, b_j) + beta * c(i, j) for RB rows of a and FB rows of b. RB * FB vector accumulators
/// take each loaded lane of b RB times and each lane of a FB times; lanes are summed once at the end, so the
/// summation order is fixed and no fast-math is needed to vectorize.
template <int RB, int FB, class S>
inline void stream_block(S* c, std::int64_t ldc, const S* a, std::int64_t lda, const S* b, std::int64_t ldb,
                         std::int64_t k, S alpha, S beta) {
  using V = typename Lanes<S>::type;
  constexpr int L = Lanes<S>::kCount;
  V acc[RB][FB];
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < FB; ++j) acc[i][j] = V{};
  }
  std::int64_t p = 0;
  for (; p + L <= k; p += L) {
    V bv[FB];
    for (int j = 0; j < FB; ++j) std::memcpy(&bv[j], b + j * ldb + p, sizeof(V));
    for (int i = 0; i < RB; ++i) {
      V av;
      std::memcpy(&av, a + i * lda + p, sizeof(V));
      for (int j = 0; j < FB; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < FB; ++j) {
      S sum = 0;
      for (int l = 0; l < L; ++l) sum += acc[i][j][l];
      const S* at = a + i * lda + p;
      const S* bt = b + j * ldb + p;
      for (std::int64_t q = 0, tail = k - p; q < tail; ++q) sum += at[q] * bt[q];
      S& dst = c[i * ldc + j];
      dst = beta == S(0) ? alpha * sum : alpha * sum + beta * dst;
    }
  }
}

/// Rows [i, i + RB) of a against every row of b, four rows of b at a time (RB x 4 accumulators: each loaded lane
/// of a feeds four FMAs and each lane of b feeds RB).
template <int RB, class S>
void stream_rows(MatrixRef<S> c, MatrixRef<const S> a, MatrixRef<const S> b, std::int64_t i, S alpha, S beta) {
  std::int64_t j = 0;
  for (; j + 4 <= b.rows; j += 4) {
    stream_block<RB, 4>(c.data + i * c.ld + j, c.ld, a.data + i * a.ld, a.ld, b.data + j * b.ld, b.ld, a.cols, alpha,
                        beta);
  }
  for (; j + 2 <= b.rows; j += 2) {
    stream_block<RB, 2>(c.data + i * c.ld + j, c.ld, a.data + i * a.ld, a.ld, b.data + j * b.ld, b.ld, a.cols, alpha,
                        beta);
  }
  if (j < b.rows) {
    stream_block<RB, 1>(c.data + i * c.ld + j, c.ld, a.data + i * a.ld, a.ld, b.data + j * b.ld, b.ld, a.cols, alpha,
                        beta);
  }
}

/// c (m, n) = alpha * a (m, k) b (n, k)^T + beta * c for small m, without packing. b is walked in tiles of 32 rows
/// that stay in L1/L2 while every block of 4 rows of a passes over them, so b is read from memory once.
template <class S>
void gemm_stream_abt(MatrixRef<S> c, MatrixRef<const S> a, MatrixRef<const S> b, S alpha, S beta) {
  constexpr std::int64_t kTile = 32;
  for (std::int64_t j0 = 0; j0 < b.rows; j0 += kTile) {
    const std::int64_t nt = std::min(b.rows - j0, kTile);
    const MatrixRef<S> ct{c.data + j0, c.rows, nt, c.ld};
    const MatrixRef<const S> bt{b.data + j0 * b.ld, nt, b.cols, b.ld};
    std::int64_t i = 0;
    for (; i + 4 <= c.rows; i += 4) stream_rows<4>(ct, a, bt, i, alpha, beta);
    switch (c.rows - i) {  // the remainder's block height is a compile-time constant too
      case 3: stream_rows<3>(ct, a, bt, i, alpha, beta); break;
      case 2: stream_rows<2>(ct, a, bt, i, alpha, beta); break;
      case 1: stream_rows<1>(ct, a, bt, i, alpha, beta); break;
      default: break;
    }
  }
}

}  // namespace detail

/// c = alpha * op(a) op(b) + beta * c on the calling thread. Shapes are trusted.
template <class S>
void gemm_serial(MatrixRef<S> c, MatrixRef<const S> a, Trans ta, MatrixRef<const S> b, Trans tb, S alpha,
                 S beta) {
  if (c.rows == 0 || c.cols == 0) return;
  auto C = map(c.data, c.rows, c.cols, c.ld);
  const std::int64_t k = ta == Trans::kN ? a.cols : a.rows;
  if (k == 0) {
    if (beta == S(0)) C.setZero();
    else if (beta != S(1)) C *= beta;
    return;
  }
  if (ta == Trans::kN && tb == Trans::kT && c.rows > 1 && c.rows <= kStreamRows) {
    detail::gemm_stream_abt(c, a, b, alpha, beta);
    return;
  }
  auto A = map(a.data, a.rows, a.cols, a.ld);
  auto B = map(b.data, b.rows, b.cols, b.ld);
  auto run = [&](const auto& opa, const auto& opb) {
    if (beta == S(0)) {
      C.noalias() = (alpha * opa) * opb;
    } else {
      if (beta != S(1)) C *= beta;
      C.noalias() += (alpha * opa) * opb;
    }
  };
  if (ta == Trans::kN && tb == Trans::kN) run(A, B);
  else if (ta == Trans::kN) run(A, B.transpose());
  else if (tb == Trans::kN) run(A.transpose(), B);
  else run(A.transpose(), B.transpose());
}

/// Row block [r0, r1) of op(x) as a MatrixRef.
template <class S>
MatrixRef<S> op_rows(MatrixRef<S> x, Trans t, std::int64_t r0, std::int64_t r1) {
  if (t == Trans::kN) return {x.data + r0 * x.ld, r1 - r0, x.cols, x.ld};
  return {x.data + r0, x.rows, r1 - r0, x.ld};  // rows of x^T are columns of x
}
/// Column block [c0, c1) of op(x) as a MatrixRef.
template <class S>
MatrixRef<S> op_cols(MatrixRef<S> x, Trans t, std::int64_t c0, std::int64_t c1) {
  if (t == Trans::kN) return {x.data + c0, x.rows, c1 - c0, x.ld};
  return {x.data + c0 * x.ld, c1 - c0, x.cols, x.ld};
}

/// c = alpha * op(a) op(b) + beta * c, split over the context's threads.
template <class S>
void gemm_parallel(CpuContext& ctx, MatrixRef<S> c, MatrixRef<const S> a, Trans ta, MatrixRef<const S> b, Trans tb,
                   S alpha, S beta) {
  const std::int64_t m = c.rows, n = c.cols;
  const std::int64_t k = ta == Trans::kN ? a.cols : a.rows;
  constexpr std::int64_t kMinParallelWork = 1 << 16;  // below this, a fork costs more than it saves
  if (ctx.threads() == 1 || m * n * std::max<std::int64_t>(k, 1) <= kMinParallelWork) {
    gemm_serial(c, a, ta, b, tb, alpha, beta);
    return;
  }
  if (m >= n || m >= 4 * ctx.threads() * 16) {
    ctx.parallel_range(m, 16, [&](std::int64_t r0, std::int64_t r1) {
      gemm_serial(MatrixRef<S>{c.data + r0 * c.ld, r1 - r0, n, c.ld}, op_rows(a, ta, r0, r1), ta, b, tb, alpha,
                  beta);
    });
  } else {
    ctx.parallel_range(n, 16, [&](std::int64_t c0, std::int64_t c1) {
      gemm_serial(MatrixRef<S>{c.data + c0, m, c1 - c0, c.ld}, a, ta, op_cols(b, tb, c0, c1), tb, alpha, beta);
    });
  }
}

/// Checked entry point over rank-2 views.
template <class S>
void gemm(CpuContext& ctx, TensorView<S, Cpu> c, ConstTensorView<S, Cpu> a, Trans ta, ConstTensorView<S, Cpu> b,
          Trans tb, S alpha = S(1), S beta = S(0)) {
  const GemmExtents e = gemm_extents<S, Cpu>(c, a, ta, b, tb);
  gemm_parallel<S>(ctx, {c.data(), e.m, e.n, e.n}, {a.data(), a.dim(0), a.dim(1), a.dim(1)}, ta,
                   {b.data(), b.dim(0), b.dim(1), b.dim(1)}, tb, alpha, beta);
}

}  // namespace backend::cpu
}  // namespace tmoe
