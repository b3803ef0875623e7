#pragma once
/// @file attention.hpp
/// @brief nn::MultiHeadAttention: scaled dot-product attention over H heads ("Attention is all you need" 3.2),
/// self- or cross-attention, with a causal mask and a key padding mask, and its backward.
///
/// Per batch row b and head h, with D = C / H and Q, K, V the projected inputs split into heads:
///   S = Q K^T / sqrt(D)  (Tq, Tk),   P = softmax over the allowed keys of each row,   O = P V  (Tq, D)
///   y = o_proj(concat_h O).
/// Query i may attend key j when the key is valid (key_padding[b, j] == 1) and, with the causal flag, j <= i
/// (top-left aligned when Tq != Tk). The softmax subtracts the row maximum over the allowed keys and runs in the
/// scalar type. A row with no allowed key gets P = 0: its heads' output is zero (so y's row is o_proj's bias) and
/// no gradient flows through it, never NaN.
///
/// Gradient rule: backward ACCUMULATES into the four projections' parameter gradients and OVERWRITES dx (and
/// dmemory for cross-attention).
///
/// Parameters, relative to the prefix: `q_proj.weight` (C, C), `q_proj.bias` (C), and likewise `k_proj`, `v_proj`,
/// `o_proj`; the biases only when enabled.
///
/// @code
/// tmoe::CpuContext ctx{2};
/// tmoe::nn::MultiHeadAttention<float, tmoe::Cpu> attn({.d_model = 512, .heads = 8});
/// attn.init(9);
/// tmoe::Tensor<float, tmoe::Cpu> x({8, 128, 512}), y({8, 128, 512});
/// decltype(attn)::Cache cache;
/// attn.forward(ctx, {.x = x, .causal = true}, y, cache);          // decoder self-attention
/// attn.forward(ctx, {.x = x, .memory = enc, .key_padding = enc_mask}, y, cache);   // cross-attention
/// @endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "tmoe/backend/cpu/ops.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/detail/nn_shapes.hpp"
#include "tmoe/nn/init.hpp"
#include "tmoe/nn/linear.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::nn {

/// Sizes of a MultiHeadAttention.
struct AttentionOptions {
  std::int64_t d_model = 0;  ///< C
  std::int64_t heads = 0;    ///< H, must divide C
  bool bias = true;          ///< biases in the four projections
};

/// One attention call's inputs.
template <class Scalar, DeviceTag Device>
struct AttentionInput {
  ConstTensorView<Scalar, Device> x;                    ///< (B, Tq, C) queries (and keys/values if no memory)
  ConstTensorView<Scalar, Device> memory{};             ///< (B, Tk, C) keys and values; empty = self-attention
  ConstTensorView<std::int32_t, Device> key_padding{};  ///< (B, Tk) 1 = valid key, 0 = padding; empty = all valid
  bool causal = false;                                  ///< query i attends keys j <= i only
};

/// What MultiHeadAttention::backward needs, plus its workspaces (reused across calls).
template <class Scalar, DeviceTag Device>
struct AttentionCache {
  LinearCache<Scalar, Device> q_proj, k_proj, v_proj, o_proj;  // views of x, memory (or x), x, attn
  Tensor<Scalar, Device> q;                                    // (B, Tq, C)
  Tensor<Scalar, Device> k;                                    // (B, Tk, C)
  Tensor<Scalar, Device> v;                                    // (B, Tk, C)
  Tensor<Scalar, Device> probs;                                // (B, H, Tq, Tk) zero where masked
  Tensor<Scalar, Device> attn;                                 // (B, Tq, C) heads concatenated
  bool cross = false;                                          // memory was given
  // Backward workspaces.
  Tensor<Scalar, Device> dattn, dq, dk, dv;  // (B, Tq, C), (B, Tq, C), (B, Tk, C), (B, Tk, C)
  Tensor<Scalar, Device> dprobs;             // (B, H, Tq, Tk)
  Tensor<Scalar, Device> dinput;             // (B, Tk, C) a projection's input gradient before summation
};

