#pragma once
/// @file loss.hpp
/// @brief Training losses over logits, fused with the log-softmax and their gradient: label-smoothed
/// cross-entropy and word-level distillation.
///
/// Both take logits (N, V) and int32 targets (N). Rows whose target equals `padding_id` are ignored: they add
/// nothing to the loss and their gradient rows are zero. The returned loss is the MEAN over the counted
/// (non-padding) rows, and `dlogits` is OVERWRITTEN with the gradient of that mean (so an upstream scale such as
/// a loss weight multiplies it afterwards). With no counted rows every reported value is 0 and dlogits is zero.
/// `dlogits` may alias `logits`.
///
/// Label smoothing (Szegedy et al. 2016, as used by Vaswani et al. 2017): the smoothed target distribution is
///     q_j = (1 - ε) [j = y] + ε / V,
/// i.e. 1 - ε on the target plus ε/V on every class including the target, so the loss per row is
///     (1 - ε) · (−log p_y) + (ε / V) · Σ_j (−log p_j)
/// and its gradient wrt the logits is p − q. (fairseq's current criterion spreads ε over the V − 1 other classes
/// instead; with this definition ε = 0.1 puts 0.9 + 0.1/V on the target.)
///
/// Per row, sums (max, Σ exp, Σ logits, the KL) are accumulated in double, exponentials are taken in Scalar;
/// rows are spread over the context's threads and their losses are summed afterwards in row order, so results do
/// not depend on the thread count.
///
/// @code
/// tmoe::Tensor<float, tmoe::Cpu> logits({N, V}), dlogits({N, V});
/// tmoe::Tensor<std::int32_t, tmoe::Cpu> targets({N});
/// auto r = tmoe::train::label_smoothed_cross_entropy(ctx, dlogits, logits, targets,
///                                                    {.padding_id = 1, .label_smoothing = 0.1});
/// // r.loss (what dlogits is the gradient of), r.nll (for perplexity), r.count (non-padding rows)
/// @endcode

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe::train {

/// Options of label_smoothed_cross_entropy.
struct CrossEntropyOptions {
  std::int32_t padding_id = -1;  ///< rows with this target are ignored; may be a valid class id (fairseq's is 1)
  double label_smoothing = 0.0;  ///< ε in [0, 1]
};

/// What label_smoothed_cross_entropy reports. Means are over `count` rows.
struct CrossEntropyResult {
  double loss = 0.0;       ///< mean label-smoothed loss; dlogits is its gradient
  double nll = 0.0;        ///< mean unsmoothed −log p_target, for logging and perplexity
  std::int64_t count = 0;  ///< rows whose target is not the padding id
};

/// Options of distillation_loss.
struct DistillationOptions {
  std::int32_t padding_id = -1;  ///< rows with this target are ignored
  double label_smoothing = 0.0;  ///< ε of the cross-entropy term, in [0, 1]
  double alpha = 0.5;            ///< weight of the KL term, in [0, 1]; the cross-entropy term gets 1 − alpha
};

/// What distillation_loss reports. Means are over `count` rows.
struct DistillationResult {
  double loss = 0.0;           ///< (1 − alpha) · cross_entropy + alpha · kl; dlogits is its gradient
  double cross_entropy = 0.0;  ///< mean label-smoothed cross-entropy against the targets
  double kl = 0.0;             ///< mean KL(teacher ‖ student)
  double nll = 0.0;            ///< mean unsmoothed −log p_target
  std::int64_t count = 0;      ///< rows whose target is not the padding id
};

namespace detail {

struct LossRow {
  double ce = 0.0, nll = 0.0, kl = 0.0;
};

/// Checks shapes and options and counts non-padding rows.
/// @throws ShapeError for a bad shape or a target outside [0, V) that is not the padding id (the first such row).
template <class S>
std::int64_t check_loss_inputs(const char* op, ConstTensorView<S, Cpu> logits,
                               ConstTensorView<std::int32_t, Cpu> targets, const TensorView<S, Cpu>* dlogits,
                               const ConstTensorView<S, Cpu>* teacher, std::int32_t padding_id, double smoothing,
                               double alpha) {
  if (logits.rank() != 2) {
    throw ShapeError(std::string(op) + ": logits must have rank 2 (N, V) but has shape " + logits.shape().to_string());
  }
  const std::int64_t n = logits.dim(0), v = logits.dim(1);
  require_shape(op, "targets", targets, Shape{n});
  if (dlogits) require_shape(op, "dlogits", *dlogits, logits.shape());
  if (teacher) require_shape(op, "teacher_probs", *teacher, logits.shape());
  if (!(smoothing >= 0.0 && smoothing <= 1.0)) {
    throw Error(std::string(op) + ": label_smoothing must be in [0, 1], got " + std::to_string(smoothing));
  }
  if (!(alpha >= 0.0 && alpha <= 1.0)) {
    throw Error(std::string(op) + ": alpha must be in [0, 1], got " + std::to_string(alpha));
  }
  std::int64_t count = 0;
  for (std::int64_t r = 0; r < n; ++r) {
    const std::int32_t y = targets.data()[r];
    if (y == padding_id) continue;
    if (y < 0 || y >= v) {
      std::string m(op);
      m += ": targets[";
      m += std::to_string(r);
      m += "] = ";
      m += std::to_string(y);
      m += " is outside [0, V) with V = ";
      m += std::to_string(v);
      m += " and is not the padding id ";
      m += std::to_string(padding_id);
      throw ShapeError(m);
    }
    ++count;
  }
  return count;
}

/// One row: losses of the row and, when `dz` is not null, dz = scale · ∂(row loss)/∂z, where the row loss is
/// w_ce · ce + w_kl · kl. `dz` may alias `z`: the last pass reads z[j] just before writing dz[j] and nothing after.
template <class S>
LossRow loss_row(const S* z, std::int64_t v, std::int32_t y, double eps, const S* teacher, double w_ce, double w_kl,
                 double scale, S* dz) {
  double mx = -std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j < v; ++j) mx = std::max(mx, static_cast<double>(z[j]));
  double sum_exp = 0.0, sum_z = 0.0;
  for (std::int64_t j = 0; j < v; ++j) {
    sum_exp += static_cast<double>(std::exp(static_cast<S>(static_cast<double>(z[j]) - mx)));
    sum_z += static_cast<double>(z[j]);
  }
  const double lse = mx + std::log(sum_exp);  // log Σ exp z
  LossRow out;
  out.nll = lse - static_cast<double>(z[y]);
  const double vd = static_cast<double>(v);
  out.ce = (1.0 - eps) * out.nll + eps / vd * (vd * lse - sum_z);
  double teacher_mass = 0.0;
  if (teacher) {
    // KL(t ‖ p) = Σ_j t_j (log t_j − log p_j), with 0 · log 0 = 0.
    for (std::int64_t j = 0; j < v; ++j) {
      const double t = static_cast<double>(teacher[j]);
      teacher_mass += t;
      if (t > 0.0) out.kl += t * (std::log(t) - (static_cast<double>(z[j]) - lse));
    }
  }
  if (dz) {
    // ∂ce/∂z_j = p_j − q_j;  ∂kl/∂z_j = p_j Σt − t_j (exact even when the teacher row does not sum to 1).
    const double uniform = eps / vd;
    for (std::int64_t j = 0; j < v; ++j) {
      const double p = static_cast<double>(std::exp(static_cast<S>(static_cast<double>(z[j]) - lse)));
      const double q = j == y ? 1.0 - eps + uniform : uniform;
      double grad = w_ce * (p - q);
      if (teacher) grad += w_kl * (p * teacher_mass - static_cast<double>(teacher[j]));
      dz[j] = static_cast<S>(grad * scale);
    }
  }
  return out;
}

/// The shared driver: rows in parallel, then sums in row order.
template <class S>
DistillationResult loss_rows(CpuContext& ctx, S* dlogits, ConstTensorView<S, Cpu> logits,
                             ConstTensorView<std::int32_t, Cpu> targets, const S* teacher, std::int64_t count,
                             std::int32_t padding_id, double eps, double alpha) {
  const std::int64_t n = logits.dim(0), v = logits.dim(1);
  DistillationResult res;
  res.count = count;
  const double w_ce = teacher ? 1.0 - alpha : 1.0, w_kl = teacher ? alpha : 0.0;
  const double scale = count > 0 ? 1.0 / static_cast<double>(count) : 0.0;
  std::vector<LossRow> rows(static_cast<std::size_t>(n));
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(v, 1));
  ctx.parallel_range(n, grain, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int32_t y = targets.data()[r];
      S* dz = dlogits ? dlogits + r * v : nullptr;
      if (y == padding_id) {
        if (dz) std::fill(dz, dz + v, S(0));
        continue;
      }
      rows[static_cast<std::size_t>(r)] =
          loss_row<S>(logits.data() + r * v, v, y, eps, teacher ? teacher + r * v : nullptr, w_ce, w_kl, scale, dz);
    }
  });
  if (count == 0) return res;
  for (const LossRow& row : rows) {
    res.cross_entropy += row.ce;
    res.nll += row.nll;
    res.kl += row.kl;
  }
  res.cross_entropy *= scale;
  res.nll *= scale;
  res.kl *= scale;
  res.loss = w_ce * res.cross_entropy + w_kl * res.kl;
  return res;
}

}  // namespace detail

