// quickstart: a token-routed and a task-routed MoE layer on tmoe's own generated inputs.
//
// What it shows: how routing granularity, expert count, top-k and capacity are chosen at compile time; how
// to run a forward pass on the CPU; how to read the routing plan (which expert each token went to, with what
// weight, and what was dropped); and how to save and reload the weights as safetensors.
//
// Build and run: scripts/demo  (or: cmake --preset release && cmake --build --preset release --target quickstart)
// Expected output: an expert-load table per layer, the per-task expert choices of the task-routed layer, and
// "quickstart: OK". It checks its own invariants and exits non-zero if one fails.

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#include <tmoe/tmoe.hpp>

namespace {

constexpr std::int64_t kBatch = 4, kLength = 23, kModel = 64, kHidden = 96, kTasks = 3;

using TokenCfg = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<8>, tmoe::TopK<2>, tmoe::CapacityFactor<5, 4>>;
using TaskCfg = tmoe::moe::Config<tmoe::route::Task, tmoe::Experts<8>, tmoe::TopK<2>, tmoe::Dropless>;

int failures = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("CHECK FAILED: %s\n", what);
    ++failures;
  }
}

template <class Plan>
void print_load(const char* title, const Plan& plan) {
  const std::string capacity =
      plan.capacity < 0 ? std::string("dropless") : "capacity " + std::to_string(plan.capacity) + " per expert";
  std::printf("\n%s: %lld tokens, top-%d of %d experts, %s\n", title, static_cast<long long>(plan.tokens), plan.top_k,
              plan.experts, capacity.c_str());
  std::printf("  expert:");
  for (int e = 0; e < plan.experts; ++e) std::printf(" %4d", e);
  std::printf("\n  rows:  ");
  for (int e = 0; e < plan.experts; ++e) std::printf(" %4lld", static_cast<long long>(plan.expert_count.data()[e]));
  std::printf("\n  dropped choices: %lld, tokens with no expert: %lld, aux loss %.4f, z-loss %.4f\n",
              static_cast<long long>(plan.dropped()), static_cast<long long>(plan.dropped_tokens()), plan.aux_loss,
              plan.z_loss);
}

}  // namespace

int main() {
  tmoe::CpuContext ctx(2);

  // Inputs: B sequences of T tokens, the last positions of later rows padded (segment id 0).
  tmoe::Tensor<float, tmoe::Cpu> x({kBatch, kLength, kModel}), y({kBatch, kLength, kModel});
  const tmoe::Philox rng(2021);
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const auto w = rng.block(static_cast<std::uint64_t>(i), 0);
    x.data()[i] = tmoe::normal01(w[0], w[1]);
  }
  tmoe::Tensor<std::int32_t, tmoe::Cpu> segments({kBatch, kLength}), tasks({kBatch});
  for (std::int64_t b = 0; b < kBatch; ++b) {
    for (std::int64_t t = 0; t < kLength; ++t) segments.view()(b, t) = t < kLength - 3 * b ? 1 : 0;
    tasks.view()(b) = static_cast<std::int32_t>(b % kTasks);  // e.g. the target language of row b
  }

  // Token routing: every token chooses its own top-2 experts; capacity 1.25 * S / E can drop some.
  tmoe::moe::Layer<TokenCfg, float, tmoe::Cpu> token_layer({.d_model = kModel, .d_ff = kHidden});
  token_layer.init(1);
  tmoe::moe::Layer<TokenCfg, float, tmoe::Cpu>::Cache token_cache;
  token_layer.forward(ctx, {.x = x, .segment_ids = segments}, y, token_cache);
  print_load("token-routed layer", token_cache.plan);
  std::printf("  first 6 tokens of row 0 -> (expert, weight):");
  for (int n = 0; n < 6; ++n) {
    std::printf(" (%d %.2f|%d %.2f)", token_cache.plan.expert.data()[n * 2], token_cache.plan.gate.data()[n * 2],
                token_cache.plan.expert.data()[n * 2 + 1], token_cache.plan.gate.data()[n * 2 + 1]);
  }
  std::printf("\n");
  bool finite = true;
  for (float v : y.view().span()) finite = finite && std::isfinite(v);
  expect(finite, "token-routed output is finite");

  // Task routing: every token of a task shares the task's experts, so each task runs as K dense FFN calls.
  tmoe::moe::Layer<TaskCfg, float, tmoe::Cpu> task_layer({.d_model = kModel, .d_ff = kHidden, .num_tasks = kTasks});
  task_layer.init(2);
  tmoe::moe::Layer<TaskCfg, float, tmoe::Cpu>::Cache task_cache;
  task_layer.forward(ctx, {.x = x, .segment_ids = segments, .task_ids = tasks}, y, task_cache);
  print_load("task-routed layer", task_cache.plan);
  for (std::int64_t b = 0; b < kTasks; ++b) {
    const std::int64_t n = b * kLength;
    std::printf("  task %lld -> experts %d (%.3f) and %d (%.3f)\n", static_cast<long long>(b),
                task_cache.plan.expert.data()[n * 2], task_cache.plan.gate.data()[n * 2],
                task_cache.plan.expert.data()[n * 2 + 1], task_cache.plan.gate.data()[n * 2 + 1]);
  }
  expect(task_cache.plan.dropped() == 0, "dropless task routing drops nothing");
  for (std::int64_t n = 0; n < kBatch * kLength; ++n) {
    if (segments.data()[n] == 0) continue;
    const std::int64_t first = (tasks.data()[n / kLength]) * kLength;  // row b's task equals row (b % kTasks)'s
    expect(task_cache.plan.expert.data()[n * 2] == task_cache.plan.expert.data()[first * 2],
           "every token of a task shares its experts");
  }

  // Save and reload the task-routed layer's weights under their stable names.
  const auto path = std::filesystem::temp_directory_path() / "tmoe_quickstart.safetensors";
  tmoe::io::save<float>(path, task_layer.parameters("decoder.layers.1.moe"), {{"routing", "task"}});
  tmoe::moe::Layer<TaskCfg, float, tmoe::Cpu> reloaded({.d_model = kModel, .d_ff = kHidden, .num_tasks = kTasks});
  tmoe::io::load<float>(path, reloaded.parameters("decoder.layers.1.moe"));
  tmoe::Tensor<float, tmoe::Cpu> y2({kBatch, kLength, kModel});
  reloaded.forward(ctx, {.x = x, .segment_ids = segments, .task_ids = tasks}, y2, task_cache);
  bool same = true;
  for (std::int64_t i = 0; i < y.numel(); ++i) same = same && y.data()[i] == y2.data()[i];
  expect(same, "a reloaded layer gives bitwise the same output");
  std::printf("\nsaved and reloaded %s (%lld bytes)\n", path.string().c_str(),
              static_cast<long long>(std::filesystem::file_size(path)));
  std::filesystem::remove(path);

  std::printf("quickstart: %s\n", failures == 0 ? "OK" : "FAILED");
  return failures == 0 ? 0 : 1;
}
