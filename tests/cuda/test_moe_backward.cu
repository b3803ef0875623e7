// The MoE layer's backward on the GPU against the CPU layer's backward (itself checked against finite differences in
// tests/cpu/test_moe_backward.cpp): dx and every parameter gradient by relative error, at every granularity and path
// (capacity blocks, dropless per-expert GEMMs, the task path with contiguous and gathered ranges, the permuted task
// path with GShard's random second expert), with the aux and z losses, ReLU and activations that keep their
// pre-activations, float and double, and the edges.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "moe_batch.cuh"

using namespace tmoe;
using test::Batch;
using test::make_batch;
using test::poison;
using test::random_host;

namespace {

/// Tolerances by relative error (max |a - b| / max |b|). The router's gradients sum over the tokens of a gate row in
/// another order than the CPU (per row on the GPU, token by token there) and pass through the softmax backward's
/// cancellation, so in float they get 1e-4; everything else 1e-5. Double: 1e-11.
template <class S>
constexpr double kTol = std::is_same_v<S, double> ? 1e-11 : 1e-5;
template <class S>
constexpr double kRouterTol = std::is_same_v<S, double> ? 1e-11 : 1e-4;

/// Forward (training) and backward of the CPU and GPU layers with the same weights, inputs and output gradient.
template <class Cfg, class S = float>
void compare_backward(std::int64_t C, std::int64_t F, std::int64_t group_size, const Batch& batch,
                      std::int64_t num_tasks = 0) {
  CudaContext ctx;
  CpuContext cpu{2};
  const moe::LayerOptions opt{.d_model = C, .d_ff = F, .num_tasks = num_tasks, .group_size = group_size};
  moe::Layer<Cfg, S, Cpu> ref(opt);
  ref.init(17);
  moe::Layer<Cfg, S, Cuda> gpu(opt);
  gpu.copy_parameters_from(ctx, ref);
  const moe::ForwardArgs args{.training = true, .seed = 99, .rng_offset = 5};

  const Tensor<S, Cpu> x = test::convert<S, float>(batch.x);
  const Tensor<S, Cpu> dout = random_host<S>(x.shape(), 1234);
  Tensor<S, Cpu> y(x.shape()), dx(x.shape());
  typename moe::Layer<Cfg, S, Cpu>::Cache cache;
  moe::Input<S, Cpu> in{.x = x};
  if (batch.segments.data() != nullptr) in.segment_ids = batch.segments;
  if (batch.tasks.data() != nullptr) in.task_ids = batch.tasks;
  ref.forward(cpu, in, y, cache, args);
  ref.backward(cpu, cache, dout, dx);

  const auto gx = to_device(ctx, x);
  const auto gdout = to_device(ctx, dout);
  Tensor<std::int32_t, Cuda> gseg, gtask;
  moe::Input<S, Cuda> gin{.x = gx};
  if (batch.segments.data() != nullptr) {
    gseg = to_device(ctx, batch.segments);
    gin.segment_ids = gseg;
  }
  if (batch.tasks.data() != nullptr) {
    gtask = to_device(ctx, batch.tasks);
    gin.task_ids = gtask;
  }
  Tensor<S, Cuda> gy(x.shape()), gdx(x.shape());
  poison(ctx, gy.view());
  poison(ctx, gdx.view());
  typename moe::Layer<Cfg, S, Cuda>::Cache gcache;
  gpu.forward(ctx, gin, gy, gcache, args);
  gpu.backward(ctx, gcache, gdout, gdx);

  const double yerr = test::rel_error_vs<S, S>(ctx, gy.cview(), y.cview());
  const double dxerr = test::rel_error_vs<S, S>(ctx, gdx.cview(), dx.cview());
  CAPTURE(yerr);
  CAPTURE(dxerr);
  CHECK(yerr < kTol<S>);
  CHECK(dxerr < kRouterTol<S>);  // dx holds the router's input gradient too (token and sentence routing)
  if (x.numel() > 0) {
    CHECK(moe::Layer<Cfg, S, Cuda>::aux_loss(ctx, gcache) ==
          doctest::Approx(moe::Layer<Cfg, S, Cpu>::aux_loss(cache)).epsilon(1e-6));
  }

  auto want = ref.parameter_refs();
  auto got = gpu.parameter_refs();
  REQUIRE(want.size() == got.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    CAPTURE(want[i].name);
    REQUIRE(got[i].name == want[i].name);
    const double err = test::rel_error_vs<S, S>(ctx, ConstTensorView<S, Cuda>(got[i].grad),
                                                ConstTensorView<S, Cpu>(want[i].grad));
    CAPTURE(err);
    const bool router = want[i].name == "gate.weight" || want[i].name == "task_embedding";
    CHECK(err < (router ? kRouterTol<S> : kTol<S>));
  }
}

template <int E>
using TokenCap = moe::Config<route::Token, Experts<E>, TopK<2>, CapacityFactor<3, 2>>;
template <int E>
using TokenDropless = moe::Config<route::Token, Experts<E>, TopK<2>, Dropless, NormalizeAfterDrop>;
template <int E>
using SentenceCap = moe::Config<route::Sentence, Experts<E>, TopK<2>, CapacityFactor<2>>;
template <int E>
using TaskCfg = moe::Config<route::Task, Experts<E>, TopK<2>>;  // dropless, every second expert: the task path

}  // namespace

