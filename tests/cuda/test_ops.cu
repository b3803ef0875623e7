// Ops<Cuda> beyond GEMM against Ops<Cpu>: softmax, layer norm, activations (forward and backward), gather and
// scatter-add, top-k, bias sums, axpy. Inputs come from fixed seeds; every pure output is poisoned (NaN, or -1 for
// indices) before the op runs. The CPU reference runs in the same precision for float and double and in float on the
// converted inputs for bf16 and f16.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_util.cuh"

using namespace tmoe;
using test::poison;
using test::random_host;

namespace {

/// The CPU reference's scalar: double for double, float otherwise.
template <class S>
using Ref = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <class S>
constexpr double tolerance() {
  if constexpr (std::is_same_v<S, double>) return 1e-12;
  else if constexpr (std::is_same_v<S, float>) return 1e-5;
  else return 1e-2;
}

template <class S>
const char* type_name() {
  if constexpr (std::is_same_v<S, double>) return "double";
  else if constexpr (std::is_same_v<S, float>) return "float";
  else if constexpr (std::is_same_v<S, bf16>) return "bf16";
  else return "f16";
}

/// A host tensor as the CPU reference sees it: itself for float and double, converted to float for bf16 and f16.
template <class S>
Tensor<Ref<S>, Cpu> as_ref(const Tensor<S, Cpu>& t) {
  return test::convert<Ref<S>, S>(t.cview());
}

/// Elements of a reference tensor rounded to S (e.g. a CPU-computed mean used as a bf16 input).
template <class S, class R>
Tensor<S, Cpu> as_scalar(const Tensor<R, Cpu>& t) {
  return test::convert<S, R>(t.cview());
}

template <class S, class R>
void check_close(CudaContext& ctx, const Tensor<S, Cuda>& got, const Tensor<R, Cpu>& want, const char* what) {
  const double err = test::rel_error_vs<S, R>(ctx, got.cview(), want.cview());
  CAPTURE(type_name<S>());
  CAPTURE(what);
  CAPTURE(got.shape().to_string());
  CAPTURE(err);
  CHECK(err < tolerance<S>());
}

std::int64_t last_of(const Shape& s) { return s.rank() == 0 ? 1 : s[-1]; }
std::int64_t rows_of(const Shape& s) { return last_of(s) == 0 ? 0 : s.numel() / last_of(s); }

/// Row shapes for the row ops: odd sizes, a row of exactly 1024 (the last one-warp row), rows longer than 1024 (one
/// block per row), more than 64 rows (several column-sum chunks), rank 3, a single column and zero rows.
std::vector<Shape> row_shapes() {
  return {{37, 53}, {3, 1024}, {6, 1500}, {2, 3, 1029}, {300, 53}, {7, 1}, {0, 53}};
}

/// Integer row indices in [0, n), from a seed.
template <class I>
Tensor<I, Cpu> random_index(std::int64_t r, std::int64_t n, std::uint64_t seed) {
  Tensor<I, Cpu> t({r});
  const Philox rng(seed);
  for (std::int64_t i = 0; i < r; ++i) {
    const auto w = rng.block(static_cast<std::uint64_t>(i), 0xBEEFu);
    t.data()[i] = static_cast<I>(static_cast<std::int64_t>(w[0] % static_cast<std::uint32_t>(n)));
  }
  return t;
}

template <class S>
Tensor<S, Cpu> bitwise_host(CudaContext& ctx, const Tensor<S, Cuda>& t) {
  return to_host(ctx, t);
}

template <class S>
bool bitwise_equal(const Tensor<S, Cpu>& a, const Tensor<S, Cpu>& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(S)) == 0;
}

// ---- per-op checks, one scalar type at a time -------------------------------------------------------------------

