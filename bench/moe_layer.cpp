// moe_layer: the MoE layer forward per routing granularity against a dense FFN and the machine's two ceilings.
//
// Shapes: d_model 512, d_ff 2048, top-2; E in {8, 32, 128}; tokens in {1, 8, 64, 512, 4096}; 2 threads.
//   BM_Ceiling_GemmFp32          Ops<Cpu>::gemm on 2048^3 fp32: the GEMM rate every roofline uses
//   BM_Ceiling_ReadBandwidth     one summing pass over a 1 GiB buffer: the memory read bandwidth
//   BM_Dense/d_ff:F              y = wo relu(wi x), F = 2048 (one expert) and 4096 (the active width of top-2)
//   BM_MoE_Token/E:E             token routing, Dropless (all 2N rows computed)
//   BM_MoE_TokenCapacity/E:32    token routing with CapacityFactor<5, 4>, for reference
//   BM_Stage_TokenGating/E:32    router GEMM + softmax + build_plan only (the gating stage), at 64 and 4096 tokens
//   BM_Stage_TokenExperts/E:32   experts_forward only, on a forward's own plan and gathered rows, at 64 and 4096 tokens
//   BM_Stage_TokenPermute/E:32   gather_rows + combine_rows only (the permutation and the combine), same plan
//   BM_MoE_Sentence/E:E          sentence routing, Dropless, rows of 32 tokens (one row of N when N < 32)
//   BM_MoE_Task/E:E              task routing, one task for the whole batch (4 tasks in the embedding)
//   BM_MoE_Task4/E:E             task routing, 4 contiguous tasks of N/4 tokens each
//   BM_MoE_TaskFixed/E:E         task routing, one task, at 1, 8 and 64 tokens, every task's router logits computed
//                                once before the timed calls (Layer::task_logits, passed as Input::task_logits), as
//                                decoding runs a task-routed layer between weight updates: no gate projection per call
//   BM_Cold_Dense, BM_Cold_MoE_* the same at 1, 8 and 64 tokens with the caches evicted before every call (the
//                                weights flushed with clflushopt and a 32 MiB read pass, untimed; manual time): the
//                                weights come from DRAM, as in a model much larger than the LLC, which is what the
//                                DRAM roofline assumes
//
// Counters: tokens/s; GFLOP/s of the FLOPs computed (router GEMM + 4*C*F per dispatched row, or 4*N*C*F for the
// dense FFN); weight_MB, the expert weights touched per call (experts with >= 1 dispatched row x 2*C*F*4 bytes);
// roofline_us = max(FLOPs / GEMM rate, weight bytes / read bandwidth); roofline_frac = roofline time / measured time.
// The ceilings come from this binary, so they reflect its compile flags (a build without -march runs Eigen on SSE2).
// In the warm cases the 2 experts of a 1-token case (16.8 MB) stay in a 32 MiB L3 across iterations, so those cases
// can beat the DRAM roofline (fraction > 1); the cold cases are the ones to judge against it.
//
// The ceilings are measured once, lazily, before the first case that needs them (the ceiling benchmarks run first,
// so they print before the table). Layers are built once per (granularity, E) and kept in a single slot: the cases
// are registered grouped by layer type, so each layer is initialized once and at most one (up to 1 GiB) is alive.
//
// Run (the numbers in bench/RESULTS.md):
//   build-bench/bench/moe_layer --benchmark_min_time=0.2 --benchmark_repetitions=3
//       --benchmark_report_aggregates_only=true --benchmark_out=moe_layer.json --benchmark_out_format=json
//   (one command line; about 5 minutes on the Zen 5 guest and 11 on the Intel one of bench/RESULTS.md, 2 cores)

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include <tmoe/tmoe.hpp>

#include "ceilings.hpp"

