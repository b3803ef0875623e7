#pragma once
/// @file shape.hpp
/// @brief Shape: up to four run-time extents, row-major.

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "tmoe/core/error.hpp"

namespace tmoe {

/// Run-time extents of a row-major tensor, rank 0 to 4. Extents are int64 and never negative.
class Shape {
 public:
  static constexpr int kMaxRank = 4;

  Shape() = default;

  /// @throws ShapeError if there are more than four extents or one is negative.
  Shape(std::initializer_list<std::int64_t> extents) {
    if (extents.size() > kMaxRank) {
      throw ShapeError("Shape: expected at most 4 extents, got " + std::to_string(extents.size()));
    }
    for (std::int64_t e : extents) {
      if (e < 0) throw ShapeError("Shape: expected non-negative extents, got " + std::to_string(e));
      extents_[static_cast<std::size_t>(rank_++)] = e;
    }
  }

  /// A shape from `rank` extents read from `extents`.
  /// @throws ShapeError for a rank outside [0, 4] or a negative extent.
  static Shape from_extents(const std::int64_t* extents, int rank) {
    if (rank < 0 || rank > kMaxRank) {
      throw ShapeError("Shape::from_extents: expected a rank in [0, 4], got " + std::to_string(rank));
    }
    Shape s;
    for (int i = 0; i < rank; ++i) {
      if (extents[i] < 0) throw ShapeError("Shape: expected non-negative extents, got " + std::to_string(extents[i]));
      s.extents_[static_cast<std::size_t>(i)] = extents[i];
    }
    s.rank_ = rank;
    return s;
  }

  [[nodiscard]] int rank() const noexcept { return rank_; }

  /// Extent of dimension `i`; negative `i` counts from the back.
  [[nodiscard]] std::int64_t operator[](int i) const {
    const int j = i < 0 ? i + rank_ : i;
    if (j < 0 || j >= rank_) {
      throw ShapeError("Shape::operator[]: dimension " + std::to_string(i) + " out of range for " + to_string());
    }
    return extents_[static_cast<std::size_t>(j)];
  }

  /// Number of elements (1 for rank 0).
  [[nodiscard]] std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= extents_[static_cast<std::size_t>(i)];
    return n;
  }

  /// Elements per index of dimension 0, i.e. the product of the trailing extents.
  [[nodiscard]] std::int64_t row_numel() const noexcept {
    std::int64_t n = 1;
    for (int i = 1; i < rank_; ++i) n *= extents_[static_cast<std::size_t>(i)];
    return n;
  }

  /// The same shape with dimension 0 replaced.
  [[nodiscard]] Shape with_rows(std::int64_t rows) const {
    Shape s = *this;
    if (rank_ == 0) throw ShapeError("Shape::with_rows: rank-0 shape has no rows");
    if (rows < 0) throw ShapeError("Shape::with_rows: negative row count " + std::to_string(rows));
    s.extents_[0] = rows;
    return s;
  }

  friend bool operator==(const Shape& a, const Shape& b) noexcept {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i) {
      if (a.extents_[static_cast<std::size_t>(i)] != b.extents_[static_cast<std::size_t>(i)]) return false;
    }
    return true;
  }

  /// "[37, 24]"
  [[nodiscard]] std::string to_string() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) {
      if (i) s += ", ";
      s += std::to_string(extents_[static_cast<std::size_t>(i)]);
    }
    return s + "]";
  }

 private:
  std::array<std::int64_t, kMaxRank> extents_{};
  int rank_ = 0;
};

}  // namespace tmoe
