#pragma once
/// @file cuda_layer.cuh
/// @brief moe::Layer<Config, Scalar, Cuda>: the MoE layer on the GPU, forward pass, at all three granularities.
///
/// Pipeline (the CPU layer's, DESIGN section 7): router GEMM (cuBLAS, float32 logits, never TF32) -> fused softmax +
/// top-K, one warp per gate row -> per-token choices and sort keys -> CUB histogram, exclusive scan and stable radix
/// sort -> slots, drops and rows -> gather into expert rows -> expert GEMMs -> combine in a fixed order, no atomics.
///
/// Host round-trips, by design:
///  - token and sentence routing with a capacity limit: none. The expert GEMMs are one strided-batched call over
///    fixed blocks of G*C rows per expert (rows nobody was sent to are zeros), so the pass can be captured in a CUDA
///    graph and replayed;
///  - dropless token or sentence routing: one. The expert sizes come to the host (E + 1 integers) to size the
///    expert GEMMs;
///  - task routing: one. The task ids and the tasks' K experts and weights come to the host, which checks the ids
///    (an unknown id throws ShapeError) and runs each task's contiguous range through K plain dense FFNs.
///
/// Scalars: float, double, bf16, f16. Logits, probabilities and gate weights are float (double for double). bf16 and
/// f16 GEMMs accumulate in float; the task path accumulates its K experts in float before one rounding.
///
/// Differences from the CPU layer, none in what a token computes: with a capacity limit the plan's rows index the
/// padded layout (expert e's block of G*C rows starts at e*G*C); at inference the task path fills plan.expert,
/// plan.gate and plan.dispatched only (no permutation runs); aux and z losses are computed when training. Segment ids
/// are not read back for validation, so on the GPU a negative segment id counts as a sequence id, not an error.
///
/// Backward (float and double, as on the CPU) follows the forward path the cache records: through the combine (a warp
/// per expert row), the expert GEMMs (strided-batched with a capacity limit; per expert when dropless, after the same
/// one synchronization; per task range on the task path, after one synchronization for the routes), the inverse
/// permutation, and the router (normalization, aux loss, softmax, z-loss: one block per gate row, its tokens in token
/// order, no atomics). It needs a forward pass with training = true: the few-rows kernels, which leave the hidden rows
/// of unused experts unwritten, run only at inference.

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cub/cub.cuh>
#include <string>
#include <type_traits>
#include <vector>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/copy.cuh"
#include "tmoe/backend/cuda/gather_scatter.cuh"
#include "tmoe/backend/cuda/gemm.cuh"
#include "tmoe/backend/cuda/moe_backward.cuh"
#include "tmoe/backend/cuda/moe_dispatch.cuh"
#include "tmoe/backend/cuda/moe_experts.cuh"
#include "tmoe/backend/cuda/moe_route.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/moe/layer.hpp"
#include "tmoe/nn/init.hpp"

namespace tmoe::moe {

/// The routing plan on the GPU: the CPU plan's tables as device tensors, and the two losses on the device.
template <class Real>
struct RoutingPlan<Real, Cuda> {
  std::int64_t tokens = 0;
  int top_k = 0;
  int experts = 0;
  std::int64_t group_size = 0;
  std::int64_t groups = 0;     ///< G = ceil(N / S)
  std::int64_t capacity = -1;  ///< C per expert per group; -1 when dropless
  std::int64_t row_slots = 0;  ///< rows of the expert buffers: E*G*C with a capacity limit, N*K when dropless

  Tensor<std::int32_t, Cuda> expert;         // (N, K)
  Tensor<Real, Cuda> gate;                   // (N, K)
  Tensor<std::int64_t, Cuda> slot;           // (N, K)
  Tensor<std::uint8_t, Cuda> dispatched;     // (N, K)
  Tensor<std::int64_t, Cuda> row;            // (N, K)
  Tensor<std::int64_t, Cuda> expert_count;   // (E)
  Tensor<std::int64_t, Cuda> expert_offset;  // (E + 1)
  Tensor<std::int64_t, Cuda> row_token;      // (row_slots) token of each row, -1 for an empty row
  Tensor<std::int32_t, Cuda> row_choice;     // (row_slots)
  Tensor<double, Cuda> losses;               // (2) aux loss, z-loss (training only)
  bool has_losses = false;
  bool permuted = false;  // false on the task path: only expert, gate, dispatched are filled
};

/// The plan as host tensors (waits for the stream): the CPU plan type, with the device layout of rows.
template <class Real>
RoutingPlan<Real, Cpu> to_host(CudaContext& ctx, const RoutingPlan<Real, Cuda>& p) {
  RoutingPlan<Real, Cpu> h;
  h.tokens = p.tokens;
  h.top_k = p.top_k;
  h.experts = p.experts;
  h.group_size = p.group_size;
  h.capacity = p.capacity;
  h.expert = tmoe::to_host(ctx, p.expert);
  h.gate = tmoe::to_host(ctx, p.gate);
  h.dispatched = tmoe::to_host(ctx, p.dispatched);
  if (p.permuted) {
    h.slot = tmoe::to_host(ctx, p.slot);
    h.row = tmoe::to_host(ctx, p.row);
    h.expert_count = tmoe::to_host(ctx, p.expert_count);
    h.expert_offset = tmoe::to_host(ctx, p.expert_offset);
    h.row_token = tmoe::to_host(ctx, p.row_token);
    h.row_choice = tmoe::to_host(ctx, p.row_choice);
  }
  if (p.has_losses) {
    const Tensor<double, Cpu> l = tmoe::to_host(ctx, p.losses);
    h.aux_loss = l.data()[0];
    h.z_loss = l.data()[1];
  }
  return h;
}

template <class Config, class Scalar>
class Layer<Config, Scalar, Cuda> {
  static_assert(backend::cuda::is_cuda_scalar_v<Scalar>,
                "moe::Layer<Config, Scalar, Cuda>: Scalar must be float, double, bf16 or f16.");

 public:
  using config_type = Config;
  using scalar_type = Scalar;
  using device_type = Cuda;
  using Real = router_t<Scalar>;
  using Route = typename Config::route_type;
  using Act = typename Config::activation_type;
  using Cache = LayerCache<Scalar, Cuda>;
  static constexpr int E = Config::experts;
  static constexpr int K = Config::top_k;
  static constexpr bool kTask = std::is_same_v<Route, route::Task>;
  static constexpr bool kSentence = std::is_same_v<Route, route::Sentence>;

  /// Allocates zero-filled parameters on the device. @throws ShapeError as the CPU layer does.
  explicit Layer(LayerOptions options) : options_(options) {
    check_layer_options(options, kTask);
    const std::int64_t C = options.d_model, F = options.d_ff;
    gate_weight_ = nn::Parameter<Scalar, Cuda>({E, C});
    if constexpr (kTask) task_embedding_ = nn::Parameter<Scalar, Cuda>({options.num_tasks, C});
    wi_ = nn::Parameter<Scalar, Cuda>({E, F, C});
    wo_ = nn::Parameter<Scalar, Cuda>({E, C, F});
  }

  [[nodiscard]] const LayerOptions& options() const noexcept { return options_; }

  /// The CPU layer's initialization (same seed, same values, rounded to Scalar), copied to the device.
  void init(CudaContext& ctx, std::uint64_t seed) {
    const double C = static_cast<double>(options_.d_model), F = static_cast<double>(options_.d_ff);
    upload_normal(ctx, gate_weight_.value, seed, 0, std::sqrt(0.1 / C));
    if constexpr (kTask) upload_normal(ctx, task_embedding_.value, seed, 1, 1.0);
    upload_normal(ctx, wi_.value, seed, 2, 1.0 / std::sqrt(C));
    upload_normal(ctx, wo_.value, seed, 3, 1.0 / std::sqrt(F));
  }

  /// Copies (and rounds) the parameters of a CPU layer of the same configuration and sizes.
  /// @throws ShapeError if the sizes differ.
  template <class S2>
  void copy_parameters_from(CudaContext& ctx, Layer<Config, S2, Cpu>& cpu) {
    const auto& o = cpu.options();
    if (o.d_model != options_.d_model || o.d_ff != options_.d_ff || o.num_tasks != options_.num_tasks) {
      throw ShapeError("moe::Layer<Cuda>::copy_parameters_from: sizes differ (d_model " + std::to_string(o.d_model) +
                       " vs " + std::to_string(options_.d_model) + ", d_ff " + std::to_string(o.d_ff) + " vs " +
                       std::to_string(options_.d_ff) + ", tasks " + std::to_string(o.num_tasks) + " vs " +
                       std::to_string(options_.num_tasks) + ")");
    }
    upload<S2>(ctx, gate_weight_.value, cpu.gate_weight());
    if constexpr (kTask) upload<S2>(ctx, task_embedding_.value, cpu.task_embedding());
    upload<S2>(ctx, wi_.value, cpu.wi());
    upload<S2>(ctx, wo_.value, cpu.wo());
  }

  /// Parameter values under the CPU layer's names.
  [[nodiscard]] NamedTensorViews<Scalar, Cuda> parameters(const std::string& prefix = "") {
    const std::string p = prefix.empty() ? "" : prefix + ".";
    NamedTensorViews<Scalar, Cuda> out;
    out.push_back({p + "gate.weight", gate_weight_.value.view()});
    if constexpr (kTask) out.push_back({p + "task_embedding", task_embedding_.value.view()});
    out.push_back({p + "experts.wi", wi_.value.view()});
    out.push_back({p + "experts.wo", wo_.value.view()});
    return out;
  }

  /// Values and gradients (device views) under the same names, for optimizers.
  [[nodiscard]] nn::ParameterRefs<Scalar, Cuda> parameter_refs(const std::string& prefix = "") {
    const std::string p = prefix.empty() ? "" : prefix + ".";
    nn::ParameterRefs<Scalar, Cuda> out;
    out.push_back({p + "gate.weight", gate_weight_.value.view(), gate_weight_.grad.view()});
    if constexpr (kTask) out.push_back({p + "task_embedding", task_embedding_.value.view(), task_embedding_.grad.view()});
    out.push_back({p + "experts.wi", wi_.value.view(), wi_.grad.view()});
    out.push_back({p + "experts.wo", wo_.value.view(), wo_.grad.view()});
    return out;
  }

