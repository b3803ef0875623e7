// The MoE layer's backward against central finite differences in double precision, at every granularity and
// with the gating options that change the gradient (normalization, capacity drops, random second expert,
// aux loss, z-loss, activations, padding, interleaved tasks).

#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

namespace {

struct Setup {
  std::int64_t B = 3, T = 7, C = 6, F = 8, tasks = 0, group_size = 0;
  std::vector<std::int32_t> seg;   // (B*T) or empty
  std::vector<std::int32_t> task;  // (B) or (B*T)
  bool training = true;
  std::uint64_t seed = 11;
};

// loss = sum(y * R) + aux_loss(cache); checks d loss / d x and / d every parameter.
template <class Cfg>
void gradient_check(const Setup& s) {
  using Layer = moe::Layer<Cfg, double, Cpu>;
  Layer layer({.d_model = s.C, .d_ff = s.F, .num_tasks = s.tasks, .group_size = s.group_size});
  layer.init(s.seed);
  Tensor<double, Cpu> x({s.B, s.T, s.C}), y({s.B, s.T, s.C}), r({s.B, s.T, s.C}), dx({s.B, s.T, s.C});
  test::fill_uniform<double>(x, s.seed + 1, -1.5, 1.5);
  test::fill_uniform<double>(r, s.seed + 2);
  Tensor<std::int32_t, Cpu> seg({s.B, s.T});
  Tensor<std::int32_t, Cpu> task(s.task.size() == static_cast<std::size_t>(s.B) ? Shape{s.B} : Shape{s.B, s.T});
  std::copy(s.seg.begin(), s.seg.end(), seg.data());
  std::copy(s.task.begin(), s.task.end(), task.data());
  moe::Input<double, Cpu> in{.x = x};
  if (!s.seg.empty()) in.segment_ids = seg;
  if (!s.task.empty()) in.task_ids = task;
  const moe::ForwardArgs args{.training = s.training, .seed = 5, .rng_offset = 9};
  CpuContext ctx(2);
  typename Layer::Cache cache;

  auto loss = [&](std::vector<std::int32_t>* experts, std::vector<std::uint8_t>* kept) {
    typename Layer::Cache c;
    layer.forward(ctx, in, y, c, args);
    double l = Layer::aux_loss(c);
    for (std::int64_t i = 0; i < y.numel(); ++i) l += y.data()[i] * r.data()[i];
    if (experts) experts->assign(c.plan.expert.data(), c.plan.expert.data() + c.plan.expert.numel());
    if (kept) kept->assign(c.plan.dispatched.data(), c.plan.dispatched.data() + c.plan.dispatched.numel());
    return l;
  };
  std::vector<std::int32_t> base_experts;
  std::vector<std::uint8_t> base_kept;
  (void)loss(&base_experts, &base_kept);

  layer.forward(ctx, in, y, cache, args);
  layer.backward(ctx, cache, r, dx);

  int switched = 0;
  auto numeric = [&](double* v) {
    const double h = 1e-6, keep = *v;
    std::vector<std::int32_t> ea, eb;
    std::vector<std::uint8_t> ka, kb;
    *v = keep + h;
    const double lp = loss(&ea, &ka);
    *v = keep - h;
    const double lm = loss(&eb, &kb);
    *v = keep;
    if (ea != base_experts || eb != base_experts || ka != base_kept || kb != base_kept) ++switched;
    return (lp - lm) / (2 * h);
  };
  auto check = [&](const char* what, double* value, const double* grad, std::int64_t n) {
    std::vector<double> fd(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) fd[static_cast<std::size_t>(i)] = numeric(value + i);
    INFO(what);
    CHECK(test::rel_error(grad, fd.data(), n, 1e-8) < 1e-6);
  };
  check("dx", x.data(), dx.data(), x.numel());
  for (auto& p : layer.parameter_refs()) check(p.name.c_str(), p.value.data(), p.grad.data(), p.value.numel());
  CHECK(switched == 0);  // inputs are away from routing ties: no perturbation changed the plan

  // Parameter gradients accumulate; dx is overwritten.
  std::vector<double> g1;
  for (auto& p : layer.parameter_refs()) g1.insert(g1.end(), p.grad.data(), p.grad.data() + p.grad.numel());
  std::vector<double> dx1(dx.data(), dx.data() + dx.numel());
  layer.forward(ctx, in, y, cache, args);
  layer.backward(ctx, cache, r, dx);
  std::size_t k = 0;
  bool doubled = true;
  for (auto& p : layer.parameter_refs()) {
    for (std::int64_t i = 0; i < p.grad.numel(); ++i, ++k) doubled = doubled && std::abs(p.grad.data()[i] - 2 * g1[k]) <= 1e-12 * (1 + std::abs(g1[k]));
  }
  CHECK(doubled);
  CHECK(std::memcmp(dx1.data(), dx.data(), dx.bytes()) == 0);
}

std::vector<std::int32_t> padded(std::int64_t B, std::int64_t T) {
  std::vector<std::int32_t> seg(static_cast<std::size_t>(B * T), 0);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = T - b;
    for (std::int64_t t = 0; t < len; ++t) seg[static_cast<std::size_t>(b * T + t)] = (b == 1 && t >= len / 2) ? 2 : 1;
  }
  return seg;
}

}  // namespace

