// first_program: the README's "A first program", kept compiling here (docs examples are built in CI).
//
// What it shows: the smallest complete use of an MoE layer: configure it at compile time, run a forward pass on
// the CPU, and save its weights as safetensors. Expected output: "first_program: OK".

#include <cmath>
#include <cstdio>
#include <filesystem>

#include <tmoe/tmoe.hpp>

using Cfg = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<8>, tmoe::TopK<2>, tmoe::CapacityFactor<5, 4>>;

int main() {
  tmoe::CpuContext ctx(2);                                           // two threads
  tmoe::moe::Layer<Cfg, float, tmoe::Cpu> layer({.d_model = 64, .d_ff = 256});
  layer.init(/*seed=*/1);
  tmoe::Tensor<float, tmoe::Cpu> x({4, 16, 64}), y({4, 16, 64});    // (B, T, C)
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = std::sin(0.37f * static_cast<float>(i));
  tmoe::moe::Layer<Cfg, float, tmoe::Cpu>::Cache cache;
  layer.forward(ctx, {.x = x}, y, cache);
  // cache.plan: expert ids, gate weights, queue slots, dropped choices, per-expert counts, aux and z-loss.
  const auto path = std::filesystem::temp_directory_path() / "tmoe_first_program.safetensors";
  tmoe::io::save<float>(path, layer.parameters("encoder.layers.1.moe"));

  // Self-check: capacity floor(64 * 1.25 / 8) = 10, so 80 slots for 128 choices; the file loads back.
  bool ok = cache.plan.capacity == 10 && cache.plan.rows() <= 80 && cache.plan.rows() + cache.plan.dropped() == 128;
  tmoe::moe::Layer<Cfg, float, tmoe::Cpu> again({.d_model = 64, .d_ff = 256});
  tmoe::io::load<float>(path, again.parameters("encoder.layers.1.moe"));
  ok = ok && again.wi().data()[12345] == layer.wi().data()[12345];
  for (float v : y.view().span()) ok = ok && std::isfinite(v);
  std::filesystem::remove(path);
  std::printf("first_program: %s (%lld rows dispatched, %lld choices dropped)\n", ok ? "OK" : "FAILED",
              static_cast<long long>(cache.plan.rows()), static_cast<long long>(cache.plan.dropped()));
  return ok ? 0 : 1;
}
