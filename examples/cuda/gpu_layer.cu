// The MoE layer on the GPU next to the same layer on the CPU: a token-routed and a task-routed bf16 layer, their
// outputs against the CPU's float layer on the same (rounded) weights, and where the first tokens went.
//
//   build/release/examples/cuda_gpu_layer      (needs a GPU; scripts/gpu-check runs the tests and benchmarks)
#include <cmath>
#include <cstdio>
#include <tmoe/cuda.cuh>

namespace {

using namespace tmoe;

/// max |a - b| / max |b| over two host tensors.
double rel_error(const Tensor<bf16, Cpu>& got, const Tensor<float, Cpu>& want) {
  double diff = 0, scale = 1e-30;
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    const double g = static_cast<float>(got.data()[i]), w = want.data()[i];
    if (std::isnan(g)) return INFINITY;
    diff = std::max(diff, std::abs(g - w));
    scale = std::max(scale, std::abs(w));
  }
  return diff / scale;
}

/// Runs one configuration on both back-ends; returns true if the GPU agrees with the CPU within bf16 rounding.
template <class Cfg>
bool run(const char* name, CudaContext& ctx, std::int64_t tasks) {
  const moe::LayerOptions opt{.d_model = 96, .d_ff = 200, .num_tasks = tasks};
  moe::Layer<Cfg, float, Cpu> cpu_layer(opt);
  cpu_layer.init(11);
  for (const auto& p : cpu_layer.parameters()) {
    for (auto& v : p.view.span()) v = static_cast<float>(bf16(v));  // both sides start from the same bf16 numbers
  }
  moe::Layer<Cfg, bf16, Cuda> gpu_layer(opt);
  gpu_layer.copy_parameters_from(ctx, cpu_layer);

  Tensor<float, Cpu> x({3, 17, 96});
  nn::fill_normal<float>(x.view(), 5, 0, 1.0);
  Tensor<bf16, Cpu> xb(x.shape());
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    xb.data()[i] = bf16(x.data()[i]);
    x.data()[i] = static_cast<float>(xb.data()[i]);
  }
  Tensor<std::int32_t, Cpu> task_ids({3});
  for (std::int64_t r = 0; r < 3; ++r) task_ids.data()[r] = static_cast<std::int32_t>(r % (tasks > 0 ? tasks : 1));

  CpuContext cpu{2};
  Tensor<float, Cpu> want(x.shape());
  typename moe::Layer<Cfg, float, Cpu>::Cache cpu_cache;
  moe::Input<float, Cpu> in{.x = x};
  if (tasks > 0) in.task_ids = task_ids;
  cpu_layer.forward(cpu, in, want, cpu_cache);

  auto dx = to_device(ctx, xb);
  auto dtasks = to_device(ctx, task_ids);
  Tensor<bf16, Cuda> y(x.shape());
  typename moe::Layer<Cfg, bf16, Cuda>::Cache cache;
  moe::Input<bf16, Cuda> din{.x = dx};
  if (tasks > 0) din.task_ids = dtasks;
  gpu_layer.forward(ctx, din, y, cache);
  const auto got = to_host(ctx, y);
  const auto plan = moe::to_host(ctx, cache.plan);

  const double err = rel_error(got, want);
  std::printf("%s: relative error against the CPU %.2e; first tokens ->", name, err);
  for (std::int64_t n = 0; n < 4; ++n) {
    std::printf(" [%d %d]", plan.expert.data()[n * 2], plan.expert.data()[n * 2 + 1]);
  }
  std::printf("\n");
  return err < 1e-2;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "gpu_layer: no CUDA device visible; skipping\n");
    return 77;
  }
  CudaContext ctx;
  bool ok = run<moe::Config<route::Token, Experts<16>, TopK<2>, CapacityFactor<2>>>("token routing", ctx, 0);
  ok = run<moe::Config<route::Task, Experts<16>, TopK<2>>>("task routing", ctx, 3) && ok;
  std::printf("gpu_layer: %s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