namespace {

using namespace tmoe_bench;
using tmoe::Cpu;
using tmoe::CpuContext;
using tmoe::Tensor;
namespace moe = tmoe::moe;
using Relu = tmoe::nn::Relu;

constexpr std::int64_t kModel = 512;      // C
constexpr std::int64_t kFF = 2048;        // F per expert
constexpr std::int64_t kRowLength = 32;   // sentence routing: tokens per row (one sentence per row)
constexpr std::int64_t kTasks = 4;        // task routing: rows of the task embedding

// ---------------------------------------------------------------------------------------------------------------
// Counters shared by every case.

/// `bw_now`, when not 0, is the read bandwidth a cold case measured in its own eviction passes (the best of them):
/// it adds the roofline and fraction against that bandwidth of the same minutes.
void set_counters(benchmark::State& state, std::int64_t tokens, double flops, double weight_bytes,
                  double bw_now = 0) {
  using benchmark::Counter;
  const Ceilings& c = ceilings();
  const double roofline_s = std::max(flops / c.gemm_flops_per_s, weight_bytes / c.read_bytes_per_s);
  if (bw_now > 0) {
    const double now_s = std::max(flops / c.gemm_flops_per_s, weight_bytes / bw_now);
    state.counters["read_GB/s_now"] = Counter(bw_now * 1e-9);
    state.counters["roofline_frac_now"] = Counter(now_s, Counter::kIsIterationInvariantRate);
  }
  state.counters["tokens/s"] = Counter(static_cast<double>(tokens), Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["weight_MB"] = Counter(weight_bytes * 1e-6);
  state.counters["roofline_us"] = Counter(roofline_s * 1e6);
  // roofline seconds per iteration, times iterations, over the measured (real) time: the fraction reached.
  state.counters["roofline_frac"] = Counter(roofline_s, Counter::kIsIterationInvariantRate);
}

// ---------------------------------------------------------------------------------------------------------------
// Inputs and layers, built once.

/// x (N, C) from Philox, one per token count; and a matching output buffer.
Tensor<float, Cpu>& input(std::int64_t n) {
  static std::map<std::int64_t, std::unique_ptr<Tensor<float, Cpu>>> inputs;
  auto& t = inputs[n];
  if (!t) {
    t = std::make_unique<Tensor<float, Cpu>>(tmoe::Shape{n, kModel});
    fill_normal(t->data(), t->numel(), 1000 + static_cast<std::uint64_t>(n));
  }
  return *t;
}
Tensor<float, Cpu>& output(std::int64_t n) {
  static std::map<std::int64_t, std::unique_ptr<Tensor<float, Cpu>>> outputs;
  auto& t = outputs[n];
  if (!t) t = std::make_unique<Tensor<float, Cpu>>(tmoe::Shape{n, kModel});
  return *t;
}

template <class Cfg>
using LayerT = moe::Layer<Cfg, float, Cpu>;

/// The one live layer, shared by every layer type: a request for another type frees the current layer first.
struct LayerSlot {
  const void* key = nullptr;
  std::shared_ptr<void> object;
};
LayerSlot& layer_slot() {
  static LayerSlot s;
  return s;
}

template <class Cfg>
LayerT<Cfg>& layer() {
  static const char key = 0;  // one address per Cfg
  LayerSlot& s = layer_slot();
  if (s.key != &key) {
    s.object.reset();
    s.key = nullptr;
    auto l = std::make_shared<LayerT<Cfg>>(
        moe::LayerOptions{.d_model = kModel, .d_ff = kFF, .num_tasks = kTasks, .group_size = 0});
    l->init(2021);
    s.object = l;
    s.key = &key;
  }
  return *static_cast<LayerT<Cfg>*>(s.object.get());
}

/// Task ids per row: {0} (one task for the batch) or {0, 1, 2, 3} (4 contiguous tasks).
const Tensor<std::int32_t, Cpu>& task_ids(std::int64_t rows) {
  static std::map<std::int64_t, std::unique_ptr<Tensor<std::int32_t, Cpu>>> ids;
  auto& t = ids[rows];
  if (!t) {
    t = std::make_unique<Tensor<std::int32_t, Cpu>>(tmoe::Shape{rows});
    for (std::int64_t r = 0; r < rows; ++r) t->data()[r] = static_cast<std::int32_t>(r % kTasks);
  }
  return *t;
}

// ---------------------------------------------------------------------------------------------------------------
// Cases.

/// Runs the benchmark loop over fn: back to back (warm: whatever fits stays in the caches between calls), or with the
/// caches evicted and the buffers in `weights` flushed before each call, and only the call timed (cold; the case is
/// registered with UseManualTime). Returns the best read bandwidth of the eviction passes (0 when warm).
template <class Fn>
double time_calls(benchmark::State& state, bool cold, std::span<const Bytes> weights, float* out, Fn&& fn) {
  double bw = 0;
  for (auto _ : state) {
    if (cold) {
      bw = std::max(bw, evict_caches(weights));
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      state.SetIterationTime(seconds_since(t0));
    } else {
      fn();
    }
    benchmark::DoNotOptimize(out);
    benchmark::ClobberMemory();
  }
  return bw;
}

template <int E>
using TokenCfg = moe::Config<tmoe::route::Token, tmoe::Experts<E>, tmoe::TopK<2>, tmoe::Dropless>;
template <int E>
using TokenCapacityCfg = moe::Config<tmoe::route::Token, tmoe::Experts<E>, tmoe::TopK<2>, tmoe::CapacityFactor<5, 4>>;
template <int E>
using SentenceCfg = moe::Config<tmoe::route::Sentence, tmoe::Experts<E>, tmoe::TopK<2>, tmoe::Dropless>;
template <int E>
using TaskCfg = moe::Config<tmoe::route::Task, tmoe::Experts<E>, tmoe::TopK<2>>;

enum class Feed { kTokens, kSentences, kOneTask, kOneTaskFixed, kFourTasks };

/// The layer's input shape for N tokens.
tmoe::Shape input_shape(Feed feed, std::int64_t n) {
  switch (feed) {
    case Feed::kSentences:
      return n < kRowLength ? tmoe::Shape{1, n, kModel} : tmoe::Shape{(n + kRowLength - 1) / kRowLength, kRowLength, kModel};
    case Feed::kOneTask:
    case Feed::kOneTaskFixed:
      return tmoe::Shape{1, n, kModel};
    case Feed::kFourTasks:
      return tmoe::Shape{kTasks, n / kTasks, kModel};
    case Feed::kTokens:
    default:
      return tmoe::Shape{n, kModel};
  }
}

/// FLOPs and expert weight bytes of the call the cache describes (with the router GEMM unless its logits were given).
template <class Cfg>
std::pair<double, double> work_of(const typename LayerT<Cfg>::Cache& cache, bool router_computed) {
  const auto& plan = cache.plan;
  std::int64_t touched = 0;
  for (int e = 0; e < Cfg::experts; ++e) touched += plan.expert_count.data()[e] > 0 ? 1 : 0;
  const double router = router_computed ? 2.0 * static_cast<double>(cache.logits.dim(0)) * kModel * Cfg::experts : 0.0;
  const double experts = 4.0 * kModel * kFF * static_cast<double>(plan.rows());
  const double bytes = static_cast<double>(touched) * 2.0 * kModel * kFF * sizeof(float);
  return {router + experts, bytes};
}

template <class Cfg>
void run_layer(benchmark::State& state, Feed feed, bool cold) {
  const std::int64_t n = state.range(0);
  if (feed == Feed::kSentences && n >= kRowLength && n % kRowLength != 0) {
    state.SkipWithError("sentence cases need N < 32 or a multiple of 32");
    return;
  }
  if (feed == Feed::kFourTasks && n % kTasks != 0) {
    state.SkipWithError("4-task cases need N divisible by 4");
    return;
  }
  CpuContext& ctx = context();
  LayerT<Cfg>& l = layer<Cfg>();
  const tmoe::Shape shape = input_shape(feed, n);
  moe::Input<float, Cpu> in{.x = input(n).view().reshape(shape)};
  if (feed == Feed::kOneTask || feed == Feed::kOneTaskFixed || feed == Feed::kFourTasks) {
    in.task_ids = task_ids(shape[0]).cview();
  }
  Tensor<float, Cpu> logits;
  if constexpr (LayerT<Cfg>::kTask) {
    if (feed == Feed::kOneTaskFixed) {
      logits = l.task_logits(ctx);
      in.task_logits = logits.cview();
    }
  }
  const tmoe::TensorView<float, Cpu> out = output(n).view().reshape(shape);
  typename LayerT<Cfg>::Cache cache;
  l.forward(ctx, in, out, cache);  // sizes the cache's buffers and gives the plan the counters read
  const auto [flops, bytes] = work_of<Cfg>(cache, feed != Feed::kOneTaskFixed);
  std::vector<Bytes> weights;
  for (const auto& p : l.parameters()) weights.push_back({p.view.data(), p.view.numel() * std::int64_t{sizeof(float)}});
  const double bw = time_calls(state, cold, weights, out.data(), [&] { l.forward(ctx, in, out, cache); });
  set_counters(state, n, flops, bytes, bw);
  state.counters["experts_touched"] = bytes / (2.0 * kModel * kFF * sizeof(float));
  if constexpr (!Cfg::dropless) state.counters["dropped"] = static_cast<double>(cache.plan.dropped());
}

/// Dense FFN y = wo relu(wi x) of width F through the task path's GEMMs (moe::expert_dense_forward).
void run_dense(benchmark::State& state, bool cold) {
  const std::int64_t f = state.range(0), n = state.range(1);
  struct Weights {
    Tensor<float, Cpu> wi, wo;
  };
  static std::map<std::int64_t, std::unique_ptr<Weights>> weights;
  auto& w = weights[f];
  if (!w) {
    w = std::make_unique<Weights>(Weights{Tensor<float, Cpu>({f, kModel}), Tensor<float, Cpu>({kModel, f})});
    fill_normal(w->wi.data(), w->wi.numel(), 31, 1.0f / std::sqrt(static_cast<float>(kModel)));
    fill_normal(w->wo.data(), w->wo.numel(), 32, 1.0f / std::sqrt(static_cast<float>(f)));
  }
  CpuContext& ctx = context();
  const float* x = input(n).data();
  float* y = output(n).data();
  Tensor<float, Cpu> hidden({n, f});
  const Bytes touched[] = {{w->wi.data(), w->wi.numel() * std::int64_t{sizeof(float)}},
                           {w->wo.data(), w->wo.numel() * std::int64_t{sizeof(float)}}};
  const double bw = time_calls(state, cold, touched, y, [&] {
    moe::expert_dense_forward<Relu, float>(ctx, y, hidden.data(), nullptr, x, n, w->wi.data(), w->wo.data(), kModel,
                                           f, 1.0f, 0.0f);
  });
  set_counters(state, n, 4.0 * static_cast<double>(n) * kModel * static_cast<double>(f),
               2.0 * kModel * static_cast<double>(f) * sizeof(float), bw);
}

/// Gating stage of the token layer alone: router GEMM, softmax and build_plan, as the layer runs them.
template <int E>
void BM_Stage_TokenGating(benchmark::State& state) {
  using Cfg = TokenCfg<E>;
  const std::int64_t n = state.range(0);
  CpuContext& ctx = context();
  LayerT<Cfg>& l = layer<Cfg>();
  const auto x = input(n).cview();
  Tensor<float, Cpu> logits({n, E}), probs({n, E});
  std::vector<std::int32_t> gate_row(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) gate_row[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  moe::RoutingPlan<float, Cpu> plan;
  for (auto _ : state) {
    tmoe::Ops<Cpu>::gemm<float>(ctx, logits.view(), x, tmoe::Trans::kN, l.gate_weight(), tmoe::Trans::kT);
    tmoe::Ops<Cpu>::softmax<float>(ctx, probs.view(), logits.cview());
    moe::build_plan<Cfg, float>(ctx, plan, probs.cview(), logits.cview(), gate_row.data(), n, 0, moe::GateArgs{});
    benchmark::DoNotOptimize(plan.row.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 2.0 * static_cast<double>(n) * kModel * E, 0.0);
}

/// The cache of one forward of the layer of Cfg over the first n rows of the shared input (its plan, dispatched
/// rows and expert outputs), for the stage cases to replay.
template <class Cfg>
typename LayerT<Cfg>::Cache forwarded(std::int64_t n) {
  typename LayerT<Cfg>::Cache cache;
  layer<Cfg>().forward(context(), {.x = input(n).cview()}, output(n).view(), cache);
  return cache;
}

/// Expert stage of the token layer alone: experts_forward over a forward's own plan, on its gathered rows.
template <int E>
void BM_Stage_TokenExperts(benchmark::State& state) {
  using Cfg = TokenCfg<E>;
  const std::int64_t n = state.range(0);
  CpuContext& ctx = context();
  LayerT<Cfg>& l = layer<Cfg>();
  const typename LayerT<Cfg>::Cache cache = forwarded<Cfg>(n);
  const std::int64_t rows = cache.plan.rows();
  Tensor<float, Cpu> xd({rows, kModel}), hidden({rows, kFF}), yo({rows, kModel});
  std::copy_n(cache.dispatched.data(), rows * kModel, xd.data());
  const auto [flops, bytes] = work_of<Cfg>(cache, true);
  const double router = 2.0 * static_cast<double>(n) * kModel * E;
  for (auto _ : state) {
    moe::experts_forward<Relu, float, E>(ctx, yo.data(), hidden.data(), nullptr, xd.data(), l.wi().data(),
                                         l.wo().data(), cache.plan.expert_offset.data(), kModel, kFF);
    benchmark::DoNotOptimize(yo.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, flops - router, bytes);
}

/// Permutation stages of the token layer alone: gather_rows (gather each row's token) and combine_rows (the
/// gate-weighted sum of each token's expert outputs), over a forward's own plan, as the layer runs them.
template <int E>
void BM_Stage_TokenPermute(benchmark::State& state) {
  using Cfg = TokenCfg<E>;
  const std::int64_t n = state.range(0);
  CpuContext& ctx = context();
  const typename LayerT<Cfg>::Cache cache = forwarded<Cfg>(n);
  const auto& plan = cache.plan;
  const std::int64_t rows = plan.rows();
  Tensor<float, Cpu> xd({rows, kModel});
  const float* x = input(n).data();
  float* y = output(n).data();
  for (auto _ : state) {
    tmoe::backend::cpu::gather_rows<float, std::int64_t>(ctx, xd.data(), x, plan.row_token.data(), rows, kModel);
    moe::combine_rows<Cfg::top_k, float, float>(ctx, y, cache.expert_out.data(), plan.row.data(), plan.gate.data(),
                                                n, kModel);
    benchmark::DoNotOptimize(xd.data());
    benchmark::DoNotOptimize(y);
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 2.0 * static_cast<double>(rows) * kModel, 0.0);
}

// ---------------------------------------------------------------------------------------------------------------
// Registration, grouped by layer type so each layer is built once.

constexpr std::int64_t kTokenCounts[] = {1, 8, 64, 512, 4096};

constexpr std::int64_t kSmallTokenCounts[] = {1, 8, 64};  // the cold cases: issue 2's small-batch target
constexpr std::int64_t kTask4TokenCounts[] = {512, 4096};  // 4 tasks of N/4 tokens
constexpr std::int64_t kLargeTokenCounts[] = {4096};          // the capacity-limited reference

template <class Fn>
benchmark::internal::Benchmark* add(const std::string& name, Fn&& fn, bool cold = false) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn));
  if (cold) {
    b->UseManualTime();
  } else {
    b->UseRealTime();
  }
  return b->Unit(benchmark::kMicrosecond);
}

/// family "BM_MoE_X" registers BM_MoE_X/E:E/tokens:N; cold, BM_Cold_MoE_X/E:E/tokens:N.
template <class Cfg>
void add_layer(const std::string& family, Feed feed, std::span<const std::int64_t> tokens, bool cold = false) {
  auto* b = add((cold ? "BM_Cold_" + family.substr(3) : family) + "/E:" + std::to_string(Cfg::experts),
                [feed, cold](benchmark::State& st) { run_layer<Cfg>(st, feed, cold); }, cold)
                ->ArgName("tokens");
  for (std::int64_t n : tokens) b->Arg(n);
}

template <template <int> class Cfg, int E>
void add_expert_count(const std::string& family, Feed feed) {
  add_layer<Cfg<E>>(family, feed, kTokenCounts);
  add_layer<Cfg<E>>(family, feed, kSmallTokenCounts, true);
  if (feed == Feed::kOneTask) {
    add_layer<Cfg<E>>("BM_MoE_TaskFixed", Feed::kOneTaskFixed, kSmallTokenCounts);
    add_layer<Cfg<E>>("BM_MoE_TaskFixed", Feed::kOneTaskFixed, kSmallTokenCounts, true);
    add_layer<Cfg<E>>("BM_MoE_Task4", Feed::kFourTasks, kTask4TokenCounts);
  }
  if (feed == Feed::kTokens && E == 32) {  // the stage breakdown reuses the E=32 layer before it is freed
    add("BM_Stage_TokenGating/E:32", BM_Stage_TokenGating<32>)->ArgName("tokens")->Arg(64)->Arg(4096);
    add("BM_Stage_TokenExperts/E:32", BM_Stage_TokenExperts<32>)->ArgName("tokens")->Arg(64)->Arg(4096);
    add("BM_Stage_TokenPermute/E:32", BM_Stage_TokenPermute<32>)->ArgName("tokens")->Arg(64)->Arg(4096);
    add_layer<TokenCapacityCfg<32>>("BM_MoE_TokenCapacity", feed, kLargeTokenCounts);
  }
}

template <template <int> class Cfg>
void add_granularity(const std::string& family, Feed feed) {
  add_expert_count<Cfg, 8>(family, feed);
  add_expert_count<Cfg, 32>(family, feed);
  add_expert_count<Cfg, 128>(family, feed);
}

bool register_all() {
  add("BM_Ceiling_GemmFp32", BM_Ceiling_GemmFp32);
  add("BM_Ceiling_ReadBandwidth", BM_Ceiling_ReadBandwidth);
  auto* dense = add("BM_Dense", [](benchmark::State& st) { run_dense(st, false); })->ArgNames({"d_ff", "tokens"});
  auto* cold = add("BM_Cold_Dense", [](benchmark::State& st) { run_dense(st, true); }, true)
                   ->ArgNames({"d_ff", "tokens"});
  for (std::int64_t f : {kFF, 2 * kFF}) {
    for (std::int64_t n : kTokenCounts) dense->Args({f, n});
    for (std::int64_t n : kSmallTokenCounts) cold->Args({f, n});
  }
  add_granularity<TokenCfg>("BM_MoE_Token", Feed::kTokens);
  add_granularity<SentenceCfg>("BM_MoE_Sentence", Feed::kSentences);
  add_granularity<TaskCfg>("BM_MoE_Task", Feed::kOneTask);
  return true;
}

[[maybe_unused]] const bool registered = register_all();

}  // namespace
