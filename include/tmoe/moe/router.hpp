#pragma once
/// @file router.hpp
/// @brief Gate inputs per routing granularity (paper-spec 1.3): which "gate row" each token reads its routing
/// decision from, and the gate rows' inputs.
///
/// - Token: gate row n is token n; its input is x_n.
/// - Sentence: one gate row per sequence, keyed by (row b, segment id); its input is the mean of the sequence's
///   token vectors. Padding (segment id 0) has no gate row.
/// - Task: one gate row per task; its input is the layer's learned task embedding.

#include <cstdint>
#include <string>
#include <vector>

#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/moe/config.hpp"

namespace tmoe::moe {

/// Where tokens and padding are, for a batch of B rows of T tokens.
struct TokenLayout {
  std::int64_t rows = 0;     ///< B
  std::int64_t columns = 0;  ///< T
  const std::int32_t* segment_ids = nullptr;  ///< (B, T) or null: 0 marks padding, > 0 a sequence in its row
  [[nodiscard]] std::int64_t tokens() const noexcept { return rows * columns; }
  [[nodiscard]] bool valid(std::int64_t n) const noexcept { return segment_ids == nullptr || segment_ids[n] != 0; }
};

/// Sentence routing: assigns gate_row[n] = sequence index (in order of first appearance, row by row) and writes
/// the per-sequence means of x (N, C) into `means` (resized to (sequences, C)). Sums run in token order.
template <class Real, class S>
void sentence_gate_rows(const TokenLayout& layout, const S* x, std::int64_t C, std::int32_t* gate_row,
                        Tensor<Real, Cpu>& means) {
  std::vector<std::int64_t> count;
  std::vector<Real> sum;
  std::vector<std::pair<std::int32_t, std::int32_t>> seen;  // (segment id, sequence) within the current row
  std::int64_t sequences = 0;
  for (std::int64_t b = 0; b < layout.rows; ++b) {
    seen.clear();
    for (std::int64_t t = 0; t < layout.columns; ++t) {
      const std::int64_t n = b * layout.columns + t;
      if (!layout.valid(n)) {
        gate_row[n] = -1;
        continue;
      }
      const std::int32_t seg = layout.segment_ids ? layout.segment_ids[n] : 1;
      std::int32_t seq = -1;
      for (const auto& [s, q] : seen) {
        if (s == seg) seq = q;
      }
      if (seq < 0) {
        seq = static_cast<std::int32_t>(sequences++);
        seen.emplace_back(seg, seq);
        count.push_back(0);
        sum.resize(static_cast<std::size_t>(sequences * C), Real(0));
      }
      gate_row[n] = seq;
      ++count[static_cast<std::size_t>(seq)];
      Real* acc = sum.data() + seq * C;
      const S* xn = x + n * C;
      for (std::int64_t c = 0; c < C; ++c) acc[c] += static_cast<Real>(xn[c]);
    }
  }
  means.resize({sequences, C});
  for (std::int64_t q = 0; q < sequences; ++q) {
    const Real inv = Real(1) / static_cast<Real>(count[static_cast<std::size_t>(q)]);
    for (std::int64_t c = 0; c < C; ++c) means.data()[q * C + c] = sum[static_cast<std::size_t>(q * C + c)] * inv;
  }
}

/// Task routing: gate_row[n] = task of token n (padding: -1). `task_ids` holds one id per row (per_token false)
/// or per token. @throws ShapeError naming the token if a valid token's task is not in [0, num_tasks).
inline void task_gate_rows(const TokenLayout& layout, const std::int32_t* task_ids, bool per_token,
                           std::int64_t num_tasks, std::int32_t* gate_row, std::string_view op) {
  for (std::int64_t n = 0; n < layout.tokens(); ++n) {
    if (!layout.valid(n)) {
      gate_row[n] = -1;
      continue;
    }
    const std::int32_t t = per_token ? task_ids[n] : task_ids[n / layout.columns];
    if (t < 0 || t >= num_tasks) {
      throw ShapeError(std::string(op) + ": unknown task id " + std::to_string(t) + " for token " +
                       std::to_string(n) + " (row " + std::to_string(n / layout.columns) + "); expected an id in [0, " +
                       std::to_string(num_tasks) + ")");
    }
    gate_row[n] = t;
  }
}

}  // namespace tmoe::moe
