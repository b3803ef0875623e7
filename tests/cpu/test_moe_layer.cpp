// The MoE layer at every granularity against the plain-loop double reference (reference/moe_reference.hpp),
// plus the edge cases and invariants of the routing plan.

#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <set>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/reference/moe_reference.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;
using reference::MoeOptions;

namespace {

struct Case {
  std::int64_t B = 1, T = 37, C = 24, F = 40, tasks = 0, group_size = 0;
  std::vector<int> seg;   // (B*T) or empty
  std::vector<int> task;  // (B*T) per token, or (B) per row when task_per_row
  bool task_per_row = false;
  bool training = false;
  std::uint64_t seed = 7, rng_offset = 0;
  std::uint64_t data_seed = 1;
  int threads = 2;
};

template <class S>
std::vector<double> as_double(ConstTensorView<S, Cpu> v) {
  return test::to_double<S>(v);
}

template <class Cfg, class S>
struct Run {
  moe::Layer<Cfg, S, Cpu> layer;
  Tensor<S, Cpu> x, y;
  typename moe::Layer<Cfg, S, Cpu>::Cache cache;
  reference::MoeResult ref;
};

// Runs the layer and the reference on the same random weights and inputs.
template <class Cfg, class S>
std::unique_ptr<Run<Cfg, S>> run_both(const Case& c, MoeOptions o) {
  auto run = std::unique_ptr<Run<Cfg, S>>(new Run<Cfg, S>{
      moe::Layer<Cfg, S, Cpu>({.d_model = c.C, .d_ff = c.F, .num_tasks = c.tasks, .group_size = c.group_size}),
      Tensor<S, Cpu>({c.B, c.T, c.C}), Tensor<S, Cpu>({c.B, c.T, c.C}), {}, {}});
  run->layer.init(c.data_seed + 100);
  test::fill_uniform<S>(run->x, c.data_seed, -2.0, 2.0);
  // Poison the output so unwritten elements show.
  for (auto& v : run->y.view().span()) v = S(12345);

  Tensor<std::int32_t, Cpu> seg({c.B, c.T});
  Tensor<std::int32_t, Cpu> task(c.task_per_row ? Shape{c.B} : Shape{c.B, c.T});
  for (std::size_t i = 0; i < c.seg.size(); ++i) seg.data()[i] = c.seg[i];
  for (std::size_t i = 0; i < c.task.size(); ++i) task.data()[i] = c.task[i];
  moe::Input<S, Cpu> in{.x = run->x};
  if (!c.seg.empty()) in.segment_ids = seg;
  if (!c.task.empty()) in.task_ids = task;
  CpuContext ctx(c.threads);
  run->layer.forward(ctx, in, run->y, run->cache,
                     {.training = c.training, .seed = c.seed, .rng_offset = c.rng_offset});

  o.group_size = c.group_size;
  o.training = c.training;
  o.seed = c.seed;
  o.rng_offset = c.rng_offset;
  std::vector<int> task_tok = c.task;
  if (c.task_per_row) {
    task_tok.assign(static_cast<std::size_t>(c.B * c.T), 0);
    for (std::int64_t n = 0; n < c.B * c.T; ++n) task_tok[static_cast<std::size_t>(n)] = c.task[static_cast<std::size_t>(n / c.T)];
  }
  auto params = run->layer.parameters();
  std::vector<double> wg = as_double<S>(params[0].view), temb;
  std::size_t next = 1;
  if (o.route == MoeOptions::Route::kTask) temb = as_double<S>(params[next++].view);
  std::vector<double> wi = as_double<S>(params[next].view), wo = as_double<S>(params[next + 1].view);
  run->ref = reference::moe_forward(o, c.B, c.T, c.C, c.F, as_double<S>(run->x), c.seg, task_tok, wg, temb, wi, wo);
  return run;
}

// The layer's plan and output equal the reference's.
template <class Cfg, class S>
void check_against_reference(const Run<Cfg, S>& r, double tol) {
  const auto& plan = r.cache.plan;
  const auto& ref = r.ref;
  const std::int64_t NK = plan.tokens * plan.top_k;
  REQUIRE(static_cast<std::size_t>(NK) == ref.expert.size());
  CHECK(plan.capacity == ref.capacity);
  int mismatched = 0;
  for (std::int64_t i = 0; i < NK; ++i) {
    const auto u = static_cast<std::size_t>(i);
    if (plan.expert.data()[i] != ref.expert[u] || plan.dispatched.data()[i] != ref.dispatched[u] ||
        (ref.expert[u] >= 0 && plan.slot.data()[i] != ref.position[u])) {
      ++mismatched;
    }
    CHECK(double(plan.gate.data()[i]) == doctest::Approx(ref.gate[u]).epsilon(tol));
  }
  CHECK(mismatched == 0);
  const auto y = test::to_double<S>(r.y);
  CHECK(test::rel_error(y.data(), ref.y.data(), static_cast<std::int64_t>(y.size()), 1e-3) < tol);
  CHECK(plan.aux_loss == doctest::Approx(ref.aux_loss).epsilon(tol));
  CHECK(plan.z_loss == doctest::Approx(ref.z_loss).epsilon(tol));
}

MoeOptions options(MoeOptions::Route route, int E, int K) {
  MoeOptions o;
  o.route = route;
  o.experts = E;
  o.top_k = K;
  return o;
}

std::vector<int> padded_segments(std::int64_t B, std::int64_t T) {
  // Row b: sequence 1 of length T - 2b - 1, then (for b odd) sequence 2, then padding.
  std::vector<int> seg(static_cast<std::size_t>(B * T), 0);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = T - 2 * b - 1;
    for (std::int64_t t = 0; t < len; ++t) seg[static_cast<std::size_t>(b * T + t)] = (b % 2 == 1 && t >= len / 2) ? 2 : 1;
  }
  return seg;
}

}  // namespace

