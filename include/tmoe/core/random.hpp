#pragma once
/// @file random.hpp
/// @brief Philox 4x32-10, the counter-based generator of Salmon et al. (SC'11), and helpers on top.
///
/// A draw is a pure function of (key, counter): no state, no globals, the same bits on the host and on a
/// CUDA device. Every random choice in tmoe names its counter explicitly (token, choice, step, ...), so a
/// result depends only on the seed and never on thread count or evaluation order.

#include <array>
#include <cmath>
#include <cstdint>

#include "tmoe/config.hpp"

namespace tmoe {

/// One Philox 4x32 block: four 32-bit counter words in, four 32-bit random words out.
struct Philox4x32 {
  using Counter = std::array<std::uint32_t, 4>;
  using Key = std::array<std::uint32_t, 2>;

  static constexpr std::uint32_t kMul0 = 0xD2511F53u;
  static constexpr std::uint32_t kMul1 = 0xCD9E8D57u;
  static constexpr std::uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
  static constexpr std::uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1
  static constexpr int kRounds = 10;

  TMOE_HOST_DEVICE static constexpr Counter generate(Counter c, Key k) noexcept {
    for (int r = 0; r < kRounds; ++r) {
      if (r > 0) {
        k[0] += kWeyl0;
        k[1] += kWeyl1;
      }
      const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c[0];
      const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c[2];
      const auto hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
      const auto hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
      c = Counter{hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    }
    return c;
  }
};

/// A seeded stream of Philox draws addressed by a 128-bit counter. Copyable; holds only the key.
class Philox {
 public:
  constexpr Philox() = default;
  TMOE_HOST_DEVICE constexpr explicit Philox(std::uint64_t seed) noexcept
      : key_{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)} {}

  /// Four random words for counter (c0, c1, c2, c3).
  TMOE_HOST_DEVICE constexpr Philox4x32::Counter block(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2,
                                                       std::uint32_t c3) const noexcept {
    return Philox4x32::generate({c0, c1, c2, c3}, key_);
  }

  /// Four words for a 64-bit index within a 64-bit stream.
  TMOE_HOST_DEVICE constexpr Philox4x32::Counter block(std::uint64_t index, std::uint64_t stream) const noexcept {
    return block(static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(index >> 32),
                 static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32));
  }

  [[nodiscard]] constexpr Philox4x32::Key key() const noexcept { return key_; }

 private:
  Philox4x32::Key key_{};
};

/// Uniform float in [0, 1) from the top 24 bits of a word: exact in float, identical on every device.
TMOE_HOST_DEVICE constexpr float uniform01(std::uint32_t word) noexcept {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

/// Uniform double in [0, 1) from two words (53 bits).
TMOE_HOST_DEVICE constexpr double uniform01(std::uint32_t hi, std::uint32_t lo) noexcept {
  const std::uint64_t bits = (static_cast<std::uint64_t>(hi) << 21) ^ (static_cast<std::uint64_t>(lo) >> 11);
  return static_cast<double>(bits & ((std::uint64_t{1} << 53) - 1)) * (1.0 / 9007199254740992.0);
}

/// Standard normal from two words by Box-Muller (uses the first; the second is the angle).
TMOE_HOST_DEVICE inline float normal01(std::uint32_t w0, std::uint32_t w1) noexcept {
  const float u0 = (static_cast<float>(w0 >> 8) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1): log is finite
  const float u1 = uniform01(w1);
  return std::sqrt(-2.0f * std::log(u0)) * std::cos(6.2831853071795864769f * u1);
}

}  // namespace tmoe