  [[nodiscard]] TensorView<Scalar, Cuda> gate_weight() noexcept { return gate_weight_.value.view(); }
  [[nodiscard]] TensorView<Scalar, Cuda> task_embedding() noexcept requires kTask {
    return task_embedding_.value.view();
  }
  [[nodiscard]] TensorView<Scalar, Cuda> wi() noexcept { return wi_.value.view(); }
  [[nodiscard]] TensorView<Scalar, Cuda> wo() noexcept { return wo_.value.view(); }

  /// out (x's shape) = MoE(x), as the CPU layer computes it. All inputs are device tensors.
  /// @throws ShapeError for a wrong shape or (task routing) an unknown task id; DeviceError if CUDA fails.
  void forward(CudaContext& ctx, const Input<Scalar, Cuda>& in, TensorView<Scalar, Cuda> out, Cache& cache,
               const ForwardArgs& args = {}) const {
    const Layout lay = validate(in, out);
    [[maybe_unused]] const Real* fixed_task_logits =
        checked_task_logits<Route>(in, args.training, options_.num_tasks, E);
    const std::int64_t N = lay.rows * lay.columns, C = options_.d_model;
    cache.x = in.x;
    cache.training = args.training;
    cache.task_path = false;
    cache.sentence_override = false;
    cache.gate_row.resize({N});
    if (N == 0) {
      reset_plan(cache.plan, 0, 1, 0);
      return;
    }
    const std::int32_t* seg = in.segment_ids.data();
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    const unsigned token_blocks = backend::cuda::blocks_for(N, kThreads);

    if constexpr (kTask) {
      const bool task_path = Config::dropless && (K == 1 || !Config::second_expert_type::random);
      if (task_path || !args.training) {
        forward_task_ranges(ctx, in, lay, out, cache, args.training, fixed_task_logits);
        return;
      }
      task_gate_rows(ctx, in, lay, cache);
      cache.logits.resize({options_.num_tasks, E});
      router_gemm(ctx, cache.logits.data(), task_embedding_.value.cview());
    } else if constexpr (kSentence) {
      cache.sentence_override = in.sentence_repr.data() != nullptr || in.sentence_repr.rank() != 0;
      if (cache.sentence_override) {
        if (args.training) {
          throw Error(
              "moe::Layer::forward: Input::sentence_repr is for inference (step-by-step decoding); "
              "training routes each sequence by the mean of its tokens");
        }
        require_shape("moe::Layer::forward", "sentence_repr", in.sentence_repr, Shape{lay.rows, C});
        cache.gate_input.resize({lay.rows, C});
        backend::cuda::moe_kernels::repr_gate_rows_kernel<Scalar, Real>
            <<<backend::cuda::blocks_for(std::max(lay.rows * C, N), kThreads), kThreads, 0, stream>>>(
                in.sentence_repr.data(), seg, lay.rows, lay.columns, C, cache.gate_input.data(), cache.gate_row.data());
        TMOE_CUDA_CHECK_LAUNCH("repr_gate_rows_kernel");
      } else {
        sentence_gate_rows(ctx, in, lay, cache);
      }
      cache.logits.resize({cache.gate_input.dim(0), E});
      if constexpr (std::is_same_v<Real, Scalar>) {
        router_gemm(ctx, cache.logits.data(), cache.gate_input.cview());
      } else {
        // The gate projection is stored in Scalar: round the means to it (cuBLAS needs one operand type).
        cache.task_x.resize(cache.gate_input.shape());
        backend::cuda::moe_kernels::
            convert_kernel<<<backend::cuda::blocks_for(cache.gate_input.numel(), kThreads), kThreads, 0, stream>>>(
                cache.task_x.data(), cache.gate_input.data(), cache.gate_input.numel());
        TMOE_CUDA_CHECK_LAUNCH("convert_kernel");
        router_gemm(ctx, cache.logits.data(), cache.task_x.cview());
      }
    } else {
      backend::cuda::moe_kernels::token_gate_rows_kernel<<<token_blocks, kThreads, 0, stream>>>(seg, N,
                                                                                                cache.gate_row.data());
      TMOE_CUDA_CHECK_LAUNCH("token_gate_rows_kernel");
      cache.logits.resize({N, E});
      router_gemm(ctx, cache.logits.data(), in.x.reshape({N, C}));
    }
    route(ctx, cache, N, args);
    forward_permuted(ctx, in.x.data(), out.data(), cache, args.training);
  }

  /// Every task's router logits (num_tasks, E) on the device (task routing), as the CPU layer's task_logits: pass
  /// them as Input::task_logits to inference calls until the next weight update.
  [[nodiscard]] Tensor<Real, Cuda> task_logits(CudaContext& ctx) const requires kTask {
    Tensor<Real, Cuda> logits({options_.num_tasks, E});
    router_gemm(ctx, logits.data(), task_embedding_.value.cview());
    return logits;
  }

  /// One task's K experts and weights (task routing), as the CPU layer's task_route; waits for the stream.
  /// @throws ShapeError if `task` is not in [0, num_tasks).
  [[nodiscard]] TaskRoute<Real, K> task_route(CudaContext& ctx, std::int64_t task) const requires kTask {
    if (task < 0 || task >= options_.num_tasks) {
      throw ShapeError("moe::Layer::task_route: unknown task id " + std::to_string(task) + "; expected an id in [0, " +
                       std::to_string(options_.num_tasks) + ")");
    }
    std::vector<TaskRoute<Real, K>> routes = task_routes(ctx);
    return routes[static_cast<std::size_t>(task)];
  }

  /// The layer's auxiliary training loss, aux coefficient * aux loss + z coefficient * z-loss, on the host (waits for
  /// the stream). Zero unless forward ran with training = true.
  [[nodiscard]] static double aux_loss(CudaContext& ctx, const Cache& cache) {
    if (!cache.plan.has_losses) return 0.0;
    const Tensor<double, Cpu> l = tmoe::to_host(ctx, cache.plan.losses);
    return Config::aux_loss_coefficient * l.data()[0] + Config::z_loss_coefficient * l.data()[1];
  }

  /// Backward of forward() plus the gradient of aux_loss(), as the CPU layer's backward: dx (x's shape) is
  /// OVERWRITTEN; the gate weight, task embedding and expert gradients ACCUMULATE. Float and double only.
  /// @throws ShapeError for mismatched shapes; Error if forward did not run with training = true, or routed by
  ///         Input::sentence_repr; DeviceError if CUDA fails.
  void backward(CudaContext& ctx, Cache& cache, ConstTensorView<Scalar, Cuda> dout, TensorView<Scalar, Cuda> dx)
    requires(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>)
  {
    const std::string op = "moe::Layer<Cuda>::backward";
    if (!(dout.shape() == cache.x.shape()) || !(dx.shape() == cache.x.shape())) {
      throw ShapeError(op + ": dout and dx must have the forward input's shape " + cache.x.shape().to_string() +
                       ", got dout " + dout.shape().to_string() + " and dx " + dx.shape().to_string());
    }
    if (!cache.training) {
      throw Error(op + ": run forward with training = true before backward (the GPU's inference paths keep no "
                       "gradient state)");
    }
    if (cache.sentence_override) {
      throw Error(op + ": forward routed by Input::sentence_repr (inference only); there is no gradient to it");
    }
    const std::int64_t N = cache.plan.tokens;
    if (N == 0) return;
    cache.d_gate.resize({N, K});
    TMOE_CUDA_CHECK(cudaMemsetAsync(cache.d_gate.data(), 0, cache.d_gate.bytes(), ctx.stream()));
    if (cache.task_path) {
      if constexpr (kTask) backward_task_ranges(ctx, cache, dout.data(), dx.data());
    } else {
      backward_permuted(ctx, cache, dout.data(), dx.data());
    }
    backward_gate(ctx, cache, dx.data());
  }

 private:
  struct Layout {
    std::int64_t rows = 0, columns = 0;
  };

  Layout validate(const Input<Scalar, Cuda>& in, const TensorView<Scalar, Cuda>& out) const {
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
    Layout lay;
    lay.rows = in.x.rank() == 3 ? in.x.dim(0) : 1;
    lay.columns = in.x.rank() == 3 ? in.x.dim(1) : in.x.dim(0);
    if (lay.rows * lay.columns >= (std::int64_t{1} << 30) / K) {
      throw ShapeError(op + ": at most 2^30 / K tokens per call on the GPU, got " +
                       std::to_string(lay.rows * lay.columns));
    }
    if (in.segment_ids.data() != nullptr || in.segment_ids.rank() != 0) {
      const Shape want = in.x.rank() == 3 ? Shape{lay.rows, lay.columns} : Shape{lay.columns};
      require_shape(op, "segment_ids", in.segment_ids, want);
    }
    if constexpr (kTask) {
      const bool per_row = in.task_ids.rank() == 1 && in.task_ids.dim(0) == lay.rows;
      const bool per_token = in.task_ids.numel() == lay.rows * lay.columns && in.task_ids.rank() == in.x.rank() - 1;
      if (!per_row && !per_token) {
        throw ShapeError(op + ": task routing needs task_ids of shape (" + std::to_string(lay.rows) + ") per row or (" +
                         std::to_string(lay.rows) + ", " + std::to_string(lay.columns) + ") per token for x " +
                         in.x.shape().to_string() + ", got " + in.task_ids.shape().to_string());
      }
    }
    return lay;
  }