TEST_SUITE("moe_layer") {
  TEST_CASE_TEMPLATE("token routing matches the reference: N=37, C=24, F=40, E=5, K=2, cf 5/4", S, double, float) {
    using Cfg = moe::Config<route::Token, Experts<5>, TopK<2>, CapacityFactor<5, 4>>;
    auto o = options(MoeOptions::Route::kToken, 5, 2);
    o.capacity_factor = 1.25;
    Case c;
    auto r = run_both<Cfg, S>(c, o);
    CHECK(r->cache.plan.capacity == 9);
    CHECK(r->cache.plan.dropped() > 0);  // 74 choices for 5 x 9 slots: capacity binds
    check_against_reference(*r, std::is_same_v<S, double> ? 1e-12 : 1e-5);
  }

  TEST_CASE("every normalization, capacity and group option against the reference") {
    Case c;
    c.B = 3;
    c.T = 13;
    c.seg = padded_segments(3, 13);
    SUBCASE("NormalizeAfterDrop, fixed capacity 5, groups of 8 (ragged last group)") {
      using Cfg = moe::Config<route::Token, Experts<5>, TopK<2>, CapacityFixed<5>, NormalizeAfterDrop>;
      auto o = options(MoeOptions::Route::kToken, 5, 2);
      o.capacity = MoeOptions::Capacity::kFixed;
      o.capacity_fixed = 5;
      o.normalize = MoeOptions::Normalize::kAfterDrop;
      c.group_size = 8;
      auto r = run_both<Cfg, double>(c, o);
      CHECK(r->cache.plan.dropped() > 0);
      check_against_reference(*r, 1e-12);
    }
    SUBCASE("NoNormalize top-1 (Switch), cf 5/4") {
      using Cfg = moe::SwitchTop1<route::Token, 7>;
      auto o = options(MoeOptions::Route::kToken, 7, 1);
      o.capacity_factor = 1.25;
      o.normalize = MoeOptions::Normalize::kNone;
      auto r = run_both<Cfg, double>(c, o);
      check_against_reference(*r, 1e-12);
    }
    SUBCASE("lingvo legacy capacity: floor(S cf / E), at least 4, multiple of 4") {
      using Cfg = moe::LingvoLegacy<route::Token, 6, 3, 2>;  // cf 1.5: floor(39 * 1.5 / 6) = 9 -> 12
      auto o = options(MoeOptions::Route::kToken, 6, 2);
      o.capacity_factor = 1.5;
      o.capacity_min = 4;
      o.capacity_multiple = 4;
      auto r = run_both<Cfg, double>(c, o);
      CHECK(r->cache.plan.capacity == 12);
      check_against_reference(*r, 1e-12);
    }
    SUBCASE("K = 3 of E = 4 with GELU experts, groups of 10") {
      using Cfg = moe::Config<route::Token, Experts<4>, TopK<3>, CapacityFactor<3, 2>, ExpertActivation<nn::Gelu>>;
      auto o = options(MoeOptions::Route::kToken, 4, 3);
      o.capacity_factor = 1.5;
      o.activation = MoeOptions::Activation::kGelu;
      c.group_size = 10;
      auto r = run_both<Cfg, double>(c, o);
      check_against_reference(*r, 1e-12);
    }
    SUBCASE("SiLU experts, dropless") {
      using Cfg = moe::Config<route::Token, Experts<3>, TopK<2>, Dropless, ExpertActivation<nn::Silu>>;
      auto o = options(MoeOptions::Route::kToken, 3, 2);
      o.capacity = MoeOptions::Capacity::kDropless;
      o.activation = MoeOptions::Activation::kSilu;
      auto r = run_both<Cfg, double>(c, o);
      CHECK(r->cache.plan.dropped() == 0);
      check_against_reference(*r, 1e-12);
    }
  }

  TEST_CASE_TEMPLATE("sentence routing matches the reference, with padding and packed rows", S, double, float) {
    using Cfg = moe::Config<route::Sentence, Experts<5>, TopK<2>, CapacityFactor<3, 2>>;
    auto o = options(MoeOptions::Route::kSentence, 5, 2);
    o.capacity_factor = 1.5;
    Case c;
    c.B = 4;
    c.T = 11;
    c.seg = padded_segments(4, 11);
    auto r = run_both<Cfg, S>(c, o);
    check_against_reference(*r, std::is_same_v<S, double> ? 1e-12 : 1e-5);
    // Sequences are keyed by (row, segment): rows 0..3 have 1 + 2 + 1 + 2 sequences.
    CHECK(r->cache.gate_input.dim(0) == 6);
    // Every token of a sequence has the same experts.
    const auto& plan = r->cache.plan;
    for (std::int64_t n = 1; n < 44; ++n) {
      if (c.seg[static_cast<std::size_t>(n)] == 0 || n % 11 == 0) continue;
      if (c.seg[static_cast<std::size_t>(n)] != c.seg[static_cast<std::size_t>(n - 1)]) continue;
      for (int j = 0; j < 2; ++j) CHECK(plan.expert.data()[n * 2 + j] == plan.expert.data()[(n - 1) * 2 + j]);
    }
  }

  TEST_CASE_TEMPLATE("task routing matches the reference: contiguous, interleaved and per-row task ids", S, double,
                     float) {
    const double tol = std::is_same_v<S, double> ? 1e-12 : 1e-5;
    auto o = options(MoeOptions::Route::kTask, 6, 2);
    o.capacity = MoeOptions::Capacity::kDropless;
    using Cfg = moe::Config<route::Task, Experts<6>, TopK<2>>;  // default capacity for task routing: dropless
    static_assert(Cfg::dropless);
    Case c;
    c.B = 3;
    c.T = 13;
    c.tasks = 4;
    c.seg = padded_segments(3, 13);
    SUBCASE("one task per row, per-row ids") {
      c.task = {2, 0, 3};
      c.task_per_row = true;
    }
    SUBCASE("single task for the whole batch") {
      c.task = {1, 1, 1};
      c.task_per_row = true;
    }
    SUBCASE("interleaved per-token ids (not contiguous)") {
      c.task.resize(39);
      for (std::size_t i = 0; i < 39; ++i) c.task[i] = static_cast<int>((i * 7) % 4);
    }
    auto r = run_both<Cfg, S>(c, o);
    CHECK(r->cache.task_path);
    // Contiguous tasks run in place; interleaved ones are sorted by task once.
    CHECK(r->cache.task_order.empty() == c.task_per_row);
    check_against_reference(*r, tol);
    // Every valid token of a task has the task's experts.
    const auto& plan = r->cache.plan;
    std::vector<std::vector<int>> first(4);
    for (std::int64_t n = 0; n < 39; ++n) {
      if (c.seg[static_cast<std::size_t>(n)] == 0) continue;
      const int t = c.task_per_row ? c.task[static_cast<std::size_t>(n / 13)] : c.task[static_cast<std::size_t>(n)];
      std::vector<int> ex{plan.expert.data()[n * 2], plan.expert.data()[n * 2 + 1]};
      if (first[static_cast<std::size_t>(t)].empty()) first[static_cast<std::size_t>(t)] = ex;
      CHECK(first[static_cast<std::size_t>(t)] == ex);
    }
  }

  TEST_CASE("task routing: an (N, C) input takes one task id per token, or one id for its single row") {
    using Cfg = moe::Config<route::Task, Experts<5>, TopK<2>>;
    CpuContext ctx{1};
    moe::Layer<Cfg, double, Cpu> layer({.d_model = 12, .d_ff = 20, .num_tasks = 3});
    layer.init(4);
    Tensor<double, Cpu> x({6, 12}), y({6, 12});
    test::fill_uniform<double>(x.view(), 9);
    const std::vector<std::int32_t> ids = {0, 2, 0, 1, 2, 1};
    Tensor<std::int32_t, Cpu> per_token = test::id_tensor(ids);
    moe::Layer<Cfg, double, Cpu>::Cache cache;
    layer.forward(ctx, {.x = x, .task_ids = per_token}, y, cache);
    // Each token alone, with its own id as the id of its single row, gives the same output row.
    for (std::int64_t n = 0; n < 6; ++n) {
      Tensor<double, Cpu> xn({1, 12}), yn({1, 12});
      std::copy_n(x.data() + n * 12, 12, xn.data());
      Tensor<std::int32_t, Cpu> one = test::id_tensor({ids[static_cast<std::size_t>(n)]});
      moe::Layer<Cfg, double, Cpu>::Cache c1;
      layer.forward(ctx, {.x = xn, .task_ids = one}, yn, c1);
      for (std::int64_t c = 0; c < 12; ++c) CHECK(y.data()[n * 12 + c] == doctest::Approx(yn.data()[c]).epsilon(1e-12));
      CHECK(cache.plan.expert.data()[n * 2] == c1.plan.expert.data()[0]);
    }
  }

  TEST_CASE("task routing with a capacity limit takes the permuted path in training and still matches") {
    using Cfg = moe::Config<route::Task, Experts<4>, TopK<2>, CapacityFactor<2>>;
    auto o = options(MoeOptions::Route::kTask, 4, 2);
    o.capacity_factor = 2.0;
    Case c;
    c.B = 2;
    c.T = 17;
    c.tasks = 3;
    c.task = {0, 2};
    c.task_per_row = true;
    c.training = true;
    auto r = run_both<Cfg, double>(c, o);
    CHECK_FALSE(r->cache.task_path);
    CHECK(r->cache.plan.dropped() > 0);  // one task's 17 tokens overflow C = 17
    check_against_reference(*r, 1e-12);
  }

  TEST_CASE("task routing with a capacity limit drops nothing at inference: it equals the dropless layer") {
    using Cfg = moe::Config<route::Task, Experts<4>, TopK<2>, CapacityFactor<2>>;
    using Free = moe::Config<route::Task, Experts<4>, TopK<2>, Dropless>;
    Case c;
    c.B = 2;
    c.T = 17;
    c.tasks = 3;
    c.task = {0, 2};
    c.task_per_row = true;
    auto o = options(MoeOptions::Route::kTask, 4, 2);
    o.capacity = MoeOptions::Capacity::kDropless;  // what the reference computes for both
    auto capped = run_both<Cfg, double>(c, o);
    auto free = run_both<Free, double>(c, o);
    CHECK(capped->cache.task_path);
    CHECK(std::memcmp(capped->y.data(), free->y.data(), free->y.bytes()) == 0);
    check_against_reference(*free, 1e-12);
  }

  TEST_CASE_TEMPLATE("task routing: every task's logits computed once (Input::task_logits) give the same call", S,
                     double, float) {
    using Real = moe::router_t<S>;
    using Cfg = moe::Config<route::Task, Experts<7>, TopK<2>, CapacityFactor<1>>;  // inference: the task path
    constexpr std::int64_t B = 3, T = 11, C = 19, Tasks = 5;
    CpuContext ctx{2};
    moe::Layer<Cfg, S, Cpu> layer({.d_model = C, .d_ff = 23, .num_tasks = Tasks});
    layer.init(31);
    Tensor<S, Cpu> x({B, T, C}), y({B, T, C}), y_fixed({B, T, C});
    test::fill_uniform<S>(x.view(), 32, -1.5, 1.5);
    Tensor<std::int32_t, Cpu> tasks({B, T}), seg({B, T});
    for (std::int64_t n = 0; n < B * T; ++n) {
      tasks.data()[n] = static_cast<std::int32_t>((n * 3 + n / T) % Tasks);  // interleaved
      seg.data()[n] = n % T < T - n / T ? 1 : 0;                            // rows of 11, 10 and 9 tokens
    }

    // The logits against a plain double loop over the parameters.
    const Tensor<Real, Cpu> logits = layer.task_logits(ctx);
    REQUIRE(logits.shape() == Shape{Tasks, 7});
    const auto emb = test::to_double<S>(layer.task_embedding());
    const auto gate = test::to_double<S>(layer.gate_weight());
    for (std::int64_t t = 0; t < Tasks; ++t) {
      for (std::int64_t e = 0; e < 7; ++e) {
        double want = 0;
        for (std::int64_t c = 0; c < C; ++c) {
          want += emb[static_cast<std::size_t>(t * C + c)] * gate[static_cast<std::size_t>(e * C + c)];
        }
        CHECK(static_cast<double>(logits.data()[t * 7 + e]) == doctest::Approx(want).epsilon(1e-5));
      }
    }

    typename moe::Layer<Cfg, S, Cpu>::Cache plain, fixed;
    layer.forward(ctx, {.x = x, .segment_ids = seg, .task_ids = tasks}, y, plain);
    for (auto& v : y_fixed.view().span()) v = S(12345);
    layer.forward(ctx, {.x = x, .segment_ids = seg, .task_ids = tasks, .task_logits = logits}, y_fixed, fixed);
    CHECK(fixed.task_path);
    CHECK(std::memcmp(y.data(), y_fixed.data(), y.bytes()) == 0);
    CHECK(std::memcmp(plain.plan.expert.data(), fixed.plan.expert.data(), plain.plan.expert.bytes()) == 0);
    CHECK(std::memcmp(plain.probs.data(), fixed.probs.data(), plain.probs.bytes()) == 0);

    // The layer routes by the logits it is given: make task 2 prefer experts 6, then 0.
    Tensor<Real, Cpu> steered({Tasks, 7});
    std::copy_n(logits.data(), logits.numel(), steered.data());
    for (std::int64_t e = 0; e < 7; ++e) steered.data()[2 * 7 + e] = Real(-5);
    steered.data()[2 * 7 + 6] = Real(9);
    steered.data()[2 * 7 + 0] = Real(8);
    layer.forward(ctx, {.x = x, .segment_ids = seg, .task_ids = tasks, .task_logits = steered}, y_fixed, fixed);
    std::int64_t task2 = 0;
    for (std::int64_t n = 0; n < B * T; ++n) {
      if (tasks.data()[n] != 2 || seg.data()[n] == 0) continue;
      ++task2;
      CHECK(fixed.plan.expert.data()[n * 2] == 6);
      CHECK(fixed.plan.expert.data()[n * 2 + 1] == 0);
    }
    CHECK(task2 > 0);

    // Misuse: a wrong shape, a training call, a layer that does not route by task.
    Tensor<Real, Cpu> wrong({Tasks + 1, 7});
    CHECK_THROWS_WITH_AS(
        layer.forward(ctx, {.x = x, .task_ids = tasks, .task_logits = wrong}, y_fixed, fixed),
        "moe::Layer::forward: task_logits must have shape [5, 7] but has shape [6, 7]", ShapeError);
    CHECK_THROWS_WITH_AS(layer.forward(ctx, {.x = x, .task_ids = tasks, .task_logits = logits}, y_fixed, fixed,
                                       {.training = true}),
                         "moe::Layer::forward: Input::task_logits is for inference; training computes the logits "
                         "from the weights it updates",
                         Error);
    moe::Layer<moe::Config<route::Sentence, Experts<7>>, S, Cpu> sentence({.d_model = C, .d_ff = 23});
    typename moe::Layer<moe::Config<route::Sentence, Experts<7>>, S, Cpu>::Cache sc;
    CHECK_THROWS_WITH_AS(sentence.forward(ctx, {.x = x, .task_logits = logits}, y_fixed, sc),
                         "moe::Layer::forward: Input::task_logits is for task-routed layers; this one routes by "
                         "sentence",
                         Error);
  }

  TEST_CASE("random second expert: fixed seed matches the reference, evaluation uses every choice") {
    using Cfg = moe::GShardPaper<route::Token, 5>;
    auto o = options(MoeOptions::Route::kToken, 5, 2);
    o.second_random = true;
    o.second_threshold = 0.5;
    Case c;
    c.T = 101;
    c.training = true;
    c.seed = 20211007;
    c.rng_offset = 3;
    auto r = run_both<Cfg, double>(c, o);
    check_against_reference(*r, 1e-12);
    // Some second choices are skipped: slot -1 while the expert is set.
    std::int64_t skipped = 0;
    for (std::int64_t n = 0; n < 101; ++n) skipped += r->cache.plan.slot.data()[n * 2 + 1] < 0 ? 1 : 0;
    CHECK(skipped > 0);
    // Another seed skips differently; the same seed reproduces.
    auto again = run_both<Cfg, double>(c, o);
    CHECK(std::memcmp(again->y.data(), r->y.data(), r->y.bytes()) == 0);
    c.seed = 99;
    auto other = run_both<Cfg, double>(c, o);
    std::int64_t differ = 0;
    for (std::int64_t n = 0; n < 101; ++n) {
      differ += (other->cache.plan.slot.data()[n * 2 + 1] < 0) != (r->cache.plan.slot.data()[n * 2 + 1] < 0);
    }
    CHECK(differ > 0);
    c.training = false;
    o.training = false;
    auto eval = run_both<Cfg, double>(c, o);
    for (std::int64_t n = 0; n < 101; ++n) CHECK(eval->cache.plan.slot.data()[n * 2 + 1] >= 0);
    check_against_reference(*eval, 1e-12);
  }

  TEST_CASE("zero tokens") {
    using Cfg = moe::Config<route::Token, Experts<5>, TopK<2>>;
    moe::Layer<Cfg, float, Cpu> layer({.d_model = 24, .d_ff = 40});
    layer.init(3);
    Tensor<float, Cpu> x({0, 24}), y({0, 24});
    moe::Layer<Cfg, float, Cpu>::Cache cache;
    CpuContext ctx(2);
    layer.forward(ctx, {.x = x}, y, cache);
    CHECK(cache.plan.tokens == 0);
    CHECK(cache.plan.rows() == 0);
    CHECK(cache.plan.aux_loss == 0.0);
    // Sentence and task layers too.
    moe::Layer<moe::Config<route::Sentence, Experts<3>>, float, Cpu> sl({.d_model = 24, .d_ff = 40});
    moe::Layer<moe::Config<route::Sentence, Experts<3>>, float, Cpu>::Cache sc;
    sl.forward(ctx, {.x = x}, y, sc);
    moe::Layer<moe::Config<route::Task, Experts<3>>, float, Cpu> tl({.d_model = 24, .d_ff = 40, .num_tasks = 2});
    moe::Layer<moe::Config<route::Task, Experts<3>>, float, Cpu>::Cache tc;
    Tensor<std::int32_t, Cpu> tasks({0});
    tl.forward(ctx, {.x = x, .task_ids = tasks}, y, tc);
    CHECK(tc.plan.tokens == 0);
  }

  TEST_CASE("one expert: every token goes to it, output is the single FFN times p = 1") {
    using Cfg = moe::Config<route::Token, Experts<1>, TopK<1>, Dropless>;
    auto o = options(MoeOptions::Route::kToken, 1, 1);
    o.capacity = MoeOptions::Capacity::kDropless;
    o.normalize = MoeOptions::Normalize::kNone;
    Case c;
    auto r = run_both<Cfg, double>(c, o);
    for (std::int64_t n = 0; n < 37; ++n) CHECK(r->cache.plan.gate.data()[n] == 1.0);
    check_against_reference(*r, 1e-12);
  }

  TEST_CASE("K = E: every token uses every expert, with capacity >= N nothing is dropped") {
    using Cfg = moe::Config<route::Token, Experts<3>, TopK<3>, CapacityFixed<1000>>;
    auto o = options(MoeOptions::Route::kToken, 3, 3);
    o.capacity = MoeOptions::Capacity::kFixed;
    o.capacity_fixed = 1000;
    Case c;
    auto r = run_both<Cfg, double>(c, o);
    CHECK(r->cache.plan.dropped() == 0);
    for (std::int64_t n = 0; n < 37; ++n) {
      std::set<int> s;
      double sum = 0;
      for (int j = 0; j < 3; ++j) {
        s.insert(r->cache.plan.expert.data()[n * 3 + j]);
        sum += r->cache.plan.gate.data()[n * 3 + j];
      }
      CHECK(s.size() == 3);
      CHECK(sum == doctest::Approx(1.0).epsilon(1e-8));
    }
    check_against_reference(*r, 1e-12);
  }

  TEST_CASE("exact ties go to the lower expert index, K = E with uniform gates is the mean of the experts") {
    using Cfg = moe::Config<route::Token, Experts<3>, TopK<3>, Dropless>;
    const std::int64_t N = 7, C = 5, F = 6;
    moe::Layer<Cfg, double, Cpu> layer({.d_model = C, .d_ff = F});
    layer.init(21);
    for (auto& w : layer.gate_weight().span()) w = 0.0;  // every logit 0: a three-way tie
    Tensor<double, Cpu> x({N, C}), y({N, C});
    test::fill_uniform<double>(x, 22);
    moe::Layer<Cfg, double, Cpu>::Cache cache;
    CpuContext ctx(2);
    layer.forward(ctx, {.x = x}, y, cache);
    for (std::int64_t n = 0; n < N; ++n) {
      for (int j = 0; j < 3; ++j) CHECK(cache.plan.expert.data()[n * 3 + j] == j);
    }
    // y_n = (1/3) sum_e wo_e relu(wi_e x_n), computed here in plain loops.
    auto wi = layer.wi(), wo = layer.wo();
    for (std::int64_t n = 0; n < N; ++n) {
      for (std::int64_t c = 0; c < C; ++c) {
        double want = 0;
        for (int e = 0; e < 3; ++e) {
          for (std::int64_t f = 0; f < F; ++f) {
            double h = 0;
            for (std::int64_t k = 0; k < C; ++k) h += wi(e, f, k) * x.view()(n, k);
            want += wo(e, c, f) * std::max(h, 0.0) / 3.0;
          }
        }
        CHECK(y.view()(n, c) == doctest::Approx(want).epsilon(1e-8));
      }
    }
  }

  TEST_CASE("all tokens choose one expert: first choices win, drops follow token order") {
    using Cfg = moe::Config<route::Token, Experts<4>, TopK<2>, CapacityFixed<6>>;
    const std::int64_t N = 23, C = 9, F = 11;
    moe::Layer<Cfg, double, Cpu> layer({.d_model = C, .d_ff = F});
    layer.init(5);
    // Gate: expert 2 reads the sum of the input, expert 1 half of it, the others nothing; inputs positive.
    auto wg = layer.gate_weight();
    for (std::int64_t c = 0; c < C; ++c) {
      for (int e = 0; e < 4; ++e) wg(e, c) = 0.0;
      wg(2, c) = 1.0;
      wg(1, c) = 0.5;
    }
    Tensor<double, Cpu> x({N, C}), y({N, C});
    test::fill_uniform<double>(x, 17, 0.5, 1.0);
    moe::Layer<Cfg, double, Cpu>::Cache cache;
    CpuContext ctx(2);
    layer.forward(ctx, {.x = x}, y, cache);
    const auto& plan = cache.plan;
    for (std::int64_t n = 0; n < N; ++n) {
      CHECK(plan.expert.data()[n * 2] == 2);
      CHECK(plan.expert.data()[n * 2 + 1] == 1);
      CHECK(plan.slot.data()[n * 2] == n);             // first choices queue in token order
      CHECK(plan.dispatched.data()[n * 2] == (n < 6));  // the first C tokens win expert 2
      CHECK(plan.slot.data()[n * 2 + 1] == n);          // nobody else chose expert 1 first
      CHECK(plan.dispatched.data()[n * 2 + 1] == (n < 6));
      if (n >= 6) {
        for (std::int64_t c = 0; c < C; ++c) CHECK(y.view()(n, c) == 0.0);  // dropped: zero MoE output
      }
    }
    CHECK(plan.dropped_tokens() == N - 6);
    CHECK(plan.expert_count.data()[2] == 6);
    CHECK(plan.expert_count.data()[1] == 6);
    // Aux loss at total collapse onto one expert: E * f_2 * m_2 = 4 * 1 * mean p_2.
    double m2 = 0;
    for (std::int64_t n = 0; n < N; ++n) m2 += cache.probs.view()(n, 2);
    CHECK(plan.aux_loss == doctest::Approx(4.0 * m2 / N));
  }

  TEST_CASE("capacity overflow: second choices queue behind every first choice of their expert") {
    // Tokens alternate between preferring (0 then 1) and (1 then 0); C = 6 for 10 tokens: each expert gets 5
    // first choices, then only one second choice (the earliest) fits.
    using Cfg = moe::Config<route::Token, Experts<2>, TopK<2>, CapacityFixed<6>, NormalizeBeforeDrop>;
    const std::int64_t N = 10, C = 2;
    moe::Layer<Cfg, double, Cpu> layer({.d_model = C, .d_ff = 3});
    layer.init(9);
    auto wg = layer.gate_weight();
    wg(0, 0) = 1;
    wg(0, 1) = 0;
    wg(1, 0) = 0;
    wg(1, 1) = 1;
    Tensor<double, Cpu> x({N, C}), y({N, C});
    for (std::int64_t n = 0; n < N; ++n) {
      x.view()(n, 0) = n % 2 == 0 ? 2.0 : 0.5;
      x.view()(n, 1) = n % 2 == 0 ? 0.5 : 2.0;
    }
    moe::Layer<Cfg, double, Cpu>::Cache cache;
    CpuContext ctx(1);
    layer.forward(ctx, {.x = x}, y, cache);
    const auto& plan = cache.plan;
    for (std::int64_t n = 0; n < N; ++n) {
      CHECK(plan.dispatched.data()[n * 2] == 1);
      CHECK(plan.slot.data()[n * 2 + 1] == 5 + n / 2);
      CHECK(plan.dispatched.data()[n * 2 + 1] == (n < 2));
      // Legacy normalization: a lone survivor keeps its weight below 1.
      if (n >= 2) CHECK(plan.gate.data()[n * 2] < 0.9);
    }
    // Rows: expert 0 holds tokens 0,2,4,6,8 (first choices) then token 1 (second choice).
    const std::int64_t want0[] = {0, 2, 4, 6, 8, 1};
    for (int r = 0; r < 6; ++r) CHECK(plan.row_token.data()[r] == want0[r]);
    CHECK(plan.row_choice.data()[5] == 1);
  }

  TEST_CASE("padding: zero output, never dispatched, excluded from aux numerators") {
    using Cfg = moe::Config<route::Token, Experts<5>, TopK<2>, Dropless>;
    auto o = options(MoeOptions::Route::kToken, 5, 2);
    o.capacity = MoeOptions::Capacity::kDropless;
    Case c;
    c.B = 3;
    c.T = 13;
    c.seg = padded_segments(3, 13);
    auto r = run_both<Cfg, double>(c, o);
    check_against_reference(*r, 1e-12);
    for (std::int64_t n = 0; n < 39; ++n) {
      if (c.seg[static_cast<std::size_t>(n)] != 0) continue;
      CHECK(r->cache.plan.expert.data()[n * 2] == -1);
      CHECK(r->cache.plan.row.data()[n * 2] == -1);
      for (std::int64_t ch = 0; ch < 24; ++ch) CHECK(r->y.data()[n * 24 + ch] == 0.0);
    }
    CHECK(r->cache.plan.rows() == 2 * (39 - 9));
  }

  TEST_CASE("determinism: same thread count is bitwise identical, 1 vs 2 threads agree") {
    using Cfg = moe::Config<route::Token, Experts<5>, TopK<2>, CapacityFactor<5, 4>>;
    auto o = options(MoeOptions::Route::kToken, 5, 2);
    o.capacity_factor = 1.25;
    Case c;
    c.T = 300;
    c.C = 48;
    c.F = 80;
    auto a = run_both<Cfg, float>(c, o);
    auto b = run_both<Cfg, float>(c, o);
    CHECK(std::memcmp(a->y.data(), b->y.data(), a->y.bytes()) == 0);
    c.threads = 1;
    auto one = run_both<Cfg, float>(c, o);
    CHECK(std::memcmp(one->cache.plan.expert.data(), a->cache.plan.expert.data(), a->cache.plan.expert.bytes()) == 0);
    const auto ya = test::to_double<float>(a->y), y1 = test::to_double<float>(one->y);
    CHECK(test::rel_error(ya.data(), y1.data(), a->y.numel()) < 1e-5);
  }

  TEST_CASE("bad input: shapes, task ids and options are rejected with messages that say what was expected") {
    CpuContext ctx(1);
    using Tok = moe::Config<route::Token, Experts<3>>;
    moe::Layer<Tok, float, Cpu> layer({.d_model = 8, .d_ff = 4});
    moe::Layer<Tok, float, Cpu>::Cache cache;
    Tensor<float, Cpu> x({2, 5, 7}), y({2, 5, 7});
    CHECK_THROWS_WITH_AS(layer.forward(ctx, {.x = x}, y, cache),
                         "moe::Layer::forward: x must be (B, T, 8) or (N, 8) for d_model 8, got [2, 5, 7]",
                         ShapeError);
    Tensor<float, Cpu> x8({2, 5, 8}), y8({2, 4, 8});
    CHECK_THROWS_WITH_AS(layer.forward(ctx, {.x = x8}, y8, cache),
                         "moe::Layer::forward: out must have x's shape [2, 5, 8], got [2, 4, 8]", ShapeError);
    Tensor<float, Cpu> y8ok({2, 5, 8});
    Tensor<std::int32_t, Cpu> seg({2, 4});
    CHECK_THROWS_WITH_AS(layer.forward(ctx, {.x = x8, .segment_ids = seg}, y8ok, cache),
                         "moe::Layer::forward: segment_ids must be (2, 5) for x [2, 5, 8], got [2, 4]", ShapeError);
    CHECK_THROWS_AS((moe::Layer<Tok, float, Cpu>({.d_model = 0, .d_ff = 4})), ShapeError);

    using Tsk = moe::Config<route::Task, Experts<3>>;
    CHECK_THROWS_WITH_AS((moe::Layer<Tsk, float, Cpu>({.d_model = 8, .d_ff = 4})),
                         "moe::Layer: task routing needs num_tasks >= 1, got 0", ShapeError);
    moe::Layer<Tsk, float, Cpu> tl({.d_model = 8, .d_ff = 4, .num_tasks = 3});
    moe::Layer<Tsk, float, Cpu>::Cache tc;
    CHECK_THROWS_WITH_AS(tl.forward(ctx, {.x = x8}, y8ok, tc),
                         "moe::Layer::forward: task routing needs task_ids of shape (2) per row or (2, 5) per token "
                         "for x [2, 5, 8], got []",
                         ShapeError);
    Tensor<std::int32_t, Cpu> tasks({2});
    tasks.data()[1] = 3;
    CHECK_THROWS_WITH_AS(tl.forward(ctx, {.x = x8, .task_ids = tasks}, y8ok, tc),
                         "moe::Layer::forward: unknown task id 3 for token 5 (row 1); expected an id in [0, 3)",
                         ShapeError);
  }

  TEST_CASE("parameters have the stable dotted names of DESIGN section 6") {
    moe::Layer<moe::Config<route::Task, Experts<4>>, float, Cpu> layer({.d_model = 6, .d_ff = 10, .num_tasks = 3});
    auto p = layer.parameters("decoder.layers.3.moe");
    REQUIRE(p.size() == 4);
    CHECK(p[0].name == "decoder.layers.3.moe.gate.weight");
    CHECK(p[0].view.shape() == Shape{4, 6});
    CHECK(p[1].name == "decoder.layers.3.moe.task_embedding");
    CHECK(p[1].view.shape() == Shape{3, 6});
    CHECK(p[2].name == "decoder.layers.3.moe.experts.wi");
    CHECK(p[2].view.shape() == Shape{4, 10, 6});
    CHECK(p[3].name == "decoder.layers.3.moe.experts.wo");
    CHECK(p[3].view.shape() == Shape{4, 6, 10});
  }

  TEST_CASE("configuration defaults and named configurations") {
    using T = moe::Config<route::Token, Experts<32>>;
    static_assert(T::top_k == 2 && !T::dropless);
    static_assert(std::is_same_v<T::capacity_type, CapacityFactor<2>>);
    static_assert(std::is_same_v<T::normalize_type, NormalizeBeforeDrop>);
    static_assert(T::aux_loss_coefficient == 0.01 && T::z_loss_coefficient == 0.0);
    using Sw = moe::SwitchTop1<route::Token, 8>;
    static_assert(std::is_same_v<Sw::normalize_type, NoNormalize>);
    using Tk = moe::Config<route::Task, Experts<8>, TopK<2>>;
    static_assert(Tk::dropless);
    static_assert(CapacityFactor<5, 4>::capacity(4096, 32) == 160);
    static_assert(CapacityFactor<2, 1, 4, 4>::capacity(3, 8) == 4);     // lingvo: 0 -> 4
    static_assert(CapacityFactor<2, 1, 4, 4>::capacity(100, 8) == 28);  // 25 -> 28
    using Options = moe::Config<route::Sentence, ZLoss<1, 1000>, TopK<1>, Experts<4>, CapacityFixed<3>>;
    static_assert(Options::z_loss_coefficient == 0.001 && Options::top_k == 1 && Options::experts == 4);
    CHECK(true);
  }
}
