#pragma once
/// @file transformer.hpp
/// @brief nn::Transformer<EncoderPattern, DecoderPattern, Scalar, Device>: the paper's encoder-decoder with an MoE
/// layer in place of every other FFN, each stack routing at its own granularity (paper-spec 1.3, Table 1).
///
/// Data flow: source ids -> shared embedding * sqrt(C) + sinusoidal positions -> dropout -> encoder blocks -> final
/// LN = memory; target input ids -> the same embedding -> decoder blocks (causal self-attention, cross-attention
/// over memory) -> final LN -> logits through the tied embedding (h E^T). Pre-LN blocks, as in GShard.
///
/// @code
/// using Model = tmoe::nn::TokenTask<32>;   // token-routed encoder, task-routed decoder, E = 32, float, Cpu
/// Model model({.vocab_size = 8000, .d_model = 512, .d_ff = 2048, .heads = 8, .encoder_layers = 6,
///              .decoder_layers = 6, .max_length = 128, .dropout = 0.1, .num_tasks = 4});
/// model.init(1);
/// Model::Cache cache;
/// model.forward(ctx, {.source = src, .target_in = tgt_in, .task_ids = tasks}, cache, {.training = true});
/// // cache.logits (B, T, V); backward(ctx, cache, dlogits) accumulates every gradient, aux losses included.
/// @endcode

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "tmoe/core/error.hpp"
#include "tmoe/nn/blocks.hpp"
#include "tmoe/nn/embedding.hpp"
#include "tmoe/nn/positional.hpp"
#include "tmoe/nn/stack.hpp"

namespace tmoe::nn {

/// Run-time sizes of a Transformer. Layer counts are per stack; MoE placement comes from the stack's pattern.
struct TransformerConfig {
  std::int64_t vocab_size = 0;      ///< V, shared by source and target
  std::int64_t d_model = 0;         ///< C
  std::int64_t d_ff = 0;            ///< F, of dense FFNs and of each expert
  std::int64_t heads = 0;           ///< H
  std::int64_t encoder_layers = 0;
  std::int64_t decoder_layers = 0;
  std::int64_t max_length = 0;      ///< longest source or target sequence
  double dropout = 0.0;
  std::int64_t num_tasks = 0;       ///< task-routed stacks: the number of task ids
  std::int64_t moe_group_size = 0;  ///< tokens per capacity group; 0 = the whole batch
  std::int32_t pad_id = 0;          ///< padding token id: masked in attention, never routed, ignored by the loss
  std::int32_t bos_id = 1;          ///< first token of every target input (decoding starts from it)
  std::int32_t eos_id = 2;          ///< end of sequence (decoding stops at it)

  friend bool operator==(const TransformerConfig&, const TransformerConfig&) = default;
};

/// One batch: token ids on the host. The target input is the target shifted right (BOS first).
struct Batch {
  ConstTensorView<std::int32_t, Cpu> source;      ///< (B, S)
  ConstTensorView<std::int32_t, Cpu> target_in;   ///< (B, T)
  ConstTensorView<std::int32_t, Cpu> task_ids{};  ///< (B): target language or language pair, as the user defines
};

/// Per-step switches: training turns on dropout and random routing; seed and step address their draws.
struct StepArgs {
  bool training = false;
  std::uint64_t seed = 0;
  std::uint64_t step = 0;
};

/// Parameter counts from the configuration alone (nothing is allocated).
struct ParameterCount {
  std::int64_t embedding = 0;  ///< the shared token embedding (also the output projection)
  std::int64_t encoder = 0;
  std::int64_t decoder = 0;
  std::int64_t total = 0;
  std::int64_t encoder_extracted = 0;  ///< after extracting one task: task-routed MoE layers keep K experts
  std::int64_t decoder_extracted = 0;
};

namespace impl {
template <class P, class Scalar>
struct moe_ffn {
  using type = FeedForward<Relu, Scalar, Cpu>;  // unused for Dense patterns
};
template <int Every, class Cfg, class Scalar>
struct moe_ffn<MoeEvery<Every, Cfg>, Scalar> {
  using type = moe::Layer<Cfg, Scalar, Cpu>;
};
template <int Every, class Cfg, class Scalar>
struct moe_ffn<FoldedEvery<Every, Cfg>, Scalar> {
  using type = FeedForward<typename Cfg::activation_type, Scalar, Cpu>;  // width K * d_ff, no biases
};

/// Block sizes of a pattern's special (MoE or folded) blocks.
template <class P>
BlockSizes special_sizes(BlockSizes s) {
  if constexpr (P::has_moe && P::folded) {
    s.d_ff *= P::moe_config::top_k;
    s.ffn_bias = false;
  }
  return s;
}

/// Parameters of one stack under `pattern` (exact: matches what the layers allocate).
template <FfnPattern P>
std::int64_t stack_parameters(const TransformerConfig& c, std::int64_t layers, bool decoder, bool extracted) {
  const std::int64_t C = c.d_model, F = c.d_ff;
  const std::int64_t attention = 4 * (C * C + C), norm = 2 * C, dense = C * F + F + F * C + C;
  std::int64_t n = norm;  // final layer norm
  for (std::int64_t i = 0; i < layers; ++i) {
    n += (decoder ? 2 * attention + 3 * norm : attention + 2 * norm);
    if constexpr (P::has_moe) {
      using Cfg = typename P::moe_config;
      if (P::is_moe(i)) {
        const bool task = std::is_same_v<typename Cfg::route_type, route::Task>;
        if ((extracted && task) || P::folded) {
          n += 2 * static_cast<std::int64_t>(Cfg::top_k) * F * C;  // K experts folded into one dense FFN
        } else {
          n += static_cast<std::int64_t>(Cfg::experts) * C + (task ? c.num_tasks * C : 0) +
               2 * static_cast<std::int64_t>(Cfg::experts) * F * C;
        }
        continue;
      }
    }
    n += dense;
  }
  return n;
}
}  // namespace impl

template <FfnPattern EncoderPattern, FfnPattern DecoderPattern, class Scalar, DeviceTag Device>
class Transformer;

template <FfnPattern EncoderPattern, FfnPattern DecoderPattern, class Scalar>
class Transformer<EncoderPattern, DecoderPattern, Scalar, Cpu> {
  using DenseFfn = FeedForward<Relu, Scalar, Cpu>;
  using EncMoeFfn = typename impl::moe_ffn<EncoderPattern, Scalar>::type;
  using DecMoeFfn = typename impl::moe_ffn<DecoderPattern, Scalar>::type;

