#pragma once
/// @file embedding.hpp
/// @brief nn::Embedding: a (V, C) table looked up by token id, with an optional output scale, and the tied output
/// projection logits = h E^T that shares the table; both with their backward.
///
/// Gradient rule: backward and project_backward ACCUMULATE into the same table gradient (so a tied model sums
/// both uses), and project_backward OVERWRITES dh. Token ids have no gradient.
///
/// Parameters, relative to the prefix: `weight` (V, C).
///
/// @code
/// tmoe::CpuContext ctx;
/// tmoe::nn::Embedding<float, tmoe::Cpu> emb({.vocab_size = 32000, .d_model = 512, .scale = std::sqrt(512.0)});
/// emb.init(5);
/// tmoe::Tensor<std::int32_t, tmoe::Cpu> ids({8, 128});
/// tmoe::Tensor<float, tmoe::Cpu> x({8, 128, 512}), logits({8, 128, 32000});
/// decltype(emb)::Cache cache;
/// decltype(emb)::ProjectCache pcache;
/// emb.forward(ctx, ids, x, cache);              // x = sqrt(C) * E[ids]
/// emb.project(ctx, x, logits, pcache);          // logits = x E^T (tied output layer)
/// @endcode

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "tmoe/backend/cpu/ops.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/detail/nn_shapes.hpp"
#include "tmoe/nn/init.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::nn {

/// Sizes of an Embedding.
struct EmbeddingOptions {
  std::int64_t vocab_size = 0;  ///< V
  std::int64_t d_model = 0;     ///< C
  double scale = 1.0;           ///< lookup output multiplier, e.g. sqrt(C) ("Attention is all you need" 3.4)
};

/// What Embedding::backward needs: a view of the token ids (kept alive by the caller).
template <DeviceTag Device>
struct EmbeddingCache {
  ConstTensorView<std::int32_t, Device> ids;  // (...) e.g. (B, T)
};

/// What Embedding::project_backward needs: a view of the projected input (kept alive by the caller).
template <class Scalar, DeviceTag Device>
struct EmbeddingProjectCache {
  ConstTensorView<Scalar, Device> h;  // (..., C)
};

template <class Scalar, DeviceTag Device>
class Embedding;

