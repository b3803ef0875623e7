#pragma once
// The MoE tests' inputs: a random batch (B, T, C) with optional padding, packed sequences and task ids per row.

#include <cstdint>

#include "cuda_test_util.cuh"

namespace tmoe::test {

/// Inputs of one comparison: x (B, T, C), optional segment ids, optional task ids per row.
struct Batch {
  Tensor<float, Cpu> x;
  Tensor<std::int32_t, Cpu> segments;  // empty = no padding
  Tensor<std::int32_t, Cpu> tasks;     // empty = not task routing
};

/// With padding, rows of different lengths; packed: two sequences per row (sentence routing); tasks: row r gets
/// (r * 7 + 3) % tasks, so neighbouring rows differ unless tasks divides 7.
inline Batch make_batch(std::int64_t B, std::int64_t T, std::int64_t C, std::uint64_t seed, bool padding, bool packed,
                        std::int64_t tasks) {
  Batch b;
  b.x = random_host<float>({B, T, C}, seed);
  if (padding || packed) {
    b.segments = Tensor<std::int32_t, Cpu>({B, T});
    for (std::int64_t r = 0; r < B; ++r) {
      const std::int64_t len = padding ? T - (r * 3) % (T / 2 + 1) : T;  // rows of different lengths
      for (std::int64_t t = 0; t < T; ++t) {
        b.segments.data()[r * T + t] = t >= len ? 0 : (packed && t >= len / 2 ? 2 : 1);
      }
    }
  }
  if (tasks > 0) {
    b.tasks = Tensor<std::int32_t, Cpu>({B});
    for (std::int64_t r = 0; r < B; ++r) b.tasks.data()[r] = static_cast<std::int32_t>((r * 7 + 3) % tasks);
  }
  return b;
}

}  // namespace tmoe::test