template <class S>
void check_softmax(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const auto x = random_host<S>(shape, 21, -6.0, 6.0);
  const auto xr = as_ref(x);
  Tensor<R, Cpu> want(shape);
  Ops<Cpu>::softmax<R>(cpu, want.view(), xr.cview());

  const auto dx = to_device(ctx, x);
  Tensor<S, Cuda> out(shape);
  poison(ctx, out.view());
  Ops<Cuda>::softmax<S>(ctx, out.view(), dx.cview());
  check_close(ctx, out, want, "softmax");

  auto inplace = to_device(ctx, x);
  Ops<Cuda>::softmax<S>(ctx, inplace.view(), inplace.cview());
  check_close(ctx, inplace, want, "softmax in place");
}

template <class S>
void check_softmax_backward(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  // y is a real softmax output (rounded to S), as in training.
  Tensor<R, Cpu> yr0(shape);
  Ops<Cpu>::softmax<R>(cpu, yr0.view(), as_ref(random_host<S>(shape, 31, -3.0, 3.0)).cview());
  const auto y = as_scalar<S>(yr0);
  const auto dout = random_host<S>(shape, 32);
  const auto yr = as_ref(y), doutr = as_ref(dout);
  Tensor<R, Cpu> want(shape);
  Ops<Cpu>::softmax_backward<R>(cpu, want.view(), doutr.cview(), yr.cview());

  const auto dy = to_device(ctx, y), ddout = to_device(ctx, dout);
  Tensor<S, Cuda> din(shape);
  poison(ctx, din.view());
  Ops<Cuda>::softmax_backward<S>(ctx, din.view(), ddout.cview(), dy.cview());
  check_close(ctx, din, want, "softmax_backward");

  auto inplace = to_device(ctx, dout);
  Ops<Cuda>::softmax_backward<S>(ctx, inplace.view(), inplace.cview(), dy.cview());
  check_close(ctx, inplace, want, "softmax_backward, din aliasing dout");
}

template <class S>
void check_layernorm(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const std::int64_t c = last_of(shape), rows = rows_of(shape);
  const auto x = random_host<S>(shape, 41, -2.0, 3.0);
  const auto gamma = random_host<S>({c}, 42, 0.5, 1.5), beta = random_host<S>({c}, 43);
  const auto xr = as_ref(x), gr = as_ref(gamma), br = as_ref(beta);
  Tensor<R, Cpu> want(shape), want_mean({rows}), want_rstd({rows});
  Ops<Cpu>::layernorm<R>(cpu, want.view(), want_mean.view(), want_rstd.view(), xr.cview(), gr.cview(), br.cview(),
                         R(1e-5));

  const auto dx = to_device(ctx, x), dg = to_device(ctx, gamma), db = to_device(ctx, beta);
  Tensor<S, Cuda> out(shape), mean({rows}), rstd({rows});
  poison(ctx, out.view());
  poison(ctx, mean.view());
  poison(ctx, rstd.view());
  Ops<Cuda>::layernorm<S>(ctx, out.view(), mean.view(), rstd.view(), dx.cview(), dg.cview(), db.cview(), 1e-5);
  check_close(ctx, out, want, "layernorm out");
  check_close(ctx, mean, want_mean, "layernorm mean");
  check_close(ctx, rstd, want_rstd, "layernorm rstd");

  auto inplace = to_device(ctx, x);
  poison(ctx, mean.view());
  poison(ctx, rstd.view());
  Ops<Cuda>::layernorm<S>(ctx, inplace.view(), mean.view(), rstd.view(), inplace.cview(), dg.cview(), db.cview(),
                          1e-5);
  check_close(ctx, inplace, want, "layernorm in place");
}

