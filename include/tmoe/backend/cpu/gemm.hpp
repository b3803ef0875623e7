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

/// The streaming kernel's register shape on this target: vectors of kVectorBytes, blocks of 4 rows of a by
/// kBlockCols rows of b, so the 4 x kBlockCols accumulators, kBlockCols rows of b and one of a fit the register file
/// (32 vector registers with AVX-512, 16 below it).
#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64, kBlockCols = 4;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32, kBlockCols = 2;
#else
inline constexpr int kVectorBytes = 16, kBlockCols = 2;
#endif

/// Rows of `c = a * b^T` (2 up to this many) computed by the streaming kernel below instead of Eigen's GEMM. Eigen
/// repacks b (a weight matrix, [out, in]) into panels on every call and its micro-kernel wants many rows of a; with
/// few rows (decoding, tokens spread over many experts) packing costs as much as the arithmetic. The streaming kernel
/// reads b as stored, once. `bench/gemm` measures both on one core (Zen 5): with AVX-512 the streaming kernel is
/// faster from 2 rows up to 512 and within 10% either way at 1024; with AVX2 or SSE2 it is faster up to 64 rows and
/// level at 128. One row goes to Eigen's GEMV, which already streams.
#if defined(__AVX512F__)
inline constexpr std::int64_t kStreamRows = 512;
#else
inline constexpr std::int64_t kStreamRows = 64;
#endif

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

/// c(i, j * cs) = alpha * dot(a_i, b_j) + beta * c(i, j * cs) for RB rows of a and FB rows of b (row j of b at
/// b + j * ldb). RB * FB vector accumulators take each loaded lane of b RB times and each lane of a FB times; a tail
/// shorter than a vector is zero-padded, and the lanes are summed by fold_all, so the summation order is fixed and no
/// fast-math is needed to vectorize.
///
/// When `pf` is not null it points at FB other rows of b (stride ldb) that are prefetched towards L2, one cache line
/// per row per vector step: the next tile's rows, requested while this one is computed.
template <int RB, int FB, class S>
inline void stream_block(S* c, std::int64_t ldc, std::int64_t cs, const S* a, std::int64_t lda, const S* b,
                         std::int64_t ldb, std::int64_t k, S alpha, S beta, const S* pf) {
  using V = typename Lanes<S>::type;
  constexpr int L = Lanes<S>::kCount;
  constexpr int N = RB * FB, Groups = (N + L - 1) / L;
  V acc[Groups * L];
  for (V& v : acc) v = V{};
  constexpr std::int64_t kLine = 64 / sizeof(S);  // elements per cache line
  std::int64_t p = 0;
  for (; p + L <= k; p += L) {
    if (pf != nullptr && p % kLine == 0) {
      for (int j = 0; j < FB; ++j) __builtin_prefetch(pf + j * ldb + p, 0, 2);
    }
    V bv[FB];
    for (int j = 0; j < FB; ++j) load_lanes(bv[j], b + j * ldb + p);
    for (int i = 0; i < RB; ++i) {
      V av;
      load_lanes(av, a + i * lda + p);
      for (int j = 0; j < FB; ++j) acc[i * FB + j] += av * bv[j];
    }
  }
  if (p < k) {  // the tail, zero-padded to a whole vector (lane by lane: GCC cannot bound a memcpy of k - p bytes)
    const std::int64_t tail = k - p;
    V bv[FB];
    for (int j = 0; j < FB; ++j) {
      bv[j] = V{};
      for (int q = 0; q < L && q < tail; ++q) bv[j][q] = b[j * ldb + p + q];
    }
    for (int i = 0; i < RB; ++i) {
      V av{};
      for (int q = 0; q < L && q < tail; ++q) av[q] = a[i * lda + p + q];
      for (int j = 0; j < FB; ++j) acc[i * FB + j] += av * bv[j];
    }
  }
  for (int g = 0; g < Groups; ++g) fold_all<L, S>(acc + g * L);
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < FB; ++j) {
      const int n = i * FB + j;
      const S sum = acc[n / L * L][n % L];
      S& dst = c[i * ldc + j * cs];
      dst = beta == S(0) ? alpha * sum : alpha * sum + beta * dst;
    }
  }
}

/// Rows [i, i + RB) of a against every row of b, kBlockCols rows of b at a time (RB x kBlockCols accumulators: each
/// loaded lane of a feeds kBlockCols FMAs and each lane of b feeds RB). `pf`, when not null, is the next tile of b
/// (pf_rows rows), prefetched block by block alongside. (Spreading those requests over all the passes of a tile
/// measured slower.)
template <int RB, class S>
void stream_rows(MatrixRef<S> c, MatrixRef<const S> a, MatrixRef<const S> b, std::int64_t i, S alpha, S beta,
                 const S* pf, std::int64_t pf_rows) {
  auto block = [&]<int FB>(std::int64_t j) {
    const S* pfj = pf != nullptr && j + FB <= pf_rows ? pf + j * b.ld : nullptr;
    stream_block<RB, FB>(c.data + i * c.ld + j, c.ld, 1, a.data + i * a.ld, a.ld, b.data + j * b.ld, b.ld, a.cols,
                         alpha, beta, pfj);
  };
  std::int64_t j = 0;
  for (; j + kBlockCols <= b.rows; j += kBlockCols) block.template operator()<kBlockCols>(j);
  if constexpr (kBlockCols > 2) {
    for (; j + 2 <= b.rows; j += 2) block.template operator()<2>(j);
  }
  if (j < b.rows) block.template operator()<1>(j);
}

