// Dense nn layers (Linear, LayerNorm, FeedForward, MultiHeadAttention, Embedding, SinusoidalPositions, Dropout):
// backward against central finite differences in double precision, float against double forward, gradient
// accumulation, parameter names, reproducibility and the exact error messages.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/nn/attention.hpp"
#include "tmoe/nn/dropout.hpp"
#include "tmoe/nn/embedding.hpp"
#include "tmoe/nn/feed_forward.hpp"
#include "tmoe/nn/layer_norm.hpp"
#include "tmoe/nn/linear.hpp"
#include "tmoe/nn/positional.hpp"

using namespace tmoe;

namespace {

using TD = Tensor<double, Cpu>;
using TF = Tensor<float, Cpu>;
using TI = Tensor<std::int32_t, Cpu>;

constexpr double kFdStep = 1e-6;    // central differences: truncation ~h^2, rounding ~1e-16 |loss| / h
constexpr double kFdTol = 1e-6;     // relative error of a whole gradient tensor
constexpr double kFloatTol = 1e-5;  // float forward vs double forward

// Sizes deliberately not round.
constexpr std::int64_t B = 3, T = 7, Tk = 5, C = 12, H = 3, F = 20, V = 23;

TD random_tensor(Shape s, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  TD t(s);
  test::fill_uniform(t.view(), seed, lo, hi);
  return t;
}

TF to_float(const TD& t) {
  TF f(t.shape());
  for (std::int64_t i = 0; i < t.numel(); ++i) f.data()[i] = static_cast<float>(t.data()[i]);
  return f;
}

double dot(ConstTensorView<double, Cpu> a, ConstTensorView<double, Cpu> b) {
  REQUIRE(a.numel() == b.numel());
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += a.data()[i] * b.data()[i];
  return s;
}

// d loss / d t by central differences, perturbing t in place.
template <class Loss>
std::vector<double> numeric_grad(TensorView<double, Cpu> t, Loss&& loss) {
  std::vector<double> g(static_cast<std::size_t>(t.numel()));
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const double keep = t.data()[i];
    t.data()[i] = keep + kFdStep;
    const double up = loss();
    t.data()[i] = keep - kFdStep;
    const double down = loss();
    t.data()[i] = keep;
    g[static_cast<std::size_t>(i)] = (up - down) / (2 * kFdStep);
  }
  return g;
}

// Every analytic gradient in `refs` (parameters and inputs alike) against finite differences of `loss`.
// Gradients named with the suffix `zero_suffix` are zero in exact arithmetic (both sides are rounding noise, so a
// relative error means nothing): both must be below an absolute 1e-8 instead.
template <class Loss>
void check_gradients(const nn::ParameterRefs<double, Cpu>& refs, Loss&& loss, const std::string& zero_suffix = "") {
  for (const auto& r : refs) {
    INFO("gradient of ", r.name);
    const std::vector<double> num = numeric_grad(r.value, loss);
    if (!zero_suffix.empty() && r.name.ends_with(zero_suffix)) {
      double worst = 0;
      for (std::int64_t i = 0; i < r.grad.numel(); ++i) {
        worst = std::max({worst, std::abs(r.grad.data()[i]), std::abs(num[static_cast<std::size_t>(i)])});
      }
      CHECK(worst < 1e-8);
      continue;
    }
    const double err = test::rel_error(r.grad.data(), num.data(), r.grad.numel());
    CHECK(err < kFdTol);
  }
}

// Float layer parameters := double layer parameters (same names, same order).
template <class LF, class LD>
void copy_parameters(LF& f, LD& d) {
  auto pf = f.parameter_refs("m");
  auto pd = d.parameter_refs("m");
  REQUIRE(pf.size() == pd.size());
  for (std::size_t i = 0; i < pf.size(); ++i) {
    REQUIRE(pf[i].name == pd[i].name);
    REQUIRE(pf[i].value.numel() == pd[i].value.numel());
    for (std::int64_t j = 0; j < pd[i].value.numel(); ++j) {
      pf[i].value.data()[j] = static_cast<float>(pd[i].value.data()[j]);
    }
  }
}

double float_vs_double(const TF& f, const TD& d) {
  const auto a = test::to_double<float>(f.cview());
  return test::rel_error(a.data(), d.data(), d.numel());
}

std::vector<std::string> names_of(const nn::ParameterRefs<double, Cpu>& refs) {
  std::vector<std::string> n;
  for (const auto& r : refs) n.push_back(r.name);
  return n;
}

// Snapshot of every gradient in refs.
std::vector<std::vector<double>> grads_of(const nn::ParameterRefs<double, Cpu>& refs) {
  std::vector<std::vector<double>> g;
  for (const auto& r : refs) g.push_back(test::to_double<double>(r.grad));
  return g;
}

// After a second backward every parameter gradient is twice the first one.
void check_doubled(const nn::ParameterRefs<double, Cpu>& refs, const std::vector<std::vector<double>>& once) {
  REQUIRE(refs.size() == once.size());
  for (std::size_t i = 0; i < refs.size(); ++i) {
    INFO("gradient of ", refs[i].name);
    std::vector<double> twice(once[i].size());
    for (std::size_t j = 0; j < twice.size(); ++j) twice[j] = 2 * once[i][j];
    CHECK(test::rel_error(refs[i].grad.data(), twice.data(), refs[i].grad.numel()) < 1e-14);
  }
}

}  // namespace

