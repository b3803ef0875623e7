#pragma once
/// @file moe_experts.cuh
/// @brief Expert FFN halves for a few rows per expert: streams only the weights of experts that have rows.
///
/// With a handful of tokens (a decoding step) an expert GEMM is a matrix-vector product: its time is the time to read
/// the expert's weights. A batched GEMM over all E experts would read every expert; this kernel reads an expert only
/// when the device-side plan gave it rows, so no host round-trip is needed to skip the others.
///
/// It computes, for each group g (an expert block, or one of a task's K experts) and each of `rows` rows r:
///   y_g[r, n] = epilogue( sum over j < J of alpha_j * sum over k < kd of x_g[r, j*x_j_offset + k] * W_{e(g,j)}[n, k] )
/// A resident grid of warps walks the (group, column) items two at a time; each warp streams the two weight rows whole
/// with 16-byte loads and keeps 2 row sums per column in registers. Groups without rows are skipped through a
/// compacted list read on the device, so the grid holds only real work and nothing comes back to the host.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/numeric.cuh"

namespace tmoe::backend::cuda::moe_kernels {

template <class S>
struct ExpertRowsArgs {
  const S* x = nullptr;
  std::int64_t ldx = 0;             ///< elements between rows of x
  std::int64_t x_group_stride = 0;  ///< elements between groups' x (0: every group reads the same rows)
  std::int64_t x_j_offset = 0;      ///< column offset of term j within a row of x
  const S* w = nullptr;             ///< E stacked (nout, kd) matrices
  S* y = nullptr;
  std::int64_t ldy = 0;
  std::int64_t y_group_stride = 0;
  const std::int32_t* expert_of = nullptr;     ///< (groups, J) expert ids; null: the expert of group g is g
  const acc_t<S>* alpha = nullptr;             ///< (groups, J) term weights; null: 1
  const std::int32_t* active_list = nullptr;   ///< groups that run, compacted; null: every group runs
  const std::int32_t* active_count = nullptr;  ///< how many entries of active_list are valid
  std::int64_t groups = 0;                     ///< groups, or the length of active_list
  std::int64_t rows = 0, kd = 0, nout = 0;
  int terms = 1;  ///< J
};

constexpr int kExpertRowsMax = 2;  // rows per group the callers send here (cuBLAS beyond: measured faster at 4+)
constexpr int kExpertRowPass = 2;  // row sums kept in registers per pass over a weight row
constexpr int kExpertOuts = 2;     // weight rows a warp streams at once
constexpr int kExpertThreads = 256;

/// Compacts the experts that have rows: list[0, *count) in increasing expert order. One thread (E is small).
template <int E>
__global__ void active_experts_kernel(const std::int64_t* __restrict__ expert_count, std::int32_t* __restrict__ list,
                                      std::int32_t* __restrict__ count) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  std::int32_t c = 0;
  for (int e = 0; e < E; ++e) {
    if (expert_count[e] > 0) list[c++] = e;
  }
  *count = c;
}

