#pragma once
/// @file moe_reference.hpp
/// @brief The test oracle: a plain-loop MoE forward in double precision, written straight from paper-spec
/// section 2.3 (lingvo Top2GatingOnLogits, generalized to K) and 1.3 (gate inputs per granularity).
///
/// Everything is a run-time option and every step is a loop over explicit indices, in the order the spec writes
/// it: one-hot masks, exclusive cumulative sums over the group, masks multiplied by (position < C). It calls no
/// tmoe code except the Philox generator (tested against its known-answer vectors), so it can judge the layer.

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "tmoe/core/random.hpp"

namespace tmoe::reference {

struct MoeOptions {
  enum class Route { kToken, kSentence, kTask };
  enum class Capacity { kFactor, kFixed, kDropless };
  enum class Normalize { kBeforeDrop, kAfterDrop, kNone };
  enum class Activation { kRelu, kGelu, kSilu };

  Route route = Route::kToken;
  int experts = 1;
  int top_k = 1;
  Capacity capacity = Capacity::kFactor;
  double capacity_factor = 2.0;       // kFactor: C = max(floor(S * cf / E), min), rounded up to `multiple`
  std::int64_t capacity_min = 1;
  std::int64_t capacity_multiple = 1;
  std::int64_t capacity_fixed = 0;    // kFixed
  bool second_random = false;         // random policy for choices j >= 2, training only
  double second_threshold = 0.5;
  Normalize normalize = Normalize::kBeforeDrop;
  Activation activation = Activation::kRelu;
  std::int64_t group_size = 0;        // 0: one group
  bool training = false;
  std::uint64_t seed = 0, rng_offset = 0;
};

struct MoeResult {
  std::vector<double> y;                 // (N, C)
  std::vector<int> expert;               // (N, K), -1 padding
  std::vector<double> gate;              // (N, K) final combine weight
  std::vector<int> dispatched;           // (N, K)
  std::vector<std::int64_t> position;    // (N, K) queue position, -1 if padding / not taken
  std::int64_t capacity = -1;
  double aux_loss = 0, z_loss = 0;
};

inline double reference_activation(MoeOptions::Activation a, double x) {
  switch (a) {
    case MoeOptions::Activation::kRelu: return x > 0 ? x : 0;
    case MoeOptions::Activation::kGelu: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case MoeOptions::Activation::kSilu: return x / (1 + std::exp(-x));
  }
  return 0;
}

/// x (B*T, C); seg (B*T) or empty (0 = padding); task (B*T) per token (ignored for padding);
/// wg (E, C); temb (tasks, C); wi (E, F, C); wo (E, C, F).
inline MoeResult moe_forward(const MoeOptions& o, std::int64_t B, std::int64_t T, std::int64_t C, std::int64_t F,
                             const std::vector<double>& x, const std::vector<int>& seg, const std::vector<int>& task,
                             const std::vector<double>& wg, const std::vector<double>& temb,
                             const std::vector<double>& wi, const std::vector<double>& wo) {
  const std::int64_t N = B * T;
  const int E = o.experts, K = o.top_k;
  auto at = [](auto& v, std::int64_t i) -> auto& { return v[static_cast<std::size_t>(i)]; };
  auto pad = [&](std::int64_t n) { return !seg.empty() && at(seg, n) == 0; };

  // Gate input per token (paper-spec 1.3).
  std::vector<double> gin(static_cast<std::size_t>(N * C), 0.0);
  for (std::int64_t n = 0; n < N; ++n) {
    if (pad(n)) continue;
    for (std::int64_t c = 0; c < C; ++c) {
      double v = 0;
      if (o.route == MoeOptions::Route::kToken) {
        v = at(x, n * C + c);
      } else if (o.route == MoeOptions::Route::kTask) {
        v = at(temb, at(task, n) * C + c);
      } else {
        // Mean over the tokens of the same (row, segment).
        const std::int64_t b = n / T;
        double s = 0;
        std::int64_t cnt = 0;
        for (std::int64_t t = 0; t < T; ++t) {
          const std::int64_t m = b * T + t;
          if (pad(m)) continue;
          if (!seg.empty() && at(seg, m) != at(seg, n)) continue;
          s += at(x, m * C + c);
          ++cnt;
        }
        v = s / static_cast<double>(cnt);
      }
      at(gin, n * C + c) = v;
    }
  }

  // logits = gin . Wg, p = softmax(logits).
  std::vector<double> logits(static_cast<std::size_t>(N * E)), p(static_cast<std::size_t>(N * E));
  for (std::int64_t n = 0; n < N; ++n) {
    for (int e = 0; e < E; ++e) {
      double s = 0;
      for (std::int64_t c = 0; c < C; ++c) s += at(gin, n * C + c) * at(wg, e * C + c);
      at(logits, n * E + e) = s;
    }
    double mx = -INFINITY, z = 0;
    for (int e = 0; e < E; ++e) mx = std::max(mx, at(logits, n * E + e));
    for (int e = 0; e < E; ++e) z += std::exp(at(logits, n * E + e) - mx);
    for (int e = 0; e < E; ++e) at(p, n * E + e) = std::exp(at(logits, n * E + e) - mx) / z;
  }

  MoeResult res;
  res.expert.assign(static_cast<std::size_t>(N * K), -1);
  res.gate.assign(static_cast<std::size_t>(N * K), 0.0);
  res.dispatched.assign(static_cast<std::size_t>(N * K), 0);
  res.position.assign(static_cast<std::size_t>(N * K), -1);

  // Choices: e_j = argmax over experts not yet chosen (first maximum wins).
  std::vector<double> g(static_cast<std::size_t>(N * K), 0.0);
  for (std::int64_t n = 0; n < N; ++n) {
    if (pad(n)) continue;
    for (int j = 0; j < K; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool used = false;
        for (int i = 0; i < j; ++i) used = used || at(res.expert, n * K + i) == e;
        if (used) continue;
        if (best < 0 || at(p, n * E + e) > at(p, n * E + best)) best = e;
      }
      at(res.expert, n * K + j) = best;
      at(g, n * K + j) = at(p, n * E + best);
    }
  }

