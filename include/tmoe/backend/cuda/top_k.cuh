#pragma once
/// @file top_k.cuh
/// @brief Per-row top-k on the device with a compile-time K: the K largest values in descending order, ties to the
/// lower index, NaN after every number (the CPU back-end's order, so indices match it exactly).
///
/// One warp per row. Each lane keeps a sorted list of its best K (in registers; it sees its elements in increasing
/// index order), then K rounds of a CUB warp reduction pick the best list head, whose lane pops it. The order is a
/// total order on (value, index), so the result does not depend on the reduction tree. Any row length works.

#include <cub/warp/warp_reduce.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe::backend::cuda {

namespace detail {

inline constexpr int kTopKWarps = 4;  // rows per block

/// One candidate: a value and its column; index < 0 means none.
template <class A>
struct TopKCandidate {
  A value;
  std::int64_t index;
};

/// Whether (av, ai) ranks before (bv, bi): a candidate before none, a number before NaN, a larger number first,
/// then the lower index.
template <class A>
__device__ inline bool ranks_before(A av, std::int64_t ai, A bv, std::int64_t bi) {
  if (bi < 0) return ai >= 0;
  if (ai < 0) return false;
  const bool a_nan = av != av, b_nan = bv != bv;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && av != bv) return av > bv;
  return ai < bi;
}

struct TopKBest {
  template <class A>
  __device__ TopKCandidate<A> operator()(const TopKCandidate<A>& a, const TopKCandidate<A>& b) const {
    return ranks_before(a.value, a.index, b.value, b.index) ? a : b;
  }
};

template <int K, class S>
__global__ void __launch_bounds__(kTopKWarps * 32)
    top_k_rows_kernel(S* values, std::int32_t* indices, const S* in, std::int64_t rows, std::int64_t n) {
  using A = acc_t<S>;
  using C = TopKCandidate<A>;
  using WarpReduce = cub::WarpReduce<C>;
  __shared__ typename WarpReduce::TempStorage temp[kTopKWarps];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kTopKWarps + warp; row < rows;
       row += static_cast<std::int64_t>(gridDim.x) * kTopKWarps) {
    const S* x = in + row * n;
    // This lane's best K of columns lane, lane + 32, ..., sorted; a newcomer has the highest index so far, so it
    // moves up only past strictly worse entries.
    A lv[K];
    std::int64_t li[K];
#pragma unroll
    for (int p = 0; p < K; ++p) {
      lv[p] = A(0);
      li[p] = -1;
    }
    for (std::int64_t e = lane; e < n; e += 32) {
      const A v = static_cast<A>(x[e]);
      if (!ranks_before(v, e, lv[K - 1], li[K - 1])) continue;
      lv[K - 1] = v;
      li[K - 1] = e;
#pragma unroll
      for (int p = K - 1; p > 0; --p) {
        if (ranks_before(lv[p], li[p], lv[p - 1], li[p - 1])) {
          const A tv = lv[p];
          lv[p] = lv[p - 1];
          lv[p - 1] = tv;
          const std::int64_t ti = li[p];
          li[p] = li[p - 1];
          li[p - 1] = ti;
        }
      }
    }
    // K rounds: the best head over the warp is the next output; its owner (the only lane with that index) pops it.
    for (int k = 0; k < K; ++k) {
      const C best = WarpReduce(temp[warp]).Reduce(C{lv[0], li[0]}, TopKBest{});
      __syncwarp();
      const std::int64_t bi = __shfl_sync(0xffffffffu, best.index, 0);
      if (lane == 0) {
        values[row * K + k] = x[bi];
        indices[row * K + k] = static_cast<std::int32_t>(bi);
      }
      if (li[0] == bi) {
#pragma unroll
        for (int p = 0; p + 1 < K; ++p) {
          lv[p] = lv[p + 1];
          li[p] = li[p + 1];
        }
        lv[K - 1] = A(0);
        li[K - 1] = -1;
      }
    }
  }
}

}  // namespace detail

/// values/indices (rows, K) from in (rows, n), n >= K: per row the K largest values in descending order and their
/// columns, ties to the lower index, NaN never before a number. @throws ShapeError if n < K or the outputs do not
/// have rows * K elements.
template <int K, class S>
void top_k_rows(CudaContext& ctx, TensorView<S, Cuda> values, TensorView<std::int32_t, Cuda> indices,
                ConstTensorView<S, Cuda> in) {
  static_assert(K >= 1, "top_k_rows<K>: K must be at least 1.");
  static_assert(is_cuda_scalar_v<S>, "top_k_rows: scalars are float, double, bf16 or f16");
  const std::int64_t n = in.rank() == 0 ? 1 : in.dim(-1);
  const std::int64_t rows = n == 0 ? 0 : in.numel() / n;
  if (n < K) {
    throw ShapeError("top_k_rows: rows of " + std::to_string(n) + " values cannot give the top " +
                     std::to_string(K) + " (input " + in.shape().to_string() + ")");
  }
  if (values.numel() != rows * K || indices.numel() != rows * K) {
    throw ShapeError("top_k_rows: expected values and indices of " + std::to_string(rows * K) +
                     " elements for input " + in.shape().to_string() + ", got " + values.shape().to_string() +
                     " and " + indices.shape().to_string());
  }
  if (rows == 0) return;
  detail::top_k_rows_kernel<K, S><<<blocks_for(rows, detail::kTopKWarps), detail::kTopKWarps * 32, 0, ctx.stream()>>>(
      values.data(), indices.data(), in.data(), rows, n);
  TMOE_CUDA_CHECK_LAUNCH("top_k_rows_kernel");
}

}  // namespace tmoe::backend::cuda