/// A grid of resident warps walks the work items (group, output column n), kExpertOuts at a time; each warp streams
/// those weight rows whole with 16-byte loads and reduces its row sums with shuffles. No shared memory, no barrier.
template <class Act, bool kAct, class S, int Vec>
__global__ void __launch_bounds__(kExpertThreads) expert_rows_kernel(ExpertRowsArgs<S> a) {
  struct alignas(sizeof(S) * Vec) Pack {
    S v[Vec];
  };
  using A = acc_t<S>;
  constexpr int R = kExpertRowPass, O = kExpertOuts;
  const std::int64_t groups = a.active_list != nullptr ? static_cast<std::int64_t>(*a.active_count) : a.groups;
  const std::int64_t items = groups * a.nout;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (kExpertThreads / 32);
  const std::int64_t first = (static_cast<std::int64_t>(blockIdx.x) * kExpertThreads + threadIdx.x) / 32 * O;
  for (std::int64_t item = first; item < items; item += warps * O) {
    std::int64_t g[O], n[O];
    bool live[O];
#pragma unroll
    for (int o = 0; o < O; ++o) {
      live[o] = item + o < items;
      const std::int64_t it = live[o] ? item + o : item;
      const std::int64_t slot = it / a.nout;
      g[o] = a.active_list != nullptr ? a.active_list[slot] : slot;
      n[o] = it % a.nout;
    }
    for (std::int64_t r0 = 0; r0 < a.rows; r0 += R) {
      const int rows = static_cast<int>(min(static_cast<std::int64_t>(R), a.rows - r0));
      A acc[O][R];
#pragma unroll
      for (int o = 0; o < O; ++o) {
#pragma unroll
        for (int r = 0; r < R; ++r) acc[o][r] = 0;
      }
      for (int j = 0; j < a.terms; ++j) {
        const S* wrow[O];
        const S* xrow[O];
        A scale[O];
#pragma unroll
        for (int o = 0; o < O; ++o) {
          const std::int64_t e = a.expert_of ? a.expert_of[g[o] * a.terms + j] : g[o];
          scale[o] = a.alpha ? a.alpha[g[o] * a.terms + j] : A(1);
          wrow[o] = a.w + (e * a.nout + n[o]) * a.kd;
          xrow[o] = a.x + g[o] * a.x_group_stride + r0 * a.ldx + j * a.x_j_offset;
        }
        // Consecutive items usually share their group: then the rows' inputs are loaded and converted once.
        const bool shared_x = xrow[O - 1] == xrow[0];
#pragma unroll 2
        for (std::int64_t k = static_cast<std::int64_t>(lane) * Vec; k < a.kd; k += 32 * Vec) {
          Pack wv[O];
#pragma unroll
          for (int o = 0; o < O; ++o) wv[o] = *reinterpret_cast<const Pack*>(wrow[o] + k);
          A xf[R][Vec];
#pragma unroll
          for (int o = 0; o < O; ++o) {
            if (o == 0 || !shared_x) {
#pragma unroll
              for (int r = 0; r < R; ++r) {
                if (r < rows) {
                  const Pack xv = *reinterpret_cast<const Pack*>(xrow[o] + r * a.ldx + k);
#pragma unroll
                  for (int v = 0; v < Vec; ++v) xf[r][v] = static_cast<A>(xv.v[v]);
                }
              }
            }
#pragma unroll
            for (int v = 0; v < Vec; ++v) {
              const A wf = scale[o] * static_cast<A>(wv[o].v[v]);
#pragma unroll
              for (int r = 0; r < R; ++r) {
                if (r < rows) acc[o][r] += wf * xf[r][v];
              }
            }
          }
        }
      }
#pragma unroll
      for (int o = 0; o < O; ++o) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          for (int d = 16; d > 0; d /= 2) acc[o][r] += __shfl_xor_sync(0xffffffffu, acc[o][r], d);
        }
      }
      // Lane o*R + r writes output column n[o] of row r0 + r (every lane holds every sum after the butterfly).
#pragma unroll
      for (int o = 0; o < O; ++o) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (lane == o * R + r && live[o] && r < rows) {
            const A v = kAct ? Act::forward(acc[o][r]) : acc[o][r];
            a.y[g[o] * a.y_group_stride + (r0 + r) * a.ldy + n[o]] = S(v);
          }
        }
      }
    }
  }
}

/// Launches expert_rows_kernel with at most `max_blocks` resident blocks over `a.groups` groups (with active_list:
/// the first *active_count of them), 16-byte loads when the shapes and pointers allow.
template <class Act, bool kAct, class S>
void expert_rows(cudaStream_t stream, const ExpertRowsArgs<S>& a, int max_blocks) {
  if (a.groups == 0 || a.rows == 0 || a.nout == 0) return;
  constexpr int v = 16 / static_cast<int>(sizeof(S));
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  const bool vec = a.kd % v == 0 && a.ldx % v == 0 && a.x_j_offset % v == 0 && a.x_group_stride % v == 0 &&
                   aligned(a.x) && aligned(a.w);
  const std::int64_t warps_needed = (a.groups * a.nout + kExpertOuts - 1) / kExpertOuts;
  const std::int64_t blocks = std::min<std::int64_t>((warps_needed + 7) / 8, std::max(max_blocks, 1));
  if (vec) {
    expert_rows_kernel<Act, kAct, S, v><<<static_cast<unsigned>(blocks), kExpertThreads, 0, stream>>>(a);
  } else {
    expert_rows_kernel<Act, kAct, S, 1><<<static_cast<unsigned>(blocks), kExpertThreads, 0, stream>>>(a);
  }
  TMOE_CUDA_CHECK_LAUNCH("expert_rows_kernel");
}

}  // namespace tmoe::backend::cuda::moe_kernels