template <class S>
void check_layernorm_backward(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const std::int64_t c = last_of(shape), rows = rows_of(shape);
  const auto x = random_host<S>(shape, 51, -2.0, 3.0);
  const auto gamma = random_host<S>({c}, 52, 0.5, 1.5), beta = random_host<S>({c}, 53);
  // mean and rstd from a forward pass, rounded to S: both back-ends see the same saved statistics.
  Tensor<R, Cpu> y0(shape), mean0({rows}), rstd0({rows});
  Ops<Cpu>::layernorm<R>(cpu, y0.view(), mean0.view(), rstd0.view(), as_ref(x).cview(), as_ref(gamma).cview(),
                         as_ref(beta).cview(), R(1e-5));
  const auto mean = as_scalar<S>(mean0), rstd = as_scalar<S>(rstd0);
  const auto dout = random_host<S>(shape, 54);
  const auto dgamma0 = random_host<S>({c}, 55), dbeta0 = random_host<S>({c}, 56);

  const auto xr = as_ref(x), gr = as_ref(gamma), mr = as_ref(mean), rr = as_ref(rstd), dr = as_ref(dout);
  Tensor<R, Cpu> want_din(shape);
  auto want_dgamma = as_ref(dgamma0), want_dbeta = as_ref(dbeta0);
  Ops<Cpu>::layernorm_backward<R>(cpu, want_din.view(), want_dgamma.view(), want_dbeta.view(), dr.cview(), xr.cview(),
                                  mr.cview(), rr.cview(), gr.cview());

  const auto dx = to_device(ctx, x), dg = to_device(ctx, gamma), dm = to_device(ctx, mean),
             drs = to_device(ctx, rstd), ddout = to_device(ctx, dout);
  Tensor<S, Cuda> din(shape);
  auto dgamma = to_device(ctx, dgamma0), dbeta = to_device(ctx, dbeta0);
  poison(ctx, din.view());
  Ops<Cuda>::layernorm_backward<S>(ctx, din.view(), dgamma.view(), dbeta.view(), ddout.cview(), dx.cview(),
                                   dm.cview(), drs.cview(), dg.cview());
  check_close(ctx, din, want_din, "layernorm_backward din");
  check_close(ctx, dgamma, want_dgamma, "layernorm_backward dgamma");
  check_close(ctx, dbeta, want_dbeta, "layernorm_backward dbeta");

  // din aliasing dout: the parameter gradients must still see the original dout.
  auto inplace = to_device(ctx, dout);
  auto dgamma2 = to_device(ctx, dgamma0), dbeta2 = to_device(ctx, dbeta0);
  Ops<Cuda>::layernorm_backward<S>(ctx, inplace.view(), dgamma2.view(), dbeta2.view(), inplace.cview(), dx.cview(),
                                   dm.cview(), drs.cview(), dg.cview());
  check_close(ctx, inplace, want_din, "layernorm_backward din aliasing dout");
  check_close(ctx, dgamma2, want_dgamma, "layernorm_backward dgamma (aliased)");
  check_close(ctx, dbeta2, want_dbeta, "layernorm_backward dbeta (aliased)");
}

template <class Act, class S>
void check_activation(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const auto pre = random_host<S>(shape, 61, -4.0, 4.0), dout = random_host<S>(shape, 62);
  const auto pr = as_ref(pre), dr = as_ref(dout);
  Tensor<R, Cpu> want(shape), want_din(shape);
  Ops<Cpu>::activation<Act, R>(cpu, want.view(), pr.cview());
  Ops<Cpu>::activation_backward<Act, R>(cpu, want_din.view(), dr.cview(), pr.cview());

  const auto dpre = to_device(ctx, pre), ddout = to_device(ctx, dout);
  Tensor<S, Cuda> out(shape), din(shape);
  poison(ctx, out.view());
  poison(ctx, din.view());
  Ops<Cuda>::activation<Act, S>(ctx, out.view(), dpre.cview());
  Ops<Cuda>::activation_backward<Act, S>(ctx, din.view(), ddout.cview(), dpre.cview());
  CAPTURE(Act::name);
  check_close(ctx, out, want, "activation");
  check_close(ctx, din, want_din, "activation_backward");
}

template <class S, class I>
void check_gather(const Shape& src_shape, std::int64_t r) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const auto src = random_host<S>(src_shape, 71);
  const auto index = random_index<I>(r, src_shape[0], 72);
  const Shape out_shape = src_shape.with_rows(r);
  const auto sr = as_ref(src);
  Tensor<R, Cpu> want(out_shape);
  Ops<Cpu>::gather_rows<R, I>(cpu, want.view(), sr.cview(), index.cview());

  const auto dsrc = to_device(ctx, src);
  const auto dindex = to_device(ctx, index);
  Tensor<S, Cuda> out(out_shape);
  poison(ctx, out.view());
  Ops<Cuda>::gather_rows<S, I>(ctx, out.view(), dsrc.cview(), dindex.cview());
  check_close(ctx, out, want, "gather_rows");
  // A gather copies: the result is the reference exactly.
  CHECK(test::rel_error_vs<S, R>(ctx, out.cview(), want.cview()) == 0.0);
}

