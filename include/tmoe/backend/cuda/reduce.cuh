#pragma once
/// @file reduce.cuh
/// @brief Row and column reductions on the device: softmax and layer norm (forward and backward) over the last
/// dimension, and the column sums behind the bias and layer-norm parameter gradients.
///
/// Row ops give each row to one warp (rows of up to 1024 elements, four rows per block) or to one block of 256
/// threads (longer rows). Each thread walks its columns in a fixed stride and the partial results meet in a CUB warp
/// or block reduction, so a result depends only on the shape, never on scheduling. Column sums split the rows into
/// chunks whose size depends only on the row count: a first kernel sums each chunk's rows in order for a tile of
/// columns, a second adds the chunk sums in chunk order. No floating-point atomics anywhere.

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe::backend::cuda {

namespace detail {

/// Rows up to this length get one warp each; longer rows one block of kRowBlockThreads.
inline constexpr std::int64_t kWarpRowMax = 1024;
inline constexpr int kRowBlockThreads = 256;
inline constexpr int kWarpRowsPerBlock = 4;

/// How kThreads threads share a row: a warp (kThreads == 32, kWarpRowsPerBlock rows per block) or a whole block.
template <int kThreads>
struct RowLayout {
  static_assert(kThreads % 32 == 0, "RowLayout: rows are shared by whole warps");
  static constexpr int kRowsPerBlock = kThreads == 32 ? kWarpRowsPerBlock : 1;
  static constexpr int kBlockThreads = kThreads * kRowsPerBlock;
  __device__ static int slot() { return static_cast<int>(threadIdx.x) / kThreads; }
  __device__ static int lane() { return static_cast<int>(threadIdx.x) % kThreads; }
  __device__ static std::int64_t first_row() {
    return static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + slot();
  }
  __device__ static std::int64_t row_stride() { return static_cast<std::int64_t>(gridDim.x) * kRowsPerBlock; }
};

struct MaxOp {
  template <class A>
  __device__ A operator()(A a, A b) const {
    return b > a ? b : a;
  }
};

/// All-reduce over the kThreads threads of one row: every one of them gets the result. Temp storage may be reused
/// right after a call returns.
template <class A, int kThreads>
struct RowReduce {
  using WarpReduce = cub::WarpReduce<A>;
  using BlockReduce = cub::BlockReduce<A, kThreads>;
  static constexpr bool kWarp = kThreads == 32;
  struct TempStorage {
    typename std::conditional_t<kWarp, WarpReduce, BlockReduce>::TempStorage reduce;
    A result;
  };

  __device__ static A sum(TempStorage& t, A v) {
    if constexpr (kWarp) {
      const A r = WarpReduce(t.reduce).Sum(v);
      __syncwarp();
      return __shfl_sync(0xffffffffu, r, 0);
    } else {
      const A r = BlockReduce(t.reduce).Sum(v);
      return broadcast(t, r);
    }
  }
  __device__ static A max(TempStorage& t, A v) {
    if constexpr (kWarp) {
      const A r = WarpReduce(t.reduce).Reduce(v, MaxOp{});
      __syncwarp();
      return __shfl_sync(0xffffffffu, r, 0);
    } else {
      const A r = BlockReduce(t.reduce).Reduce(v, MaxOp{});
      return broadcast(t, r);
    }
  }

 private:
  __device__ static A broadcast(TempStorage& t, A r) {
    if (threadIdx.x == 0) t.result = r;
    __syncthreads();
    const A out = t.result;
    __syncthreads();
    return out;
  }
};

template <class A>
__device__ inline A device_exp(A x) {
  return std::exp(x);
}

/// a * b rounded on its own: never fused into a following add, so a product and its row mean use the same value.
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <class S, int kThreads>
__global__ void __launch_bounds__(RowLayout<kThreads>::kBlockThreads)
    softmax_rows_kernel(S* out, const S* in, std::int64_t rows, std::int64_t cols) {
  using A = acc_t<S>;
  using L = RowLayout<kThreads>;
  using R = RowReduce<A, kThreads>;
  __shared__ typename R::TempStorage temp[L::kRowsPerBlock];
  typename R::TempStorage& t = temp[L::slot()];
  for (std::int64_t row = L::first_row(); row < rows; row += L::row_stride()) {
    const S* x = in + row * cols;
    S* y = out + row * cols;
    A mx = -std::numeric_limits<A>::infinity();
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) {
      const A v = static_cast<A>(x[j]);
      mx = v > mx ? v : mx;
    }
    mx = R::max(t, mx);
    A sum = 0;
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) sum += device_exp(static_cast<A>(x[j]) - mx);
    sum = R::sum(t, sum);
    const A inv = A(1) / sum;
    // Each thread reads x[j] before it writes y[j] for the same j, so out may alias in.
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) y[j] = S(device_exp(static_cast<A>(x[j]) - mx) * inv);
  }
}

