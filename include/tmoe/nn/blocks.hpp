#pragma once
/// @file blocks.hpp
/// @brief Pre-LN Transformer blocks whose FFN slot is a dense FeedForward or an moe::Layer.
///
///   encoder: h = x + Drop(SelfAttn(LN1(x)));                 y = h + Drop(FFN(LN2(h)))
///   decoder: h1 = x + Drop(CausalSelfAttn(LN1(x)));
///            h2 = h1 + Drop(CrossAttn(LN2(h1), memory));     y = h2 + Drop(FFN(LN3(h2)))
///
/// Gradient rule: backward OVERWRITES dx, ACCUMULATES into dmemory (the encoder output feeds every decoder
/// block) and into every parameter gradient.

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "tmoe/backend/cpu/ops.hpp"
#include "tmoe/moe/layer.hpp"
#include "tmoe/nn/attention.hpp"
#include "tmoe/nn/dropout.hpp"
#include "tmoe/nn/feed_forward.hpp"
#include "tmoe/nn/layer_norm.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::nn {

/// What a block call needs beside its input: masks, task ids and the step's randomness.
struct BlockArgs {
  ConstTensorView<std::int32_t, Cpu> valid{};         ///< (B, T) 1 = token, 0 = padding (self keys, MoE segments)
  ConstTensorView<std::int32_t, Cpu> memory_valid{};  ///< (B, S) 1 = source token (cross-attention keys)
  ConstTensorView<std::int32_t, Cpu> task_ids{};      ///< (B) task per sequence, for task-routed MoE layers
  bool training = false;
  std::uint64_t seed = 0;         ///< Philox key for dropout and random routing
  std::uint64_t rng_offset = 0;   ///< distinct per step and block: dropout sites add 0..3, MoE routing uses it
};

namespace impl {

template <class Ffn>
inline constexpr bool is_moe_layer_v = false;
template <class Cfg, class S>
inline constexpr bool is_moe_layer_v<moe::Layer<Cfg, S, Cpu>> = true;

/// Sizes shared by the blocks of one model.
struct BlockSizes {
  std::int64_t d_model = 0, d_ff = 0, heads = 0, num_tasks = 0, moe_group_size = 0;
  double dropout = 0.0;
  bool ffn_bias = true;  ///< dense FFNs have biases; folded expert FFNs (extract::subnetwork) do not
};

template <class Ffn>
Ffn make_ffn(const BlockSizes& s) {
  if constexpr (is_moe_layer_v<Ffn>) {
    return Ffn(moe::LayerOptions{.d_model = s.d_model, .d_ff = s.d_ff, .num_tasks = s.num_tasks,
                                 .group_size = s.moe_group_size});
  } else {
    return Ffn(FeedForwardOptions{.d_model = s.d_model, .d_ff = s.d_ff, .bias = s.ffn_bias});
  }
}

/// Appends `more` to `out`.
template <class T>
void append(std::vector<T>& out, std::vector<T>&& more) {
  for (auto& m : more) out.push_back(std::move(m));
}

}  // namespace impl

/// What one decoding step needs beside the token states: the rows' masks and tasks.
struct StepBlockArgs {
  ConstTensorView<std::int32_t, Cpu> active{};        ///< (B, 1) 1 = row still decoding; 0 = finished (not routed)
  ConstTensorView<std::int32_t, Cpu> memory_valid{};  ///< (B, S) 1 = source token
  ConstTensorView<std::int32_t, Cpu> task_ids{};      ///< (B)
};

namespace impl {
/// Copies rows `rows[i]` of a (B, ...) tensor into a (rows.size(), ...) one, in place of `t`; only the first
/// `used` elements of each row when `used` >= 0 (a key/value cache's filled positions).
template <class T>
void select_rows(Tensor<T, Cpu>& t, const std::vector<std::int64_t>& rows, Tensor<T, Cpu>& scratch,
                 std::int64_t used = -1) {
  if (t.rank() == 0 || t.numel() == 0) return;
  const std::int64_t B = t.dim(0), row = t.numel() / B, n = static_cast<std::int64_t>(rows.size());
  const std::int64_t copy = used < 0 ? row : std::min(used, row);
  std::int64_t extents[4] = {n, 0, 0, 0};
  for (int d = 1; d < t.rank(); ++d) extents[d] = t.dim(d);
  scratch.resize(Shape::from_extents(extents, t.rank()));
  for (std::int64_t i = 0; i < n; ++i) {
    std::copy_n(t.data() + rows[static_cast<std::size_t>(i)] * row, copy, scratch.data() + i * row);
  }
  std::swap(t, scratch);
}
}  // namespace impl