 public:
  using scalar_type = Scalar;
  using device_type = Cpu;
  using encoder_pattern = EncoderPattern;
  using decoder_pattern = DecoderPattern;
  using EncDense = EncoderBlock<DenseFfn, Scalar>;
  using EncMoe = EncoderBlock<EncMoeFfn, Scalar>;
  using DecDense = DecoderBlock<DenseFfn, Scalar>;
  using DecMoe = DecoderBlock<DecMoeFfn, Scalar>;
  static constexpr bool kNeedsTasks = routes_by_task_v<EncoderPattern> || routes_by_task_v<DecoderPattern>;
  static constexpr std::uint64_t kRngSitesPerBlock = 8;

  /// Everything forward keeps for backward; reused across steps.
  struct Cache {
    Tensor<std::int32_t, Cpu> source_valid, target_valid;  // (B, S), (B, T)
    EmbeddingCache<Cpu> source_embedding, target_embedding;
    SinusoidalPositionsCache source_positions, target_positions;
    DropoutCache source_dropout, target_dropout;
    std::vector<Tensor<Scalar, Cpu>> encoder_states, decoder_states;  // inputs of each block, then its output
    std::vector<typename EncDense::Cache> enc_dense;
    std::vector<typename EncMoe::Cache> enc_moe;
    std::vector<typename DecDense::Cache> dec_dense;
    std::vector<typename DecMoe::Cache> dec_moe;
    LayerNormCache<Scalar, Cpu> encoder_norm, decoder_norm;
    Tensor<Scalar, Cpu> memory, decoder_out;  // (B, S, C), (B, T, C) after the final norms
    EmbeddingProjectCache<Scalar, Cpu> projection;
    Tensor<Scalar, Cpu> logits;  // (B, T, V)
    // Backward workspaces, reused across steps.
    Tensor<Scalar, Cpu> d_decoder_out, d_decoder_state, d_decoder_prev, d_memory, d_encoder_state, d_encoder_prev;
  };

  /// @throws ShapeError for non-positive sizes, H not dividing C, or missing tasks for task routing.
  explicit Transformer(const TransformerConfig& config)
      : config_(validated(config)),
        embedding_(EmbeddingOptions{.vocab_size = config.vocab_size, .d_model = config.d_model,
                                    .scale = std::sqrt(static_cast<double>(config.d_model))}),
        positions_(config.d_model, config.max_length),
        dropout_(config.dropout),
        encoder_norm_(config.d_model),
        decoder_norm_(config.d_model) {
    const impl::BlockSizes sizes{.d_model = config.d_model, .d_ff = config.d_ff, .heads = config.heads,
                                   .num_tasks = config.num_tasks, .moe_group_size = config.moe_group_size,
                                   .dropout = config.dropout};
    for (std::int64_t i = 0; i < config.encoder_layers; ++i) {
      if (EncoderPattern::is_moe(i)) enc_moe_.emplace_back(impl::special_sizes<EncoderPattern>(sizes));
      else enc_dense_.emplace_back(sizes);
    }
    for (std::int64_t i = 0; i < config.decoder_layers; ++i) {
      if (DecoderPattern::is_moe(i)) dec_moe_.emplace_back(impl::special_sizes<DecoderPattern>(sizes));
      else dec_dense_.emplace_back(sizes);
    }
  }

