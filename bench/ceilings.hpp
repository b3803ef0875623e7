#pragma once
// The two machine ceilings every roofline in bench/ is judged against, measured in the benchmark binary itself (so
// they reflect its compile flags): the fp32 GEMM rate, the better of Ops<Cpu>::gemm's two paths (Eigen on
// 2048 x 2048 x 2048, and the streaming kernel on x W^T with 512 rows and a 2048 x 512 weight: the shape of an expert's
// up-projection at d_model 512, where it runs fastest), and the memory read
// bandwidth of a summing pass over a 1 GiB buffer (far above the last-level cache), each the best of 5 passes on
// 2 threads. A ceiling below what some kernel reaches would put fractions above 1, so both paths are measured.
// Shared by moe_layer and decode_throughput; each binary registers BM_Ceiling_GemmFp32 and BM_Ceiling_ReadBandwidth.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <span>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <tmoe/tmoe.hpp>

namespace tmoe_bench {

using tmoe::Cpu;
using tmoe::CpuContext;
using tmoe::Tensor;

inline constexpr int kThreads = 2;
inline constexpr std::int64_t kGemmSize = 2048;                // ceiling GEMM: kGemmSize^3
inline constexpr std::int64_t kBandwidthBytes = 1LL << 30;     // ceiling read buffer: 1 GiB, far above the LLC
inline constexpr int kCeilingPasses = 5;

inline CpuContext& context() {
  static CpuContext ctx{kThreads};
  return ctx;
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline void fill_normal(float* p, std::int64_t n, std::uint64_t seed, float sigma = 1.0f) {
  const tmoe::Philox rng(seed);
  for (std::int64_t i = 0; i < n; ++i) {
    const auto w = rng.block(static_cast<std::uint64_t>(i), 0);
    p[i] = sigma * tmoe::normal01(w[0], w[1]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Ceilings.

inline constexpr std::int64_t kStreamGemmRows = 512;  // streaming-path ceiling: (512, 512) x (2048, 512)^T

struct GemmOperands {
  Tensor<float, Cpu> a{kGemmSize, kGemmSize}, b{kGemmSize, kGemmSize}, c{kGemmSize, kGemmSize};
  Tensor<float, Cpu> x{kStreamGemmRows, kStreamGemmRows}, w{kGemmSize, kStreamGemmRows}, y{kStreamGemmRows, kGemmSize};
  GemmOperands() {
    fill_normal(a.data(), a.numel(), 11, 0.05f);
    fill_normal(b.data(), b.numel(), 12, 0.05f);
    fill_normal(x.data(), x.numel(), 13, 0.05f);
    fill_normal(w.data(), w.numel(), 14, 0.05f);
  }
  /// Eigen's path: a square product.
  void run() {
    tmoe::Ops<Cpu>::gemm<float>(context(), c.view(), a.cview(), tmoe::Trans::kN, b.cview(), tmoe::Trans::kN);
  }
  static double flops() { return 2.0 * kGemmSize * kGemmSize * kGemmSize; }
  /// The streaming path: y = x w^T, as a linear layer computes it.
  void run_stream() {
    tmoe::Ops<Cpu>::gemm<float>(context(), y.view(), x.cview(), tmoe::Trans::kN, w.cview(), tmoe::Trans::kT);
  }
  static double stream_flops() { return 2.0 * kStreamGemmRows * kStreamGemmRows * kGemmSize; }
};

inline GemmOperands& gemm_operands() {
  static GemmOperands g;
  return g;
}

/// The 1 GiB read buffer, first touched in parallel so its pages are spread like the reads.
inline const float* bandwidth_buffer() {
  static const std::unique_ptr<float[]> buffer = [] {
    const std::int64_t n = kBandwidthBytes / static_cast<std::int64_t>(sizeof(float));
    std::unique_ptr<float[]> p(new float[static_cast<std::size_t>(n)]);
    context().parallel_range(n, 1 << 16, [&](std::int64_t b, std::int64_t e) { std::fill(p.get() + b, p.get() + e, 1.0f); });
    return p;
  }();
  return buffer.get();
}

/// Sum of p[0, n), read as 8 interleaved sequential streams (one cache line from each in turn), so several hardware
/// prefetch streams are in flight per core, as in a GEMV over several weight rows. Independent partial sums let the
/// loop vectorize without reassociation flags.
inline float sum_range(const float* p, std::int64_t n) {
  constexpr int kStreams = 8, kLine = 16;
  const std::int64_t len = n / kStreams / kLine * kLine;
  float acc[kStreams][kLine] = {};
  for (std::int64_t i = 0; i < len; i += kLine) {
    for (int s = 0; s < kStreams; ++s) {
      for (int l = 0; l < kLine; ++l) acc[s][l] += p[s * len + i + l];
    }
  }
  float total = 0;
  for (std::int64_t j = kStreams * len; j < n; ++j) total += p[j];
  for (int s = 0; s < kStreams; ++s) {
    for (int l = 0; l < kLine; ++l) total += acc[s][l];
  }
  return total;
}

/// One read pass over `bytes` from p, split over the context's threads.
inline float read_range(const float* p, std::int64_t bytes) {
  const std::int64_t n = bytes / static_cast<std::int64_t>(sizeof(float));
  std::mutex m;
  float total = 0;
  context().parallel_range(n, 1 << 16, [&](std::int64_t b, std::int64_t e) {
    const float s = sum_range(p + b, e - b);
    const std::lock_guard<std::mutex> lock(m);
    total += s;
  });
  return total;
}

/// One read pass over the whole bandwidth buffer.
inline float read_pass() { return read_range(bandwidth_buffer(), kBandwidthBytes); }

/// A buffer a case reads, to be flushed from the caches before each cold call.
struct Bytes {
  const void* data;
  std::int64_t size;
};

/// Writes back and drops from every cache level the lines of [p, p + bytes) (clflushopt or clflush on x86; elsewhere
/// nothing, and evict_caches' read pass alone does the eviction). Unlike a read pass over a larger buffer this does not
/// depend on the size or the replacement policy of the last-level cache: on a guest of a host with a 480 MiB L3 a
/// 16 MiB buffer still read from L3 after a read pass over 128 MiB, and from DRAM after a flush.
inline void flush_lines(const void* p, std::int64_t bytes) {
#if defined(__x86_64__) || defined(__i386__)
  constexpr std::int64_t kLine = 64;
  // The intrinsics take void*; a flush writes nothing the program can see.
  auto* first = static_cast<char*>(const_cast<void*>(p));
  const auto skew = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(first) % kLine);
  for (std::int64_t i = -skew; i < bytes; i += kLine) {
#if defined(__CLFLUSHOPT__)
    _mm_clflushopt(first + i);
#else
    _mm_clflush(first + i);
#endif
  }
  _mm_mfence();
#else
  (void)p;
  (void)bytes;
#endif
}

/// Runs an empty job on every thread of the context, so its workers are awake and spinning (for the pool's spin
/// period) when the next timed call forks: after an untimed eviction or flush longer than that period they have
/// blocked, and waking a blocked worker costs tens to hundreds of microseconds on a virtual machine (a 2-thread
/// up-projection of one row from DRAM took 360 us with the worker asleep). Within a model's forward pass the layers
/// follow each other and the workers do not sleep between them, so the timed call should not pay for the wake-up.
inline void wake_workers() {
  context().parallel(context().threads(), [](std::int64_t) {});
}

/// Bytes read by evict_caches(): 16 times the largest L2 seen here (2 MiB per core), and the 32 MiB L3 of one guest.
inline constexpr std::int64_t kEvictBytes = 32LL << 20;

/// Puts a case's next call in front of cold caches, so it reads its weights from DRAM, as a layer of a model much
/// larger than the LLC does: flushes every buffer in `touched` (the case's weights) from the caches, and runs one
/// read pass on the context's threads over the next kEvictBytes window of the bandwidth buffer, flushed first so
/// that the pass reads DRAM whatever the LLC holds, which pushes everything else out of L1 and L2. Returns the
/// pass's read bandwidth in bytes per second: the memory bandwidth of the moment, which on a shared host moves by tens
/// of percent within minutes. Nothing is written, so no dirty lines are left to be written back inside the next
/// timing. Ends by waking the context's workers (wake_workers).
inline double evict_caches(std::span<const Bytes> touched = {}) {
  static std::int64_t window = 0;
  const std::int64_t windows = kBandwidthBytes / kEvictBytes;
  const float* p = bandwidth_buffer() + (window++ % windows) * (kEvictBytes / static_cast<std::int64_t>(sizeof(float)));
  flush_lines(p, kEvictBytes);
  const auto t0 = std::chrono::steady_clock::now();
  float s = read_range(p, kEvictBytes);
  const double seconds = seconds_since(t0);
  benchmark::DoNotOptimize(s);
  for (const Bytes& b : touched) flush_lines(b.data, b.size);
  wake_workers();
  return static_cast<double>(kEvictBytes) / seconds;
}

struct Ceilings {
  double gemm_flops_per_s = 0;  // best of kCeilingPasses over both paths
  double eigen_flops_per_s = 0, stream_flops_per_s = 0;  // each path's best
  double read_bytes_per_s = 0;  // best of kCeilingPasses
};

inline const Ceilings& ceilings() {
  static const Ceilings c = [] {
    Ceilings r;
    auto& g = gemm_operands();
    g.run();  // warm-up: pages, pool threads
    g.run_stream();
    for (int i = 0; i < kCeilingPasses; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      g.run();
      r.eigen_flops_per_s = std::max(r.eigen_flops_per_s, GemmOperands::flops() / seconds_since(t0));
      t0 = std::chrono::steady_clock::now();
      g.run_stream();
      r.stream_flops_per_s = std::max(r.stream_flops_per_s, GemmOperands::stream_flops() / seconds_since(t0));
    }
    r.gemm_flops_per_s = std::max(r.eigen_flops_per_s, r.stream_flops_per_s);
    bandwidth_buffer();
    for (int i = 0; i < kCeilingPasses; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      float s = read_pass();
      benchmark::DoNotOptimize(s);
      r.read_bytes_per_s = std::max(r.read_bytes_per_s, static_cast<double>(kBandwidthBytes) / seconds_since(t0));
    }
    // On stderr, so --benchmark_format=json on stdout stays valid JSON.
    std::fprintf(stderr, "ceilings (%d threads, best of %d): fp32 GEMM %.1f GFLOP/s (Eigen %lld^3 %.1f, streaming "
                "x W^T %lld rows, W %lldx%lld %.1f); read bandwidth over %lld MiB %.2f GB/s\n",
                kThreads, kCeilingPasses, r.gemm_flops_per_s * 1e-9, static_cast<long long>(kGemmSize),
                r.eigen_flops_per_s * 1e-9, static_cast<long long>(kStreamGemmRows), static_cast<long long>(kGemmSize),
                static_cast<long long>(kStreamGemmRows), r.stream_flops_per_s * 1e-9,
                static_cast<long long>(kBandwidthBytes >> 20), r.read_bytes_per_s * 1e-9);
    return r;
  }();
  return c;
}

inline void BM_Ceiling_GemmFp32(benchmark::State& state) {
  const Ceilings& c = ceilings();
  auto& g = gemm_operands();
  for (auto _ : state) {
    g.run();
    benchmark::DoNotOptimize(g.c.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(GemmOperands::flops() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ceiling_GFLOP/s"] = c.gemm_flops_per_s * 1e-9;
}

inline void BM_Ceiling_ReadBandwidth(benchmark::State& state) {
  const Ceilings& c = ceilings();
  for (auto _ : state) {
    float s = read_pass();
    benchmark::DoNotOptimize(s);
  }
  state.SetBytesProcessed(state.iterations() * kBandwidthBytes);
  state.counters["ceiling_GB/s"] = c.read_bytes_per_s * 1e-9;
}

}  // namespace tmoe_bench