template <class S, class I>
void check_scatter(const Shape& out_shape, std::int64_t r, std::int64_t distinct) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const Shape src_shape = out_shape.with_rows(r);
  const auto src = random_host<S>(src_shape, 81), out0 = random_host<S>(out_shape, 82);
  const auto index = random_index<I>(r, distinct, 83);  // only the first `distinct` rows: many duplicates
  const auto sr = as_ref(src);
  auto want = as_ref(out0);
  Ops<Cpu>::scatter_add_rows<R, I>(cpu, want.view(), sr.cview(), index.cview());

  const auto dsrc = to_device(ctx, src);
  const auto dindex = to_device(ctx, index);
  auto out = to_device(ctx, out0);
  Ops<Cuda>::scatter_add_rows<S, I>(ctx, out.view(), dsrc.cview(), dindex.cview());
  check_close(ctx, out, want, "scatter_add_rows");
  if constexpr (std::is_same_v<S, R>) {
    // Same precision, same order (increasing r per destination): bit for bit the CPU's sums.
    CHECK(test::rel_error_vs<S, R>(ctx, out.cview(), want.cview()) == 0.0);
  }
  // Reproducible: a second run from the same start gives the same bits.
  auto again = to_device(ctx, out0);
  Ops<Cuda>::scatter_add_rows<S, I>(ctx, again.view(), dsrc.cview(), dindex.cview());
  CHECK(bitwise_equal(bitwise_host(ctx, out), bitwise_host(ctx, again)));
}

/// Values in steps of 1/4, so rows are full of ties; row 1 (if any) is constant; for float a few NaNs and -inf.
template <class S>
Tensor<S, Cpu> tied_values(const Shape& shape, std::uint64_t seed) {
  auto x = random_host<S>(shape, seed, -2.0, 2.0);
  const std::int64_t n = last_of(shape), rows = rows_of(shape);
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    x.data()[i] = test::from_double<S>(std::round(test::as_double(x.data()[i]) * 4.0) / 4.0);
  }
  if (rows > 1) {
    for (std::int64_t j = 0; j < n; ++j) x.data()[n + j] = test::from_double<S>(0.5);
  }
  if constexpr (std::is_same_v<S, float>) {
    if (rows > 2 && n > 20) {
      x.data()[2 * n + 0] = std::numeric_limits<float>::quiet_NaN();
      x.data()[2 * n + 7] = std::numeric_limits<float>::quiet_NaN();
      x.data()[2 * n + 3] = -std::numeric_limits<float>::infinity();
    }
  }
  return x;
}

template <int K, class S>
void check_top_k(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const std::int64_t rows = rows_of(shape);
  const auto x = tied_values<S>(shape, 91);
  const auto xr = as_ref(x);
  Tensor<R, Cpu> want({rows, K});
  Tensor<std::int32_t, Cpu> want_idx({rows, K});
  Ops<Cpu>::top_k<K, R>(cpu, want.view(), want_idx.view(), xr.cview());

  const auto dx = to_device(ctx, x);
  Tensor<S, Cuda> values({rows, K});
  Tensor<std::int32_t, Cuda> indices({rows, K});
  poison(ctx, values.view());
  poison(ctx, indices.view());
  Ops<Cuda>::top_k<K, S>(ctx, values.view(), indices.view(), dx.cview());
  const auto got_idx = to_host(ctx, indices);
  const auto got = to_host(ctx, values);
  CAPTURE(type_name<S>());
  CAPTURE(K);
  CAPTURE(shape.to_string());
  std::int64_t index_mismatches = 0, value_mismatches = 0;
  for (std::int64_t i = 0; i < rows * K; ++i) {
    index_mismatches += got_idx.data()[i] != want_idx.data()[i];
    value_mismatches += test::as_double(got.data()[i]) != test::as_double(want.data()[i]);
  }
  CHECK(index_mismatches == 0);
  CHECK(value_mismatches == 0);
  if (rows > 1) {
    // The constant row: the first K columns in order.
    for (int k = 0; k < K; ++k) CHECK(got_idx.data()[K + k] == k);
  }
}