/// Keys and values kept across decoding steps, (B, capacity, C) each: for self-attention the projections of the
/// tokens decoded so far (`length` of them), for cross-attention those of the encoder output, computed once.
template <class Scalar, DeviceTag Device>
struct KvCache {
  Tensor<Scalar, Device> k, v;
  std::int64_t length = 0;  ///< valid positions [0, length) of every row
  [[nodiscard]] std::int64_t batch() const noexcept { return k.rank() == 3 ? k.dim(0) : 0; }
  [[nodiscard]] std::int64_t capacity() const noexcept { return k.rank() == 3 ? k.dim(1) : 0; }
};

/// Workspaces of one decoding step, reused across steps.
template <class Scalar, DeviceTag Device>
struct AttentionStepWork {
  LinearCache<Scalar, Device> proj;  // throwaway (inference keeps nothing for backward)
  Tensor<Scalar, Device> q, k, v;    // (B, C)
  Tensor<Scalar, Device> attn;       // (B, C)
  Tensor<Scalar, Device> scores;     // (B * H, cache capacity)
};

template <class Scalar, DeviceTag Device>
class MultiHeadAttention;

/// @tparam Scalar float or double.
template <class Scalar>
class MultiHeadAttention<Scalar, Cpu> {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "nn::MultiHeadAttention<Scalar, Cpu>: the CPU back-end computes in float or double.");

 public:
  using scalar_type = Scalar;
  using device_type = Cpu;
  using Cache = AttentionCache<Scalar, Cpu>;
  using Input = AttentionInput<Scalar, Cpu>;

  MultiHeadAttention() = default;

  /// @throws ShapeError if C or H is not positive or H does not divide C.
  explicit MultiHeadAttention(AttentionOptions options)
      : options_(checked(options)),
        q_proj_(options.d_model, options.d_model, options.bias),
        k_proj_(options.d_model, options.d_model, options.bias),
        v_proj_(options.d_model, options.d_model, options.bias),
        o_proj_(options.d_model, options.d_model, options.bias) {}

  [[nodiscard]] const AttentionOptions& options() const noexcept { return options_; }
  [[nodiscard]] std::int64_t head_dim() const noexcept { return options_.d_model / options_.heads; }
  [[nodiscard]] Linear<Scalar, Cpu>& q_proj() noexcept { return q_proj_; }
  [[nodiscard]] Linear<Scalar, Cpu>& k_proj() noexcept { return k_proj_; }
  [[nodiscard]] Linear<Scalar, Cpu>& v_proj() noexcept { return v_proj_; }
  [[nodiscard]] Linear<Scalar, Cpu>& o_proj() noexcept { return o_proj_; }

  /// Projection i (q, k, v, o) initialized by Linear::init with sub_seed(seed, i).
  void init(std::uint64_t seed) {
    q_proj_.init(sub_seed(seed, 0));
    k_proj_.init(sub_seed(seed, 1));
    v_proj_.init(sub_seed(seed, 2));
    o_proj_.init(sub_seed(seed, 3));
  }

  /// "{prefix}.q_proj.weight", "{prefix}.q_proj.bias", ... "{prefix}.o_proj.bias" values.
  [[nodiscard]] NamedTensorViews<Scalar> parameters(const std::string& prefix = "") {
    return values_of(parameter_refs(prefix));
  }

  /// Values and gradients under the same names as parameters().
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& prefix = "") {
    const std::string p = prefix.empty() ? "" : prefix + ".";
    ParameterRefs<Scalar, Cpu> out;
    const std::pair<const char*, Linear<Scalar, Cpu>*> subs[] = {
        {"q_proj", &q_proj_}, {"k_proj", &k_proj_}, {"v_proj", &v_proj_}, {"o_proj", &o_proj_}};
    for (const auto& [name, sub] : subs) {
      for (auto& r : sub->parameter_refs(p + name)) out.push_back(std::move(r));
    }
    return out;
  }

  /// y (B, Tq, C) = attention of in.x over in.memory (or over in.x itself). Keeps views of x, memory and
  /// key_padding in `cache`; the caller keeps them alive until backward.
  /// @throws ShapeError if x is not (B, Tq, C), memory not (B, Tk, C), key_padding not (B, Tk) of 0/1 values,
  /// or y not x's shape.
  void forward(CpuContext& ctx, const Input& in, TensorView<Scalar, Cpu> y, Cache& cache) const {
    const char* op = "MultiHeadAttention::forward";
    const std::int64_t C = options_.d_model, H = options_.heads, D = C / H;
    if (in.x.rank() != 3 || in.x.dim(2) != C) {
      std::string m = op;
      m += ": x must be (B, T, ";
      m += std::to_string(C);
      m += "), got shape ";
      m += in.x.shape().to_string();
      throw ShapeError(m);
    }
    const std::int64_t B = in.x.dim(0), Tq = in.x.dim(1);
    const bool cross = in.memory.data() != nullptr || in.memory.rank() != 0;
    if (cross && (in.memory.rank() != 3 || in.memory.dim(0) != B || in.memory.dim(2) != C)) {
      std::string m = op;
      m += ": memory must be (";
      m += std::to_string(B);
      m += ", Tk, ";
      m += std::to_string(C);
      m += ") for x ";
      m += in.x.shape().to_string();
      m += ", got shape ";
      m += in.memory.shape().to_string();
      throw ShapeError(m);
    }
    const ConstTensorView<Scalar, Cpu> mem = cross ? in.memory : in.x;
    const std::int64_t Tk = mem.dim(1);
    const bool padded = in.key_padding.data() != nullptr || in.key_padding.rank() != 0;
    if (padded) {
      require_shape(op, "key_padding", in.key_padding, Shape{B, Tk});
      for (std::int64_t n = 0; n < B * Tk; ++n) {
        const std::int32_t f = in.key_padding.data()[n];
        if (f != 0 && f != 1) {
          std::string m = op;
          m += ": key_padding";
          m += detail::index_string(in.key_padding.shape(), n);
          m += " = ";
          m += std::to_string(f);
          m += ", expected 1 (valid key) or 0 (padding)";
          throw ShapeError(m);
        }
      }
    }
    require_shape(op, "y", y, in.x.shape());

    cache.cross = cross;
    cache.q.resize({B, Tq, C});
    cache.k.resize({B, Tk, C});
    cache.v.resize({B, Tk, C});
    cache.probs.resize({B, H, Tq, Tk});
    cache.attn.resize({B, Tq, C});
    q_proj_.forward(ctx, in.x, cache.q, cache.q_proj);
    k_proj_.forward(ctx, mem, cache.k, cache.k_proj);
    v_proj_.forward(ctx, mem, cache.v, cache.v_proj);

    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(D));
    const std::int32_t* pad = padded ? in.key_padding.data() : nullptr;
    const bool causal = in.causal;
    const Scalar* q = cache.q.data();
    const Scalar* k = cache.k.data();
    const Scalar* v = cache.v.data();
    Scalar* probs = cache.probs.data();
    Scalar* attn = cache.attn.data();
    // One task per (b, h): each writes its own probability block and its own D columns of attn.
    ctx.parallel(B * H, [&](std::int64_t bh) {
      const std::int64_t b = bh / H, h = bh % H;
      Scalar* P = probs + bh * Tq * Tk;
      using backend::cpu::MatrixRef;
      backend::cpu::gemm_serial<Scalar>(
          MatrixRef<Scalar>{P, Tq, Tk, Tk}, MatrixRef<const Scalar>{q + b * Tq * C + h * D, Tq, D, C}, Trans::kN,
          MatrixRef<const Scalar>{k + b * Tk * C + h * D, Tk, D, C}, Trans::kT, scale, Scalar(0));
      for (std::int64_t i = 0; i < Tq; ++i) {
        masked_softmax_row(P + i * Tk, Tk, causal ? std::min(i + 1, Tk) : Tk, pad ? pad + b * Tk : nullptr);
      }
      backend::cpu::gemm_serial<Scalar>(
          MatrixRef<Scalar>{attn + b * Tq * C + h * D, Tq, D, C}, MatrixRef<const Scalar>{P, Tq, Tk, Tk}, Trans::kN,
          MatrixRef<const Scalar>{v + b * Tk * C + h * D, Tk, D, C}, Trans::kN, Scalar(1), Scalar(0));
    });
    o_proj_.forward(ctx, cache.attn, y, cache.o_proj);
  }

  /// Step-by-step decoding, self-attention: projects the new token x (B, C) of every row, appends its key and
  /// value at position kv.length, attends over positions [0, kv.length] and writes y (B, C); kv.length grows by
  /// one. Equal to forward() with the causal mask on the whole prefix, at its last position.
  /// @throws ShapeError if kv was not sized by reserve() for B rows, is full, or x / y are not (B, C).
  void step_self(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, KvCache<Scalar, Cpu>& kv, TensorView<Scalar, Cpu> y,
                 AttentionStepWork<Scalar, Cpu>& w) const {
    const char* op = "MultiHeadAttention::step_self";
    const std::int64_t C = options_.d_model;
    check_step(op, x, y, kv);
    const std::int64_t B = x.dim(0);
    if (kv.length >= kv.capacity()) {
      throw ShapeError(std::string(op) + ": the key/value cache is full (" + std::to_string(kv.capacity()) +
                       " positions); reserve more");
    }
    w.q.resize({B, C});
    w.k.resize({B, C});
    w.v.resize({B, C});
    q_proj_.forward(ctx, x, w.q, w.proj);
    k_proj_.forward(ctx, x, w.k, w.proj);
    v_proj_.forward(ctx, x, w.v, w.proj);
    const std::int64_t L = kv.capacity(), t = kv.length;
    for (std::int64_t b = 0; b < B; ++b) {
      std::copy_n(w.k.data() + b * C, C, kv.k.data() + (b * L + t) * C);
      std::copy_n(w.v.data() + b * C, C, kv.v.data() + (b * L + t) * C);
    }
    kv.length = t + 1;
    attend(ctx, kv, nullptr, y, w);
  }

  /// Cross-attention for decoding: the keys and values of `memory` (B, S, C), computed once per source.
  /// @throws ShapeError if memory is not (B, S, C).
  void project_memory(CpuContext& ctx, ConstTensorView<Scalar, Cpu> memory, KvCache<Scalar, Cpu>& kv) const {
    const std::int64_t C = options_.d_model;
    if (memory.rank() != 3 || memory.dim(2) != C) {
      throw ShapeError("MultiHeadAttention::project_memory: memory must be (B, S, " + std::to_string(C) +
                       "), got shape " + memory.shape().to_string());
    }
    kv.k.resize(memory.shape());
    kv.v.resize(memory.shape());
    LinearCache<Scalar, Cpu> unused;
    k_proj_.forward(ctx, memory, kv.k, unused);
    v_proj_.forward(ctx, memory, kv.v, unused);
    kv.length = memory.dim(1);
  }

  /// Step-by-step cross-attention: queries x (B, C) over the keys and values of project_memory, masked by
  /// key_padding (B, S) (empty = all valid); writes y (B, C).
  void step_cross(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, const KvCache<Scalar, Cpu>& kv,
                  ConstTensorView<std::int32_t, Cpu> key_padding, TensorView<Scalar, Cpu> y,
                  AttentionStepWork<Scalar, Cpu>& w) const {
    const char* op = "MultiHeadAttention::step_cross";
    check_step(op, x, y, kv);
    const bool padded = key_padding.data() != nullptr || key_padding.rank() != 0;
    if (padded) require_shape(op, "key_padding", key_padding, Shape{x.dim(0), kv.capacity()});
    w.q.resize({x.dim(0), options_.d_model});
    q_proj_.forward(ctx, x, w.q, w.proj);
    attend(ctx, kv, padded ? key_padding.data() : nullptr, y, w);
  }

  /// Sizes `kv` for B rows of up to `capacity` positions and empties it.
  static void reserve(KvCache<Scalar, Cpu>& kv, std::int64_t batch, std::int64_t capacity, std::int64_t d_model) {
    kv.k.resize({batch, capacity, d_model});
    kv.v.resize({batch, capacity, d_model});
    kv.length = 0;
  }

  /// dx (B, Tq, C) and, for cross-attention, dmemory (B, Tk, C) are overwritten; the projections' gradients are
  /// accumulated. For self-attention leave dmemory empty: dx then sums the query, key and value paths.
  /// @throws ShapeError if forward has not filled `cache`, or dy, dx, dmemory do not match forward's y, x, memory.
  void backward(CpuContext& ctx, Cache& cache, ConstTensorView<Scalar, Cpu> dy, TensorView<Scalar, Cpu> dx,
                TensorView<Scalar, Cpu> dmemory = {}) {
    const char* op = "MultiHeadAttention::backward";
    if (cache.q_proj.x.rank() == 0) {
      throw ShapeError(std::string(op) + ": the cache holds no input; call forward first");
    }
    const Shape x_shape = cache.q_proj.x.shape(), mem_shape = cache.k_proj.x.shape();
    require_shape(op, "dy", dy, x_shape);
    require_shape(op, "dx", dx, x_shape);
    const bool dmem_given = dmemory.data() != nullptr || dmemory.rank() != 0;
    if (cache.cross) {
      require_shape(op, "dmemory", dmemory, mem_shape);
    } else if (dmem_given) {
      std::string m = op;
      m += ": dmemory must be empty for self-attention (dx receives the key and value gradients), got shape ";
      m += dmemory.shape().to_string();
      throw ShapeError(m);
    }
    const std::int64_t C = options_.d_model, H = options_.heads, D = C / H;
    const std::int64_t B = x_shape[0], Tq = x_shape[1], Tk = mem_shape[1];
    cache.dattn.resize({B, Tq, C});
    cache.dq.resize({B, Tq, C});
    cache.dk.resize({B, Tk, C});
    cache.dv.resize({B, Tk, C});
    cache.dprobs.resize({B, H, Tq, Tk});
    o_proj_.backward(ctx, cache.o_proj, dy, cache.dattn);

    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(D));
    const Scalar* q = cache.q.data();
    const Scalar* k = cache.k.data();
    const Scalar* v = cache.v.data();
    const Scalar* probs = cache.probs.data();
    const Scalar* dattn = cache.dattn.data();
    Scalar* dprobs = cache.dprobs.data();
    Scalar* dq = cache.dq.data();
    Scalar* dk = cache.dk.data();
    Scalar* dv = cache.dv.data();
    using backend::cpu::MatrixRef;
    // dP = dO V^T and dV = P^T dO, per (b, h).
    ctx.parallel(B * H, [&](std::int64_t bh) {
      const std::int64_t b = bh / H, h = bh % H;
      const MatrixRef<const Scalar> dO{dattn + b * Tq * C + h * D, Tq, D, C};
      backend::cpu::gemm_serial<Scalar>(MatrixRef<Scalar>{dprobs + bh * Tq * Tk, Tq, Tk, Tk}, dO, Trans::kN,
                                        MatrixRef<const Scalar>{v + b * Tk * C + h * D, Tk, D, C}, Trans::kT, Scalar(1),
                                        Scalar(0));
      backend::cpu::gemm_serial<Scalar>(MatrixRef<Scalar>{dv + b * Tk * C + h * D, Tk, D, C},
                                        MatrixRef<const Scalar>{probs + bh * Tq * Tk, Tq, Tk, Tk}, Trans::kT, dO,
                                        Trans::kN, Scalar(1), Scalar(0));
    });
    // dS = P * (dP - rowsum(dP * P)): zero where P is zero, so masked keys and empty rows pass nothing back.
    Ops<Cpu>::softmax_backward<Scalar>(ctx, cache.dprobs, cache.dprobs, cache.probs);
    // dQ = scale dS K and dK = scale dS^T Q, per (b, h).
    ctx.parallel(B * H, [&](std::int64_t bh) {
      const std::int64_t b = bh / H, h = bh % H;
      const MatrixRef<const Scalar> dS{dprobs + bh * Tq * Tk, Tq, Tk, Tk};
      backend::cpu::gemm_serial<Scalar>(MatrixRef<Scalar>{dq + b * Tq * C + h * D, Tq, D, C}, dS, Trans::kN,
                                        MatrixRef<const Scalar>{k + b * Tk * C + h * D, Tk, D, C}, Trans::kN, scale,
                                        Scalar(0));
      backend::cpu::gemm_serial<Scalar>(MatrixRef<Scalar>{dk + b * Tk * C + h * D, Tk, D, C}, dS, Trans::kT,
                                        MatrixRef<const Scalar>{q + b * Tq * C + h * D, Tq, D, C}, Trans::kN, scale,
                                        Scalar(0));
    });

    cache.dinput.resize(mem_shape);
    q_proj_.backward(ctx, cache.q_proj, cache.dq, dx);
    TensorView<Scalar, Cpu> dmem = cache.cross ? dmemory : dx;
    if (cache.cross) {
      k_proj_.backward(ctx, cache.k_proj, cache.dk, dmem);
    } else {
      k_proj_.backward(ctx, cache.k_proj, cache.dk, cache.dinput);
      Ops<Cpu>::axpy<Scalar>(ctx, dmem, cache.dinput);
    }
    v_proj_.backward(ctx, cache.v_proj, cache.dv, cache.dinput);
    Ops<Cpu>::axpy<Scalar>(ctx, dmem, cache.dinput);
  }

 private:
  static const AttentionOptions& checked(const AttentionOptions& o) {
    if (o.d_model <= 0 || o.heads <= 0 || o.d_model % o.heads != 0) {
      std::string m = "MultiHeadAttention: heads must be positive and divide d_model, got d_model ";
      m += std::to_string(o.d_model);
      m += " and heads ";
      m += std::to_string(o.heads);
      throw ShapeError(m);
    }
    return o;
  }

  void check_step(const char* op, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y,
                  const KvCache<Scalar, Cpu>& kv) const {
    const std::int64_t C = options_.d_model;
    if (x.rank() != 2 || x.dim(1) != C) {
      throw ShapeError(std::string(op) + ": x must be (B, " + std::to_string(C) + "), one token per row, got shape " +
                       x.shape().to_string());
    }
    require_shape(op, "y", y, x.shape());
    if (kv.batch() != x.dim(0) || kv.k.dim(2) != C) {
      throw ShapeError(std::string(op) + ": the key/value cache holds " + kv.k.shape().to_string() + ", expected (" +
                       std::to_string(x.dim(0)) + ", L, " + std::to_string(C) + ") for x " + x.shape().to_string());
    }
  }

  // y (B, C) = o_proj(attention of w.q over the first kv.length positions of kv), keys masked by pad (B, L).
  void attend(CpuContext& ctx, const KvCache<Scalar, Cpu>& kv, const std::int32_t* pad, TensorView<Scalar, Cpu> y,
              AttentionStepWork<Scalar, Cpu>& w) const {
    const std::int64_t C = options_.d_model, H = options_.heads, D = C / H;
    const std::int64_t B = kv.batch(), L = kv.capacity(), n = kv.length;
    w.attn.resize({B, C});
    w.scores.resize({B * H, L});  // one row per (b, h) at the cache's capacity: no reallocation as n grows
    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(D));
    const Scalar* q = w.q.data();
    const Scalar* k = kv.k.data();
    const Scalar* v = kv.v.data();
    Scalar* attn = w.attn.data();
    Scalar* scores = w.scores.data();
    ctx.parallel(B * H, [&](std::int64_t bh) {
      const std::int64_t b = bh / H, h = bh % H;
      const Scalar* qr = q + b * C + h * D;
      Scalar* s = scores + bh * L;
      key_scores(qr, k + b * L * C + h * D, C, n, D, scale, s);
      masked_softmax_row(s, n, n, pad ? pad + b * L : nullptr);
      weighted_sum(s, v + b * L * C + h * D, C, n, D, attn + b * C + h * D);
    });
    o_proj_.forward(ctx, w.attn, y, w.proj);
  }

  // s[j] = scale * q . k_j for the n keys k_j = k + j * ldk, D elements each. Blocks of kLanes keys take one vector
  // accumulator each, and the shuffle tree of the streaming GEMM (fold_all) sums all their lanes at once, so a score
  // costs D / kLanes FMAs and a share of one fold instead of a lane-by-lane sum of its own. The order of every sum is
  // fixed (vector chunks, then the fold, then the D % kLanes tail), so the result is deterministic. Keys past the
  // last whole block go through dot().
  static void key_scores(const Scalar* q, const Scalar* k, std::int64_t ldk, std::int64_t n, std::int64_t D,
                         Scalar scale, Scalar* s) {
    using backend::cpu::detail::load_lanes;
    using V = typename backend::cpu::detail::Lanes<Scalar>::type;
    constexpr int kLanes = backend::cpu::detail::Lanes<Scalar>::kCount;
    const std::int64_t Dv = D / kLanes * kLanes;
    std::int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      V acc[kLanes];
      for (V& a : acc) a = V{};
      for (std::int64_t d = 0; d < Dv; d += kLanes) {
        V qv;
        load_lanes(qv, q + d);
        for (int t = 0; t < kLanes; ++t) {
          V kv;
          load_lanes(kv, k + (j + t) * ldk + d);
          acc[t] += qv * kv;
        }
      }
      backend::cpu::detail::fold_all<kLanes, Scalar>(acc);
      for (int t = 0; t < kLanes; ++t) {
        Scalar sum = acc[0][t];
        for (std::int64_t d = Dv; d < D; ++d) sum += q[d] * k[(j + t) * ldk + d];
        s[j + t] = sum * scale;
      }
    }
    for (; j < n; ++j) s[j] = dot(q, k + j * ldk, D) * scale;
  }

  // o (D) = sum over the n keys of p[j] * v_j, v_j = v + j * ldv, keys with p[j] == 0 skipped. Four vectors of o at
  // a time stay in registers across all the keys (four independent FMA chains), then single vectors, then the
  // D % kLanes tail; each element sums its keys in order.
  static void weighted_sum(const Scalar* p, const Scalar* v, std::int64_t ldv, std::int64_t n, std::int64_t D,
                           Scalar* o) {
    using backend::cpu::detail::load_lanes;
    using V = typename backend::cpu::detail::Lanes<Scalar>::type;
    constexpr int kLanes = backend::cpu::detail::Lanes<Scalar>::kCount;
    auto chunks = [&]<int W>(std::int64_t d) {
      V acc[W];
      for (V& a : acc) a = V{};
      for (std::int64_t j = 0; j < n; ++j) {
        if (p[j] == Scalar(0)) continue;
        const V pj = V{} + p[j];
        for (int w = 0; w < W; ++w) {
          V vv;
          load_lanes(vv, v + j * ldv + d + w * kLanes);
          acc[w] += pj * vv;
        }
      }
      for (int w = 0; w < W; ++w) std::memcpy(o + d + w * kLanes, &acc[w], sizeof(V));
    };
    std::int64_t d = 0;
    for (; d + 4 * kLanes <= D; d += 4 * kLanes) chunks.template operator()<4>(d);
    for (; d + kLanes <= D; d += kLanes) chunks.template operator()<1>(d);
    for (; d < D; ++d) {
      Scalar sum = 0;
      for (std::int64_t j = 0; j < n; ++j) sum += p[j] == Scalar(0) ? Scalar(0) : p[j] * v[j * ldv + d];
      o[d] = sum;
    }
  }

  // x . y over n elements, one vector of lanes at a time, the lanes then summed in order (the scores of keys past
  // the last whole block of kLanes).
  static Scalar dot(const Scalar* x, const Scalar* y, std::int64_t n) {
    using V = typename backend::cpu::detail::Lanes<Scalar>::type;
    constexpr int kLanes = backend::cpu::detail::Lanes<Scalar>::kCount;
    V acc{};
    std::int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      V a, b;
      std::memcpy(&a, x + i, sizeof(V));
      std::memcpy(&b, y + i, sizeof(V));
      acc += a * b;
    }
    Scalar sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += acc[l];
    for (; i < n; ++i) sum += x[i] * y[i];
    return sum;
  }

  // Softmax of s[0, n) in place over the keys j < limit with pad[j] != 0 (all when pad is null); the other
  // entries become 0, and a row with no allowed key becomes all 0.
  static void masked_softmax_row(Scalar* s, std::int64_t n, std::int64_t limit, const std::int32_t* pad) {
    auto allowed = [&](std::int64_t j) { return j < limit && (pad == nullptr || pad[j] != 0); };
    Scalar mx = -std::numeric_limits<Scalar>::infinity();
    bool any = false;
    for (std::int64_t j = 0; j < n; ++j) {
      if (allowed(j)) {
        mx = any && mx >= s[j] ? mx : s[j];
        any = true;
      }
    }
    Scalar sum = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      s[j] = allowed(j) ? std::exp(s[j] - mx) : Scalar(0);
      sum += s[j];
    }
    if (!any) return;
    const Scalar inv = Scalar(1) / sum;
    for (std::int64_t j = 0; j < n; ++j) s[j] *= inv;
  }

  AttentionOptions options_;
  Linear<Scalar, Cpu> q_proj_, k_proj_, v_proj_, o_proj_;  // each (C, C)
};

}  // namespace tmoe::nn