  [[nodiscard]] const TransformerConfig& config() const noexcept { return config_; }

  /// Free-form string metadata saved with the model (io::save_model) and restored by io::load_model; extraction
  /// records the task and the experts it kept here.
  [[nodiscard]] std::map<std::string, std::string>& metadata() noexcept { return metadata_; }
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  /// Block i of the encoder / decoder, for inspection and extraction: the MoE (or folded) block when
  /// Pattern::is_moe(i), otherwise the dense one.
  [[nodiscard]] const EncMoe& encoder_moe_block(std::int64_t i) const { return enc_moe_.at(moe_index<EncoderPattern>(i)); }
  [[nodiscard]] EncMoe& encoder_moe_block(std::int64_t i) { return enc_moe_.at(moe_index<EncoderPattern>(i)); }
  [[nodiscard]] const DecMoe& decoder_moe_block(std::int64_t i) const { return dec_moe_.at(moe_index<DecoderPattern>(i)); }
  [[nodiscard]] DecMoe& decoder_moe_block(std::int64_t i) { return dec_moe_.at(moe_index<DecoderPattern>(i)); }

  /// Initializes every parameter from Philox(seed) (each layer on its own stream).
  void init(std::uint64_t seed) {
    embedding_.init(seed);
    std::uint64_t s = seed + 1000;
    for (auto& b : enc_dense_) b.init(s += 10);
    for (auto& b : enc_moe_) b.init(s += 10);
    for (auto& b : dec_dense_) b.init(s += 10);
    for (auto& b : dec_moe_) b.init(s += 10);
  }

  /// Values and gradients under stable dotted names ("encoder.layers.1.moe.experts.wi", "embedding.weight", ...).
  [[nodiscard]] ParameterRefs<Scalar, Cpu> parameter_refs() {
    ParameterRefs<Scalar, Cpu> out = embedding_.parameter_refs("embedding");
    for (std::int64_t i = 0; i < config_.encoder_layers; ++i) {
      const std::string p = "encoder.layers." + std::to_string(i);
      if (EncoderPattern::is_moe(i)) impl::append(out, enc_moe_[moe_index<EncoderPattern>(i)].parameter_refs(p));
      else impl::append(out, enc_dense_[dense_index<EncoderPattern>(i)].parameter_refs(p));
    }
    impl::append(out, encoder_norm_.parameter_refs("encoder.final_ln"));
    for (std::int64_t i = 0; i < config_.decoder_layers; ++i) {
      const std::string p = "decoder.layers." + std::to_string(i);
      if (DecoderPattern::is_moe(i)) impl::append(out, dec_moe_[moe_index<DecoderPattern>(i)].parameter_refs(p));
      else impl::append(out, dec_dense_[dense_index<DecoderPattern>(i)].parameter_refs(p));
    }
    impl::append(out, decoder_norm_.parameter_refs("decoder.final_ln"));
    return out;
  }

  /// Parameter values by name, for io::save / io::load.
  [[nodiscard]] NamedTensorViews<Scalar> parameters() { return values_of(parameter_refs()); }

  /// Counts from the formula, without allocating (paper-spec 1.6: 6+6 layers, C 512, F 2048, E 32, V 64k gives
  /// an encoder of about 214M and a decoder of about 221M parameters).
  [[nodiscard]] static ParameterCount parameter_count(const TransformerConfig& c) {
    ParameterCount n;
    n.embedding = c.vocab_size * c.d_model;
    n.encoder = impl::stack_parameters<EncoderPattern>(c, c.encoder_layers, false, false);
    n.decoder = impl::stack_parameters<DecoderPattern>(c, c.decoder_layers, true, false);
    n.total = n.embedding + n.encoder + n.decoder;
    n.encoder_extracted = impl::stack_parameters<EncoderPattern>(c, c.encoder_layers, false, true);
    n.decoder_extracted = impl::stack_parameters<DecoderPattern>(c, c.decoder_layers, true, true);
    return n;
  }