/// @tparam Scalar float or double.
template <class Scalar>
class Embedding<Scalar, Cpu> {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "nn::Embedding<Scalar, Cpu>: the CPU back-end computes in float or double.");

 public:
  using scalar_type = Scalar;
  using device_type = Cpu;
  using Cache = EmbeddingCache<Cpu>;
  using ProjectCache = EmbeddingProjectCache<Scalar, Cpu>;

  Embedding() = default;

  /// Allocates a zero-filled (V, C) table.
  /// @throws ShapeError if V or C is not positive, or V does not fit int32 token ids.
  explicit Embedding(EmbeddingOptions options) : options_(options) {
    if (options.vocab_size <= 0 || options.d_model <= 0 || options.vocab_size > (std::int64_t{1} << 31)) {
      std::string m = "Embedding: vocab_size must be in [1, 2^31] and d_model positive, got vocab_size ";
      m += std::to_string(options.vocab_size);
      m += " and d_model ";
      m += std::to_string(options.d_model);
      throw ShapeError(m);
    }
    table_ = Parameter<Scalar, Cpu>({options.vocab_size, options.d_model});
  }

  [[nodiscard]] const EmbeddingOptions& options() const noexcept { return options_; }
  [[nodiscard]] TensorView<Scalar, Cpu> weight() noexcept { return table_.value.view(); }  // (V, C)

  /// E ~ N(0, 1/C) from Philox(seed) stream 0: with scale sqrt(C) the looked-up vectors have unit variance, and
  /// tied logits start at unit scale.
  void init(std::uint64_t seed) {
    fill_normal(table_.value.view(), seed, 0, 1.0 / std::sqrt(static_cast<double>(options_.d_model)));
  }

  /// "{prefix}.weight" (V, C).
  [[nodiscard]] NamedTensorViews<Scalar> parameters(const std::string& prefix = "") {
    return values_of(parameter_refs(prefix));
  }

  /// Value and gradient under the same name as parameters().
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& prefix = "") {
    const std::string p = prefix.empty() ? "" : prefix + ".";
    ParameterRefs<Scalar, Cpu> out;
    out.push_back({p + "weight", table_.value.view(), table_.grad.view()});
    return out;
  }

  /// out (..., C) = scale * E[ids (...)]. Keeps a view of ids in `cache`.
  /// @throws ShapeError if out's shape is not ids' shape plus C, or an id is outside [0, V) (the message names
  /// the position).
  void forward(CpuContext& ctx, ConstTensorView<std::int32_t, Cpu> ids, TensorView<Scalar, Cpu> out,
               Cache& cache) const {
    const char* op = "Embedding::forward";
    const std::int64_t V = options_.vocab_size, C = options_.d_model, N = ids.numel();
    if (ids.rank() == 0 || ids.rank() == Shape::kMaxRank) {
      std::string m = op;
      m += ": ids must have rank 1 to 3, got shape ";
      m += ids.shape().to_string();
      throw ShapeError(m);
    }
    require_shape(op, "out", out, appended(ids.shape(), C));
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int32_t id = ids.data()[n];
      if (id < 0 || id >= V) {
        std::string m = op;
        m += ": token id ";
        m += std::to_string(id);
        m += " at position ";
        m += detail::index_string(ids.shape(), n);
        m += " is out of range [0, ";
        m += std::to_string(V);
        m += ") for vocab_size ";
        m += std::to_string(V);
        throw ShapeError(m);
      }
    }
    const Scalar scale = static_cast<Scalar>(options_.scale);
    const Scalar* table = table_.value.data();
    Scalar* y = out.data();
    ctx.parallel_range(N, 32, [&](std::int64_t n0, std::int64_t n1) {
      for (std::int64_t n = n0; n < n1; ++n) {
        const Scalar* row = table + static_cast<std::int64_t>(ids.data()[n]) * C;
        for (std::int64_t c = 0; c < C; ++c) y[n * C + c] = scale * row[c];
      }
    });
    cache.ids = ids;
  }

  /// dE[ids[n], :] += scale * dout[n, :] for n in increasing order. Each thread owns a column slab of the
  /// table, so repeated ids are summed in position order whatever the thread count.
  /// @throws ShapeError if forward has not filled `cache` or dout is not ids' shape plus C.
  void backward(CpuContext& ctx, const Cache& cache, ConstTensorView<Scalar, Cpu> dout) {
    const char* op = "Embedding::backward";
    if (cache.ids.rank() == 0) throw ShapeError(std::string(op) + ": the cache holds no ids; call forward first");
    const std::int64_t C = options_.d_model, N = cache.ids.numel();
    require_shape(op, "dout", dout, appended(cache.ids.shape(), C));
    const Scalar scale = static_cast<Scalar>(options_.scale);
    Scalar* grad = table_.grad.data();
    const std::int32_t* ids = cache.ids.data();
    ctx.parallel_range(C, 16, [&](std::int64_t c0, std::int64_t c1) {
      for (std::int64_t n = 0; n < N; ++n) {
        Scalar* row = grad + static_cast<std::int64_t>(ids[n]) * C;
        const Scalar* g = dout.data() + n * C;
        for (std::int64_t c = c0; c < c1; ++c) row[c] += scale * g[c];
      }
    });
  }

  /// logits (..., V) = h (..., C) E^T: the tied output projection (no scale). Keeps a view of h in `cache`.
  /// @throws ShapeError if h's last dim is not C or logits is not h's shape with last dim V.
  void project(CpuContext& ctx, ConstTensorView<Scalar, Cpu> h, TensorView<Scalar, Cpu> logits,
               ProjectCache& cache) const {
    const char* op = "Embedding::project";
    const std::int64_t V = options_.vocab_size, C = options_.d_model;
    if (h.rank() == 0 || h.dim(-1) != C) {
      std::string m = op;
      m += ": h must have last dim d_model = ";
      m += std::to_string(C);
      m += ", got shape ";
      m += h.shape().to_string();
      throw ShapeError(m);
    }
    require_shape(op, "logits", logits, detail::with_last_dim(h.shape(), V));
    const std::int64_t N = h.numel() / C;
    Ops<Cpu>::gemm<Scalar>(ctx, logits.reshape({N, V}), h.reshape({N, C}), Trans::kN, table_.value, Trans::kT);
    cache.h = h;
  }

  /// dE (V, C) += dlogits^T h (the same gradient as backward's); dh (..., C) = dlogits E (overwritten).
  /// @throws ShapeError if project has not filled `cache` or dlogits / dh do not match project's output / input.
  void project_backward(CpuContext& ctx, const ProjectCache& cache, ConstTensorView<Scalar, Cpu> dlogits,
                        TensorView<Scalar, Cpu> dh) {
    const char* op = "Embedding::project_backward";
    if (cache.h.rank() == 0) throw ShapeError(std::string(op) + ": the cache holds no input; call project first");
    const std::int64_t V = options_.vocab_size, C = options_.d_model;
    require_shape(op, "dlogits", dlogits, detail::with_last_dim(cache.h.shape(), V));
    require_shape(op, "dh", dh, cache.h.shape());
    const std::int64_t N = cache.h.numel() / C;
    const auto dl = dlogits.reshape({N, V});
    Ops<Cpu>::gemm<Scalar>(ctx, table_.grad, dl, Trans::kT, cache.h.reshape({N, C}), Trans::kN, Scalar(1), Scalar(1));
    Ops<Cpu>::gemm<Scalar>(ctx, dh.reshape({N, C}), dl, Trans::kN, table_.value, Trans::kN);
  }

 private:
  // `s` with one more trailing extent (rank <= 3).
  static Shape appended(const Shape& s, std::int64_t last) {
    switch (s.rank()) {
      case 1:
        return Shape{s[0], last};
      case 2:
        return Shape{s[0], s[1], last};
      default:
        return Shape{s[0], s[1], s[2], last};
    }
  }

  EmbeddingOptions options_;
  Parameter<Scalar, Cpu> table_;  // (V, C)
};

}  // namespace tmoe::nn
