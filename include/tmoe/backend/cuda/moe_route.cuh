#pragma once
/// @file moe_route.cuh
/// @brief The MoE gate on the GPU: fused softmax + top-K (one warp per gate row), per-token choices, and the
/// permutation into expert rows by a CUB histogram, an exclusive scan and a stable radix sort. No host round-trip.
///
/// The semantics are gate.hpp's, step for step, so the CPU and CUDA plans agree on expert ids, slots and drops:
///  - choice j of token n is item i = n*K + j; a taken item gets the key ((e*K + j)*G + g), g its capacity group;
///    items not taken (padding, random-policy skips) get the key `bins` and sort last;
///  - the histogram counts items per key; its exclusive scan gives each key's first sorted position; the stable
///    sort by key (items fed in index order) ranks the items of one key in token order;
///  - choice j's slot at expert e in group g is min(sum over j' < j of count(e, j', g), C) + rank, which is the
///    CPU's k-major queue position; it is dispatched iff slot < C;
///  - with a capacity limit, expert e's rows start at e*G*C (group g at e*G*C + g*C), so the expert GEMMs are one
///    strided-batched call over fixed-size blocks; dropless rows are the sorted positions themselves, which is the
///    CPU's expert-contiguous, k-major order.

#include <cuda_runtime.h>

#include <bit>
#include <cstdint>
#include <cub/cub.cuh>
#include <limits>
#include <type_traits>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/core/random.hpp"
#include "tmoe/moe/config.hpp"

namespace tmoe::backend::cuda::moe_kernels {

constexpr int kWarp = 32;

/// Max and sum over a warp by butterfly shuffles (every lane ends with the result).
template <class T>
__device__ inline T warp_max(T v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <class T>
__device__ inline T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// Is (va, ia) ahead of (vb, ib) in top-K order: larger value first, ties (and NaN against NaN) to the lower index,
/// any number ahead of NaN.
template <class T>
__device__ inline bool ahead(T va, int ia, T vb, int ib) {
  const bool na = va != va, nb = vb != vb;
  if (na != nb) return nb;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

/// One warp, one gate row: probs = softmax(logits); top_val/top_idx = its K largest probabilities, descending, ties
/// to the lower expert. Lane l holds experts l, l + 32, ... in registers: no limit on E.
template <int E, int K, class Real>
__device__ void softmax_top_k_row(const Real* __restrict__ l, Real* __restrict__ probs, Real* __restrict__ top_val,
                                  std::int32_t* __restrict__ top_idx, int lane) {
  constexpr int V = (E + kWarp - 1) / kWarp;
  Real v[V];
  Real m = -std::numeric_limits<Real>::infinity();
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int e = lane + i * kWarp;
    v[i] = e < E ? l[e] : -std::numeric_limits<Real>::infinity();
    m = max(m, v[i]);
  }
  m = warp_max(m);
  Real s = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int e = lane + i * kWarp;
    v[i] = e < E ? exp(v[i] - m) : Real(0);
    s += v[i];
  }
  s = warp_sum(s);
  const Real inv = Real(1) / s;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int e = lane + i * kWarp;
    v[i] = v[i] * inv;
    if (e < E) probs[e] = v[i];
  }
  // K rounds of a warp arg-max; the winner's owner retires it (flags indexed only by unrolled constants, so they stay
  // in registers for any E).
  bool taken[V];
#pragma unroll
  for (int i = 0; i < V; ++i) taken[i] = false;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    Real bv = 0;
    int bi = E;  // "none"
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int e = lane + i * kWarp;
      if (e < E && !taken[i] && (bi == E || ahead(v[i], e, bv, bi))) {
        bv = v[i];
        bi = e;
      }
    }
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const Real ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != E && (bi == E || ahead(ov, oi, bv, bi))) {
        bv = ov;
        bi = oi;
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) taken[i] = taken[i] || lane + i * kWarp == bi;
    if (lane == 0) {
      top_val[j] = bv;
      top_idx[j] = bi;
    }
  }
}

