#pragma once
/// @file positional.hpp
/// @brief nn::SinusoidalPositions: the fixed positional encoding of "Attention is all you need" (section 3.5),
///   PE(pos, 2i) = sin(pos / 10000^(2i / C)),  PE(pos, 2i + 1) = cos(pos / 10000^(2i / C)),
/// added to (B, T, C) activations. No parameters; backward passes the gradient through (dx = dy, overwritten).
///
/// @code
/// tmoe::CpuContext ctx;
/// tmoe::nn::SinusoidalPositions<float, tmoe::Cpu> pos(/*d_model=*/512, /*max_len=*/1024);
/// tmoe::Tensor<float, tmoe::Cpu> x({8, 128, 512});
/// decltype(pos)::Cache cache;
/// pos.forward(ctx, x, x, cache);   // in place: x[b, t, :] += PE(t)
/// @endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::nn {

/// What SinusoidalPositions::backward checks: the shape forward saw.
struct SinusoidalPositionsCache {
  Shape shape;  // (B, T, C) or (T, C)
};

template <class Scalar, DeviceTag Device>
class SinusoidalPositions;

/// @tparam Scalar float or double.
template <class Scalar>
class SinusoidalPositions<Scalar, Cpu> {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "nn::SinusoidalPositions<Scalar, Cpu>: the CPU back-end computes in float or double.");

 public:
  using scalar_type = Scalar;
  using device_type = Cpu;
  using Cache = SinusoidalPositionsCache;

  SinusoidalPositions() = default;

  /// Precomputes the (max_len, C) table in double precision.
  /// @throws ShapeError if d_model or max_len is not positive.
  SinusoidalPositions(std::int64_t d_model, std::int64_t max_len) : c_(d_model), max_len_(max_len) {
    if (d_model <= 0 || max_len <= 0) {
      std::string m = "SinusoidalPositions: d_model and max_len must be positive, got d_model ";
      m += std::to_string(d_model);
      m += " and max_len ";
      m += std::to_string(max_len);
      throw ShapeError(m);
    }
    table_ = Tensor<Scalar, Cpu>({max_len, d_model});
    for (std::int64_t pos = 0; pos < max_len; ++pos) {
      for (std::int64_t j = 0; j < d_model; ++j) {
        const double angle =
            static_cast<double>(pos) / std::pow(10000.0, static_cast<double>(j - j % 2) / static_cast<double>(d_model));
        table_.data()[pos * d_model + j] = static_cast<Scalar>(j % 2 == 0 ? std::sin(angle) : std::cos(angle));
      }
    }
  }

  [[nodiscard]] std::int64_t d_model() const noexcept { return c_; }
  [[nodiscard]] std::int64_t max_len() const noexcept { return max_len_; }
  /// The (max_len, C) encoding table.
  [[nodiscard]] ConstTensorView<Scalar, Cpu> table() const noexcept { return table_.view(); }

  /// No parameters: nothing to initialize.
  void init(std::uint64_t /*seed*/) {}
  /// No parameters: an empty list.
  [[nodiscard]] NamedTensorViews<Scalar> parameters(const std::string& /*prefix*/ = "") { return {}; }
  /// No parameters: an empty list.
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& /*prefix*/ = "") { return {}; }

  /// y[b, t, :] = x[b, t, :] + PE(start + t) for x (B, T, C) or (T, C). `y` may alias `x`. `start` is the
  /// position of the first step (non-zero when decoding step by step).
  /// @throws ShapeError if x is not (B, T, C) / (T, C), y's shape differs, or start + T exceeds max_len.
  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, Cache& cache,
               std::int64_t start = 0) const {
    const char* op = "SinusoidalPositions::forward";
    if ((x.rank() != 2 && x.rank() != 3) || x.dim(-1) != c_) {
      std::string m = op;
      m += ": x must be (B, T, ";
      m += std::to_string(c_);
      m += ") or (T, ";
      m += std::to_string(c_);
      m += "), got shape ";
      m += x.shape().to_string();
      throw ShapeError(m);
    }
    require_shape(op, "y", y, x.shape());
    const std::int64_t T = x.dim(-2), rows = x.numel() / c_;
    if (start < 0 || start + T > max_len_) {
      std::string m = op;
      m += ": positions [";
      m += std::to_string(start);
      m += ", ";
      m += std::to_string(start + T);
      m += ") exceed max_len ";
      m += std::to_string(max_len_);
      m += " (x shape ";
      m += x.shape().to_string();
      m += ")";
      throw ShapeError(m);
    }
    const std::int64_t C = c_;
    ctx.parallel_range(rows, 16, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const Scalar* pe = table_.data() + (start + r % T) * C;
        const Scalar* xr = x.data() + r * C;
        Scalar* yr = y.data() + r * C;
        for (std::int64_t c = 0; c < C; ++c) yr[c] = xr[c] + pe[c];
      }
    });
    cache.shape = x.shape();
  }

  /// dx = dy (overwritten): the encoding is a constant. `dx` may alias `dy`.
  /// @throws ShapeError if dy or dx does not have forward's input shape.
  void backward(CpuContext& ctx, const Cache& cache, ConstTensorView<Scalar, Cpu> dy,
                TensorView<Scalar, Cpu> dx) const {
    const char* op = "SinusoidalPositions::backward";
    require_shape(op, "dy", dy, cache.shape);
    require_shape(op, "dx", dx, cache.shape);
    if (dx.data() == dy.data()) return;
    ctx.parallel_range(dy.numel(), 4096,
                       [&](std::int64_t b, std::int64_t e) { std::copy(dy.data() + b, dy.data() + e, dx.data() + b); });
  }

 private:
  std::int64_t c_ = 0, max_len_ = 0;
  Tensor<Scalar, Cpu> table_;  // (max_len, C)
};

}  // namespace tmoe::nn
