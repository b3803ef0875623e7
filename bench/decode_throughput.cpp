// decode_throughput: greedy decoding throughput of whole models, the paper's serving comparison (paper-spec 1.10)
// on one machine. Every case decodes a batch of a fixed generated test set with the work of greedy search: encode,
// then 32 steps of Transformer::decode_step (KV caches) and an argmax over the vocabulary, 32 target tokens per
// sequence for every model. Each step's input is the test set's reference token rather than the argmax (forced
// decoding): an untrained model's own argmax collapses all rows onto one token, and hence onto the same experts,
// which a trained model's diverse outputs do not. Reports tokens/s.
//
// Models: 6+6 layers, d_model 512, d_ff 2048, 8 heads, vocabulary 8192, sources of 32 tokens, float, 2 threads:
//   dense            nn::DenseTransformer, d_ff 2048
//   dense_2F         nn::DenseTransformer, d_ff 4096 (the active width of a top-2 MoE layer)
//   token_token_E    TokenToken<E>: MoE in every other block of both stacks, E = 32 and 128
//   token_task_E     TokenTask<E>, run as the full model, every sequence of task 0
//   subnet_E         extract::subnetwork_t<TokenTask<E>> for task 0 (its decoder MoE layers folded into dense
//                    FFNs of width 2 * 2048)
// TokenToken and TokenTask are the library's nn::TokenToken and nn::TokenTask with nn::DroplessTokenStack in place
// of capacity 2S/E, so every model computes all its tokens, as a trained, balanced router nearly would. With
// capacity 2S/E, a decoding step's group is the batch: 2 x 8 / 32 = 0.5 slot per expert at batch 8, and this
// untrained router sends the batch to about half the experts, so token/token kept only 24% to 33% of its top-2
// rows from batch 8 up (kept_rows, bench/RESULTS.md) and its throughput counted work it never did.
// Batch sizes 1, 2, 4, ..., 512 sequences.
//
// Counters: tokens/s (target tokens decoded per second, encoder time included), step_ms (the batch's time over its
// 32 steps), roofline_frac. The roofline is computed per phase (the encoder call, then each decoder step) from what
// that phase really touched in a separate untimed pass with the same inputs: the weights it read (for MoE layers only
// the experts that received at least one row, counted from the routing plans), the KV cache it read and the logits
// it wrote, over the read bandwidth; and its FLOPs over the GEMM rate; a phase's bound is the larger of the two, and
// roofline_frac = sum of the bounds / measured time. touched_experts is the mean number of experts a decoder MoE
// layer reads per step; kept_rows the share of a token-routed decoder MoE layer's top-k assignments that its capacity
// lets through (1 elsewhere). Both ceilings are measured in this binary (ceilings.hpp). That untimed pass uses the decode
// state the timed batches then reuse, so they measure steady-state decoding, not the first touch of its buffers.
//
// Weights are random (a fast counter-based uniform init with each layer's usual scale), so routing is that of an
// untrained model: spread over the experts rather than specialised.
//
// Run (the numbers in bench/RESULTS.md; about 10 minutes on 2 cores, peak memory about 7 GB):
//   build/bench/bench/decode_throughput --benchmark_min_time=0.3 --benchmark_format=json
//       --benchmark_out=decode.json --benchmark_out_format=json

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <tmoe/tmoe.hpp>

#include "ceilings.hpp"

