#pragma once
/// @file gemm.hpp
/// @brief GEMM on row-major data through Eigen products over maps (no copies).
///
/// c (M, N) = alpha * op(a) * op(b) + beta * c, with op(x) = x or x^T. `gemm_serial` runs on the calling
/// thread and is the building block of parallel regions; `gemm` splits the output across the context's
/// threads along its larger dimension (rows when M is large, column slabs when M is small, as in decoding),
/// with a fixed partition so results depend only on the thread count.

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/backend/cpu/eigen_map.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/gemm_shape.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe {

namespace backend::cpu {

/// A row-major matrix operand: pointer, stored extents and leading dimension.
template <class S>
struct MatrixRef {
  S* data;
  std::int64_t rows, cols, ld;
};

/// The streaming kernel's register shapes on this target: vectors of kVectorBytes, blocks of kBlockRows = 4 rows of
/// a by kBlockCols rows of b, so the 4 x kBlockCols accumulators, kBlockCols rows of b and one of a fit the register
/// file (32 vector registers with AVX-512, 16 below it). Products of kBlockRows + 1 to kOnePassRows rows take one
/// block of all their rows by kOnePassCols rows of b instead (8 x 3 accumulators with AVX-512), so every line of b is
/// loaded once: a block of 4 rows and a second block reading the same lines from L2 left the memory stream idle
/// during the second block's arithmetic (`bench/gemm`, one Xeon core, weights from DRAM: 7 and 8 rows 212-227 us with
/// blocks of 4, 157-166 us in one pass, 1 row 139 us).
#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64, kBlockRows = 4, kBlockCols = 4, kOnePassRows = 8, kOnePassCols = 3;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32, kBlockRows = 4, kBlockCols = 2, kOnePassRows = 4, kOnePassCols = 2;
#else
inline constexpr int kVectorBytes = 16, kBlockRows = 4, kBlockCols = 2, kOnePassRows = 4, kOnePassCols = 2;
#endif

/// Rows of `c = a * b^T` per pass of the streaming kernel below, which computes every such product with 2 rows or
/// more instead of Eigen's GEMM; more rows take several passes, each reading b again (from the caches, or from
/// memory at 512 flops per float of b). Eigen repacks b (a weight matrix, [out, in]) into panels on every call and
/// its micro-kernel wants many rows of a; with few rows (decoding, tokens spread over many experts) packing costs as
/// much as the arithmetic. `bench/gemm` measures both on one Zen 5 core: with AVX-512 the streaming kernel is faster
/// at every row count from 2 (1.3x at 512 and 1024 rows); built for SSE2 it is faster up to 512 rows and level at
/// 1024. On one core of an Intel Xeon guest Eigen overtakes it from about 64 rows (it is 0.83-0.87x of Eigen's speed
/// at 512 rows); the switch is the same on every CPU. One row goes to Eigen's GEMV, which already streams.
inline constexpr std::int64_t kStreamRows = 512;

namespace detail {

/// One vector register of S as a GCC/Clang vector (kVectorBytes). Values of this type never cross a function
/// boundary, which keeps the ABI independent of the target.
template <class S>
struct Lanes {
  static constexpr int kCount = kVectorBytes / static_cast<int>(sizeof(S));
  typedef S type __attribute__((vector_size(kVectorBytes)));  // NOLINT(modernize-use-using): needs typedef
  /// The same vector at the element's alignment, allowed to alias S: loads from any S* through it are plain
  /// unaligned vector loads.
  typedef S unaligned __attribute__((vector_size(kVectorBytes), aligned(alignof(S)), may_alias));  // NOLINT
};

/// v = the vector at p, pinned in a register by an empty asm: GCC otherwise folds the load into every FMA that uses
/// it, re-reading each row of b RB times per step, and the kernel becomes load-bound (139 instead of 243 GFLOP/s on
/// one Zen 5 core in cache, g++ 12).
template <class S>
inline void load_lanes(typename Lanes<S>::type& v, const S* p) {
  typename Lanes<S>::type t = *reinterpret_cast<const typename Lanes<S>::unaligned*>(p);
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(t));
#endif
  v = t;
}

/// Lane q of the fold of x and y, for groups of width W: x and y hold L / W groups of W partial sums each (one
/// accumulator per group); the result holds 2 L / W groups of W / 2, x's groups first, each the sum of a group's
/// two halves. Folding log2(L) times turns L accumulators into one vector of their L totals, in order.
constexpr int fold_lane(int lanes, int width, bool upper, int q) {
  const int half = width / 2, group = q / half, groups = lanes / width;
  return (group < groups ? 0 : lanes) + (group % groups) * width + (upper ? half : 0) + q % half;
}

/// The lane indices of one half of a fold, as a type.
template <int L, int W, bool Upper, class Q>
struct FoldLanes;
template <int L, int W, bool Upper, int... Q>
struct FoldLanes<L, W, Upper, std::integer_sequence<int, Q...>> {
  using type = std::integer_sequence<int, fold_lane(L, W, Upper, Q)...>;
};

/// out = lanes I of the concatenation of x and y.
template <class V, int... I>
inline void shuffle_into(V& out, const V& x, const V& y, std::integer_sequence<int, I...> /*lanes*/) {
#if defined(__CUDACC__)
  // nvcc's host pass re-emits the pack expansion inside __builtin_shufflevector without its "...", so CPU code in a
  // .cu file takes the same lanes one at a time (the same sums, only slower).
  constexpr int L = static_cast<int>(sizeof...(I));
  constexpr int lane[] = {I...};
  V r = x;
  for (int q = 0; q < L; ++q) r[q] = lane[q] < L ? x[lane[q]] : y[lane[q] - L];
  out = r;
#else
  out = __builtin_shufflevector(x, y, I...);
#endif
}

template <int W, class V, int L>
inline void fold(V& out, const V& x, const V& y) {
  V lo, hi;
  shuffle_into(lo, x, y, typename FoldLanes<L, W, false, std::make_integer_sequence<int, L>>::type{});
  shuffle_into(hi, x, y, typename FoldLanes<L, W, true, std::make_integer_sequence<int, L>>::type{});
  out = lo + hi;
}

/// v[0] = the totals of the L accumulators v[0, L), lane j the sum of v[j]'s lanes (a fixed tree: log2(L) levels of
/// shuffles and adds instead of L sequential scalar sums per accumulator).
template <int W, class S>
inline void fold_all(typename Lanes<S>::type* v) {
  constexpr int L = Lanes<S>::kCount;
  for (int i = 0; i < W / 2; ++i) {  // W vectors in, W / 2 out
    fold<W, typename Lanes<S>::type, L>(v[i], v[2 * i], v[2 * i + 1]);
  }
  if constexpr (W > 2) fold_all<W / 2, S>(v);
}

/// Rows [j0, j1) of each of Q runs of b (run q holds rows [q * run, (q + 1) * run), so row j of each run is run rows
/// after the previous run's) against RB rows of a: c(i, q * run + j) = alpha * dot(a_i, b_{q * run + j}) + beta *
/// c(i, q * run + j). RB * Q vector accumulators take each loaded lane of b RB times and each lane of a Q times; a
/// tail of k shorter than a vector is zero-padded, and the lanes are summed by fold_all, so the summation order is
/// fixed and no fast-math is needed to vectorize. One function holds the loop over rows, the k loop and the fold, so
/// the accumulators stay in registers (the previous kernel called a function per block of rows, which spilled them
/// and zeroed them in memory, and was 8-20% slower from DRAM). The totals collect in a scratch of 16 rows per output
/// column and reach c as runs of up to 16 contiguous elements.
template <int RB, int Q, class S>
inline void run_rows(S* c, std::int64_t ldc, std::int64_t run, const S* a, std::int64_t lda, const S* b,
                     std::int64_t ldb, std::int64_t k, std::int64_t j0, std::int64_t j1, S alpha, S beta) {
  using V = typename Lanes<S>::type;
  constexpr int L = Lanes<S>::kCount;
  constexpr int N = RB * Q, Groups = (N + L - 1) / L;
  constexpr int kPending = 16;
  const std::int64_t rs = run * ldb;  // from a row of one run to the same row of the next
  const std::int64_t kv = k / L * L, tail = k - kv;
  S scratch[N][kPending];
  std::int64_t pending = 0;
  auto flush = [&](std::int64_t next) {  // rows [next - pending, next) of every (row of a, run) pair
    for (int i = 0; i < RB; ++i) {
      for (int q = 0; q < Q; ++q) {
        S* dst = c + i * ldc + q * run + next - pending;
        const S* src = scratch[i * Q + q];
        for (std::int64_t t = 0; t < pending; ++t) {
          dst[t] = beta == S(0) ? alpha * src[t] : alpha * src[t] + beta * dst[t];
        }
      }
    }
    pending = 0;
  };
  for (std::int64_t j = j0; j < j1; ++j) {
    const S* bj = b + j * ldb;
    V acc[Groups * L];
    for (V& v : acc) v = V{};
    for (std::int64_t p = 0; p < kv; p += L) {
      V bv[Q];
      for (int q = 0; q < Q; ++q) load_lanes(bv[q], bj + q * rs + p);
      for (int i = 0; i < RB; ++i) {
        V av;
        load_lanes(av, a + i * lda + p);
        for (int q = 0; q < Q; ++q) acc[i * Q + q] += av * bv[q];
      }
    }
    if (tail > 0) {  // lane by lane: GCC cannot bound a memcpy of tail elements
      V bv[Q];
      for (int q = 0; q < Q; ++q) {
        bv[q] = V{};
        for (int l = 0; l < L && l < tail; ++l) bv[q][l] = bj[q * rs + kv + l];
      }
      for (int i = 0; i < RB; ++i) {
        V av{};
        for (int l = 0; l < L && l < tail; ++l) av[l] = a[i * lda + kv + l];
        for (int q = 0; q < Q; ++q) acc[i * Q + q] += av * bv[q];
      }
    }
    for (int g = 0; g < Groups; ++g) fold_all<L, S>(acc + g * L);
    for (int n = 0; n < N; ++n) scratch[n][pending] = acc[n / L * L][n % L];
    if (++pending == kPending) flush(j + 1);
  }
  if (pending > 0) flush(j1);
}

/// The last R rows of a (1 <= R < RB), as one block of R rows.
template <int Q, int RB, class S>
inline void run_rest_rows(int rows, MatrixRef<S> c, MatrixRef<const S> a, const S* b, std::int64_t ldb,
                          std::int64_t run, std::int64_t j0, std::int64_t j1, S alpha, S beta) {
  if constexpr (RB > 1) {
    if (rows == RB - 1) {
      run_rows<RB - 1, Q>(c.data, c.ld, run, a.data, a.ld, b, ldb, a.cols, j0, j1, alpha, beta);
    } else {
      run_rest_rows<Q, RB - 1>(rows, c, a, b, ldb, run, j0, j1, alpha, beta);
    }
  }
}

/// Every row of a, in blocks of RB and one block of 1 to RB - 1, against rows [j0, j1) of Q runs of b (see
/// run_rows).
template <int Q, int RB, class S>
inline void run_row_blocks(MatrixRef<S> c, MatrixRef<const S> a, const S* b, std::int64_t ldb, std::int64_t run,
                           std::int64_t j0, std::int64_t j1, S alpha, S beta) {
  std::int64_t i = 0;
  for (; i + RB <= c.rows; i += RB) {
    run_rows<RB, Q>(c.data + i * c.ld, c.ld, run, a.data + i * a.ld, a.ld, b, ldb, a.cols, j0, j1, alpha, beta);
  }
  if (i < c.rows) {  // the remainder's block height is a compile-time constant too
    run_rest_rows<Q, RB>(static_cast<int>(c.rows - i), MatrixRef<S>{c.data + i * c.ld, c.rows - i, c.cols, c.ld},
                         MatrixRef<const S>{a.data + i * a.ld, c.rows - i, a.cols, a.ld}, b, ldb, run, j0, j1, alpha,
                         beta);
  }
}

/// Bytes of b (over all runs) that the streaming kernel's row blocks share from L2 before it moves on: half of a
/// 1 MiB L2. On one Zen 5 core (bench/gemm, weights from memory) 128 KiB was up to 26% slower at k 2048 and 64 rows
/// or more, and 2 MiB 20-60% slower from 8 rows up.
inline constexpr std::int64_t kRunChunkBytes = 512 << 10;

/// Up to this many rows of a, the chunks are one row of each run: every block of rows takes a row of b while it is
/// still in L1, just after the first block read it from memory, so the memory stream pauses only for a few blocks'
/// arithmetic at a time. On one Xeon core (bench/gemm, weights from memory, k 512 and 2048) this took 13-16 rows
/// from 250-284 to 195-237 us and made 24-32 rows 8-20% faster; from 48 rows the L2 chunks were as fast or faster.
inline constexpr std::int64_t kInterleaveRows = 32;

/// c (m, n) = alpha * a (m, k) b (n, k)^T + beta * c without packing, reading b once from memory: the streaming
/// kernel (gemm_serial calls it for up to kStreamRows rows at a time, through gemm_stream). b's first Q * (n / Q)
/// rows are cut into Q contiguous runs walked side by side, so the hardware prefetchers follow Q long sequential
/// streams (Q adjacent rows are short streams that they do not run ahead of, and the arithmetic then waits for
/// memory). The runs go in chunks of about kRunChunkBytes, which stay in L2 while every block of RB rows of a passes
/// over them: the first block reads a chunk from memory, the others from L2 (up to kInterleaveRows rows of a, a chunk
/// is one row of each run). The last n mod Q rows are one more run.
template <class S, int RB, int Q>
void gemm_stream_abt(MatrixRef<S> c, MatrixRef<const S> a, MatrixRef<const S> b, S alpha, S beta) {
  const std::int64_t run = b.rows / Q, k = a.cols;
  const std::int64_t chunk =
      c.rows <= kInterleaveRows
          ? 1
          : std::max<std::int64_t>(1, kRunChunkBytes / (Q * k * static_cast<std::int64_t>(sizeof(S))));
  for (std::int64_t j0 = 0; j0 < run; j0 += chunk) {
    run_row_blocks<Q, RB, S>(c, a, b.data, b.ld, run, j0, std::min(run, j0 + chunk), alpha, beta);
  }
  const std::int64_t rest = b.rows - Q * run;
  if (rest > 0) {
    run_row_blocks<1, RB, S>(MatrixRef<S>{c.data + Q * run, c.rows, rest, c.ld}, a, b.data + Q * run * b.ld, b.ld,
                             rest, 0, rest, alpha, beta);
  }
}

/// c = alpha * a b^T + beta * c by the streaming kernel, in one block of rows when they fit one (kOnePassRows), else
/// in blocks of kBlockRows.
template <class S>
void gemm_stream(MatrixRef<S> c, MatrixRef<const S> a, MatrixRef<const S> b, S alpha, S beta) {
  if constexpr (kOnePassRows > kBlockRows) {
    if (c.rows > kBlockRows && c.rows <= kOnePassRows) {
      gemm_stream_abt<S, kOnePassRows, kOnePassCols>(c, a, b, alpha, beta);
      return;
    }
  }
  gemm_stream_abt<S, kBlockRows, kBlockCols>(c, a, b, alpha, beta);
}

}  // namespace detail

/// c = alpha * op(a) op(b) + beta * c on the calling thread. Shapes are trusted.
template <class S>
void gemm_serial(MatrixRef<S> c, MatrixRef<const S> a, Trans ta, MatrixRef<const S> b, Trans tb, S alpha,
                 S beta) {
  if (c.rows == 0 || c.cols == 0) return;
  auto C = map(c.data, c.rows, c.cols, c.ld);
  const std::int64_t k = ta == Trans::kN ? a.cols : a.rows;
  if (k == 0) {
    if (beta == S(0)) C.setZero();
    else if (beta != S(1)) C *= beta;
    return;
  }
  if (ta == Trans::kN && tb == Trans::kT && c.rows > 1) {
    for (std::int64_t i0 = 0; i0 < c.rows; i0 += kStreamRows) {
      const std::int64_t rows = std::min(kStreamRows, c.rows - i0);
      detail::gemm_stream(MatrixRef<S>{c.data + i0 * c.ld, rows, c.cols, c.ld},
                          MatrixRef<const S>{a.data + i0 * a.ld, rows, a.cols, a.ld}, b, alpha, beta);
    }
    return;
  }
  auto A = map(a.data, a.rows, a.cols, a.ld);
  auto B = map(b.data, b.rows, b.cols, b.ld);
  auto run = [&](const auto& opa, const auto& opb) {
    if (beta == S(0)) {
      C.noalias() = (alpha * opa) * opb;
    } else {
      if (beta != S(1)) C *= beta;
      C.noalias() += (alpha * opa) * opb;
    }
  };
  if (ta == Trans::kN && tb == Trans::kN) run(A, B);
  else if (ta == Trans::kN) run(A, B.transpose());
  else if (tb == Trans::kN) run(A.transpose(), B);
  else run(A.transpose(), B.transpose());
}

/// Row block [r0, r1) of op(x) as a MatrixRef.
template <class S>
MatrixRef<S> op_rows(MatrixRef<S> x, Trans t, std::int64_t r0, std::int64_t r1) {
  if (t == Trans::kN) return {x.data + r0 * x.ld, r1 - r0, x.cols, x.ld};
  return {x.data + r0, x.rows, r1 - r0, x.ld};  // rows of x^T are columns of x
}
/// Column block [c0, c1) of op(x) as a MatrixRef.
template <class S>
MatrixRef<S> op_cols(MatrixRef<S> x, Trans t, std::int64_t c0, std::int64_t c1) {
  if (t == Trans::kN) return {x.data + c0, x.rows, c1 - c0, x.ld};
  return {x.data + c0 * x.ld, c1 - c0, x.cols, x.ld};
}

/// c = alpha * op(a) op(b) + beta * c, split over the context's threads.
template <class S>
void gemm_parallel(CpuContext& ctx, MatrixRef<S> c, MatrixRef<const S> a, Trans ta, MatrixRef<const S> b, Trans tb,
                   S alpha, S beta) {
  const std::int64_t m = c.rows, n = c.cols;
  const std::int64_t k = ta == Trans::kN ? a.cols : a.rows;
  constexpr std::int64_t kMinParallelWork = 1 << 16;  // below this, a fork costs more than it saves
  if (ctx.threads() == 1 || m * n * std::max<std::int64_t>(k, 1) <= kMinParallelWork) {
    gemm_serial(c, a, ta, b, tb, alpha, beta);
    return;
  }
  if (m >= n || m >= 4 * ctx.threads() * 16) {
    ctx.parallel_range(m, 16, [&](std::int64_t r0, std::int64_t r1) {
      gemm_serial(MatrixRef<S>{c.data + r0 * c.ld, r1 - r0, n, c.ld}, op_rows(a, ta, r0, r1), ta, b, tb, alpha,
                  beta);
    });
  } else {
    ctx.parallel_range(n, 16, [&](std::int64_t c0, std::int64_t c1) {
      gemm_serial(MatrixRef<S>{c.data + c0, m, c1 - c0, c.ld}, a, ta, op_cols(b, tb, c0, c1), tb, alpha, beta);
    });
  }
}

/// Checked entry point over rank-2 views.
template <class S>
void gemm(CpuContext& ctx, TensorView<S, Cpu> c, ConstTensorView<S, Cpu> a, Trans ta, ConstTensorView<S, Cpu> b,
          Trans tb, S alpha = S(1), S beta = S(0)) {
  const GemmExtents e = gemm_extents<S, Cpu>(c, a, ta, b, tb);
  gemm_parallel<S>(ctx, {c.data(), e.m, e.n, e.n}, {a.data(), a.dim(0), a.dim(1), a.dim(1)}, ta,
                   {b.data(), b.dim(0), b.dim(1), b.dim(1)}, tb, alpha, beta);
}

}  // namespace backend::cpu
}  // namespace tmoe