/// One warp per gate row g of `rows`.
template <int E, int K, class Real>
__global__ void softmax_top_k_kernel(const Real* __restrict__ logits, Real* __restrict__ probs,
                                     Real* __restrict__ top_val, std::int32_t* __restrict__ top_idx,
                                     std::int64_t rows) {
  const std::int64_t g = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (g >= rows) return;
  softmax_top_k_row<E, K, Real>(logits + g * E, probs + g * E, top_val + g * K, top_idx + g * K,
                                static_cast<int>(threadIdx.x % kWarp));
}

/// Per token: choices, normalized weights, the random second-expert policy, and each choice's sort key.
template <class Cfg, class Real>
__global__ void choices_kernel(const std::int32_t* __restrict__ gate_row, const Real* __restrict__ top_val,
                               const std::int32_t* __restrict__ top_idx, std::int64_t n_tokens, std::int64_t group_size,
                               std::int64_t groups, bool training, std::uint64_t seed, std::uint64_t offset,
                               std::int32_t* __restrict__ expert, Real* __restrict__ norm,
                               std::uint32_t* __restrict__ keys, std::int32_t* __restrict__ items) {
  constexpr int E = Cfg::experts, K = Cfg::top_k;
  using Second = typename Cfg::second_expert_type;
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tokens) return;
  const auto bins = static_cast<std::uint32_t>(static_cast<std::int64_t>(E) * K * groups);
  const std::int32_t g = gate_row[n];
  const std::int64_t grp = n / group_size;
  Real sum = 0;
  if (g >= 0) {
#pragma unroll
    for (int j = 0; j < K; ++j) sum += top_val[static_cast<std::int64_t>(g) * K + j];
  }
  const Real den = sum + Real(1e-9);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const std::int64_t i = n * K + j;
    items[i] = static_cast<std::int32_t>(i);
    if (g < 0) {
      expert[i] = -1;
      norm[i] = 0;
      keys[i] = bins;
      continue;
    }
    const std::int32_t e = top_idx[static_cast<std::int64_t>(g) * K + j];
    const Real gj = top_val[static_cast<std::int64_t>(g) * K + j] / den;
    expert[i] = e;
    norm[i] = gj;
    bool take = true;
    if constexpr (Second::random) {
      if (training && j >= 1) {
        const Philox rng(seed);
        const auto words = rng.block(static_cast<std::uint32_t>(n), static_cast<std::uint32_t>((j - 1) / 4),
                                     static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32));
        const Real r = static_cast<Real>(uniform01(words[static_cast<std::size_t>((j - 1) % 4)]));
        const Real t = static_cast<Real>(Second::threshold);
        take = r < gj / (t > Real(1e-9) ? t : Real(1e-9));
      }
    }
    keys[i] = take ? static_cast<std::uint32_t>((static_cast<std::int64_t>(e) * K + j) * groups + grp) : bins;
  }
}

/// Per sorted position p: the item's slot, dispatch flag and row. slot/row start at -1 and dispatched at 0.
template <int E, int K>
__global__ void slots_kernel(const std::uint32_t* __restrict__ sorted_keys,
                             const std::int32_t* __restrict__ sorted_items, const int* __restrict__ count,
                             const int* __restrict__ start, std::int64_t items, std::int64_t groups,
                             std::int64_t capacity, bool dropless, std::int64_t* __restrict__ slot,
                             std::uint8_t* __restrict__ dispatched, std::int64_t* __restrict__ row,
                             std::int64_t* __restrict__ row_token, std::int32_t* __restrict__ row_choice) {
  const std::int64_t p = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= items) return;
  const auto bins = static_cast<std::uint32_t>(static_cast<std::int64_t>(E) * K * groups);
  const std::uint32_t key = sorted_keys[p];
  if (key >= bins) return;
  const std::int64_t grp = key % groups;
  const int j = static_cast<int>((key / groups) % K);
  const int e = static_cast<int>(key / groups / K);
  const std::int64_t rank = p - start[key];
  std::int64_t before = 0;
  for (int jp = 0; jp < j; ++jp) before += count[(static_cast<std::int64_t>(e) * K + jp) * groups + grp];
  const std::int64_t s = (dropless ? before : min(before, capacity)) + rank;
  const std::int32_t item = sorted_items[p];
  slot[item] = s;
  if (!dropless && s >= capacity) return;
  dispatched[item] = 1;
  const std::int64_t r = dropless ? p : (static_cast<std::int64_t>(e) * groups + grp) * capacity + s;
  row[item] = r;
  row_token[r] = item / K;
  row_choice[r] = static_cast<std::int32_t>(item % K);
}

