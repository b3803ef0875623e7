// The CUDA back-end's foundation: context, storage, copies, checked calls and GEMMs, against the CPU back-end.
#include <doctest/doctest.h>

#include <string>

#include "cuda_test_util.cuh"

using namespace tmoe;
using test::poison;
using test::random_host;

TEST_SUITE("cuda.backend") {
  TEST_CASE("a device tensor starts zero-filled and round-trips through the host") {
    CudaContext ctx;
    Tensor<float, Cuda> z({37, 5});
    const Tensor<float, Cpu> zh = to_host(ctx, z);
    for (std::int64_t i = 0; i < zh.numel(); ++i) REQUIRE(zh.data()[i] == 0.0f);

    const Tensor<float, Cpu> h = random_host<float>({37, 5}, 11);
    Tensor<float, Cuda> d = to_device(ctx, h);
    Tensor<float, Cuda> d2({37, 5});
    poison(ctx, d2.view());
    copy<float, Cuda, Cuda>(ctx, d2.view(), d.cview());
    const Tensor<float, Cpu> back = to_host(ctx, d2);
    for (std::int64_t i = 0; i < h.numel(); ++i) REQUIRE(back.data()[i] == h.data()[i]);

    Tensor<float, Cuda> empty({0, 5});
    CHECK(to_host(ctx, empty).numel() == 0);
  }

  TEST_CASE("copies with mismatched shapes throw ShapeError naming both shapes") {
    CudaContext ctx;
    Tensor<float, Cuda> d({3, 4});
    const Tensor<float, Cpu> h({4, 3});
    try {
      copy<float, Cuda, Cpu>(ctx, d.view(), h.cview());
      FAIL("expected ShapeError");
    } catch (const ShapeError& e) {
      const std::string m = e.what();
      CHECK(m.find("[3, 4]") != std::string::npos);
      CHECK(m.find("[4, 3]") != std::string::npos);
    }
  }

  TEST_CASE("a failing CUDA call throws DeviceError with the call, file and line") {
    try {
      TMOE_CUDA_CHECK(cudaSetDevice(1 << 20));
      FAIL("expected DeviceError");
    } catch (const DeviceError& e) {
      const std::string m = e.what();
      CHECK(m.find("cudaSetDevice(1 << 20)") != std::string::npos);
      CHECK(m.find("test_backend.cu:") != std::string::npos);
      CHECK(m.find("cudaErrorInvalidDevice") != std::string::npos);
    }
    CHECK_THROWS_AS(CudaContext(1 << 20), DeviceError);
  }

  template <class S>
  void check_gemm(Trans ta, Trans tb, double tolerance, bool tf32 = false) {
    CudaContext ctx;
    ctx.set_allow_tf32(tf32);
    const std::int64_t M = 37, N = 53, Kd = 91;
    const Shape sa = ta == Trans::kN ? Shape{M, Kd} : Shape{Kd, M};
    const Shape sb = tb == Trans::kN ? Shape{Kd, N} : Shape{N, Kd};
    const auto a = random_host<S>(sa, 1), b = random_host<S>(sb, 2), c0 = random_host<S>({M, N}, 3);
    // Reference in double over the (already rounded) inputs: c = 0.75 op(a) op(b) - 0.5 c0.
    Tensor<double, Cpu> want({M, N});
    for (std::int64_t i = 0; i < M; ++i) {
      for (std::int64_t j = 0; j < N; ++j) {
        double acc = 0;
        for (std::int64_t k = 0; k < Kd; ++k) {
          const double x = test::as_double(ta == Trans::kN ? a.data()[i * Kd + k] : a.data()[k * M + i]);
          const double y = test::as_double(tb == Trans::kN ? b.data()[k * N + j] : b.data()[j * Kd + k]);
          acc += x * y;
        }
        want.data()[i * N + j] = 0.75 * acc - 0.5 * test::as_double(c0.data()[i * N + j]);
      }
    }
    auto da = to_device(ctx, a), db = to_device(ctx, b), dc = to_device(ctx, c0);
    Ops<Cuda>::gemm<S>(ctx, dc.view(), da.cview(), ta, db.cview(), tb, 0.75, -0.5);
    const double err = test::rel_error_vs<S, double>(ctx, dc.cview(), want.cview());
    CAPTURE(err);
    CHECK(err < tolerance);
  }

  TEST_CASE("gemm: float32, TF32 on request, float64, bf16 and f16 against a double loop, every transpose") {
    for (Trans ta : {Trans::kN, Trans::kT}) {
      for (Trans tb : {Trans::kN, Trans::kT}) {
        check_gemm<float>(ta, tb, 1e-5);
        check_gemm<float>(ta, tb, 1e-3, /*tf32=*/true);
        check_gemm<double>(ta, tb, 1e-12);
        check_gemm<bf16>(ta, tb, 1e-2);
        check_gemm<f16>(ta, tb, 1e-2);
      }
    }
  }

  TEST_CASE("gemm: shape mismatches throw before anything runs, empty extents are no-ops") {
    CudaContext ctx;
    Tensor<float, Cuda> a({4, 5}), b({6, 7}), c({4, 7});
    CHECK_THROWS_AS(Ops<Cuda>::gemm<float>(ctx, c.view(), a.cview(), Trans::kN, b.cview(), Trans::kN), ShapeError);
    Tensor<float, Cuda> a0({0, 5}), b0({5, 7}), c0({0, 7});
    Ops<Cuda>::gemm<float>(ctx, c0.view(), a0.cview(), Trans::kN, b0.cview(), Trans::kN);
    // k = 0: c = beta * c.
    Tensor<float, Cpu> ones({3, 2});
    for (auto& v : ones.view().span()) v = 1.0f;
    Tensor<float, Cuda> ak({3, 0}), bk({0, 2});
    auto ck = to_device(ctx, ones);
    Ops<Cuda>::gemm<float>(ctx, ck.view(), ak.cview(), Trans::kN, bk.cview(), Trans::kN, 1.0f, 2.0f);
    const auto h = to_host(ctx, ck);
    for (std::int64_t i = 0; i < h.numel(); ++i) CHECK(h.data()[i] == 2.0f);
  }

}  // TEST_SUITE
