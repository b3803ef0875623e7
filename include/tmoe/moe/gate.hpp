#pragma once
/// @file gate.hpp
/// @brief The top-k gate: from router probabilities to a RoutingPlan (paper-spec 2.3, generalized to K).
///
/// For every valid token, in this order:
///  1. choices e_1..e_K: the K largest probabilities, ties to the lower expert index (argmax semantics, each
///     later choice excluding the earlier ones);
///  2. weights g_j = p[e_j] / (sum_i p[e_i] + 1e-9) (NormalizeBeforeDrop, NormalizeAfterDrop) or p[e_j]
///     (NoNormalize);
///  3. the aux loss from the top-1 choices before capacity: E * sum_e f_e m_e per group, f_e and m_e averaged
///     over the group's S positions, padding included in S but never counted (lingvo legacy), then the mean
///     over groups; the z-loss from the logits of valid tokens;
///  4. SecondExpertRandom, training only: choice j >= 2 is kept iff r < g_j / max(t, 1e-9), with r the uniform
///     float of Philox(seed) at counter (n, (j - 1) / 4, offset_lo, offset_hi), word (j - 1) % 4;
///  5. capacity per group and expert, C computed once from min(S, N) (a shorter last group keeps the same C):
///     choices queue k-major (all first choices in token order, then all second
///     choices, ...); choice (n, j) gets position pos = (kept choices < j at that expert) + (earlier tokens whose
///     choice j took that expert), and is dispatched iff pos < C;
///  6. final weights: NormalizeBeforeDrop keeps g_j of the dispatched choices (a lone survivor stays below 1);
///     NormalizeAfterDrop divides the survivors by their sum; NoNormalize keeps raw p.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/backend/cpu/top_k.hpp"
#include "tmoe/core/random.hpp"
#include "tmoe/moe/config.hpp"
#include "tmoe/moe/routing_plan.hpp"

