#pragma once
/// @file adafactor.hpp
/// @brief Adafactor<Scalar>: adaptive steps with factored second moments (Shazeer & Stern, "Adafactor: Adaptive
/// Learning Rates with Sublinear Memory Cost", ICML 2018, Algorithms 4 and 5).
///
/// For step t = 1, 2, ... and each parameter X with gradient G:
///
///     β̂2_t = 1 - t^(-c)                                         (c = decay_exponent = 0.8; β̂2_1 = 0)
///     α_t  = ρ_t · s_t,  ρ_t = min(1e-2, 1/√t) with relative_step, else the external lr,
///                        s_t = max(ε2, RMS(X_{t-1})) with scale_parameter, else 1
///     rank >= 2 (factored over the last two dims, n × m, separately for every leading index):
///       R_t = β̂2_t R_{t-1} + (1 - β̂2_t) (G² + ε1) 1_m           row sums        (…, n)
///       C_t = β̂2_t C_{t-1} + (1 - β̂2_t) 1_nᵀ (G² + ε1)          column sums     (…, m)
///       V̂_t = R_t C_t / (1_nᵀ R_t)
///     rank < 2 (or factored = false):
///       V̂_t = β̂2_t V̂_{t-1} + (1 - β̂2_t) (G² + ε1)
///     U_t = G / √V̂_t
///     Û_t = U_t / max(1, RMS(U_t) / d)                           update clipping, d = clip_threshold = 1
///     M_t = β1 M_{t-1} + (1 - β1) Û_t,  Δ = M_t    when beta1 > 0 (no bias correction); otherwise Δ = Û_t
///     X_t = X_{t-1} - α_t Δ - α_t λ X_{t-1}                       λ = weight_decay (decoupled)
///
/// RMS(A) = sqrt(mean(A²)) over the whole parameter. R and C are running sums, as in the paper (storing means
/// instead changes both by constant factors that cancel in V̂).
///
/// Choices where the sources leave room:
/// - Momentum is applied to the clipped update Û before the step size α_t, so the stored M does not depend on the
///   learning-rate schedule; it is a full (unfactored) buffer, allocated only when beta1 > 0. Off by default, as in
///   the paper's recommended setting.
/// - Weight decay is decoupled and scaled by α_t (like AdamW's λ·lr); off by default.
/// - paper-spec 1.7 (KUD) says "Adafactor with momentum factorization and per-parameter norm clipping 1.0, learning
///   rate 3.0, 40k warm-up steps, then inverse-square-root decay". We read "momentum factorization" as the factored
///   second-moment estimator (the first moment is never factored in Adafactor) and "per-parameter norm clipping 1.0"
///   as update clipping with d = 1 per parameter. Their learning rate is the external one (relative_step = false)
///   with the parameter scale on (lingvo's multiply_by_parameter_scale); 3.0 · rsqrt(max(t, 40000)) after warm-up
///   is InverseSqrtSchedule(3.0 / 200.0, 40000).
///
/// Arithmetic is in double per element, reductions in double in a fixed order (results do not depend on the thread
/// count); buffers are stored in Scalar. step() reads p.grad and never zeroes it.
///
/// @code
/// tmoe::train::Adafactor<float> opt(params);                             // relative step, the paper's defaults
/// tmoe::train::Adafactor<float> kud(params, {.relative_step = false});  // external lr with parameter scale
/// tmoe::train::InverseSqrtSchedule lr(3.0 / 200.0, 40000);
/// kud.step(ctx, lr(kud.step_count() + 1));
/// @endcode

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/nn/parameter.hpp"
#include "tmoe/train/optimizer_state.hpp"