/// The FFN sub-layer (LN -> FFN -> dropout -> residual), shared by encoder and decoder blocks.
template <class Ffn, class Scalar>
struct FfnSublayer {
  static constexpr bool kMoe = impl::is_moe_layer_v<Ffn>;
  /// Whether the FFN is an MoE layer routed by R.
  template <class R>
  static constexpr bool routes_by() {
    if constexpr (kMoe) {
      return std::is_same_v<typename Ffn::Route, R>;
    } else {
      return false;
    }
  }
  static constexpr bool kSentence = routes_by<route::Sentence>();
  static constexpr bool kTask = routes_by<route::Task>();
  struct Cache {
    LayerNormCache<Scalar, Cpu> ln;
    typename Ffn::Cache ffn;
    DropoutCache drop;
    Tensor<Scalar, Cpu> normed, out;        // (B, T, C)
    Tensor<Scalar, Cpu> d_out, d_normed;    // backward workspaces, reused across steps
  };

  LayerNorm<Scalar, Cpu> ln;
  Ffn ffn;
  Dropout<Scalar, Cpu> drop;

  explicit FfnSublayer(const impl::BlockSizes& s) : ln(s.d_model), ffn(impl::make_ffn<Ffn>(s)), drop(s.dropout) {}

  /// y = x + Drop(FFN(LN(x))). `y` must not alias `x`.
  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, Cache& c,
               const BlockArgs& a, std::uint64_t site) const {
    c.normed.resize(x.shape());
    c.out.resize(x.shape());
    ln.forward(ctx, x, c.normed, c.ln);
    if constexpr (kMoe) {
      moe::Input<Scalar, Cpu> in{.x = c.normed, .segment_ids = a.valid};
      if constexpr (std::is_same_v<typename Ffn::Route, route::Task>) in.task_ids = a.task_ids;
      // Routing draws use the top half of the counter space so they never coincide with dropout masks.
      ffn.forward(ctx, in, c.out, c.ffn,
                  {.training = a.training, .seed = a.seed, .rng_offset = (a.rng_offset + site) | (std::uint64_t{1} << 63)});
    } else {
      ffn.forward(ctx, c.normed, c.out, c.ffn);
    }
    drop.forward(ctx, c.out, y, c.drop, {.training = a.training, .seed = a.seed, .offset = a.rng_offset + site});
    Ops<Cpu>::axpy<Scalar>(ctx, y, x);
  }

  /// Decoding state: the forward caches, reused every step, and for sentence routing the running sum of the
  /// MoE layer's inputs over the prefix (each step routes by the prefix mean; paper-spec 1.3's caveat).
  struct StepState {
    Cache c;
    Tensor<Scalar, Cpu> prefix_sum;                 // (B, C), sentence routing
    Tensor<Scalar, Cpu> repr;                       // (B, C) prefix mean
    Tensor<moe::router_t<Scalar>, Cpu> task_logits;  // (tasks, E), task routing: computed once per decode
    std::int64_t steps = 0;
  };

  /// Starts a decode: a task-routed layer's routing is fixed while its weights are, so every task's router logits
  /// are computed here once instead of at every step.
  void begin_steps(CpuContext& ctx, StepState& st) const {
    st.steps = 0;
    if constexpr (kTask) st.task_logits = ffn.task_logits(ctx);
  }

  /// y (B, C) = x + FFN(LN(x)) for one new token per row, at inference.
  void step(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, StepState& st,
            const StepBlockArgs& a) const {
    const std::int64_t B = x.dim(0), C = x.dim(1);
    Cache& c = st.c;
    c.normed.resize({B, 1, C});
    c.out.resize({B, 1, C});
    ln.forward(ctx, x, c.normed.view().reshape({B, C}), c.ln);
    if constexpr (kMoe) {
      moe::Input<Scalar, Cpu> in{.x = c.normed, .segment_ids = a.active};
      if constexpr (kTask) {
        in.task_ids = a.task_ids;
        in.task_logits = st.task_logits;
      }
      if constexpr (kSentence) {
        if (st.steps == 0 || st.prefix_sum.numel() != B * C) {
          st.prefix_sum.resize({B, C});
          std::fill_n(st.prefix_sum.data(), B * C, Scalar(0));
        }
        ++st.steps;
        st.repr.resize({B, C});
        const Scalar inv = Scalar(1) / static_cast<Scalar>(st.steps);
        for (std::int64_t i = 0; i < B * C; ++i) {
          st.prefix_sum.data()[i] += c.normed.data()[i];
          st.repr.data()[i] = st.prefix_sum.data()[i] * inv;
        }
        in.sentence_repr = st.repr;
      }
      ffn.forward(ctx, in, c.out, c.ffn, {});
    } else {
      ffn.forward(ctx, c.normed, c.out, c.ffn);
    }
    for (std::int64_t i = 0; i < B * C; ++i) y.data()[i] = x.data()[i] + c.out.data()[i];
  }

  /// Keeps rows `rows` of the decoding state (beam search reorders and repeats rows).
  void select_rows(StepState& st, const std::vector<std::int64_t>& rows, Tensor<Scalar, Cpu>& scratch) const {
    if constexpr (kSentence) impl::select_rows(st.prefix_sum, rows, scratch);
  }

  /// dx = dy + d(LN(x)) path; overwrites dx.
  void backward(CpuContext& ctx, Cache& c, ConstTensorView<Scalar, Cpu> dy, TensorView<Scalar, Cpu> dx) {
    c.d_out.resize(dy.shape());
    c.d_normed.resize(dy.shape());
    drop.backward(ctx, c.drop, dy, c.d_out);
    ffn.backward(ctx, c.ffn, c.d_out, c.d_normed);
    ln.backward(ctx, c.ln, c.d_normed, dx);
    Ops<Cpu>::axpy<Scalar>(ctx, dx, dy);
  }

  [[nodiscard]] double aux_loss(const Cache& c) const {
    if constexpr (kMoe) {
      return Ffn::aux_loss(c.ffn);
    } else {
      return 0.0;
    }
  }

  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& p) {
    ParameterRefs<Scalar, Cpu> out = ln.parameter_refs(p + ".ffn_ln");
    impl::append(out, ffn.parameter_refs(p + (kMoe ? ".moe" : ".ffn")));
    return out;
  }

  void init(std::uint64_t seed) { ffn.init(seed); }
};