namespace tmoe::moe {

/// Per-call switches of the gate.
struct GateArgs {
  bool training = false;        ///< enables the random second-expert policy
  std::uint64_t seed = 0;       ///< Philox key for random choices
  std::uint64_t rng_offset = 0; ///< counter offset: give each layer and step its own
};

/// Builds the plan on the host.
/// @param probs    (G, E) router probabilities, one row per gate row (token, sequence or task)
/// @param logits   (G, E) router logits, for the z-loss
/// @param gate_row (N) gate row of each token, -1 for padding
/// @param group_size tokens per capacity group; 0 means the whole call is one group
template <class Cfg, class Real>
void build_plan(CpuContext& ctx, RoutingPlan<Real, Cpu>& plan, ConstTensorView<Real, Cpu> probs,
                ConstTensorView<Real, Cpu> logits, const std::int32_t* gate_row, std::int64_t n_tokens,
                std::int64_t group_size, const GateArgs& args) {
  constexpr int E = Cfg::experts;
  constexpr int K = Cfg::top_k;
  using Capacity = typename Cfg::capacity_type;
  using Second = typename Cfg::second_expert_type;
  using Norm = typename Cfg::normalize_type;

  const std::int64_t N = n_tokens;
  const std::int64_t S = group_size > 0 ? group_size : std::max<std::int64_t>(N, 1);
  const std::int64_t G = probs.dim(0);

  plan.tokens = N;
  plan.top_k = K;
  plan.experts = E;
  plan.group_size = S;
  plan.capacity = Capacity::dropless ? -1 : Capacity::capacity(std::min(S, std::max<std::int64_t>(N, 0)), E);
  plan.expert.resize({N, K});
  plan.gate.resize({N, K});
  plan.slot.resize({N, K});
  plan.dispatched.resize({N, K});
  plan.row.resize({N, K});
  plan.expert_count.resize({E});
  plan.expert_offset.resize({E + 1});

  // 1. Top-K per gate row (a sentence or task is decided once).
  Tensor<Real, Cpu> top_val({G, K});
  Tensor<std::int32_t, Cpu> top_idx({G, K});
  backend::cpu::top_k_rows<K, Real>(ctx, top_val, top_idx, probs);

  std::int32_t* expert = plan.expert.data();
  Real* gate = plan.gate.data();
  std::int64_t* slot = plan.slot.data();
  std::uint8_t* disp = plan.dispatched.data();

  // 2. Choices and normalized weights per token; 4. random policy.
  std::vector<Real> norm(static_cast<std::size_t>(N * K));
  std::vector<std::uint8_t> taken(static_cast<std::size_t>(N * K));
  for (std::int64_t n = 0; n < N; ++n) {
    const std::int32_t g = gate_row[n];
    if (g < 0) {
      for (int j = 0; j < K; ++j) {
        expert[n * K + j] = -1;
        taken[static_cast<std::size_t>(n * K + j)] = 0;
      }
      continue;
    }
    Real sum = 0;
    for (int j = 0; j < K; ++j) sum += top_val.data()[g * K + j];
    const Real den = sum + Real(1e-9);
    for (int j = 0; j < K; ++j) {
      expert[n * K + j] = top_idx.data()[g * K + j];
      const Real gj = top_val.data()[g * K + j] / den;
      norm[static_cast<std::size_t>(n * K + j)] = gj;
      bool take = true;
      if constexpr (Second::random) {
        if (args.training && j >= 1) {
          const Philox rng(args.seed);
          const auto words = rng.block(static_cast<std::uint32_t>(n), static_cast<std::uint32_t>((j - 1) / 4),
                                       static_cast<std::uint32_t>(args.rng_offset),
                                       static_cast<std::uint32_t>(args.rng_offset >> 32));
          const Real r = static_cast<Real>(uniform01(words[static_cast<std::size_t>((j - 1) % 4)]));
          take = r < gj / std::max(static_cast<Real>(Second::threshold), Real(1e-9));
        }
      }
      taken[static_cast<std::size_t>(n * K + j)] = take ? 1 : 0;
    }
  }

  // 3. Aux loss per group (top-1 before capacity) and z-loss over valid tokens.
  double aux = 0, z = 0;
  std::int64_t groups = 0, valid = 0;
  for (std::int64_t g0 = 0; g0 < N; g0 += S, ++groups) {
    const std::int64_t g1 = std::min(N, g0 + S);
    double f[E] = {}, m[E] = {};
    for (std::int64_t n = g0; n < g1; ++n) {
      if (gate_row[n] < 0) continue;
      f[expert[n * K]] += 1;
      const Real* p = probs.data() + static_cast<std::int64_t>(gate_row[n]) * E;
      for (int e = 0; e < E; ++e) m[e] += static_cast<double>(p[e]);
    }
    const double s = static_cast<double>(g1 - g0);
    double acc = 0;
    for (int e = 0; e < E; ++e) acc += (f[e] / s) * (m[e] / s);
    aux += E * acc;
  }
  plan.aux_loss = groups ? aux / static_cast<double>(groups) : 0.0;
  // logsumexp once per gate row: since p = softmax(l), lse = l[e1] - log p[e1], and p[e1] >= 1/E never underflows.
  std::vector<double> lse(static_cast<std::size_t>(G));
  for (std::int64_t g = 0; g < G; ++g) {
    const std::int32_t e1 = top_idx.data()[g * K];
    lse[static_cast<std::size_t>(g)] = static_cast<double>(logits.data()[g * E + e1]) -
                                       std::log(static_cast<double>(probs.data()[g * E + e1]));
  }
  for (std::int64_t n = 0; n < N; ++n) {
    if (gate_row[n] < 0) continue;
    const double l = lse[static_cast<std::size_t>(gate_row[n])];
    z += l * l;
    ++valid;
  }
  plan.z_loss = valid ? z / static_cast<double>(valid) : 0.0;

  // 5. Capacity, k-major within each group.
  const std::int64_t C = Capacity::dropless ? std::numeric_limits<std::int64_t>::max() : plan.capacity;
  for (std::int64_t g0 = 0; g0 < N; g0 += S) {
    const std::int64_t g1 = std::min(N, g0 + S);
    std::int64_t kept_before[E] = {};
    for (int j = 0; j < K; ++j) {
      std::int64_t seen[E] = {};
      for (std::int64_t n = g0; n < g1; ++n) {
        const std::int64_t i = n * K + j;
        if (expert[i] < 0 || !taken[static_cast<std::size_t>(i)]) {
          slot[i] = -1;
          disp[i] = 0;
          continue;
        }
        const std::int64_t pos = kept_before[expert[i]] + seen[expert[i]]++;
        slot[i] = pos;
        disp[i] = pos < C ? 1 : 0;
      }
      for (int e = 0; e < E; ++e) {
        kept_before[e] += std::min(seen[e], std::max<std::int64_t>(C - kept_before[e], 0));
      }
    }
  }

  // 6. Final weights. Padding tokens have nothing dispatched, so the same expressions give them zeros. (No branch
  // on padding: g++ 12 at -O3 with AVX-512 vectorized the per-token form with that branch into masked loads that
  // took other arrays' values for some second choices; tmoe_tests_native builds tests/cpu/test_gate_plan.cpp with
  // -march=native to keep it honest.)
  if constexpr (std::is_same_v<Norm, NoNormalize>) {
    for (std::int64_t i = 0; i < N * K; ++i) {
      gate[i] = disp[i] ? probs.data()[static_cast<std::int64_t>(gate_row[i / K]) * E + expert[i]] : Real(0);
    }
  } else if constexpr (std::is_same_v<Norm, NormalizeBeforeDrop>) {
    for (std::int64_t i = 0; i < N * K; ++i) gate[i] = disp[i] ? norm[static_cast<std::size_t>(i)] : Real(0);
  } else {
    for (std::int64_t n = 0; n < N; ++n) {
      Real d = 0;
      for (int j = 0; j < K; ++j) d += disp[n * K + j] ? norm[static_cast<std::size_t>(n * K + j)] : Real(0);
      for (int j = 0; j < K; ++j) {
        gate[n * K + j] = (disp[n * K + j] && d > 0) ? norm[static_cast<std::size_t>(n * K + j)] / d : Real(0);
      }
    }
  }

  // Dispatch layout: stable counting sort by expert over k-major numbering.
  std::int64_t* count = plan.expert_count.data();
  std::int64_t* offset = plan.expert_offset.data();
  std::fill(count, count + E, 0);
  for (std::int64_t i = 0; i < N * K; ++i) count[expert[i] < 0 ? 0 : expert[i]] += disp[i];
  offset[0] = 0;
  for (int e = 0; e < E; ++e) offset[e + 1] = offset[e] + count[e];
  const std::int64_t R = offset[E];
  plan.row_token.resize({R});
  plan.row_choice.resize({R});
  std::int64_t fill[E] = {};
  for (int j = 0; j < K; ++j) {
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int64_t i = n * K + j;
      if (!disp[i]) {
        plan.row.data()[i] = -1;
        continue;
      }
      const std::int64_t r = offset[expert[i]] + fill[expert[i]]++;
      plan.row.data()[i] = r;
      plan.row_token.data()[r] = n;
      plan.row_choice.data()[r] = static_cast<std::int32_t>(j);
    }
  }
}

}  // namespace tmoe::moe
