#pragma once
/// @file optimizer_state.hpp
/// @brief OptimizerState<Scalar>: an optimizer's buffers as named tensors plus its step counter, the form in
/// which AdamW and Adafactor save and restore themselves through tmoe::io.
///
/// Names are "{prefix}{parameter name}.{buffer}" (for example "optimizer.decoder.wi.adam_m"); the step counter
/// and the optimizer's type travel as safetensors metadata under "{prefix}step" and "{prefix}type", because a
/// float tensor cannot hold a large step count exactly.
///
/// @code
/// auto st = opt.state("optimizer.");                     // views into the live buffers
/// auto all = tmoe::nn::values_of(params);
/// all.insert(all.end(), st.tensors.begin(), st.tensors.end());
/// tmoe::io::save(path, all, st.metadata);
/// // ... later, into a fresh model and optimizer built the same way:
/// auto meta = tmoe::io::load(path, all2);              // all2 = values_of(params2) + opt2.state(...).tensors
/// opt2.load_metadata(meta, "optimizer.");              // the step counter and a type check
/// @endcode
///
/// The helpers in `detail` are private to the optimizers and gradient clipping.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/shape.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::train {

/// An optimizer's state for a checkpoint.
/// @tparam Scalar the parameters' (and the buffers') element type.
/// @tparam Device where the buffers live (a CUDA optimizer's views are device views; copy them to the host to save).
template <std::floating_point Scalar, DeviceTag Device = Cpu>
struct OptimizerState {
  /// Mutable views into the optimizer's own buffers: saving reads them, io::load writes them.
  NamedTensorViews<Scalar, Device> tensors;
  /// "{prefix}step" (decimal step count) and "{prefix}type" ("adamw" or "adafactor").
  std::map<std::string, std::string> metadata;
};

namespace detail {

/// Reductions are summed in blocks of this many elements, then block partials in block order, so the result
/// depends neither on the thread count nor on the partition.
inline constexpr std::int64_t kSumBlock = 4096;

/// Σ_{i < n} term(i) in double, in a fixed order (see kSumBlock). `term` must be safe to call concurrently.
template <class Term>
double ordered_sum(CpuContext& ctx, std::int64_t n, const Term& term) {
  if (n <= 0) return 0.0;
  const std::int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  auto block_sum = [&](std::int64_t b) {
    double s = 0.0;
    const std::int64_t end = std::min(n, (b + 1) * kSumBlock);
    for (std::int64_t i = b * kSumBlock; i < end; ++i) s += term(i);
    return s;
  };
  if (blocks == 1) return block_sum(0);
  std::vector<double> partial(static_cast<std::size_t>(blocks));
  ctx.parallel_range(blocks, 1, [&](std::int64_t b0, std::int64_t b1) {
    for (std::int64_t b = b0; b < b1; ++b) partial[static_cast<std::size_t>(b)] = block_sum(b);
  });
  double s = 0.0;
  for (double p : partial) s += p;
  return s;
}

/// A shape from the first `rank` entries of `e` (rank 0 to 4).
inline Shape shape_of(const std::int64_t* e, int rank) { return Shape::from_extents(e, rank); }

/// Checks what every optimizer requires of its parameter list: non-empty unique names, grad shaped like value.
/// @throws Error on an empty or repeated name; ShapeError when a gradient's shape differs from its value's.
template <class S, DeviceTag Device>
void check_parameters(std::string_view op, const nn::ParameterRefs<S, Device>& params) {
  std::set<std::string, std::less<>> seen;
  for (const auto& p : params) {
    if (p.name.empty()) throw Error(tmoe::detail::message(op, "a parameter has an empty name"));
    if (!seen.insert(p.name).second) {
      throw Error(tmoe::detail::message(op, "parameter name '" + p.name + "' appears twice"));
    }
    if (!(p.value.shape() == p.grad.shape())) {
      std::string what = "parameter '" + p.name + "' has value shape " + p.value.shape().to_string();
      what += " but grad shape ";
      what += p.grad.shape().to_string();
      throw ShapeError(tmoe::detail::message(op, what));
    }
  }
}

/// `x` in the shortest form that reads back exactly ("0.1", "1e-30", "inf").
inline std::string format_number(double x) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof(buf), x);
  return std::string(buf, r.ptr);
}

/// Throws Error unless x is finite and lo <= x <= hi, naming the option.
inline void check_closed(std::string_view op, std::string_view name, double x, double lo, double hi) {
  if (!(x >= lo && x <= hi && std::isfinite(x))) {
    std::string what(name);
    what += " must be in [";
    what += format_number(lo);
    what += ", ";
    what += format_number(hi);
    what += "], got ";
    what += format_number(x);
    throw Error(tmoe::detail::message(op, what));
  }
}

