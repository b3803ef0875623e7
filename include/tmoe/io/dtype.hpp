#pragma once
/// @file dtype.hpp
/// @brief DType: the element types tmoe reads and writes in safetensors files, their names and sizes.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "tmoe/core/bf16.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/f16.hpp"
#include "tmoe/detail/dependent_false.hpp"

namespace tmoe::io {

/// A stored element type. The names follow the safetensors format ("F32", "BF16", ...); data is little-endian.
enum class DType { kF32, kF64, kF16, kBF16, kI32, kI64 };

/// The safetensors name of `t`: "F32", "F64", "F16", "BF16", "I32" or "I64".
[[nodiscard]] constexpr std::string_view dtype_name(DType t) noexcept {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF64:
      return "F64";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
  }
  return "?";
}

/// The DType named `name` (case-sensitive, as in the format).
/// @throws IoError naming `name` if it is not one of the six supported names.
[[nodiscard]] inline DType parse_dtype(std::string_view name) {
  for (DType t : {DType::kF32, DType::kF64, DType::kF16, DType::kBF16, DType::kI32, DType::kI64}) {
    if (dtype_name(t) == name) return t;
  }
  throw IoError("parse_dtype: expected one of F32, F64, F16, BF16, I32, I64, got unsupported dtype '" +
                std::string(name) + "'");
}

/// Bytes per element of `t`.
[[nodiscard]] constexpr std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF64:
    case DType::kI64:
      return 8;
  }
  return 0;
}

/// True for F32, F64, F16 and BF16; false for the integer dtypes.
[[nodiscard]] constexpr bool is_floating(DType t) noexcept {
  return t == DType::kF32 || t == DType::kF64 || t == DType::kF16 || t == DType::kBF16;
}

namespace detail {
template <class T>
struct DTypeOf {
  static_assert(tmoe::detail::dependent_false<T>,
                "dtype_of_v<T>: T must be float, double, tmoe::f16, tmoe::bf16, std::int32_t or std::int64_t");
};
template <>
struct DTypeOf<float> : std::integral_constant<DType, DType::kF32> {};
template <>
struct DTypeOf<double> : std::integral_constant<DType, DType::kF64> {};
template <>
struct DTypeOf<f16> : std::integral_constant<DType, DType::kF16> {};
template <>
struct DTypeOf<bf16> : std::integral_constant<DType, DType::kBF16> {};
template <>
struct DTypeOf<std::int32_t> : std::integral_constant<DType, DType::kI32> {};
template <>
struct DTypeOf<std::int64_t> : std::integral_constant<DType, DType::kI64> {};
}  // namespace detail

/// The DType that stores `T` unchanged (cv-qualifiers ignored): F32 for float, BF16 for tmoe::bf16, ...
template <class T>
inline constexpr DType dtype_of_v = detail::DTypeOf<std::remove_cv_t<T>>::value;

namespace detail {
template <class T>
inline constexpr bool is_io_scalar_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, f16> || std::is_same_v<T, bf16> ||
    std::is_same_v<T, std::int32_t> || std::is_same_v<T, std::int64_t>;
}  // namespace detail

/// True for the element types the I/O module handles (the ones dtype_of_v accepts), cv-qualified or not.
template <class T>
concept IoScalar = detail::is_io_scalar_v<std::remove_cv_t<T>>;

/// An IoScalar that is not const-qualified: the element type of a destination.
template <class T>
concept MutableIoScalar = IoScalar<T> && !std::is_const_v<T>;

}  // namespace tmoe::io