/// c (m, n) = alpha * a (m, k) b (n, k)^T + beta * c for m <= 3: one pass over b, which is read from memory once
/// anyway, so it needs no tiles. b's first kBlockCols * (n / kBlockCols) rows are cut into kBlockCols contiguous runs
/// and each register block takes the next row of every run, so the hardware prefetchers follow kBlockCols long
/// sequential streams; kBlockCols adjacent rows instead (the tiled path's order) are short streams that the
/// prefetchers do not run ahead of, and the arithmetic then waits for memory instead of overlapping it. Whole rows of
/// k, no chunks: a's few rows stay in cache, and b's rows stream in order. bench/gemm, one core, weights from DRAM:
/// 2 rows 20-28% faster than the tiled path; at 4 rows the tiled path was as fast or faster, so it keeps 4 and more.
template <int RB, class S>
void stream_runs(MatrixRef<S> c, MatrixRef<const S> a, MatrixRef<const S> b, S alpha, S beta) {
  constexpr std::int64_t Q = kBlockCols;
  const std::int64_t run = b.rows / Q;
  for (std::int64_t j = 0; j < run; ++j) {
    stream_block<RB, static_cast<int>(Q), S>(c.data + j, c.ld, run, a.data, a.ld, b.data + j * b.ld, run * b.ld,
                                             a.cols, alpha, beta, nullptr);
  }
  const std::int64_t j = Q * run;  // the remainder, fewer than Q adjacent rows, as the tiled path takes them
  stream_rows<RB, S>(MatrixRef<S>{c.data + j, c.rows, c.cols - j, c.ld}, a,
                     MatrixRef<const S>{b.data + j * b.ld, b.rows - j, b.cols, b.ld}, 0, alpha, beta, nullptr, 0);
}

/// c (m, n) = alpha * a (m, k) b (n, k)^T + beta * c without packing. b is walked in tiles of 32 rows that stay in L2
/// while every block of 4 rows of a passes over them, so b is read from memory once; the first block prefetches
/// the next tile, so memory reads overlap the arithmetic. k is cut into chunks of 512 so a block's slice of a stays in
/// L1 while the tile's slice streams from L2; each chunk after the first adds its partial sums into c (a fixed order).
template <class S>
void gemm_stream_abt(MatrixRef<S> c, MatrixRef<const S> a, MatrixRef<const S> b, S alpha, S beta) {
  switch (c.rows) {  // up to 3 rows: one pass, see stream_runs
    case 1: stream_runs<1>(c, a, b, alpha, beta); return;
    case 2: stream_runs<2>(c, a, b, alpha, beta); return;
    case 3: stream_runs<3>(c, a, b, alpha, beta); return;
    default: break;
  }
  constexpr std::int64_t kTile = 32, kChunk = 512;
  for (std::int64_t j0 = 0; j0 < b.rows; j0 += kTile) {
    const std::int64_t nt = std::min(b.rows - j0, kTile);
    const MatrixRef<S> ct{c.data + j0, c.rows, nt, c.ld};
    const std::int64_t next_rows = std::min(b.rows - j0 - nt, kTile);
    for (std::int64_t p0 = 0; p0 < a.cols; p0 += kChunk) {
      const std::int64_t kc = std::min(a.cols - p0, kChunk);
      const MatrixRef<const S> ac{a.data + p0, a.rows, kc, a.ld};
      const MatrixRef<const S> bt{b.data + j0 * b.ld + p0, nt, kc, b.ld};
      const S* next = next_rows > 0 ? b.data + (j0 + nt) * b.ld + p0 : nullptr;
      const S beta_c = p0 == 0 ? beta : S(1);
      std::int64_t i = 0;
      for (; i + 4 <= c.rows; i += 4) stream_rows<4>(ct, ac, bt, i, alpha, beta_c, i == 0 ? next : nullptr, next_rows);
      const S* pf = i == 0 ? next : nullptr;
      switch (c.rows - i) {  // the remainder's block height is a compile-time constant too
        case 3: stream_rows<3>(ct, ac, bt, i, alpha, beta_c, pf, next_rows); break;
        case 2: stream_rows<2>(ct, ac, bt, i, alpha, beta_c, pf, next_rows); break;
        case 1: stream_rows<1>(ct, ac, bt, i, alpha, beta_c, pf, next_rows); break;
        default: break;
      }
    }
  }
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
  if (ta == Trans::kN && tb == Trans::kT && c.rows > 1 && c.rows <= kStreamRows) {
    detail::gemm_stream_abt(c, a, b, alpha, beta);
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
