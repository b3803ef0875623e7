#pragma once
/// @file nn_shapes.hpp
/// @brief Private. Shape helpers shared by the nn layers' argument checks: replacing the last extent and
/// printing a multi-index.

#include <cstdint>
#include <string>

#include "tmoe/core/shape.hpp"

namespace tmoe::detail {

/// `s` with its last extent replaced by `last` (rank >= 1).
inline Shape with_last_dim(const Shape& s, std::int64_t last) {
  switch (s.rank()) {
    case 1:
      return Shape{last};
    case 2:
      return Shape{s[0], last};
    case 3:
      return Shape{s[0], s[1], last};
    default:
      return Shape{s[0], s[1], s[2], last};
  }
}

/// The row-major multi-index of flat element `flat` in `s`, as "[1, 4]".
inline std::string index_string(const Shape& s, std::int64_t flat) {
  std::int64_t idx[Shape::kMaxRank] = {};
  for (int d = s.rank() - 1; d >= 0; --d) {
    const std::int64_t e = s[d];
    idx[d] = e == 0 ? 0 : flat % e;
    flat = e == 0 ? 0 : flat / e;
  }
  std::string out = "[";
  for (int d = 0; d < s.rank(); ++d) {
    if (d) out += ", ";
    out += std::to_string(idx[d]);
  }
  out += "]";
  return out;
}

}  // namespace tmoe::detail
