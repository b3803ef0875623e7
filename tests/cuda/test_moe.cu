// The MoE layer on the GPU against the CPU layer: outputs by relative error, routing plans (expert ids, slots,
// drops) exactly, at every granularity and capacity mode, E in {5, 32, 160}, and the edges.
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>
#include <utility>

#include "moe_batch.cuh"

using namespace tmoe;
using test::Batch;
using test::make_batch;
using test::poison;
using test::random_host;

namespace {

/// The first want.numel() elements of `got` equal `want` (a dropless GPU plan keeps N*K row slots, the CPU's R).
template <class T>
void require_equal(const Tensor<T, Cpu>& got, const Tensor<T, Cpu>& want, const std::string& what,
                   bool prefix = false) {
  CAPTURE(what);
  if (prefix) {
    REQUIRE(got.numel() >= want.numel());
  } else {
    REQUIRE(got.shape() == want.shape());
  }
  std::int64_t diff = 0;
  for (std::int64_t i = 0; i < want.numel(); ++i) diff += got.data()[i] != want.data()[i] ? 1 : 0;
  CHECK(diff == 0);
}

/// Runs the CPU layer and the GPU layer (same weights) on `batch` and compares outputs and plans.
template <class Cfg>
void compare(std::int64_t C, std::int64_t F, std::int64_t group_size, const Batch& batch, bool training = false,
             std::int64_t num_tasks = 0, bool host_ids = false) {
  CudaContext ctx;
  CpuContext cpu{2};
  const moe::LayerOptions opt{.d_model = C, .d_ff = F, .num_tasks = num_tasks, .group_size = group_size};
  moe::Layer<Cfg, float, Cpu> ref(opt);
  ref.init(17);
  moe::Layer<Cfg, float, Cuda> gpu(opt);
  gpu.copy_parameters_from(ctx, ref);

  const moe::ForwardArgs args{.training = training, .seed = 99, .rng_offset = 5};
  Tensor<float, Cpu> want(batch.x.shape());
  typename moe::Layer<Cfg, float, Cpu>::Cache cache;
  moe::Input<float, Cpu> in{.x = batch.x};
  if (batch.segments.data() != nullptr) in.segment_ids = batch.segments;
  if (batch.tasks.data() != nullptr) in.task_ids = batch.tasks;
  ref.forward(cpu, in, want, cache, args);

  auto dx = to_device(ctx, batch.x);
  Tensor<std::int32_t, Cuda> dseg, dtask;
  moe::Input<float, Cuda> din{.x = dx};
  if (batch.segments.data() != nullptr) {
    dseg = to_device(ctx, batch.segments);
    din.segment_ids = dseg;
  }
  if (batch.tasks.data() != nullptr) {
    dtask = to_device(ctx, batch.tasks);
    din.task_ids = dtask;
    if (host_ids) din.host_task_ids = batch.tasks;
  }
  Tensor<float, Cuda> out(batch.x.shape());
  poison(ctx, out.view());
  typename moe::Layer<Cfg, float, Cuda>::Cache gcache;
  gpu.forward(ctx, din, out, gcache, args);
  const double err = test::rel_error_vs<float, float>(ctx, out.cview(), want.cview());
  CAPTURE(err);
  CHECK(err < 1e-5);

  const auto plan = moe::to_host(ctx, gcache.plan);
  require_equal(plan.expert, cache.plan.expert, "expert");
  require_equal(plan.dispatched, cache.plan.dispatched, "dispatched");
  CHECK(plan.dropped() == cache.plan.dropped());
  const double gerr = test::rel_error<float>(plan.gate.cview(), cache.plan.gate.cview());
  CAPTURE(gerr);
  CHECK(gerr < 1e-5);
  if (gcache.plan.permuted) {
    require_equal(plan.slot, cache.plan.slot, "slot");
    require_equal(plan.expert_count, cache.plan.expert_count, "expert_count");
    if (Cfg::dropless) {
      require_equal(plan.row, cache.plan.row, "row");
      require_equal(plan.row_token, cache.plan.row_token, "row_token", /*prefix=*/true);
      // Row slots past the dispatched rows are empty.
      for (std::int64_t r = cache.plan.rows(); r < plan.row_token.numel(); ++r) CHECK(plan.row_token.data()[r] == -1);
    }
  }
  if (training) {
    REQUIRE(gcache.plan.has_losses);
    CHECK(plan.aux_loss == doctest::Approx(cache.plan.aux_loss).epsilon(1e-6));
    CHECK(plan.z_loss == doctest::Approx(cache.plan.z_loss).epsilon(1e-5));
  }
}

template <int E>
using TokenCap = moe::Config<route::Token, Experts<E>, TopK<2>, CapacityFactor<3, 2>>;
template <int E>
using TokenDropless = moe::Config<route::Token, Experts<E>, TopK<2>, Dropless, NormalizeAfterDrop>;
template <int E>
using SentenceCap = moe::Config<route::Sentence, Experts<E>, TopK<2>, CapacityFactor<2>>;
template <int E>
using TaskCfg = moe::Config<route::Task, Experts<E>, TopK<2>>;

}  // namespace

