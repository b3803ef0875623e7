#pragma once
/// @file gather_scatter.hpp
/// @brief Row gather and scatter-add: the primitives behind MoE dispatch and combine.

#include <cstdint>
#include <cstring>
#include <string>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe::backend::cpu {

/// out[i, :] = src[index[i], :] for i in [0, r), rows of c elements, split over the threads. Trusted: every index is
/// a row of src (the MoE layer's dispatch, whose plan holds valid rows by construction, calls it directly).
template <class S, class I>
void gather_rows(CpuContext& ctx, S* out, const S* src, const I* index, std::int64_t r, std::int64_t c) {
  ctx.parallel_range(r, 32, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      std::memcpy(out + i * c, src + static_cast<std::int64_t>(index[i]) * c, static_cast<std::size_t>(c) * sizeof(S));
    }
  });
}

/// out[r, :] = src[index[r], :] for r in [0, R). Every index must be in [0, rows of src).
template <class S, class I>
void gather_rows(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> src, ConstTensorView<I, Cpu> index) {
  const std::int64_t r = index.numel();
  const std::int64_t c = src.rank() == 0 ? 1 : src.shape().row_numel();
  if (out.numel() != r * c) {
    throw ShapeError("gather_rows: " + std::to_string(r) + " indices of rows of " + std::to_string(c) +
                     " elements need out of " + std::to_string(r * c) + " elements, got " + out.shape().to_string());
  }
  const std::int64_t n = src.rank() == 0 ? 1 : src.dim(0);
  for (std::int64_t i = 0; i < r; ++i) {
    const auto j = static_cast<std::int64_t>(index.data()[i]);
    if (j < 0 || j >= n) {
      throw ShapeError("gather_rows: index[" + std::to_string(i) + "] = " + std::to_string(j) +
                       " out of range [0, " + std::to_string(n) + ")");
    }
  }
  gather_rows<S, I>(ctx, out.data(), src.data(), index.data(), r, c);
}

/// out[index[r], :] += src[r, :], in increasing r, on one thread per destination range so the summation
/// order is fixed. Every index must be in [0, rows of out).
template <class S, class I>
void scatter_add_rows(CpuContext& ctx, TensorView<S, Cpu> out, ConstTensorView<S, Cpu> src,
                      ConstTensorView<I, Cpu> index) {
  const std::int64_t r = index.numel();
  const std::int64_t c = out.rank() == 0 ? 1 : out.shape().row_numel();
  const std::int64_t n = out.rank() == 0 ? 1 : out.dim(0);
  if (src.numel() != r * c) {
    throw ShapeError("scatter_add_rows: " + std::to_string(r) + " indices of rows of " + std::to_string(c) +
                     " elements need src of " + std::to_string(r * c) + " elements, got " + src.shape().to_string());
  }
  for (std::int64_t i = 0; i < r; ++i) {
    const auto j = static_cast<std::int64_t>(index.data()[i]);
    if (j < 0 || j >= n) {
      throw ShapeError("scatter_add_rows: index[" + std::to_string(i) + "] = " + std::to_string(j) +
                       " out of range [0, " + std::to_string(n) + ")");
    }
  }
  // Each thread owns a column slab, so every destination element is summed in index order on one thread.
  ctx.parallel_range(c, 16, [&](std::int64_t c0, std::int64_t c1) {
    for (std::int64_t i = 0; i < r; ++i) {
      S* dst = out.data() + static_cast<std::int64_t>(index.data()[i]) * c;
      const S* s = src.data() + i * c;
      for (std::int64_t j = c0; j < c1; ++j) dst[j] += s[j];
    }
  });
}

}  // namespace tmoe::backend::cpu