/// An attention sub-layer (LN -> attention -> dropout -> residual): self (optionally causal) or cross.
template <class Scalar>
struct AttentionSublayer {
  struct Cache {
    LayerNormCache<Scalar, Cpu> ln;
    AttentionCache<Scalar, Cpu> attn;
    DropoutCache drop;
    Tensor<Scalar, Cpu> normed, out;                 // (B, T, C)
    Tensor<Scalar, Cpu> d_out, d_normed, d_memory;   // backward workspaces, reused across steps
  };

  LayerNorm<Scalar, Cpu> ln;
  MultiHeadAttention<Scalar, Cpu> attn;
  Dropout<Scalar, Cpu> drop;
  bool causal = false;
  bool cross = false;

  AttentionSublayer(const impl::BlockSizes& s, bool is_causal, bool is_cross)
      : ln(s.d_model), attn(AttentionOptions{.d_model = s.d_model, .heads = s.heads}), drop(s.dropout),
        causal(is_causal), cross(is_cross) {}

  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, ConstTensorView<Scalar, Cpu> memory,
               TensorView<Scalar, Cpu> y, Cache& c, const BlockArgs& a, std::uint64_t site) const {
    c.normed.resize(x.shape());
    c.out.resize(x.shape());
    ln.forward(ctx, x, c.normed, c.ln);
    AttentionInput<Scalar, Cpu> in{.x = c.normed, .causal = causal};
    if (cross) {
      in.memory = memory;
      in.key_padding = a.memory_valid;
    } else {
      in.key_padding = a.valid;
    }
    attn.forward(ctx, in, c.out, c.attn);
    drop.forward(ctx, c.out, y, c.drop, {.training = a.training, .seed = a.seed, .offset = a.rng_offset + site});
    Ops<Cpu>::axpy<Scalar>(ctx, y, x);
  }

  /// dx overwritten; for cross-attention dmemory accumulates.
  void backward(CpuContext& ctx, Cache& c, ConstTensorView<Scalar, Cpu> dy, TensorView<Scalar, Cpu> dx,
                TensorView<Scalar, Cpu> dmemory) {
    c.d_out.resize(dy.shape());
    c.d_normed.resize(dy.shape());
    drop.backward(ctx, c.drop, dy, c.d_out);
    if (cross) {
      c.d_memory.resize(dmemory.shape());  // attention overwrites its dmemory; the caller's accumulates
      attn.backward(ctx, c.attn, c.d_out, c.d_normed, c.d_memory);
      Ops<Cpu>::axpy<Scalar>(ctx, dmemory, c.d_memory);
    } else {
      attn.backward(ctx, c.attn, c.d_out, c.d_normed);
    }
    ln.backward(ctx, c.ln, c.d_normed, dx);
    Ops<Cpu>::axpy<Scalar>(ctx, dx, dy);
  }

  /// "{block}.{name}_ln.*" and "{block}.{name}.{q,k,v,o}_proj.*".
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& block, const std::string& name) {
    ParameterRefs<Scalar, Cpu> out = ln.parameter_refs(block + "." + name + "_ln");
    impl::append(out, attn.parameter_refs(block + "." + name));
    return out;
  }

  void init(std::uint64_t seed) { attn.init(seed); }
};