/// Throws Error unless x is finite and >= 0, naming the option.
inline void check_non_negative(std::string_view op, std::string_view name, double x) {
  if (!(x >= 0.0 && std::isfinite(x))) {
    std::string what(name);
    what += " must be finite and >= 0, got ";
    what += format_number(x);
    throw Error(tmoe::detail::message(op, what));
  }
}

/// Throws Error unless 0 <= x < 1 (a decay rate), naming the option.
inline void check_half_open(std::string_view op, std::string_view name, double x) {
  if (!(x >= 0.0 && x < 1.0)) {
    std::string what(name);
    what += " must be in [0, 1), got ";
    what += format_number(x);
    throw Error(tmoe::detail::message(op, what));
  }
}

/// Throws Error unless x is finite and > 0, naming the option.
inline void check_positive(std::string_view op, std::string_view name, double x) {
  if (!(x > 0.0 && std::isfinite(x))) {
    std::string what(name);
    what += " must be positive and finite, got ";
    what += format_number(x);
    throw Error(tmoe::detail::message(op, what));
  }
}

/// The metadata of a state: step count and type.
inline std::map<std::string, std::string> state_metadata(std::string_view type, std::int64_t step,
                                                         std::string_view prefix) {
  std::map<std::string, std::string> m;
  m[std::string(prefix) + "step"] = std::to_string(step);
  m[std::string(prefix) + "type"] = std::string(type);
  return m;
}

/// Reads "{prefix}step" and checks "{prefix}type" == type.
/// @throws Error naming the key when it is missing, not a non-negative decimal integer, or of another type.
inline std::int64_t parse_state_metadata(std::string_view op, std::string_view type,
                                         const std::map<std::string, std::string>& metadata, std::string_view prefix) {
  const std::string type_key = std::string(prefix) + "type";
  const std::string step_key = std::string(prefix) + "step";
  const auto t = metadata.find(type_key);
  if (t == metadata.end()) throw Error(tmoe::detail::message(op, "metadata has no key '" + type_key + "'"));
  if (t->second != type) {
    std::string what = "metadata '" + type_key + "' is '" + t->second;
    what += "', expected '";
    what += type;
    what += "'";
    throw Error(tmoe::detail::message(op, what));
  }
  const auto s = metadata.find(step_key);
  if (s == metadata.end()) throw Error(tmoe::detail::message(op, "metadata has no key '" + step_key + "'"));
  std::int64_t step = -1;
  const char* first = s->second.data();
  const char* last = first + s->second.size();
  const auto [end, ec] = std::from_chars(first, last, step);
  if (ec != std::errc() || end != last || step < 0 || s->second.empty()) {
    std::string what = "metadata '" + step_key + "' is '" + s->second;
    what += "', expected a non-negative integer";
    throw Error(tmoe::detail::message(op, what));
  }
  return step;
}

/// Copies `src` into `dst` by name. Validates everything before writing anything: every name of `dst` must be
/// in `src` with the same shape and, when `prefix` is not empty, every name in `src` starting with `prefix`
/// must be in `dst` (a buffer the optimizer does not have means it was configured differently).
/// @throws Error for a missing or unexpected name; ShapeError for a shape mismatch, naming the tensor.
template <class S, class T>
requires std::same_as<std::remove_const_t<T>, S>
void copy_state(std::string_view op, const NamedTensorViews<S, Cpu>& dst, const NamedTensorViews<T, Cpu>& src,
                std::string_view prefix) {
  std::map<std::string_view, const TensorView<T, Cpu>*> by_name;
  for (const auto& s : src) {
    if (!by_name.emplace(s.name, &s.view).second) {
      throw Error(tmoe::detail::message(op, "source tensor '" + s.name + "' appears twice"));
    }
  }
  std::set<std::string_view> wanted;
  for (const auto& d : dst) {
    wanted.insert(d.name);
    const auto it = by_name.find(d.name);
    if (it == by_name.end()) throw Error(tmoe::detail::message(op, "missing tensor '" + d.name + "'"));
    if (!(it->second->shape() == d.view.shape())) {
      std::string what = "tensor '" + d.name + "' has shape " + it->second->shape().to_string();
      what += ", expected ";
      what += d.view.shape().to_string();
      throw ShapeError(tmoe::detail::message(op, what));
    }
  }
  if (!prefix.empty()) {
    for (const auto& s : src) {
      if (s.name.starts_with(prefix) && !wanted.contains(s.name)) {
        throw Error(tmoe::detail::message(op, "unexpected tensor '" + s.name + "' (no such buffer in this optimizer)"));
      }
    }
  }
  for (const auto& d : dst) {
    const auto* s = by_name.find(d.name)->second;
    for (std::int64_t i = 0; i < d.view.numel(); ++i) d.view.data()[i] = s->data()[i];
  }
}

}  // namespace detail

}  // namespace tmoe::train