  static void upload_normal(CudaContext& ctx, Tensor<Scalar, Cuda>& dst, std::uint64_t seed, std::uint64_t stream,
                            double sigma) {
    Tensor<Real, Cpu> h(dst.shape());
    nn::fill_normal<Real>(h.view(), seed, stream, sigma);
    upload_converted<Real>(ctx, dst, h.cview());
  }
  template <class S2>
  static void upload(CudaContext& ctx, Tensor<Scalar, Cuda>& dst, ConstTensorView<S2, Cpu> src) {
    require_shape("moe::Layer<Cuda>::copy_parameters_from", "parameter", src, dst.shape());
    upload_converted<S2>(ctx, dst, src);
  }
  template <class S2>
  static void upload_converted(CudaContext& ctx, Tensor<Scalar, Cuda>& dst, ConstTensorView<S2, Cpu> src) {
    if constexpr (std::is_same_v<S2, Scalar>) {
      copy<Scalar, Cuda, Cpu>(ctx, dst.view(), src);
    } else {
      Tensor<Scalar, Cpu> h(src.shape());
      for (std::int64_t i = 0; i < h.numel(); ++i)
        h.data()[i] = Scalar(static_cast<backend::cuda::acc_t<Scalar>>(src.data()[i]));
      copy<Scalar, Cuda, Cpu>(ctx, dst.view(), h.cview());
      ctx.synchronize();  // h is a pageable host buffer that dies here
    }
  }

  /// logits (G, E) = in (G, C) gate_weight^T, in full precision.
  void router_gemm(CudaContext& ctx, Real* logits, ConstTensorView<Scalar, Cuda> in) const {
    const std::int64_t G = in.dim(0), C = options_.d_model;
    backend::cuda::gemm_strided_batched<Scalar, Real>(ctx, G, E, C, {in.data(), C, 0}, Trans::kN,
                                                      {gate_weight_.value.data(), C, 0}, Trans::kT, {logits, E, 0}, 1,
                                                      0, 1, backend::cuda::GemmPrecision::kFull);
  }

  static void reset_plan(RoutingPlan<Real, Cuda>& plan, std::int64_t N, std::int64_t S, std::int64_t groups) {
    plan.tokens = N;
    plan.top_k = K;
    plan.experts = E;
    plan.group_size = S;
    plan.groups = groups;
    plan.has_losses = false;
    plan.permuted = false;
    plan.expert.resize({N, K});
    plan.gate.resize({N, K});
    plan.dispatched.resize({N, K});
  }

