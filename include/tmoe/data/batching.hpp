#pragma once
/// @file batching.hpp
/// @brief Multi-task batches: tasks drawn by temperature sampling, examples bucketed by length under a token budget.
///
/// Temperature sampling (paper-spec 1.4; T = 5 in the paper) draws task t with probability proportional to
/// (n_t / N)^(1/T): T = 1 follows the data, larger T flattens it towards uniform, so small tasks are seen more often.
///
/// The batcher fills a pool of examples (each: a task by temperature sampling, then that task's next example in a
/// per-epoch shuffled order), sorts the pool by length, cuts it into batches whose padded size stays within
/// `max_tokens`, and serves those batches in a shuffled order. Rows of a batch are ordered by task, so a task-routed
/// layer sees each task as one contiguous range. Every draw is a Philox counter: the sequence of batches depends on
/// the seed alone.
///
/// @code
/// tmoe::data::Batcher batcher(lengths /* per task, per example */, {.max_tokens = 2048, .seed = 3});
/// for (int step = 0; step < steps; ++step) {
///   const auto batch = batcher.next();   // rows: (task, example index), ordered by task
/// }
/// @endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "tmoe/core/error.hpp"
#include "tmoe/core/random.hpp"

namespace tmoe::data {

/// p_t proportional to (n_t / N)^(1 / T). Tasks with no examples get 0.
/// @throws ShapeError for a non-positive temperature, a negative size, or no examples at all.
inline std::vector<double> temperature_probabilities(const std::vector<std::int64_t>& sizes, double temperature) {
  if (!(temperature > 0)) {
    throw ShapeError("temperature_probabilities: the temperature must be positive, got " + std::to_string(temperature));
  }
  std::int64_t total = 0;
  for (std::size_t t = 0; t < sizes.size(); ++t) {
    if (sizes[t] < 0) {
      throw ShapeError("temperature_probabilities: task " + std::to_string(t) + " has a negative size " +
                       std::to_string(sizes[t]));
    }
    total += sizes[t];
  }
  if (total == 0) throw ShapeError("temperature_probabilities: no task has any example");
  std::vector<double> p(sizes.size());
  double z = 0;
  for (std::size_t t = 0; t < sizes.size(); ++t) {
    p[t] =
        sizes[t] == 0 ? 0.0 : std::pow(static_cast<double>(sizes[t]) / static_cast<double>(total), 1.0 / temperature);
    z += p[t];
  }
  for (auto& v : p) v /= z;
  return p;
}

struct BatchOptions {
  double temperature = 5.0;        ///< task sampling temperature (1 = proportional to the data)
  std::int64_t max_tokens = 4096;  ///< rows x longest row of a batch, at most (a longer single example is alone)
  std::int64_t pool_batches = 32;  ///< the pool holds about this many batches' worth of examples
  std::uint64_t seed = 0;
};

/// One row of a batch: the task and the example's index within that task.
struct BatchRow {
  std::int32_t task = 0;
  std::int64_t index = 0;
  friend bool operator==(const BatchRow&, const BatchRow&) = default;
};

class Batcher {
 public:
  /// `lengths[t][i]`: the length (in tokens) of example i of task t, e.g. max(source, target) length.
  /// @throws ShapeError for no tasks, no examples, a non-positive length or options out of range.
  Batcher(std::vector<std::vector<std::int64_t>> lengths, BatchOptions options)
      : lengths_(std::move(lengths)), options_(options), rng_(options.seed) {
    if (lengths_.empty()) throw ShapeError("Batcher: no tasks given");
    if (options_.max_tokens < 1 || options_.pool_batches < 1) {
      throw ShapeError("Batcher: max_tokens and pool_batches must be >= 1, got " + std::to_string(options_.max_tokens) +
                       " and " + std::to_string(options_.pool_batches));
    }
    std::vector<std::int64_t> sizes;
    std::int64_t total_len = 0, total = 0;
    for (std::size_t t = 0; t < lengths_.size(); ++t) {
      sizes.push_back(static_cast<std::int64_t>(lengths_[t].size()));
      for (std::size_t i = 0; i < lengths_[t].size(); ++i) {
        if (lengths_[t][i] < 1) {
          throw ShapeError("Batcher: example " + std::to_string(i) + " of task " + std::to_string(t) + " has length " +
                           std::to_string(lengths_[t][i]) + "; expected >= 1");
        }
        total_len += lengths_[t][i];
      }
      total += sizes.back();
    }
    probabilities_ = temperature_probabilities(sizes, options_.temperature);
    cdf_.resize(probabilities_.size());
    std::partial_sum(probabilities_.begin(), probabilities_.end(), cdf_.begin());
    const std::int64_t mean_len = std::max<std::int64_t>(1, total_len / std::max<std::int64_t>(total, 1));
    pool_size_ = std::max<std::int64_t>(1, options_.pool_batches * options_.max_tokens / mean_len);
    order_.resize(lengths_.size());
    cursor_.assign(lengths_.size(), 0);
    epoch_.assign(lengths_.size(), 0);
    for (std::size_t t = 0; t < lengths_.size(); ++t) reshuffle(t);
  }

