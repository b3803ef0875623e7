// Training on the GPU against the CPU: AdamW's update bit for bit, and training steps of an MoE layer (forward,
// a squared-error loss, backward, AdamW) reaching the same losses and weights on both back-ends.
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_util.cuh"

using namespace tmoe;
using test::random_host;

TEST_SUITE("cuda.train") {
  TEST_CASE_TEMPLATE("AdamW on the GPU updates parameters and buffers bit for bit as the CPU AdamW", S, float,
                     double) {
    CudaContext ctx;
    CpuContext cpu{2};
    const std::vector<Shape> shapes = {Shape{7, 13}, Shape{1}, Shape{0, 3}, Shape{301}};
    std::vector<nn::Parameter<S, Cpu>> host;
    std::vector<nn::Parameter<S, Cuda>> dev;
    nn::ParameterRefs<S, Cpu> hrefs;
    nn::ParameterRefs<S, Cuda> drefs;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      host.emplace_back(shapes[i]);
      dev.emplace_back(shapes[i]);
    }
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const auto v = random_host<S>(shapes[i], 10 + i);
      std::memcpy(host[i].value.data(), v.data(), static_cast<std::size_t>(v.numel()) * sizeof(S));
      copy<S, Cuda, Cpu>(ctx, dev[i].value.view(), v.cview());
      hrefs.push_back({"p" + std::to_string(i), host[i].value.view(), host[i].grad.view()});
      drefs.push_back({"p" + std::to_string(i), dev[i].value.view(), dev[i].grad.view()});
    }
    const train::AdamWOptions opt{.lr = 3e-3, .beta1 = 0.85, .beta2 = 0.99, .eps = 1e-7, .weight_decay = 0.05};
    train::AdamW<S> ref(hrefs, opt);
    train::AdamW<S, Cuda> gpu(drefs, opt);
    for (int step = 0; step < 4; ++step) {
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        const auto g = random_host<S>(shapes[i], 100 + 10 * static_cast<std::uint64_t>(step) + i, -2.0, 2.0);
        std::memcpy(host[i].grad.data(), g.data(), static_cast<std::size_t>(g.numel()) * sizeof(S));
        copy<S, Cuda, Cpu>(ctx, dev[i].grad.view(), g.cview());
      }
      ref.step(cpu, 1e-2 / (step + 1));
      gpu.step(ctx, 1e-2 / (step + 1));
    }
    CHECK(gpu.step_count() == 4);
    auto hs = ref.state();
    auto ds = gpu.state();
    REQUIRE(hs.tensors.size() == ds.tensors.size());
    CHECK(hs.metadata == ds.metadata);
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      CAPTURE(i);
      const auto v = to_host<S>(ctx, dev[i].value.cview());
      CHECK(std::memcmp(v.data(), host[i].value.data(), static_cast<std::size_t>(v.numel()) * sizeof(S)) == 0);
    }
    for (std::size_t i = 0; i < hs.tensors.size(); ++i) {
      CAPTURE(hs.tensors[i].name);
      CHECK(ds.tensors[i].name == hs.tensors[i].name);
      const auto b = to_host<S>(ctx, ConstTensorView<S, Cuda>(ds.tensors[i].view));
      CHECK(std::memcmp(b.data(), hs.tensors[i].view.data(), static_cast<std::size_t>(b.numel()) * sizeof(S)) == 0);
    }
    CHECK_THROWS_AS(gpu.step(ctx, -1.0), Error);
  }

  TEST_CASE("three training steps of MoE layers reach the same losses and weights on the CPU and the GPU") {
    // loss = 0.5 * |y - target|^2 / N + the layer's aux loss; AdamW on every parameter.
    const auto run = [](auto cfg_tag, std::int64_t tasks, std::uint64_t seed) {
      using Cfg = decltype(cfg_tag);
      CudaContext ctx;
      CpuContext cpu{2};
      const std::int64_t B = 5, T = 11, C = 24, F = 40;
      const moe::LayerOptions opt{.d_model = C, .d_ff = F, .num_tasks = tasks};
      moe::Layer<Cfg, float, Cpu> ref(opt);
      ref.init(seed);
      moe::Layer<Cfg, float, Cuda> gpu(opt);
      gpu.copy_parameters_from(ctx, ref);
      // A large epsilon keeps Adam's update smooth where a gradient is near zero: there the first step's g / |g|
      // would turn rounding differences between the back-ends into a full-size step.
      const train::AdamWOptions adam{.lr = 1e-2, .eps = 1e-3};
      train::AdamW<float> ref_opt(ref.parameter_refs(), adam);
      train::AdamW<float, Cuda> gpu_opt(gpu.parameter_refs(), adam);
      const auto x = random_host<float>({B, T, C}, seed + 1);
      const auto target = random_host<float>({B, T, C}, seed + 2);
      Tensor<std::int32_t, Cpu> task_ids({B});
      for (std::int64_t b = 0; b < B; ++b) task_ids.data()[b] = tasks > 0 ? static_cast<std::int32_t>(b % tasks) : 0;
      const auto gx = to_device(ctx, x);
      const auto gtasks = to_device(ctx, task_ids);
      const double N = static_cast<double>(B * T);
      // The loss and its gradient from a host copy of y (the same function for both back-ends).
      const auto loss_and_grad = [&](const Tensor<float, Cpu>& y, Tensor<float, Cpu>& dy) {
        double l = 0;
        for (std::int64_t i = 0; i < y.numel(); ++i) {
          const double d = static_cast<double>(y.data()[i]) - static_cast<double>(target.data()[i]);
          l += 0.5 * d * d / N;
          dy.data()[i] = static_cast<float>(d / N);
        }
        return l;
      };
      for (int step = 0; step < 3; ++step) {
        const moe::ForwardArgs args{.training = true, .seed = seed, .rng_offset = static_cast<std::uint64_t>(step)};
        Tensor<float, Cpu> y({B, T, C}), dy({B, T, C}), dx({B, T, C});
        typename moe::Layer<Cfg, float, Cpu>::Cache cache;
        moe::Input<float, Cpu> in{.x = x};
        if (tasks > 0) in.task_ids = task_ids;
        ref.forward(cpu, in, y, cache, args);
        const double ref_loss = loss_and_grad(y, dy) + moe::Layer<Cfg, float, Cpu>::aux_loss(cache);
        ref.backward(cpu, cache, dy, dx);
        ref_opt.step(cpu);
        nn::zero_grad(ref.parameter_refs());

        Tensor<float, Cuda> gy({B, T, C}), gdx({B, T, C});
        typename moe::Layer<Cfg, float, Cuda>::Cache gcache;
        moe::Input<float, Cuda> gin{.x = gx};
        if (tasks > 0) gin.task_ids = gtasks;
        gpu.forward(ctx, gin, gy, gcache, args);
        Tensor<float, Cpu> hy = to_host(ctx, gy);
        Tensor<float, Cpu> hdy({B, T, C});
        const double gpu_loss = loss_and_grad(hy, hdy) + moe::Layer<Cfg, float, Cuda>::aux_loss(ctx, gcache);
        const auto gdy = to_device(ctx, hdy);
        gpu.backward(ctx, gcache, gdy, gdx);
        gpu_opt.step(ctx);
        train::zero_grad(ctx, gpu.parameter_refs());
        CAPTURE(step);
        CHECK(gpu_loss == doctest::Approx(ref_loss).epsilon(1e-5));
      }
      auto want = ref.parameter_refs();
      auto got = gpu.parameter_refs();
      for (std::size_t i = 0; i < want.size(); ++i) {
        CAPTURE(want[i].name);
        const double err = test::rel_error_vs<float, float>(ctx, ConstTensorView<float, Cuda>(got[i].value),
                                                            ConstTensorView<float, Cpu>(want[i].value));
        CAPTURE(err);
        CHECK(err < 1e-4);
      }
    };
    run(moe::Config<route::Token, Experts<6>, TopK<2>, CapacityFactor<2>>{}, 0, 3);
    run(moe::Config<route::Sentence, Experts<5>, TopK<2>, Dropless>{}, 0, 4);
    run(moe::Config<route::Task, Experts<7>, TopK<2>, ZLoss<1, 100>>{}, 3, 5);
  }
}