  /// Fills cache.logits (B, T, V).
  /// @throws ShapeError naming the argument for: mismatched batch sizes, a sequence longer than max_length, a
  ///         token id outside [0, V), a task id outside [0, num_tasks) or missing task ids.
  void forward(CpuContext& ctx, const Batch& batch, Cache& c, const StepArgs& args = {}) const {
    validate(batch);
    const std::int64_t B = batch.source.dim(0), T = batch.target_in.dim(1);
    const std::int64_t C = config_.d_model, V = config_.vocab_size;
    valid_mask(batch.target_in, c.target_valid);
    const std::uint64_t base = args.step * kRngSitesPerBlock * static_cast<std::uint64_t>(
                                   config_.encoder_layers + config_.decoder_layers + 1);
    encode(ctx, batch.source, batch.task_ids, c, args, base);

    // Decoder.
    c.decoder_states.resize(static_cast<std::size_t>(config_.decoder_layers + 1));
    embed(ctx, batch.target_in, c.decoder_states[0], c.target_embedding, c.target_positions, c.target_dropout, args,
          base + 1);
    c.dec_dense.resize(dec_dense_.size());
    c.dec_moe.resize(dec_moe_.size());
    for (std::int64_t i = 0; i < config_.decoder_layers; ++i) {
      const BlockArgs a{.valid = c.target_valid, .memory_valid = c.source_valid, .task_ids = batch.task_ids,
                        .training = args.training, .seed = args.seed,
                        .rng_offset = base + kRngSitesPerBlock *
                                                 static_cast<std::uint64_t>(config_.encoder_layers + i + 1)};
      auto& in = c.decoder_states[static_cast<std::size_t>(i)];
      auto& out = c.decoder_states[static_cast<std::size_t>(i + 1)];
      out.resize({B, T, C});
      if (DecoderPattern::is_moe(i)) {
        const auto k = moe_index<DecoderPattern>(i);
        dec_moe_[k].forward(ctx, in, c.memory, out, c.dec_moe[k], a);
      } else {
        const auto k = dense_index<DecoderPattern>(i);
        dec_dense_[k].forward(ctx, in, c.memory, out, c.dec_dense[k], a);
      }
    }
    c.decoder_out.resize({B, T, C});
    decoder_norm_.forward(ctx, c.decoder_states.back(), c.decoder_out, c.decoder_norm);
    c.logits.resize({B, T, V});
    embedding_.project(ctx, c.decoder_out, c.logits, c.projection);
  }

  /// Step-by-step decoding state: the encoder's output and caches, every decoder block's key/value caches, and
  /// the rows' masks and tasks. Reused across sources; begin_decode resets it.
  struct DecodeState {
    std::int64_t batch = 0;      ///< B rows (sequences, or sequences x beams)
    std::int64_t steps = 0;      ///< target positions decoded so far
    std::int64_t max_steps = 0;  ///< positions reserved in the key/value caches
    Tensor<std::int32_t, Cpu> task_ids;  ///< (B)
    Tensor<std::int32_t, Cpu> active;    ///< (B, 1): 1 = still decoding; 0 = finished, its token is not routed
    Cache encoder;                       ///< encoder caches; encoder.source_valid (B, S) masks cross-attention.
                                         ///< select_rows keeps only source_valid in step: the rest (memory
                                         ///< included) still describes begin_decode's batch
    std::vector<typename DecDense::StepState> dense;
    std::vector<typename DecMoe::StepState> moe;
    // Workspaces.
    Tensor<std::int32_t, Cpu> ids;  // (B, 1)
    Tensor<Scalar, Cpu> x, y;       // (B, 1, C) block input and output
    Tensor<Scalar, Cpu> out;        // (B, C) after the final norm
    EmbeddingCache<Cpu> emb;
    SinusoidalPositionsCache pos;
    LayerNormCache<Scalar, Cpu> norm;
    EmbeddingProjectCache<Scalar, Cpu> proj;
    Tensor<Scalar, Cpu> scratch;
    Tensor<std::int32_t, Cpu> iscratch;
  };

  /// Runs the encoder on `source` (B, S) and prepares decoding of up to `max_steps` target positions. Task ids
  /// (B) are needed when a stack routes by task, ignored otherwise.
  /// @throws ShapeError as forward() does for the source and task ids, or if max_steps is not in [1, max_length].
  void begin_decode(CpuContext& ctx, ConstTensorView<std::int32_t, Cpu> source,
                    ConstTensorView<std::int32_t, Cpu> task_ids, std::int64_t max_steps, DecodeState& st) const {
    const std::string op = "Transformer::begin_decode";
    if (source.rank() != 2) {
      throw ShapeError(op + ": source must be (B, S) token ids, got " + source.shape().to_string());
    }
    if (max_steps < 1 || max_steps > config_.max_length) {
      throw ShapeError(op + ": max_steps " + std::to_string(max_steps) + " is outside [1, max_length " +
                       std::to_string(config_.max_length) + "]");
    }
    const std::int64_t B = source.dim(0);
    validate_source(op, source);
    validate_tasks(op, task_ids, B);
    st.batch = B;
    st.steps = 0;
    st.max_steps = max_steps;
    st.task_ids.resize({B});
    if (kNeedsTasks) std::copy_n(task_ids.data(), B, st.task_ids.data());
    st.active.resize({B, 1});
    std::fill_n(st.active.data(), B, 1);
    encode(ctx, source, kNeedsTasks ? st.task_ids.cview() : ConstTensorView<std::int32_t, Cpu>{}, st.encoder, {}, 0);
    st.dense.resize(dec_dense_.size());
    st.moe.resize(dec_moe_.size());
    for (std::size_t k = 0; k < dec_dense_.size(); ++k) dec_dense_[k].begin_steps(ctx, st.encoder.memory, max_steps, st.dense[k]);
    for (std::size_t k = 0; k < dec_moe_.size(); ++k) dec_moe_[k].begin_steps(ctx, st.encoder.memory, max_steps, st.moe[k]);
  }