  const std::int64_t S = o.group_size > 0 ? o.group_size : std::max<std::int64_t>(N, 1);
  const std::int64_t Sc = std::min(S, N);
  std::int64_t cap = std::numeric_limits<std::int64_t>::max();
  if (o.capacity == MoeOptions::Capacity::kFactor) {
    cap = static_cast<std::int64_t>(std::floor(static_cast<double>(Sc) * o.capacity_factor / E + 1e-12));
    cap = std::max(cap, o.capacity_min);
    cap = (cap + o.capacity_multiple - 1) / o.capacity_multiple * o.capacity_multiple;
    res.capacity = cap;
  } else if (o.capacity == MoeOptions::Capacity::kFixed) {
    cap = o.capacity_fixed;
    res.capacity = cap;
  }

  // Normalize before dropping (always computed: the random policy tests the normalized weight).
  std::vector<double> gn(static_cast<std::size_t>(N * K), 0.0);
  for (std::int64_t n = 0; n < N; ++n) {
    if (pad(n)) continue;
    double den = 1e-9;
    for (int j = 0; j < K; ++j) den += at(g, n * K + j);
    for (int j = 0; j < K; ++j) at(gn, n * K + j) = at(g, n * K + j) / den;
  }

  // Aux loss per group, from the top-1 one-hot before capacity; z-loss over valid tokens.
  double aux = 0;
  std::int64_t groups = 0;
  for (std::int64_t g0 = 0; g0 < N; g0 += S, ++groups) {
    const std::int64_t g1 = std::min(N, g0 + S);
    double acc = 0;
    for (int e = 0; e < E; ++e) {
      double f = 0, m = 0;
      for (std::int64_t n = g0; n < g1; ++n) {
        if (pad(n)) continue;
        f += at(res.expert, n * K) == e ? 1.0 : 0.0;
        m += at(p, n * E + e);
      }
      const double s = static_cast<double>(g1 - g0);
      acc += (f / s) * (m / s);
    }
    aux += acc * E;
  }
  res.aux_loss = groups ? aux / static_cast<double>(groups) : 0.0;
  double zsum = 0;
  std::int64_t valid = 0;
  for (std::int64_t n = 0; n < N; ++n) {
    if (pad(n)) continue;
    double mx = -INFINITY, z = 0;
    for (int e = 0; e < E; ++e) mx = std::max(mx, at(logits, n * E + e));
    for (int e = 0; e < E; ++e) z += std::exp(at(logits, n * E + e) - mx);
    zsum += (mx + std::log(z)) * (mx + std::log(z));
    ++valid;
  }
  res.z_loss = valid ? zsum / static_cast<double>(valid) : 0.0;