/// expert_count[e] = rows dispatched to e; expert_offset[e] = first row of e (e*G*C with a capacity limit, the
/// running sum of counts when dropless). One thread per expert, plus one for expert_offset[E].
template <int E, int K>
__global__ void expert_sizes_kernel(const int* __restrict__ count, std::int64_t groups, std::int64_t capacity,
                                    bool dropless, std::int64_t* __restrict__ expert_count,
                                    std::int64_t* __restrict__ expert_offset) {
  const int e = static_cast<int>(threadIdx.x + blockIdx.x * blockDim.x);
  if (e > E) return;
  if (dropless) {
    // Serial over experts (E is small next to the token count): expert_offset is their exclusive sum.
    if (e != 0) return;
    std::int64_t acc = 0;
    for (int x = 0; x < E; ++x) {
      std::int64_t c = 0;
      for (std::int64_t b = static_cast<std::int64_t>(x) * K * groups;
           b < static_cast<std::int64_t>(x + 1) * K * groups; ++b)
        c += count[b];
      expert_offset[x] = acc;
      expert_count[x] = c;
      acc += c;
    }
    expert_offset[E] = acc;
    return;
  }
  expert_offset[e] = static_cast<std::int64_t>(e) * groups * capacity;
  if (e == E) return;
  std::int64_t kept = 0;
  for (std::int64_t g = 0; g < groups; ++g) {
    std::int64_t c = 0;
    for (int j = 0; j < K; ++j) c += count[(static_cast<std::int64_t>(e) * K + j) * groups + g];
    kept += min(c, capacity);
  }
  expert_count[e] = kept;
}

/// Final combine weights per token (gate.hpp step 6).
template <class Cfg, class Real>
__global__ void final_weights_kernel(const std::int32_t* __restrict__ gate_row, const Real* __restrict__ probs,
                                     const std::int32_t* __restrict__ expert, const Real* __restrict__ norm,
                                     const std::uint8_t* __restrict__ dispatched, std::int64_t n_tokens,
                                     Real* __restrict__ gate) {
  constexpr int E = Cfg::experts, K = Cfg::top_k;
  using Norm = typename Cfg::normalize_type;
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tokens) return;
  const std::int64_t b = n * K;
  if (expert[b] < 0) {
#pragma unroll
    for (int j = 0; j < K; ++j) gate[b + j] = 0;
    return;
  }
  if constexpr (std::is_same_v<Norm, NoNormalize>) {
    const Real* p = probs + static_cast<std::int64_t>(gate_row[n]) * E;
#pragma unroll
    for (int j = 0; j < K; ++j) gate[b + j] = dispatched[b + j] ? p[expert[b + j]] : Real(0);
  } else if constexpr (std::is_same_v<Norm, NormalizeBeforeDrop>) {
#pragma unroll
    for (int j = 0; j < K; ++j) gate[b + j] = dispatched[b + j] ? norm[b + j] : Real(0);
  } else {
    Real d = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) d += dispatched[b + j] ? norm[b + j] : Real(0);