/// Label-smoothed cross-entropy with its gradient (see the file comment for the definition).
/// @param ctx      threads over rows
/// @param dlogits  (N, V) overwritten with ∂loss/∂logits; zero rows for padding; may alias logits
/// @param logits   (N, V)
/// @param targets  (N) class ids in [0, V), or options.padding_id
/// @return mean loss, mean unsmoothed NLL and the number of counted rows
/// @throws ShapeError for mismatched shapes or a target outside [0, V) that is not the padding id (naming the
/// row, the id and V); Error for label_smoothing outside [0, 1].
template <std::floating_point S>
CrossEntropyResult label_smoothed_cross_entropy(CpuContext& ctx, TensorView<S, Cpu> dlogits,
                                                ConstTensorView<S, Cpu> logits,
                                                ConstTensorView<std::int32_t, Cpu> targets,
                                                CrossEntropyOptions options = {}) {
  static constexpr const char* kOp = "label_smoothed_cross_entropy";
  const std::int64_t count = detail::check_loss_inputs<S>(kOp, logits, targets, &dlogits, nullptr, options.padding_id,
                                                          options.label_smoothing, 0.0);
  const auto r = detail::loss_rows<S>(ctx, dlogits.data(), logits, targets, nullptr, count, options.padding_id,
                                      options.label_smoothing, 0.0);
  return {r.loss, r.nll, r.count};
}

