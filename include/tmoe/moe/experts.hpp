#pragma once
/// @file experts.hpp
/// @brief Expert FFNs over expert-contiguous row blocks: y_e = wo_e * Act(wi_e * x_e) for every expert at once.
///
/// Weights are stacked: wi (E, F, C) and wo (E, C, F), [out, in] per expert as in PyTorch. Each stage is one
/// fork-join: thread t computes column slab t of every expert's block (a contiguous slab of weight rows), so the
/// work splits evenly however tokens spread over experts, each weight byte is read by one thread, and the
/// partition depends only on the thread count. The activation is applied per slab while it is hot in cache.

#include <algorithm>
#include <cstdint>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/backend/cpu/gemm.hpp"
#include "tmoe/nn/activation.hpp"

namespace tmoe::moe {

/// Boundaries of slab t of [0, n) split into `parts`, aligned to 16 elements.
inline std::pair<std::int64_t, std::int64_t> slab(std::int64_t n, std::int64_t parts, std::int64_t t) {
  const std::int64_t blocks = (n + 15) / 16;
  const std::int64_t b0 = blocks * t / parts, b1 = blocks * (t + 1) / parts;
  return {std::min(n, b0 * 16), std::min(n, b1 * 16)};
}

/// Combine of the permuted path: y_n = sum_j gate(n, j) * yo(row(n, j)) over the K choices of token n in ascending
/// j (a fixed order), skipping dropped choices (row < 0); tokens split over the threads, each y_n written once.
template <int K, class S, class Real>
void combine_rows(CpuContext& ctx, S* y, const S* yo, const std::int64_t* row, const Real* gate, std::int64_t N,
                  std::int64_t C) {
  ctx.parallel_range(N, 32, [&](std::int64_t n0, std::int64_t n1) {
    for (std::int64_t n = n0; n < n1; ++n) {
      S* yn = y + n * C;
      std::fill_n(yn, C, S(0));
      for (int j = 0; j < K; ++j) {
        const std::int64_t r = row[n * K + j];
        if (r < 0) continue;
        const S g = static_cast<S>(gate[n * K + j]);
        const S* src = yo + r * C;
        for (std::int64_t c = 0; c < C; ++c) yn[c] += g * src[c];
      }
    }
  });
}

/// hidden (R, F) = Act(x (R, C) * wi_e^T) and y (R, C) = hidden * wo_e^T for the rows of each expert e.
/// When `pre` is non-null it receives the pre-activation (R, F) for backward; otherwise the activation is in place.
template <nn::Activation Act, class S, int E>
void experts_forward(CpuContext& ctx, S* y, S* hidden, S* pre, const S* x, const S* wi, const S* wo,
                     const std::int64_t* offset, std::int64_t C, std::int64_t F) {
  using backend::cpu::MatrixRef;
  const std::int64_t T = ctx.threads();
  ctx.parallel(T, [&](std::int64_t t) {
    const auto [f0, f1] = slab(F, T, t);
    if (f0 == f1) return;
    for (int e = 0; e < E; ++e) {
      const std::int64_t r0 = offset[e], r = offset[e + 1] - r0;
      if (r == 0) continue;
      S* h = (pre ? pre : hidden) + r0 * F + f0;
      backend::cpu::gemm_serial<S>(MatrixRef<S>{h, r, f1 - f0, F}, MatrixRef<const S>{x + r0 * C, r, C, C}, Trans::kN,
                                   MatrixRef<const S>{wi + (e * F + f0) * C, f1 - f0, C, C}, Trans::kT, S(1), S(0));
      for (std::int64_t i = 0; i < r; ++i) {
        const S* src = h + i * F;
        S* dst = hidden + (r0 + i) * F + f0;
        for (std::int64_t f = 0; f < f1 - f0; ++f) dst[f] = Act::forward(src[f]);
      }
    }
  });
  ctx.parallel(T, [&](std::int64_t t) {
    const auto [c0, c1] = slab(C, T, t);
    if (c0 == c1) return;
    for (int e = 0; e < E; ++e) {
      const std::int64_t r0 = offset[e], r = offset[e + 1] - r0;
      if (r == 0) continue;
      backend::cpu::gemm_serial<S>(MatrixRef<S>{y + r0 * C + c0, r, c1 - c0, C},
                                   MatrixRef<const S>{hidden + r0 * F, r, F, F}, Trans::kN,
                                   MatrixRef<const S>{wo + (e * C + c0) * F, c1 - c0, F, F}, Trans::kT, S(1), S(0));
    }
  });
}

/// The K experts of one task over a contiguous row range, in two fork-joins: stage 1 computes slab t of every
/// expert's hidden activations (F split across threads), stage 2 slab t of the output columns, summing
/// y = sum_j g_j wo_ej Act(wi_ej x) over j in order within each thread's slab (no atomics, fixed order).
/// hidden_j (and pre_j, when given) start at hidden + j * hidden_stride. For small ranges (decoding) this saves
/// the 3K fork-joins of K expert_dense_forward calls.
template <nn::Activation Act, class S, int K>
void task_experts_forward(CpuContext& ctx, S* y, S* hidden, S* pre, std::int64_t hidden_stride, const S* x,
                          std::int64_t rows, const std::int32_t* experts, const S* gates, const S* wi, const S* wo,
                          std::int64_t C, std::int64_t F) {
  using backend::cpu::MatrixRef;
  if (rows == 0) return;
  const std::int64_t T = ctx.threads();
  ctx.parallel(T, [&](std::int64_t t) {
    const auto [f0, f1] = slab(F, T, t);
    if (f0 == f1) return;
    for (int j = 0; j < K; ++j) {
      S* hj = hidden + j * hidden_stride;
      S* h = (pre ? pre + j * hidden_stride : hj) + f0;
      backend::cpu::gemm_serial<S>(MatrixRef<S>{h, rows, f1 - f0, F}, MatrixRef<const S>{x, rows, C, C}, Trans::kN,
                                   MatrixRef<const S>{wi + (experts[j] * F + f0) * C, f1 - f0, C, C}, Trans::kT,
                                   S(1), S(0));
      for (std::int64_t i = 0; i < rows; ++i) {
        for (std::int64_t f = 0; f < f1 - f0; ++f) hj[i * F + f0 + f] = Act::forward(h[i * F + f]);
      }
    }
  });
  ctx.parallel(T, [&](std::int64_t t) {
    const auto [c0, c1] = slab(C, T, t);
    if (c0 == c1) return;
    for (int j = 0; j < K; ++j) {
      backend::cpu::gemm_serial<S>(MatrixRef<S>{y + c0, rows, c1 - c0, C},
                                   MatrixRef<const S>{hidden + j * hidden_stride, rows, F, F}, Trans::kN,
                                   MatrixRef<const S>{wo + (experts[j] * C + c0) * F, c1 - c0, F, F}, Trans::kT,
                                   gates[j], j == 0 ? S(0) : S(1));
    }
  });
}

/// One expert over a contiguous row range, accumulating into y: y (R, C) = beta * y + g * wo_e Act(wi_e x).
/// Used by task routing, where a task's rows all share the expert. Splits over threads inside each GEMM.
template <nn::Activation Act, class S>
void expert_dense_forward(CpuContext& ctx, S* y, S* hidden, S* pre, const S* x, std::int64_t rows, const S* wi_e,
                          const S* wo_e, std::int64_t C, std::int64_t F, S g, S beta) {
  using backend::cpu::MatrixRef;
  if (rows == 0) return;
  S* h = pre ? pre : hidden;
  backend::cpu::gemm_parallel<S>(ctx, MatrixRef<S>{h, rows, F, F}, MatrixRef<const S>{x, rows, C, C}, Trans::kN,
                                 MatrixRef<const S>{wi_e, F, C, C}, Trans::kT, S(1), S(0));
  ctx.parallel_range(rows * F, 1 << 14, [&](std::int64_t b, std::int64_t end) {
    for (std::int64_t i = b; i < end; ++i) hidden[i] = Act::forward(h[i]);
  });
  backend::cpu::gemm_parallel<S>(ctx, MatrixRef<S>{y, rows, C, C}, MatrixRef<const S>{hidden, rows, F, F}, Trans::kN,
                                 MatrixRef<const S>{wo_e, C, F, F}, Trans::kT, g, beta);
}

}  // namespace tmoe::moe