#pragma unroll
    for (int j = 0; j < K; ++j) gate[b + j] = (dispatched[b + j] && d > 0) ? norm[b + j] / d : Real(0);
  }
}

/// Loss partials over chunks of kLossChunk tokens: per (chunk, expert) the top-1 count f and the probability sum m,
/// and per chunk the z-loss sum and valid-token count. Chunks never straddle a capacity group.
constexpr int kLossChunk = 128;

template <int E, int K, class Real>
__global__ void loss_partials_kernel(const std::int32_t* __restrict__ gate_row, const Real* __restrict__ probs,
                                     const Real* __restrict__ logits, const std::int32_t* __restrict__ expert,
                                     std::int64_t n_tokens, std::int64_t group_size, std::int64_t chunks_per_group,
                                     double* __restrict__ f_part, double* __restrict__ m_part,
                                     double* __restrict__ z_part, double* __restrict__ valid_part) {
  const std::int64_t chunk = blockIdx.x;
  const std::int64_t grp = chunk / chunks_per_group;
  const std::int64_t begin = grp * group_size + (chunk % chunks_per_group) * kLossChunk;
  const std::int64_t end = min(min(begin + kLossChunk, (grp + 1) * group_size), n_tokens);
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    double f = 0, m = 0;
    for (std::int64_t n = begin; n < end; ++n) {
      const std::int32_t g = gate_row[n];
      if (g < 0) continue;
      f += expert[n * K] == e ? 1.0 : 0.0;
      m += static_cast<double>(probs[static_cast<std::int64_t>(g) * E + e]);
    }
    f_part[chunk * E + e] = f;
    m_part[chunk * E + e] = m;
  }
  if (threadIdx.x == 0) {
    double z = 0, valid = 0;
    for (std::int64_t n = begin; n < end; ++n) {
      const std::int32_t g = gate_row[n];
      if (g < 0) continue;
      // logsumexp = l[e1] - log p[e1] (p[e1] >= 1/E never underflows), as on the CPU.
      const std::int32_t e1 = expert[n * K];
      const double lse = static_cast<double>(logits[static_cast<std::int64_t>(g) * E + e1]) -
                         log(static_cast<double>(probs[static_cast<std::int64_t>(g) * E + e1]));
      z += lse * lse;
      valid += 1;
    }
    z_part[chunk] = z;
    valid_part[chunk] = valid;
  }
}

/// One block: losses[0] = aux loss (mean over groups of E * sum_e f_e m_e / S^2), losses[1] = z-loss. Sums run in a
/// fixed order, so the result does not depend on the launch.
template <int E>
__global__ void loss_final_kernel(const double* __restrict__ f_part, const double* __restrict__ m_part,
                                  const double* __restrict__ z_part, const double* __restrict__ valid_part,
                                  std::int64_t n_tokens, std::int64_t group_size, std::int64_t groups,
                                  std::int64_t chunks_per_group, double* __restrict__ losses) {
  constexpr int kThreads = 256;
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  double aux = 0;
  for (std::int64_t g = 0; g < groups; ++g) {
    const double s = static_cast<double>(min(n_tokens, (g + 1) * group_size) - g * group_size);
    double acc = 0;
    for (int e = static_cast<int>(threadIdx.x); e < E; e += kThreads) {
      double f = 0, m = 0;
      for (std::int64_t c = 0; c < chunks_per_group; ++c) {
        f += f_part[(g * chunks_per_group + c) * E + e];
        m += m_part[(g * chunks_per_group + c) * E + e];
      }
      acc += (f / s) * (m / s);
    }
    const double total = Reduce(tmp).Sum(acc);
    __syncthreads();
    if (threadIdx.x == 0) aux += E * total;
  }
  if (threadIdx.x == 0) {
    double z = 0, valid = 0;
    for (std::int64_t c = 0; c < groups * chunks_per_group; ++c) {
      z += z_part[c];
      valid += valid_part[c];
    }
    losses[0] = groups ? aux / static_cast<double>(groups) : 0.0;
    losses[1] = valid > 0 ? z / valid : 0.0;
  }
}

