// train_step: training throughput of a small encoder-decoder (forward, backward and optimizer step), dense vs MoE.
//
// Model: d_model 256, d_ff 1024, 4 heads, 3+3 layers, vocabulary 8000, MoE (E = 8, top-2) in every other block;
// batches of 64 sequences of 32 source and 32 target tokens (2048 target tokens); 2 threads; AdamW; dropout 0.1.
//   BM_TrainStep/dense        nn::DenseTransformer
//   BM_TrainStep/token_token  nn::TokenToken<8>  (capacity 2S/E)
//   BM_TrainStep/token_task   nn::TokenTask<8>   (decoder routed by one of 4 tasks, dropless)
// Counter: target tokens/s. An MoE step does about twice the FFN FLOPs of the dense one (top-2 of equal-size
// experts); the target is token/token at no less than 0.6x the dense model's tokens/s.
//
// Run: build/bench/bench/train_step --benchmark_min_time=2 --benchmark_repetitions=3
//      --benchmark_report_aggregates_only=true

#include <benchmark/benchmark.h>

#include <cstdint>

#include <tmoe/tmoe.hpp>

namespace {

using namespace tmoe;

constexpr std::int64_t kBatch = 64, kLength = 32, kVocab = 8000;

nn::TransformerConfig config() {
  return {.vocab_size = kVocab, .d_model = 256, .d_ff = 1024, .heads = 4, .encoder_layers = 3,
          .decoder_layers = 3, .max_length = 64, .dropout = 0.1, .num_tasks = 4, .pad_id = 0};
}

template <class Model>
void BM_TrainStep(benchmark::State& state) {
  CpuContext ctx(2);
  Model model(config());
  model.init(1);
  auto params = model.parameter_refs();
  train::AdamW<float> opt(params, {.lr = 1e-4});
  Tensor<std::int32_t, Cpu> source({kBatch, kLength}), target_in({kBatch, kLength}), target_out({kBatch, kLength}),
      tasks({kBatch});
  const Philox rng(7);
  for (std::int64_t i = 0; i < source.numel(); ++i) {
    const auto w = rng.block(static_cast<std::uint64_t>(i), 1);
    source.data()[i] = static_cast<std::int32_t>(1 + w[0] % (kVocab - 1));
    target_out.data()[i] = static_cast<std::int32_t>(1 + w[1] % (kVocab - 1));
    target_in.data()[i] = static_cast<std::int32_t>(1 + w[2] % (kVocab - 1));
  }
  for (std::int64_t b = 0; b < kBatch; ++b) tasks.data()[b] = static_cast<std::int32_t>(b * 4 / kBatch);
  typename Model::Cache cache;
  const std::int64_t N = kBatch * kLength;
  Tensor<float, Cpu> dlogits({N, kVocab});
  std::uint64_t step = 0;
  for (auto _ : state) {
    model.forward(ctx, {.source = source, .target_in = target_in, .task_ids = tasks}, cache,
                  {.training = true, .seed = 3, .step = step++});
    const auto r = train::label_smoothed_cross_entropy<float>(ctx, dlogits, cache.logits.view().reshape({N, kVocab}),
                                                              target_out.view().reshape({N}),
                                                              {.padding_id = 0, .label_smoothing = 0.1});
    benchmark::DoNotOptimize(r.loss);
    model.backward(ctx, cache, dlogits.view().reshape(cache.logits.shape()));
    opt.step(ctx);
    nn::zero_grad(params);
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(N), benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK_TEMPLATE(BM_TrainStep, nn::DenseTransformer<float>)->Name("BM_TrainStep/dense")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_TrainStep, nn::TokenToken<8, float>)->Name("BM_TrainStep/token_token")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_TrainStep, nn::TokenTask<8, float>)->Name("BM_TrainStep/token_task")->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