  /// Decodes one position: `tokens` (B) are the rows' current inputs (BOS first); writes `logits` (B, V) for the
  /// next token. Equal to forward() on the whole prefix at its last position (exactly so for dense, task-routed
  /// and token-routed layers whose capacity drops nothing; sentence-routed layers route by the prefix mean). A
  /// token-routed layer's capacity group here is the step's B tokens; `DroplessTokenStack` never drops.
  /// @throws ShapeError for a wrong shape, a token id outside the vocabulary, or no position left.
  void decode_step(CpuContext& ctx, DecodeState& st, ConstTensorView<std::int32_t, Cpu> tokens,
                   TensorView<Scalar, Cpu> logits) const {
    const std::string op = "Transformer::decode_step";
    const std::int64_t B = st.batch, C = config_.d_model, V = config_.vocab_size;
    require_shape(op, "tokens", tokens, Shape{B});
    require_shape(op, "logits", logits, Shape{B, V});
    if (st.steps >= st.max_steps) {
      throw ShapeError(op + ": all " + std::to_string(st.max_steps) + " reserved positions are decoded");
    }
    st.ids.resize({B, 1});
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int32_t t = tokens.data()[b];
      if (t < 0 || t >= V) {
        throw ShapeError(op + ": token id " + std::to_string(t) + " of row " + std::to_string(b) +
                         " is outside the vocabulary [0, " + std::to_string(V) + ")");
      }
      st.ids.data()[b] = t;
    }
    st.x.resize({B, 1, C});
    st.y.resize({B, 1, C});
    embedding_.forward(ctx, st.ids, st.x, st.emb);
    positions_.forward(ctx, st.x, st.x, st.pos, st.steps);
    const StepBlockArgs a{.active = st.active, .memory_valid = st.encoder.source_valid, .task_ids = st.task_ids};
    for (std::int64_t i = 0; i < config_.decoder_layers; ++i) {
      const auto in = st.x.view().reshape({B, C});
      auto out = st.y.view().reshape({B, C});
      if (DecoderPattern::is_moe(i)) {
        const auto k = moe_index<DecoderPattern>(i);
        dec_moe_[k].step(ctx, in, out, st.moe[k], a);
      } else {
        const auto k = dense_index<DecoderPattern>(i);
        dec_dense_[k].step(ctx, in, out, st.dense[k], a);
      }
      std::swap(st.x, st.y);
    }
    st.out.resize({B, C});
    decoder_norm_.forward(ctx, st.x.view().reshape({B, C}), st.out, st.norm);
    embedding_.project(ctx, st.out, logits, st.proj);
    ++st.steps;
  }

  /// Keeps rows `rows` of the state, in that order; rows may repeat (beam search expands and reorders beams).
  /// @throws ShapeError if a row is outside [0, B).
  void select_rows(DecodeState& st, const std::vector<std::int64_t>& rows) const {
    for (const std::int64_t r : rows) {
      if (r < 0 || r >= st.batch) {
        throw ShapeError("Transformer::select_rows: row " + std::to_string(r) + " is outside [0, " +
                         std::to_string(st.batch) + ")");
      }
    }
    impl::select_rows(st.task_ids, rows, st.iscratch);
    impl::select_rows(st.active, rows, st.iscratch);
    impl::select_rows(st.encoder.source_valid, rows, st.iscratch);
    for (std::size_t k = 0; k < dec_dense_.size(); ++k) dec_dense_[k].select_rows(st.dense[k], rows, st.scratch);
    for (std::size_t k = 0; k < dec_moe_.size(); ++k) dec_moe_[k].select_rows(st.moe[k], rows, st.scratch);
    st.batch = static_cast<std::int64_t>(rows.size());
  }

