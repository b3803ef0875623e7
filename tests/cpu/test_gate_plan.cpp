// The routing plan (moe::build_plan) field by field against a plain reference written here from paper-spec 2.3:
// top-K with ties to the lower expert, the three normalizations, k-major capacity per group, the random policy,
// padding, and the expert-contiguous row numbering.
//
// This file is also compiled into tmoe_tests_native with -O3 -march=native (tests/CMakeLists.txt): g++ 12 at -O3
// with AVX-512 once vectorized the plan's final-weights loop into masked loads that read other arrays' values for
// second choices next to padding (an address-dependent result: training was not reproducible from its seed).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

namespace {

struct PlanCase {
  std::int64_t N = 37;
  std::int64_t group_size = 0;  // 0: one group
  int pad_every = 0;            // every pad_every-th token is padding (0: none)
  bool training = false;
  std::uint64_t seed = 11;
};

/// The reference plan, in double where it computes.
struct RefPlan {
  std::vector<std::int32_t> expert;
  std::vector<double> gate;
  std::vector<std::int64_t> slot, row, count, row_token;
  std::vector<std::uint8_t> dispatched;
  std::vector<std::int32_t> row_choice;
};

enum class Norm { kBefore, kAfter, kNone };

RefPlan reference_plan(const std::vector<float>& probs, const std::vector<std::int32_t>& gate_row, int E, int K,
                       Norm norm, bool dropless, std::int64_t capacity, std::int64_t S, bool random_second,
                       double threshold, bool training, std::uint64_t seed) {
  const auto N = static_cast<std::int64_t>(gate_row.size());
  RefPlan r;
  const auto NK = static_cast<std::size_t>(N * K);
  r.expert.assign(NK, -1);
  r.gate.assign(NK, 0.0);
  r.slot.assign(NK, -1);
  r.row.assign(NK, -1);
  r.dispatched.assign(NK, 0);
  r.count.assign(static_cast<std::size_t>(E), 0);
  std::vector<double> normalized(NK, 0.0);
  std::vector<bool> taken(NK, false);
  for (std::int64_t n = 0; n < N; ++n) {
    if (gate_row[static_cast<std::size_t>(n)] < 0) continue;
    const float* p = probs.data() + static_cast<std::int64_t>(gate_row[static_cast<std::size_t>(n)]) * E;
    std::vector<bool> used(static_cast<std::size_t>(E), false);
    double sum = 0;
    for (int j = 0; j < K; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        if (!used[static_cast<std::size_t>(e)] && (best < 0 || p[e] > p[best])) best = e;
      }
      used[static_cast<std::size_t>(best)] = true;
      r.expert[static_cast<std::size_t>(n * K + j)] = best;
      sum += p[best];
    }
    for (int j = 0; j < K; ++j) {
      const auto i = static_cast<std::size_t>(n * K + j);
      normalized[i] = p[r.expert[i]] / (sum + 1e-9);
      bool take = true;
      if (random_second && training && j >= 1) {
        const Philox rng(seed);
        const auto w = rng.block(static_cast<std::uint32_t>(n), static_cast<std::uint32_t>((j - 1) / 4), 0u, 0u);
        take = uniform01(w[static_cast<std::size_t>((j - 1) % 4)]) < normalized[i] / std::max(threshold, 1e-9);
      }
      taken[i] = take;
    }
  }
  // Capacity: within each group, every first choice queues before any second choice.
  const std::int64_t group = S > 0 ? S : std::max<std::int64_t>(N, 1);
  for (std::int64_t g0 = 0; g0 < N; g0 += group) {
    const std::int64_t g1 = std::min(N, g0 + group);
    std::vector<std::int64_t> queued(static_cast<std::size_t>(E), 0), kept(static_cast<std::size_t>(E), 0);
    for (int j = 0; j < K; ++j) {
      for (std::int64_t n = g0; n < g1; ++n) {
        const auto i = static_cast<std::size_t>(n * K + j);
        if (r.expert[i] < 0 || !taken[i]) continue;
        const auto e = static_cast<std::size_t>(r.expert[i]);
        r.slot[i] = queued[e]++;
        r.dispatched[i] = (dropless || r.slot[i] < capacity) ? 1 : 0;
        kept[e] += r.dispatched[i];
      }
      // A later choice queues behind what an earlier choice kept, not behind what it dropped.
      for (int e = 0; e < E; ++e) queued[static_cast<std::size_t>(e)] = kept[static_cast<std::size_t>(e)];
    }
  }
  for (std::int64_t n = 0; n < N; ++n) {
    double kept_sum = 0;
    for (int j = 0; j < K; ++j) {
      const auto i = static_cast<std::size_t>(n * K + j);
      if (r.dispatched[i]) kept_sum += normalized[i];
    }
    for (int j = 0; j < K; ++j) {
      const auto i = static_cast<std::size_t>(n * K + j);
      if (!r.dispatched[i]) continue;
      const float* p = probs.data() + static_cast<std::int64_t>(gate_row[static_cast<std::size_t>(n)]) * E;
      r.gate[i] = norm == Norm::kNone     ? p[r.expert[i]]
                  : norm == Norm::kBefore ? normalized[i]
                                          : normalized[i] / kept_sum;
    }
  }
  // Rows: expert-major, and within an expert k-major then token order.
  for (std::size_t i = 0; i < NK; ++i) {
    if (r.dispatched[i]) ++r.count[static_cast<std::size_t>(r.expert[i])];
  }
  std::vector<std::int64_t> next(static_cast<std::size_t>(E), 0);
  for (std::size_t e = 1; e < next.size(); ++e) next[e] = next[e - 1] + r.count[e - 1];
  const std::int64_t R = next.back() + r.count.back();
  r.row_token.assign(static_cast<std::size_t>(R), -1);
  r.row_choice.assign(static_cast<std::size_t>(R), -1);
  for (int j = 0; j < K; ++j) {
    for (std::int64_t n = 0; n < N; ++n) {
      const auto i = static_cast<std::size_t>(n * K + j);
      if (!r.dispatched[i]) continue;
      const std::int64_t row = next[static_cast<std::size_t>(r.expert[i])]++;
      r.row[i] = row;
      r.row_token[static_cast<std::size_t>(row)] = n;
      r.row_choice[static_cast<std::size_t>(row)] = j;
    }
  }
  return r;
}