TEST_SUITE("nn") {
  // --------------------------------------------------------------------------------------------------------------
  // Linear

  TEST_CASE("Linear: backward matches finite differences (with and without bias)") {
    CpuContext ctx;
    for (bool bias : {true, false}) {
      INFO("bias ", bias);
      nn::Linear<double, Cpu> lin(C, F, bias);
      lin.init(11);
      TD x = random_tensor({B, T, C}, 1), r = random_tensor({B, T, F}, 2), y({B, T, F}), dx({B, T, C});
      nn::Linear<double, Cpu>::Cache cache;
      auto loss = [&] {
        lin.forward(ctx, x, y, cache);
        return dot(y, r);
      };
      loss();
      lin.backward(ctx, cache, r, dx);
      auto refs = lin.parameter_refs("proj");
      refs.push_back({"x", x.view(), dx.view()});
      check_gradients(refs, loss);
    }
  }

  TEST_CASE("Linear: forward is x W^T + b, float agrees with double, names, init is seeded") {
    CpuContext ctx{2};
    nn::Linear<double, Cpu> lin(C, F);
    lin.init(3);
    TD x = random_tensor({B * T, C}, 4), y({B * T, F});
    nn::Linear<double, Cpu>::Cache cache;
    lin.forward(ctx, x, y, cache);
    double err = 0;
    for (std::int64_t n = 0; n < B * T; ++n) {
      for (std::int64_t o = 0; o < F; ++o) {
        double s = lin.bias()(o);
        for (std::int64_t i = 0; i < C; ++i) s += x.view()(n, i) * lin.weight()(o, i);
        err = std::max(err, std::abs(s - y.view()(n, o)));
      }
    }
    CHECK(err < 1e-14);

    nn::Linear<float, Cpu> lf(C, F);
    copy_parameters(lf, lin);
    TF xf = to_float(x), yf({B * T, F});
    nn::Linear<float, Cpu>::Cache cf;
    lf.forward(ctx, xf, yf, cf);
    CHECK(float_vs_double(yf, y) < kFloatTol);

    CHECK(names_of(lin.parameter_refs("enc.ffn")) == std::vector<std::string>{"enc.ffn.weight", "enc.ffn.bias"});
    CHECK(names_of(nn::Linear<double, Cpu>(C, F, false).parameter_refs("p")) == std::vector<std::string>{"p.weight"});
    CHECK(lin.parameters("q")[0].name == "q.weight");
    CHECK(lin.parameters("q")[0].view.data() == lin.weight().data());

    nn::Linear<double, Cpu> a(C, F), b(C, F), c(C, F);
    a.init(5);
    b.init(5);
    c.init(6);
    CHECK(test::to_double<double>(a.weight()) == test::to_double<double>(b.weight()));
    CHECK(test::to_double<double>(a.weight()) != test::to_double<double>(c.weight()));
    const double bound = 1.0 / std::sqrt(double(C));
    for (double w : a.weight().span()) CHECK(std::abs(w) <= bound);
  }

  TEST_CASE("Linear: backward accumulates parameter gradients and overwrites dx") {
    CpuContext ctx;
    nn::Linear<double, Cpu> lin(C, F);
    lin.init(7);
    TD x = random_tensor({B, T, C}, 8), r = random_tensor({B, T, F}, 9), y({B, T, F}), dx({B, T, C});
    nn::Linear<double, Cpu>::Cache cache;
    lin.forward(ctx, x, y, cache);
    lin.backward(ctx, cache, r, dx);
    const auto once = grads_of(lin.parameter_refs());
    const auto dx_once = test::to_double<double>(dx.cview());
    lin.backward(ctx, cache, r, dx);
    check_doubled(lin.parameter_refs(), once);
    CHECK(test::to_double<double>(dx.cview()) == dx_once);
    nn::zero_grad(lin.parameter_refs());
    for (double g : lin.parameter_refs()[0].grad.span()) REQUIRE(g == 0.0);
  }

  TEST_CASE("Linear: shape errors") {
    CpuContext ctx;
    nn::Linear<double, Cpu> lin(C, F);
    nn::Linear<double, Cpu>::Cache cache;
    TD x({B, T, 11}), y({B, T, F}), xg({B, T, C}), yb({B, T, C}), dx({B, T, C});
    CHECK_THROWS_WITH_AS(lin.forward(ctx, x, y, cache),
                         "Linear::forward: x must have last dim in_features = 12, got shape [3, 7, 11]", ShapeError);
    CHECK_THROWS_WITH_AS(lin.forward(ctx, xg, yb, cache),
                         "Linear::forward: y must have shape [3, 7, 20] but has shape [3, 7, 12]", ShapeError);
    CHECK_THROWS_WITH_AS(lin.backward(ctx, cache, y, dx),
                         "Linear::backward: the cache holds no input; call forward first", ShapeError);
    lin.forward(ctx, xg, y, cache);
    CHECK_THROWS_WITH_AS(lin.backward(ctx, cache, yb, dx),
                         "Linear::backward: dy must have shape [3, 7, 20] but has shape [3, 7, 12]", ShapeError);
    CHECK_THROWS_WITH_AS((nn::Linear<double, Cpu>(0, 4)),
                         "Linear: in_features and out_features must be positive, got in_features 0 and "
                         "out_features 4",
                         ShapeError);
  }

  // --------------------------------------------------------------------------------------------------------------
  // LayerNorm

  TEST_CASE("LayerNorm: backward matches finite differences") {
    CpuContext ctx;
    nn::LayerNorm<double, Cpu> ln(C, 1e-5);
    // Non-trivial gamma and beta so their gradients and dx's gamma factor are exercised.
    test::fill_uniform(ln.weight(), 21, 0.5, 1.5);
    test::fill_uniform(ln.bias(), 22);
    TD x = random_tensor({B, T, C}, 23, -2.0, 3.0), r = random_tensor({B, T, C}, 24), y({B, T, C}), dx({B, T, C});
    nn::LayerNorm<double, Cpu>::Cache cache;
    auto loss = [&] {
      ln.forward(ctx, x, y, cache);
      return dot(y, r);
    };
    loss();
    ln.backward(ctx, cache, r, dx);
    auto refs = ln.parameter_refs("ln");
    refs.push_back({"x", x.view(), dx.view()});
    check_gradients(refs, loss);
  }

  TEST_CASE("LayerNorm: statistics, float vs double, accumulation, names, errors") {
    CpuContext ctx{2};
    nn::LayerNorm<double, Cpu> ln(C, 1e-6);
    test::fill_uniform(ln.weight(), 31, 0.5, 1.5);
    test::fill_uniform(ln.bias(), 32);
    TD x = random_tensor({B, T, C}, 33, -2.0, 3.0), r = random_tensor({B, T, C}, 34), y({B, T, C}), dx({B, T, C});
    nn::LayerNorm<double, Cpu>::Cache cache;
    ln.forward(ctx, x, y, cache);
    // Row 5 by hand.
    double m = 0, v = 0;
    for (std::int64_t c = 0; c < C; ++c) m += x.data()[5 * C + c] / C;
    for (std::int64_t c = 0; c < C; ++c) v += (x.data()[5 * C + c] - m) * (x.data()[5 * C + c] - m) / C;
    for (std::int64_t c = 0; c < C; ++c) {
      const double want = (x.data()[5 * C + c] - m) / std::sqrt(v + 1e-6) * ln.weight()(c) + ln.bias()(c);
      CHECK(y.data()[5 * C + c] == doctest::Approx(want).epsilon(1e-12));
    }

    nn::LayerNorm<float, Cpu> lf(C, 1e-6f);
    copy_parameters(lf, ln);
    TF xf = to_float(x), yf({B, T, C});
    nn::LayerNorm<float, Cpu>::Cache cf;
    lf.forward(ctx, xf, yf, cf);
    CHECK(float_vs_double(yf, y) < kFloatTol);

    ln.backward(ctx, cache, r, dx);
    const auto once = grads_of(ln.parameter_refs());
    const auto dx_once = test::to_double<double>(dx.cview());
    ln.backward(ctx, cache, r, dx);
    check_doubled(ln.parameter_refs(), once);
    CHECK(test::to_double<double>(dx.cview()) == dx_once);

    CHECK(names_of(ln.parameter_refs("enc.ln1")) == std::vector<std::string>{"enc.ln1.weight", "enc.ln1.bias"});
    nn::LayerNorm<double, Cpu> fresh(C);
    CHECK(fresh.weight()(3) == 1.0);
    CHECK(fresh.bias()(3) == 0.0);
    CHECK(fresh.eps() == 1e-5);

    TD bad({B, T, 13});
    CHECK_THROWS_WITH_AS(ln.forward(ctx, bad, bad, cache),
                         "LayerNorm::forward: x must have last dim d_model = 12, got shape [3, 7, 13]", ShapeError);
    TD dbad({B, T});
    CHECK_THROWS_WITH_AS(ln.backward(ctx, cache, dbad, dx),
                         "LayerNorm::backward: dy must have shape [3, 7, 12] but has shape [3, 7]", ShapeError);
  }

  // --------------------------------------------------------------------------------------------------------------
  // FeedForward

  TEST_CASE_TEMPLATE("FeedForward: backward matches finite differences", Act, nn::Gelu, nn::Silu, nn::Relu) {
    CpuContext ctx;
    nn::FeedForward<Act, double, Cpu> ffn({.d_model = C, .d_ff = F});
    ffn.init(41);
    TD x = random_tensor({B, T, C}, 42), r = random_tensor({B, T, C}, 43), y({B, T, C}), dx({B, T, C});
    typename nn::FeedForward<Act, double, Cpu>::Cache cache;
    auto loss = [&] {
      ffn.forward(ctx, x, y, cache);
      return dot(y, r);
    };
    loss();
    ffn.backward(ctx, cache, r, dx);
    auto refs = ffn.parameter_refs("ffn");
    refs.push_back({"x", x.view(), dx.view()});
    check_gradients(refs, loss);
  }

  TEST_CASE("FeedForward: float vs double, accumulation, names, errors") {
    CpuContext ctx{2};
    nn::FeedForward<nn::Gelu, double, Cpu> ffn({.d_model = C, .d_ff = F});
    ffn.init(51);
    TD x = random_tensor({B, T, C}, 52), r = random_tensor({B, T, C}, 53), y({B, T, C}), dx({B, T, C});
    nn::FeedForward<nn::Gelu, double, Cpu>::Cache cache;
    ffn.forward(ctx, x, y, cache);

    nn::FeedForward<nn::Gelu, float, Cpu> ff({.d_model = C, .d_ff = F});
    copy_parameters(ff, ffn);
    TF xf = to_float(x), yf({B, T, C});
    nn::FeedForward<nn::Gelu, float, Cpu>::Cache cf;
    ff.forward(ctx, xf, yf, cf);
    CHECK(float_vs_double(yf, y) < kFloatTol);

    ffn.backward(ctx, cache, r, dx);
    const auto once = grads_of(ffn.parameter_refs());
    const auto dx_once = test::to_double<double>(dx.cview());
    ffn.backward(ctx, cache, r, dx);
    check_doubled(ffn.parameter_refs(), once);
    CHECK(test::to_double<double>(dx.cview()) == dx_once);

    CHECK(names_of(ffn.parameter_refs("dec.layers.0.ffn")) ==
          std::vector<std::string>{"dec.layers.0.ffn.wi.weight", "dec.layers.0.ffn.wi.bias",
                                   "dec.layers.0.ffn.wo.weight", "dec.layers.0.ffn.wo.bias"});
    nn::FeedForward<nn::Relu, double, Cpu> nobias({.d_model = C, .d_ff = F, .bias = false});
    CHECK(names_of(nobias.parameter_refs()) == std::vector<std::string>{"wi.weight", "wo.weight"});
    CHECK(test::to_double<double>(ffn.wi().weight()) != test::to_double<double>(ffn.wo().weight().reshape({F, C})));

    TD yb({B, T, F});
    CHECK_THROWS_WITH_AS(ffn.forward(ctx, x, yb, cache),
                         "FeedForward::forward: y must have shape [3, 7, 12] but has shape [3, 7, 20]", ShapeError);
    CHECK_THROWS_WITH_AS((nn::FeedForward<nn::Relu, double, Cpu>({.d_model = C, .d_ff = 0})),
                         "FeedForward: d_model and d_ff must be positive, got d_model 12 and d_ff 0", ShapeError);
  }

  // --------------------------------------------------------------------------------------------------------------
  // MultiHeadAttention

  TEST_CASE("MultiHeadAttention: backward matches finite differences for every mask") {
    CpuContext ctx;
    nn::MultiHeadAttention<double, Cpu> attn({.d_model = C, .heads = H});
    attn.init(61);
    // Keys/values are scaled up so the softmax is far from uniform.
    TD x = random_tensor({B, T, C}, 62, -2.0, 2.0), mem = random_tensor({B, Tk, C}, 63, -2.0, 2.0);
    TD r = random_tensor({B, T, C}, 64), y({B, T, C}), dx({B, T, C}), dmem({B, Tk, C});
    // Row 0 all valid, row 1 the last two padded, row 2 the first padded (so causal + padding empties query 0).
    TI pad_self({B, T}), pad_mem({B, Tk});
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t j = 0; j < T; ++j) pad_self.view()(b, j) = (b == 1 && j >= T - 2) || (b == 2 && j == 0) ? 0 : 1;
      for (std::int64_t j = 0; j < Tk; ++j)
        pad_mem.view()(b, j) = (b == 1 && j >= Tk - 2) || (b == 2 && j == 0) ? 0 : 1;
    }
    nn::MultiHeadAttention<double, Cpu>::Input in{.x = x};
    bool cross = false;
    SUBCASE("no mask") {}
    SUBCASE("causal") { in.causal = true; }
    SUBCASE("key padding") { in.key_padding = pad_self; }
    SUBCASE("causal + key padding") {
      in.causal = true;
      in.key_padding = pad_self;
    }
    SUBCASE("cross-attention") {
      cross = true;
      in.memory = mem;
    }
    SUBCASE("cross-attention with key padding") {
      cross = true;
      in.memory = mem;
      in.key_padding = pad_mem;
    }
    SUBCASE("cross-attention, causal, key padding (Tq != Tk)") {
      cross = true;
      in.memory = mem;
      in.key_padding = pad_mem;
      in.causal = true;
    }
    nn::MultiHeadAttention<double, Cpu>::Cache cache;
    auto loss = [&] {
      attn.forward(ctx, in, y, cache);
      return dot(y, r);
    };
    loss();
    if (cross)
      attn.backward(ctx, cache, r, dx, dmem);
    else
      attn.backward(ctx, cache, r, dx);
    for (double v : dx.view().span()) REQUIRE(std::isfinite(v));
    auto refs = attn.parameter_refs("attn");
    refs.push_back({"x", x.view(), dx.view()});
    if (cross) refs.push_back({"memory", mem.view(), dmem.view()});
    // A key bias adds q . b_k to every score of a row, which the softmax ignores: its gradient is zero.
    check_gradients(refs, loss, "k_proj.bias");
  }

  TEST_CASE("MultiHeadAttention: fully masked rows give zero output and zero gradient, never NaN") {
    CpuContext ctx;
    for (bool bias : {false, true}) {
      INFO("bias ", bias);
      nn::MultiHeadAttention<double, Cpu> attn({.d_model = C, .heads = H, .bias = bias});
      attn.init(71);
      TD x = random_tensor({B, T, C}, 72), mem = random_tensor({B, Tk, C}, 73), r = random_tensor({B, T, C}, 74);
      TD y({B, T, C}), dx({B, T, C}), dmem({B, Tk, C});
      TI pad({B, Tk});
      for (std::int64_t b = 0; b < B; ++b) {
        for (std::int64_t j = 0; j < Tk; ++j) pad.view()(b, j) = b == 1 ? 0 : 1;  // batch row 1: no valid key
      }
      const nn::MultiHeadAttention<double, Cpu>::Input in{.x = x, .memory = mem, .key_padding = pad};
      nn::MultiHeadAttention<double, Cpu>::Cache cache;
      auto loss = [&] {
        attn.forward(ctx, in, y, cache);
        return dot(y, r);
      };
      loss();
      for (std::int64_t t = 0; t < T; ++t) {
        for (std::int64_t c = 0; c < C; ++c) {
          REQUIRE(y.view()(1, t, c) == (bias ? attn.o_proj().bias()(c) : 0.0));  // o_proj(0) = its bias
        }
      }
      for (std::int64_t i = 0; i < T * Tk; ++i) REQUIRE(cache.probs.view().rows(1, 2).data()[i] == 0.0);
      attn.backward(ctx, cache, r, dx, dmem);
      for (double v : dx.view().span()) REQUIRE(std::isfinite(v));
      for (double v : dmem.view().span()) REQUIRE(std::isfinite(v));
      for (std::int64_t i = 0; i < T * C; ++i) CHECK(dx.view().rows(1, 2).data()[i] == 0.0);
      for (std::int64_t i = 0; i < Tk * C; ++i) CHECK(dmem.view().rows(1, 2).data()[i] == 0.0);
      auto refs = attn.parameter_refs();
      refs.push_back({"x", x.view(), dx.view()});
      refs.push_back({"memory", mem.view(), dmem.view()});
      check_gradients(refs, loss, "k_proj.bias");
    }
  }

  TEST_CASE("MultiHeadAttention: a plain-loop reference, float vs double, accumulation, threads") {
    CpuContext ctx;
    nn::MultiHeadAttention<double, Cpu> attn({.d_model = C, .heads = H});
    attn.init(81);
    TD x = random_tensor({B, T, C}, 82), r = random_tensor({B, T, C}, 83), y({B, T, C}), dx({B, T, C});
    TI pad({B, T});
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t j = 0; j < T; ++j) pad.view()(b, j) = (b + j) % 4 == 3 ? 0 : 1;
    }
    const nn::MultiHeadAttention<double, Cpu>::Input in{.x = x, .key_padding = pad, .causal = true};
    nn::MultiHeadAttention<double, Cpu>::Cache cache;
    attn.forward(ctx, in, y, cache);

    // Reference: projections with loops, masked softmax per head, output projection.
    const std::int64_t D = C / H;
    auto project = [&](nn::Linear<double, Cpu>& l, std::int64_t b, std::int64_t t, std::int64_t o,
                       const std::vector<double>& src) {
      double s = l.bias()(o);
      for (std::int64_t i = 0; i < C; ++i) s += src[static_cast<std::size_t>((b * T + t) * C + i)] * l.weight()(o, i);
      return s;
    };
    const std::vector<double> xs = test::to_double<double>(x.cview());
    std::vector<double> q(xs.size()), k(xs.size()), v(xs.size()), a(xs.size(), 0.0), want(xs.size());
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t t = 0; t < T; ++t) {
        for (std::int64_t o = 0; o < C; ++o) {
          const auto i = static_cast<std::size_t>((b * T + t) * C + o);
          q[i] = project(attn.q_proj(), b, t, o, xs);
          k[i] = project(attn.k_proj(), b, t, o, xs);
          v[i] = project(attn.v_proj(), b, t, o, xs);
        }
      }
    }
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t h = 0; h < H; ++h) {
        for (std::int64_t i = 0; i < T; ++i) {
          std::vector<double> s(static_cast<std::size_t>(T), 0.0);
          double mx = -INFINITY, sum = 0;
          for (std::int64_t j = 0; j <= i; ++j) {
            if (!pad.view()(b, j)) continue;
            double d = 0;
            for (std::int64_t e = 0; e < D; ++e)
              d += q[static_cast<std::size_t>((b * T + i) * C + h * D + e)] *
                   k[static_cast<std::size_t>((b * T + j) * C + h * D + e)];
            s[static_cast<std::size_t>(j)] = d / std::sqrt(double(D));
            mx = std::max(mx, s[static_cast<std::size_t>(j)]);
          }
          for (std::int64_t j = 0; j <= i; ++j) {
            if (pad.view()(b, j)) sum += std::exp(s[static_cast<std::size_t>(j)] - mx);
          }
          for (std::int64_t j = 0; j <= i; ++j) {
            if (!pad.view()(b, j)) continue;
            const double p = std::exp(s[static_cast<std::size_t>(j)] - mx) / sum;
            for (std::int64_t e = 0; e < D; ++e) {
              a[static_cast<std::size_t>((b * T + i) * C + h * D + e)] +=
                  p * v[static_cast<std::size_t>((b * T + j) * C + h * D + e)];
            }
          }
        }
      }
    }
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t t = 0; t < T; ++t) {
        for (std::int64_t o = 0; o < C; ++o) {
          want[static_cast<std::size_t>((b * T + t) * C + o)] = project(attn.o_proj(), b, t, o, a);
        }
      }
    }
    CHECK(test::rel_error(y.data(), want.data(), y.numel()) < 1e-13);

    nn::MultiHeadAttention<float, Cpu> af({.d_model = C, .heads = H});
    copy_parameters(af, attn);
    TF xf = to_float(x), yf({B, T, C});
    nn::MultiHeadAttention<float, Cpu>::Cache cf;
    af.forward(ctx, {.x = xf, .key_padding = pad, .causal = true}, yf, cf);
    CHECK(float_vs_double(yf, y) < kFloatTol);

    attn.backward(ctx, cache, r, dx);
    const auto once = grads_of(attn.parameter_refs());
    const auto dx_once = test::to_double<double>(dx.cview());
    attn.backward(ctx, cache, r, dx);
    check_doubled(attn.parameter_refs(), once);
    CHECK(test::to_double<double>(dx.cview()) == dx_once);

    // Three threads: bitwise reproducible run to run, and equal to one thread up to rounding.
    CpuContext ctx3{3};
    TD y3({B, T, C}), y3b({B, T, C}), dx3({B, T, C}), dx3b({B, T, C});
    nn::MultiHeadAttention<double, Cpu>::Cache c3;
    attn.forward(ctx3, in, y3, c3);
    attn.backward(ctx3, c3, r, dx3);
    attn.forward(ctx3, in, y3b, c3);
    attn.backward(ctx3, c3, r, dx3b);
    CHECK(test::to_double<double>(y3.cview()) == test::to_double<double>(y3b.cview()));
    CHECK(test::to_double<double>(dx3.cview()) == test::to_double<double>(dx3b.cview()));
    CHECK(test::rel_error(y3.data(), y.data(), y.numel()) < 1e-14);
    CHECK(test::rel_error(dx3.data(), dx.data(), dx.numel()) < 1e-14);
  }

  TEST_CASE_TEMPLATE("MultiHeadAttention: decoding steps equal forward at every position, heads of whole vectors "
                     "and tails, more keys than a block",
                     S, double, float) {
    // Head widths 70 and 40 and 37 keys cover the step attention's whole-vector chunks, their tails and key blocks
    // (16 float lanes with AVX-512) with keys left over; forward() is checked against plain loops above.
    const double tol = std::is_same_v<S, double> ? 1e-12 : 1e-5;
    for (const auto& shape : {std::pair<std::int64_t, std::int64_t>{140, 2}, {120, 3}}) {
      const std::int64_t Cw = shape.first, Hw = shape.second;
      CAPTURE(Cw);
      CpuContext ctx(2);
      constexpr std::int64_t Bw = 2, Tw = 37, Sw = 37;
      nn::MultiHeadAttention<S, Cpu> attn({.d_model = Cw, .heads = Hw});
      attn.init(91);
      Tensor<S, Cpu> x({Bw, Tw, Cw}), memory({Bw, Sw, Cw}), y({Bw, Tw, Cw}), yc({Bw, Tw, Cw});
      test::fill_uniform<S>(x.view(), 92);
      test::fill_uniform<S>(memory.view(), 93);
      TI pad({Bw, Sw});
      for (std::int64_t b = 0; b < Bw; ++b) {
        for (std::int64_t j = 0; j < Sw; ++j) pad.view()(b, j) = (j % 5 == 4 || (b == 1 && j >= 30)) ? 0 : 1;
      }
      typename nn::MultiHeadAttention<S, Cpu>::Cache cache;
      attn.forward(ctx, {.x = x, .causal = true}, y, cache);
      attn.forward(ctx, {.x = x, .memory = memory, .key_padding = pad}, yc, cache);

      nn::KvCache<S, Cpu> self_kv, cross_kv;
      nn::MultiHeadAttention<S, Cpu>::reserve(self_kv, Bw, Tw, Cw);
      attn.project_memory(ctx, memory, cross_kv);
      nn::AttentionStepWork<S, Cpu> work;
      Tensor<S, Cpu> xt({Bw, Cw}), out({Bw, Cw}), want({Bw, Cw});
      for (std::int64_t t = 0; t < Tw; ++t) {
        CAPTURE(t);
        for (std::int64_t b = 0; b < Bw; ++b) std::copy_n(x.data() + (b * Tw + t) * Cw, Cw, xt.data() + b * Cw);
        attn.step_self(ctx, xt, self_kv, out, work);
        for (std::int64_t b = 0; b < Bw; ++b) std::copy_n(y.data() + (b * Tw + t) * Cw, Cw, want.data() + b * Cw);
        CHECK(test::rel_error<S>(out, want) < tol);
        attn.step_cross(ctx, xt, cross_kv, pad, out, work);
        for (std::int64_t b = 0; b < Bw; ++b) std::copy_n(yc.data() + (b * Tw + t) * Cw, Cw, want.data() + b * Cw);
        CHECK(test::rel_error<S>(out, want) < tol);
      }
    }
  }

  TEST_CASE("MultiHeadAttention: names, init and errors") {
    CpuContext ctx;
    nn::MultiHeadAttention<double, Cpu> attn({.d_model = C, .heads = H});
    attn.init(91);
    CHECK(names_of(attn.parameter_refs("dec.layers.1.cross")) ==
          std::vector<std::string>{"dec.layers.1.cross.q_proj.weight", "dec.layers.1.cross.q_proj.bias",
                                   "dec.layers.1.cross.k_proj.weight", "dec.layers.1.cross.k_proj.bias",
                                   "dec.layers.1.cross.v_proj.weight", "dec.layers.1.cross.v_proj.bias",
                                   "dec.layers.1.cross.o_proj.weight", "dec.layers.1.cross.o_proj.bias"});
    CHECK(attn.parameters("a").size() == 8);
    CHECK(test::to_double<double>(attn.q_proj().weight()) != test::to_double<double>(attn.k_proj().weight()));
    CHECK(attn.head_dim() == 4);

    CHECK_THROWS_WITH_AS((nn::MultiHeadAttention<double, Cpu>({.d_model = C, .heads = 5})),
                         "MultiHeadAttention: heads must be positive and divide d_model, got d_model 12 and heads 5",
                         ShapeError);
    TD x({B, T, C}), y({B, T, C}), mem({B, Tk, C}), dx({B, T, C}), xb({B, T, 10}), memb({2, Tk, C});
    TI pad_wrong({B, T}), pad_bad({B, Tk});
    for (auto& f : pad_bad.view().span()) f = 1;
    pad_bad.view()(2, 3) = 2;
    nn::MultiHeadAttention<double, Cpu>::Cache cache;
    CHECK_THROWS_WITH_AS(attn.forward(ctx, {.x = xb}, y, cache),
                         "MultiHeadAttention::forward: x must be (B, T, 12), got shape [3, 7, 10]", ShapeError);
    CHECK_THROWS_WITH_AS(attn.forward(ctx, {.x = x, .memory = memb}, y, cache),
                         "MultiHeadAttention::forward: memory must be (3, Tk, 12) for x [3, 7, 12], got shape "
                         "[2, 5, 12]",
                         ShapeError);
    CHECK_THROWS_WITH_AS(attn.forward(ctx, {.x = x, .memory = mem, .key_padding = pad_wrong}, y, cache),
                         "MultiHeadAttention::forward: key_padding must have shape [3, 5] but has shape [3, 7]",
                         ShapeError);
    CHECK_THROWS_WITH_AS(attn.forward(ctx, {.x = x, .memory = mem, .key_padding = pad_bad}, y, cache),
                         "MultiHeadAttention::forward: key_padding[2, 3] = 2, expected 1 (valid key) or 0 (padding)",
                         ShapeError);
    CHECK_THROWS_WITH_AS(attn.backward(ctx, cache, y, dx),
                         "MultiHeadAttention::backward: the cache holds no input; call forward first", ShapeError);
    attn.forward(ctx, {.x = x, .memory = mem}, y, cache);
    CHECK_THROWS_WITH_AS(attn.backward(ctx, cache, y, dx),
                         "MultiHeadAttention::backward: dmemory must have shape [3, 5, 12] but has shape []",
                         ShapeError);
    attn.forward(ctx, {.x = x}, y, cache);
    TD dmem({B, T, C});
    CHECK_THROWS_WITH_AS(attn.backward(ctx, cache, y, dx, dmem),
                         "MultiHeadAttention::backward: dmemory must be empty for self-attention (dx receives the "
                         "key and value gradients), got shape [3, 7, 12]",
                         ShapeError);
  }

  // --------------------------------------------------------------------------------------------------------------
  // Embedding

  TEST_CASE("Embedding: lookup and tied projection backward match finite differences into one table gradient") {
    CpuContext ctx;
    nn::Embedding<double, Cpu> emb({.vocab_size = V, .d_model = C, .scale = std::sqrt(double(C))});
    emb.init(101);
    TI ids({B, T});
    for (std::int64_t n = 0; n < B * T; ++n) ids.data()[n] = static_cast<std::int32_t>((n * 7 + 3) % V);
    ids.view()(2, 6) = ids.view()(0, 1);  // repeated ids add up
    ids.view()(1, 0) = V - 1;
    ids.view()(1, 1) = 0;
    TD h = random_tensor({B, T, C}, 102), r1 = random_tensor({B, T, C}, 103), r2 = random_tensor({B, T, V}, 104);
    TD e({B, T, C}), logits({B, T, V}), dh({B, T, C});
    nn::Embedding<double, Cpu>::Cache cache;
    nn::Embedding<double, Cpu>::ProjectCache pcache;
    auto loss = [&] {
      emb.forward(ctx, ids, e, cache);
      emb.project(ctx, h, logits, pcache);
      return dot(e, r1) + dot(logits, r2);
    };
    loss();
    emb.backward(ctx, cache, r1);
    emb.project_backward(ctx, pcache, r2, dh);
    auto refs = emb.parameter_refs("shared");
    refs.push_back({"h", h.view(), dh.view()});
    check_gradients(refs, loss);

    // Each use alone, too.
    nn::zero_grad(emb.parameter_refs());
    emb.backward(ctx, cache, r1);
    double want = 0;  // table row 0, column 2: every position holding id 0, in position order
    for (std::int64_t n = 0; n < B * T; ++n)
      want += ids.data()[n] == 0 ? std::sqrt(double(C)) * r1.data()[n * C + 2] : 0.0;
    CHECK(emb.parameter_refs()[0].grad(0, 2) == doctest::Approx(want).epsilon(1e-15));
  }

  TEST_CASE("Embedding: lookup values, float vs double, accumulation, thread independence, names, errors") {
    CpuContext ctx;
    nn::Embedding<double, Cpu> emb({.vocab_size = V, .d_model = C, .scale = 2.5});
    emb.init(111);
    TI ids({B, T});
    for (std::int64_t n = 0; n < B * T; ++n) ids.data()[n] = static_cast<std::int32_t>((n * 5) % V);
    TD e({B, T, C}), h = random_tensor({B * T, C}, 112), logits({B * T, V}), dh({B * T, C});
    TD r1 = random_tensor({B, T, C}, 113), r2 = random_tensor({B * T, V}, 114);
    nn::Embedding<double, Cpu>::Cache cache;
    nn::Embedding<double, Cpu>::ProjectCache pcache;
    emb.forward(ctx, ids, e, cache);
    emb.project(ctx, h, logits, pcache);
    CHECK(e.view()(1, 2, 4) == 2.5 * emb.weight()(ids.view()(1, 2), 4));

    nn::Embedding<float, Cpu> ef({.vocab_size = V, .d_model = C, .scale = 2.5});
    copy_parameters(ef, emb);
    TF e_f({B, T, C}), hf = to_float(h), lf({B * T, V});
    nn::Embedding<float, Cpu>::Cache cf;
    nn::Embedding<float, Cpu>::ProjectCache pcf;
    ef.forward(ctx, ids, e_f, cf);
    ef.project(ctx, hf, lf, pcf);
    CHECK(float_vs_double(e_f, e) < kFloatTol);
    CHECK(float_vs_double(lf, logits) < kFloatTol);

    emb.backward(ctx, cache, r1);
    emb.project_backward(ctx, pcache, r2, dh);
    const auto once = grads_of(emb.parameter_refs());
    const auto dh_once = test::to_double<double>(dh.cview());
    emb.backward(ctx, cache, r1);
    emb.project_backward(ctx, pcache, r2, dh);
    check_doubled(emb.parameter_refs(), once);
    CHECK(test::to_double<double>(dh.cview()) == dh_once);

    // The scatter-add order is fixed: three threads give the bitwise same table gradient as one.
    CpuContext ctx3{3};
    nn::zero_grad(emb.parameter_refs());
    emb.backward(ctx, cache, r1);
    const auto one = test::to_double<double>(emb.parameter_refs()[0].grad);
    nn::zero_grad(emb.parameter_refs());
    emb.backward(ctx3, cache, r1);
    CHECK(test::to_double<double>(emb.parameter_refs()[0].grad) == one);

    CHECK(names_of(emb.parameter_refs("shared_embedding")) == std::vector<std::string>{"shared_embedding.weight"});

    ids.view()(1, 4) = V;
    CHECK_THROWS_WITH_AS(emb.forward(ctx, ids, e, cache),
                         "Embedding::forward: token id 23 at position [1, 4] is out of range [0, 23) for vocab_size 23",
                         ShapeError);
    ids.view()(1, 4) = 0;
    ids.view()(2, 0) = -1;
    CHECK_THROWS_WITH_AS(emb.forward(ctx, ids, e, cache),
                         "Embedding::forward: token id -1 at position [2, 0] is out of range [0, 23) for vocab_size 23",
                         ShapeError);
    ids.view()(2, 0) = 0;
    TD eb({B, T, C + 1});
    CHECK_THROWS_WITH_AS(emb.forward(ctx, ids, eb, cache),
                         "Embedding::forward: out must have shape [3, 7, 12] but has shape [3, 7, 13]", ShapeError);
    TD lb({B * T, V - 1});
    CHECK_THROWS_WITH_AS(emb.project(ctx, h, lb, pcache),
                         "Embedding::project: logits must have shape [21, 23] but has shape [21, 22]", ShapeError);
  }

  // --------------------------------------------------------------------------------------------------------------
  // SinusoidalPositions

  TEST_CASE("SinusoidalPositions: values, backward, float vs double, errors") {
    CpuContext ctx;
    nn::SinusoidalPositions<double, Cpu> pos(C, 16);
    TD x = random_tensor({B, T, C}, 121), y({B, T, C}), r = random_tensor({B, T, C}, 122), dx({B, T, C});
    nn::SinusoidalPositions<double, Cpu>::Cache cache;
    pos.forward(ctx, x, y, cache);
    for (std::int64_t t : {0, 3, 6}) {
      for (std::int64_t i = 0; i < C / 2; ++i) {
        const double angle = double(t) / std::pow(10000.0, 2.0 * double(i) / double(C));
        CHECK(y.view()(2, t, 2 * i) - x.view()(2, t, 2 * i) == doctest::Approx(std::sin(angle)).epsilon(1e-12));
        CHECK(y.view()(2, t, 2 * i + 1) - x.view()(2, t, 2 * i + 1) == doctest::Approx(std::cos(angle)).epsilon(1e-12));
      }
    }
    // A start offset continues the sequence.
    TD y2({B, 2, C});
    pos.forward(ctx, x.view().reshape({B * T, C}).rows(0, 2 * B).reshape({B, 2, C}), y2, cache, 5);
    CHECK(y2.view()(0, 1, 3) - x.data()[1 * C + 3] == doctest::Approx(pos.table()(6, 3)).epsilon(1e-15));

    auto loss = [&] {
      pos.forward(ctx, x, y, cache);
      return dot(y, r);
    };
    loss();
    pos.backward(ctx, cache, r, dx);
    nn::ParameterRefs<double, Cpu> refs = pos.parameter_refs("pos");
    CHECK(refs.empty());
    refs.push_back({"x", x.view(), dx.view()});
    check_gradients(refs, loss);

    nn::SinusoidalPositions<float, Cpu> pf(C, 16);
    TF xf = to_float(x), yf({B, T, C});
    nn::SinusoidalPositions<float, Cpu>::Cache cf;
    pf.forward(ctx, xf, yf, cf);
    CHECK(float_vs_double(yf, y) < kFloatTol);

    nn::SinusoidalPositions<double, Cpu> short_pos(C, 6);
    CHECK_THROWS_WITH_AS(short_pos.forward(ctx, x, y, cache),
                         "SinusoidalPositions::forward: positions [0, 7) exceed max_len 6 (x shape [3, 7, 12])",
                         ShapeError);
    CHECK_THROWS_WITH_AS(pos.forward(ctx, x, y, cache, 10),
                         "SinusoidalPositions::forward: positions [10, 17) exceed max_len 16 (x shape [3, 7, 12])",
                         ShapeError);
  }

  // --------------------------------------------------------------------------------------------------------------
  // Dropout

  TEST_CASE("Dropout: the mask is Philox(seed).block(i / 4, offset)[i % 4] >= p, reproducible per (seed, offset)") {
    CpuContext ctx{2};
    const double p = 0.3;
    nn::Dropout<double, Cpu> drop(p);
    TD ones({64, 1001}), y({64, 1001}), y_again({64, 1001}), y_offset({64, 1001}), y_seed({64, 1001});
    for (auto& v : ones.view().span()) v = 1.0;
    nn::Dropout<double, Cpu>::Cache cache;
    drop.forward(ctx, ones, y, cache, {.training = true, .seed = 2024, .offset = 17});
    std::int64_t kept = 0, mismatched = 0;
    const Philox rng(2024);
    for (std::int64_t i = 0; i < y.numel(); ++i) {
      const bool k = uniform01(rng.block(static_cast<std::uint64_t>(i / 4), 17)[static_cast<std::size_t>(i % 4)]) >=
                     static_cast<float>(p);
      kept += k;
      mismatched += k != nn::Dropout<double, Cpu>::keep(2024, 17, static_cast<std::uint64_t>(i), p);
      mismatched += y.data()[i] != (k ? 1.0 / (1.0 - p) : 0.0);
    }
    CHECK(mismatched == 0);
    CHECK(double(kept) / double(y.numel()) == doctest::Approx(1.0 - p).epsilon(0.01));

    drop.forward(ctx, ones, y_again, cache, {.training = true, .seed = 2024, .offset = 17});
    CHECK(test::to_double<double>(y_again.cview()) == test::to_double<double>(y.cview()));
    CpuContext ctx1;
    drop.forward(ctx1, ones, y_again, cache, {.training = true, .seed = 2024, .offset = 17});
    CHECK(test::to_double<double>(y_again.cview()) == test::to_double<double>(y.cview()));
    drop.forward(ctx, ones, y_offset, cache, {.training = true, .seed = 2024, .offset = 18});
    drop.forward(ctx, ones, y_seed, cache, {.training = true, .seed = 2025, .offset = 17});
    std::int64_t diff_offset = 0, diff_seed = 0;
    for (std::int64_t i = 0; i < y.numel(); ++i) {
      diff_offset += y_offset.data()[i] != y.data()[i];
      diff_seed += y_seed.data()[i] != y.data()[i];
    }
    // Independent masks differ in about 2 p (1 - p) = 42% of the elements.
    CHECK(double(diff_offset) / double(y.numel()) == doctest::Approx(2 * p * (1 - p)).epsilon(0.05));
    CHECK(double(diff_seed) / double(y.numel()) == doctest::Approx(2 * p * (1 - p)).epsilon(0.05));
  }

  TEST_CASE("Dropout: backward applies the forward mask, identity when p == 0 or not training, errors") {
    CpuContext ctx;
    nn::Dropout<double, Cpu> drop(0.4);
    TD x = random_tensor({B, T, C}, 131), r = random_tensor({B, T, C}, 132), y({B, T, C}), dx({B, T, C});
    nn::Dropout<double, Cpu>::Cache cache;
    const nn::DropoutArgs args{.training = true, .seed = 9, .offset = 3};
    auto loss = [&] {
      drop.forward(ctx, x, y, cache, args);
      return dot(y, r);
    };
    loss();
    drop.backward(ctx, cache, r, dx);
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      REQUIRE(dx.data()[i] == (y.data()[i] != 0.0 ? r.data()[i] / 0.6 : 0.0));
    }
    nn::ParameterRefs<double, Cpu> refs = drop.parameter_refs("drop");
    CHECK(refs.empty());
    refs.push_back({"x", x.view(), dx.view()});
    check_gradients(refs, loss);
    // In place, as activations usually are.
    loss();
    TD z = random_tensor({B, T, C}, 131);
    drop.forward(ctx, z, z, cache, args);
    CHECK(test::to_double<double>(z.cview()) == test::to_double<double>(y.cview()));

    drop.forward(ctx, x, y, cache, {.training = false, .seed = 9, .offset = 3});
    CHECK(test::to_double<double>(y.cview()) == test::to_double<double>(x.cview()));
    drop.backward(ctx, cache, r, dx);
    CHECK(test::to_double<double>(dx.cview()) == test::to_double<double>(r.cview()));
    nn::Dropout<double, Cpu> none(0.0);
    none.forward(ctx, x, y, cache, args);
    CHECK(test::to_double<double>(y.cview()) == test::to_double<double>(x.cview()));

    nn::Dropout<float, Cpu> df(0.4);
    TF xf = to_float(x), yf({B, T, C});
    nn::Dropout<float, Cpu>::Cache cf;
    df.forward(ctx, xf, yf, cf, args);
    drop.forward(ctx, x, y, cache, args);
    CHECK(float_vs_double(yf, y) < kFloatTol);

    TD yb({B, T, C - 1});
    CHECK_THROWS_WITH_AS(drop.forward(ctx, x, yb, cache, args),
                         "Dropout::forward: y must have shape [3, 7, 12] but has shape [3, 7, 11]", ShapeError);
    CHECK_THROWS_WITH_AS((nn::Dropout<double, Cpu>(1.0)), "Dropout: rate p must be in [0, 1), got 1.000000", Error);
  }
}