namespace tmoe::train {

/// Adafactor hyper-parameters (designated initializers). Defaults are the paper's.
struct AdafactorOptions {
  double lr = 0.0;              ///< external learning rate, used when relative_step is false
  bool relative_step = true;    ///< ρ_t = min(1e-2, 1/√t) instead of an external lr
  bool scale_parameter = true;  ///< multiply the step by max(ε2, RMS(X_{t-1}))
  bool factored = true;         ///< factor the second moments of rank >= 2 parameters
  double beta1 = 0.0;           ///< first-moment decay in [0, 1); 0 = no momentum buffer
  double decay_exponent = 0.8;  ///< c in β̂2_t = 1 - t^(-c), > 0
  double epsilon1 = 1e-30;      ///< ε1 > 0, added to G²
  double epsilon2 = 1e-3;       ///< ε2 >= 0, floor of RMS(X) in the parameter scale
  double clip_threshold = 1.0;  ///< d > 0 of update clipping
  double weight_decay = 0.0;    ///< λ >= 0, decoupled, multiplied by α_t
};

/// Adafactor over a list of CPU parameters. Holds views of the parameters; they must outlive the optimizer.
/// State buffers (Scalar), per parameter of shape (…, n, m):
///   factored:   "{prefix}{name}.adafactor_vr" (…, n) and "{prefix}{name}.adafactor_vc" (…, m)
///   otherwise:  "{prefix}{name}.adafactor_v"  (same shape as the parameter)
///   beta1 > 0:  "{prefix}{name}.adafactor_m"  (same shape as the parameter)
/// @tparam Scalar float or double.
template <std::floating_point Scalar>
class Adafactor {
 public:
  static constexpr std::string_view kType = "adafactor";

  /// @throws Error for an empty or repeated parameter name or an option out of range; ShapeError when a
  /// gradient's shape differs from its value's.
  explicit Adafactor(nn::ParameterRefs<Scalar, Cpu> params, AdafactorOptions options = {})
      : params_(std::move(params)), options_(options) {
    static constexpr std::string_view kOp = "Adafactor";
    detail::check_parameters(kOp, params_);
    detail::check_non_negative(kOp, "lr", options_.lr);
    detail::check_half_open(kOp, "beta1", options_.beta1);
    detail::check_positive(kOp, "decay_exponent", options_.decay_exponent);
    detail::check_positive(kOp, "epsilon1", options_.epsilon1);
    detail::check_non_negative(kOp, "epsilon2", options_.epsilon2);
    detail::check_positive(kOp, "clip_threshold", options_.clip_threshold);
    detail::check_non_negative(kOp, "weight_decay", options_.weight_decay);
    slots_.reserve(params_.size());
    for (const auto& p : params_) {
      const Shape& s = p.value.shape();
      Slot slot;
      slot.factored = options_.factored && s.rank() >= 2;
      if (slot.factored) {
        std::int64_t e[Shape::kMaxRank] = {};
        for (int d = 0; d < s.rank() - 2; ++d) e[d] = s[d];
        slot.lead = s.numel() == 0 ? 0 : s.numel() / (s[-2] * s[-1]);
        slot.rows = s[-2];
        slot.cols = s[-1];
        e[s.rank() - 2] = slot.rows;
        slot.vr = Tensor<Scalar, Cpu>(detail::shape_of(e, s.rank() - 1));
        e[s.rank() - 2] = slot.cols;
        slot.vc = Tensor<Scalar, Cpu>(detail::shape_of(e, s.rank() - 1));
      } else {
        slot.v = Tensor<Scalar, Cpu>(s);
      }
      if (options_.beta1 > 0.0) slot.m = Tensor<Scalar, Cpu>(s);
      slots_.push_back(std::move(slot));
    }
  }

  /// One update: ρ_t = min(1e-2, 1/√t) with relative_step, otherwise options().lr.
  void step(CpuContext& ctx) {
    const double t = static_cast<double>(step_ + 1);
    update(ctx, options_.relative_step ? std::min(1e-2, 1.0 / std::sqrt(t)) : options_.lr);
  }

  /// One update with the external learning rate `lr` (e.g. a schedule's value at step_count() + 1).
  /// @throws Error if relative_step is on (the step size would be ambiguous) or lr is negative or not finite.
  void step(CpuContext& ctx, double lr) {
    if (options_.relative_step) {
      throw Error(
          "Adafactor::step: an external lr was given but relative_step is on; construct with "
          ".relative_step = false to use a learning-rate schedule");
    }
    detail::check_non_negative("Adafactor::step", "lr", lr);
    update(ctx, lr);
  }

