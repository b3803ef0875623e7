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
/// Backward on the GPU is not written yet.

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
        forward_task_ranges(ctx, in, lay, out, cache);
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
    const std::int64_t chunks_per_group = (S + mk::kLossChunk - 1) / mk::kLossChunk;
    const std::int64_t chunks = groups * chunks_per_group;

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
    w.reserve<std::uint32_t>(items * 2);  // keys, sorted keys
    w.reserve<std::int32_t>(items * 2);   // items, sorted items
    w.reserve<int>(bins * 2);             // count, start
    w.reserve<double>(chunks * E * 2 + chunks * 2);
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
    double* f_part = w.take<double>(chunks * E);
    double* m_part = w.take<double>(chunks * E);
    double* z_part = w.take<double>(chunks);
    double* valid_part = w.take<double>(chunks);
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
    if (args.training) {
      plan.losses.resize({2});
      plan.has_losses = true;
      const int loss_threads = std::min(1024, (E + 31) / 32 * 32);
      mk::loss_partials_kernel<E, K, Real><<<static_cast<unsigned>(chunks), loss_threads, 0, stream>>>(
          cache.gate_row.data(), cache.probs.data(), cache.logits.data(), plan.expert.data(), N, S, chunks_per_group,
          f_part, m_part, z_part, valid_part);
      TMOE_CUDA_CHECK_LAUNCH("loss_partials_kernel");
      mk::loss_final_kernel<E><<<1, 256, 0, stream>>>(f_part, m_part, z_part, valid_part, N, S, groups,
                                                      chunks_per_group, plan.losses.data());
      TMOE_CUDA_CHECK_LAUNCH("loss_final_kernel");
    }
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

    if (plan.capacity >= 0 && plan.groups * plan.capacity <= mk::kExpertRowsMax && !keep_pre) {
      // A few rows per expert: stream only the experts that have rows (the plan's counts, on the device).
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
      std::vector<std::int64_t> offset(static_cast<std::size_t>(E) + 1);
      TMOE_CUDA_CHECK(cudaMemcpyAsync(offset.data(), plan.expert_offset.data(), offset.size() * sizeof(std::int64_t),
                                      cudaMemcpyDeviceToHost, stream));
      ctx.synchronize();
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
    w.reserve<std::int32_t>(N * 3);
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
  };
  static void reserve_routes(backend::cuda::WorkspaceCarver& w, std::int64_t T) {
    w.reserve<Real>(T * E * 2 + T * K * 2);
    w.reserve<std::int32_t>(T * K);
  }
  DeviceRoutes device_routes(CudaContext& ctx, backend::cuda::WorkspaceCarver& w) const requires kTask {
    const std::int64_t T = options_.num_tasks;
    Real* logits = w.take<Real>(T * E * 2 + T * K * 2);
    Real* probs = logits + T * E;
    Real* top_val = probs + T * E;
    DeviceRoutes r;
    r.weights = top_val + T * K;
    r.top_idx = w.take<std::int32_t>(T * K);
    router_gemm(ctx, logits, task_embedding_.value.cview());
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
                           TensorView<Scalar, Cuda> out, Cache& cache) const requires kTask {
    namespace mk = backend::cuda::moe_kernels;
    using backend::cuda::GemmOperand;
    cudaStream_t stream = ctx.stream();
    constexpr int kThreads = 256;
    const std::int64_t N = lay.rows * lay.columns, C = options_.d_model, F = options_.d_ff;
    cache.task_path = true;
    backend::cuda::WorkspaceCarver w;
    reserve_routes(w, options_.num_tasks);
    w.start(ctx.workspace(w.bytes()));
    const DeviceRoutes routes = device_routes(ctx, w);
    const std::vector<std::int32_t> gate_row = task_gate_rows(ctx, in, lay, cache);

    // The plan of the task path: every valid token's K choices, all dispatched.
    auto& plan = cache.plan;
    reset_plan(plan, N, N, 1);
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
    Tensor<std::int64_t, Cuda> order_dev;
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
      cache.task_x.resize({routed, C});
      cache.task_y.resize({routed, C});
      backend::cuda::gather_rows<Scalar, std::int64_t>(ctx, cache.task_x.view(), in.x.reshape({N, C}),
                                                       order_dev.cview());
      xs = cache.task_x.data();
      ys = cache.task_y.data();
    }

    // Hidden (routed, K*F): expert j's activations in columns [j*F, (j+1)*F).
    cache.hidden.resize({routed, K * F});
    std::int64_t longest = 0;
    for (std::size_t i = 0; i < ranges.size(); i += 3) longest = std::max(longest, ranges[i + 1] - ranges[i]);
    if (longest <= kTaskRowsSmall) {
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
      activate(stream, cache.hidden.data(), nullptr, routed * K * F);
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
  }

  LayerOptions options_;
  nn::Parameter<Scalar, Cuda> gate_weight_;
  nn::Parameter<Scalar, Cuda> task_embedding_;
  nn::Parameter<Scalar, Cuda> wi_;
  nn::Parameter<Scalar, Cuda> wo_;
};

}  // namespace tmoe::moe