TEST_SUITE("cuda.moe") {
  TEST_CASE("backward, token routing with a capacity limit (E = 5, 32, 160, groups, drops)") {
    compare_backward<TokenCap<5>>(40, 72, 0, make_batch(3, 29, 40, 1, true, false, 0));
    compare_backward<TokenCap<32>>(40, 72, 24, make_batch(5, 23, 40, 2, true, false, 0));
    compare_backward<TokenCap<160>>(48, 40, 0, make_batch(4, 37, 48, 3, false, false, 0));
    compare_backward<TokenCap<5>>(40, 72, 0, make_batch(1, 8, 40, 51, false, false, 0));  // 2 rows per expert
  }

  TEST_CASE("backward, dropless token routing: per-expert GEMMs after one synchronization (E = 5, 32, 160)") {
    compare_backward<TokenDropless<5>>(40, 72, 0, make_batch(3, 29, 40, 4, true, false, 0));
    compare_backward<TokenDropless<32>>(40, 72, 0, make_batch(2, 31, 40, 5, false, false, 0));
    compare_backward<TokenDropless<160>>(48, 40, 0, make_batch(4, 37, 48, 6, true, false, 0));
  }

  TEST_CASE("backward, sentence routing: the means' gradient reaches every token of a sequence") {
    compare_backward<SentenceCap<5>>(40, 56, 0, make_batch(6, 21, 40, 7, true, true, 0));
    compare_backward<SentenceCap<32>>(40, 56, 0, make_batch(9, 17, 40, 8, false, false, 0));
    compare_backward<moe::Config<route::Sentence, Experts<160>, TopK<2>, Dropless>>(
        48, 40, 0, make_batch(5, 13, 48, 9, true, true, 0));
  }

  TEST_CASE("backward, task routing: the task path (contiguous and gathered ranges) and the permuted path") {
    compare_backward<TaskCfg<5>>(40, 56, 0, make_batch(6, 19, 40, 10, true, false, 3), 3);    // gathered by task
    compare_backward<TaskCfg<32>>(40, 56, 0, make_batch(2, 50, 40, 43, true, false, 7), 7);   // one task, contiguous
    compare_backward<TaskCfg<160>>(48, 40, 0, make_batch(3, 13, 48, 12, false, false, 2), 2);
    compare_backward<TaskCfg<32>>(40, 56, 0, make_batch(4, 1, 40, 48, false, false, 4), 4);   // one-row ranges
    compare_backward<TaskCfg<32>>(40, 56, 0, make_batch(4, 9, 40, 49, true, false, 4), 4);   // contiguous ranges
    compare_backward<moe::GShardPaper<route::Task, 32>>(40, 56, 0, make_batch(6, 19, 40, 13, true, false, 3), 3);
  }

  TEST_CASE("backward with GShard's random second expert, Switch top-1, the z-loss, GELU and SiLU experts") {
    compare_backward<moe::GShardPaper<route::Token, 5>>(40, 72, 16, make_batch(3, 29, 40, 14, true, false, 0));
    compare_backward<moe::SwitchTop1<route::Token, 160>>(48, 40, 0, make_batch(4, 37, 48, 16, true, false, 0));
    compare_backward<moe::Config<route::Token, Experts<8>, TopK<2>, CapacityFactor<2>, ZLoss<1, 100>,
                                 ExpertActivation<nn::Gelu>>>(40, 72, 0, make_batch(3, 29, 40, 17, true, false, 0));
    compare_backward<moe::Config<route::Task, Experts<6>, TopK<2>, ZLoss<1, 100>, ExpertActivation<nn::Silu>>>(
        40, 56, 0, make_batch(6, 19, 40, 18, true, false, 3), 3);
    compare_backward<moe::Config<route::Sentence, Experts<7>, TopK<2>, Dropless, NoNormalize, ZLoss<1, 100>,
                                 ExpertActivation<nn::Gelu>>>(40, 56, 0, make_batch(6, 21, 40, 19, true, true, 0));
  }

  TEST_CASE("backward in double agrees with the CPU to rounding") {
    compare_backward<TokenDropless<5>, double>(40, 72, 0, make_batch(3, 29, 40, 24, true, false, 0));
    compare_backward<TokenCap<32>, double>(40, 72, 24, make_batch(5, 23, 40, 25, true, false, 0));
    compare_backward<TaskCfg<5>, double>(40, 56, 0, make_batch(6, 19, 40, 26, true, false, 3), 3);
    compare_backward<SentenceCap<5>, double>(40, 56, 0, make_batch(6, 21, 40, 27, true, true, 0));
  }

  TEST_CASE("backward edges: zero tokens, one expert, K equal to E, all tokens to one expert (capacity overflow)") {
    compare_backward<TokenCap<5>>(40, 72, 0, make_batch(0, 5, 40, 23, false, false, 0));
    compare_backward<moe::Config<route::Token, Experts<1>, TopK<1>, CapacityFactor<1>>>(
        24, 40, 0, make_batch(3, 7, 24, 20, true, false, 0));
    compare_backward<moe::Config<route::Token, Experts<3>, TopK<3>, CapacityFactor<1>>>(
        24, 40, 0, make_batch(3, 7, 24, 21, false, false, 0));
    compare_backward<moe::Config<route::Token, Experts<3>, TopK<3>, Dropless>>(24, 40, 0,
                                                                               make_batch(3, 7, 24, 22, true, false, 0));
    // A tiny capacity (C = 1 per expert for 21 tokens and E = 4): most choices dropped, their gradients zero.
    compare_backward<moe::Config<route::Token, Experts<4>, TopK<2>, CapacityFixed<1>>>(
        16, 24, 0, make_batch(3, 7, 16, 28, false, false, 0));
  }

  TEST_CASE("backward errors: a forward without training, and wrong gradient shapes") {
    CudaContext ctx;
    const moe::LayerOptions opt{.d_model = 16, .d_ff = 24};
    moe::Layer<TokenCap<4>, float, Cuda> gpu(opt);
    gpu.init(ctx, 5);
    const auto x = to_device(ctx, random_host<float>({2, 5, 16}, 6));
    Tensor<float, Cuda> y({2, 5, 16}), dx({2, 5, 16}), wrong({2, 5, 15});
    moe::Layer<TokenCap<4>, float, Cuda>::Cache cache;
    gpu.forward(ctx, {.x = x}, y, cache);
    CHECK_THROWS_AS(gpu.backward(ctx, cache, y.cview(), dx.view()), Error);
    gpu.forward(ctx, {.x = x}, y, cache, {.training = true, .seed = 1});
    CHECK_THROWS_AS(gpu.backward(ctx, cache, wrong.cview(), dx.view()), ShapeError);
    CHECK_THROWS_AS(gpu.backward(ctx, cache, y.cview(), wrong.view()), ShapeError);
    CHECK_NOTHROW(gpu.backward(ctx, cache, y.cview(), dx.view()));
  }
}