  /// Steps taken so far (the t of the last step; 0 before the first).
  [[nodiscard]] std::int64_t step_count() const noexcept { return step_; }
  [[nodiscard]] const AdafactorOptions& options() const noexcept { return options_; }
  [[nodiscard]] const nn::ParameterRefs<Scalar, Cpu>& parameters() const noexcept { return params_; }
  /// Whether parameter `k` (in list order) keeps factored second moments.
  [[nodiscard]] bool is_factored(std::size_t k) const { return slots_.at(k).factored; }

  /// The buffers as named views (per parameter in order: vr, vc or v, then m) and the metadata "{prefix}step",
  /// "{prefix}type" = "adafactor". Writing into the views (e.g. by io::load) restores the buffers.
  [[nodiscard]] OptimizerState<Scalar> state(std::string_view prefix = "optimizer.") {
    OptimizerState<Scalar> st;
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const std::string base = std::string(prefix) + params_[k].name;
      Slot& s = slots_[k];
      if (s.factored) {
        st.tensors.push_back({base + ".adafactor_vr", s.vr.view()});
        st.tensors.push_back({base + ".adafactor_vc", s.vc.view()});
      } else {
        st.tensors.push_back({base + ".adafactor_v", s.v.view()});
      }
      if (options_.beta1 > 0.0) st.tensors.push_back({base + ".adafactor_m", s.m.view()});
    }
    st.metadata = detail::state_metadata(kType, step_, prefix);
    return st;
  }

  /// Restores the step counter from checkpoint metadata (after the buffers were loaded into state(prefix).tensors).
  /// @throws Error if "{prefix}step" is missing or malformed or "{prefix}type" is not "adafactor".
  void load_metadata(const std::map<std::string, std::string>& metadata, std::string_view prefix = "optimizer.") {
    step_ = detail::parse_state_metadata("Adafactor::load_metadata", kType, metadata, prefix);
  }

  /// Restores buffers and step counter from named tensors (e.g. another optimizer's state()). Everything is
  /// checked before anything is written. Tensors in `tensors` not starting with a non-empty `prefix` are ignored.
  /// @throws Error for a missing tensor, an unexpected "{prefix}..." tensor or bad metadata; ShapeError naming the
  /// tensor whose shape differs.
  template <class T>
  requires std::same_as<std::remove_const_t<T>, Scalar>
  void load_state(const NamedTensorViews<T, Cpu>& tensors, const std::map<std::string, std::string>& metadata,
                  std::string_view prefix = "optimizer.") {
    const std::int64_t step = detail::parse_state_metadata("Adafactor::load_state", kType, metadata, prefix);
    detail::copy_state("Adafactor::load_state", state(prefix).tensors, tensors, prefix);
    step_ = step;
  }

 private:
  /// Columns summed together by one task when accumulating C_t.
  static constexpr std::int64_t kColumnTile = 64;

  struct Slot {
    bool factored = false;
    std::int64_t lead = 0, rows = 0, cols = 0;  // factored: (L, n, m) with L the product of the leading dims
    Tensor<Scalar, Cpu> vr, vc, v, m;
  };

  /// One step for every parameter; `rho` is ρ_t or the external lr.
  void update(CpuContext& ctx, double rho) {
    ++step_;
    const double beta2t = 1.0 - std::pow(static_cast<double>(step_), -options_.decay_exponent);
    for (std::size_t k = 0; k < params_.size(); ++k) update_parameter(ctx, params_[k], slots_[k], beta2t, rho);
  }