template <class S, int kThreads>
__global__ void __launch_bounds__(RowLayout<kThreads>::kBlockThreads)
    layernorm_forward_kernel(S* out, S* mean, S* rstd, const S* in, const S* gamma, const S* beta, acc_t<S> eps,
                             std::int64_t rows, std::int64_t cols) {
  using A = acc_t<S>;
  using L = RowLayout<kThreads>;
  using R = RowReduce<A, kThreads>;
  __shared__ typename R::TempStorage temp[L::kRowsPerBlock];
  typename R::TempStorage& t = temp[L::slot()];
  const A inv_c = A(1) / static_cast<A>(cols);
  for (std::int64_t row = L::first_row(); row < rows; row += L::row_stride()) {
    const S* x = in + row * cols;
    S* y = out + row * cols;
    A m = 0;
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) m += static_cast<A>(x[j]);
    m = R::sum(t, m) * inv_c;
    A v = 0;
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) {
      const A d = static_cast<A>(x[j]) - m;
      v += d * d;
    }
    v = R::sum(t, v) * inv_c;
    const A rs = A(1) / std::sqrt(v + eps);
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) {
      y[j] = S((static_cast<A>(x[j]) - m) * rs * static_cast<A>(gamma[j]) + static_cast<A>(beta[j]));
    }
    if (L::lane() == 0) {
      mean[row] = S(m);
      rstd[row] = S(rs);
    }
  }
}

template <class S, int kThreads>
__global__ void __launch_bounds__(RowLayout<kThreads>::kBlockThreads)
    softmax_backward_rows_kernel(S* din, const S* dout, const S* y, std::int64_t rows, std::int64_t cols) {
  using A = acc_t<S>;
  using L = RowLayout<kThreads>;
  using R = RowReduce<A, kThreads>;
  __shared__ typename R::TempStorage temp[L::kRowsPerBlock];
  typename R::TempStorage& t = temp[L::slot()];
  for (std::int64_t row = L::first_row(); row < rows; row += L::row_stride()) {
    const S* p = y + row * cols;
    const S* g = dout + row * cols;
    S* d = din + row * cols;
    A dot = 0;
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) dot += static_cast<A>(g[j]) * static_cast<A>(p[j]);
    dot = R::sum(t, dot);
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) {
      d[j] = S(static_cast<A>(p[j]) * (static_cast<A>(g[j]) - dot));
    }
  }
}

/// din per row; dgamma and dbeta come from the column kernels below.
template <class S, int kThreads>
__global__ void __launch_bounds__(RowLayout<kThreads>::kBlockThreads)
    layernorm_backward_rows_kernel(S* din, const S* dout, const S* in, const S* mean, const S* rstd, const S* gamma,
                                   std::int64_t rows, std::int64_t cols) {
  using A = acc_t<S>;
  using L = RowLayout<kThreads>;
  using R = RowReduce<A, kThreads>;
  __shared__ typename R::TempStorage temp[L::kRowsPerBlock];
  typename R::TempStorage& t = temp[L::slot()];
  const A inv_c = A(1) / static_cast<A>(cols);
  for (std::int64_t row = L::first_row(); row < rows; row += L::row_stride()) {
    const S* x = in + row * cols;
    const S* g = dout + row * cols;
    S* d = din + row * cols;
    const A m = static_cast<A>(mean[row]), rs = static_cast<A>(rstd[row]);
    A mean_g = 0, mean_gx = 0;
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) {
      const A gj = mul_rn(static_cast<A>(g[j]), static_cast<A>(gamma[j]));
      mean_g += gj;
      mean_gx += gj * (static_cast<A>(x[j]) - m) * rs;
    }
    mean_g = R::sum(t, mean_g) * inv_c;
    mean_gx = R::sum(t, mean_gx) * inv_c;
    for (std::int64_t j = L::lane(); j < cols; j += kThreads) {
      const A xhat = (static_cast<A>(x[j]) - m) * rs;
      d[j] = S(rs * (mul_rn(static_cast<A>(g[j]), static_cast<A>(gamma[j])) - mean_g - xhat * mean_gx));
    }
  }
}

/// Runs f(std::integral_constant<int, threads per row>) for the row layout that suits rows of `cols`.
template <class F>
void with_row_threads(std::int64_t cols, F&& f) {
  if (cols <= kWarpRowMax) f(std::integral_constant<int, 32>{});
  else f(std::integral_constant<int, kRowBlockThreads>{});
}