template <class S>
void check_row_sum(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const std::int64_t n = last_of(shape);
  const auto in = random_host<S>(shape, 101), out0 = random_host<S>({n}, 102);
  auto want = as_ref(out0);
  Ops<Cpu>::row_sum_accumulate<R>(cpu, want.view(), as_ref(in).cview());

  const auto din = to_device(ctx, in);
  auto out = to_device(ctx, out0);
  Ops<Cuda>::row_sum_accumulate<S>(ctx, out.view(), din.cview());
  check_close(ctx, out, want, "row_sum_accumulate");

  auto again = to_device(ctx, out0);
  Ops<Cuda>::row_sum_accumulate<S>(ctx, again.view(), din.cview());
  CHECK(bitwise_equal(bitwise_host(ctx, out), bitwise_host(ctx, again)));
}

template <class S>
void check_add_row_vector(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const std::int64_t n = last_of(shape);
  const auto out0 = random_host<S>(shape, 111), v = random_host<S>({n}, 112);
  auto want = as_ref(out0);
  Ops<Cpu>::add_row_vector<R>(cpu, want.view(), as_ref(v).cview());

  const auto dv = to_device(ctx, v);
  auto out = to_device(ctx, out0);
  Ops<Cuda>::add_row_vector<S>(ctx, out.view(), dv.cview());
  check_close(ctx, out, want, "add_row_vector");
}

template <class S>
void check_axpy(const Shape& shape) {
  using R = Ref<S>;
  CudaContext ctx;
  CpuContext cpu;
  const auto y0 = random_host<S>(shape, 121), x = random_host<S>(shape, 122);
  auto want = as_ref(y0);
  Ops<Cpu>::axpy<R>(cpu, want.view(), as_ref(x).cview(), R(-0.75));

  const auto dx = to_device(ctx, x);
  auto y = to_device(ctx, y0);
  Ops<Cuda>::axpy<S>(ctx, y.view(), dx.cview(), -0.75);
  check_close(ctx, y, want, "axpy");
}

template <class S>
void check_all_row_ops() {
  for (const Shape& s : row_shapes()) {
    check_softmax<S>(s);
    check_softmax_backward<S>(s);
    check_layernorm<S>(s);
    check_layernorm_backward<S>(s);
    check_row_sum<S>(s);
    check_add_row_vector<S>(s);
    check_axpy<S>(s);
  }
}

template <class S>
void check_all_activations() {
  for (const Shape& s : {Shape{37, 53}, Shape{6, 1500}, Shape{0, 53}}) {
    check_activation<nn::Relu, S>(s);
    check_activation<nn::Gelu, S>(s);
    check_activation<nn::Silu, S>(s);
  }
}

template <class S, class I>
void check_gather_scatter() {
  check_gather<S, I>({37, 53}, 91);
  check_gather<S, I>({41, 1500}, 19);
  check_gather<S, I>({37, 4, 13}, 64);
  check_gather<S, I>({37, 53}, 0);
  check_scatter<S, I>({37, 53}, 91, 37);
  check_scatter<S, I>({37, 53}, 91, 3);  // 91 rows into 3 destinations
  check_scatter<S, I>({41, 1500}, 64, 41);
  check_scatter<S, I>({37, 4, 13}, 50, 20);
  check_scatter<S, I>({37, 53}, 0, 1);
}

template <class S>
void check_all_top_k() {
  for (const Shape& s : {Shape{37, 53}, Shape{6, 1500}, Shape{5, 2, 33}, Shape{9, 8}, Shape{0, 53}}) {
    check_top_k<1, S>(s);
    check_top_k<2, S>(s);
    check_top_k<3, S>(s);
    check_top_k<8, S>(s);
  }
}

}  // namespace