template <class Cfg>
void check_plan(const PlanCase& pc) {
  constexpr int E = Cfg::experts, K = Cfg::top_k;
  using Cap = typename Cfg::capacity_type;
  using NormT = typename Cfg::normalize_type;
  using Second = typename Cfg::second_expert_type;
  const Norm norm = std::is_same_v<NormT, NormalizeBeforeDrop> ? Norm::kBefore
                    : std::is_same_v<NormT, NormalizeAfterDrop> ? Norm::kAfter
                                                                      : Norm::kNone;
  CAPTURE(pc.N);
  CAPTURE(pc.group_size);
  CAPTURE(pc.pad_every);
  CAPTURE(pc.training);
  CpuContext ctx(1);
  const std::int64_t N = pc.N;
  Tensor<float, Cpu> logits({N, E}), probs({N, E});
  test::fill_uniform<float>(logits, pc.seed, -3.0, 3.0);
  Ops<Cpu>::softmax<float>(ctx, probs, logits);
  std::vector<std::int32_t> gate_row(static_cast<std::size_t>(N));
  for (std::int64_t n = 0; n < N; ++n) {
    const bool pad = pc.pad_every > 0 && n % pc.pad_every == pc.pad_every - 1;
    gate_row[static_cast<std::size_t>(n)] = pad ? -1 : static_cast<std::int32_t>(n);
  }
  moe::RoutingPlan<float, Cpu> plan;
  // A plan reused from a bigger call must not leak into this one.
  {
    Tensor<float, Cpu> l2({N + 9, E}), p2({N + 9, E});
    test::fill_uniform<float>(l2, pc.seed + 1, -3.0, 3.0);
    Ops<Cpu>::softmax<float>(ctx, p2, l2);
    std::vector<std::int32_t> rows2(static_cast<std::size_t>(N + 9));
    for (std::int64_t n = 0; n < N + 9; ++n) rows2[static_cast<std::size_t>(n)] = static_cast<std::int32_t>(n);
    moe::build_plan<Cfg, float>(ctx, plan, p2, l2, rows2.data(), N + 9, pc.group_size, {});
  }
  moe::build_plan<Cfg, float>(ctx, plan, probs, logits, gate_row.data(), N, pc.group_size,
                              {.training = pc.training, .seed = pc.seed, .rng_offset = 0});
  const std::int64_t S = pc.group_size > 0 ? pc.group_size : N;
  const std::int64_t capacity = Cap::dropless ? -1 : Cap::capacity(std::min(S, N), E);
  std::vector<float> pv(probs.data(), probs.data() + probs.numel());
  const RefPlan ref = reference_plan(pv, gate_row, E, K, norm, Cap::dropless, capacity, pc.group_size, Second::random,
                                     Second::threshold, pc.training, pc.seed);

  REQUIRE(plan.tokens == N);
  REQUIRE(plan.expert.numel() == N * K);
  std::int64_t mismatches = 0;
  for (std::int64_t i = 0; i < N * K; ++i) {
    const auto u = static_cast<std::size_t>(i);
    const double g = plan.gate.data()[i];
    const bool ok = plan.expert.data()[i] == ref.expert[u] && plan.dispatched.data()[i] == ref.dispatched[u] &&
                    plan.slot.data()[i] == ref.slot[u] && plan.row.data()[i] == ref.row[u] &&
                    std::abs(g - ref.gate[u]) <= 1e-6 * std::max(1.0, std::abs(ref.gate[u])) &&
                    (ref.gate[u] != 0.0 || g == 0.0);
    if (!ok && mismatches++ < 4) {
      FAIL_CHECK("choice " << i << " (token " << i / K << ", j " << i % K << "): expert " << plan.expert.data()[i]
                           << " vs " << ref.expert[u] << ", dispatched " << int{plan.dispatched.data()[i]} << " vs "
                           << int{ref.dispatched[u]} << ", slot " << plan.slot.data()[i] << " vs " << ref.slot[u]
                           << ", row " << plan.row.data()[i] << " vs " << ref.row[u] << ", gate " << g << " vs "
                           << ref.gate[u]);
    }
  }
  CHECK(mismatches == 0);
  for (int e = 0; e < E; ++e) CHECK(plan.expert_count.data()[e] == ref.count[static_cast<std::size_t>(e)]);
  REQUIRE(plan.rows() == static_cast<std::int64_t>(ref.row_token.size()));
  for (std::int64_t r = 0; r < plan.rows(); ++r) {
    CHECK(plan.row_token.data()[r] == ref.row_token[static_cast<std::size_t>(r)]);
    CHECK(plan.row_choice.data()[r] == ref.row_choice[static_cast<std::size_t>(r)]);
  }
}

