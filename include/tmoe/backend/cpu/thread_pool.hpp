#pragma once
/// @file thread_pool.hpp
/// @brief A fixed-size fork-join pool with static partitioning.
///
/// `run(n_tasks, fn)` calls fn(task) for every task in [0, n_tasks), with task t always on worker
/// t % threads, so which thread computes what never depends on timing. The calling thread is worker 0.
/// Work is coarse (a GEMM slab, a block of tokens), so one mutex and two condition variables suffice.

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

class ThreadPool {
 public:
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
      stop_ = true;
      ++generation_;
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
      pending_ = threads_ - 1;
      error_ = nullptr;
      ++generation_;
    }
    start_.notify_all();
    run_share(0);
    std::unique_lock lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
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
      {
        std::unique_lock lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
      }
      run_share(worker);
      {
        std::lock_guard lock(mutex_);
        --pending_;
      }
      done_.notify_one();
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  std::function<void(std::int64_t)>* job_ = nullptr;
  std::int64_t n_tasks_ = 0;
  int pending_ = 0;
  std::exception_ptr error_;
};

}  // namespace tmoe::backend::cpu
