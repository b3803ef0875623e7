#pragma once
/// @file layer.hpp
/// @brief moe::Layer<Config, Scalar, Device>: the MoE feed-forward layer at token, sentence or task granularity.
///
/// Pipeline (DESIGN section 4): router logits in the router precision (float, or double for double models) ->
/// softmax -> top-k gate with capacity (gate.hpp) -> permutation into expert-contiguous rows by a stable counting
/// sort with k-major numbering -> expert FFNs over contiguous blocks (experts.hpp) -> combine in a fixed order,
/// no atomics.
///
/// Task routing with Dropless capacity and no random second expert has no permutation stage: each task's tokens
/// form one contiguous range (the batch's own order when tasks are already contiguous, otherwise one stable
/// counting sort by task), and the range runs through K dense FFN calls of its experts.
///
/// Parameters (DESIGN section 6 names, relative to the layer's prefix):
///   gate.weight     (E, C)       router projection, no bias
///   task_embedding  (tasks, C)   task routing only
///   experts.wi      (E, F, C)    [out, in] per expert
///   experts.wo      (E, C, F)
///
/// @code
/// using Cfg = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<8>, tmoe::TopK<2>, tmoe::CapacityFactor<5, 4>>;
/// tmoe::CpuContext ctx{2};
/// tmoe::moe::Layer<Cfg, float, tmoe::Cpu> layer({.d_model = 64, .d_ff = 256});
/// layer.init(/*seed=*/1);
/// tmoe::Tensor<float, tmoe::Cpu> x({4, 16, 64}), y({4, 16, 64});
/// tmoe::moe::Layer<Cfg, float, tmoe::Cpu>::Cache cache;
/// layer.forward(ctx, {.x = x}, y, cache);
/// // cache.plan.expert, cache.plan.gate, cache.plan.dropped() ... say what went where.
/// @endcode

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "tmoe/backend/cpu/ops.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/random.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/moe/config.hpp"
#include "tmoe/moe/experts.hpp"
#include "tmoe/moe/gate.hpp"
#include "tmoe/moe/router.hpp"
#include "tmoe/moe/routing_plan.hpp"
#include "tmoe/nn/parameter.hpp"

namespace tmoe::moe {

/// Router precision: float for float (and lower) activations, double for double.
template <class Scalar>
using router_t = std::conditional_t<std::is_same_v<Scalar, double>, double, float>;

/// Run-time sizes of a layer.
struct LayerOptions {
  std::int64_t d_model = 0;     ///< C
  std::int64_t d_ff = 0;        ///< F, per expert
  std::int64_t num_tasks = 0;   ///< task routing: rows of the task embedding
  std::int64_t group_size = 0;  ///< S: tokens per capacity/aux group; 0 = the whole call is one group
};

/// Checks a layer's sizes. @throws ShapeError for non-positive sizes, a negative group size or, for task routing,
/// no tasks.
inline void check_layer_options(const LayerOptions& options, bool task_routing) {
  const char* op = "moe::Layer";
  if (options.d_model <= 0 || options.d_ff <= 0) {
    throw ShapeError(std::string(op) + ": d_model and d_ff must be positive, got d_model " +
                     std::to_string(options.d_model) + " and d_ff " + std::to_string(options.d_ff));
  }
  if (task_routing && options.num_tasks <= 0) {
    throw ShapeError(std::string(op) + ": task routing needs num_tasks >= 1, got " + std::to_string(options.num_tasks));
  }
  if (options.group_size < 0) {
    throw ShapeError(std::string(op) + ": group_size must be >= 0 (0 = whole batch), got " +
                     std::to_string(options.group_size));
  }
}

/// Task ids of shape (B) for B rows are per row; any other accepted shape holds one id per token.
template <DeviceTag Device>
bool task_ids_per_token(const ConstTensorView<std::int32_t, Device>& task_ids, std::int64_t rows) noexcept {
  return !(task_ids.rank() == 1 && task_ids.dim(0) == rows);
}

/// One call's input.
template <class Scalar, DeviceTag Device>
struct Input {
  ConstTensorView<Scalar, Device> x;                    ///< (B, T, C); a rank-2 (N, C) input is one row
  ConstTensorView<std::int32_t, Device> segment_ids{};  ///< optional (B, T): 0 = padding, > 0 = sequence in row
  ConstTensorView<std::int32_t, Device> task_ids{};     ///< task routing: (B) per row, or (B, T) per token
  /// Sentence routing, inference only: (B, C) the representation each row routes by, in place of the mean of its
  /// tokens. Step-by-step decoding passes the mean of the layer's inputs over the prefix decoded so far (the
  /// sentence mean cannot be causal otherwise; paper-spec 1.3). A forward given it cannot be followed by backward.
  ConstTensorView<Scalar, Device> sentence_repr{};
  /// Task routing, inference only: (num_tasks, E) every task's router logits, as Layer::task_logits returns them.
  /// A task's routing does not depend on the input, so a caller that runs many inference calls between weight
  /// updates (a decoder, a server) computes them once and the layer skips its gate projection, which reads the whole
  /// E x d_model gate on every call. The result is bit for bit the same as without them, as long as they were
  /// computed from the current weights: compute them again after every update (tmoe's decoding does, per batch).
  ConstTensorView<router_t<Scalar>, Device> task_logits{};
  /// Task routing on the GPU only: the same ids as task_ids, already on the host. The task path then reads nothing
  /// back from the device (a small batch of one task runs without synchronizing). Every id here must be a valid
  /// task, padding included. The CPU layer ignores it.
  ConstTensorView<std::int32_t, Cpu> host_task_ids{};
};

/// Input::task_logits of a call to a layer routed by Route, checked; nullptr when the call brings none.
/// @throws Error when given to a layer that does not route by task or to a training call; ShapeError when not
///         (tasks, experts).
template <class Route, class Scalar, DeviceTag Device>
const router_t<Scalar>* checked_task_logits(const Input<Scalar, Device>& in, bool training, std::int64_t tasks,
                                            std::int64_t experts) {
  const char* op = "moe::Layer::forward";
  if (in.task_logits.data() == nullptr && in.task_logits.rank() == 0) return nullptr;
  if constexpr (!std::is_same_v<Route, route::Task>) {
    throw Error(std::string(op) + ": Input::task_logits is for task-routed layers; this one routes by " +
                Route::name);
  }
  if (training) {
    throw Error(std::string(op) + ": Input::task_logits is for inference; training computes the logits from the "
                "weights it updates");
  }
  require_shape(op, "task_logits", in.task_logits, Shape{tasks, experts});
  return in.task_logits.data();
}

/// One task's routing decision in a task-routed layer: its K experts (best first) and their combine weights.
template <class Real, int K>
struct TaskRoute {
  std::array<std::int32_t, K> experts{};
  std::array<Real, K> weights{};
};

/// Per-call switches: training enables the random second-expert policy; seed and offset address its draws.
using ForwardArgs = GateArgs;

template <class Config, class Scalar, DeviceTag Device>
class Layer;

/// What forward leaves for inspection and for backward.
template <class Scalar, DeviceTag Device>
struct LayerCache {
  using Real = router_t<Scalar>;
  RoutingPlan<Real, Device> plan;
  Tensor<std::int32_t, Device> gate_row;  // (N) gate row per token; -1 = padding
  Tensor<Real, Device> gate_input;        // (G, C) sentence means (sentence routing only)
  Tensor<Real, Device> logits;            // (G, E)
  Tensor<Real, Device> probs;             // (G, E)
  Tensor<Scalar, Device> dispatched;      // (R, C) expert-contiguous inputs (permuted path)
  Tensor<Scalar, Device> hidden;          // (R, F) permuted path; (K, N', F) task path, N' = routed tokens
  Tensor<Scalar, Device> pre;             // pre-activation, same shape as hidden, kept when training
  Tensor<Scalar, Device> expert_out;      // (R, C) permuted path
  bool task_path = false;                 // the task path ran (no permutation)
  std::vector<std::int64_t> task_order;   // task path: tokens in task-contiguous order (empty = identity)
  std::vector<std::int64_t> task_range;   // task path: (begin, end, task) triples over that order
  Tensor<Scalar, Device> task_x;          // task path: gathered inputs when tasks were not contiguous
  Tensor<Scalar, Device> task_y;          // task path: outputs in task order, before scattering back
  Tensor<std::int64_t, Device> task_order_device;  // CUDA task path: task_order on the device (for backward)
  ConstTensorView<Scalar, Device> x;      // the forward input; it must outlive backward (llm.c style)
  bool training = false;                  // forward ran in training mode (pre-activations kept if needed)
  bool sentence_override = false;         // sentence routing ran on Input::sentence_repr (no backward)
  // Backward workspaces, reused across calls.
  Tensor<Scalar, Device> d_expert_out, d_hidden, d_dispatched;  // (R, C), (R, F), (R, C)
  Tensor<Real, Device> d_gate;                                  // (N, K) gradient of the final gate weights
  Tensor<Real, Device> d_logits;                                // (G, E)
};

template <class Config, class Scalar>
class Layer<Config, Scalar, Cpu> {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "moe::Layer<Config, Scalar, Cpu>: the CPU back-end computes in float or double; store bf16/f16 "
                "weights with io/ and convert on load.");

