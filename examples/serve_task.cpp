// Serving one task of a task-routed model: extract its sub-network, save it as its own small model, load it back
// and decode with it. The sub-network's translations are the full model's, token for token, at a dense model's
// size. Exits non-zero if they differ.

#include <cstdio>
#include <filesystem>
#include <vector>

#include <tmoe/tmoe.hpp>

int main() {
  using Model = tmoe::nn::TokenTask<8>;  // token-routed encoder, task-routed decoder, 8 experts, top-2
  const tmoe::nn::TransformerConfig config{.vocab_size = 300, .d_model = 64, .d_ff = 128, .heads = 4,
                                           .encoder_layers = 2, .decoder_layers = 4, .max_length = 40,
                                           .num_tasks = 4};
  Model model(config);
  model.init(2021);
  tmoe::CpuContext ctx{2};

  const std::int32_t task = 2;
  auto sub = tmoe::extract::subnetwork(ctx, model, task);
  const auto path = std::filesystem::temp_directory_path() / "tmoe_serve_task.safetensors";
  tmoe::io::save_model(path, sub);
  auto served = tmoe::io::load_model<tmoe::extract::subnetwork_t<Model>>(path);

  const std::vector<std::vector<std::int32_t>> sources = {{17, 5, 240, 3, 99}, {8, 8, 61}, {250, 4, 77, 12, 30, 6}};
  const std::vector<std::int32_t> tasks(sources.size(), task);
  const auto full = tmoe::decode::beam(ctx, model, sources, tasks, {.max_length = 20, .beam_size = 4});
  const auto small = tmoe::decode::beam(ctx, served, sources, {}, {.max_length = 20, .beam_size = 4});

  const auto n = Model::parameter_count(config);
  std::printf("full model: %lld parameters; task %d sub-network: %lld (file %lld bytes)\n",
              static_cast<long long>(n.total), task,
              static_cast<long long>(n.embedding + n.encoder_extracted + n.decoder_extracted),
              static_cast<long long>(std::filesystem::file_size(path)));
  tmoe::extract::Extraction record;
  tmoe::extract::extraction_of(served, record);
  for (const auto& layer : record.layers) {
    std::printf("  %s keeps experts %d (%.3f) and %d (%.3f)\n", layer.layer.c_str(), layer.experts[0],
                layer.weights[0], layer.experts[1], layer.weights[1]);
  }
  bool same = true;
  for (std::size_t i = 0; i < sources.size(); ++i) {
    std::printf("source %zu -> %zu tokens\n", i, small.tokens[i].size());
    same = same && full.tokens[i] == small.tokens[i];
  }
  std::filesystem::remove(path);
  std::printf("serve_task: %s\n", same ? "OK (sub-network output equals the full model's)" : "MISMATCH");
  return same ? 0 : 1;
}