TEST_SUITE("cuda.ops") {

TEST_CASE_TEMPLATE("softmax, layernorm (forward and backward), row sums, bias add and axpy match Ops<Cpu>", S, float,
                   double, bf16, f16) {
  check_all_row_ops<S>();
}

TEST_CASE_TEMPLATE("relu, gelu and silu forward and backward match Ops<Cpu>", S, float, double, bf16, f16) {
  check_all_activations<S>();
}

TEST_CASE_TEMPLATE("gather_rows and scatter_add_rows match Ops<Cpu> for int32 and int64 indices", S, float, double,
                   bf16, f16) {
  check_gather_scatter<S, std::int32_t>();
  check_gather_scatter<S, std::int64_t>();
}

TEST_CASE_TEMPLATE("top_k matches Ops<Cpu> index for index, ties to the lower index", S, float, double, bf16, f16) {
  check_all_top_k<S>();
}

TEST_CASE("bad shapes throw ShapeError before anything runs") {
  CudaContext ctx;
  Tensor<float, Cuda> a({4, 5}), b({5, 4}), v4({4}), v5({5}), m4({4}), m3({3});
  Tensor<std::int32_t, Cuda> idx3({3}), ki({4, 2});
  Tensor<float, Cuda> kv({4, 2}), kv3({4, 3}), narrow({4, 1});
  using O = Ops<Cuda>;
  CHECK_THROWS_AS(O::softmax<float>(ctx, b.view(), a.cview()), ShapeError);
  CHECK_THROWS_AS(O::softmax_backward<float>(ctx, a.view(), b.cview(), a.cview()), ShapeError);
  CHECK_THROWS_AS(O::layernorm<float>(ctx, a.view(), m4.view(), m4.view(), a.cview(), v4.cview(), v5.cview(), 1e-5f),
                  ShapeError);
  CHECK_THROWS_AS(O::layernorm<float>(ctx, a.view(), m3.view(), m4.view(), a.cview(), v5.cview(), v5.cview(), 1e-5f),
                  ShapeError);
  CHECK_THROWS_AS(O::layernorm_backward<float>(ctx, a.view(), v5.view(), v4.view(), a.cview(), a.cview(), m4.cview(),
                                               m4.cview(), v5.cview()),
                  ShapeError);
  CHECK_THROWS_AS((O::activation<nn::Gelu, float>(ctx, kv.view(), a.cview())), ShapeError);
  CHECK_THROWS_AS((O::activation_backward<nn::Silu, float>(ctx, a.view(), a.cview(), kv.cview())), ShapeError);
  CHECK_THROWS_AS((O::gather_rows<float, std::int32_t>(ctx, a.view(), a.cview(), idx3.cview())), ShapeError);
  CHECK_THROWS_AS((O::scatter_add_rows<float, std::int32_t>(ctx, a.view(), a.cview(), idx3.cview())), ShapeError);
  CHECK_THROWS_AS((O::top_k<2, float>(ctx, kv.view(), ki.view(), narrow.cview())), ShapeError);
  CHECK_THROWS_AS((O::top_k<2, float>(ctx, kv3.view(), ki.view(), a.cview())), ShapeError);
  CHECK_THROWS_AS(O::row_sum_accumulate<float>(ctx, v4.view(), a.cview()), ShapeError);
  CHECK_THROWS_AS(O::add_row_vector<float>(ctx, a.view(), v4.cview()), ShapeError);
  CHECK_THROWS_AS(O::axpy<float>(ctx, a.view(), v5.cview()), ShapeError);

  // The messages name the op and the shapes, as on the CPU.
  try {
    O::softmax<float>(ctx, b.view(), a.cview());
    FAIL("expected ShapeError");
  } catch (const ShapeError& e) {
    const std::string m = e.what();
    CHECK(m.find("softmax") != std::string::npos);
    CHECK(m.find("[5, 4]") != std::string::npos);
    CHECK(m.find("[4, 5]") != std::string::npos);
  }
  ctx.synchronize();
}

}  // TEST_SUITE