template <class Cfg>
void check_plan_cases() {
  for (const std::int64_t N : {0, 1, 5, 37, 64, 203}) {
    for (const int pad_every : {0, 3, 7}) {
      for (const std::int64_t group : {std::int64_t{0}, std::int64_t{16}}) {
        for (const bool training : {false, true}) {
          check_plan<Cfg>({.N = N, .group_size = group, .pad_every = pad_every, .training = training,
                           .seed = 11 + static_cast<std::uint64_t>(N)});
        }
      }
    }
  }
}

}  // namespace

TEST_SUITE("moe routing plan") {
  TEST_CASE("token routing, E=8, K=2, normalized before drops, capacity 2S/E (the paper's token layers)") {
    check_plan_cases<moe::Config<route::Token, Experts<8>, TopK<2>, CapacityFactor<2>>>();
  }
  TEST_CASE("normalized after drops, capacity 5S/4E, random second expert (threshold 1/2)") {
    check_plan_cases<moe::Config<route::Token, Experts<5>, TopK<2>, CapacityFactor<5, 4>, NormalizeAfterDrop,
                                 SecondExpertRandom<1, 2>>>();
  }
  TEST_CASE("raw probabilities (Switch top-1), capacity S/E: overflow drops whole tokens") {
    check_plan_cases<moe::Config<route::Token, Experts<8>, TopK<1>, CapacityFactor<1>, NoNormalize>>();
  }
  TEST_CASE("K = 3 of E = 5 with random third choices, normalized after drops, a fixed capacity of 4") {
    check_plan_cases<moe::Config<route::Token, Experts<5>, TopK<3>, CapacityFixed<4>, NormalizeAfterDrop,
                                 SecondExpertRandom<1, 5>>>();
  }
  TEST_CASE("one expert, K = E = 4 dropless") {
    check_plan_cases<moe::Config<route::Token, Experts<1>, TopK<1>, CapacityFactor<3, 2>>>();
    check_plan_cases<moe::Config<route::Token, Experts<4>, TopK<4>, Dropless>>();
  }
}