namespace {

using namespace tmoe_bench;
namespace nn = tmoe::nn;
namespace extract = tmoe::extract;

constexpr std::int64_t kVocab = 8192, kModelDim = 512, kFF = 2048, kHeads = 8, kLayers = 6;
constexpr std::int64_t kLength = 32;  // source tokens and target tokens per sequence
constexpr std::int64_t kTestSet = 512;

// The paper's combinations with Dropless token routing (see the header comment).
template <int E>
using TokenToken = nn::Transformer<nn::DroplessTokenStack<E>, nn::DroplessTokenStack<E>, float, Cpu>;
template <int E>
using TokenTask = nn::Transformer<nn::DroplessTokenStack<E>, nn::TaskStack<E>, float, Cpu>;
constexpr std::int32_t kTask = 0;

nn::TransformerConfig config(std::int64_t d_ff = kFF) {
  return {.vocab_size = kVocab, .d_model = kModelDim, .d_ff = d_ff, .heads = kHeads, .encoder_layers = kLayers,
          .decoder_layers = kLayers, .max_length = 2 * kLength, .dropout = 0.0, .num_tasks = 4};
}

// The fixed test set: kTestSet sources of kLength ids in [3, V).
const std::vector<std::vector<std::int32_t>>& test_set() {
  static const auto set = [] {
    std::vector<std::vector<std::int32_t>> s(kTestSet);
    const tmoe::Philox rng(20211007);
    for (std::int64_t i = 0; i < kTestSet; ++i) {
      for (std::int64_t t = 0; t < kLength; ++t) {
        s[static_cast<std::size_t>(i)].push_back(
            3 + static_cast<std::int32_t>(rng.block(static_cast<std::uint64_t>(i * kLength + t), 5)[0] % (kVocab - 3)));
      }
    }
    return s;
  }();
  return set;
}

// Uniform weights with standard deviation 1/sqrt(fan-in) (the last dimension), sqrt(0.1/C) for routers, 1 for task
// embeddings; biases 0 and layer norms at their constructed (1, 0). Counter-based, in parallel: 1.6e9 weights of an
// E = 128 model take a few seconds instead of a minute of normal draws.
template <class Model>
void fast_init(Model& model, std::uint64_t seed) {
  std::uint64_t stream = 0;
  for (auto& p : model.parameters()) {
    ++stream;
    const std::string& n = p.name;
    if (n.ends_with("_ln.weight") || n.ends_with("_ln.bias") || n.ends_with(".bias")) continue;
    double sigma = 1.0 / std::sqrt(static_cast<double>(p.view.dim(-1)));
    if (n.ends_with("gate.weight")) sigma = std::sqrt(0.1 / static_cast<double>(kModelDim));
    if (n.ends_with("task_embedding")) sigma = 1.0;
    const float a = static_cast<float>(sigma * std::sqrt(3.0));
    float* d = p.view.data();
    const std::uint64_t key = seed * 0x9E3779B97F4A7C15ULL + stream * 0xD1B54A32D192ED03ULL;
    context().parallel_range(p.view.numel(), 1 << 16, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) {
        std::uint64_t z = key + static_cast<std::uint64_t>(i) * 0x9E3779B97F4A7C15ULL;  // splitmix64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        d[i] = a * (static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The roofline of one decode: bytes and FLOPs per phase, from the routing plans of a real run.

struct Phase {
  double bytes = 0, flops = 0;
};

struct Roofline {
  std::vector<Phase> phases;
  double touched_per_layer_step = 0;  // decoder MoE layers: mean experts with >= 1 row per step
  double kept_rows = 1;               // token-routed decoder MoE layers: rows computed / (top-k x tokens)
  [[nodiscard]] double seconds(const Ceilings& c) const {
    double s = 0;
    for (const auto& p : phases) s += std::max(p.bytes / c.read_bytes_per_s, p.flops / c.gemm_flops_per_s);
    return s;
  }
};

// Touched experts and dispatched rows of one MoE layer's last call.
template <class Plan>
void moe_usage(const Plan& plan, int experts, std::int64_t& touched, std::int64_t& rows) {
  touched = 0;
  rows = plan.rows();
  for (int e = 0; e < experts; ++e) touched += plan.expert_count.data()[e] > 0 ? 1 : 0;
}

// FFN-slot cost of one block: weights read and FLOPs, for N tokens.
template <class Pattern>
void ffn_cost(std::int64_t layer, std::int64_t N, std::int64_t touched, std::int64_t rows, Phase& ph) {
  const double C = kModelDim, F = kFF;
  if constexpr (Pattern::has_moe) {
    if (Pattern::is_moe(layer)) {
      constexpr int K = Pattern::moe_config::top_k, E = Pattern::moe_config::experts;
      if constexpr (Pattern::folded) {
        ph.bytes += 4.0 * 2 * C * K * F;
        ph.flops += 2.0 * N * 2 * C * K * F;
      } else {
        ph.bytes += 4.0 * (E * C + static_cast<double>(touched) * 2 * C * F);
        ph.flops += 2.0 * N * E * C + static_cast<double>(rows) * 4 * C * F;
      }
      return;
    }
  }
  (void)touched;
  (void)rows;
  ph.bytes += 4.0 * (2 * C * F + F + C);
  ph.flops += 2.0 * N * 2 * C * F;
}

// The reference target of test sequence i: kLength ids in [3, V), BOS first.
std::int32_t target_token(std::int64_t i, std::int64_t t) {
  if (t == 0) return 1;
  const tmoe::Philox rng(19);
  return 3 + static_cast<std::int32_t>(rng.block(static_cast<std::uint64_t>(i * kLength + t), 6)[0] % (kVocab - 3));
}

// Greedy decoding's work with forced inputs: encode, then kLength steps of decode_step and a parallel argmax over
// the vocabulary, each step's input being the reference target token (as for a trained model, whose outputs follow
// the data, rows stay diverse; an untrained model's own argmax collapses every row onto one token and so onto the
// same experts, which would flatter token routing).
template <class Model>
void forced_decode(const Model& model, const tmoe::Tensor<std::int32_t, Cpu>& source,
                   const tmoe::Tensor<std::int32_t, Cpu>& task_ids, std::int64_t first, typename Model::DecodeState& st,
                   tmoe::Tensor<std::int32_t, Cpu>& inputs, tmoe::Tensor<float, Cpu>& logits,
                   std::vector<std::int32_t>& argmax, const std::function<void(std::int64_t)>& after_step = {}) {
  const std::int64_t B = source.dim(0);
  auto& ctx = context();
  model.begin_decode(ctx, source, task_ids, kLength, st);
  if (after_step) after_step(-1);
  for (std::int64_t t = 0; t < kLength; ++t) {
    for (std::int64_t b = 0; b < B; ++b) inputs.data()[b] = target_token((first + b) % kTestSet, t);
    model.decode_step(ctx, st, inputs, logits);
    tmoe::decode::argmax_rows<float>(ctx, logits, argmax.data());
    if (after_step) after_step(t);
  }
}

template <class Model>
Roofline measure_roofline(const Model& model, std::int64_t B, typename Model::DecodeState& st) {
  using Enc = typename Model::encoder_pattern;
  using Dec = typename Model::decoder_pattern;
  const auto& cfg = model.config();
  const double C = kModelDim, V = kVocab, S = kLength, F = static_cast<double>(cfg.d_ff);
  const double ffn_width_scale = F / kFF;  // dense_2F: twice the dense FFN
  const auto& set = test_set();
  tmoe::Tensor<std::int32_t, Cpu> source({B, kLength}), tasks({B}), inputs({B});
  for (std::int64_t b = 0; b < B; ++b) std::copy_n(set[static_cast<std::size_t>(b)].data(), kLength, source.data() + b * kLength);
  std::fill_n(tasks.data(), B, kTask);
  tmoe::Tensor<float, Cpu> logits({B, kVocab});
  std::vector<std::int32_t> argmax(static_cast<std::size_t>(B));
  Roofline r;
  double touched_sum = 0, rows_sum = 0, slots_sum = 0;
  std::int64_t touched_n = 0;
  const double N = static_cast<double>(B) * S;
  auto account = [&](std::int64_t t) {
    if (t < 0) {
      // Encoder: every layer's weights (MoE: the touched experts), B*S tokens.
      Phase enc;
      for (std::int64_t i = 0; i < cfg.encoder_layers; ++i) {
        enc.bytes += 4.0 * (4 * (C * C + C) + 4 * C);
        enc.flops += 2.0 * N * 4 * C * C + 2.0 * 2 * B * S * S * C;
        std::int64_t touched = 0, rows = 0;
        if constexpr (Enc::has_moe && !Enc::folded) {
          if (Enc::is_moe(i)) {
            moe_usage(st.encoder.enc_moe[static_cast<std::size_t>(i / Enc::every)].ffn.ffn.plan,
                      Enc::moe_config::experts, touched, rows);
          }
        }
        Phase f;
        ffn_cost<Enc>(i, B * kLength, touched, rows, f);
        enc.bytes += f.bytes * (Enc::is_moe(i) ? 1.0 : ffn_width_scale);
        enc.flops += f.flops * (Enc::is_moe(i) ? 1.0 : ffn_width_scale);
      }
      r.phases.push_back(enc);
      return;
    }
    Phase ph;
    const double keys = static_cast<double>(t + 1);
    for (std::int64_t i = 0; i < cfg.decoder_layers; ++i) {
      ph.bytes += 4.0 * (6 * (C * C + C) + 6 * C);  // self q,k,v,o; cross q,o; three layer norms
      ph.bytes += 4.0 * 2 * B * (keys + S) * C;     // self and cross keys and values
      ph.flops += 2.0 * B * 6 * C * C + 2.0 * 2 * B * (keys + S) * C;
      std::int64_t touched = 0, rows = 0;
      if constexpr (Dec::has_moe && !Dec::folded) {
        if (Dec::is_moe(i)) {
          moe_usage(st.moe[static_cast<std::size_t>(i / Dec::every)].ffn.c.ffn.plan, Dec::moe_config::experts,
                    touched, rows);
          touched_sum += static_cast<double>(touched);
          ++touched_n;
          if constexpr (std::is_same_v<typename Dec::moe_config::route_type, tmoe::route::Token>) {
            rows_sum += static_cast<double>(rows);
            slots_sum += static_cast<double>(Dec::moe_config::top_k * B);
          }
        }
      }
      Phase f;
      ffn_cost<Dec>(i, B, touched, rows, f);
      ph.bytes += f.bytes * (Dec::is_moe(i) ? 1.0 : ffn_width_scale);
      ph.flops += f.flops * (Dec::is_moe(i) ? 1.0 : ffn_width_scale);
    }
    ph.bytes += 4.0 * (V * C + 2 * B * V);  // output projection (tied embedding), logits written and read
    ph.flops += 2.0 * B * V * C;
    r.phases.push_back(ph);
  };
  forced_decode(model, source, tasks, 0, st, inputs, logits, argmax, account);
  r.touched_per_layer_step = touched_n ? touched_sum / static_cast<double>(touched_n) : 0.0;
  if (slots_sum > 0) r.kept_rows = rows_sum / slots_sum;
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// One model alive at a time (an E = 128 model holds 6.4 GB of experts); cases are registered grouped by model.

struct Slot {
  std::string name;
  std::shared_ptr<void> model;
};
Slot& slot() {
  static Slot s;
  return s;
}

template <class Model>
Model& model_named(const std::string& name, const std::function<std::shared_ptr<Model>()>& make) {
  Slot& s = slot();
  if (s.name != name) {
    s.model.reset();
    s.model = make();
    s.name = name;
  }
  return *static_cast<Model*>(s.model.get());
}

template <class Model>
std::shared_ptr<Model> make_full(std::int64_t d_ff = kFF) {
  auto m = std::make_shared<Model>(config(d_ff));
  fast_init(*m, 1);
  return m;
}

template <class Full>
std::shared_ptr<extract::subnetwork_t<Full>> make_sub() {
  auto full = make_full<Full>();
  return std::make_shared<extract::subnetwork_t<Full>>(extract::subnetwork(context(), *full, kTask));
}

template <class Model>
void run_case(benchmark::State& state, Model& model) {
  const std::int64_t B = state.range(0);
  // The roofline pass decodes one untimed batch with the state the timed batches reuse, as a server reuses its
  // decode state: it allocates the KV caches and every layer's workspaces, and the first touch of those pages
  // (about 1.2 GB at batch 128, 4.7 GB at batch 512) is not counted as decoding time.
  typename Model::DecodeState st;
  const Roofline roof = measure_roofline(model, B, st);
  const auto& set = test_set();
  const std::int64_t V = model.config().vocab_size;
  tmoe::Tensor<std::int32_t, Cpu> source({B, kLength}), task_ids({B}), inputs({B});
  tmoe::Tensor<float, Cpu> logits({B, V});
  std::vector<std::int32_t> argmax(static_cast<std::size_t>(B));
  std::fill_n(task_ids.data(), B, kTask);
  std::int64_t next = 0, tokens = 0;
  double seconds = 0;
  for (auto _ : state) {
    for (std::int64_t b = 0; b < B; ++b) {
      std::copy_n(set[static_cast<std::size_t>((next + b) % kTestSet)].data(), kLength, source.data() + b * kLength);
    }
    const auto t0 = std::chrono::steady_clock::now();
    forced_decode(model, source, task_ids, next, st, inputs, logits, argmax);
    seconds += seconds_since(t0);
    next = (next + B) % kTestSet;
    tokens += B * kLength;
    benchmark::DoNotOptimize(argmax.data());
  }
  const double per_batch = seconds / static_cast<double>(state.iterations());
  const double bound = roof.seconds(ceilings());
  state.counters["tokens/s"] = static_cast<double>(tokens) / seconds;
  state.counters["step_ms"] = 1e3 * per_batch / kLength;
  state.counters["roofline_ms"] = 1e3 * bound / kLength;
  state.counters["roofline_frac"] = bound / per_batch;
  state.counters["touched_experts"] = roof.touched_per_layer_step;
  state.counters["kept_rows"] = roof.kept_rows;
}

template <class Model>
void BM_Decode(benchmark::State& state, const std::string& name, std::function<std::shared_ptr<Model>()> make) {
  ceilings();
  run_case(state, model_named<Model>(name, make));
}

void register_all() {
  const std::vector<std::int64_t> batches = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
  auto add = [&]<class Model>(const std::string& name, std::function<std::shared_ptr<Model>()> make, Model*) {
    for (const std::int64_t b : batches) {
      benchmark::RegisterBenchmark(("BM_Decode/" + name).c_str(), [name, make](benchmark::State& s) {
                                     BM_Decode<Model>(s, name, make);
                                   })
          ->Arg(b)
          ->ArgName("batch")
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  };
  using Dense = nn::DenseTransformer<>;
  add("dense", std::function<std::shared_ptr<Dense>()>([] { return make_full<Dense>(); }), static_cast<Dense*>(nullptr));
  add("dense_2F", std::function<std::shared_ptr<Dense>()>([] { return make_full<Dense>(2 * kFF); }),
      static_cast<Dense*>(nullptr));
  add("subnet_32", std::function<std::shared_ptr<extract::subnetwork_t<TokenTask<32>>>()>(
                       [] { return make_sub<TokenTask<32>>(); }),
      static_cast<extract::subnetwork_t<TokenTask<32>>*>(nullptr));
  add("token_task_32", std::function<std::shared_ptr<TokenTask<32>>()>([] { return make_full<TokenTask<32>>(); }),
      static_cast<TokenTask<32>*>(nullptr));
  add("token_token_32",
      std::function<std::shared_ptr<TokenToken<32>>()>([] { return make_full<TokenToken<32>>(); }),
      static_cast<TokenToken<32>*>(nullptr));
  add("subnet_128", std::function<std::shared_ptr<extract::subnetwork_t<TokenTask<128>>>()>(
                        [] { return make_sub<TokenTask<128>>(); }),
      static_cast<extract::subnetwork_t<TokenTask<128>>*>(nullptr));
  add("token_task_128",
      std::function<std::shared_ptr<TokenTask<128>>()>([] { return make_full<TokenTask<128>>(); }),
      static_cast<TokenTask<128>*>(nullptr));
  add("token_token_128",
      std::function<std::shared_ptr<TokenToken<128>>()>([] { return make_full<TokenToken<128>>(); }),
      static_cast<TokenToken<128>*>(nullptr));
}

const bool registered = [] {
  benchmark::RegisterBenchmark("BM_Ceiling_GemmFp32", BM_Ceiling_GemmFp32)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("BM_Ceiling_ReadBandwidth", BM_Ceiling_ReadBandwidth)->Unit(benchmark::kMillisecond);
  register_all();
  return true;
}();

}  // namespace