 public:
  using config_type = Config;
  using scalar_type = Scalar;
  using device_type = Cpu;
  using Real = router_t<Scalar>;
  using Route = typename Config::route_type;
  using Act = typename Config::activation_type;
  using Cache = LayerCache<Scalar, Cpu>;
  static constexpr int E = Config::experts;
  static constexpr int K = Config::top_k;
  static constexpr bool kTask = std::is_same_v<Route, route::Task>;
  static constexpr bool kSentence = std::is_same_v<Route, route::Sentence>;
  /// Task ranges up to this many rows run all K experts in two fork-joins (task_experts_forward); longer ones
  /// run each expert as a dense FFN split by rows, which keeps large batches at the dense GEMM rate.
  static constexpr std::int64_t kTaskSlabRows = 256;

  /// Allocates zero-filled parameters. @throws ShapeError for non-positive sizes or, for task routing, no tasks.
  explicit Layer(LayerOptions options) : options_(options) {
    check_layer_options(options, kTask);
    const std::int64_t C = options.d_model, F = options.d_ff;
    gate_weight_ = nn::Parameter<Scalar, Cpu>({E, C});
    if constexpr (kTask) task_embedding_ = nn::Parameter<Scalar, Cpu>({options.num_tasks, C});
    wi_ = nn::Parameter<Scalar, Cpu>({E, F, C});
    wo_ = nn::Parameter<Scalar, Cpu>({E, C, F});
  }

  [[nodiscard]] const LayerOptions& options() const noexcept { return options_; }

  /// Normal initialization from Philox(seed): gate sigma sqrt(0.1 / C) (Switch's reduced scale), wi sigma
  /// 1/sqrt(C), wo sigma 1/sqrt(F), task embeddings sigma 1.
  void init(std::uint64_t seed) {
    const double C = static_cast<double>(options_.d_model), F = static_cast<double>(options_.d_ff);
    fill_normal(gate_weight_.value.view(), seed, 0, std::sqrt(0.1 / C));
    if constexpr (kTask) fill_normal(task_embedding_.value.view(), seed, 1, 1.0);
    fill_normal(wi_.value.view(), seed, 2, 1.0 / std::sqrt(C));
    fill_normal(wo_.value.view(), seed, 3, 1.0 / std::sqrt(F));
  }

  /// Parameter values under their stable names, for io::save / io::load: prefix "decoder.layers.3.moe" gives
  /// "decoder.layers.3.moe.gate.weight", ".task_embedding" (task routing), ".experts.wi", ".experts.wo".
  [[nodiscard]] NamedTensorViews<Scalar> parameters(const std::string& prefix = "") {
    return nn::values_of(parameter_refs(prefix));
  }

