#pragma once
/// @file moe_backward.cuh
/// @brief Kernels of the MoE layer's backward pass on the GPU (moe/cuda_layer.cuh drives them; the expert and router
/// GEMMs are cuBLAS calls there). Each mirrors a loop of the CPU layer's backward (moe/layer.hpp):
///  - combine_backward_kernel: d expert_out[r] = G(n, j) dy_n and dG(n, j) = dy_n . expert_out[r], one warp per row;
///  - uncombine_kernel: dx_n = sum over j ascending of d dispatched[row(n, j)];
///  - activation_backward_kernel: dH *= act'(pre), or the ReLU mask read off the kept output;
///  - row_dot_kernel: the task path's dG(n, j) = dy_n . FFN_j(x_n), one warp per row;
///  - aux_prep_kernel and gate_row_grad_kernel: from dG to the router logits (normalization, aux loss, softmax,
///    z-loss), one block per gate row, its tokens in token order, so the sums run in a fixed order without atomics;
///  - sentence_dx_kernel: the sequence means' gradient spread back over their tokens.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "tmoe/backend/cuda/moe_route.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/moe/config.hpp"

namespace tmoe::backend::cuda::moe_kernels {

/// Through the combine, one warp per expert row r of R: d_out[r] = G(n, j) dy_n and d_gate(n, j) = dy_n . out[r]
/// for the token n and choice j the row holds; an empty row (row_token -1) gets a zero gradient.
template <int K, class S, class Real>
__global__ void combine_backward_kernel(const S* __restrict__ dy, const S* __restrict__ expert_out,
                                        const Real* __restrict__ gate, const std::int64_t* __restrict__ row_token,
                                        const std::int32_t* __restrict__ row_choice, std::int64_t rows, std::int64_t C,
                                        S* __restrict__ d_out, Real* __restrict__ d_gate) {
  const std::int64_t r = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (r >= rows) return;
  S* o = d_out + r * C;
  const std::int64_t n = row_token[r];
  if (n < 0) {
    for (std::int64_t c = lane; c < C; c += kWarp) o[c] = S(0);
    return;
  }
  const std::int32_t j = row_choice[r];
  const S g = static_cast<S>(gate[n * K + j]);
  const S* d = dy + n * C;
  const S* y = expert_out + r * C;
  Real dot = 0;
  for (std::int64_t c = lane; c < C; c += kWarp) {
    o[c] = g * d[c];
    dot += static_cast<Real>(d[c] * y[c]);
  }
  dot = warp_sum(dot);
  if (lane == 0) d_gate[n * K + j] = dot;
}

/// dx_n = sum over j ascending of d_dispatched[row(n, j)] (skipping dropped choices); overwrites dx. One thread per
/// (token, column).
template <int K, class S>
__global__ void uncombine_kernel(S* __restrict__ dx, const S* __restrict__ d_dispatched,
                                 const std::int64_t* __restrict__ row, std::int64_t n_tokens, std::int64_t C) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_tokens * C) return;
  const std::int64_t n = i / C, c = i % C;
  S acc = 0;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const std::int64_t r = row[n * K + j];
    if (r >= 0) acc += d_dispatched[r * C + c];
  }
  dx[i] = acc;
}

/// dh *= act'(pre); without pre (ReLU) the derivative reads off the kept output: h > 0 iff pre > 0.
template <class Act, class S>
__global__ void activation_backward_kernel(S* __restrict__ dh, const S* __restrict__ hidden,
                                           const S* __restrict__ pre, std::int64_t count) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  dh[i] *= pre != nullptr ? Act::derivative(pre[i]) : (hidden[i] > S(0) ? S(1) : S(0));
}

