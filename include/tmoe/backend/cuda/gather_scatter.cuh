#pragma once
/// @file gather_scatter.cuh
/// @brief Row gather and deterministic scatter-add on the device: the primitives behind MoE dispatch and combine.
///
/// gather_rows copies one row per block, in 16-byte units when the rows and pointers allow it. scatter_add_rows
/// groups the source rows by destination with a stable CUB radix sort of (destination, source position), then one
/// block per destination adds its sources in increasing position: the same order as the CPU back-end, without
/// atomics, so the result does not depend on scheduling.
///
/// Indices live on the device and are not copied back, so, unlike the CPU back-end, an index outside the
/// destination's (scatter) or source's (gather) rows cannot throw: gather writes a row of zeros for it and
/// scatter skips it. Callers own the range check.

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <string>
#include <type_traits>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe::backend::cuda {

namespace detail {

inline constexpr int kGatherThreads = 256;
inline constexpr int kScatterThreads = 128;

template <class I>
inline constexpr bool is_row_index_v = std::is_same_v<I, std::int32_t> || std::is_same_v<I, std::int64_t>;

/// out row i = src row index[i], copied in units U (the scalar, or 16 bytes when aligned); a row of zeros for an
/// index outside [0, n).
template <class U, class I>
__global__ void __launch_bounds__(kGatherThreads)
    gather_rows_kernel(U* out, const U* src, const I* index, std::int64_t r, std::int64_t units, std::int64_t n) {
  for (std::int64_t i = blockIdx.x; i < r; i += gridDim.x) {
    const auto k = static_cast<std::int64_t>(index[i]);
    U* o = out + i * units;
    if (k < 0 || k >= n) {
      for (std::int64_t u = threadIdx.x; u < units; u += blockDim.x) o[u] = U{};
      continue;
    }
    const U* s = src + k * units;
    for (std::int64_t u = threadIdx.x; u < units; u += blockDim.x) o[u] = s[u];
  }
}

/// Sort keys: the destination row, or n (sorted last, then skipped) for an index outside [0, n); values: the
/// source position.
template <class I, class P>
__global__ void __launch_bounds__(256)
    scatter_keys_kernel(P* keys, P* positions, const I* index, std::int64_t r, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < r; i += stride) {
    const auto k = static_cast<std::int64_t>(index[i]);
    keys[i] = static_cast<P>(k >= 0 && k < n ? k : n);
    positions[i] = static_cast<P>(i);
  }
}

/// With keys sorted stably, the block at the first position p of each destination d adds the source rows
/// positions[p], positions[p + 1], ... (increasing) into out row d, column by column, in acc_t<S>.
template <class S, class P>
__global__ void __launch_bounds__(kScatterThreads)
    scatter_add_sorted_kernel(S* out, const S* src, const P* keys, const P* positions, std::int64_t r,
                              std::int64_t c, P n) {
  using A = acc_t<S>;
  for (std::int64_t p = blockIdx.x; p < r; p += gridDim.x) {
    const P d = keys[p];
    if (d == n || (p > 0 && keys[p - 1] == d)) continue;
    std::int64_t end = p + 1;
    while (end < r && keys[end] == d) ++end;
    S* o = out + static_cast<std::int64_t>(d) * c;
    for (std::int64_t j = threadIdx.x; j < c; j += blockDim.x) {
      A v = static_cast<A>(o[j]);
      for (std::int64_t q = p; q < end; ++q) v += static_cast<A>(src[static_cast<std::int64_t>(positions[q]) * c + j]);
      o[j] = S(v);
    }
  }
}

template <class S, class I, class P>
void scatter_add_sorted(CudaContext& ctx, S* out, const S* src, const I* index, std::int64_t r, std::int64_t c,
                        std::int64_t n) {
  const int end_bit = static_cast<int>(std::bit_width(static_cast<std::uint64_t>(n)));
  std::size_t sort_bytes = 0;
  TMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const P*>(nullptr),
                                                  static_cast<P*>(nullptr), static_cast<const P*>(nullptr),
                                                  static_cast<P*>(nullptr), r, 0, end_bit, ctx.stream()));
  WorkspaceCarver carve;
  carve.reserve<P>(r);
  carve.reserve<P>(r);
  carve.reserve<P>(r);
  carve.reserve<P>(r);
  carve.reserve_bytes(sort_bytes);
  carve.start(ctx.workspace(carve.bytes()));
  P* keys_in = carve.take<P>(r);
  P* keys = carve.take<P>(r);
  P* positions_in = carve.take<P>(r);
  P* positions = carve.take<P>(r);
  void* sort_temp = carve.take_bytes(sort_bytes);

  scatter_keys_kernel<I, P><<<std::min(blocks_for(r, 256), static_cast<unsigned>(ctx.multiprocessors() * 16)), 256, 0,
                              ctx.stream()>>>(keys_in, positions_in, index, r, n);
  TMOE_CUDA_CHECK_LAUNCH("scatter_keys_kernel");
  TMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, keys_in, keys, positions_in, positions, r, 0,
                                                  end_bit, ctx.stream()));
  const unsigned blocks = std::min(blocks_for(r, 1), static_cast<unsigned>(ctx.multiprocessors() * 32));
  scatter_add_sorted_kernel<S, P>
      <<<blocks, kScatterThreads, 0, ctx.stream()>>>(out, src, keys, positions, r, c, static_cast<P>(n));
  TMOE_CUDA_CHECK_LAUNCH("scatter_add_sorted_kernel");
}

}  // namespace detail