  /// Values and gradients under the same names, for optimizers and gradient clipping.
  [[nodiscard]] nn::ParameterRefs<Scalar, Cpu> parameter_refs(const std::string& prefix = "") {
    const std::string p = prefix.empty() ? "" : prefix + ".";
    nn::ParameterRefs<Scalar, Cpu> out;
    out.push_back({p + "gate.weight", gate_weight_.value.view(), gate_weight_.grad.view()});
    if constexpr (kTask) out.push_back({p + "task_embedding", task_embedding_.value.view(), task_embedding_.grad.view()});
    out.push_back({p + "experts.wi", wi_.value.view(), wi_.grad.view()});
    out.push_back({p + "experts.wo", wo_.value.view(), wo_.grad.view()});
    return out;
  }

  [[nodiscard]] TensorView<Scalar, Cpu> gate_weight() noexcept { return gate_weight_.value.view(); }
  [[nodiscard]] TensorView<Scalar, Cpu> task_embedding() noexcept
    requires kTask
  {
    return task_embedding_.value.view();
  }
  [[nodiscard]] TensorView<Scalar, Cpu> wi() noexcept { return wi_.value.view(); }
  [[nodiscard]] TensorView<Scalar, Cpu> wo() noexcept { return wo_.value.view(); }

  /// out (same shape as x) = MoE(x): the weighted expert outputs only (add the residual outside). Padding and
  /// fully dropped tokens get zeros.
  /// @throws ShapeError for a wrong shape, a missing or unknown task id.
  void forward(CpuContext& ctx, const Input<Scalar, Cpu>& in, TensorView<Scalar, Cpu> out, Cache& cache,
               const ForwardArgs& args = {}) const {
    const TokenLayout layout = validate(in, out);
    [[maybe_unused]] const bool fixed_task_logits =
        checked_task_logits<Route>(in, args.training, options_.num_tasks, E) != nullptr;
    const std::int64_t N = layout.tokens(), C = options_.d_model;
    const Scalar* x = in.x.data();
    cache.x = in.x;
    cache.training = args.training;

    // Gate rows and router logits (router precision).
    cache.gate_row.resize({N});
    std::int32_t* gate_row = cache.gate_row.data();
    if constexpr (std::is_same_v<Route, route::Token>) {
      for (std::int64_t n = 0; n < N; ++n) gate_row[n] = layout.valid(n) ? static_cast<std::int32_t>(n) : -1;
      cache.logits.resize({N, E});
      Ops<Cpu>::gemm<Real>(ctx, cache.logits, in.x.reshape({N, C}), Trans::kN, gate_weight_.value, Trans::kT);
    } else if constexpr (kSentence) {
      cache.sentence_override = has_sentence_repr(in);
      if (cache.sentence_override) {
        if (args.training) {
          throw Error("moe::Layer::forward: Input::sentence_repr is for inference (step-by-step decoding); "
                      "training routes each sequence by the mean of its tokens");
        }
        cache.gate_input.resize({layout.rows, C});
        for (std::int64_t i = 0; i < layout.rows * C; ++i) {
          cache.gate_input.data()[i] = static_cast<Real>(in.sentence_repr.data()[i]);
        }
        for (std::int64_t n = 0; n < N; ++n) {
          gate_row[n] = layout.valid(n) ? static_cast<std::int32_t>(n / layout.columns) : -1;
        }
      } else {
        sentence_gate_rows<Real, Scalar>(layout, x, C, gate_row, cache.gate_input);
      }
      cache.logits.resize({cache.gate_input.dim(0), E});
      Ops<Cpu>::gemm<Real>(ctx, cache.logits, cache.gate_input, Trans::kN, gate_weight_.value, Trans::kT);
    } else {
      task_gate_rows(layout, in.task_ids.data(), task_ids_per_token(in.task_ids, layout.rows), options_.num_tasks, gate_row,
                     "moe::Layer::forward");
      cache.logits.resize({options_.num_tasks, E});
      if (fixed_task_logits) {
        std::copy_n(in.task_logits.data(), options_.num_tasks * E, cache.logits.data());
      } else {
        Ops<Cpu>::gemm<Real>(ctx, cache.logits, task_embedding_.value, Trans::kN, gate_weight_.value, Trans::kT);
      }
    }
    cache.probs.resize(cache.logits.shape());
    Ops<Cpu>::softmax<Real>(ctx, cache.probs, cache.logits);

    build_plan<Config, Real>(ctx, cache.plan, cache.probs, cache.logits, gate_row, N, options_.group_size, args);

    cache.task_path = false;
    if constexpr (kTask && Config::dropless && (K == 1 || !Config::second_expert_type::random)) {
      forward_task_ranges(ctx, x, out.data(), cache, args.training);
    } else if constexpr (kTask) {
      // At inference a task-routed layer has no capacity limit and no randomness: every token of a task goes to
      // all K of its experts, which is what an extracted sub-network computes.
      if (!args.training) {
        forward_task_ranges(ctx, x, out.data(), cache, args.training);
      } else {
        forward_permuted(ctx, x, out.data(), cache, args.training);
      }
    } else {
      forward_permuted(ctx, x, out.data(), cache, args.training);
    }
  }

  /// Every task's router logits (num_tasks, E) = task embedding x gate projection^T (task routing): all of a task's
  /// routing that depends on the weights. Pass them as Input::task_logits to inference calls until the next weight
  /// update.
  [[nodiscard]] Tensor<Real, Cpu> task_logits(CpuContext& ctx) const
    requires kTask
  {
    Tensor<Real, Cpu> logits({options_.num_tasks, E});
    Ops<Cpu>::gemm<Real>(ctx, logits, task_embedding_.value, Trans::kN, gate_weight_.value, Trans::kT);
    return logits;
  }

  /// The routing decision of one task (task routing): the same softmax, top-K (ties to the lower expert) and
  /// normalization as forward, with nothing dropped. Extraction folds these weights into the experts.
  /// @throws ShapeError if `task` is not in [0, num_tasks).
  [[nodiscard]] TaskRoute<Real, K> task_route(CpuContext& ctx, std::int64_t task) const
    requires kTask
  {
    if (task < 0 || task >= options_.num_tasks) {
      throw ShapeError("moe::Layer::task_route: unknown task id " + std::to_string(task) + "; expected an id in [0, " +
                       std::to_string(options_.num_tasks) + ")");
    }
    const Tensor<Real, Cpu> logits = task_logits(ctx);
    Tensor<Real, Cpu> probs({options_.num_tasks, E});
    Ops<Cpu>::softmax<Real>(ctx, probs, logits);
    TaskRoute<Real, K> r;
    task_choice(probs.data() + task * E, r.experts.data(), r.weights.data());
    return r;
  }