/// The task path's gate gradient, one warp per routed row i of [0, rows): d_gate(n, j) = dy_i . out_i for the token
/// n = order[i], or first + i without order (a contiguous range that starts at token first), if it is not padding.
template <int K, class S, class Real>
__global__ void row_dot_kernel(const S* __restrict__ dy, const S* __restrict__ out,
                               const std::int64_t* __restrict__ order, std::int64_t first,
                               const std::int32_t* __restrict__ gate_row, std::int64_t rows, std::int64_t C, int j,
                               Real* __restrict__ d_gate) {
  const std::int64_t i = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (i >= rows) return;
  const std::int64_t n = order != nullptr ? order[i] : first + i;
  Real dot = 0;
  for (std::int64_t c = lane; c < C; c += kWarp) dot += static_cast<Real>(dy[i * C + c] * out[i * C + c]);
  dot = warp_sum(dot);
  if (lane == 0 && gate_row[n] >= 0) d_gate[n * K + j] = dot;
}

/// One block: from the loss partials of loss_partials_kernel, aux_f(g, e) = aux_coef * E * f(g, e) / (s_g^2 * groups)
/// (f counts group g's top-1 choices of expert e; the aux loss's gradient per token of the group and probability
/// p(., e)), and valid[0] = the number of non-padding tokens. Fixed summation order.
template <int E>
__global__ void aux_prep_kernel(const double* __restrict__ f_part, const double* __restrict__ valid_part,
                                std::int64_t n_tokens, std::int64_t group_size, std::int64_t groups,
                                std::int64_t chunks_per_group, double aux_coef, double* __restrict__ aux_f,
                                double* __restrict__ valid) {
  for (std::int64_t g = 0; g < groups; ++g) {
    const double s = static_cast<double>(min(n_tokens, (g + 1) * group_size) - g * group_size);
    for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
      double f = 0;
      for (std::int64_t c = 0; c < chunks_per_group; ++c) f += f_part[(g * chunks_per_group + c) * E + e];
      aux_f[g * E + e] = aux_coef * E * f / (s * s * static_cast<double>(groups));
    }
  }
  if (threadIdx.x == 0) {
    double v = 0;
    for (std::int64_t c = 0; c < groups * chunks_per_group; ++c) v += valid_part[c];
    valid[0] = v;
  }
}

/// One token's gradient with respect to p(g, e) through the final-weight normalization (gate.hpp step 6), for the
/// expert e: zero unless e is one of the token's K choices.
template <class Cfg, class Real>
__device__ inline Real normalization_grad(const std::int32_t* __restrict__ expert,
                                          const std::uint8_t* __restrict__ disp, const Real* __restrict__ dG,
                                          const Real* __restrict__ p, std::int64_t n, int e) {
  constexpr int K = Cfg::top_k;
  using Norm = typename Cfg::normalize_type;
  const std::int64_t b = n * K;
  int m = -1;
#pragma unroll
  for (int j = 0; j < K; ++j) m = expert[b + j] == e ? j : m;
  if (m < 0) return Real(0);
  if constexpr (std::is_same_v<Norm, NoNormalize>) {
    return disp[b + m] ? dG[b + m] : Real(0);
  } else if constexpr (std::is_same_v<Norm, NormalizeBeforeDrop>) {
    // G_j = disp_j v_j / den, den = sum_i v_i + 1e-9 over all K choices.
    Real den = Real(1e-9), acc = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const Real v = p[expert[b + j]];
      den += v;
      acc += disp[b + j] ? dG[b + j] * v : Real(0);
    }
    return (disp[b + m] ? dG[b + m] / den : Real(0)) - acc / (den * den);
  } else {
    // G_j = disp_j v_j / sum over dispatched v.
    if (!disp[b + m]) return Real(0);
    Real sk = 0, acc = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (!disp[b + j]) continue;
      const Real v = p[expert[b + j]];
      sk += v;
      acc += dG[b + j] * v;
    }
    return sk > 0 ? dG[b + m] / sk - acc / (sk * sk) : Real(0);
  }
}