template <int kThreads>
unsigned row_blocks(std::int64_t rows) noexcept {
  return blocks_for(rows, RowLayout<kThreads>::kRowsPerBlock);
}

// ---- column sums --------------------------------------------------------------------------------------------------

inline constexpr int kColTile = 32;       // columns per block (threadIdx.x)
inline constexpr int kColRowThreads = 8;  // row lanes per block (threadIdx.y)
inline constexpr std::int64_t kMinChunkRows = 64;
inline constexpr std::int64_t kMaxChunks = 256;

/// Rows per chunk of a column sum over `rows` rows: a function of the row count only.
inline std::int64_t chunk_rows(std::int64_t rows) noexcept {
  return std::max(kMinChunkRows, (rows + kMaxChunks - 1) / kMaxChunks);
}

/// The kN destinations of a column sum (out[k][j] += total[k][j]).
template <class S, int kN>
struct ColumnOutputs {
  S* p[kN];
};

/// Column term of row_sum_accumulate: the element itself.
template <class S>
struct RowSumTerm {
  static constexpr int kN = 1;
  const S* in;
  std::int64_t cols;
  __device__ void operator()(std::int64_t r, std::int64_t j, acc_t<S> (&v)[kN]) const {
    v[0] = static_cast<acc_t<S>>(in[r * cols + j]);
  }
};

/// Column terms of the layer-norm parameter gradients: dout * xhat (dgamma) and dout (dbeta).
template <class S>
struct LayerNormParamTerm {
  static constexpr int kN = 2;
  const S* dout;
  const S* in;
  const S* mean;
  const S* rstd;
  std::int64_t cols;
  __device__ void operator()(std::int64_t r, std::int64_t j, acc_t<S> (&v)[kN]) const {
    using A = acc_t<S>;
    const A g = static_cast<A>(dout[r * cols + j]);
    v[0] = g * (static_cast<A>(in[r * cols + j]) - static_cast<A>(mean[r])) * static_cast<A>(rstd[r]);
    v[1] = g;
  }
};

/// Block (kColTile, kColRowThreads) sums rows [chunk * chunk_rows, ...) of a tile of columns: row lane y takes rows
/// y, y + kColRowThreads, ... in order, then lane 0 adds the lanes' sums in lane order. With one chunk the sum goes
/// straight into out; otherwise into partial[k][chunk][j].
template <class S, class Term>
__global__ void __launch_bounds__(kColTile* kColRowThreads)
    column_sum_kernel(Term term, std::int64_t rows, std::int64_t cols, std::int64_t rows_per_chunk,
                      acc_t<S>* partial, ColumnOutputs<S, Term::kN> outs) {
  using A = acc_t<S>;
  constexpr int kN = Term::kN;
  __shared__ A lanes[kN][kColRowThreads][kColTile + 1];
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A acc[kN];
  for (int k = 0; k < kN; ++k) acc[k] = A(0);
  if (j < cols) {
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += kColRowThreads) {
      A v[kN];
      term(r, j, v);
      for (int k = 0; k < kN; ++k) acc[k] += v[k];
    }
  }
  for (int k = 0; k < kN; ++k) lanes[k][threadIdx.y][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y != 0 || j >= cols) return;
  for (int k = 0; k < kN; ++k) {
    A s = lanes[k][0][threadIdx.x];
    for (int y = 1; y < kColRowThreads; ++y) s += lanes[k][y][threadIdx.x];
    if (partial != nullptr) {
      partial[(static_cast<std::int64_t>(k) * gridDim.y + blockIdx.y) * cols + j] = s;
    } else {
      outs.p[k][j] = S(static_cast<A>(outs.p[k][j]) + s);
    }
  }
}

/// out[k][j] += sum over chunks c, in order, of partial[k][c][j].
template <class S, int kN>
__global__ void __launch_bounds__(256)
    column_sum_finish_kernel(const acc_t<S>* partial, std::int64_t chunks, std::int64_t cols,
                             ColumnOutputs<S, kN> outs) {
  using A = acc_t<S>;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += stride) {
    for (int k = 0; k < kN; ++k) {
      const A* p = partial + static_cast<std::int64_t>(k) * chunks * cols + j;
      A s = p[0];
      for (std::int64_t c = 1; c < chunks; ++c) s += p[c * cols];
      outs.p[k][j] = S(static_cast<A>(outs.p[k][j]) + s);
    }
  }
}