  /// Softmax + top-K over the gate rows, then the plan (gate.hpp steps 1-6), all on the stream.
  void route(CudaContext& ctx, Cache& cache, std::int64_t N, const ForwardArgs& args) const {
    namespace mk = backend::cuda::moe_kernels;
    using Capacity = typename Config::capacity_type;
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    auto& plan = cache.plan;
    const std::int64_t G = cache.logits.dim(0);
    const std::int64_t S = options_.group_size > 0 ? options_.group_size : N;
    const std::int64_t groups = (N + S - 1) / S;
    const bool dropless = Capacity::dropless;
    const std::int64_t cap = dropless ? -1 : Capacity::capacity(std::min(S, N), E);
    reset_plan(plan, N, S, groups);
    plan.permuted = true;
    plan.capacity = cap;
    plan.row_slots = dropless ? N * K : static_cast<std::int64_t>(E) * groups * cap;
    plan.slot.resize({N, K});
    plan.row.resize({N, K});
    plan.expert_count.resize({E});
    plan.expert_offset.resize({E + 1});
    plan.row_token.resize({plan.row_slots});
    plan.row_choice.resize({plan.row_slots});
    cache.probs.resize(cache.logits.shape());

    const std::int64_t items = N * K;
    const std::int64_t bins = static_cast<std::int64_t>(E) * K * groups;
    if (bins >= (std::int64_t{1} << 31)) {
      throw ShapeError("moe::Layer<Cuda>::forward: E * K * groups must stay below 2^31, got " + std::to_string(bins));
    }
    if (!args.training && groups == 1 && items <= mk::kSmallItems && bins <= mk::kSmallBins) {
      // A small batch at inference: the whole gate in one block.
      backend::cuda::WorkspaceCarver w;
      w.reserve<Real>(G * K);
      w.reserve<std::int32_t>(G * K);
      w.start(ctx.workspace(w.bytes()));
      Real* top_val = w.take<Real>(G * K);
      std::int32_t* top_idx = w.take<std::int32_t>(G * K);
      mk::route_small_kernel<Config, Real><<<1, mk::kSmallThreads, 0, stream>>>(
          cache.logits.data(), cache.probs.data(), G, cache.gate_row.data(), N, dropless ? 0 : cap, dropless, top_val,
          top_idx, plan.expert.data(), plan.gate.data(), plan.slot.data(), plan.dispatched.data(), plan.row.data(),
          plan.expert_count.data(), plan.expert_offset.data(), plan.row_token.data(), plan.row_choice.data(),
          plan.row_slots);
      TMOE_CUDA_CHECK_LAUNCH("route_small_kernel");
      return;
    }
    const int end_bit = std::bit_width(static_cast<std::uint64_t>(bins));

    // Scratch: CUB's temporary storage sizes first (host-side queries), then one workspace block.
    std::size_t hist_bytes = 0, scan_bytes = 0, sort_bytes = 0;
    TMOE_CUDA_CHECK(cub::DeviceHistogram::HistogramEven(nullptr, hist_bytes, static_cast<const std::uint32_t*>(nullptr),
                                                        static_cast<int*>(nullptr), static_cast<int>(bins + 1),
                                                        std::uint32_t{0}, static_cast<std::uint32_t>(bins),
                                                        static_cast<int>(items), stream));
    TMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int*>(nullptr),
                                                  static_cast<int*>(nullptr), static_cast<int>(bins), stream));
    TMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, sort_bytes, static_cast<const std::uint32_t*>(nullptr), static_cast<std::uint32_t*>(nullptr),
        static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr), static_cast<int>(items), 0,
        end_bit, stream));
    backend::cuda::WorkspaceCarver w;
    w.reserve<Real>(G * K);               // top_val
    w.reserve<std::int32_t>(G * K);       // top_idx
    w.reserve<Real>(items);               // norm
    // One reservation per take: each is rounded up to the carver's alignment.
    w.reserve<std::uint32_t>(items);      // keys
    w.reserve<std::uint32_t>(items);      // sorted keys
    w.reserve<std::int32_t>(items);       // items
    w.reserve<std::int32_t>(items);       // sorted items
    w.reserve<int>(bins);                 // count
    w.reserve<int>(bins);                 // start
    w.reserve_bytes(std::max({hist_bytes, scan_bytes, sort_bytes}));
    w.start(ctx.workspace(w.bytes()));
    Real* top_val = w.take<Real>(G * K);
    std::int32_t* top_idx = w.take<std::int32_t>(G * K);
    Real* norm = w.take<Real>(items);
    std::uint32_t* keys = w.take<std::uint32_t>(items);
    std::uint32_t* sorted_keys = w.take<std::uint32_t>(items);
    std::int32_t* item_ids = w.take<std::int32_t>(items);
    std::int32_t* sorted_items = w.take<std::int32_t>(items);
    int* count = w.take<int>(bins);
    int* start = w.take<int>(bins);
    std::byte* cub_tmp = w.take_bytes(std::max({hist_bytes, scan_bytes, sort_bytes}));

    // 1. Softmax and top-K, one warp per gate row.
    mk::softmax_top_k_kernel<E, K, Real><<<backend::cuda::blocks_for(G * 32, kThreads), kThreads, 0, stream>>>(
        cache.logits.data(), cache.probs.data(), top_val, top_idx, G);
    TMOE_CUDA_CHECK_LAUNCH("softmax_top_k_kernel");
    // 2 + 4. Choices, normalized weights, random policy, keys.
    mk::choices_kernel<Config, Real><<<backend::cuda::blocks_for(N, kThreads), kThreads, 0, stream>>>(
        cache.gate_row.data(), top_val, top_idx, N, S, groups, args.training, args.seed, args.rng_offset,
        plan.expert.data(), norm, keys, item_ids);
    TMOE_CUDA_CHECK_LAUNCH("choices_kernel");
    // 5. Histogram, scan, stable sort, slots.
    std::size_t bytes = hist_bytes;
    TMOE_CUDA_CHECK(cub::DeviceHistogram::HistogramEven(cub_tmp, bytes, keys, count, static_cast<int>(bins + 1),
                                                        std::uint32_t{0}, static_cast<std::uint32_t>(bins),
                                                        static_cast<int>(items), stream));
    bytes = scan_bytes;
    TMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(cub_tmp, bytes, count, start, static_cast<int>(bins), stream));
    bytes = sort_bytes;
    TMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(cub_tmp, bytes, keys, sorted_keys, item_ids, sorted_items,
                                                    static_cast<int>(items), 0, end_bit, stream));
    TMOE_CUDA_CHECK(cudaMemsetAsync(plan.slot.data(), 0xFF, plan.slot.bytes(), stream));
    TMOE_CUDA_CHECK(cudaMemsetAsync(plan.row.data(), 0xFF, plan.row.bytes(), stream));
    TMOE_CUDA_CHECK(cudaMemsetAsync(plan.dispatched.data(), 0, plan.dispatched.bytes(), stream));
    TMOE_CUDA_CHECK(cudaMemsetAsync(plan.row_token.data(), 0xFF, plan.row_token.bytes(), stream));
    TMOE_CUDA_CHECK(cudaMemsetAsync(plan.row_choice.data(), 0xFF, plan.row_choice.bytes(), stream));
    mk::slots_kernel<E, K><<<backend::cuda::blocks_for(items, kThreads), kThreads, 0, stream>>>(
        sorted_keys, sorted_items, count, start, items, groups, dropless ? 0 : cap, dropless, plan.slot.data(),
        plan.dispatched.data(), plan.row.data(), plan.row_token.data(), plan.row_choice.data());
    TMOE_CUDA_CHECK_LAUNCH("slots_kernel");
    mk::expert_sizes_kernel<E, K><<<backend::cuda::blocks_for(E + 1, kThreads), kThreads, 0, stream>>>(
        count, groups, dropless ? 0 : cap, dropless, plan.expert_count.data(), plan.expert_offset.data());
    TMOE_CUDA_CHECK_LAUNCH("expert_sizes_kernel");
    // 6. Final weights.
    mk::final_weights_kernel<Config, Real><<<backend::cuda::blocks_for(N, kThreads), kThreads, 0, stream>>>(
        cache.gate_row.data(), cache.probs.data(), plan.expert.data(), norm, plan.dispatched.data(), N,
        plan.gate.data());
    TMOE_CUDA_CHECK_LAUNCH("final_weights_kernel");
    // 3. Losses, when training.
    if (args.training) compute_losses(ctx, cache);
  }

  /// The loss partials of plan.group_size-token groups (chunks of kLossChunk tokens), carved from the workspace.
  struct LossPartials {
    std::int64_t chunks_per_group = 0;
    double* f = nullptr;      // (chunks, E) top-1 counts
    double* m = nullptr;      // (chunks, E) probability sums
    double* z = nullptr;      // (chunks) z-loss sums
    double* valid = nullptr;  // (chunks) non-padding tokens
  };
  static void reserve_partials(backend::cuda::WorkspaceCarver& w, const RoutingPlan<Real, Cuda>& plan) {
    const std::int64_t chunks = plan.groups * partial_chunks(plan);
    w.reserve<double>(chunks * E);  // one reservation per take of loss_partials
    w.reserve<double>(chunks * E);
    w.reserve<double>(chunks);
    w.reserve<double>(chunks);
  }
  static std::int64_t partial_chunks(const RoutingPlan<Real, Cuda>& plan) {
    return (plan.group_size + backend::cuda::moe_kernels::kLossChunk - 1) / backend::cuda::moe_kernels::kLossChunk;
  }
  /// Launches the partials over the plan's tokens (the cache's gate rows, probabilities, logits and top-1 experts).
  static LossPartials loss_partials(CudaContext& ctx, const Cache& cache, backend::cuda::WorkspaceCarver& w) {
    const auto& plan = cache.plan;
    LossPartials l;
    l.chunks_per_group = partial_chunks(plan);
    const std::int64_t chunks = plan.groups * l.chunks_per_group;
    l.f = w.take<double>(chunks * E);
    l.m = w.take<double>(chunks * E);
    l.z = w.take<double>(chunks);
    l.valid = w.take<double>(chunks);
    const int threads = std::min(1024, (E + 31) / 32 * 32);
    backend::cuda::moe_kernels::loss_partials_kernel<E, K, Real><<<static_cast<unsigned>(chunks), threads, 0, ctx.stream()>>>(
        cache.gate_row.data(), cache.probs.data(), cache.logits.data(), plan.expert.data(), plan.tokens,
        plan.group_size, l.chunks_per_group, l.f, l.m, l.z, l.valid);
    TMOE_CUDA_CHECK_LAUNCH("loss_partials_kernel");
    return l;
  }

  /// plan.losses = (aux loss, z-loss) of the plan's tokens, on the stream.
  static void compute_losses(CudaContext& ctx, Cache& cache) {
    auto& plan = cache.plan;
    plan.losses.resize({2});
    plan.has_losses = true;
    backend::cuda::WorkspaceCarver w;
    reserve_partials(w, plan);
    w.start(ctx.workspace(w.bytes()));
    const LossPartials l = loss_partials(ctx, cache, w);
    backend::cuda::moe_kernels::loss_final_kernel<E><<<1, 256, 0, ctx.stream()>>>(
        l.f, l.m, l.z, l.valid, plan.tokens, plan.group_size, plan.groups, l.chunks_per_group, plan.losses.data());
    TMOE_CUDA_CHECK_LAUNCH("loss_final_kernel");
  }

  // Permuted path: gather -> expert GEMMs -> activation -> expert GEMMs -> combine.
  void forward_permuted(CudaContext& ctx, const Scalar* x, Scalar* y, Cache& cache, bool training) const {
    namespace mk = backend::cuda::moe_kernels;
    using backend::cuda::GemmOperand;
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens, C = options_.d_model, F = options_.d_ff, R = plan.row_slots;
    cache.dispatched.resize({R, C});
    cache.hidden.resize({R, F});
    cache.expert_out.resize({R, C});
    const bool keep_pre = training && !std::is_same_v<Act, nn::Relu>;
    if (keep_pre) cache.pre.resize({R, F});
    const ConstTensorView<Scalar, Cuda> xs(x, {N, C});
    backend::cuda::gather_rows<Scalar, std::int64_t>(ctx, cache.dispatched.view(), xs, plan.row_token.cview());

    if (plan.capacity >= 0 && plan.groups * plan.capacity <= mk::kExpertRowsMax && !training) {
      // A few rows per expert: stream only the experts that have rows (the plan's counts, on the device). Inference
      // only: the hidden rows of the other experts stay unwritten, and backward reads every row.
      const std::int64_t rows = plan.groups * plan.capacity;
      backend::cuda::WorkspaceCarver w;
      w.reserve<std::int32_t>(E + 1);
      w.start(ctx.workspace(w.bytes()));
      std::int32_t* active = w.take<std::int32_t>(E + 1);
      mk::active_experts_kernel<E><<<1, 32, 0, stream>>>(plan.expert_count.data(), active + 1, active);
      TMOE_CUDA_CHECK_LAUNCH("active_experts_kernel");
      const std::int64_t slots = std::min<std::int64_t>(E, N * K);  // no more experts than choices can have rows
      mk::ExpertRowsArgs<Scalar> up;
      up.x = cache.dispatched.data();
      up.ldx = C;
      up.x_group_stride = rows * C;
      up.w = wi_.value.data();
      up.y = cache.hidden.data();
      up.ldy = F;
      up.y_group_stride = rows * F;
      up.active_list = active + 1;
      up.active_count = active;
      up.rows = rows;
      up.kd = C;
      up.nout = F;
      up.groups = slots;
      mk::expert_rows<Act, true, Scalar>(stream, up, resident_blocks(ctx));
      mk::ExpertRowsArgs<Scalar> down;
      down.x = cache.hidden.data();
      down.ldx = F;
      down.x_group_stride = rows * F;
      down.w = wo_.value.data();
      down.y = cache.expert_out.data();
      down.ldy = C;
      down.y_group_stride = rows * C;
      down.active_list = active + 1;
      down.active_count = active;
      down.rows = rows;
      down.kd = F;
      down.nout = C;
      down.groups = slots;
      mk::expert_rows<Act, false, Scalar>(stream, down, resident_blocks(ctx));
    } else if (plan.capacity >= 0) {
      // One strided-batched GEMM per layer of the FFN over E blocks of G*C rows.
      const std::int64_t rows = plan.groups * plan.capacity;
      backend::cuda::gemm_strided_batched<Scalar, Scalar>(
          ctx, rows, F, C, {cache.dispatched.data(), C, rows * C}, Trans::kN, {wi_.value.data(), C, F * C}, Trans::kT,
          GemmOperand<Scalar>{cache.hidden.data(), F, rows * F}, 1, 0, E);
      activate(stream, cache.hidden.data(), keep_pre ? cache.pre.data() : nullptr, R * F);
      backend::cuda::gemm_strided_batched<Scalar, Scalar>(
          ctx, rows, C, F, {cache.hidden.data(), F, rows * F}, Trans::kN, {wo_.value.data(), F, C * F}, Trans::kT,
          GemmOperand<Scalar>{cache.expert_out.data(), C, rows * C}, 1, 0, E);
    } else {
      // Dropless: the expert sizes come to the host once, then one GEMM pair per non-empty expert.
      const std::vector<std::int64_t> offset = offsets_on_host(ctx, plan);
      for (int e = 0; e < E; ++e) {
        const std::int64_t r0 = offset[static_cast<std::size_t>(e)], r1 = offset[static_cast<std::size_t>(e) + 1];
        if (r0 == r1) continue;
        backend::cuda::gemm_strided_batched<Scalar, Scalar>(
            ctx, r1 - r0, F, C, {cache.dispatched.data() + r0 * C, C, 0}, Trans::kN,
            {wi_.value.data() + e * F * C, C, 0}, Trans::kT, GemmOperand<Scalar>{cache.hidden.data() + r0 * F, F, 0}, 1,
            0);
      }
      const std::int64_t used = offset[static_cast<std::size_t>(E)];
      activate(stream, cache.hidden.data(), keep_pre ? cache.pre.data() : nullptr, used * F);
      for (int e = 0; e < E; ++e) {
        const std::int64_t r0 = offset[static_cast<std::size_t>(e)], r1 = offset[static_cast<std::size_t>(e) + 1];
        if (r0 == r1) continue;
        backend::cuda::gemm_strided_batched<Scalar, Scalar>(
            ctx, r1 - r0, C, F, {cache.hidden.data() + r0 * F, F, 0}, Trans::kN, {wo_.value.data() + e * C * F, F, 0},
            Trans::kT, GemmOperand<Scalar>{cache.expert_out.data() + r0 * C, C, 0}, 1, 0);
      }
    }
    mk::combine_kernel<K, Scalar, Real><<<backend::cuda::blocks_for(N * C, kThreads), kThreads, 0, stream>>>(
        y, cache.expert_out.data(), plan.gate.data(), plan.row.data(), N, C);
    TMOE_CUDA_CHECK_LAUNCH("combine_kernel");
  }

  /// The dropless plan's E + 1 expert offsets on the host (one synchronization).
  static std::vector<std::int64_t> offsets_on_host(CudaContext& ctx, const RoutingPlan<Real, Cuda>& plan) {
    std::vector<std::int64_t> offset(static_cast<std::size_t>(E) + 1);
    TMOE_CUDA_CHECK(cudaMemcpyAsync(offset.data(), plan.expert_offset.data(), offset.size() * sizeof(std::int64_t),
                                    cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    return offset;
  }

  /// Blocks of expert_rows_kernel for one resident wave (its 70-100 registers a thread allow about 3-4 blocks of 256
  /// threads per multiprocessor).
  static int resident_blocks(const CudaContext& ctx) noexcept { return ctx.multiprocessors() * 4; }

  static void activate(cudaStream_t stream, Scalar* h, Scalar* pre, std::int64_t count) {
    if (count == 0) return;
    constexpr int kThreads = 256;
    backend::cuda::moe_kernels::activation_inplace_kernel<Act, Scalar>
        <<<backend::cuda::blocks_for(count, kThreads), kThreads, 0, stream>>>(h, pre, count);
    TMOE_CUDA_CHECK_LAUNCH("activation_inplace_kernel");
  }

  /// Sentence routing: gate rows and per-sequence means, on the stream (gate.hpp's numbering).
  void sentence_gate_rows(CudaContext& ctx, const Input<Scalar, Cuda>& in, const Layout& lay, Cache& cache) const {
    namespace mk = backend::cuda::moe_kernels;
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    const std::int64_t N = lay.rows * lay.columns, C = options_.d_model;
    // Without segment ids a sequence is a row; with them there are at most N sequences (rows beyond the real
    // count stay zero and no token reads them).
    const std::int64_t G = in.segment_ids.data() == nullptr ? lay.rows : N;
    cache.gate_input.resize({G, C});
    std::size_t scan_bytes = 0;
    TMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const std::int32_t*>(nullptr),
                                                  static_cast<std::int32_t*>(nullptr), static_cast<int>(N), stream));
    backend::cuda::WorkspaceCarver w;
    w.reserve<std::int32_t>(N);  // starts (one reservation per take: each is rounded up to the alignment)
    w.reserve<std::int32_t>(N);  // first
    w.reserve<std::int32_t>(N);  // seq
    w.reserve<Real>(G);
    w.reserve_bytes(scan_bytes);
    w.start(ctx.workspace(w.bytes()));
    std::int32_t* starts = w.take<std::int32_t>(N);
    std::int32_t* first = w.take<std::int32_t>(N);
    std::int32_t* seq = w.take<std::int32_t>(N);
    Real* counts = w.take<Real>(G);
    std::byte* tmp = w.take_bytes(scan_bytes);
    const unsigned blocks = backend::cuda::blocks_for(N, kThreads);
    mk::sentence_firsts_kernel<<<blocks, kThreads, 0, stream>>>(in.segment_ids.data(), N, lay.columns, starts, first);
    TMOE_CUDA_CHECK_LAUNCH("sentence_firsts_kernel");
    TMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp, scan_bytes, starts, seq, static_cast<int>(N), stream));
    mk::sentence_gate_rows_kernel<<<blocks, kThreads, 0, stream>>>(first, seq, N, lay.columns, cache.gate_row.data());
    TMOE_CUDA_CHECK_LAUNCH("sentence_gate_rows_kernel");
    TMOE_CUDA_CHECK(cudaMemsetAsync(cache.gate_input.data(), 0, cache.gate_input.bytes(), stream));
    TMOE_CUDA_CHECK(cudaMemsetAsync(counts, 0, static_cast<std::size_t>(G) * sizeof(Real), stream));
    const dim3 grid(backend::cuda::blocks_for(C, 128), static_cast<unsigned>(lay.rows));
    mk::sentence_means_kernel<Scalar, Real><<<grid, 128, 0, stream>>>(in.x.data(), cache.gate_row.data(), lay.rows,
                                                                      lay.columns, C, cache.gate_input.data(), counts);
    TMOE_CUDA_CHECK_LAUNCH("sentence_means_kernel");
    mk::sentence_scale_kernel<Real>
        <<<backend::cuda::blocks_for(G * C, kThreads), kThreads, 0, stream>>>(cache.gate_input.data(), counts, G, C);
    TMOE_CUDA_CHECK_LAUNCH("sentence_scale_kernel");
  }

  /// Task routing's gate rows, on the device (padding and ids out of range: -1), and the host's copy for the ranges.
  /// With Input::host_task_ids every host id is checked and nothing is read back; otherwise the task and segment ids
  /// come to the host (one synchronization) and are checked as the CPU layer checks them.
  std::vector<std::int32_t> task_gate_rows(CudaContext& ctx, const Input<Scalar, Cuda>& in, const Layout& lay,
                                           Cache& cache) const {
    const std::string op = "moe::Layer::forward";
    const std::int64_t N = lay.rows * lay.columns, T = options_.num_tasks;
    const bool per_token = task_ids_per_token(in.task_ids, lay.rows);
    std::vector<std::int32_t> rows(static_cast<std::size_t>(N));
    if (in.host_task_ids.data() != nullptr) {
      require_shape(op, "host_task_ids", in.host_task_ids, in.task_ids.shape());
      const std::int32_t* h = in.host_task_ids.data();
      for (std::int64_t i = 0; i < in.host_task_ids.numel(); ++i) {
        if (h[i] < 0 || h[i] >= T) {
          throw ShapeError(op + ": unknown task id " + std::to_string(h[i]) + " at index " + std::to_string(i) +
                           " of host_task_ids (padding included); expected an id in [0, " + std::to_string(T) + ")");
        }
      }
      for (std::int64_t n = 0; n < N; ++n) rows[static_cast<std::size_t>(n)] = per_token ? h[n] : h[n / lay.columns];
    } else {
      const Tensor<std::int32_t, Cpu> tasks = tmoe::to_host(ctx, in.task_ids);
      Tensor<std::int32_t, Cpu> segs;
      if (in.segment_ids.data() != nullptr) segs = tmoe::to_host(ctx, in.segment_ids);
      TokenLayout layout;
      layout.rows = lay.rows;
      layout.columns = lay.columns;
      layout.segment_ids = in.segment_ids.data() != nullptr ? segs.data() : nullptr;
      moe::task_gate_rows(layout, tasks.data(), per_token, T, rows.data(), op);
    }
    backend::cuda::moe_kernels::task_gate_rows_kernel<<<backend::cuda::blocks_for(N, 256), 256, 0, ctx.stream()>>>(
        in.task_ids.data(), per_token, in.segment_ids.data(), N, lay.columns, T, cache.gate_row.data());
    TMOE_CUDA_CHECK_LAUNCH("task_gate_rows_kernel");
    return rows;
  }

  /// Every task's routing on the device: top_idx (T, K) experts and weights (T, K), the CPU's task_choice.
  struct DeviceRoutes {
    std::int32_t* top_idx = nullptr;
    Real* weights = nullptr;
    Real* logits = nullptr;  // (T, E)
    Real* probs = nullptr;   // (T, E)
  };
  static void reserve_routes(backend::cuda::WorkspaceCarver& w, std::int64_t T) {
    w.reserve<Real>(T * E * 2 + T * K * 2);
    w.reserve<std::int32_t>(T * K);
  }
  /// Every task's routes on the device, from `fixed_logits` (num_tasks, E) when given, else from the weights.
  DeviceRoutes device_routes(CudaContext& ctx, backend::cuda::WorkspaceCarver& w,
                             const Real* fixed_logits = nullptr) const requires kTask {
    const std::int64_t T = options_.num_tasks;
    Real* logits = w.take<Real>(T * E * 2 + T * K * 2);
    Real* probs = logits + T * E;
    Real* top_val = probs + T * E;
    DeviceRoutes r;
    r.logits = logits;
    r.probs = probs;
    r.weights = top_val + T * K;
    r.top_idx = w.take<std::int32_t>(T * K);
    if (fixed_logits != nullptr) {
      TMOE_CUDA_CHECK(cudaMemcpyAsync(logits, fixed_logits, static_cast<std::size_t>(T * E) * sizeof(Real),
                                      cudaMemcpyDeviceToDevice, ctx.stream()));
    } else {
      router_gemm(ctx, logits, task_embedding_.value.cview());
    }
    backend::cuda::moe_kernels::softmax_top_k_kernel<E, K, Real>
        <<<backend::cuda::blocks_for(T * 32, 256), 256, 0, ctx.stream()>>>(logits, probs, top_val, r.top_idx, T);
    TMOE_CUDA_CHECK_LAUNCH("softmax_top_k_kernel");
    backend::cuda::moe_kernels::task_weights_kernel<Config, Real>
        <<<backend::cuda::blocks_for(T, 256), 256, 0, ctx.stream()>>>(top_val, T, r.weights);
    TMOE_CUDA_CHECK_LAUNCH("task_weights_kernel");
    return r;
  }

  /// Every task's K experts and weights on the host (one synchronization).
  std::vector<TaskRoute<Real, K>> task_routes(CudaContext& ctx) const requires kTask {
    const std::int64_t T = options_.num_tasks;
    backend::cuda::WorkspaceCarver w;
    reserve_routes(w, T);
    w.start(ctx.workspace(w.bytes()));
    const DeviceRoutes d = device_routes(ctx, w);
    return routes_to_host(ctx, d);
  }
  std::vector<TaskRoute<Real, K>> routes_to_host(CudaContext& ctx, const DeviceRoutes& d) const {
    const std::int64_t T = options_.num_tasks;
    std::vector<std::int32_t> idx(static_cast<std::size_t>(T * K));
    std::vector<Real> wts(static_cast<std::size_t>(T * K));
    TMOE_CUDA_CHECK(cudaMemcpyAsync(idx.data(), d.top_idx, idx.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost,
                                    ctx.stream()));
    TMOE_CUDA_CHECK(
        cudaMemcpyAsync(wts.data(), d.weights, wts.size() * sizeof(Real), cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    std::vector<TaskRoute<Real, K>> routes(static_cast<std::size_t>(T));
    for (std::int64_t t = 0; t < T; ++t) {
      for (int j = 0; j < K; ++j) {
        routes[static_cast<std::size_t>(t)].experts[static_cast<std::size_t>(j)] =
            idx[static_cast<std::size_t>(t * K + j)];
        routes[static_cast<std::size_t>(t)].weights[static_cast<std::size_t>(j)] =
            wts[static_cast<std::size_t>(t * K + j)];
      }
    }
    return routes;
  }

  /// Ranges up to this many rows run through expert_rows_kernel (the task's experts picked on the device, nothing read
  /// back); longer ones through cuBLAS GEMMs, after one synchronization that brings the routes to the host.
  static constexpr std::int64_t kTaskRowsSmall = backend::cuda::moe_kernels::kExpertRowsMax;

  /// Task path: each task's tokens as one contiguous range through K dense FFNs. Gathers the tokens by task first when
  /// the batch does not hold them contiguously.
  void forward_task_ranges(CudaContext& ctx, const Input<Scalar, Cuda>& in, const Layout& lay,
                           TensorView<Scalar, Cuda> out, Cache& cache, bool training,
                           const Real* fixed_logits) const requires kTask {
    namespace mk = backend::cuda::moe_kernels;
    using backend::cuda::GemmOperand;
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    const std::int64_t N = lay.rows * lay.columns, C = options_.d_model, F = options_.d_ff;
    cache.task_path = true;
    backend::cuda::WorkspaceCarver w;
    reserve_routes(w, options_.num_tasks);
    w.start(ctx.workspace(w.bytes()));
    const DeviceRoutes routes = device_routes(ctx, w, fixed_logits);
    const std::vector<std::int32_t> gate_row = task_gate_rows(ctx, in, lay, cache);

    // The plan of the task path: every valid token's K choices, all dispatched. Capacity groups as on the CPU (they
    // only matter to the aux loss).
    auto& plan = cache.plan;
    const std::int64_t S = options_.group_size > 0 ? options_.group_size : N;
    reset_plan(plan, N, S, (N + S - 1) / S);
    plan.capacity = -1;
    mk::task_plan_kernel<K, Real><<<backend::cuda::blocks_for(N, kThreads), kThreads, 0, stream>>>(
        cache.gate_row.data(), routes.top_idx, routes.weights, N, plan.expert.data(), plan.gate.data(),
        plan.dispatched.data());
    TMOE_CUDA_CHECK_LAUNCH("task_plan_kernel");

    // Ranges: maximal runs of one task (padding joins its run), or a stable counting sort by task.
    std::vector<std::int64_t> ranges;  // (begin, end, task) triples
    std::vector<std::uint8_t> seen(static_cast<std::size_t>(options_.num_tasks), 0);
    bool contiguous = true;
    std::int64_t begin = 0, current = -1;
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int32_t t = gate_row[static_cast<std::size_t>(n)];
      if (t < 0 || t == current) continue;
      if (current >= 0) ranges.insert(ranges.end(), {begin, n, current});
      if (seen[static_cast<std::size_t>(t)]) contiguous = false;
      seen[static_cast<std::size_t>(t)] = 1;
      begin = current < 0 ? 0 : n;
      current = t;
    }
    if (current >= 0) ranges.insert(ranges.end(), {begin, N, current});
    const Scalar* xs = in.x.data();
    Scalar* ys = out.data();
    std::int64_t routed = N;
    Tensor<std::int64_t, Cuda>& order_dev = cache.task_order_device;
    cache.task_order.clear();
    if (!contiguous) {
      std::vector<std::int64_t> count(static_cast<std::size_t>(options_.num_tasks) + 1, 0);
      for (std::int32_t t : gate_row) {
        if (t >= 0) ++count[static_cast<std::size_t>(t) + 1];
      }
      for (std::size_t t = 1; t < count.size(); ++t) count[t] += count[t - 1];
      routed = count.back();
      ranges.clear();
      for (std::int64_t t = 0; t < options_.num_tasks; ++t) {
        const auto b = count[static_cast<std::size_t>(t)], e = count[static_cast<std::size_t>(t) + 1];
        if (b < e) ranges.insert(ranges.end(), {b, e, t});
      }
      Tensor<std::int64_t, Cpu> order({routed});
      for (std::int64_t n = 0; n < N; ++n) {
        const std::int32_t t = gate_row[static_cast<std::size_t>(n)];
        if (t >= 0) order.data()[count[static_cast<std::size_t>(t)]++] = n;
      }
      order_dev = tmoe::to_device(ctx, order);
      cache.task_order.assign(order.data(), order.data() + routed);
      cache.task_x.resize({routed, C});
      cache.task_y.resize({routed, C});
      backend::cuda::gather_rows<Scalar, std::int64_t>(ctx, cache.task_x.view(), in.x.reshape({N, C}),
                                                       order_dev.cview());
      xs = cache.task_x.data();
      ys = cache.task_y.data();
    }

    cache.task_range = ranges;

    // Hidden (routed, K*F): expert j's activations in columns [j*F, (j+1)*F). Training keeps the pre-activations
    // when backward needs them (not ReLU), which only the GEMM path below does.
    cache.hidden.resize({routed, K * F});
    const bool keep_pre = training && !std::is_same_v<Act, nn::Relu>;
    if (keep_pre) cache.pre.resize({routed, K * F});
    std::int64_t longest = 0;
    for (std::size_t i = 0; i < ranges.size(); i += 3) longest = std::max(longest, ranges[i + 1] - ranges[i]);
    if (longest <= kTaskRowsSmall && !keep_pre) {
      // Few rows: the task's experts and weights are read on the device; the K experts' outputs sum in registers.
      for (std::size_t i = 0; i < ranges.size(); i += 3) {
        const std::int64_t b = ranges[i], e = ranges[i + 1], t = ranges[i + 2];
        mk::ExpertRowsArgs<Scalar> up;
        up.x = xs + b * C;
        up.ldx = C;
        up.w = wi_.value.data();
        up.y = cache.hidden.data() + b * K * F;
        up.ldy = K * F;
        up.y_group_stride = F;
        up.expert_of = routes.top_idx + t * K;
        up.rows = e - b;
        up.kd = C;
        up.nout = F;
        up.groups = K;
        mk::expert_rows<Act, true, Scalar>(stream, up, resident_blocks(ctx));
        mk::ExpertRowsArgs<Scalar> down;
        down.x = cache.hidden.data() + b * K * F;
        down.ldx = K * F;
        down.x_j_offset = F;
        down.w = wo_.value.data();
        down.y = ys + b * C;
        down.ldy = C;
        down.expert_of = routes.top_idx + t * K;
        down.alpha = routes.weights + t * K;
        down.terms = K;
        down.rows = e - b;
        down.kd = F;
        down.nout = C;
        down.groups = 1;
        mk::expert_rows<Act, false, Scalar>(stream, down, resident_blocks(ctx));
      }
    } else {
      const std::vector<TaskRoute<Real, K>> host = routes_to_host(ctx, routes);
      for (std::size_t i = 0; i < ranges.size(); i += 3) {
        const std::int64_t b = ranges[i], e = ranges[i + 1], t = ranges[i + 2];
        for (int j = 0; j < K; ++j) {
          const std::int64_t ex = host[static_cast<std::size_t>(t)].experts[static_cast<std::size_t>(j)];
          backend::cuda::gemm_strided_batched<Scalar, Scalar>(
              ctx, e - b, F, C, {xs + b * C, C, 0}, Trans::kN, {wi_.value.data() + ex * F * C, C, 0}, Trans::kT,
              GemmOperand<Scalar>{cache.hidden.data() + b * K * F + j * F, K * F, 0}, 1, 0);
        }
      }
      activate(stream, cache.hidden.data(), keep_pre ? cache.pre.data() : nullptr, routed * K * F);
      // The K output GEMMs accumulate in the output (beta = 1), as the CPU layer does.
      for (std::size_t i = 0; i < ranges.size(); i += 3) {
        const std::int64_t b = ranges[i], e = ranges[i + 1], t = ranges[i + 2];
        for (int j = 0; j < K; ++j) {
          const std::int64_t ex = host[static_cast<std::size_t>(t)].experts[static_cast<std::size_t>(j)];
          const auto wj = static_cast<backend::cuda::acc_t<Scalar>>(
              host[static_cast<std::size_t>(t)].weights[static_cast<std::size_t>(j)]);
          backend::cuda::gemm_strided_batched<Scalar, Scalar>(
              ctx, e - b, C, F, {cache.hidden.data() + b * K * F + j * F, K * F, 0}, Trans::kN,
              {wo_.value.data() + ex * C * F, F, 0}, Trans::kT, GemmOperand<Scalar>{ys + b * C, C, 0}, wj,
              j == 0 ? 0 : 1);
        }
      }
    }
    if (!contiguous) {
      TMOE_CUDA_CHECK(cudaMemsetAsync(out.data(), 0, out.numel() * sizeof(Scalar), stream));
      if (routed > 0) {
        mk::scatter_rows_kernel<Scalar><<<backend::cuda::blocks_for(routed * C, kThreads), kThreads, 0, stream>>>(
            out.data(), cache.task_y.data(), order_dev.data(), routed, C);
        TMOE_CUDA_CHECK_LAUNCH("scatter_rows_kernel");
      }
    } else if (ranges.empty()) {
      TMOE_CUDA_CHECK(cudaMemsetAsync(out.data(), 0, out.numel() * sizeof(Scalar), stream));
    }
    // Padding rows computed inside a range (or gathered by host ids) are zero in the output.
    mk::zero_padding_rows_kernel<Scalar>
        <<<backend::cuda::blocks_for(N * C, kThreads), kThreads, 0, stream>>>(out.data(), cache.gate_row.data(), N, C);
    TMOE_CUDA_CHECK_LAUNCH("zero_padding_rows_kernel");
    if (training) {
      // Backward and the losses need every task's logits and probabilities. Last: the routes live in the workspace,
      // which compute_losses carves again.
      const std::int64_t T = options_.num_tasks;
      cache.logits.resize({T, E});
      cache.probs.resize({T, E});
      TMOE_CUDA_CHECK(cudaMemcpyAsync(cache.logits.data(), routes.logits, cache.logits.bytes(),
                                      cudaMemcpyDeviceToDevice, stream));
      TMOE_CUDA_CHECK(cudaMemcpyAsync(cache.probs.data(), routes.probs, cache.probs.bytes(), cudaMemcpyDeviceToDevice,
                                      stream));
      compute_losses(ctx, cache);
    }
  }

  // ---- backward ------------------------------------------------------------------------------------------------

  /// The first half of the experts' backward over `batch` experts from e0, blocks of `rows` rows each at strides
  /// rows * ld: dH = dY wo_e, dwo_e += dY^T H. H and dH have leading dimension ldh (the task path interleaves its K
  /// experts' columns).
  void experts_backward_out(CudaContext& ctx, std::int64_t rows, std::int64_t e0, std::int64_t batch, const Scalar* dy,
                            const Scalar* h, Scalar* dh, std::int64_t ldh, Scalar alpha = Scalar(1)) {
    const std::int64_t C = options_.d_model, F = options_.d_ff;
    backend::cuda::gemm_strided_batched<Scalar, Scalar>(ctx, rows, F, C, {dy, C, rows * C}, Trans::kN,
                                                        {wo_.value.data() + e0 * C * F, F, C * F}, Trans::kN,
                                                        {dh, ldh, rows * ldh}, alpha, 0, batch);
    backend::cuda::gemm_strided_batched<Scalar, Scalar>(ctx, C, F, rows, {dy, C, rows * C}, Trans::kT,
                                                        {h, ldh, rows * ldh}, Trans::kN,
                                                        {wo_.grad.data() + e0 * C * F, F, C * F}, alpha, 1, batch);
  }
  /// The second half, after the activation's backward: dwi_e += dH^T X, dX = dH wi_e + beta dX.
  void experts_backward_in(CudaContext& ctx, std::int64_t rows, std::int64_t e0, std::int64_t batch, const Scalar* x,
                           const Scalar* dh, std::int64_t ldh, Scalar* dx, Scalar beta = Scalar(0)) {
    const std::int64_t C = options_.d_model, F = options_.d_ff;
    backend::cuda::gemm_strided_batched<Scalar, Scalar>(ctx, F, C, rows, {dh, ldh, rows * ldh}, Trans::kT,
                                                        {x, C, rows * C}, Trans::kN,
                                                        {wi_.grad.data() + e0 * F * C, C, F * C}, 1, 1, batch);
    backend::cuda::gemm_strided_batched<Scalar, Scalar>(ctx, rows, C, F, {dh, ldh, rows * ldh}, Trans::kN,
                                                        {wi_.value.data() + e0 * F * C, C, F * C}, Trans::kN,
                                                        {dx, C, rows * C}, 1, beta, batch);
  }

  void activation_backward(cudaStream_t stream, Scalar* dh, const Scalar* h, const Scalar* pre, std::int64_t count) {
    if (count == 0) return;
    backend::cuda::moe_kernels::activation_backward_kernel<Act, Scalar>
        <<<backend::cuda::blocks_for(count, 256), 256, 0, stream>>>(dh, h, pre, count);
    TMOE_CUDA_CHECK_LAUNCH("activation_backward_kernel");
  }

  // Permuted path: combine backward -> expert GEMMs backward -> inverse permutation into dx (overwritten).
  void backward_permuted(CudaContext& ctx, Cache& cache, const Scalar* dy, Scalar* dx) {
    namespace mk = backend::cuda::moe_kernels;
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens, C = options_.d_model, F = options_.d_ff, R = plan.row_slots;
    cache.d_expert_out.resize({R, C});
    cache.d_hidden.resize({R, F});
    cache.d_dispatched.resize({R, C});
    mk::combine_backward_kernel<K, Scalar, Real><<<backend::cuda::blocks_for(R * mk::kWarp, kThreads), kThreads, 0, stream>>>(
        dy, cache.expert_out.data(), plan.gate.data(), plan.row_token.data(), plan.row_choice.data(), R, C,
        cache.d_expert_out.data(), cache.d_gate.data());
    TMOE_CUDA_CHECK_LAUNCH("combine_backward_kernel");
    const Scalar* pre = std::is_same_v<Act, nn::Relu> ? nullptr : cache.pre.data();
    if (plan.capacity >= 0) {
      // Fixed blocks of G*C rows per expert; empty rows hold zero inputs and get zero gradients.
      const std::int64_t rows = plan.groups * plan.capacity;
      experts_backward_out(ctx, rows, 0, E, cache.d_expert_out.data(), cache.hidden.data(), cache.d_hidden.data(), F);
      activation_backward(stream, cache.d_hidden.data(), cache.hidden.data(), pre, R * F);
      experts_backward_in(ctx, rows, 0, E, cache.dispatched.data(), cache.d_hidden.data(), F,
                          cache.d_dispatched.data());
    } else {
      // Dropless: the expert sizes come to the host again (one synchronization), then each non-empty expert.
      const std::vector<std::int64_t> offset = offsets_on_host(ctx, plan);
      for (int e = 0; e < E; ++e) {
        const std::int64_t r0 = offset[static_cast<std::size_t>(e)], r1 = offset[static_cast<std::size_t>(e) + 1];
        if (r0 < r1) {
          experts_backward_out(ctx, r1 - r0, e, 1, cache.d_expert_out.data() + r0 * C, cache.hidden.data() + r0 * F,
                               cache.d_hidden.data() + r0 * F, F);
        }
      }
      const std::int64_t used = offset[static_cast<std::size_t>(E)];
      activation_backward(stream, cache.d_hidden.data(), cache.hidden.data(), pre, used * F);
      for (int e = 0; e < E; ++e) {
        const std::int64_t r0 = offset[static_cast<std::size_t>(e)], r1 = offset[static_cast<std::size_t>(e) + 1];
        if (r0 < r1) {
          experts_backward_in(ctx, r1 - r0, e, 1, cache.dispatched.data() + r0 * C, cache.d_hidden.data() + r0 * F, F,
                              cache.d_dispatched.data() + r0 * C);
        }
      }
    }
    mk::uncombine_kernel<K, Scalar><<<backend::cuda::blocks_for(N * C, kThreads), kThreads, 0, stream>>>(
        dx, cache.d_dispatched.data(), plan.row.data(), N, C);
    TMOE_CUDA_CHECK_LAUNCH("uncombine_kernel");
  }

  // Task path: each task range through its K experts' backward; dx overwritten (zeros on padding).
  void backward_task_ranges(CudaContext& ctx, Cache& cache, const Scalar* dy, Scalar* dx) requires kTask {
    namespace mk = backend::cuda::moe_kernels;
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    const std::int64_t N = cache.plan.tokens, C = options_.d_model, F = options_.d_ff;
    const bool permuted = !cache.task_order.empty();
    const std::int64_t routed = permuted ? static_cast<std::int64_t>(cache.task_order.size()) : N;
    const std::int64_t* order = permuted ? cache.task_order_device.data() : nullptr;
    const std::vector<TaskRoute<Real, K>> routes = task_routes(ctx);  // one synchronization

    // The output gradient in task order, zero on padding rows (forward wrote zeros there whatever the input).
    cache.d_expert_out.resize({routed, C});
    cache.expert_out.resize({routed, C});  // scratch: FFN_j(x) of a range, for the gate gradient
    cache.d_hidden.resize({routed, K * F});
    cache.d_dispatched.resize({routed, C});
    Scalar* dyt = cache.d_expert_out.data();
    if (permuted) {
      backend::cuda::gather_rows<Scalar, std::int64_t>(ctx, cache.d_expert_out.view(),
                                                       ConstTensorView<Scalar, Cuda>(dy, {N, C}),
                                                       cache.task_order_device.cview());
    } else {
      TMOE_CUDA_CHECK(cudaMemcpyAsync(dyt, dy, static_cast<std::size_t>(N * C) * sizeof(Scalar),
                                      cudaMemcpyDeviceToDevice, stream));
      mk::zero_padding_rows_kernel<Scalar>
          <<<backend::cuda::blocks_for(N * C, kThreads), kThreads, 0, stream>>>(dyt, cache.gate_row.data(), N, C);
      TMOE_CUDA_CHECK_LAUNCH("zero_padding_rows_kernel");
    }
    const Scalar* xs = permuted ? cache.task_x.data() : cache.x.data();
    const Scalar* h = cache.hidden.data();
    Scalar* dh = cache.d_hidden.data();
    Scalar* yo = cache.expert_out.data();
    const auto& ranges = cache.task_range;
    for (std::size_t i = 0; i < ranges.size(); i += 3) {
      const std::int64_t b = ranges[i], rows = ranges[i + 1] - b, t = ranges[i + 2];
      for (int j = 0; j < K; ++j) {
        const std::int64_t ex = routes[static_cast<std::size_t>(t)].experts[static_cast<std::size_t>(j)];
        const auto g = static_cast<Scalar>(routes[static_cast<std::size_t>(t)].weights[static_cast<std::size_t>(j)]);
        // FFN_j(x) = H_j wo_e^T, recomputed from the kept activations, then dG(n, j) = dy_n . FFN_j(x_n).
        backend::cuda::gemm_strided_batched<Scalar, Scalar>(ctx, rows, C, F, {h + b * K * F + j * F, K * F, 0},
                                                            Trans::kN, {wo_.value.data() + ex * C * F, F, 0},
                                                            Trans::kT, {yo + b * C, C, 0}, 1, 0);
        mk::row_dot_kernel<K, Scalar, Real>
            <<<backend::cuda::blocks_for(rows * mk::kWarp, kThreads), kThreads, 0, stream>>>(
                dyt + b * C, yo + b * C, order != nullptr ? order + b : nullptr, b, cache.gate_row.data(), rows, C,
                j, cache.d_gate.data());
        TMOE_CUDA_CHECK_LAUNCH("row_dot_kernel");
        // The expert sees g * dy: dH_j = g dy wo_e, dwo_e += g dy^T H_j.
        experts_backward_out(ctx, rows, ex, 1, dyt + b * C, h + b * K * F + j * F, dh + b * K * F + j * F, K * F, g);
      }
    }
    activation_backward(stream, dh, h, std::is_same_v<Act, nn::Relu> ? nullptr : cache.pre.data(), routed * K * F);
    Scalar* dxt = cache.d_dispatched.data();
    TMOE_CUDA_CHECK(cudaMemsetAsync(dxt, 0, static_cast<std::size_t>(routed * C) * sizeof(Scalar), stream));
    for (std::size_t i = 0; i < ranges.size(); i += 3) {
      const std::int64_t b = ranges[i], rows = ranges[i + 1] - b, t = ranges[i + 2];
      for (int j = 0; j < K; ++j) {
        const std::int64_t ex = routes[static_cast<std::size_t>(t)].experts[static_cast<std::size_t>(j)];
        experts_backward_in(ctx, rows, ex, 1, xs + b * C, dh + b * K * F + j * F, K * F, dxt + b * C, Scalar(1));
      }
    }
    if (permuted) {
      TMOE_CUDA_CHECK(cudaMemsetAsync(dx, 0, static_cast<std::size_t>(N * C) * sizeof(Scalar), stream));
      if (routed > 0) {
        mk::scatter_rows_kernel<Scalar><<<backend::cuda::blocks_for(routed * C, kThreads), kThreads, 0, stream>>>(
            dx, dxt, order, routed, C);
        TMOE_CUDA_CHECK_LAUNCH("scatter_rows_kernel");
      }
    } else {
      TMOE_CUDA_CHECK(cudaMemcpyAsync(dx, dxt, static_cast<std::size_t>(N * C) * sizeof(Scalar),
                                      cudaMemcpyDeviceToDevice, stream));
      mk::zero_padding_rows_kernel<Scalar>
          <<<backend::cuda::blocks_for(N * C, kThreads), kThreads, 0, stream>>>(dx, cache.gate_row.data(), N, C);
      TMOE_CUDA_CHECK_LAUNCH("zero_padding_rows_kernel");
    }
  }

  // From dG (N, K) to the router: normalization, aux loss, softmax, z-loss (one block per gate row), then the gate
  // projection's GEMMs and the gate inputs: x (token), the sequence means (sentence) or the task embedding (task).
  void backward_gate(CudaContext& ctx, Cache& cache, Scalar* dx) {
    namespace mk = backend::cuda::moe_kernels;
    using backend::cuda::GemmPrecision;
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    constexpr double aux_coef = Config::aux_loss_coefficient, z_coef = Config::z_loss_coefficient;
    const auto& plan = cache.plan;
    const std::int64_t N = plan.tokens, C = options_.d_model, G = cache.probs.dim(0);
    const bool by_row = !std::is_same_v<Route, route::Token>;  // gate rows shared by several tokens
    const bool losses = aux_coef != 0.0 || z_coef != 0.0;

    std::size_t hist_bytes = 0, scan_bytes = 0, sort_bytes = 0;
    if (by_row) {
      TMOE_CUDA_CHECK(cub::DeviceHistogram::HistogramEven(
          nullptr, hist_bytes, static_cast<const std::uint32_t*>(nullptr), static_cast<int*>(nullptr),
          static_cast<int>(G + 2), std::uint32_t{0}, static_cast<std::uint32_t>(G + 1), static_cast<int>(N), stream));
      TMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int*>(nullptr),
                                                    static_cast<int*>(nullptr), static_cast<int>(G + 1), stream));
      TMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
          nullptr, sort_bytes, static_cast<const std::uint32_t*>(nullptr), static_cast<std::uint32_t*>(nullptr),
          static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr), static_cast<int>(N), 0,
          std::bit_width(static_cast<std::uint64_t>(G + 1)), stream));
    }
    const std::size_t cub_bytes = std::max({hist_bytes, scan_bytes, sort_bytes});
    backend::cuda::WorkspaceCarver w;
    if (losses) {
      reserve_partials(w, plan);
      w.reserve<double>(plan.groups * E);
      w.reserve<double>(1);
    }
    if (by_row) {
      w.reserve<std::uint32_t>(N);
      w.reserve<std::uint32_t>(N);
      w.reserve<std::int32_t>(N);
      w.reserve<std::int32_t>(N);
      w.reserve<int>(G + 1);
      w.reserve<int>(G + 1);
      w.reserve_bytes(cub_bytes);
    }
    if (kSentence) w.reserve<Real>(G * C);
    w.start(ctx.workspace(w.bytes()));

    // The aux loss's gradient per (group, expert) and the valid-token count of the z-loss.
    double* aux_f = nullptr;
    double* valid = nullptr;
    if (losses) {
      const LossPartials l = loss_partials(ctx, cache, w);
      aux_f = w.take<double>(plan.groups * E);
      valid = w.take<double>(1);
      mk::aux_prep_kernel<E><<<1, kThreads, 0, stream>>>(l.f, l.valid, N, plan.group_size, plan.groups,
                                                         l.chunks_per_group, aux_coef, aux_f, valid);
      TMOE_CUDA_CHECK_LAUNCH("aux_prep_kernel");
    }
    // Each gate row's tokens in token order: a stable sort of the tokens by gate row (padding last).
    const std::int32_t* tokens = nullptr;
    const int* start = nullptr;
    if (by_row) {
      std::uint32_t* keys = w.take<std::uint32_t>(N);
      std::uint32_t* sorted_keys = w.take<std::uint32_t>(N);
      std::int32_t* values = w.take<std::int32_t>(N);
      std::int32_t* sorted_values = w.take<std::int32_t>(N);
      int* count = w.take<int>(G + 1);
      int* first = w.take<int>(G + 1);
      std::byte* tmp = w.take_bytes(cub_bytes);
      mk::gate_row_keys_kernel<<<backend::cuda::blocks_for(N, kThreads), kThreads, 0, stream>>>(
          cache.gate_row.data(), N, G, keys, values);
      TMOE_CUDA_CHECK_LAUNCH("gate_row_keys_kernel");
      std::size_t bytes = hist_bytes;
      TMOE_CUDA_CHECK(cub::DeviceHistogram::HistogramEven(tmp, bytes, keys, count, static_cast<int>(G + 2),
                                                          std::uint32_t{0}, static_cast<std::uint32_t>(G + 1),
                                                          static_cast<int>(N), stream));
      bytes = scan_bytes;
      TMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp, bytes, count, first, static_cast<int>(G + 1), stream));
      bytes = sort_bytes;
      TMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp, bytes, keys, sorted_keys, values, sorted_values,
                                                      static_cast<int>(N), 0,
                                                      std::bit_width(static_cast<std::uint64_t>(G + 1)), stream));
      tokens = sorted_values;
      start = first;
    }
    cache.d_logits.resize({G, E});
    const int row_threads = std::min(kThreads, (E + 31) / 32 * 32);
    mk::gate_row_grad_kernel<Config, Real><<<static_cast<unsigned>(G), row_threads, 0, stream>>>(
        tokens, start, cache.gate_row.data(), plan.expert.data(), plan.dispatched.data(), cache.d_gate.data(),
        cache.probs.data(), cache.logits.data(), aux_coef != 0.0 ? aux_f : nullptr, plan.group_size,
        z_coef != 0.0 ? valid : nullptr, z_coef, cache.d_logits.data());
    TMOE_CUDA_CHECK_LAUNCH("gate_row_grad_kernel");

    // logits = gin Wg^T: dWg += dl^T gin; dgin = dl Wg, then into the gate inputs. Full precision, as forward.
    const Real* dl = cache.d_logits.data();
    Scalar* dwg = gate_weight_.grad.data();
    const Scalar* wg = gate_weight_.value.data();
    const auto gemm = [&](std::int64_t m, std::int64_t n, std::int64_t k, const Scalar* a, Trans ta, const Scalar* b,
                          Trans tb, Scalar* c, Scalar beta) {
      const std::int64_t lda = ta == Trans::kN ? k : m, ldb = tb == Trans::kN ? n : k;
      backend::cuda::gemm_strided_batched<Scalar, Scalar>(ctx, m, n, k, {a, lda, 0}, ta, {b, ldb, 0}, tb, {c, n, 0}, 1,
                                                          beta, 1, GemmPrecision::kFull);
    };
    if constexpr (std::is_same_v<Route, route::Token>) {
      gemm(E, C, N, dl, Trans::kT, cache.x.data(), Trans::kN, dwg, 1);
      gemm(N, C, E, dl, Trans::kN, wg, Trans::kN, dx, 1);
    } else if constexpr (kSentence) {
      gemm(E, C, G, dl, Trans::kT, cache.gate_input.data(), Trans::kN, dwg, 1);
      Real* dmean = w.take<Real>(G * C);
      gemm(G, C, E, dl, Trans::kN, wg, Trans::kN, dmean, 0);
      mk::sentence_dx_kernel<Scalar, Real><<<backend::cuda::blocks_for(N * C, kThreads), kThreads, 0, stream>>>(
          dx, dmean, cache.gate_row.data(), start, N, C);
      TMOE_CUDA_CHECK_LAUNCH("sentence_dx_kernel");
    } else {
      gemm(E, C, G, dl, Trans::kT, task_embedding_.value.data(), Trans::kN, dwg, 1);
      gemm(G, C, E, dl, Trans::kN, wg, Trans::kN, task_embedding_.grad.data(), 1);
    }
  }

  LayerOptions options_;
  nn::Parameter<Scalar, Cuda> gate_weight_;
  nn::Parameter<Scalar, Cuda> task_embedding_;
  nn::Parameter<Scalar, Cuda> wi_;
  nn::Parameter<Scalar, Cuda> wo_;
};

}  // namespace tmoe::moe
