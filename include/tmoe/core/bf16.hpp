#pragma once
/// @file bf16.hpp
/// @brief bfloat16: 1 sign, 8 exponent and 7 mantissa bits; the top half of an IEEE float32.
///
/// Conversion from float rounds to nearest, ties to even, and keeps NaN a (quiet) NaN. Arithmetic is done
/// by converting to float: bf16 is a storage type, and everything accumulates in float.

#include <bit>
#include <cstdint>

#include "tmoe/config.hpp"

namespace tmoe {

struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  TMOE_HOST_DEVICE explicit bf16(float f) noexcept : bits(from_float(f)) {}
  TMOE_HOST_DEVICE explicit operator float() const noexcept { return to_float(bits); }

  /// Builds a value from its 16-bit pattern.
  TMOE_HOST_DEVICE static constexpr bf16 from_bits(std::uint16_t b) noexcept {
    bf16 v;
    v.bits = b;
    return v;
  }

  TMOE_HOST_DEVICE static constexpr std::uint16_t from_float(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
    const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>((u + rounding) >> 16);
  }
  TMOE_HOST_DEVICE static constexpr float to_float(std::uint16_t b) noexcept {
    return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
  }

  friend constexpr bool operator==(bf16 a, bf16 b) noexcept { return a.bits == b.bits; }
};

}  // namespace tmoe