  /// The layer's auxiliary training loss: aux coefficient * aux loss + z coefficient * z-loss.
  [[nodiscard]] static double aux_loss(const Cache& cache) noexcept {
    return Config::aux_loss_coefficient * cache.plan.aux_loss + Config::z_loss_coefficient * cache.plan.z_loss;
  }

  /// Backward of forward() plus the gradient of aux_loss(cache): dx (x's shape) is OVERWRITTEN; gate weight,
  /// task embedding and expert gradients ACCUMULATE.
  ///
  /// The output gradient reaches the experts through the combine weights and the gate through the expert outputs:
  /// dG(n, j) = dout_n . FFN_e(x_n). From the final weights it flows through the chosen normalization to the
  /// router probabilities, adds the aux-loss term (f_e held constant, as the loss is defined), goes through the
  /// softmax, adds the z-loss term on the logits, and ends in the gate projection and the gate inputs: x (token),
  /// the sequence means (sentence) or the task embedding (task). Dropped choices and padding get no expert
  /// gradient; a random-policy skip is a constant of the step. `dout` rows of padding tokens are ignored, since
  /// forward writes zeros there whatever the input.
  /// @throws ShapeError for mismatched shapes; Error if the cache cannot support backward (a non-ReLU activation
  ///         whose forward did not run with training = true keeps no pre-activations).
  void backward(CpuContext& ctx, Cache& cache, ConstTensorView<Scalar, Cpu> dout, TensorView<Scalar, Cpu> dx) {
    const std::string op = "moe::Layer::backward";
    if (!(dout.shape() == cache.x.shape()) || !(dx.shape() == cache.x.shape())) {
      throw ShapeError(op + ": dout and dx must have the forward input's shape " + cache.x.shape().to_string() +
                       ", got dout " + dout.shape().to_string() + " and dx " + dx.shape().to_string());
    }
    if (!std::is_same_v<Act, nn::Relu> && !cache.training) {
      throw Error(op + ": the " + std::string(Act::name) +
                  " experts need their pre-activations; run forward with training = true before backward");
    }
    if (cache.sentence_override) {
      throw Error(op + ": forward routed by Input::sentence_repr (inference only); there is no gradient to it");
    }
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens;
    cache.d_gate.resize({N, K});
    std::fill_n(cache.d_gate.data(), N * K, Real(0));
    std::fill_n(dx.data(), dx.numel(), Scalar(0));
    if (cache.task_path) {
      backward_task_ranges(ctx, cache, dout.data(), dx.data());
    } else {
      backward_permuted(ctx, cache, dout.data(), dx.data());
    }
    backward_gate(ctx, cache, dx.data());
  }

 private:
  TokenLayout validate(const Input<Scalar, Cpu>& in, const TensorView<Scalar, Cpu>& out) const {
    const std::string op = "moe::Layer::forward";
    const std::int64_t C = options_.d_model;
    if ((in.x.rank() != 2 && in.x.rank() != 3) || in.x.dim(-1) != C) {
      throw ShapeError(op + ": x must be (B, T, " + std::to_string(C) + ") or (N, " + std::to_string(C) +
                       ") for d_model " + std::to_string(C) + ", got " + in.x.shape().to_string());
    }
    if (!(out.shape() == in.x.shape())) {
      throw ShapeError(op + ": out must have x's shape " + in.x.shape().to_string() + ", got " +
                       out.shape().to_string());
    }
    TokenLayout layout;
    layout.rows = in.x.rank() == 3 ? in.x.dim(0) : 1;
    layout.columns = in.x.rank() == 3 ? in.x.dim(1) : in.x.dim(0);
    if (layout.tokens() >= (std::int64_t{1} << 31)) {
      throw ShapeError(op + ": at most 2^31 - 1 tokens per call, got " + std::to_string(layout.tokens()));
    }
    if (in.segment_ids.data() != nullptr || in.segment_ids.rank() != 0) {
      if (in.segment_ids.numel() != layout.tokens() || in.segment_ids.shape()[0] != (in.x.rank() == 3 ? layout.rows : layout.columns)) {
        throw ShapeError(op + ": segment_ids must be (" + std::to_string(layout.rows) + ", " +
                         std::to_string(layout.columns) + ") for x " + in.x.shape().to_string() + ", got " +
                         in.segment_ids.shape().to_string());
      }
      layout.segment_ids = in.segment_ids.data();
      for (std::int64_t n = 0; n < layout.tokens(); ++n) {
        if (layout.segment_ids[n] < 0) {
          throw ShapeError(op + ": segment id " + std::to_string(layout.segment_ids[n]) + " at token " +
                           std::to_string(n) + " is negative; expected 0 (padding) or a positive sequence id");
        }
      }
    }
    if constexpr (kTask) {
      const bool per_row = in.task_ids.rank() == 1 && in.task_ids.dim(0) == layout.rows;
      const bool per_token = in.task_ids.numel() == layout.tokens() && in.task_ids.rank() == in.x.rank() - 1;
      if (!per_row && !per_token) {
        throw ShapeError(op + ": task routing needs task_ids of shape (" + std::to_string(layout.rows) +
                         ") per row or (" + std::to_string(layout.rows) + ", " + std::to_string(layout.columns) +
                         ") per token for x " + in.x.shape().to_string() + ", got " +
                         in.task_ids.shape().to_string());
      }
    }
    return layout;
  }

  static bool has_sentence_repr(const Input<Scalar, Cpu>& in) {
    if (in.sentence_repr.data() == nullptr && in.sentence_repr.rank() == 0) return false;
    const std::int64_t B = in.x.rank() == 3 ? in.x.dim(0) : 1;
    require_shape("moe::Layer::forward", "sentence_repr", in.sentence_repr, Shape{B, in.x.dim(-1)});
    return true;
  }