/// The loss alone, without a gradient (evaluation).
template <std::floating_point S>
CrossEntropyResult label_smoothed_cross_entropy(CpuContext& ctx, ConstTensorView<S, Cpu> logits,
                                                ConstTensorView<std::int32_t, Cpu> targets,
                                                CrossEntropyOptions options = {}) {
  static constexpr const char* kOp = "label_smoothed_cross_entropy";
  const std::int64_t count = detail::check_loss_inputs<S>(kOp, logits, targets, nullptr, nullptr, options.padding_id,
                                                          options.label_smoothing, 0.0);
  const auto r = detail::loss_rows<S>(ctx, static_cast<S*>(nullptr), logits, targets, nullptr, count,
                                      options.padding_id, options.label_smoothing, 0.0);
  return {r.loss, r.nll, r.count};
}

/// Word-level knowledge distillation (Kim & Rush 2016): per counted row
///     (1 − alpha) · label-smoothed CE(student, target) + alpha · KL(teacher ‖ student),
/// averaged over counted rows, with its gradient wrt the student's logits.
///
/// The teacher is given as probabilities (N, V): rows non-negative and summing to 1 (e.g. a softmax of the
/// teacher's logits at whatever temperature the caller chose). Zero probabilities contribute 0 · log 0 = 0.
/// KL(t ‖ p) = Σ_j t_j (log t_j − log p_j) differs from the soft cross-entropy −Σ_j t_j log p_j only by the
/// teacher's entropy, so the gradient is the same and the reported value is 0 when the student matches.
/// @param dlogits        (N, V) overwritten with ∂loss/∂logits; zero rows for padding; may alias logits
/// @param logits         (N, V) the student's
/// @param teacher_probs  (N, V)
/// @param targets        (N) class ids in [0, V), or options.padding_id
/// @throws ShapeError for mismatched shapes or a bad target id; Error for alpha or label_smoothing outside [0, 1].
template <std::floating_point S>
DistillationResult distillation_loss(CpuContext& ctx, TensorView<S, Cpu> dlogits, ConstTensorView<S, Cpu> logits,
                                     ConstTensorView<S, Cpu> teacher_probs, ConstTensorView<std::int32_t, Cpu> targets,
                                     DistillationOptions options = {}) {
  static constexpr const char* kOp = "distillation_loss";
  const std::int64_t count = detail::check_loss_inputs<S>(kOp, logits, targets, &dlogits, &teacher_probs,
                                                          options.padding_id, options.label_smoothing, options.alpha);
  return detail::loss_rows<S>(ctx, dlogits.data(), logits, targets, teacher_probs.data(), count, options.padding_id,
                              options.label_smoothing, options.alpha);
}

}  // namespace tmoe::train
