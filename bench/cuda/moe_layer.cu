// The MoE layer forward on the GPU against its same-run ceilings (Google Benchmark, times from CUDA events).
//
//   copy_d2d                 device-to-device copy of 1 GiB: the bandwidth ceiling (bytes read + written)
//   dense_ffn/N              cuBLAS dense FFN, d_ff = K*F (the same FLOPs as K experts per token): the GEMM ceiling
//   moe_token<E>/N           token routing, capacity factor 2, replayed from a CUDA graph (the pass has no host
//                            round-trip); counters: useful TFLOP/s (dispatched rows only) and the bytes of the
//                            experts it used per second
//   moe_task<E>/N            task routing, one task per batch (the paper's decoder), ids also on the host: up to 8
//                            tokens replayed from a CUDA graph (nothing read back), beyond a plain forward (one sync)
//
// bf16 weights and activations, d_model 1024, d_ff 4096, K = 2. Before every timed iteration a 256 MiB buffer is
// overwritten so the weights come from memory, not the 50 MB L2. Each iteration is timed with events around the pass
// alone; run with --benchmark_repetitions=5 --benchmark_report_aggregates_only=true and read the medians.
// bench/cuda/table.py turns the JSON into the table of bench/RESULTS.md.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <set>
#include <vector>

#include "tmoe/cuda.cuh"

namespace {

using namespace tmoe;
constexpr std::int64_t kC = 1024, kF = 4096;
constexpr int kK = 2;

/// Uniform values in [-scale, scale) from Philox on the device, element i from counter i.
__global__ void fill_kernel(bf16* p, std::int64_t n, std::uint64_t seed, float scale) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const auto w = Philox(seed).block(static_cast<std::uint64_t>(i), 7);
  p[i] = bf16(scale * (2.0f * uniform01(w[0]) - 1.0f));
}
void fill(CudaContext& ctx, TensorView<bf16, Cuda> t, std::uint64_t seed, float scale) {
  if (t.numel() == 0) return;
  fill_kernel<<<backend::cuda::blocks_for(t.numel(), 256), 256, 0, ctx.stream()>>>(t.data(), t.numel(), seed, scale);
  TMOE_CUDA_CHECK_LAUNCH("fill_kernel");
}

/// Times `pass` with events, after evicting L2; one iteration per benchmark loop.
template <class Pass>
void timed_loop(benchmark::State& state, CudaContext& ctx, Pass&& pass) {
  static Tensor<std::uint8_t, Cuda> flush({std::int64_t{256} << 20});
  cudaEvent_t start = nullptr, stop = nullptr;
  TMOE_CUDA_CHECK(cudaEventCreate(&start));
  TMOE_CUDA_CHECK(cudaEventCreate(&stop));
  pass();  // warm-up: sizes buffers, loads modules
  ctx.synchronize();
  for (auto _ : state) {
    TMOE_CUDA_CHECK(cudaMemsetAsync(flush.data(), 1, flush.bytes(), ctx.stream()));
    TMOE_CUDA_CHECK(cudaEventRecord(start, ctx.stream()));
    pass();
    TMOE_CUDA_CHECK(cudaEventRecord(stop, ctx.stream()));
    TMOE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    TMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(static_cast<double>(ms) * 1e-3);
  }
  TMOE_CUDA_CHECK(cudaEventDestroy(start));
  TMOE_CUDA_CHECK(cudaEventDestroy(stop));
}

CudaContext& context() {
  static CudaContext ctx;
  return ctx;
}

