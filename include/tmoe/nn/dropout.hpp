#pragma once
/// @file dropout.hpp
/// @brief nn::Dropout: inverted dropout with rate p, reproducible from (seed, offset).
///
/// Element i (row-major over the whole tensor) is kept when uniform01(w) >= float(p), with
/// w = Philox(seed).block(i / 4, offset)[i % 4], and kept elements are scaled by 1 / (1 - p). The mask is a pure
/// function of (seed, offset, i): pass a new offset every step (and layer) and a step can be replayed exactly,
/// whatever the thread count. With p == 0 or outside training the layer is the identity.
///
/// Gradient rule: backward OVERWRITES dx = dy * mask / (1 - p), regenerating the same mask; no parameters.
///
/// @code
/// tmoe::CpuContext ctx;
/// tmoe::nn::Dropout<float, tmoe::Cpu> drop(0.1);
/// tmoe::Tensor<float, tmoe::Cpu> x({8, 128, 512}), y({8, 128, 512});
/// decltype(drop)::Cache cache;
/// drop.forward(ctx, x, y, cache, {.training = true, .seed = 1234, .offset = step * n_dropouts + k});
/// @endcode

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/random.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::nn {

/// Per-call switches of Dropout::forward.
struct DropoutArgs {
  bool training = false;     ///< false: identity
  std::uint64_t seed = 0;    ///< Philox key
  std::uint64_t offset = 0;  ///< Philox stream: distinct per step and per dropout site
};

/// What Dropout::backward needs to regenerate the mask.
struct DropoutCache {
  Shape shape;          // forward's input shape
  bool active = false;  // training and p > 0
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
};

template <class Scalar, DeviceTag Device>
class Dropout;

/// @tparam Scalar float or double.
template <class Scalar>
class Dropout<Scalar, Cpu> {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "nn::Dropout<Scalar, Cpu>: the CPU back-end computes in float or double.");

 public:
  using scalar_type = Scalar;
  using device_type = Cpu;
  using Cache = DropoutCache;

  /// @throws Error unless 0 <= p < 1.
  explicit Dropout(double p = 0.0) : p_(p) {
    if (!(p >= 0.0 && p < 1.0)) {
      std::string m = "Dropout: rate p must be in [0, 1), got ";
      m += std::to_string(p);
      throw Error(m);
    }
  }

  [[nodiscard]] double rate() const noexcept { return p_; }

  /// Whether element i is kept for (seed, offset) at rate p: the mask forward and backward apply.
  [[nodiscard]] static bool keep(std::uint64_t seed, std::uint64_t offset, std::uint64_t i, double p) noexcept {
    const auto w = Philox(seed).block(i / 4, offset)[i % 4];
    return uniform01(w) >= static_cast<float>(p);
  }

  /// No parameters: nothing to initialize.
  void init(std::uint64_t /*seed*/) {}
  /// No parameters: an empty list.
  [[nodiscard]] NamedTensorViews<Scalar> parameters(const std::string& /*prefix*/ = "") { return {}; }
  /// No parameters: an empty list.
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& /*prefix*/ = "") { return {}; }

  /// y = x * mask / (1 - p) when training with p > 0, else y = x. `y` may alias `x`.
  /// @throws ShapeError if y's shape differs from x's.
  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, Cache& cache,
               const DropoutArgs& args = {}) const {
    require_shape("Dropout::forward", "y", y, x.shape());
    cache.shape = x.shape();
    cache.active = args.training && p_ > 0.0;
    cache.seed = args.seed;
    cache.offset = args.offset;
    apply(ctx, cache, x, y);
  }

  /// dx = dy * mask / (1 - p) with forward's mask (identity when forward was). `dx` may alias `dy`.
  /// @throws ShapeError if dy or dx does not have forward's input shape.
  void backward(CpuContext& ctx, const Cache& cache, ConstTensorView<Scalar, Cpu> dy,
                TensorView<Scalar, Cpu> dx) const {
    require_shape("Dropout::backward", "dy", dy, cache.shape);
    require_shape("Dropout::backward", "dx", dx, cache.shape);
    apply(ctx, cache, dy, dx);
  }

 private:
  void apply(CpuContext& ctx, const Cache& cache, ConstTensorView<Scalar, Cpu> in, TensorView<Scalar, Cpu> out) const {
    const Scalar* x = in.data();
    Scalar* y = out.data();
    const std::int64_t n = in.numel();
    if (!cache.active) {
      if (x != y) {
        ctx.parallel_range(n, 4096, [&](std::int64_t b, std::int64_t e) { std::copy(x + b, x + e, y + b); });
      }
      return;
    }
    const Scalar inv_keep = static_cast<Scalar>(1.0 / (1.0 - p_));
    const Philox rng(cache.seed);
    const float p = static_cast<float>(p_);
    // Chunks are multiples of 4 elements, so each Philox block is drawn once.
    ctx.parallel_range(n, 4096, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; i += 4) {
        const auto w = rng.block(static_cast<std::uint64_t>(i / 4), cache.offset);
        for (std::int64_t k = 0; k < 4 && i + k < e; ++k) {
          y[i + k] = uniform01(w[static_cast<std::size_t>(k)]) >= p ? x[i + k] * inv_keep : Scalar(0);
        }
      }
    });
  }

  double p_ = 0.0;
};

}  // namespace tmoe::nn
