#pragma once
/// @file moe_dispatch.cuh
/// @brief Moving rows for the MoE layer on the GPU: gate rows per granularity, the task path's plan, the expert
/// activation, and the combine (a fixed summation order, no atomics). The gather into expert rows is Ops<Cuda>'s
/// gather_rows (gather_scatter.cuh), which writes zeros for the index -1 of an empty row.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/numeric.cuh"

namespace tmoe::backend::cuda::moe_kernels {

/// Token routing: gate_row[n] = n, or -1 where segment_ids[n] == 0 (padding). segment_ids may be null.
static __global__ void token_gate_rows_kernel(const std::int32_t* __restrict__ segment_ids, std::int64_t n_tokens,
                                              std::int32_t* __restrict__ gate_row) {
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tokens) return;
  gate_row[n] = (segment_ids == nullptr || segment_ids[n] != 0) ? static_cast<std::int32_t>(n) : -1;
}

/// Sentence routing, step 1: a token starts a sequence iff it is valid and no earlier token of its row carries its
/// segment id. first[n] = column of the first token of n's sequence (or -1 for padding).
static __global__ void sentence_firsts_kernel(const std::int32_t* __restrict__ segment_ids, std::int64_t n_tokens,
                                              std::int64_t columns, std::int32_t* __restrict__ starts,
                                              std::int32_t* __restrict__ first) {
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tokens) return;
  const std::int64_t row0 = n / columns * columns;
  const std::int32_t seg = segment_ids == nullptr ? 1 : segment_ids[n];
  if (seg == 0) {
    starts[n] = 0;
    first[n] = -1;
    return;
  }
  std::int64_t f = n - row0;
  if (segment_ids != nullptr) {
    for (std::int64_t t = row0; t < n; ++t) {
      if (segment_ids[t] == seg) {
        f = t - row0;
        break;
      }
    }
  } else {
    f = 0;
  }
  first[n] = static_cast<std::int32_t>(f);
  starts[n] = (row0 + f == n) ? 1 : 0;
}

/// Sentence routing, step 3 (after an exclusive scan of `starts` into `seq`): gate_row[n] = sequence index of n's
/// sequence, numbered in order of first appearance, row by row (the CPU's numbering).
static __global__ void sentence_gate_rows_kernel(const std::int32_t* __restrict__ first,
                                                 const std::int32_t* __restrict__ seq, std::int64_t n_tokens,
                                                 std::int64_t columns, std::int32_t* __restrict__ gate_row) {
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tokens) return;
  gate_row[n] = first[n] < 0 ? -1 : seq[n / columns * columns + first[n]];
}

/// Sentence routing, step 4: means[q] = mean of x over the tokens of sequence q, summed in token order (as the CPU
/// does), one thread per (row, column). `means` must start zeroed; `counts` is written here.
template <class S, class Real>
__global__ void sentence_means_kernel(const S* __restrict__ x, const std::int32_t* __restrict__ gate_row,
                                      std::int64_t rows, std::int64_t columns, std::int64_t C, Real* __restrict__ means,
                                      Real* __restrict__ counts) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t b = blockIdx.y;
  if (c >= C || b >= rows) return;
  for (std::int64_t t = 0; t < columns; ++t) {
    const std::int64_t n = b * columns + t;
    const std::int32_t q = gate_row[n];
    if (q < 0) continue;
    means[static_cast<std::int64_t>(q) * C + c] += static_cast<Real>(static_cast<acc_t<S>>(x[n * C + c]));
    if (c == 0) counts[q] += Real(1);
  }
}

/// Sentence routing, step 5: means[q] *= 1 / counts[q] (the CPU's multiply by the reciprocal).
template <class Real>
__global__ void sentence_scale_kernel(Real* __restrict__ means, const Real* __restrict__ counts, std::int64_t G,
                                      std::int64_t C) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= G * C) return;
  const Real k = counts[i / C];
  if (k > Real(0)) means[i] = means[i] * (Real(1) / k);
}

/// Sentence routing while decoding: gate input rows from Input::sentence_repr, gate_row[n] = row of n or -1.
template <class S, class Real>
__global__ void repr_gate_rows_kernel(const S* __restrict__ repr, const std::int32_t* __restrict__ segment_ids,
                                      std::int64_t rows, std::int64_t columns, std::int64_t C,
                                      Real* __restrict__ gate_input, std::int32_t* __restrict__ gate_row) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < rows * C) gate_input[i] = static_cast<Real>(static_cast<acc_t<S>>(repr[i]));
  if (i < rows * columns) {
    gate_row[i] = (segment_ids == nullptr || segment_ids[i] != 0) ? static_cast<std::int32_t>(i / columns) : -1;
  }
}