/// Limits of route_small_kernel: N*K choices and E*K keys in shared memory; one group; inference (no random policy).
constexpr std::int64_t kSmallItems = 512;
constexpr std::int64_t kSmallBins = 2048;
constexpr int kSmallThreads = 1024;

/// Small batches at inference, the whole gate in one block (a decoding step routes a few tokens, and launches, not
/// bytes, would dominate the many-kernel path): softmax + top-K per gate row, choices, counts, stable ranks by
/// direct counting, slots, rows, final weights and expert sizes. The same results as the general path, which the
/// tests check against the CPU.
template <class Cfg, class Real>
__global__ void __launch_bounds__(kSmallThreads)
    route_small_kernel(const Real* __restrict__ logits, Real* __restrict__ probs, std::int64_t G,
                       const std::int32_t* __restrict__ gate_row, std::int64_t N, std::int64_t capacity, bool dropless,
                       Real* __restrict__ top_val, std::int32_t* __restrict__ top_idx,
                       std::int32_t* __restrict__ expert, Real* __restrict__ gate, std::int64_t* __restrict__ slot,
                       std::uint8_t* __restrict__ dispatched, std::int64_t* __restrict__ row,
                       std::int64_t* __restrict__ expert_count, std::int64_t* __restrict__ expert_offset,
                       std::int64_t* __restrict__ row_token, std::int32_t* __restrict__ row_choice,
                       std::int64_t row_slots) {
  constexpr int E = Cfg::experts, K = Cfg::top_k;
  constexpr int bins = E * K;
  using Norm = typename Cfg::normalize_type;
  __shared__ std::uint32_t keys[kSmallItems];
  __shared__ Real norm[kSmallItems];
  __shared__ int count[kSmallBins];
  __shared__ int start[kSmallBins];
  const int tid = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
  const std::int64_t items = N * K;

  for (std::int64_t i = tid; i < items; i += threads) {
    slot[i] = -1;
    row[i] = -1;
    dispatched[i] = 0;
  }
  for (std::int64_t r = tid; r < row_slots; r += threads) {
    row_token[r] = -1;
    row_choice[r] = -1;
  }
  for (int b = tid; b < bins; b += threads) count[b] = 0;
  // 1. Softmax and top-K, one warp per gate row.
  for (std::int64_t g = tid / kWarp; g < G; g += threads / kWarp) {
    softmax_top_k_row<E, K, Real>(logits + g * E, probs + g * E, top_val + g * K, top_idx + g * K, tid % kWarp);
  }
  __syncthreads();
  // 2. Choices, normalized weights and counts.
  for (std::int64_t n = tid; n < N; n += threads) {
    const std::int32_t g = gate_row[n];
    Real sum = 0;
    if (g >= 0) {
      for (int j = 0; j < K; ++j) sum += top_val[static_cast<std::int64_t>(g) * K + j];
    }
    for (int j = 0; j < K; ++j) {
      const std::int64_t i = n * K + j;
      if (g < 0) {
        expert[i] = -1;
        norm[i] = 0;
        keys[i] = bins;
        continue;
      }
      const std::int32_t e = top_idx[static_cast<std::int64_t>(g) * K + j];
      expert[i] = e;
      norm[i] = top_val[static_cast<std::int64_t>(g) * K + j] / (sum + Real(1e-9));
      keys[i] = static_cast<std::uint32_t>(e * K + j);
      atomicAdd(&count[e * K + j], 1);  // integer counts: exact whatever the order
    }
  }
  __syncthreads();
  // 3. First sorted position of each key (dropless rows, expert offsets): one thread, at most E*K <= 2048 adds.
  if (tid == 0) {
    int acc = 0;
    for (int b = 0; b < bins; ++b) {
      start[b] = acc;
      acc += count[b];
    }
  }
  __syncthreads();
  // 4. Stable rank within a key = earlier tokens with the same key; then slot, dispatch and row.
  for (std::int64_t i = tid; i < items; i += threads) {
    const std::uint32_t key = keys[i];
    if (key >= static_cast<std::uint32_t>(bins)) continue;
    const std::int64_t n = i / K;
    const int j = static_cast<int>(i % K), e = static_cast<int>(key / K);
    std::int64_t rank = 0;
    for (std::int64_t m = 0; m < n; ++m) rank += keys[m * K + j] == key ? 1 : 0;
    std::int64_t before = 0;
    for (int jp = 0; jp < j; ++jp) before += count[e * K + jp];
    const std::int64_t s = (dropless ? before : min(before, capacity)) + rank;
    slot[i] = s;
    if (!dropless && s >= capacity) continue;
    dispatched[i] = 1;
    const std::int64_t r = dropless ? start[key] + rank : static_cast<std::int64_t>(e) * capacity + s;
    row[i] = r;
    row_token[r] = n;
    row_choice[r] = j;
  }
  __syncthreads();
  // 5. Final weights; 6. expert sizes.
  for (std::int64_t n = tid; n < N; n += threads) {
    const std::int64_t b = n * K;
    if (expert[b] < 0) {
      for (int j = 0; j < K; ++j) gate[b + j] = 0;
      continue;
    }
    if constexpr (std::is_same_v<Norm, NoNormalize>) {
      const Real* p = probs + static_cast<std::int64_t>(gate_row[n]) * E;
      for (int j = 0; j < K; ++j) gate[b + j] = dispatched[b + j] ? p[expert[b + j]] : Real(0);
    } else if constexpr (std::is_same_v<Norm, NormalizeBeforeDrop>) {
      for (int j = 0; j < K; ++j) gate[b + j] = dispatched[b + j] ? norm[b + j] : Real(0);
    } else {
      Real d = 0;
      for (int j = 0; j < K; ++j) d += dispatched[b + j] ? norm[b + j] : Real(0);
      for (int j = 0; j < K; ++j) gate[b + j] = (dispatched[b + j] && d > 0) ? norm[b + j] / d : Real(0);
    }
  }
  for (int e = tid; e <= E; e += threads) {
    if (e == E) {
      expert_offset[E] = dropless ? static_cast<std::int64_t>(start[bins - 1] + count[bins - 1])
                                  : static_cast<std::int64_t>(E) * capacity;
      continue;
    }
    std::int64_t c = 0;
    for (int j = 0; j < K; ++j) c += count[e * K + j];
    expert_count[e] = dropless ? c : min(c, capacity);
    expert_offset[e] = dropless ? static_cast<std::int64_t>(start[e * K]) : static_cast<std::int64_t>(e) * capacity;
  }
}

/// Task routing: each task's K weights from its top-K probabilities, normalized as the configuration says (the CPU
/// layer's task_choice). One thread per task.
template <class Cfg, class Real>
__global__ void task_weights_kernel(const Real* __restrict__ top_val, std::int64_t tasks, Real* __restrict__ weights) {
  constexpr int K = Cfg::top_k;
  using Norm = typename Cfg::normalize_type;
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tasks) return;
  const Real* v = top_val + t * K;
  Real sum = 0;
  for (int j = 0; j < K; ++j) sum += v[j];
  Real d = 0;
  for (int j = 0; j < K; ++j) d += v[j] / (sum + Real(1e-9));
  for (int j = 0; j < K; ++j) {
    if constexpr (std::is_same_v<Norm, NoNormalize>) {
      weights[t * K + j] = v[j];
    } else if constexpr (std::is_same_v<Norm, NormalizeBeforeDrop>) {
      weights[t * K + j] = v[j] / (sum + Real(1e-9));
    } else {
      weights[t * K + j] = v[j] / (sum + Real(1e-9)) / d;
    }
  }
}

}  // namespace tmoe::backend::cuda::moe_kernels