/// outs[k][j] += sum over r in [0, rows) of term(r, j)[k], deterministically (see the file comment).
template <class S, class Term>
void column_sums(CudaContext& ctx, const Term& term, std::int64_t rows, std::int64_t cols,
                 ColumnOutputs<S, Term::kN> outs) {
  using A = acc_t<S>;
  constexpr int kN = Term::kN;
  if (rows == 0 || cols == 0) return;
  const std::int64_t per_chunk = chunk_rows(rows);
  const std::int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  A* partial = nullptr;
  if (chunks > 1) {
    WorkspaceCarver carve;
    carve.reserve<A>(kN * chunks * cols);
    carve.start(ctx.workspace(carve.bytes()));
    partial = carve.take<A>(kN * chunks * cols);
  }
  const dim3 block(kColTile, kColRowThreads);
  const dim3 grid(blocks_for(cols, kColTile), static_cast<unsigned>(chunks));
  column_sum_kernel<S, Term><<<grid, block, 0, ctx.stream()>>>(term, rows, cols, per_chunk, partial, outs);
  TMOE_CUDA_CHECK_LAUNCH("column_sum_kernel");
  if (chunks > 1) {
    column_sum_finish_kernel<S, kN><<<blocks_for(cols, 256), 256, 0, ctx.stream()>>>(partial, chunks, cols, outs);
    TMOE_CUDA_CHECK_LAUNCH("column_sum_finish_kernel");
  }
}

/// Rows of `x` viewed as (rows, last dim).
template <class T, class D>
std::int64_t last_dim(const TensorView<T, D>& x) {
  return x.rank() == 0 ? 1 : x.dim(-1);
}

}  // namespace detail

/// out[r, :] = softmax(in[r, :]) over the last dimension, max-subtracted, accumulated in acc_t<S>. `out` may alias
/// `in`. @throws ShapeError unless out and in have the same shape.
template <class S>
void softmax_rows(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> in) {
  static_assert(is_cuda_scalar_v<S>, "softmax_rows: scalars are float, double, bf16 or f16");
  if (!(out.shape() == in.shape())) {
    throw ShapeError("softmax_rows: out " + out.shape().to_string() + " must match in " + in.shape().to_string());
  }
  const std::int64_t cols = detail::last_dim(in);
  const std::int64_t rows = cols == 0 ? 0 : in.numel() / cols;
  if (rows == 0) return;
  detail::with_row_threads(cols, [&](auto threads) {
    constexpr int kT = decltype(threads)::value;
    detail::softmax_rows_kernel<S, kT>
        <<<detail::row_blocks<kT>(rows), detail::RowLayout<kT>::kBlockThreads, 0, ctx.stream()>>>(
            out.data(), in.data(), rows, cols);
    TMOE_CUDA_CHECK_LAUNCH("softmax_rows_kernel");
  });
}

/// out = (in - mean) * rstd * gamma + beta over the last dimension (C); writes mean and rstd per row (rounded to S)
/// for backward. `out` may alias `in`. @throws ShapeError on the CPU back-end's conditions: out shaped like in,
/// gamma and beta of C elements, mean and rstd of one per row.
template <class S>
void layernorm_forward(CudaContext& ctx, TensorView<S, Cuda> out, TensorView<S, Cuda> mean, TensorView<S, Cuda> rstd,
                       ConstTensorView<S, Cuda> in, ConstTensorView<S, Cuda> gamma, ConstTensorView<S, Cuda> beta,
                       acc_t<S> eps) {
  static_assert(is_cuda_scalar_v<S>, "layernorm_forward: scalars are float, double, bf16 or f16");
  const std::int64_t c = detail::last_dim(in);
  const std::int64_t rows = c == 0 ? 0 : in.numel() / c;
  if (!(out.shape() == in.shape()) || gamma.numel() != c || beta.numel() != c || mean.numel() != rows ||
      rstd.numel() != rows) {
    throw ShapeError("layernorm_forward: for in " + in.shape().to_string() + " expected out of the same shape, " +
                     "gamma and beta of " + std::to_string(c) + " and mean/rstd of " + std::to_string(rows) +
                     " elements; got out " + out.shape().to_string() + ", gamma " + gamma.shape().to_string() +
                     ", beta " + beta.shape().to_string() + ", mean " + mean.shape().to_string() + ", rstd " +
                     rstd.shape().to_string());
  }
  if (rows == 0) return;
  detail::with_row_threads(c, [&](auto threads) {
    constexpr int kT = decltype(threads)::value;
    detail::layernorm_forward_kernel<S, kT>
        <<<detail::row_blocks<kT>(rows), detail::RowLayout<kT>::kBlockThreads, 0, ctx.stream()>>>(
            out.data(), mean.data(), rstd.data(), in.data(), gamma.data(), beta.data(), eps, rows, c);
    TMOE_CUDA_CHECK_LAUNCH("layernorm_forward_kernel");
  });
}