/// h = Act(h) in place; pre (if not null) keeps the pre-activation.
template <class Act, class S>
__global__ void activation_inplace_kernel(S* __restrict__ h, S* __restrict__ pre, std::int64_t count) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const S v = h[i];
  if (pre != nullptr) pre[i] = v;
  h[i] = S(Act::forward(static_cast<acc_t<S>>(v)));
}

/// y[n] = sum over j ascending of gate[n, j] * expert_out[row[n, j]], accumulated in acc_t<S>; zeros where no
/// choice was dispatched. One thread per (token, column).
template <int K, class S, class Real>
__global__ void combine_kernel(S* __restrict__ y, const S* __restrict__ expert_out, const Real* __restrict__ gate,
                               const std::int64_t* __restrict__ row, std::int64_t n_tokens, std::int64_t C) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_tokens * C) return;
  const std::int64_t n = i / C, c = i % C;
  using A = acc_t<S>;
  A acc = 0;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const std::int64_t r = row[n * K + j];
    if (r < 0) continue;
    const A g = static_cast<A>(gate[n * K + j]);
    acc += g * static_cast<A>(expert_out[r * C + c]);
  }
  y[i] = S(acc);
}

/// dst = S(src) element-wise (the task path's float accumulator to the output type), zero rows where keep == 0.
template <class S>
__global__ void finish_rows_kernel(S* __restrict__ dst, const float* __restrict__ src,
                                   const std::int32_t* __restrict__ gate_row, std::int64_t rows, std::int64_t C) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * C) return;
  dst[i] = (gate_row != nullptr && gate_row[i / C] < 0) ? S(0.0f) : S(src[i]);
}

/// Zeros the rows of y whose gate_row is -1 (padding in the task path when it writes y directly).
template <class S>
__global__ void zero_padding_rows_kernel(S* __restrict__ y, const std::int32_t* __restrict__ gate_row,
                                         std::int64_t rows, std::int64_t C) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * C) return;
  if (gate_row[i / C] < 0) y[i] = S(0.0f);
}

/// Task routing: gate_row[n] = task of token n; -1 for padding and for ids outside [0, tasks) (the host has checked
/// the ids it knows; this keeps every index in range whatever the device holds).
static __global__ void task_gate_rows_kernel(const std::int32_t* __restrict__ task_ids, bool per_token,
                                             const std::int32_t* __restrict__ segment_ids, std::int64_t n_tokens,
                                             std::int64_t columns, std::int64_t tasks,
                                             std::int32_t* __restrict__ gate_row) {
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tokens) return;
  const std::int32_t t = per_token ? task_ids[n] : task_ids[n / columns];
  const bool valid = segment_ids == nullptr || segment_ids[n] != 0;
  gate_row[n] = (valid && t >= 0 && t < tasks) ? t : -1;
}

/// The task path's plan: each valid token's K choices are its task's, all dispatched.
template <int K, class Real>
__global__ void task_plan_kernel(const std::int32_t* __restrict__ gate_row, const std::int32_t* __restrict__ top_idx,
                                 const Real* __restrict__ weights, std::int64_t n_tokens,
                                 std::int32_t* __restrict__ expert, Real* __restrict__ gate,
                                 std::uint8_t* __restrict__ dispatched) {
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tokens) return;
  const std::int32_t t = gate_row[n];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    expert[n * K + j] = t < 0 ? -1 : top_idx[static_cast<std::int64_t>(t) * K + j];
    gate[n * K + j] = t < 0 ? Real(0) : weights[static_cast<std::int64_t>(t) * K + j];
    dispatched[n * K + j] = t < 0 ? 0 : 1;
  }
}

/// dst = To(src) element-wise.
template <class To, class From>
__global__ void convert_kernel(To* __restrict__ dst, const From* __restrict__ src, std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = To(static_cast<acc_t<From>>(src[i]));
}

/// y[order[r]] = src[r] for the task path's gathered rows.
template <class S>
__global__ void scatter_rows_kernel(S* __restrict__ y, const S* __restrict__ src,
                                    const std::int64_t* __restrict__ order, std::int64_t rows, std::int64_t C) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * C) return;
  y[order[i / C] * C + i % C] = src[i];
}

}  // namespace tmoe::backend::cuda::moe_kernels
