#pragma once
/// @file version.hpp
/// @brief Library version.

#define TMOE_VERSION_MAJOR 0
#define TMOE_VERSION_MINOR 1
#define TMOE_VERSION_PATCH 0

namespace tmoe {
/// The version as major * 10000 + minor * 100 + patch.
inline constexpr int kVersion = TMOE_VERSION_MAJOR * 10000 + TMOE_VERSION_MINOR * 100 + TMOE_VERSION_PATCH;
}  // namespace tmoe
