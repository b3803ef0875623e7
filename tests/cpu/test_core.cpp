// Core types, the counter-based generator, bf16/f16 and every Ops<Cpu> op against plain double loops.

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

TEST_SUITE("core") {
  TEST_CASE("Shape: extents, numel, errors") {
    Shape s{37, 24};
    CHECK(s.rank() == 2);
    CHECK(s.numel() == 37 * 24);
    CHECK(s[-1] == 24);
    CHECK(s.to_string() == "[37, 24]");
    CHECK(Shape{}.numel() == 1);
    CHECK(Shape{0, 5}.numel() == 0);
    CHECK_THROWS_AS(Shape({1, 2, 3, 4, 5}), ShapeError);
    CHECK_THROWS_WITH_AS(Shape({3, -1}), "Shape: expected non-negative extents, got -1", ShapeError);
    CHECK_THROWS_AS((void)s[2], ShapeError);
  }

  TEST_CASE("Tensor: zero-filled, move-only, views and row slices") {
    Tensor<float, Cpu> t({5, 3});
    for (float v : t.view().span()) CHECK(v == 0.0f);
    t.view()(2, 1) = 7.0f;
    CHECK(t.data()[2 * 3 + 1] == 7.0f);
    auto rows = t.view().rows(2, 4);
    CHECK(rows.shape() == Shape{2, 3});
    CHECK(rows(0, 1) == 7.0f);
    ConstTensorView<float, Cpu> c = t;
    CHECK(c.data() == t.data());
    Tensor<float, Cpu> moved = std::move(t);
    CHECK(moved.view()(2, 1) == 7.0f);
    CHECK(t.data() == nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
    CHECK_THROWS_AS((void)moved.view().rows(3, 6), ShapeError);
    CHECK_THROWS_WITH_AS((void)moved.view().reshape({4, 4}),
                         "TensorView::reshape: cannot view [5, 3] (15 elements) as [4, 4] (16 elements)", ShapeError);
    static_assert(!std::is_copy_constructible_v<Tensor<float, Cpu>>);
    static_assert(std::is_nothrow_move_constructible_v<Tensor<float, Cpu>>);
    CHECK(reinterpret_cast<std::uintptr_t>(moved.data()) % 64 == 0);
  }

  TEST_CASE("Tensor: buffers of 2 MiB and more are 2 MiB-aligned (huge pages), zero-filled, and move-assignable") {
    constexpr std::int64_t kHuge = std::int64_t{2} << 20;
    // Just below, at, and above the threshold, and a size that is not a whole number of huge pages.
    for (const std::int64_t count : {kHuge / 4 - 1, kHuge / 4, kHuge / 4 + 1, 3 * kHuge / 4 + 333}) {
      Tensor<float, Cpu> t({count});
      const auto address = reinterpret_cast<std::uintptr_t>(t.data());
      INFO("elements=" << count);
      CHECK(address % 64 == 0);
      CHECK((address % static_cast<std::uintptr_t>(kHuge) == 0) == (count * 4 >= kHuge));
      CHECK(std::all_of(t.data(), t.data() + count, [](float v) { return v == 0.0f; }));
      t.data()[count - 1] = 1.0f;
      // Move-assigning over a buffer of the other alignment frees each with its own (ASan checks the pairing).
      Tensor<float, Cpu> other({count * 4 >= kHuge ? std::int64_t{5} : kHuge});
      other = std::move(t);
      CHECK(other.data()[count - 1] == 1.0f);
    }
  }

  TEST_CASE("Philox4x32-10 matches the Random123 known-answer vectors") {
    using P = Philox4x32;
    CHECK(P::generate({0, 0, 0, 0}, {0, 0}) == P::Counter{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
    CHECK(P::generate({~0u, ~0u, ~0u, ~0u}, {~0u, ~0u}) ==
          P::Counter{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
    CHECK(P::generate({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}) ==
          P::Counter{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
    static_assert(P::generate({0, 0, 0, 0}, {0, 0})[0] == 0x6627e8d5u, "usable at compile time");
  }

  TEST_CASE("Philox uniforms: range and mean") {
    const Philox rng(42);
    double sum = 0;
    for (std::uint64_t i = 0; i < 20000; ++i) {
      const float u = uniform01(rng.block(i, 7)[0]);
      REQUIRE(u >= 0.0f);
      REQUIRE(u < 1.0f);
      sum += u;
    }
    CHECK(sum / 20000 == doctest::Approx(0.5).epsilon(0.02));
    CHECK(uniform01(0xffffffffu) < 1.0f);
    CHECK(uniform01(0u) == 0.0f);
  }

  TEST_CASE("bf16: round to nearest even, NaN stays NaN") {
    CHECK(bf16(1.0f).bits == 0x3f80);
    CHECK(static_cast<float>(bf16(3.140625f)) == 3.140625f);            // exactly representable
    CHECK(bf16::from_float(std::bit_cast<float>(0x3f808000u)) == 0x3f80);  // tie, even stays
    CHECK(bf16::from_float(std::bit_cast<float>(0x3f818000u)) == 0x3f82);  // tie, odd rounds up
    CHECK(bf16::from_float(std::bit_cast<float>(0x3f808001u)) == 0x3f81);  // above tie
    CHECK(std::isnan(static_cast<float>(bf16(NAN))));
    CHECK(std::isinf(static_cast<float>(bf16(INFINITY))));
  }

  TEST_CASE("f16: every half round-trips through float exactly") {
    for (std::uint32_t b = 0; b < 0x10000u; ++b) {
      const auto h = static_cast<std::uint16_t>(b);
      const float f = f16::to_float(h);
      if (std::isnan(f)) {
        CHECK(std::isnan(f16::to_float(f16::from_float(f))));
        continue;
      }
      REQUIRE(f16::from_float(f) == h);
    }
    CHECK(f16::from_float(65520.0f) == 0x7c00);  // rounds to infinity
    CHECK(f16::from_float(1e-8f) == 0x0000);
    // Between two halves: rounds to nearest, ties to even.
    CHECK(f16::from_float(1.0f + 0.5f / 1024.0f) == 0x3c00);
    CHECK(f16::from_float(1.0f + 1.5f / 1024.0f) == 0x3c02);
  }
}

namespace {

// Naive double-precision reference for c = alpha * op(a) op(b) + beta * c.
std::vector<double> naive_gemm(const std::vector<double>& a, std::int64_t ar, std::int64_t ac, Trans ta,
                               const std::vector<double>& b, std::int64_t br, std::int64_t bc, Trans tb,
                               std::vector<double> c, double alpha, double beta) {
  const std::int64_t m = ta == Trans::kN ? ar : ac, k = ta == Trans::kN ? ac : ar;
  const std::int64_t n = tb == Trans::kN ? bc : br;
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (std::int64_t p = 0; p < k; ++p) {
        const double x = ta == Trans::kN ? a[static_cast<std::size_t>(i * ac + p)] : a[static_cast<std::size_t>(p * ac + i)];
        const double y = tb == Trans::kN ? b[static_cast<std::size_t>(p * bc + j)] : b[static_cast<std::size_t>(j * bc + p)];
        s += x * y;
      }
      auto& dst = c[static_cast<std::size_t>(i * n + j)];
      dst = alpha * s + beta * dst;
    }
  }
  return c;
}

}  // namespace

TEST_SUITE("ops_cpu") {
  TEST_CASE_TEMPLATE("gemm: every transpose, alpha, beta and thread count against double loops", S, float, double) {
    const double tol = std::is_same_v<S, float> ? 2e-6 : 1e-13;
    for (int threads : {1, 2, 3}) {
      CpuContext ctx(threads);
      for (const auto& mnk : {std::array<std::int64_t, 3>{37, 41, 29}, {1, 203, 77}, {130, 3, 65}, {0, 5, 7},
                              {6, 9, 0}, {301, 257, 13}, {2, 45, 33}, {16, 70, 100}, {5, 3, 16}}) {
        const std::int64_t m = mnk[0], n = mnk[1], k = mnk[2];
        for (Trans ta : {Trans::kN, Trans::kT}) {
          for (Trans tb : {Trans::kN, Trans::kT}) {
            Tensor<S, Cpu> a(ta == Trans::kN ? Shape{m, k} : Shape{k, m});
            Tensor<S, Cpu> b(tb == Trans::kN ? Shape{k, n} : Shape{n, k});
            Tensor<S, Cpu> c({m, n});
            test::fill_uniform<S>(a, 1);
            test::fill_uniform<S>(b, 2);
            test::fill_uniform<S>(c, 3);
            const auto ref = naive_gemm(test::to_double<S>(a), a.dim(0), a.dim(1), ta, test::to_double<S>(b),
                                        b.dim(0), b.dim(1), tb, test::to_double<S>(c), 0.75, -0.5);
            Ops<Cpu>::gemm<S>(ctx, c, a, ta, b, tb, S(0.75), S(-0.5));
            const auto got = test::to_double<S>(c);
            INFO("m=" << m << " n=" << n << " k=" << k << " threads=" << threads);
            CHECK(test::rel_error(got.data(), ref.data(), m * n, 1e-3) < tol);
          }
        }
      }
    }
  }

  // c = a b^T with 2 rows or more runs the streaming kernel, in passes of kStreamRows rows: b cut into kBlockCols
  // runs walked together (runs of one row and of many), its last n mod kBlockCols rows as one more run (and as the
  // only one when n < kBlockCols), chunks of the runs shared by every block of 4 rows of a (one chunk, several, a
  // partial last one; chunks of one row per run up to kInterleaveRows rows of a: 9, 11, 17 and 32 rows, and 33 rows
  // just above), row blocks of 4 and remainders of 1 to 3, 5 to 8 rows in one block over kOnePassCols runs
  // (with AVX-512; n below, at and above a multiple of 3), a partial last vector of k, more than 16 rows per run in a
  // chunk (the scratch of c flushed mid-chunk), operands inside wider matrices (ld > cols), as the expert slabs use
  // them, and more rows than one pass (513, 519, 1100: the last pass of 1, 7 and 76 rows).
  TEST_CASE_TEMPLATE("gemm_serial: the streaming x W^T kernel against double loops, strided operands", S, float,
                     double) {
    const double tol = std::is_same_v<S, float> ? 3e-6 : 1e-13;
    using backend::cpu::MatrixRef;
    for (const auto& mnk : {std::array<std::int64_t, 3>{2, 1, 1}, {3, 33, 15}, {2, 4, 33}, {2, 70, 1039}, {3, 67, 600},
                            {3, 6, 16}, {5, 70, 17}, {7, 65, 512},
                            {17, 97, 513}, {130, 31, 1100}, {4, 64, 1039}, {512, 37, 45}, {513, 29, 70},
                            {9, 150, 2050}, {6, 4099, 48}, {5, 2, 100}, {4, 3, 5}, {11, 1001, 600}, {1100, 9, 33},
                            {8, 101, 77}, {8, 3, 16}, {8, 1, 9}, {7, 2, 40}, {6, 301, 33}, {519, 13, 40},
                            {backend::cpu::detail::kInterleaveRows, 45, 70},
                            {backend::cpu::detail::kInterleaveRows + 1, 41, 515},
                            {backend::cpu::kStreamRows, 5, 16}}) {
      const std::int64_t m = mnk[0], n = mnk[1], k = mnk[2], pad = 3;
      Tensor<S, Cpu> a({m, k + pad}), b({n, k + pad}), c({m, n + pad});
      test::fill_uniform<S>(a, 21);
      test::fill_uniform<S>(b, 22);
      test::fill_uniform<S>(c, 23);
      const auto ad = test::to_double<S>(a), bd = test::to_double<S>(b), cd = test::to_double<S>(c);
      for (const auto& ab : {std::pair<double, double>{1.0, 0.0}, {-0.5, 1.0}, {2.0, 0.25}}) {
        const double alpha = ab.first, beta = ab.second;  // not a structured binding: clang 14 cannot capture those
        Tensor<S, Cpu> out({m, n + pad});
        std::memcpy(out.data(), c.data(), c.bytes());
        backend::cpu::gemm_serial<S>(MatrixRef<S>{out.data(), m, n, n + pad},
                                     MatrixRef<const S>{a.data(), m, k, k + pad}, Trans::kN,
                                     MatrixRef<const S>{b.data(), n, k, k + pad}, Trans::kT, static_cast<S>(alpha),
                                     static_cast<S>(beta));
        double worst = 0, scale = 1e-3;
        for (std::int64_t i = 0; i < m; ++i) {
          for (std::int64_t j = 0; j < n + pad; ++j) {
            const auto at = static_cast<std::size_t>(i * (n + pad) + j);
            const double got = static_cast<double>(out.data()[at]);
            if (j >= n) {  // the padding columns of c are never written
              CHECK(got == cd[at]);
              continue;
            }
            double s = 0;
            for (std::int64_t p = 0; p < k; ++p) {
              s += ad[static_cast<std::size_t>(i * (k + pad) + p)] * bd[static_cast<std::size_t>(j * (k + pad) + p)];
            }
            const double ref = alpha * s + beta * cd[at];
            worst = std::max(worst, std::abs(got - ref));
            scale = std::max(scale, std::abs(ref));
          }
        }
        INFO("m=" << m << " n=" << n << " k=" << k << " alpha=" << alpha << " beta=" << beta);
        CHECK(worst / scale < tol * std::sqrt(static_cast<double>(k)));
      }
    }
  }

  TEST_CASE("gemm: shape mismatch names both operands") {
    CpuContext ctx;
    Tensor<float, Cpu> a({3, 4}), b({5, 6}), c({3, 6});
    CHECK_THROWS_WITH_AS(Ops<Cpu>::gemm<float>(ctx, c, a, Trans::kN, b, Trans::kN),
                         "gemm: op(a) is [3, 4] and op(b) is [5, 6], so c must be [3, 6] with equal inner extents; "
                         "got c [3, 6]",
                         ShapeError);
  }

  TEST_CASE("gemm: bitwise reproducible for a fixed thread count, close across thread counts") {
    Tensor<float, Cpu> a({64, 33}), b({33, 19}), c1({64, 19}), c2({64, 19});
    test::fill_uniform<float>(a, 5);
    test::fill_uniform<float>(b, 6);
    CpuContext one(1), two(2);
    Ops<Cpu>::gemm<float>(one, c1, a, Trans::kN, b, Trans::kN);
    Ops<Cpu>::gemm<float>(two, c2, a, Trans::kN, b, Trans::kN);
    // Same thread count twice: bitwise identical.
    Tensor<float, Cpu> c3({64, 19});
    Ops<Cpu>::gemm<float>(two, c3, a, Trans::kN, b, Trans::kN);
    CHECK(std::memcmp(c2.data(), c3.data(), c2.bytes()) == 0);
    CHECK(test::rel_error(test::to_double<float>(c1).data(), test::to_double<float>(c2).data(), c1.numel()) < 1e-6);
  }

  TEST_CASE_TEMPLATE("softmax rows against double loops, including large logits", S, float, double) {
    CpuContext ctx(2);
    Tensor<S, Cpu> x({23, 7}), y({23, 7});
    test::fill_uniform<S>(x, 11, -30, 30);
    x.view()(0, 3) = S(500);  // would overflow exp without the max subtraction
    Ops<Cpu>::softmax<S>(ctx, y, x);
    for (std::int64_t r = 0; r < 23; ++r) {
      double mx = -INFINITY, sum = 0;
      for (int j = 0; j < 7; ++j) mx = std::max(mx, double(x.view()(r, j)));
      for (int j = 0; j < 7; ++j) sum += std::exp(double(x.view()(r, j)) - mx);
      for (int j = 0; j < 7; ++j) {
        const double ref = std::exp(double(x.view()(r, j)) - mx) / sum;
        CHECK(double(y.view()(r, j)) == doctest::Approx(ref).epsilon(std::is_same_v<S, float> ? 1e-6 : 1e-14));
      }
    }
  }

  TEST_CASE_TEMPLATE("layernorm against double loops", S, float, double) {
    CpuContext ctx(2);
    const std::int64_t rows = 19, c = 29;
    Tensor<S, Cpu> x({rows, c}), y({rows, c}), g({c}), b({c}), mean({rows}), rstd({rows});
    test::fill_uniform<S>(x, 21, -3, 5);
    test::fill_uniform<S>(g, 22);
    test::fill_uniform<S>(b, 23);
    Ops<Cpu>::layernorm<S>(ctx, y, mean, rstd, x, g, b, S(1e-5));
    for (std::int64_t r = 0; r < rows; ++r) {
      double m = 0, v = 0;
      for (std::int64_t j = 0; j < c; ++j) m += double(x.view()(r, j));
      m /= double(c);
      for (std::int64_t j = 0; j < c; ++j) v += (double(x.view()(r, j)) - m) * (double(x.view()(r, j)) - m);
      v /= double(c);
      const double rs = 1.0 / std::sqrt(v + 1e-5);
      CHECK(double(mean.view()(r)) == doctest::Approx(m).epsilon(1e-6));
      CHECK(double(rstd.view()(r)) == doctest::Approx(rs).epsilon(1e-5));
      for (std::int64_t j = 0; j < c; ++j) {
        const double ref = (double(x.view()(r, j)) - m) * rs * double(g.view()(j)) + double(b.view()(j));
        CHECK(double(y.view()(r, j)) == doctest::Approx(ref).epsilon(1e-5).scale(1.0));
      }
    }
    Tensor<S, Cpu> bad({c + 1});
    CHECK_THROWS_AS(Ops<Cpu>::layernorm<S>(ctx, y, mean, rstd, x, bad, b, S(1e-5)), ShapeError);
  }

  TEST_CASE("activations and their derivatives against finite differences") {
    CpuContext ctx(2);
    Tensor<double, Cpu> x({101}), y({101}), d({101}), ones({101});
    test::fill_uniform<double>(x, 31, -4, 4);
    for (auto& v : ones.view().span()) v = 1.0;
    auto check = [&]<class Act>(Act) {
      Ops<Cpu>::activation<Act, double>(ctx, y, x);
      Ops<Cpu>::activation_backward<Act, double>(ctx, d, ones, x);
      for (std::int64_t i = 0; i < 101; ++i) {
        const double xi = x.data()[i], h = 1e-6;
        if (std::is_same_v<Act, nn::Relu> && std::abs(xi) < 1e-3) continue;  // kink
        const double fd = (Act::forward(xi + h) - Act::forward(xi - h)) / (2 * h);
        CHECK(d.data()[i] == doctest::Approx(fd).epsilon(1e-7));
      }
    };
    check(nn::Relu{});
    check(nn::Gelu{});
    check(nn::Silu{});
    CHECK(nn::Relu::forward(-2.0) == 0.0);
    CHECK(nn::Gelu::forward(1.0) == doctest::Approx(0.8413447460685429));
    CHECK(nn::Silu::forward(1.0) == doctest::Approx(0.7310585786300049));
  }

  TEST_CASE("gather and scatter-add rows, with out-of-range indices rejected") {
    CpuContext ctx(2);
    Tensor<float, Cpu> src({6, 5}), out({4, 5}), acc({6, 5});
    test::fill_uniform<float>(src, 41);
    Tensor<std::int32_t, Cpu> idx({4});
    const std::int32_t ids[] = {5, 0, 5, 2};
    std::copy(std::begin(ids), std::end(ids), idx.data());
    Ops<Cpu>::gather_rows<float, std::int32_t>(ctx, out, src, idx);
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 5; ++j) CHECK(out.view()(r, j) == src.view()(ids[r], j));
    Ops<Cpu>::scatter_add_rows<float, std::int32_t>(ctx, acc, out, idx);
    for (int j = 0; j < 5; ++j) {
      CHECK(acc.view()(5, j) == doctest::Approx(2 * src.view()(5, j)));
      CHECK(acc.view()(1, j) == 0.0f);
    }
    idx.data()[1] = 6;
    CHECK_THROWS_WITH_AS((Ops<Cpu>::gather_rows<float, std::int32_t>(ctx, out, src, idx)),
                         "gather_rows: index[1] = 6 out of range [0, 6)", ShapeError);
  }

  TEST_CASE("top-k: descending, ties to the lower index, K = n") {
    CpuContext ctx;
    Tensor<float, Cpu> x({3, 5}), v({3, 5});
    Tensor<std::int32_t, Cpu> ix({3, 5});
    const float data[] = {0.1f, 0.5f, 0.5f, 0.2f, 0.5f,   //
                          3.f,  2.f,  1.f,  0.f,  -1.f,   //
                          -1.f, NAN,  -2.f, -1.f, -3.f};
    std::copy(std::begin(data), std::end(data), x.data());
    Ops<Cpu>::top_k<5, float>(ctx, v, ix, x);
    const std::int32_t want[] = {1, 2, 4, 3, 0, 0, 1, 2, 3, 4, 0, 3, 2, 4, 1};
    for (int i = 0; i < 15; ++i) CHECK(ix.data()[i] == want[i]);
    Tensor<float, Cpu> v2({3, 2});
    Tensor<std::int32_t, Cpu> i2({3, 2});
    Ops<Cpu>::top_k<2, float>(ctx, v2, i2, x);
    CHECK(i2.view()(0, 0) == 1);
    CHECK(i2.view()(0, 1) == 2);
    Tensor<float, Cpu> small({2, 1});
    CHECK_THROWS_AS((Ops<Cpu>::top_k<2, float>(ctx, v2, i2, small)), ShapeError);
  }

  TEST_CASE("thread pool: every task once, on a fixed worker, exceptions propagate") {
    CpuContext ctx(3);
    std::vector<std::atomic<int>> hits(100);
    ctx.parallel(100, [&](std::int64_t t) { hits[static_cast<std::size_t>(t)]++; });
    for (auto& h : hits) CHECK(h.load() == 1);
    CHECK_THROWS_AS(ctx.parallel(10, [](std::int64_t t) { if (t == 7) throw Error("boom"); }), Error);
    ctx.parallel(4, [](std::int64_t) {});  // still usable after an exception
    CHECK_THROWS_AS(CpuContext(0), Error);
  }
}