/// One block per gate row g: d_logits(g, :) from dG (N, K). The row's tokens are tokens[start[g] .. start[g + 1])
/// in token order, or (tokens == nullptr, token routing) token g alone if its gate row is g. Per expert e (one thread
/// each, striding): dp(e) = sum over the tokens of the normalization gradient plus aux_f(group of the token, e); then
/// the softmax backward dl(e) = p(e) (dp(e) - p . dp) and the z-loss term (2 z_coef / valid) p(e) sum_n lse_n.
template <class Cfg, class Real>
__global__ void gate_row_grad_kernel(const std::int32_t* __restrict__ tokens, const int* __restrict__ start,
                                     const std::int32_t* __restrict__ gate_row, const std::int32_t* __restrict__ expert,
                                     const std::uint8_t* __restrict__ disp, const Real* __restrict__ dG,
                                     const Real* __restrict__ probs, const Real* __restrict__ logits,
                                     const double* __restrict__ aux_f, std::int64_t group_size,
                                     const double* __restrict__ valid, double z_coef, Real* __restrict__ d_logits) {
  constexpr int E = Cfg::experts, K = Cfg::top_k;
  __shared__ Real dp[E];
  __shared__ Real dot_z[2];
  const std::int64_t g = blockIdx.x;
  const Real* p = probs + g * E;
  const std::int64_t begin = tokens != nullptr ? start[g] : g;
  const std::int64_t end = tokens != nullptr ? start[g + 1] : g + 1;
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    Real acc = 0;
    for (std::int64_t i = begin; i < end; ++i) {
      const std::int64_t n = tokens != nullptr ? tokens[i] : i;
      if (gate_row[n] != g) continue;
      acc += normalization_grad<Cfg, Real>(expert, disp, dG, p, n, e);
      if (aux_f != nullptr) acc += static_cast<Real>(aux_f[(n / group_size) * E + e]);
    }
    dp[e] = acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Real dot = 0;
    for (int e = 0; e < E; ++e) dot += p[e] * dp[e];
    Real z = 0;
    if (z_coef != 0.0 && valid != nullptr && valid[0] > 0) {
      // logsumexp as in forward: lse = l[e1] - log p[e1], p[e1] >= 1/E.
      Real lse_sum = 0;
      for (std::int64_t i = begin; i < end; ++i) {
        const std::int64_t n = tokens != nullptr ? tokens[i] : i;
        if (gate_row[n] != g) continue;
        const std::int32_t e1 = expert[n * K];
        lse_sum += logits[g * E + e1] - log(p[e1]);
      }
      z = static_cast<Real>(2.0 * z_coef / valid[0]) * lse_sum;
    }
    dot_z[0] = dot;
    dot_z[1] = z;
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    d_logits[g * E + e] = p[e] * (dp[e] - dot_z[0]) + dot_z[1] * p[e];
  }
}

/// Sort keys of the tokens by gate row: the row, or `rows` (sorted last) for padding; values: the token.
static __global__ void gate_row_keys_kernel(const std::int32_t* __restrict__ gate_row, std::int64_t n_tokens,
                                            std::int64_t rows, std::uint32_t* __restrict__ keys,
                                            std::int32_t* __restrict__ values) {
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tokens) return;
  keys[n] = static_cast<std::uint32_t>(gate_row[n] >= 0 ? gate_row[n] : rows);
  values[n] = static_cast<std::int32_t>(n);
}

/// Sentence routing: dx_n += dmean(g) / count(g) for token n of gate row g (count = start[g + 1] - start[g]).
template <class S, class Real>
__global__ void sentence_dx_kernel(S* __restrict__ dx, const Real* __restrict__ dmean,
                                   const std::int32_t* __restrict__ gate_row, const int* __restrict__ start,
                                   std::int64_t n_tokens, std::int64_t C) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_tokens * C) return;
  const std::int32_t g = gate_row[i / C];
  if (g < 0) return;
  const Real inv = Real(1) / static_cast<Real>(start[g + 1] - start[g]);
  dx[i] += static_cast<S>(dmean[static_cast<std::int64_t>(g) * C + i % C] * inv);
}

}  // namespace tmoe::backend::cuda::moe_kernels