  void update_parameter(CpuContext& ctx, const nn::ParameterRef<Scalar, Cpu>& p, Slot& s, double beta2t, double rho) {
    const std::int64_t numel = p.value.numel();
    if (numel == 0) return;
    Scalar* x = p.value.data();
    const Scalar* g = p.grad.data();
    const double eps1 = options_.epsilon1;
    const double keep = beta2t, add = 1.0 - beta2t;

    double alpha = rho;
    if (options_.scale_parameter) {
      const double sq = detail::ordered_sum(ctx, numel, [&](std::int64_t i) {
        const double xi = static_cast<double>(x[i]);
        return xi * xi;
      });
      alpha *= std::max(options_.epsilon2, std::sqrt(sq / static_cast<double>(numel)));
    }

    // Second moments, then u(i) = g_i / sqrt(V̂_i) as a pure function of i so that both passes below agree.
    std::vector<double> inv_row_total;
    if (s.factored) {
      const std::int64_t lead = s.lead, n = s.rows, m = s.cols;
      Scalar* vr = s.vr.data();
      Scalar* vc = s.vc.data();
      ctx.parallel_range(lead * n, 16, [&](std::int64_t r0, std::int64_t r1) {
        for (std::int64_t r = r0; r < r1; ++r) {
          const Scalar* gr = g + r * m;
          double acc = 0.0;
          for (std::int64_t j = 0; j < m; ++j) {
            const double gj = static_cast<double>(gr[j]);
            acc += gj * gj + eps1;
          }
          vr[r] = static_cast<Scalar>(keep * static_cast<double>(vr[r]) + add * acc);
        }
      });
      const std::int64_t tiles = (m + kColumnTile - 1) / kColumnTile;
      ctx.parallel_range(lead * tiles, 1, [&](std::int64_t t0, std::int64_t t1) {
        double acc[kColumnTile];
        for (std::int64_t tile = t0; tile < t1; ++tile) {
          const std::int64_t l = tile / tiles;
          const std::int64_t j0 = (tile % tiles) * kColumnTile, j1 = std::min(m, j0 + kColumnTile);
          std::fill(acc, acc + (j1 - j0), 0.0);
          for (std::int64_t i = 0; i < n; ++i) {
            const Scalar* gr = g + (l * n + i) * m;
            for (std::int64_t j = j0; j < j1; ++j) {
              const double gj = static_cast<double>(gr[j]);
              acc[j - j0] += gj * gj + eps1;
            }
          }
          Scalar* vcl = vc + l * m;
          for (std::int64_t j = j0; j < j1; ++j) {
            vcl[j] = static_cast<Scalar>(keep * static_cast<double>(vcl[j]) + add * acc[j - j0]);
          }
        }
      });
      inv_row_total.resize(static_cast<std::size_t>(lead));
      for (std::int64_t l = 0; l < lead; ++l) {
        double total = 0.0;
        for (std::int64_t i = 0; i < n; ++i) total += static_cast<double>(vr[l * n + i]);
        inv_row_total[static_cast<std::size_t>(l)] = 1.0 / total;
      }
    } else {
      Scalar* v = s.v.data();
      ctx.parallel_range(numel, 1024, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < i1; ++i) {
          const double gi = static_cast<double>(g[i]);
          v[i] = static_cast<Scalar>(keep * static_cast<double>(v[i]) + add * (gi * gi + eps1));
        }
      });
    }

    const Scalar* vr = s.vr.data();
    const Scalar* vc = s.vc.data();
    const Scalar* v = s.v.data();
    const std::int64_t n = s.rows, m = s.cols;
    const bool factored = s.factored;
    auto u_at = [&](std::int64_t i) {
      double vhat;
      if (factored) {
        const std::int64_t l = i / (n * m), r = i / m, c = i % m;  // r: row over all slices
        vhat = static_cast<double>(vr[r]) * static_cast<double>(vc[l * m + c]) *
               inv_row_total[static_cast<std::size_t>(l)];
      } else {
        vhat = static_cast<double>(v[i]);
      }
      return static_cast<double>(g[i]) / std::sqrt(vhat);
    };

    const double usq = detail::ordered_sum(ctx, numel, [&](std::int64_t i) {
      const double u = u_at(i);
      return u * u;
    });
    const double clip = std::max(1.0, std::sqrt(usq / static_cast<double>(numel)) / options_.clip_threshold);

    const double beta1 = options_.beta1, decay = alpha * options_.weight_decay;
    Scalar* mom = s.m.data();
    ctx.parallel_range(numel, 1024, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) {
        double delta = u_at(i) / clip;
        if (beta1 > 0.0) {
          delta = beta1 * static_cast<double>(mom[i]) + (1.0 - beta1) * delta;
          mom[i] = static_cast<Scalar>(delta);
        }
        const double xi = static_cast<double>(x[i]);
        x[i] = static_cast<Scalar>(xi - alpha * delta - decay * xi);
      }
    });
  }

  nn::ParameterRefs<Scalar, Cpu> params_;
  AdafactorOptions options_;
  std::vector<Slot> slots_;
  std::int64_t step_ = 0;
};

}  // namespace tmoe::train