  // Permuted path: gather -> expert blocks -> combine.
  void forward_permuted(CpuContext& ctx, const Scalar* x, Scalar* y, Cache& cache, bool training) const {
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens, C = options_.d_model, F = options_.d_ff, R = plan.rows();
    cache.dispatched.resize({R, C});
    cache.hidden.resize({R, F});
    cache.expert_out.resize({R, C});
    const bool keep_pre = training && !std::is_same_v<Act, nn::Relu>;
    if (keep_pre) cache.pre.resize({R, F});

    Scalar* xd = cache.dispatched.data();
    backend::cpu::gather_rows<Scalar, std::int64_t>(ctx, xd, x, plan.row_token.data(), R, C);  // the dispatch
    experts_forward<Act, Scalar, E>(ctx, cache.expert_out.data(), cache.hidden.data(),
                                    keep_pre ? cache.pre.data() : nullptr, xd, wi_.value.data(), wo_.value.data(),
                                    plan.expert_offset.data(), C, F);
    combine_rows<K, Scalar, Real>(ctx, y, cache.expert_out.data(), plan.row.data(), plan.gate.data(), N, C);
  }

  // Task path: one contiguous range per task, K dense FFN calls each; no permutation when tasks are contiguous.
  void forward_task_ranges(CpuContext& ctx, const Scalar* x, Scalar* y, Cache& cache,
                           bool training) const {
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens, C = options_.d_model, F = options_.d_ff;
    const std::int32_t* gate_row = cache.gate_row.data();
    cache.task_path = true;
    cache.task_order.clear();
    cache.task_range.clear();

    // Maximal runs of one task; padding joins the run it sits in.
    std::vector<std::uint8_t> seen(static_cast<std::size_t>(options_.num_tasks), 0);
    bool contiguous = true;
    std::int64_t begin = 0, current = -1;
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int32_t t = gate_row[n];
      if (t < 0 || t == current) continue;
      if (current >= 0) cache.task_range.insert(cache.task_range.end(), {begin, n, current});
      if (seen[static_cast<std::size_t>(t)]) contiguous = false;
      seen[static_cast<std::size_t>(t)] = 1;
      begin = current < 0 ? 0 : n;
      current = t;
    }
    if (current >= 0) cache.task_range.insert(cache.task_range.end(), {begin, N, current});

    const Scalar* xs = x;
    Scalar* ys = y;
    std::int64_t routed = N;
    if (!contiguous) {
      // Stable counting sort of the valid tokens by task; padding is left out.
      std::vector<std::int64_t> count(static_cast<std::size_t>(options_.num_tasks) + 1, 0);
      for (std::int64_t n = 0; n < N; ++n) {
        if (gate_row[n] >= 0) ++count[static_cast<std::size_t>(gate_row[n]) + 1];
      }
      for (std::size_t t = 1; t < count.size(); ++t) count[t] += count[t - 1];
      routed = count.back();
      cache.task_range.clear();
      for (std::int64_t t = 0; t < options_.num_tasks; ++t) {
        const auto b = count[static_cast<std::size_t>(t)], e = count[static_cast<std::size_t>(t) + 1];
        if (b < e) cache.task_range.insert(cache.task_range.end(), {b, e, t});
      }
      cache.task_order.assign(static_cast<std::size_t>(routed), 0);
      for (std::int64_t n = 0; n < N; ++n) {
        if (gate_row[n] >= 0) cache.task_order[static_cast<std::size_t>(count[static_cast<std::size_t>(gate_row[n])]++)] = n;
      }
      cache.task_x.resize({routed, C});
      cache.task_y.resize({routed, C});
      ctx.parallel_range(routed, 64, [&](std::int64_t r0, std::int64_t r1) {
        for (std::int64_t r = r0; r < r1; ++r) {
          std::copy_n(x + cache.task_order[static_cast<std::size_t>(r)] * C, C, cache.task_x.data() + r * C);
        }
      });
      xs = cache.task_x.data();
      ys = cache.task_y.data();
    }

