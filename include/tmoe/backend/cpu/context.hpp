#pragma once
/// @file context.hpp
/// @brief CpuContext: the thread count and the pool that serves it. Passed explicitly to every op.
///
/// @code
/// tmoe::CpuContext ctx{2};   // two threads: the caller plus one worker
/// @endcode

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>

#include "tmoe/backend/cpu/thread_pool.hpp"

namespace tmoe {

class CpuContext {
 public:
  explicit CpuContext(int threads = 1) : pool_(std::make_unique<backend::cpu::ThreadPool>(threads)) {}

  [[nodiscard]] int threads() const noexcept { return pool_->threads(); }

  /// Runs fn(t) for t in [0, n); task t always on worker t % threads().
  template <class Fn>
  void parallel(std::int64_t n, Fn&& fn) {
    pool_->run(n, std::forward<Fn>(fn));
  }

  /// Splits [0, n) into threads() contiguous chunks (aligned to `grain`) and runs fn(begin, end) on each.
  template <class Fn>
  void parallel_range(std::int64_t n, std::int64_t grain, Fn&& fn) {
    if (n <= 0) return;
    const std::int64_t t = threads();
    const std::int64_t g = grain < 1 ? 1 : grain;
    const std::int64_t blocks = (n + g - 1) / g;
    const std::int64_t chunks = blocks < t ? blocks : t;
    pool_->run(chunks, [&](std::int64_t c) {
      const std::int64_t b0 = blocks * c / chunks, b1 = blocks * (c + 1) / chunks;
      const std::int64_t begin = b0 * g, end = std::min(n, b1 * g);
      if (begin < end) fn(begin, end);
    });
  }

 private:
  std::unique_ptr<backend::cpu::ThreadPool> pool_;
};

}  // namespace tmoe