 private:
  // Encoder: source ids -> c.memory (B, S, C), filling c.source_valid and the encoder caches.
  void encode(CpuContext& ctx, ConstTensorView<std::int32_t, Cpu> source, ConstTensorView<std::int32_t, Cpu> task_ids,
              Cache& c, const StepArgs& args, std::uint64_t base) const {
    const std::int64_t B = source.dim(0), S = source.dim(1), C = config_.d_model;
    valid_mask(source, c.source_valid);
    c.encoder_states.resize(static_cast<std::size_t>(config_.encoder_layers + 1));
    embed(ctx, source, c.encoder_states[0], c.source_embedding, c.source_positions, c.source_dropout, args, base);
    c.enc_dense.resize(enc_dense_.size());
    c.enc_moe.resize(enc_moe_.size());
    for (std::int64_t i = 0; i < config_.encoder_layers; ++i) {
      const BlockArgs a{.valid = c.source_valid, .task_ids = task_ids, .training = args.training,
                        .seed = args.seed, .rng_offset = base + kRngSitesPerBlock * static_cast<std::uint64_t>(i + 1)};
      auto& in = c.encoder_states[static_cast<std::size_t>(i)];
      auto& out = c.encoder_states[static_cast<std::size_t>(i + 1)];
      out.resize({B, S, C});
      if (EncoderPattern::is_moe(i)) {
        const auto k = moe_index<EncoderPattern>(i);
        enc_moe_[k].forward(ctx, in, out, c.enc_moe[k], a);
      } else {
        const auto k = dense_index<EncoderPattern>(i);
        enc_dense_[k].forward(ctx, in, out, c.enc_dense[k], a);
      }
    }
    c.memory.resize({B, S, C});
    encoder_norm_.forward(ctx, c.encoder_states.back(), c.memory, c.encoder_norm);
  }

 public:

  /// Sum of the MoE layers' auxiliary losses (coefficients included) of the last forward.
  [[nodiscard]] double aux_loss(const Cache& c) const {
    double a = 0;
    for (std::size_t k = 0; k < enc_moe_.size(); ++k) a += enc_moe_[k].aux_loss(c.enc_moe[k]);
    for (std::size_t k = 0; k < dec_moe_.size(); ++k) a += dec_moe_[k].aux_loss(c.dec_moe[k]);
    return a;
  }

  /// Backward from dlogits (B, T, V) through the whole model, plus the gradient of aux_loss(cache). Every parameter
  /// gradient accumulates.
  void backward(CpuContext& ctx, Cache& c, ConstTensorView<Scalar, Cpu> dlogits) {
    require_shape("Transformer::backward", "dlogits", dlogits, c.logits.shape());
    const Shape dec_shape = c.decoder_out.shape(), enc_shape = c.memory.shape();
    for (auto* t : {&c.d_decoder_out, &c.d_decoder_state, &c.d_decoder_prev}) t->resize(dec_shape);
    for (auto* t : {&c.d_memory, &c.d_encoder_state, &c.d_encoder_prev}) t->resize(enc_shape);
    Tensor<Scalar, Cpu>& d_state = c.d_decoder_state;
    Tensor<Scalar, Cpu>& d_prev = c.d_decoder_prev;
    embedding_.project_backward(ctx, c.projection, dlogits, c.d_decoder_out);
    decoder_norm_.backward(ctx, c.decoder_norm, c.d_decoder_out, d_state);
    std::fill_n(c.d_memory.data(), c.d_memory.numel(), Scalar(0));  // accumulates over decoder blocks
    for (std::int64_t i = config_.decoder_layers - 1; i >= 0; --i) {
      if (DecoderPattern::is_moe(i)) {
        const auto k = moe_index<DecoderPattern>(i);
        dec_moe_[k].backward(ctx, c.dec_moe[k], d_state, d_prev, c.d_memory);
      } else {
        const auto k = dense_index<DecoderPattern>(i);
        dec_dense_[k].backward(ctx, c.dec_dense[k], d_state, d_prev, c.d_memory);
      }
      std::swap(d_state, d_prev);
    }
    unembed(ctx, d_state, c.target_embedding, c.target_positions, c.target_dropout);

    Tensor<Scalar, Cpu>& e_state = c.d_encoder_state;
    Tensor<Scalar, Cpu>& e_prev = c.d_encoder_prev;
    encoder_norm_.backward(ctx, c.encoder_norm, c.d_memory, e_state);
    for (std::int64_t i = config_.encoder_layers - 1; i >= 0; --i) {
      if (EncoderPattern::is_moe(i)) {
        const auto k = moe_index<EncoderPattern>(i);
        enc_moe_[k].backward(ctx, c.enc_moe[k], e_state, e_prev);
      } else {
        const auto k = dense_index<EncoderPattern>(i);
        enc_dense_[k].backward(ctx, c.enc_dense[k], e_state, e_prev);
      }
      std::swap(e_state, e_prev);
    }
    unembed(ctx, e_state, c.source_embedding, c.source_positions, c.source_dropout);
  }