  // Masks m_j (one-hot of choice j, padding excluded), random take for j >= 2.
  std::vector<int> m(static_cast<std::size_t>(N * K), 0);
  for (std::int64_t n = 0; n < N; ++n) {
    if (pad(n)) continue;
    for (int j = 0; j < K; ++j) {
      bool take = true;
      if (o.second_random && o.training && j >= 1) {
        const Philox rng(o.seed);
        const auto w = rng.block(static_cast<std::uint32_t>(n), static_cast<std::uint32_t>((j - 1) / 4),
                                 static_cast<std::uint32_t>(o.rng_offset), static_cast<std::uint32_t>(o.rng_offset >> 32));
        const double r = static_cast<double>(uniform01(w[static_cast<std::size_t>((j - 1) % 4)]));
        take = r < at(gn, n * K + j) / std::max(o.second_threshold, 1e-9);
      }
      at(m, n * K + j) = take ? 1 : 0;
    }
  }

  // Capacity: pos_j = exclusive cumsum over the group of m_j at that expert + kept counts of earlier choices.
  for (std::int64_t g0 = 0; g0 < N; g0 += S) {
    const std::int64_t g1 = std::min(N, g0 + S);
    std::vector<std::int64_t> kept_before(static_cast<std::size_t>(E), 0);
    for (int j = 0; j < K; ++j) {
      for (std::int64_t n = g0; n < g1; ++n) {
        if (!at(m, n * K + j)) continue;
        const int e = at(res.expert, n * K + j);
        std::int64_t cumsum = 0;
        for (std::int64_t q = g0; q < n; ++q) cumsum += (at(m, q * K + j) && at(res.expert, q * K + j) == e) ? 1 : 0;
        const std::int64_t pos = cumsum + at(kept_before, e);
        at(res.position, n * K + j) = pos;
        at(res.dispatched, n * K + j) = pos < cap ? 1 : 0;
      }
      for (int e = 0; e < E; ++e) {
        for (std::int64_t n = g0; n < g1; ++n) {
          if (at(res.expert, n * K + j) == e && at(res.dispatched, n * K + j)) ++at(kept_before, e);
        }
      }
    }
  }

  // Final gates.
  for (std::int64_t n = 0; n < N; ++n) {
    if (pad(n)) continue;
    double surv = 0;
    for (int j = 0; j < K; ++j) surv += at(res.dispatched, n * K + j) ? at(gn, n * K + j) : 0.0;
    for (int j = 0; j < K; ++j) {
      if (!at(res.dispatched, n * K + j)) continue;
      switch (o.normalize) {
        case MoeOptions::Normalize::kBeforeDrop: at(res.gate, n * K + j) = at(gn, n * K + j); break;
        case MoeOptions::Normalize::kAfterDrop: at(res.gate, n * K + j) = at(gn, n * K + j) / surv; break;
        case MoeOptions::Normalize::kNone: at(res.gate, n * K + j) = at(g, n * K + j); break;
      }
    }
  }

  // y_n = sum_j gate_j * wo_e * act(wi_e * x_n).
  res.y.assign(static_cast<std::size_t>(N * C), 0.0);
  std::vector<double> h(static_cast<std::size_t>(F));
  for (std::int64_t n = 0; n < N; ++n) {
    for (int j = 0; j < K; ++j) {
      if (!at(res.dispatched, n * K + j)) continue;
      const std::int64_t e = at(res.expert, n * K + j);
      for (std::int64_t f = 0; f < F; ++f) {
        double s = 0;
        for (std::int64_t c = 0; c < C; ++c) s += at(wi, (e * F + f) * C + c) * at(x, n * C + c);
        at(h, f) = reference_activation(o.activation, s);
      }
      for (std::int64_t c = 0; c < C; ++c) {
        double s = 0;
        for (std::int64_t f = 0; f < F; ++f) s += at(wo, (e * C + c) * F + f) * at(h, f);
        at(res.y, n * C + c) += at(res.gate, n * K + j) * s;
      }
    }
  }
  return res;
}

}  // namespace tmoe::reference