/// out[i, :] = src[index[i], :] for i in [0, R), R = index.numel(), rows of src along dimension 0. @throws ShapeError
/// unless out has R times a source row's elements. Indices are not range-checked on the host (see the file comment).
template <class S, class I>
void gather_rows(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> src,
                 ConstTensorView<I, Cuda> index) {
  static_assert(is_cuda_scalar_v<S>, "gather_rows: scalars are float, double, bf16 or f16");
  static_assert(detail::is_row_index_v<I>, "gather_rows: indices are int32 or int64");
  const std::int64_t r = index.numel();
  const std::int64_t c = src.rank() == 0 ? 1 : src.shape().row_numel();
  if (out.numel() != r * c) {
    throw ShapeError("gather_rows: " + std::to_string(r) + " indices of rows of " + std::to_string(c) +
                     " elements need out of " + std::to_string(r * c) + " elements, got " + out.shape().to_string());
  }
  const std::int64_t n = src.rank() == 0 ? 1 : src.dim(0);
  if (r == 0 || c == 0) return;
  const unsigned blocks = std::min(blocks_for(r, 1), static_cast<unsigned>(ctx.multiprocessors() * 32));
  const std::size_t row_bytes = static_cast<std::size_t>(c) * sizeof(S);
  const bool wide = row_bytes % 16 == 0 && reinterpret_cast<std::uintptr_t>(out.data()) % 16 == 0 &&
                    reinterpret_cast<std::uintptr_t>(src.data()) % 16 == 0;
  if (wide) {
    detail::gather_rows_kernel<uint4, I><<<blocks, detail::kGatherThreads, 0, ctx.stream()>>>(
        reinterpret_cast<uint4*>(out.data()), reinterpret_cast<const uint4*>(src.data()), index.data(), r,
        static_cast<std::int64_t>(row_bytes / 16), n);
  } else {
    detail::gather_rows_kernel<S, I>
        <<<blocks, detail::kGatherThreads, 0, ctx.stream()>>>(out.data(), src.data(), index.data(), r, c, n);
  }
  TMOE_CUDA_CHECK_LAUNCH("gather_rows_kernel");
}

/// out[index[i], :] += src[i, :] for i in [0, R), R = index.numel(), duplicates added in increasing i (accumulated
/// in acc_t<S>, rounded once per destination element). Uses the context's workspace. @throws ShapeError unless src
/// has R times a destination row's elements. Indices are not range-checked on the host (see the file comment).
template <class S, class I>
void scatter_add_rows(CudaContext& ctx, TensorView<S, Cuda> out, ConstTensorView<S, Cuda> src,
                      ConstTensorView<I, Cuda> index) {
  static_assert(is_cuda_scalar_v<S>, "scatter_add_rows: scalars are float, double, bf16 or f16");
  static_assert(detail::is_row_index_v<I>, "scatter_add_rows: indices are int32 or int64");
  const std::int64_t r = index.numel();
  const std::int64_t c = out.rank() == 0 ? 1 : out.shape().row_numel();
  const std::int64_t n = out.rank() == 0 ? 1 : out.dim(0);
  if (src.numel() != r * c) {
    throw ShapeError("scatter_add_rows: " + std::to_string(r) + " indices of rows of " + std::to_string(c) +
                     " elements need src of " + std::to_string(r * c) + " elements, got " + src.shape().to_string());
  }
  if (r == 0 || c == 0 || n == 0) return;
  if (std::max(r, n) < std::int64_t{0xFFFFFFFF}) {
    detail::scatter_add_sorted<S, I, std::uint32_t>(ctx, out.data(), src.data(), index.data(), r, c, n);
  } else {
    detail::scatter_add_sorted<S, I, std::uint64_t>(ctx, out.data(), src.data(), index.data(), r, c, n);
  }
}

}  // namespace tmoe::backend::cuda