TEST_SUITE("cuda.moe") {
  TEST_CASE("token routing with a capacity limit matches the CPU: outputs, experts, slots, drops (E = 5, 32, 160)") {
    compare<TokenCap<5>>(40, 72, 0, make_batch(3, 29, 40, 1, true, false, 0));
    compare<TokenCap<32>>(40, 72, 24, make_batch(5, 23, 40, 2, true, false, 0));
    compare<TokenCap<160>>(48, 40, 0, make_batch(4, 37, 48, 3, false, false, 0));
    // 8 tokens, E = 5: C = 2 rows per expert, the few-rows kernel.
    compare<TokenCap<5>>(40, 72, 0, make_batch(1, 8, 40, 51, false, false, 0));
  }

  TEST_CASE("dropless token routing matches the CPU, rows included (E = 5, 32, 160)") {
    compare<TokenDropless<5>>(40, 72, 0, make_batch(3, 29, 40, 4, true, false, 0));
    compare<TokenDropless<32>>(40, 72, 0, make_batch(2, 31, 40, 5, false, false, 0));
    compare<TokenDropless<160>>(48, 40, 0, make_batch(4, 37, 48, 6, true, false, 0));
  }

  TEST_CASE("sentence routing (packed sequences, padding) matches the CPU") {
    compare<SentenceCap<5>>(40, 56, 0, make_batch(6, 21, 40, 7, true, true, 0));
    compare<SentenceCap<32>>(40, 56, 0, make_batch(9, 17, 40, 8, false, false, 0));
    compare<moe::Config<route::Sentence, Experts<160>, TopK<2>, Dropless>>(48, 40, 0,
                                                                           make_batch(5, 13, 48, 9, true, true, 0));
  }

  TEST_CASE("task routing matches the CPU: the task path at inference, the permuted path in training") {
    compare<TaskCfg<5>>(40, 56, 0, make_batch(6, 19, 40, 10, true, false, 3), false, 3);
    compare<TaskCfg<32>>(40, 56, 0, make_batch(7, 11, 40, 11, false, false, 4), false, 4);
    compare<TaskCfg<160>>(48, 40, 0, make_batch(3, 13, 48, 12, false, false, 2), false, 2);
    // GShard's random second expert with a capacity limit, in training: permuted path, random drops identical.
    compare<moe::GShardPaper<route::Task, 32>>(40, 56, 0, make_batch(6, 19, 40, 13, true, false, 3), true, 3);
  }

  TEST_CASE("training: the random second-expert policy and the aux and z losses match the CPU") {
    compare<moe::GShardPaper<route::Token, 5>>(40, 72, 16, make_batch(3, 29, 40, 14, true, false, 0), true);
    compare<moe::GShardPaper<route::Token, 32>>(40, 72, 0, make_batch(4, 31, 40, 15, false, false, 0), true);
    compare<moe::SwitchTop1<route::Token, 160>>(48, 40, 0, make_batch(4, 37, 48, 16, true, false, 0), true);
  }

  TEST_CASE("larger batches take the general gate (CUB sort) and the cuBLAS expert GEMMs, and still match the CPU") {
    compare<TokenCap<8>>(40, 72, 0, make_batch(20, 35, 40, 40, true, false, 0));           // 700 tokens, C = 131
    compare<TokenDropless<32>>(40, 72, 0, make_batch(20, 35, 40, 41, false, false, 0));    // grouped per-expert GEMMs
    compare<TaskCfg<5>>(40, 56, 0, make_batch(4, 90, 40, 42, true, false, 3), false, 3);   // tasks 0 1 2 0: gathered
    compare<TaskCfg<32>>(40, 56, 0, make_batch(2, 50, 40, 43, true, false, 7), false, 7);  // one task, 100 rows
  }

  TEST_CASE("task routing with the ids also on the host (no read-back): small and large ranges, one task or several") {
    compare<TaskCfg<32>>(40, 56, 0, make_batch(1, 37, 40, 44, true, false, 4), false, 4, true);
    compare<TaskCfg<5>>(40, 56, 0, make_batch(6, 19, 40, 45, true, false, 3), false, 3, true);
    compare<TaskCfg<8>>(40, 56, 0, make_batch(2, 50, 40, 46, false, false, 7), false, 7, true);
    // Ranges of at most 2 rows take the few-rows kernel (four tasks of one token each; one of 2 tokens); 3 tokens
    // take cuBLAS.
    compare<TaskCfg<32>>(40, 56, 0, make_batch(1, 3, 40, 47, false, false, 4), false, 4, true);
    compare<TaskCfg<32>>(40, 56, 0, make_batch(4, 1, 40, 48, false, false, 4), false, 4, false);
    compare<TaskCfg<32>>(40, 56, 0, make_batch(1, 2, 40, 50, false, false, 4), false, 4, true);
    compare<TaskCfg<160>>(48, 40, 0, make_batch(2, 2, 48, 49, true, false, 1), false, 1, false);
  }

  TEST_CASE("task routing: every task's logits computed once (Input::task_logits) match the CPU and the plain call") {
    CudaContext ctx;
    CpuContext cpu{2};
    const moe::LayerOptions opt{.d_model = 40, .d_ff = 56, .num_tasks = 5};
    moe::Layer<TaskCfg<32>, float, Cpu> ref(opt);
    ref.init(23);
    moe::Layer<TaskCfg<32>, float, Cuda> gpu(opt);
    gpu.copy_parameters_from(ctx, ref);
    const Tensor<float, Cpu> want_logits = ref.task_logits(cpu);
    const Tensor<float, Cuda> logits = gpu.task_logits(ctx);
    const double lerr = test::rel_error_vs<float, float>(ctx, logits.cview(), want_logits.cview());
    CAPTURE(lerr);
    CHECK(lerr < 1e-5);

    // Small ranges (the few-rows kernel) and large ones (cuBLAS), with and without the ids on the host.
    for (const auto& shape : {std::pair<std::int64_t, std::int64_t>{4, 1}, {3, 29}}) {
      const std::int64_t B = shape.first, T = shape.second;
      CAPTURE(B);
      const Batch batch = make_batch(B, T, 40, 61, T > 1, false, 5);
      Tensor<float, Cpu> want(batch.x.shape());
      moe::Layer<TaskCfg<32>, float, Cpu>::Cache cache;
      moe::Input<float, Cpu> in{.x = batch.x, .task_ids = batch.tasks};
      if (batch.segments.data() != nullptr) in.segment_ids = batch.segments;
      ref.forward(cpu, in, want, cache);

      auto dx = to_device(ctx, batch.x);
      auto dtask = to_device(ctx, batch.tasks);
      Tensor<std::int32_t, Cuda> dseg;
      moe::Input<float, Cuda> din{.x = dx, .task_ids = dtask};
      if (batch.segments.data() != nullptr) {
        dseg = to_device(ctx, batch.segments);
        din.segment_ids = dseg;
      }
      Tensor<float, Cuda> plain(batch.x.shape()), fixed(batch.x.shape());
      moe::Layer<TaskCfg<32>, float, Cuda>::Cache gcache;
      gpu.forward(ctx, din, plain, gcache);
      for (const bool host_ids : {false, true}) {
        CAPTURE(host_ids);
        din.task_logits = logits;
        din.host_task_ids = host_ids ? batch.tasks.cview() : ConstTensorView<std::int32_t, Cpu>{};
        poison(ctx, fixed.view());
        gpu.forward(ctx, din, fixed, gcache);
        const double err = test::rel_error_vs<float, float>(ctx, fixed.cview(), want.cview());
        CAPTURE(err);
        CHECK(err < 1e-5);
        require_equal(moe::to_host(ctx, gcache.plan).expert, cache.plan.expert, "expert");
        // Bit for bit the plain GPU call: the same logits reach the same kernels.
        const Tensor<float, Cpu> a = to_host(ctx, plain.cview()), b = to_host(ctx, fixed.cview());
        CHECK(std::memcmp(a.data(), b.data(), a.bytes()) == 0);
      }
    }

    // Misuse: a wrong shape, a training call.
    const Batch batch = make_batch(2, 3, 40, 62, false, false, 5);
    auto dx = to_device(ctx, batch.x);
    auto dtask = to_device(ctx, batch.tasks);
    Tensor<float, Cuda> out(batch.x.shape()), wrong({5, 31});
    moe::Layer<TaskCfg<32>, float, Cuda>::Cache gcache;
    CHECK_THROWS_WITH_AS(gpu.forward(ctx, {.x = dx, .task_ids = dtask, .task_logits = wrong}, out, gcache),
                         "moe::Layer::forward: task_logits must have shape [5, 32] but has shape [5, 31]",
                         ShapeError);
    CHECK_THROWS_AS(gpu.forward(ctx, {.x = dx, .task_ids = dtask, .task_logits = logits}, out, gcache,
                                {.training = true}),
                    Error);
  }

  TEST_CASE("edges: zero tokens, one expert, K equal to E, all tokens to one expert (capacity overflow)") {
    compare<moe::Config<route::Token, Experts<1>, TopK<1>, CapacityFactor<1>>>(
        24, 40, 0, make_batch(3, 7, 24, 20, true, false, 0));
    compare<moe::Config<route::Token, Experts<3>, TopK<3>, CapacityFactor<1>>>(
        24, 40, 0, make_batch(3, 7, 24, 21, false, false, 0));
    compare<moe::Config<route::Token, Experts<3>, TopK<3>, Dropless>>(24, 40, 0,
                                                                      make_batch(3, 7, 24, 22, true, false, 0));
    compare<TokenCap<5>>(40, 72, 0, make_batch(0, 5, 40, 23, false, false, 0));

    // Every token prefers expert 2: x > 0 and only gate row 2 is positive. Capacity C = 1.5 * 20 / 4 = 7 keeps the
    // first 7 first choices.
    using Cfg = moe::Config<route::Token, Experts<4>, TopK<1>, CapacityFactor<3, 2>>;
    CudaContext ctx;
    CpuContext cpu{1};
    const moe::LayerOptions opt{.d_model = 16, .d_ff = 24};
    moe::Layer<Cfg, float, Cpu> ref(opt);
    ref.init(3);
    for (std::int64_t i = 0; i < ref.gate_weight().numel(); ++i) {
      ref.gate_weight().data()[i] = i / 16 == 2 ? 1.0f : -1.0f;
    }
    moe::Layer<Cfg, float, Cuda> gpu(opt);
    gpu.copy_parameters_from(ctx, ref);
    const auto x = random_host<float>({20, 16}, 4, 0.1, 1.0);
    Tensor<float, Cpu> want({20, 16});
    moe::Layer<Cfg, float, Cpu>::Cache cache;
    ref.forward(cpu, {.x = x}, want, cache);
    auto dx = to_device(ctx, x);
    Tensor<float, Cuda> out({20, 16});
    poison(ctx, out.view());
    moe::Layer<Cfg, float, Cuda>::Cache gcache;
    gpu.forward(ctx, {.x = dx}, out, gcache);
    const auto plan = moe::to_host(ctx, gcache.plan);
    CHECK(plan.dropped() == 13);
    CHECK(plan.expert_count.data()[2] == 7);
    CHECK(test::rel_error_vs<float, float>(ctx, out.cview(), want.cview()) < 1e-5);
  }

  TEST_CASE("bf16 and f16 layers agree with the float CPU layer on the rounded weights and inputs") {
    using Cfg = TokenCap<32>;
    CudaContext ctx;
    CpuContext cpu{2};
    const moe::LayerOptions opt{.d_model = 64, .d_ff = 136};
    moe::Layer<Cfg, float, Cpu> ref(opt);
    ref.init(5);
    // Round the CPU weights to bf16 so both sides start from the same numbers.
    for (auto view : {ref.gate_weight(), ref.wi(), ref.wo()}) {
      for (auto& v : view.span()) v = static_cast<float>(bf16(v));
    }
    moe::Layer<Cfg, bf16, Cuda> gpu(opt);
    gpu.copy_parameters_from(ctx, ref);
    const auto xb = random_host<bf16>({5, 23, 64}, 6);
    const auto x = test::convert<float, bf16>(xb.cview());
    Tensor<float, Cpu> want(x.shape());
    moe::Layer<Cfg, float, Cpu>::Cache cache;
    ref.forward(cpu, {.x = x}, want, cache);
    auto dx = to_device(ctx, xb);
    Tensor<bf16, Cuda> out(x.shape());
    poison(ctx, out.view());
    moe::Layer<Cfg, bf16, Cuda>::Cache gcache;
    gpu.forward(ctx, {.x = dx}, out, gcache);
    const double err = test::rel_error_vs<bf16, float>(ctx, out.cview(), want.cview());
    CAPTURE(err);
    CHECK(err < 1e-2);
    // The router sees the same bf16 numbers and computes in float: the choices agree.
    const auto plan = moe::to_host(ctx, gcache.plan);
    require_equal(plan.expert, cache.plan.expert, "expert");

    using TaskC = TaskCfg<8>;
    moe::Layer<TaskC, float, Cpu> tref({.d_model = 64, .d_ff = 136, .num_tasks = 3});
    tref.init(8);
    for (auto view : {tref.gate_weight(), tref.task_embedding(), tref.wi(), tref.wo()}) {
      for (auto& v : view.span()) v = static_cast<float>(f16(v));
    }
    moe::Layer<TaskC, f16, Cuda> tgpu({.d_model = 64, .d_ff = 136, .num_tasks = 3});
    tgpu.copy_parameters_from(ctx, tref);
    const auto xh = random_host<f16>({4, 9, 64}, 9);
    const auto xf = test::convert<float, f16>(xh.cview());
    Tensor<std::int32_t, Cpu> tasks({4});
    for (std::int64_t r = 0; r < 4; ++r) tasks.data()[r] = static_cast<std::int32_t>(r % 3);
    Tensor<float, Cpu> twant(xf.shape());
    moe::Layer<TaskC, float, Cpu>::Cache tcache;
    tref.forward(cpu, {.x = xf, .task_ids = tasks}, twant, tcache);
    auto dxh = to_device(ctx, xh);
    auto dtasks = to_device(ctx, tasks);
    Tensor<f16, Cuda> tout(xf.shape());
    poison(ctx, tout.view());
    moe::Layer<TaskC, f16, Cuda>::Cache tgcache;
    tgpu.forward(ctx, {.x = dxh, .task_ids = dtasks}, tout, tgcache);
    const double terr = test::rel_error_vs<f16, float>(ctx, tout.cview(), twant.cview());
    CAPTURE(terr);
    CHECK(terr < 1e-2);
  }

  TEST_CASE("task routing: an unknown task id and wrong shapes throw ShapeError naming what was expected") {
    CudaContext ctx;
    moe::Layer<TaskCfg<5>, float, Cuda> layer({.d_model = 16, .d_ff = 24, .num_tasks = 3});
    layer.init(ctx, 1);
    Tensor<float, Cuda> x({2, 5, 16}), out({2, 5, 16}), bad({2, 5, 15});
    Tensor<std::int32_t, Cpu> tasks({2});
    tasks.data()[0] = 1;
    tasks.data()[1] = 7;
    auto dtasks = to_device(ctx, tasks);
    moe::Layer<TaskCfg<5>, float, Cuda>::Cache cache;
    try {
      layer.forward(ctx, {.x = x, .task_ids = dtasks}, out, cache);
      FAIL("expected ShapeError");
    } catch (const ShapeError& e) {
      const std::string m = e.what();
      CHECK(m.find("unknown task id 7") != std::string::npos);
      CHECK(m.find("[0, 3)") != std::string::npos);
    }
    CHECK_THROWS_AS(layer.forward(ctx, {.x = x, .task_ids = dtasks}, bad, cache), ShapeError);
    Tensor<std::int32_t, Cuda> three({3});
    CHECK_THROWS_AS(layer.forward(ctx, {.x = x, .task_ids = three}, out, cache), ShapeError);
    CHECK_THROWS_AS(static_cast<void>(layer.task_route(ctx, 3)), ShapeError);
    CHECK_THROWS_AS((moe::Layer<TaskCfg<5>, float, Cuda>({.d_model = 16, .d_ff = 24})), ShapeError);
  }

  TEST_CASE("a token-routed forward with a capacity limit is captured in a CUDA graph and replayed") {
    using Cfg = TokenCap<32>;
    // 116 tokens: C = 5 rows per expert (cuBLAS batched GEMMs); 10 tokens: C = 1 (the few-rows kernel).
    for (const Shape shape : {Shape{4, 29, 64}, Shape{2, 5, 64}}) {
      CAPTURE(shape.to_string());
      CudaContext ctx;
      moe::Layer<Cfg, bf16, Cuda> layer({.d_model = 64, .d_ff = 136});
      layer.init(ctx, 7);
      const auto x1 = random_host<bf16>(shape, 30), x2 = random_host<bf16>(shape, 31);
      auto x = to_device(ctx, x1);
      Tensor<bf16, Cuda> out(shape), fresh(shape);
      moe::Layer<Cfg, bf16, Cuda>::Cache cache, cache2;
      layer.forward(ctx, {.x = x}, out, cache);  // sizes every buffer and the workspace
      ctx.synchronize();

      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      TMOE_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
      layer.forward(ctx, {.x = x}, out, cache);
      TMOE_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
      TMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

      // Replay on new input contents; compare with an ordinary forward on the same input.
      copy<bf16, Cuda, Cpu>(ctx, x.view(), x2.cview());
      poison(ctx, out.view());
      TMOE_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream()));
      ctx.synchronize();
      auto x2d = to_device(ctx, x2);
      layer.forward(ctx, {.x = x2d}, fresh, cache2);
      const auto a = to_host(ctx, out), b = to_host(ctx, fresh);
      std::int64_t diff = 0;
      for (std::int64_t i = 0; i < a.numel(); ++i) diff += a.data()[i] == b.data()[i] ? 0 : 1;
      CHECK(diff == 0);
      TMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
      TMOE_CUDA_CHECK(cudaGraphDestroy(graph));
    }
  }

  TEST_CASE("a small task-routed forward with host task ids is captured in a CUDA graph and replayed") {
    using Cfg = TaskCfg<32>;
    CudaContext ctx;
    moe::Layer<Cfg, bf16, Cuda> layer({.d_model = 64, .d_ff = 136, .num_tasks = 5});
    layer.init(ctx, 9);
    // Two rows of one token, one task: a range of 2 rows, the few-rows kernel, nothing read back.
    const auto x1 = random_host<bf16>({2, 1, 64}, 32), x2 = random_host<bf16>({2, 1, 64}, 33);
    Tensor<std::int32_t, Cpu> tasks({2});
    tasks.data()[0] = tasks.data()[1] = 3;
    auto dtasks = to_device(ctx, tasks);
    auto x = to_device(ctx, x1);
    Tensor<bf16, Cuda> out({2, 1, 64}), fresh({2, 1, 64});
    moe::Layer<Cfg, bf16, Cuda>::Cache cache, cache2;
    const moe::Input<bf16, Cuda> in{.x = x, .task_ids = dtasks, .host_task_ids = tasks};
    layer.forward(ctx, in, out, cache);
    ctx.synchronize();
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    TMOE_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
    layer.forward(ctx, in, out, cache);
    TMOE_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
    TMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    copy<bf16, Cuda, Cpu>(ctx, x.view(), x2.cview());
    poison(ctx, out.view());
    TMOE_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream()));
    ctx.synchronize();
    auto x2d = to_device(ctx, x2);
    layer.forward(ctx, {.x = x2d, .task_ids = dtasks}, fresh, cache2);
    const auto a = to_host(ctx, out), b = to_host(ctx, fresh);
    std::int64_t diff = 0;
    for (std::int64_t i = 0; i < a.numel(); ++i) diff += a.data()[i] == b.data()[i] ? 0 : 1;
    CHECK(diff == 0);
    TMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
    TMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  }

}  // TEST_SUITE