 private:
  template <class P>
  static std::size_t moe_index(std::int64_t i) {
    if constexpr (P::has_moe) {
      return static_cast<std::size_t>(i / P::every);
    } else {
      return static_cast<std::size_t>(i);  // never used: Dense has no MoE blocks
    }
  }
  template <class P>
  static std::size_t dense_index(std::int64_t i) {
    if constexpr (P::has_moe) {
      return static_cast<std::size_t>(i - (i + 1) / P::every);
    } else {
      return static_cast<std::size_t>(i);
    }
  }

  static TransformerConfig validated(const TransformerConfig& c) {
    const std::string op = "Transformer";
    if (c.vocab_size <= 0 || c.d_model <= 0 || c.d_ff <= 0 || c.heads <= 0 || c.max_length <= 0 ||
        c.encoder_layers < 0 || c.decoder_layers < 0) {
      throw ShapeError(op + ": vocab_size, d_model, d_ff, heads and max_length must be positive and layer counts "
                       "non-negative; got vocab_size " + std::to_string(c.vocab_size) + ", d_model " +
                       std::to_string(c.d_model) + ", d_ff " + std::to_string(c.d_ff) + ", heads " +
                       std::to_string(c.heads) + ", max_length " + std::to_string(c.max_length) +
                       ", encoder_layers " + std::to_string(c.encoder_layers) + ", decoder_layers " +
                       std::to_string(c.decoder_layers));
    }
    if (kNeedsTasks && c.num_tasks <= 0) {
      throw ShapeError(op + ": a task-routed stack needs num_tasks >= 1, got " + std::to_string(c.num_tasks));
    }
    if (c.bos_id < 0 || c.bos_id >= c.vocab_size || c.eos_id < 0 || c.eos_id >= c.vocab_size) {
      throw ShapeError(op + ": bos_id " + std::to_string(c.bos_id) + " and eos_id " + std::to_string(c.eos_id) +
                       " must be in the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
    }
    if (c.pad_id < 0 || c.pad_id >= c.vocab_size) {
      throw ShapeError(op + ": pad_id " + std::to_string(c.pad_id) + " is outside the vocabulary [0, " +
                       std::to_string(c.vocab_size) + ")");
    }
    return c;
  }

  void validate(const Batch& b) const {
    const std::string op = "Transformer::forward";
    if (b.source.rank() != 2 || b.target_in.rank() != 2) {
      throw ShapeError(op + ": source and target_in must be (B, S) and (B, T) token ids, got source " +
                       b.source.shape().to_string() + " and target_in " + b.target_in.shape().to_string());
    }
    const std::int64_t B = b.source.dim(0);
    if (b.target_in.dim(0) != B) {
      throw ShapeError(op + ": source has " + std::to_string(B) + " sequences but target_in has " +
                       std::to_string(b.target_in.dim(0)) + "; the batch sizes must match");
    }
    validate_source(op, b.source);
    check_ids(op, "target_in", b.target_in);
    validate_tasks(op, b.task_ids, B);
  }

  void check_ids(const std::string& op, const char* what, ConstTensorView<std::int32_t, Cpu> ids) const {
    if (ids.dim(1) > config_.max_length) {
      throw ShapeError(op + ": " + what + " length " + std::to_string(ids.dim(1)) + " exceeds max_length " +
                       std::to_string(config_.max_length));
    }
    for (std::int64_t i = 0; i < ids.numel(); ++i) {
      const std::int32_t t = ids.data()[i];
      if (t < 0 || t >= config_.vocab_size) {
        throw ShapeError(op + ": " + what + " token id " + std::to_string(t) + " at (row " +
                         std::to_string(i / ids.dim(1)) + ", position " + std::to_string(i % ids.dim(1)) +
                         ") is outside the vocabulary [0, " + std::to_string(config_.vocab_size) + ")");
      }
    }
  }

  void validate_source(const std::string& op, ConstTensorView<std::int32_t, Cpu> source) const {
    check_ids(op, "source", source);
  }

  void validate_tasks(const std::string& op, ConstTensorView<std::int32_t, Cpu> task_ids, std::int64_t B) const {
    if constexpr (kNeedsTasks) {
      if (task_ids.rank() != 1 || task_ids.dim(0) != B) {
        throw ShapeError(op + ": task routing needs task_ids of shape (" + std::to_string(B) + "), got " +
                         task_ids.shape().to_string());
      }
      for (std::int64_t i = 0; i < B; ++i) {
        const std::int32_t t = task_ids.data()[i];
        if (t < 0 || t >= config_.num_tasks) {
          throw ShapeError(op + ": task id " + std::to_string(t) + " of row " + std::to_string(i) +
                           " is unknown; expected an id in [0, " + std::to_string(config_.num_tasks) + ")");
        }
      }
    }
  }

  void valid_mask(ConstTensorView<std::int32_t, Cpu> ids, Tensor<std::int32_t, Cpu>& mask) const {
    mask.resize(ids.shape());
    for (std::int64_t i = 0; i < ids.numel(); ++i) mask.data()[i] = ids.data()[i] == config_.pad_id ? 0 : 1;
  }

  // out (B, T, C) = Dropout(scale * E[ids] + positions), each stage in place.
  void embed(CpuContext& ctx, ConstTensorView<std::int32_t, Cpu> ids, Tensor<Scalar, Cpu>& out,
             EmbeddingCache<Cpu>& ec, SinusoidalPositionsCache& pc, DropoutCache& dc, const StepArgs& args,
             std::uint64_t offset) const {
    out.resize({ids.dim(0), ids.dim(1), config_.d_model});
    embedding_.forward(ctx, ids, out, ec);
    positions_.forward(ctx, out, out, pc);
    dropout_.forward(ctx, out, out, dc, {.training = args.training, .seed = args.seed, .offset = offset});
  }

  // Backward of embed, in place on d (a workspace the caller no longer needs), into the embedding's gradient.
  void unembed(CpuContext& ctx, Tensor<Scalar, Cpu>& d, const EmbeddingCache<Cpu>& ec,
               const SinusoidalPositionsCache& pc, const DropoutCache& dc) {
    dropout_.backward(ctx, dc, d, d);
    positions_.backward(ctx, pc, d, d);
    embedding_.backward(ctx, ec, d);
  }

  TransformerConfig config_;
  std::map<std::string, std::string> metadata_;
  Embedding<Scalar, Cpu> embedding_;
  SinusoidalPositions<Scalar, Cpu> positions_;
  Dropout<Scalar, Cpu> dropout_;
  std::vector<EncDense> enc_dense_;
  std::vector<EncMoe> enc_moe_;
  std::vector<DecDense> dec_dense_;
  std::vector<DecMoe> dec_moe_;
  LayerNorm<Scalar, Cpu> encoder_norm_, decoder_norm_;
};

/// The paper's encoder/decoder routing combinations (paper-spec Table 1), MoE in every other block, top-2.
/// Token-routed stacks use capacity 2S/E; task-routed stacks are dropless (a task would overflow its top-1 expert).
template <int E>
using TokenStack = MoeEvery<2, moe::Config<route::Token, Experts<E>, TopK<2>, CapacityFactor<2>>>;
template <int E>
using SentenceStack = MoeEvery<2, moe::Config<route::Sentence, Experts<E>, TopK<2>, CapacityFactor<2>>>;
template <int E>
using TaskStack = MoeEvery<2, moe::Config<route::Task, Experts<E>, TopK<2>, Dropless>>;
/// Token routing without a capacity limit, for serving. In step decoding a token-routed layer's capacity group is one
/// step's batch, so TokenStack's 2S/E leaves 2B/E slots per expert (0.5 at B = 8, E = 32, raised to the minimum of 1)
/// and drops tokens a dropless layer computes: with an untrained router, bench/decode_throughput counted 24% to 33% of
/// the top-2 rows kept from batch 8 up.
template <int E>
using DroplessTokenStack = MoeEvery<2, moe::Config<route::Token, Experts<E>, TopK<2>, Dropless>>;

template <class Scalar = float, DeviceTag Device = Cpu>
using DenseTransformer = Transformer<Dense, Dense, Scalar, Device>;
template <int E, class Scalar = float, DeviceTag Device = Cpu>
using TokenToken = Transformer<TokenStack<E>, TokenStack<E>, Scalar, Device>;
template <int E, class Scalar = float, DeviceTag Device = Cpu>
using SentenceSentence = Transformer<SentenceStack<E>, SentenceStack<E>, Scalar, Device>;
template <int E, class Scalar = float, DeviceTag Device = Cpu>
using TaskTask = Transformer<TaskStack<E>, TaskStack<E>, Scalar, Device>;
template <int E, class Scalar = float, DeviceTag Device = Cpu>
using TaskToken = Transformer<TaskStack<E>, TokenStack<E>, Scalar, Device>;
/// The paper's best: token routing in the encoder, task (e.g. target-language) routing in the decoder.
template <int E, class Scalar = float, DeviceTag Device = Cpu>
using TokenTask = Transformer<TokenStack<E>, TaskStack<E>, Scalar, Device>;

}  // namespace tmoe::nn
