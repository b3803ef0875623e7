#pragma once
/// @file f16.hpp
/// @brief IEEE 754 binary16 as a storage type, with exact conversion to float and round-to-nearest-even
/// conversion from float (overflow to infinity, subnormals kept, NaN stays NaN).

#include <bit>
#include <cstdint>

#include "tmoe/config.hpp"

namespace tmoe {

struct f16 {
  std::uint16_t bits = 0;

  f16() = default;
  TMOE_HOST_DEVICE explicit f16(float f) noexcept : bits(from_float(f)) {}
  TMOE_HOST_DEVICE explicit operator float() const noexcept { return to_float(bits); }

  TMOE_HOST_DEVICE static constexpr f16 from_bits(std::uint16_t b) noexcept {
    f16 v;
    v.bits = b;
    return v;
  }

  TMOE_HOST_DEVICE static constexpr float to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));  // inf / NaN
    if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (man << 13));
    if (man == 0) return std::bit_cast<float>(sign);
    // Subnormal: value = man * 2^-24, exactly representable in float.
    const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }

  TMOE_HOST_DEVICE static constexpr std::uint16_t from_float(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    const std::uint32_t au = u & 0x7fffffffu;
    if (au > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
    if (au >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to inf (>= 65520)
    if (au < 0x38800000u) {
      // Result is subnormal or zero: round |f| * 2^24 to an integer, ties to even.
      if (au < 0x33000000u) return sign;  // < 2^-25 rounds to zero
      const std::uint32_t e = au >> 23;
      const std::uint32_t m = (au & 0x7fffffu) | 0x800000u;
      const std::uint32_t shift = 126u - e;  // value = m * 2^(e-150); half units are 2^-24
      const std::uint32_t q = m >> shift;
      const std::uint32_t rem = m & ((1u << shift) - 1u);
      const std::uint32_t half = 1u << (shift - 1u);
      const std::uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
      return static_cast<std::uint16_t>(sign | r);
    }
    // Normal: rebias exponent, round mantissa from 23 to 10 bits, ties to even (carry may bump exponent).
    const std::uint32_t rebased = au - (112u << 23);
    const std::uint32_t r = (rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13;
    return static_cast<std::uint16_t>(sign | r);
  }

  friend constexpr bool operator==(f16 a, f16 b) noexcept { return a.bits == b.bits; }
};

}  // namespace tmoe
