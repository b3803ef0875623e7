// The CPU GEMM kernels behind every expert FFN, at the shapes the MoE layer and decoding give them:
// c (m, n) = a (m, k) * b (n, k)^T with b a weight matrix stored [out, in] and m the rows an expert (or a decoder
// step) receives, from 1 to 256. Two weight shapes, each one thread's slab of a d_model 512, d_ff 2048 expert on two
// threads: the up-projection (k 512, n 1024) and the down-projection (k 2048, n 256).
//
//   BM_Gemm_Serial/k/n/m    tmoe's gemm_serial on one thread (the streaming kernel for few rows, Eigen beyond)
//   BM_Gemm_Stream/k/n/m    the streaming kernel at every m, to place the switch to Eigen
//   BM_Gemm_Eigen/k/n/m     Eigen's product on the same maps and thread, the baseline
//   BM_Gemm_Parallel/m      tmoe's gemm on the context's two threads, a whole expert up-projection (k 512, n 2048)
//
// Counters: GFLOP/s (2 m n k per call) and weight GB/s (the n k weights read per call). The weights (2 MiB per slab)
// are one of 64 copies cycled through, each flushed from the caches before its call (untimed), so every call reads
// them from memory.

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <vector>

#include <tmoe/tmoe.hpp>

#include "ceilings.hpp"

namespace {

using tmoe::Cpu;
using tmoe::Tensor;
using tmoe::Trans;
using tmoe::backend::cpu::MatrixRef;

constexpr int kCopies = 64;  // 64 weight copies of 2 MiB: 128 MiB, four times the reference machine's L3

struct Operands {
  std::int64_t m, k, n;
  Tensor<float, Cpu> a, c;
  std::vector<Tensor<float, Cpu>> b;
  Operands(std::int64_t m_, std::int64_t k_, std::int64_t n_)
      : m(m_), k(k_), n(n_), a(tmoe::Shape{m_, k_}), c(tmoe::Shape{m_, n_}) {
    tmoe_bench::fill_normal(a.data(), a.numel(), 1, 0.5f);
    for (int i = 0; i < kCopies; ++i) {
      b.emplace_back(tmoe::Shape{n_, k_});
      tmoe_bench::fill_normal(b.back().data(), b.back().numel(), 100 + static_cast<std::uint64_t>(i), 0.05f);
    }
  }
  MatrixRef<float> cref() { return {c.data(), m, n, n}; }
  MatrixRef<const float> aref() const { return {a.data(), m, k, k}; }
  MatrixRef<const float> bref(int i) const { return {b[static_cast<std::size_t>(i)].data(), n, k, k}; }
};

void set_counters(benchmark::State& state, const Operands& op) {
  const double calls = static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(op.m * op.n * op.k) * calls * 1e-9, benchmark::Counter::kIsRate);
  state.counters["weight GB/s"] = benchmark::Counter(static_cast<double>(op.n * op.k * 4) * calls * 1e-9,
                                                     benchmark::Counter::kIsRate);
}

/// Times `call(op, weights)` for one operand set, cycling through the weight copies, each flushed from the caches
/// before its call (untimed; the cases use manual time): on a host whose last-level cache holds the 128 MiB of copies,
/// cycling alone would read them from there. The context's workers are woken after the flush (BM_Gemm_Parallel).
template <class Call>
void time_calls(benchmark::State& state, Operands& op, Call call) {
  int i = 0;
  for (auto _ : state) {
    const MatrixRef<const float> b = op.bref(i);
    tmoe_bench::flush_lines(b.data, b.rows * b.ld * std::int64_t{sizeof(float)});
    tmoe_bench::wake_workers();
    const auto t0 = std::chrono::steady_clock::now();
    call(b);
    state.SetIterationTime(tmoe_bench::seconds_since(t0));
    benchmark::DoNotOptimize(op.c.data());
    i = (i + 1) % kCopies;
  }
  set_counters(state, op);
}

void BM_Gemm_Serial(benchmark::State& state) {
  Operands op(state.range(2), state.range(0), state.range(1));
  time_calls(state, op, [&](MatrixRef<const float> b) {
    tmoe::backend::cpu::gemm_serial<float>(op.cref(), op.aref(), Trans::kN, b, Trans::kT, 1.0f, 0.0f);
  });
}

void BM_Gemm_Stream(benchmark::State& state) {
  Operands op(state.range(2), state.range(0), state.range(1));
  time_calls(state, op, [&](MatrixRef<const float> b) {
    tmoe::backend::cpu::detail::gemm_stream<float>(op.cref(), op.aref(), b, 1.0f, 0.0f);
  });
}

void BM_Gemm_Eigen(benchmark::State& state) {
  Operands op(state.range(2), state.range(0), state.range(1));
  time_calls(state, op, [&](MatrixRef<const float> b) {
    const MatrixRef<const float> a = op.aref();
    auto C = tmoe::backend::cpu::map(op.c.data(), op.m, op.n, op.n);
    C.noalias() = tmoe::backend::cpu::map(a.data, a.rows, a.cols, a.ld) *
                  tmoe::backend::cpu::map(b.data, b.rows, b.cols, b.ld).transpose();
  });
}

void BM_Gemm_Parallel(benchmark::State& state) {
  Operands op(state.range(0), 512, 2048);
  time_calls(state, op, [&](MatrixRef<const float> b) {
    tmoe::backend::cpu::gemm_parallel<float>(tmoe_bench::context(), op.cref(), op.aref(), Trans::kN, b, Trans::kT,
                                             1.0f, 0.0f);
  });
}

void serial_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"k", "n", "m"});
  for (const auto& [k, n] : {std::pair<std::int64_t, std::int64_t>{512, 1024}, {2048, 256}}) {
    for (const std::int64_t m : {1, 2, 3, 4, 7, 8, 10, 13, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024}) {
      b->Args({k, n, m});
    }
  }
}

BENCHMARK(BM_Gemm_Serial)->Apply(serial_shapes)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Gemm_Stream)->Apply(serial_shapes)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Gemm_Eigen)->Apply(serial_shapes)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Gemm_Parallel)
    ->ArgName("m")
    ->Arg(1)
    ->Arg(8)
    ->Arg(16)
    ->Arg(32)
    ->Arg(64)
    ->Arg(256)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