/// din[r, :] = y[r, :] * (dout[r, :] - <dout[r, :], y[r, :]>): the gradient through a row softmax with output y.
/// `din` may alias `dout`. @throws ShapeError unless din, dout and y have the same shape.
template <class S>
void softmax_backward_rows(CudaContext& ctx, TensorView<S, Cuda> din, ConstTensorView<S, Cuda> dout,
                           ConstTensorView<S, Cuda> y) {
  static_assert(is_cuda_scalar_v<S>, "softmax_backward_rows: scalars are float, double, bf16 or f16");
  if (!(din.shape() == y.shape()) || !(dout.shape() == y.shape())) {
    throw ShapeError("softmax_backward_rows: din " + din.shape().to_string() + " and dout " +
                     dout.shape().to_string() + " must match y " + y.shape().to_string());
  }
  const std::int64_t cols = detail::last_dim(y);
  const std::int64_t rows = cols == 0 ? 0 : y.numel() / cols;
  if (rows == 0) return;
  detail::with_row_threads(cols, [&](auto threads) {
    constexpr int kT = decltype(threads)::value;
    detail::softmax_backward_rows_kernel<S, kT>
        <<<detail::row_blocks<kT>(rows), detail::RowLayout<kT>::kBlockThreads, 0, ctx.stream()>>>(
            din.data(), dout.data(), y.data(), rows, cols);
    TMOE_CUDA_CHECK_LAUNCH("softmax_backward_rows_kernel");
  });
}

/// Layer-norm backward over the last dimension (C), given forward's input, mean and rstd:
///   din = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)) with g = dout * gamma     (overwritten)
///   dgamma += sum over rows of dout * xhat,  dbeta += sum over rows of dout            (accumulated)
/// The parameter gradients are queued first, so `din` may alias `dout`. @throws ShapeError on the CPU back-end's
/// conditions.
template <class S>
void layernorm_backward(CudaContext& ctx, TensorView<S, Cuda> din, TensorView<S, Cuda> dgamma,
                        TensorView<S, Cuda> dbeta, ConstTensorView<S, Cuda> dout, ConstTensorView<S, Cuda> in,
                        ConstTensorView<S, Cuda> mean, ConstTensorView<S, Cuda> rstd, ConstTensorView<S, Cuda> gamma) {
  static_assert(is_cuda_scalar_v<S>, "layernorm_backward: scalars are float, double, bf16 or f16");
  const std::int64_t c = detail::last_dim(in);
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
  if (rows == 0) return;
  const detail::LayerNormParamTerm<S> term{dout.data(), in.data(), mean.data(), rstd.data(), c};
  detail::column_sums<S>(ctx, term, rows, c, detail::ColumnOutputs<S, 2>{{dgamma.data(), dbeta.data()}});
  detail::with_row_threads(c, [&](auto threads) {
    constexpr int kT = decltype(threads)::value;
    detail::layernorm_backward_rows_kernel<S, kT>
        <<<detail::row_blocks<kT>(rows), detail::RowLayout<kT>::kBlockThreads, 0, ctx.stream()>>>(
            din.data(), dout.data(), in.data(), mean.data(), rstd.data(), gamma.data(), rows, c);
    TMOE_CUDA_CHECK_LAUNCH("layernorm_backward_rows_kernel");
  });
}

/// out[j] += sum_r in[r, j] over the rows of in viewed as (rows, n), n = out.numel(): a bias gradient, summed in a
/// fixed order. @throws ShapeError unless in's last dimension is n.
template <class S>
void row_sum_accumulate(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> in) {
  static_assert(is_cuda_scalar_v<S>, "row_sum_accumulate: scalars are float, double, bf16 or f16");
  const std::int64_t n = out.numel();
  if (in.rank() == 0 || detail::last_dim(in) != n) {
    throw ShapeError("row_sum_accumulate: in " + in.shape().to_string() + " must have last dim " +
                     std::to_string(n) + " (out " + out.shape().to_string() + ")");
  }
  const std::int64_t rows = n == 0 ? 0 : in.numel() / n;
  detail::column_sums<S>(ctx, detail::RowSumTerm<S>{in.data(), n}, rows, n,
                         detail::ColumnOutputs<S, 1>{{out.data()}});
}

}  // namespace tmoe::backend::cuda