/// Pre-LN encoder block: self-attention with key padding, then the FFN slot.
template <class Ffn, class Scalar>
class EncoderBlock {
 public:
  struct Cache {
    typename AttentionSublayer<Scalar>::Cache self;
    typename FfnSublayer<Ffn, Scalar>::Cache ffn;
    Tensor<Scalar, Cpu> h;   // (B, T, C) after the attention residual
    Tensor<Scalar, Cpu> dh;  // backward workspace
  };

  explicit EncoderBlock(const impl::BlockSizes& s) : self_(s, false, false), ffn_(s) {}

  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, Cache& c,
               const BlockArgs& a) const {
    c.h.resize(x.shape());
    self_.forward(ctx, x, {}, c.h, c.self, a, 0);
    ffn_.forward(ctx, c.h, y, c.ffn, a, 1);
  }

  void backward(CpuContext& ctx, Cache& c, ConstTensorView<Scalar, Cpu> dy, TensorView<Scalar, Cpu> dx) {
    c.dh.resize(dy.shape());
    ffn_.backward(ctx, c.ffn, dy, c.dh);
    self_.backward(ctx, c.self, c.dh, dx, {});
  }

  [[nodiscard]] double aux_loss(const Cache& c) const { return ffn_.aux_loss(c.ffn); }

  /// The FFN slot's layer (a FeedForward or an moe::Layer).
  [[nodiscard]] const Ffn& ffn() const noexcept { return ffn_.ffn; }

  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& p) {
    ParameterRefs<Scalar, Cpu> out = self_.parameter_refs(p, "self_attn");
    impl::append(out, ffn_.parameter_refs(p));
    return out;
  }

  void init(std::uint64_t seed) {
    self_.init(seed);
    ffn_.init(seed + 1);
  }

 private:
  AttentionSublayer<Scalar> self_;
  FfnSublayer<Ffn, Scalar> ffn_;
};

/// Pre-LN decoder block: causal self-attention, cross-attention over the encoder output, then the FFN slot.
template <class Ffn, class Scalar>
class DecoderBlock {
 public:
  struct Cache {
    typename AttentionSublayer<Scalar>::Cache self, cross;
    typename FfnSublayer<Ffn, Scalar>::Cache ffn;
    Tensor<Scalar, Cpu> h1, h2;    // (B, T, C) after each residual
    Tensor<Scalar, Cpu> dh1, dh2;  // backward workspaces
  };

  explicit DecoderBlock(const impl::BlockSizes& s) : self_(s, true, false), cross_(s, false, true), ffn_(s) {}

  void forward(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, ConstTensorView<Scalar, Cpu> memory,
               TensorView<Scalar, Cpu> y, Cache& c, const BlockArgs& a) const {
    c.h1.resize(x.shape());
    c.h2.resize(x.shape());
    self_.forward(ctx, x, {}, c.h1, c.self, a, 0);
    cross_.forward(ctx, c.h1, memory, c.h2, c.cross, a, 1);
    ffn_.forward(ctx, c.h2, y, c.ffn, a, 2);
  }