void copy_d2d(benchmark::State& state) {
  auto& ctx = context();
  const std::int64_t bytes = std::int64_t{1} << 30;
  Tensor<std::uint8_t, Cuda> a({bytes}), b({bytes});
  timed_loop(state, ctx, [&] {
    TMOE_CUDA_CHECK(
        cudaMemcpyAsync(b.data(), a.data(), static_cast<std::size_t>(bytes), cudaMemcpyDeviceToDevice, ctx.stream()));
  });
  state.counters["GBps"] =
      benchmark::Counter(2.0 * static_cast<double>(bytes) * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
}

void dense_ffn(benchmark::State& state) {
  auto& ctx = context();
  const std::int64_t N = state.range(0), H = kK * kF;
  Tensor<bf16, Cuda> x({N, kC}), wi({H, kC}), wo({kC, H}), h({N, H}), y({N, kC});
  fill(ctx, x.view(), 1, 1.0f);
  fill(ctx, wi.view(), 2, 0.03f);
  fill(ctx, wo.view(), 3, 0.015f);
  timed_loop(state, ctx, [&] {
    Ops<Cuda>::gemm<bf16>(ctx, h.view(), x.cview(), Trans::kN, wi.cview(), Trans::kT);
    backend::cuda::moe_kernels::activation_inplace_kernel<nn::Relu, bf16>
        <<<backend::cuda::blocks_for(N * H, 256), 256, 0, ctx.stream()>>>(h.data(), nullptr, N * H);
    TMOE_CUDA_CHECK_LAUNCH("activation_inplace_kernel");
    Ops<Cuda>::gemm<bf16>(ctx, y.view(), h.cview(), Trans::kN, wo.cview(), Trans::kT);
  });
  const double flops = 4.0 * static_cast<double>(N) * kC * H;
  state.counters["TFLOPs"] = benchmark::Counter(flops * 1e-12 * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["weight_GBps"] =
      benchmark::Counter(2.0 * kC * H * 2 * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
}

template <class Cfg>
void init_layer(CudaContext& ctx, moe::Layer<Cfg, bf16, Cuda>& layer) {
  fill(ctx, layer.gate_weight(), 11, 0.05f);
  if constexpr (moe::Layer<Cfg, bf16, Cuda>::kTask) fill(ctx, layer.task_embedding(), 12, 1.0f);
  fill(ctx, layer.wi(), 13, 0.03f);
  fill(ctx, layer.wo(), 14, 0.015f);
}

template <int E>
void moe_token(benchmark::State& state) {
  using Cfg = moe::Config<route::Token, Experts<E>, TopK<kK>, CapacityFactor<2>>;
  auto& ctx = context();
  const std::int64_t N = state.range(0);
  moe::Layer<Cfg, bf16, Cuda> layer({.d_model = kC, .d_ff = kF});
  init_layer(ctx, layer);
  Tensor<bf16, Cuda> x({N, kC}), y({N, kC});
  fill(ctx, x.view(), 21, 1.0f);
  typename moe::Layer<Cfg, bf16, Cuda>::Cache cache;
  layer.forward(ctx, {.x = x}, y, cache);  // sizes every buffer before the capture
  ctx.synchronize();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  TMOE_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
  layer.forward(ctx, {.x = x}, y, cache);
  TMOE_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
  TMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  timed_loop(state, ctx, [&] { TMOE_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream())); });
  // What the pass did: dispatched rows and the experts it used.
  const auto plan = moe::to_host(ctx, cache.plan);
  double rows = 0;
  std::int64_t used = 0;
  for (int e = 0; e < E; ++e) {
    rows += static_cast<double>(plan.expert_count.data()[e]);
    used += plan.expert_count.data()[e] > 0 ? 1 : 0;
  }
  state.counters["TFLOPs"] =
      benchmark::Counter(4.0 * rows * kC * kF * 1e-12 * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["weight_GBps"] = benchmark::Counter(
      static_cast<double>(used) * 2.0 * kC * kF * 2 * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["experts_used"] = static_cast<double>(used);
  state.counters["dropped"] = static_cast<double>(plan.dropped());
  TMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  TMOE_CUDA_CHECK(cudaGraphDestroy(graph));
}

template <int E>
void moe_task(benchmark::State& state) {
  using Cfg = moe::Config<route::Task, Experts<E>, TopK<kK>>;
  auto& ctx = context();
  const std::int64_t N = state.range(0);
  moe::Layer<Cfg, bf16, Cuda> layer({.d_model = kC, .d_ff = kF, .num_tasks = 4});
  init_layer(ctx, layer);
  Tensor<bf16, Cuda> x({1, N, kC}), y({1, N, kC});
  fill(ctx, x.view(), 21, 1.0f);
  Tensor<std::int32_t, Cpu> task({1});
  task.data()[0] = 2;
  auto dtask = to_device(ctx, task);
  typename moe::Layer<Cfg, bf16, Cuda>::Cache cache;
  const moe::Input<bf16, Cuda> in{.x = x, .task_ids = dtask, .host_task_ids = task};
  layer.forward(ctx, in, y, cache);
  ctx.synchronize();
  cudaGraphExec_t exec = nullptr;
  cudaGraph_t graph = nullptr;
  if (N <= backend::cuda::moe_kernels::kExpertRowsMax) {
    // A small batch of one task, ids on the host: nothing is read back, so the pass is captured and replayed.
    TMOE_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
    layer.forward(ctx, in, y, cache);
    TMOE_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
    TMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    timed_loop(state, ctx, [&] { TMOE_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream())); });
    TMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
    TMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  } else {
    timed_loop(state, ctx, [&] { layer.forward(ctx, in, y, cache); });
  }
  state.counters["TFLOPs"] = benchmark::Counter(
      4.0 * static_cast<double>(N) * kC * kF * kK * 1e-12 * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["weight_GBps"] =
      benchmark::Counter(kK * 2.0 * kC * kF * 2 * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
}

void token_counts(benchmark::internal::Benchmark* b) {
  for (std::int64_t n : {1, 8, 64, 16384}) b->Arg(n);
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(copy_d2d)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(dense_ffn)->Apply(token_counts);
BENCHMARK(moe_token<8>)->Apply(token_counts);
BENCHMARK(moe_token<32>)->Apply(token_counts);
BENCHMARK(moe_token<128>)->Apply(token_counts);
BENCHMARK(moe_task<8>)->Apply(token_counts);
BENCHMARK(moe_task<32>)->Apply(token_counts);
BENCHMARK(moe_task<128>)->Apply(token_counts);
