#pragma once
/// @file schedule.hpp
/// @brief Learning-rate schedules: small value types mapping a step to a learning rate.
///
/// `step` is the number of the update about to be made, counted from 1 (pass optimizer.step_count() + 1); step 0
/// is allowed and gives the start of the warm-up. Every schedule is a `Schedule`: `double operator()(std::int64_t)
/// const`, throwing Error for a negative step.
///
/// @code
/// tmoe::train::InverseSqrtSchedule lr(/*peak=*/5e-4, /*warmup_steps=*/4000);
/// lr(2000);   // 2.5e-4, linear warm-up
/// lr(4000);   // 5e-4, the peak
/// lr(16000);  // 2.5e-4 = 5e-4 · sqrt(4000 / 16000)
/// @endcode

#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>
#include <type_traits>

#include "tmoe/core/error.hpp"

namespace tmoe::train {

/// Anything that maps a step to a learning rate.
template <class T>
concept Schedule = requires(const T& s, std::int64_t step) {
  { s(step) } -> std::convertible_to<double>;
};

namespace detail {
/// "op: what" + the value, built by appending (GCC 12 reports a false -Wrestrict on "literal" + std::string&&).
template <class V>
std::string schedule_message(const char* op, const char* what, const V& value) {
  std::string m(op);
  m += ": ";
  m += what;
  if constexpr (std::is_convertible_v<V, std::string_view>) {
    m += value;
  } else {
    m += std::to_string(value);
  }
  return m;
}
inline void check_step(const char* op, std::int64_t step) {
  if (step < 0) throw Error(schedule_message(op, "step must be >= 0, got ", step));
}
inline void check_rate(const char* op, const char* name, double x) {
  if (!(x >= 0.0 && std::isfinite(x))) {
    std::string what(name);
    what += " must be finite and >= 0, got ";
    throw Error(schedule_message(op, what.c_str(), x));
  }
}
}  // namespace detail

/// The same learning rate at every step.
class ConstantSchedule {
 public:
  /// @throws Error if value is negative or not finite.
  explicit ConstantSchedule(double value) : value_(value) { detail::check_rate("ConstantSchedule", "value", value); }

  /// @throws Error if step < 0.
  [[nodiscard]] double operator()(std::int64_t step) const {
    detail::check_step("ConstantSchedule", step);
    return value_;
  }

  [[nodiscard]] double value() const noexcept { return value_; }

 private:
  double value_;
};

/// Linear warm-up to `peak` at step `warmup_steps`, then inverse-square-root decay (Vaswani et al. 2017, with the
/// peak as the parameter): lr(s) = peak · s / w for s < w, peak · sqrt(w / s) for s >= w.
class InverseSqrtSchedule {
 public:
  /// @throws Error if peak is negative or not finite, or warmup_steps < 1 (the decay divides by it).
  InverseSqrtSchedule(double peak, std::int64_t warmup_steps) : peak_(peak), warmup_(warmup_steps) {
    detail::check_rate("InverseSqrtSchedule", "peak", peak);
    if (warmup_steps < 1) {
      throw Error(detail::schedule_message("InverseSqrtSchedule", "warmup_steps must be >= 1, got ", warmup_steps));
    }
  }

  /// @throws Error if step < 0.
  [[nodiscard]] double operator()(std::int64_t step) const {
    detail::check_step("InverseSqrtSchedule", step);
    const double s = static_cast<double>(step), w = static_cast<double>(warmup_);
    return step < warmup_ ? peak_ * s / w : peak_ * std::sqrt(w / s);
  }

  [[nodiscard]] double peak() const noexcept { return peak_; }
  [[nodiscard]] std::int64_t warmup_steps() const noexcept { return warmup_; }

 private:
  double peak_;
  std::int64_t warmup_;
};

/// Linear warm-up to `peak` over `warmup_steps` (none when 0), then half a cosine from `peak` down to `minimum`
/// at `total_steps`, and `minimum` after that:
///   s < w:       peak · s / w
///   w <= s <= T: minimum + (peak - minimum) · (1 + cos(π (s - w) / (T - w))) / 2
///   s > T:       minimum
class CosineSchedule {
 public:
  /// @throws Error unless 0 <= minimum <= peak (finite), warmup_steps >= 0 and total_steps > warmup_steps.
  CosineSchedule(double peak, double minimum, std::int64_t warmup_steps, std::int64_t total_steps)
      : peak_(peak), minimum_(minimum), warmup_(warmup_steps), total_(total_steps) {
    detail::check_rate("CosineSchedule", "peak", peak);
    detail::check_rate("CosineSchedule", "minimum", minimum);
    if (minimum > peak) {
      std::string what = "minimum ";
      what += std::to_string(minimum);
      what += " exceeds peak ";
      throw Error(detail::schedule_message("CosineSchedule", what.c_str(), peak));
    }
    if (warmup_steps < 0) {
      throw Error(detail::schedule_message("CosineSchedule", "warmup_steps must be >= 0, got ", warmup_steps));
    }
    if (total_steps <= warmup_steps) {
      std::string what = "total_steps (";
      what += std::to_string(total_steps);
      what += ") must exceed warmup_steps (";
      what += std::to_string(warmup_steps);
      what += ")";
      throw Error(detail::schedule_message("CosineSchedule", what.c_str(), ""));
    }
  }

  /// @throws Error if step < 0.
  [[nodiscard]] double operator()(std::int64_t step) const {
    detail::check_step("CosineSchedule", step);
    if (step < warmup_) return peak_ * static_cast<double>(step) / static_cast<double>(warmup_);
    if (step >= total_) return minimum_;
    const double progress = static_cast<double>(step - warmup_) / static_cast<double>(total_ - warmup_);
    return minimum_ + (peak_ - minimum_) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }

  [[nodiscard]] double peak() const noexcept { return peak_; }
  [[nodiscard]] double minimum() const noexcept { return minimum_; }
  [[nodiscard]] std::int64_t warmup_steps() const noexcept { return warmup_; }
  [[nodiscard]] std::int64_t total_steps() const noexcept { return total_; }

 private:
  double peak_, minimum_;
  std::int64_t warmup_, total_;
};

static_assert(Schedule<ConstantSchedule> && Schedule<InverseSqrtSchedule> && Schedule<CosineSchedule>);

}  // namespace tmoe::train