TEST_SUITE("moe_backward") {
  TEST_CASE("token routing, GELU, capacity drops, aux and z-loss, groups, padding") {
    using Cfg = moe::Config<route::Token, Experts<4>, TopK<2>, CapacityFactor<5, 4>, ExpertActivation<nn::Gelu>,
                            AuxLoss<1, 10>, ZLoss<1, 100>>;
    Setup s;
    s.seg = padded(3, 7);
    s.group_size = 8;
    gradient_check<Cfg>(s);
  }

  TEST_CASE("token routing, ReLU (the paper's experts), normalization after drop") {
    using Cfg = moe::Config<route::Token, Experts<5>, TopK<2>, CapacityFixed<3>, NormalizeAfterDrop>;
    Setup s;
    s.seed = 23;
    gradient_check<Cfg>(s);
  }

  TEST_CASE("Switch top-1: raw probabilities as gates") {
    using Cfg = moe::Config<route::Token, Experts<3>, TopK<1>, CapacityFactor<3, 2>, ExpertActivation<nn::Silu>>;
    Setup s;
    gradient_check<Cfg>(s);
  }

  TEST_CASE("random second expert in training: the skipped choices are constants of the step") {
    using Cfg = moe::Config<route::Token, Experts<4>, TopK<2>, Dropless, SecondExpertRandom<1, 2>,
                            ExpertActivation<nn::Gelu>>;
    Setup s;
    s.seed = 31;
    gradient_check<Cfg>(s);
  }

  TEST_CASE("sentence routing: through the sequence means, packed rows and padding") {
    using Cfg = moe::Config<route::Sentence, Experts<4>, TopK<2>, CapacityFactor<2>, ExpertActivation<nn::Gelu>,
                            ZLoss<1, 100>>;
    Setup s;
    s.seg = padded(3, 7);
    gradient_check<Cfg>(s);
  }

  TEST_CASE("task routing (task path): per-row tasks, the task-embedding gradient") {
    using Cfg = moe::Config<route::Task, Experts<4>, TopK<2>, ExpertActivation<nn::Gelu>, ZLoss<1, 100>>;
    Setup s;
    s.tasks = 3;
    s.task = {2, 0, 2};
    s.seg = padded(3, 7);
    gradient_check<Cfg>(s);
  }

  TEST_CASE("task routing (task path): contiguous tasks run in place, padding inside the ranges") {
    using Cfg = moe::Config<route::Task, Experts<4>, TopK<2>>;
    Setup s;
    s.tasks = 2;
    s.task = {0, 0, 1};
    s.seg = padded(3, 7);
    s.seed = 41;
    gradient_check<Cfg>(s);
  }

  TEST_CASE("task routing (task path): interleaved per-token tasks") {
    using Cfg = moe::Config<route::Task, Experts<5>, TopK<2>, ExpertActivation<nn::Gelu>>;
    Setup s;
    s.tasks = 3;
    s.task.resize(21);
    for (std::size_t i = 0; i < 21; ++i) s.task[i] = static_cast<std::int32_t>((i * 5) % 3);
    gradient_check<Cfg>(s);
  }

  TEST_CASE("task routing with a capacity limit (permuted path)") {
    using Cfg = moe::Config<route::Task, Experts<4>, TopK<2>, CapacityFactor<2>, ExpertActivation<nn::Gelu>>;
    Setup s;
    s.tasks = 2;
    s.task = {1, 0, 1};
    gradient_check<Cfg>(s);
  }

  TEST_CASE("backward errors: shapes, and GELU experts without training-mode pre-activations") {
    using Cfg = moe::Config<route::Token, Experts<3>, TopK<2>, ExpertActivation<nn::Gelu>>;
    moe::Layer<Cfg, double, Cpu> layer({.d_model = 4, .d_ff = 5});
    layer.init(1);
    Tensor<double, Cpu> x({2, 3, 4}), y({2, 3, 4}), dx({2, 3, 4}), bad({2, 3, 5});
    moe::Layer<Cfg, double, Cpu>::Cache cache;
    CpuContext ctx(1);
    layer.forward(ctx, {.x = x}, y, cache);
    CHECK_THROWS_WITH_AS(layer.backward(ctx, cache, y, dx),
                         "moe::Layer::backward: the gelu experts need their pre-activations; run forward with "
                         "training = true before backward",
                         Error);
    layer.forward(ctx, {.x = x}, y, cache, {.training = true});
    CHECK_THROWS_WITH_AS(layer.backward(ctx, cache, bad, dx),
                         "moe::Layer::backward: dout and dx must have the forward input's shape [2, 3, 4], got dout "
                         "[2, 3, 5] and dx [2, 3, 4]",
                         ShapeError);
  }
}
