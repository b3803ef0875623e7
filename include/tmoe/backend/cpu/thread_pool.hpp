#pragma once
/// @file thread_pool.hpp
/// @brief A fixed-size fork-join pool with static partitioning.
///
/// `run(n_tasks, fn)` calls fn(task) for every task in [0, n_tasks), with task t always on worker
/// t % threads, so which thread computes what never depends on timing. The calling thread is worker 0.
///
/// Decoding runs a hundred or more small fork-joins per step, so waking a sleeping thread (a futex round trip,
/// tens of microseconds on a virtual machine) would cost more than the work. Both sides therefore spin first:
/// an idle worker polls for the next job, and the caller polls for the workers to finish, for about kSpin pause
/// instructions (tens of microseconds) before blocking on a condition variable. A pool left idle longer sleeps and
/// uses no CPU.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "tmoe/core/error.hpp"

namespace tmoe::backend::cpu {

namespace detail {
/// One step of a spin-wait: a hint to the core (x86 `pause`, Arm `yield`), and every 256th step a yield to the
/// scheduler, so a spinning thread gives way when more threads than cores are runnable (tests run in parallel).
inline void spin_pause(int step) noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
  if ((step & 255) == 255) std::this_thread::yield();
}
}  // namespace detail

class ThreadPool {
 public:
  /// Pause instructions a waiting thread spins through before it blocks.
  static constexpr int kSpin = 1 << 12;

  /// @throws Error if threads < 1.
  explicit ThreadPool(int threads) : threads_(threads) {
    if (threads < 1) throw Error("ThreadPool: expected at least 1 thread, got " + std::to_string(threads));
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int w = 1; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    {
      std::lock_guard lock(mutex_);
      stop_.store(true, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    start_.notify_all();
    for (auto& t : workers_) t.join();
  }

  [[nodiscard]] int threads() const noexcept { return threads_; }

  /// Runs fn(t) for t in [0, n_tasks); task t runs on worker t % threads(). Rethrows the first exception.
  template <class Fn>
  void run(std::int64_t n_tasks, Fn&& fn) {
    if (n_tasks <= 0) return;
    if (threads_ == 1 || n_tasks == 1) {
      for (std::int64_t t = 0; t < n_tasks; ++t) fn(t);
      return;
    }
    std::function<void(std::int64_t)> job = [&fn](std::int64_t t) { fn(t); };
    {
      std::lock_guard lock(mutex_);
      job_ = &job;
      n_tasks_ = n_tasks;
      error_ = nullptr;
      pending_.store(threads_ - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);  // publishes the job to spinning workers
    }
    start_.notify_all();
    run_share(0);
    for (int i = 0; i < kSpin && pending_.load(std::memory_order_acquire) != 0; ++i) detail::spin_pause(i);
    if (pending_.load(std::memory_order_acquire) != 0) {
      std::unique_lock lock(mutex_);
      done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    job_ = nullptr;
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  void run_share(int worker) {
    try {
      for (std::int64_t t = worker; t < n_tasks_; t += threads_) (*job_)(t);
    } catch (...) {
      std::lock_guard lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void worker_loop(int worker) {
    std::uint64_t seen = 0;
    for (;;) {
      for (int i = 0; i < kSpin && generation_.load(std::memory_order_acquire) == seen; ++i) detail::spin_pause(i);
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock lock(mutex_);
        start_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_relaxed)) return;  // ordered by the acquire of generation_
      run_share(worker);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // The caller may be blocked: take the mutex so the notification cannot fall between its check and its wait.
        { std::lock_guard lock(mutex_); }
        done_.notify_one();
      }
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::function<void(std::int64_t)>* job_ = nullptr;
  std::int64_t n_tasks_ = 0;
  std::atomic<int> pending_{0};
  std::exception_ptr error_;
};

}  // namespace tmoe::backend::cpu
