#pragma once
/// @file dependent_false.hpp
/// @brief Private. An always-false value for static_asserts in primary templates that must never be picked.

namespace tmoe::detail {
template <class... T>
inline constexpr bool dependent_false = false;
}  // namespace tmoe::detail