  /// Step-by-step decoding state of one block: its self-attention keys and values so far, the cross-attention
  /// keys and values of the source, and the FFN sub-layer's state.
  struct StepState {
    KvCache<Scalar, Cpu> self, cross;
    AttentionStepWork<Scalar, Cpu> work;
    LayerNormCache<Scalar, Cpu> ln;
    Tensor<Scalar, Cpu> normed, a, h1, h2;  // (B, C)
    typename FfnSublayer<Ffn, Scalar>::StepState ffn;
  };

  /// Prepares decoding of B rows over `memory` (B, S, C), up to `max_steps` target positions.
  void begin_steps(CpuContext& ctx, ConstTensorView<Scalar, Cpu> memory, std::int64_t max_steps,
                   StepState& st) const {
    const std::int64_t B = memory.dim(0), C = memory.dim(2);
    MultiHeadAttention<Scalar, Cpu>::reserve(st.self, B, max_steps, C);
    cross_.attn.project_memory(ctx, memory, st.cross);
    ffn_.begin_steps(ctx, st.ffn);
  }

  /// y (B, C) from the new token's state x (B, C): the last position of forward() on the whole prefix.
  void step(CpuContext& ctx, ConstTensorView<Scalar, Cpu> x, TensorView<Scalar, Cpu> y, StepState& st,
            const StepBlockArgs& a) const {
    const std::int64_t B = x.dim(0), C = x.dim(1);
    for (auto* t : {&st.normed, &st.a, &st.h1, &st.h2}) t->resize({B, C});
    self_.ln.forward(ctx, x, st.normed, st.ln);
    self_.attn.step_self(ctx, st.normed, st.self, st.a, st.work);
    for (std::int64_t i = 0; i < B * C; ++i) st.h1.data()[i] = x.data()[i] + st.a.data()[i];
    cross_.ln.forward(ctx, st.h1, st.normed, st.ln);
    cross_.attn.step_cross(ctx, st.normed, st.cross, a.memory_valid, st.a, st.work);
    for (std::int64_t i = 0; i < B * C; ++i) st.h2.data()[i] = st.h1.data()[i] + st.a.data()[i];
    ffn_.step(ctx, st.h2, y, st.ffn, a);
  }

  /// Keeps rows `rows` (in that order, repeats allowed) of the decoding state.
  void select_rows(StepState& st, const std::vector<std::int64_t>& rows, Tensor<Scalar, Cpu>& scratch) const {
    const std::int64_t filled = st.self.length * st.self.k.dim(2);
    impl::select_rows(st.self.k, rows, scratch, filled);
    impl::select_rows(st.self.v, rows, scratch, filled);
    impl::select_rows(st.cross.k, rows, scratch);
    impl::select_rows(st.cross.v, rows, scratch);
    ffn_.select_rows(st.ffn, rows, scratch);
  }

  /// dx overwritten; dmemory accumulates.
  void backward(CpuContext& ctx, Cache& c, ConstTensorView<Scalar, Cpu> dy, TensorView<Scalar, Cpu> dx,
                TensorView<Scalar, Cpu> dmemory) {
    c.dh1.resize(dy.shape());
    c.dh2.resize(dy.shape());
    ffn_.backward(ctx, c.ffn, dy, c.dh2);
    cross_.backward(ctx, c.cross, c.dh2, c.dh1, dmemory);
    self_.backward(ctx, c.self, c.dh1, dx, {});
  }

  [[nodiscard]] double aux_loss(const Cache& c) const { return ffn_.aux_loss(c.ffn); }

  /// The FFN slot's layer (a FeedForward or an moe::Layer).
  [[nodiscard]] const Ffn& ffn() const noexcept { return ffn_.ffn; }

  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& p) {
    ParameterRefs<Scalar, Cpu> out = self_.parameter_refs(p, "self_attn");
    impl::append(out, cross_.parameter_refs(p, "cross_attn"));
    impl::append(out, ffn_.parameter_refs(p));
    return out;
  }

  void init(std::uint64_t seed) {
    self_.init(seed);
    cross_.init(seed + 1);
    ffn_.init(seed + 2);
  }

 private:
  AttentionSublayer<Scalar> self_;
  AttentionSublayer<Scalar> cross_;
  FfnSublayer<Ffn, Scalar> ffn_;
};

}  // namespace tmoe::nn