    const bool keep_pre = training && !std::is_same_v<Act, nn::Relu>;
    cache.hidden.resize({K, routed, F});
    if (keep_pre) cache.pre.resize({K, routed, F});
    const Real* probs = cache.probs.data();
    for (std::size_t i = 0; i < cache.task_range.size(); i += 3) {
      const std::int64_t b = cache.task_range[i], e = cache.task_range[i + 1], t = cache.task_range[i + 2];
      // The task's experts and weights, identical for all its tokens: read them from its gate row.
      std::int32_t experts[K];
      Real weights[K];
      task_choice(probs + t * E, experts, weights);
      if (e - b <= kTaskSlabRows) {
        // Few rows (decoding): all K experts in two fork-joins.
        Scalar gates[K];
        for (int j = 0; j < K; ++j) gates[j] = static_cast<Scalar>(weights[j]);
        task_experts_forward<Act, Scalar, K>(ctx, ys + b * C, cache.hidden.data() + b * F,
                                             keep_pre ? cache.pre.data() + b * F : nullptr, routed * F, xs + b * C,
                                             e - b, experts, gates, wi_.value.data(), wo_.value.data(), C, F);
        continue;
      }
      for (int j = 0; j < K; ++j) {
        Scalar* h = cache.hidden.data() + (j * routed + b) * F;
        Scalar* p = keep_pre ? cache.pre.data() + (j * routed + b) * F : nullptr;
        expert_dense_forward<Act, Scalar>(ctx, ys + b * C, h, p, xs + b * C, e - b,
                                          wi_.value.data() + static_cast<std::int64_t>(experts[j]) * F * C,
                                          wo_.value.data() + static_cast<std::int64_t>(experts[j]) * C * F, C, F,
                                          static_cast<Scalar>(weights[j]), j == 0 ? Scalar(0) : Scalar(1));
      }
    }
    if (!contiguous) {
      std::fill_n(y, N * C, Scalar(0));
      ctx.parallel_range(routed, 64, [&](std::int64_t r0, std::int64_t r1) {
        for (std::int64_t r = r0; r < r1; ++r) {
          std::copy_n(ys + r * C, C, y + cache.task_order[static_cast<std::size_t>(r)] * C);
        }
      });
    } else {
      if (cache.task_range.empty()) std::fill_n(y, N * C, Scalar(0));
      for (std::int64_t n = 0; n < N; ++n) {
        if (gate_row[n] < 0) std::fill_n(y + n * C, C, Scalar(0));
      }
    }
  }

  // Expert FFN backward over one contiguous block of `rows` rows:
  //   dH = dY wo_e, dwo_e += dY^T H, dpre = dH * act'(pre), dwi_e += dpre^T X, dX = dpre wi_e.
  void expert_backward(CpuContext& ctx, std::int64_t rows, int e, const Scalar* x, const Scalar* hidden,
                       const Scalar* pre, const Scalar* dy, Scalar* dh, Scalar* dx_rows) {
    using backend::cpu::MatrixRef;
    const std::int64_t C = options_.d_model, F = options_.d_ff;
    if (rows == 0) return;
    const Scalar* wi = wi_.value.data() + static_cast<std::int64_t>(e) * F * C;
    const Scalar* wo = wo_.value.data() + static_cast<std::int64_t>(e) * C * F;
    Scalar* dwi = wi_.grad.data() + static_cast<std::int64_t>(e) * F * C;
    Scalar* dwo = wo_.grad.data() + static_cast<std::int64_t>(e) * C * F;
    backend::cpu::gemm_parallel<Scalar>(ctx, MatrixRef<Scalar>{dh, rows, F, F}, MatrixRef<const Scalar>{dy, rows, C, C},
                                        Trans::kN, MatrixRef<const Scalar>{wo, C, F, F}, Trans::kN, Scalar(1), Scalar(0));
    backend::cpu::gemm_parallel<Scalar>(ctx, MatrixRef<Scalar>{dwo, C, F, F}, MatrixRef<const Scalar>{dy, rows, C, C},
                                        Trans::kT, MatrixRef<const Scalar>{hidden, rows, F, F}, Trans::kN, Scalar(1),
                                        Scalar(1));
    ctx.parallel_range(rows * F, 1 << 14, [&](std::int64_t b, std::int64_t end) {
      for (std::int64_t i = b; i < end; ++i) {
        // ReLU's derivative reads off the output (h > 0 iff pre > 0); other activations need the pre-activation.
        dh[i] *= pre ? Act::derivative(pre[i]) : (hidden[i] > Scalar(0) ? Scalar(1) : Scalar(0));
      }
    });
    backend::cpu::gemm_parallel<Scalar>(ctx, MatrixRef<Scalar>{dwi, F, C, C}, MatrixRef<const Scalar>{dh, rows, F, F},
                                        Trans::kT, MatrixRef<const Scalar>{x, rows, C, C}, Trans::kN, Scalar(1),
                                        Scalar(1));
    backend::cpu::gemm_parallel<Scalar>(ctx, MatrixRef<Scalar>{dx_rows, rows, C, C},
                                        MatrixRef<const Scalar>{dh, rows, F, F}, Trans::kN,
                                        MatrixRef<const Scalar>{wi, F, C, C}, Trans::kN, Scalar(1), Scalar(0));
  }

  void backward_permuted(CpuContext& ctx, Cache& cache, const Scalar* dy, Scalar* dx) {
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens, C = options_.d_model, F = options_.d_ff, R = plan.rows();
    cache.d_expert_out.resize({R, C});
    cache.d_hidden.resize({R, F});
    cache.d_dispatched.resize({R, C});
    const std::int64_t* row_token = plan.row_token.data();
    const std::int32_t* row_choice = plan.row_choice.data();
    const Real* gate = plan.gate.data();
    Real* d_gate = cache.d_gate.data();
    Scalar* dyo = cache.d_expert_out.data();
    const Scalar* yo = cache.expert_out.data();
    // Through the combine: d expert_out[r] = G(n, j) dy_n; dG(n, j) = dy_n . expert_out[r].
    ctx.parallel_range(R, 64, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t n = row_token[r];
        const std::int32_t j = row_choice[r];
        const Scalar g = static_cast<Scalar>(gate[n * K + j]);
        const Scalar* dyn = dy + n * C;
        Real dot = 0;
        for (std::int64_t c = 0; c < C; ++c) {
          dyo[r * C + c] = g * dyn[c];
          dot += static_cast<Real>(dyn[c] * yo[r * C + c]);
        }
        d_gate[n * K + j] = dot;
      }
    });
    const std::int64_t* offset = plan.expert_offset.data();
    const Scalar* pre = cache.pre.numel() == R * F && cache.training && !std::is_same_v<Act, nn::Relu>
                            ? cache.pre.data()
                            : nullptr;
    for (int e = 0; e < E; ++e) {
      const std::int64_t r0 = offset[e], rows = offset[e + 1] - r0;
      expert_backward(ctx, rows, e, cache.dispatched.data() + r0 * C, cache.hidden.data() + r0 * F,
                      pre ? pre + r0 * F : nullptr, dyo + r0 * C, cache.d_hidden.data() + r0 * F,
                      cache.d_dispatched.data() + r0 * C);
    }
    // Inverse permutation: dx_n = sum_j d_dispatched[row(n, j)], j ascending.
    const std::int64_t* row = plan.row.data();
    const Scalar* dxd = cache.d_dispatched.data();
    ctx.parallel_range(N, 32, [&](std::int64_t n0, std::int64_t n1) {
      for (std::int64_t n = n0; n < n1; ++n) {
        for (int j = 0; j < K; ++j) {
          const std::int64_t r = row[n * K + j];
          if (r < 0) continue;
          for (std::int64_t c = 0; c < C; ++c) dx[n * C + c] += dxd[r * C + c];
        }
      }
    });
  }

  void backward_task_ranges(CpuContext& ctx, Cache& cache, const Scalar* dy, Scalar* dx) {
    using backend::cpu::MatrixRef;
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens, C = options_.d_model, F = options_.d_ff;
    const bool permuted = !cache.task_order.empty();
    const std::int64_t routed = permuted ? static_cast<std::int64_t>(cache.task_order.size()) : N;
    const std::int32_t* gate_row = cache.gate_row.data();
    auto token_of = [&](std::int64_t i) { return permuted ? cache.task_order[static_cast<std::size_t>(i)] : i; };
    // Output gradient in task order, zero on padding rows (forward wrote zeros there regardless of input).
    cache.d_expert_out.resize({routed, C});
    cache.d_dispatched.resize({routed, C});
    cache.d_hidden.resize({routed, F});
    Scalar* dyt = cache.d_expert_out.data();
    ctx.parallel_range(routed, 64, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) {
        const std::int64_t n = token_of(i);
        if (gate_row[n] < 0) std::fill_n(dyt + i * C, C, Scalar(0));
        else std::copy_n(dy + n * C, C, dyt + i * C);
      }
    });
    const Scalar* xs = permuted ? cache.task_x.data() : cache.x.data();
    std::vector<Scalar> scaled, yo;
    Scalar* dxt = cache.d_dispatched.data();
    std::fill_n(dxt, routed * C, Scalar(0));
    std::vector<Scalar> dx_part;
    const Real* probs = cache.probs.data();
    for (std::size_t i = 0; i < cache.task_range.size(); i += 3) {
      const std::int64_t b = cache.task_range[i], e = cache.task_range[i + 1], t = cache.task_range[i + 2];
      const std::int64_t rows = e - b;
      std::int32_t experts[K];
      Real weights[K];
      task_choice(probs + t * E, experts, weights);
      scaled.resize(static_cast<std::size_t>(rows * C));
      yo.resize(static_cast<std::size_t>(rows * C));
      dx_part.resize(static_cast<std::size_t>(rows * C));
      for (int j = 0; j < K; ++j) {
        const Scalar* h = cache.hidden.data() + (j * routed + b) * F;
        const Scalar* pre = cache.training && !std::is_same_v<Act, nn::Relu> ? cache.pre.data() + (j * routed + b) * F
                                                                             : nullptr;
        const Scalar* wo = wo_.value.data() + static_cast<std::int64_t>(experts[j]) * C * F;
        // FFN_j(x) for the gate gradient, recomputed from the kept hidden activations.
        backend::cpu::gemm_parallel<Scalar>(ctx, MatrixRef<Scalar>{yo.data(), rows, C, C},
                                            MatrixRef<const Scalar>{h, rows, F, F}, Trans::kN,
                                            MatrixRef<const Scalar>{wo, C, F, F}, Trans::kT, Scalar(1), Scalar(0));
        const Scalar g = static_cast<Scalar>(weights[j]);
        for (std::int64_t r = 0; r < rows; ++r) {
          const Scalar* dyr = dyt + (b + r) * C;
          Real dot = 0;
          for (std::int64_t c = 0; c < C; ++c) {
            scaled[static_cast<std::size_t>(r * C + c)] = g * dyr[c];
            dot += static_cast<Real>(dyr[c] * yo[static_cast<std::size_t>(r * C + c)]);
          }
          const std::int64_t n = token_of(b + r);
          if (gate_row[n] >= 0) cache.d_gate.data()[n * K + j] = dot;
        }
        expert_backward(ctx, rows, experts[j], xs + b * C, h, pre, scaled.data(), cache.d_hidden.data() + b * F,
                        dx_part.data());
        for (std::int64_t q = 0; q < rows * C; ++q) dxt[b * C + q] += dx_part[static_cast<std::size_t>(q)];
      }
    }
    ctx.parallel_range(routed, 64, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) {
        const std::int64_t n = token_of(i);
        if (gate_row[n] < 0) continue;
        std::copy_n(dxt + i * C, C, dx + n * C);
      }
    });
  }

  // From dG (N, K) to the router: normalization, aux loss, softmax, z-loss, gate projection, gate inputs.
  void backward_gate(CpuContext& ctx, Cache& cache, Scalar* dx) {
    using Norm = typename Config::normalize_type;
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens, C = options_.d_model;
    const std::int64_t G = cache.probs.dim(0);
    const std::int32_t* gate_row = cache.gate_row.data();
    const std::int32_t* expert = plan.expert.data();
    const std::uint8_t* disp = plan.dispatched.data();
    const Real* dG = cache.d_gate.data();
    const Real* probs = cache.probs.data();
    std::vector<Real> dp(static_cast<std::size_t>(G * E), Real(0));

    // Normalization, token by token in order (tokens sharing a gate row add up in a fixed order).
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int32_t g = gate_row[n];
      if (g < 0) continue;
      Real v[K];
      for (int j = 0; j < K; ++j) v[j] = probs[g * E + expert[n * K + j]];
      Real* dpr = dp.data() + static_cast<std::int64_t>(g) * E;
      if constexpr (std::is_same_v<Norm, NoNormalize>) {
        for (int j = 0; j < K; ++j) dpr[expert[n * K + j]] += disp[n * K + j] ? dG[n * K + j] : Real(0);
      } else if constexpr (std::is_same_v<Norm, NormalizeBeforeDrop>) {
        // G_j = disp_j v_j / den, den = sum_i v_i + 1e-9 over all K choices.
        Real den = Real(1e-9), acc = 0;
        for (int j = 0; j < K; ++j) den += v[j];
        for (int j = 0; j < K; ++j) acc += disp[n * K + j] ? dG[n * K + j] * v[j] : Real(0);
        for (int i = 0; i < K; ++i) {
          const Real own = disp[n * K + i] ? dG[n * K + i] / den : Real(0);
          dpr[expert[n * K + i]] += own - acc / (den * den);
        }
      } else {
        // G_j = disp_j v_j / sum over dispatched v (the 1e-9 cancels between the two normalizations).
        Real sk = 0, acc = 0;
        for (int j = 0; j < K; ++j) {
          if (!disp[n * K + j]) continue;
          sk += v[j];
          acc += dG[n * K + j] * v[j];
        }
        if (sk <= 0) continue;
        for (int i = 0; i < K; ++i) {
          if (!disp[n * K + i]) continue;
          dpr[expert[n * K + i]] += dG[n * K + i] / sk - acc / (sk * sk);
        }
      }
    }

    // Aux loss: d/dp(s, e) of coef * mean_groups(E * sum_e f_e m_e), m_e = (1/S) sum_s p(s, e), f constant.
    constexpr double aux_coef = Config::aux_loss_coefficient;
    if (aux_coef != 0.0 && N > 0) {
      const std::int64_t S = plan.group_size;
      const std::int64_t groups = (N + S - 1) / S;
      for (std::int64_t g0 = 0; g0 < N; g0 += S) {
        const std::int64_t g1 = std::min(N, g0 + S);
        const double s = static_cast<double>(g1 - g0);
        double f[E] = {};
        for (std::int64_t n = g0; n < g1; ++n) {
          if (gate_row[n] >= 0) f[expert[n * K]] += 1.0 / s;
        }
        for (std::int64_t n = g0; n < g1; ++n) {
          if (gate_row[n] < 0) continue;
          Real* dpr = dp.data() + static_cast<std::int64_t>(gate_row[n]) * E;
          for (int e = 0; e < E; ++e) {
            dpr[e] += static_cast<Real>(aux_coef * E * f[e] / (s * static_cast<double>(groups)));
          }
        }
      }
    }

    // Softmax backward per gate row, then the z-loss on the logits.
    cache.d_logits.resize({G, E});
    Real* dl = cache.d_logits.data();
    for (std::int64_t g = 0; g < G; ++g) {
      const Real* p = probs + g * E;
      const Real* d = dp.data() + g * E;
      Real dot = 0;
      for (int e = 0; e < E; ++e) dot += p[e] * d[e];
      for (int e = 0; e < E; ++e) dl[g * E + e] = p[e] * (d[e] - dot);
    }
    constexpr double z_coef = Config::z_loss_coefficient;
    if (z_coef != 0.0) {
      std::int64_t valid = 0;
      for (std::int64_t n = 0; n < N; ++n) valid += gate_row[n] >= 0 ? 1 : 0;
      for (std::int64_t n = 0; n < N; ++n) {
        const std::int32_t g = gate_row[n];
        if (g < 0) continue;
        const Real* p = probs + static_cast<std::int64_t>(g) * E;
        // logsumexp as in forward: lse = l[e1] - log p[e1], p[e1] >= 1/E.
        const std::int32_t e1 = expert[n * K];
        const Real lse = cache.logits.data()[static_cast<std::int64_t>(g) * E + e1] - std::log(p[e1]);
        for (int e = 0; e < E; ++e) {
          dl[static_cast<std::int64_t>(g) * E + e] += static_cast<Real>(2.0 * z_coef / static_cast<double>(valid)) * lse * p[e];
        }
      }
    }

    // logits = gin Wg^T: dWg += dl^T gin; dgin = dl Wg, then into the gate inputs.
    if constexpr (std::is_same_v<Route, route::Token>) {
      Ops<Cpu>::gemm<Real>(ctx, gate_weight_.grad, cache.d_logits, Trans::kT, cache.x.reshape({N, C}), Trans::kN,
                           Real(1), Real(1));
      Ops<Cpu>::gemm<Real>(ctx, TensorView<Scalar, Cpu>(dx, Shape{N, C}), cache.d_logits, Trans::kN,
                           gate_weight_.value, Trans::kN, Real(1), Real(1));
    } else if constexpr (kSentence) {
      Ops<Cpu>::gemm<Real>(ctx, gate_weight_.grad, cache.d_logits, Trans::kT, cache.gate_input, Trans::kN, Real(1),
                           Real(1));
      Tensor<Real, Cpu> dmean({G, C});
      Ops<Cpu>::gemm<Real>(ctx, dmean, cache.d_logits, Trans::kN, gate_weight_.value, Trans::kN);
      std::vector<std::int64_t> count(static_cast<std::size_t>(G), 0);
      for (std::int64_t n = 0; n < N; ++n) {
        if (gate_row[n] >= 0) ++count[static_cast<std::size_t>(gate_row[n])];
      }
      for (std::int64_t n = 0; n < N; ++n) {
        const std::int32_t g = gate_row[n];
        if (g < 0) continue;
        const Real inv = Real(1) / static_cast<Real>(count[static_cast<std::size_t>(g)]);
        for (std::int64_t c = 0; c < C; ++c) dx[n * C + c] += static_cast<Scalar>(dmean.data()[g * C + c] * inv);
      }
    } else {
      Ops<Cpu>::gemm<Real>(ctx, gate_weight_.grad, cache.d_logits, Trans::kT, task_embedding_.value, Trans::kN,
                           Real(1), Real(1));
      Ops<Cpu>::gemm<Real>(ctx, task_embedding_.grad, cache.d_logits, Trans::kN, gate_weight_.value, Trans::kN,
                           Real(1), Real(1));
    }
  }

  // The K experts and final weights of one task's gate row: the gate of paper-spec 2.3 with nothing dropped.
  static void task_choice(const Real* p, std::int32_t* experts, Real* weights) {
    Real vals[K];
    backend::cpu::top_k_row<K, Real>(p, E, vals, experts);
    Real sum = 0;
    for (int j = 0; j < K; ++j) sum += vals[j];
    for (int j = 0; j < K; ++j) {
      if constexpr (std::is_same_v<typename Config::normalize_type, NoNormalize>) {
        weights[j] = vals[j];
      } else if constexpr (std::is_same_v<typename Config::normalize_type, NormalizeBeforeDrop>) {
        weights[j] = vals[j] / (sum + Real(1e-9));
      } else {
        const Real g = vals[j] / (sum + Real(1e-9));
        Real d = 0;
        for (int i = 0; i < K; ++i) d += vals[i] / (sum + Real(1e-9));
        weights[j] = g / d;
      }
    }
  }

  static void fill_normal(TensorView<Scalar, Cpu> t, std::uint64_t seed, std::uint64_t stream, double sigma) {
    const Philox rng(seed);
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      const auto w = rng.block(static_cast<std::uint64_t>(i), stream);
      t.data()[i] = static_cast<Scalar>(sigma * static_cast<double>(normal01(w[0], w[1])));
    }
  }

  LayerOptions options_;
  nn::Parameter<Scalar, Cpu> gate_weight_;     // (E, C)
  nn::Parameter<Scalar, Cpu> task_embedding_;  // (tasks, C)
  nn::Parameter<Scalar, Cpu> wi_;              // (E, F, C)
  nn::Parameter<Scalar, Cpu> wo_;              // (E, C, F)
};

}  // namespace tmoe::moe