  /// The task sampling probabilities in use.
  [[nodiscard]] const std::vector<double>& probabilities() const noexcept { return probabilities_; }
  /// Completed passes over task t's examples.
  [[nodiscard]] std::int64_t epoch(std::size_t task) const { return epoch_.at(task); }

  /// The next batch: rows ordered by task, then by length.
  std::vector<BatchRow> next() {
    if (ready_.empty()) refill();
    std::vector<BatchRow> b = std::move(ready_.back());
    ready_.pop_back();
    return b;
  }

 private:
  double uniform(std::uint64_t stream, std::uint64_t index) const {
    const auto w = rng_.block(index, stream);
    return uniform01(w[0], w[1]);
  }

  // A fresh permutation of task t's examples (Fisher-Yates on Philox draws keyed by task and epoch).
  void reshuffle(std::size_t t) {
    auto& o = order_[t];
    o.resize(lengths_[t].size());
    std::iota(o.begin(), o.end(), std::int64_t{0});
    const std::uint64_t stream =
        (std::uint64_t{1} << 40) | (static_cast<std::uint64_t>(t) << 20) | static_cast<std::uint64_t>(epoch_[t]);
    for (std::size_t i = o.size(); i > 1; --i) {
      const auto j = static_cast<std::size_t>(uniform(stream, i) * static_cast<double>(i));
      std::swap(o[i - 1], o[std::min(j, i - 1)]);
    }
    cursor_[t] = 0;
  }

  void refill() {
    std::vector<BatchRow> pool;
    pool.reserve(static_cast<std::size_t>(pool_size_));
    for (std::int64_t k = 0; k < pool_size_; ++k) {
      const double u = uniform(2, draws_++);
      auto t = static_cast<std::size_t>(std::upper_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin());
      t = std::min(t, cdf_.size() - 1);
      while (lengths_[t].empty()) t = (t + cdf_.size() - 1) % cdf_.size();  // rounding at the top of the cdf
      if (cursor_[t] == static_cast<std::int64_t>(order_[t].size())) {
        ++epoch_[t];
        reshuffle(t);
      }
      pool.push_back({static_cast<std::int32_t>(t), order_[t][static_cast<std::size_t>(cursor_[t]++)]});
    }
    const auto len = [&](const BatchRow& r) {
      return lengths_[static_cast<std::size_t>(r.task)][static_cast<std::size_t>(r.index)];
    };
    std::stable_sort(pool.begin(), pool.end(), [&](const BatchRow& a, const BatchRow& b) { return len(a) < len(b); });
    std::vector<std::vector<BatchRow>> batches;
    std::vector<BatchRow> cur;
    std::int64_t longest = 0;
    for (const auto& r : pool) {
      const std::int64_t l = std::max(longest, len(r));
      if (!cur.empty() && l * static_cast<std::int64_t>(cur.size() + 1) > options_.max_tokens) {
        batches.push_back(std::move(cur));
        cur.clear();
        longest = 0;
      }
      cur.push_back(r);
      longest = std::max(longest, len(r));
    }
    if (!cur.empty()) batches.push_back(std::move(cur));
    for (auto& b : batches) {
      std::stable_sort(b.begin(), b.end(), [](const BatchRow& x, const BatchRow& y) { return x.task < y.task; });
    }
    // Served from the back: shuffle, so lengths do not come in order.
    for (std::size_t i = batches.size(); i > 1; --i) {
      const auto j = static_cast<std::size_t>(uniform(3, pools_ * 1000003 + i) * static_cast<double>(i));
      std::swap(batches[i - 1], batches[std::min(j, i - 1)]);
    }
    ++pools_;
    ready_ = std::move(batches);
  }

  std::vector<std::vector<std::int64_t>> lengths_;
  BatchOptions options_;
  Philox rng_;
  std::vector<double> probabilities_, cdf_;
  std::int64_t pool_size_ = 1;
  std::vector<std::vector<std::int64_t>> order_;
  std::vector<std::int64_t> cursor_, epoch_;
  std::uint64_t draws_ = 0, pools_ = 0;
  std::vector<std::vector<BatchRow>> ready_;
};

}  // namespace tmoe::data
