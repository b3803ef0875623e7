// Training: losses, AdamW, Adafactor, schedules, gradient clipping and optimizer checkpoints, each against plain
// double-precision loops written here (and finite differences for the loss gradients).

#include <doctest/doctest.h>


#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

namespace {

// ------------------------------------------------------------------------------------------------------------------
// Reference losses: one row at a time, straight from the definitions.

struct RefLoss {
  double loss = 0, ce = 0, kl = 0, nll = 0;
  std::int64_t count = 0;
  std::vector<double> grad;  // (N, V), gradient of `loss`
};

/// (1 - alpha) · CE_eps + alpha · KL(t ‖ p) per counted row, averaged; alpha = 0 and no teacher for plain CE.
RefLoss ref_loss(const std::vector<double>& z, const std::vector<std::int32_t>& y, std::int64_t n, std::int64_t v,
                 std::int32_t pad, double eps, const std::vector<double>* teacher, double alpha) {
  RefLoss r;
  r.grad.assign(static_cast<std::size_t>(n * v), 0.0);
  for (std::int64_t i = 0; i < n; ++i) r.count += y[static_cast<std::size_t>(i)] != pad;
  if (r.count == 0) return r;
  const double w_ce = teacher ? 1 - alpha : 1, w_kl = teacher ? alpha : 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t yi = y[static_cast<std::size_t>(i)];
    if (yi == pad) continue;
    std::vector<double> logp(static_cast<std::size_t>(v)), p(static_cast<std::size_t>(v));
    double mx = -INFINITY;
    for (std::int64_t j = 0; j < v; ++j) mx = std::max(mx, z[static_cast<std::size_t>(i * v + j)]);
    double s = 0;
    for (std::int64_t j = 0; j < v; ++j) s += std::exp(z[static_cast<std::size_t>(i * v + j)] - mx);
    for (std::int64_t j = 0; j < v; ++j) {
      logp[static_cast<std::size_t>(j)] = z[static_cast<std::size_t>(i * v + j)] - mx - std::log(s);
      p[static_cast<std::size_t>(j)] = std::exp(logp[static_cast<std::size_t>(j)]);
    }
    double ce = 0, kl = 0, tsum = 0;
    for (std::int64_t j = 0; j < v; ++j) {
      const double q = (j == yi ? 1 - eps : 0.0) + eps / static_cast<double>(v);
      ce -= q * logp[static_cast<std::size_t>(j)];
      if (teacher) {
        const double t = (*teacher)[static_cast<std::size_t>(i * v + j)];
        tsum += t;
        if (t > 0) kl += t * (std::log(t) - logp[static_cast<std::size_t>(j)]);
      }
    }
    r.ce += ce;
    r.kl += kl;
    r.nll -= logp[static_cast<std::size_t>(yi)];
    for (std::int64_t j = 0; j < v; ++j) {
      const double q = (j == yi ? 1 - eps : 0.0) + eps / static_cast<double>(v);
      double g = w_ce * (p[static_cast<std::size_t>(j)] - q);
      if (teacher)
        g += w_kl * (p[static_cast<std::size_t>(j)] * tsum - (*teacher)[static_cast<std::size_t>(i * v + j)]);
      r.grad[static_cast<std::size_t>(i * v + j)] = g / static_cast<double>(r.count);
    }
  }
  const double c = static_cast<double>(r.count);
  r.ce /= c;
  r.kl /= c;
  r.nll /= c;
  r.loss = w_ce * r.ce + w_kl * r.kl;
  return r;
}

/// Targets for N rows over V classes, with `pad` on rows 2 and 9 (when N allows).
std::vector<std::int32_t> make_targets(std::int64_t n, std::int64_t v, std::int32_t pad) {
  std::vector<std::int32_t> y(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 5 + 3) % v);
    if (y[static_cast<std::size_t>(i)] == pad)
      y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((pad + 2) % v);
  }
  if (n > 2) y[2] = pad;
  if (n > 9) y[9] = pad;
  return y;
}

Tensor<std::int32_t, Cpu> to_tensor(const std::vector<std::int32_t>& y) {
  Tensor<std::int32_t, Cpu> t({static_cast<std::int64_t>(y.size())});
  std::copy(y.begin(), y.end(), t.data());
  return t;
}

/// Row-softmax of random logits, with entry (r, r % V) set to exactly zero on every third row and the row renormalized.
std::vector<double> teacher_probs(std::int64_t n, std::int64_t v, std::uint64_t seed) {
  Tensor<double, Cpu> tl({n, v});
  test::fill_uniform<double>(tl, seed, -2.0, 2.0);
  std::vector<double> t(static_cast<std::size_t>(n * v));
  for (std::int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (std::int64_t j = 0; j < v; ++j) {
      double e = std::exp(tl.data()[i * v + j]);
      if (i % 3 == 0 && j == i % v) e = 0;
      t[static_cast<std::size_t>(i * v + j)] = e;
      s += e;
    }
    for (std::int64_t j = 0; j < v; ++j) t[static_cast<std::size_t>(i * v + j)] /= s;
  }
  return t;
}

template <class S>
double tol_of() {
  return std::is_same_v<S, float> ? 2e-6 : 1e-13;
}

// ------------------------------------------------------------------------------------------------------------------
// Parameters for the optimizer tests.

template <class S>
struct Model {
  std::vector<std::string> names;
  std::vector<nn::Parameter<S, Cpu>> params;

  Model(const std::vector<Shape>& shapes, std::uint64_t seed) {
    params.reserve(shapes.size());
    for (std::size_t k = 0; k < shapes.size(); ++k) {
      names.push_back("layer" + std::to_string(k) + ".w");
      params.emplace_back(shapes[k]);
      test::fill_uniform<S>(params.back().value, seed + k, -1.0, 1.0);
    }
  }
  nn::ParameterRefs<S, Cpu> refs() {
    nn::ParameterRefs<S, Cpu> r;
    for (std::size_t k = 0; k < params.size(); ++k) r.push_back({names[k], params[k].value, params[k].grad});
    return r;
  }
  /// Deterministic gradients for step `step`: uniform noise, 30× larger at step 3 (a spike that engages
  /// Adafactor's update clipping), plus a pull towards 0.3 so the gradient depends on the parameters.
  void set_grads(std::int64_t step) {
    for (std::size_t k = 0; k < params.size(); ++k) {
      auto g = params[k].grad.view();
      test::fill_uniform<S>(g, 1000 * static_cast<std::uint64_t>(step) + k, -1.0, 1.0);
      const double spike = step == 3 ? 30.0 : 1.0;
      const double scale = 0.5 + 0.25 * static_cast<double>(k);
      for (std::int64_t i = 0; i < g.numel(); ++i) {
        const double x = static_cast<double>(params[k].value.data()[i]);
        g.data()[i] = static_cast<S>(spike * scale * static_cast<double>(g.data()[i]) + 0.5 * (x - 0.3));
      }
    }
  }
  std::vector<std::vector<double>> values() const {
    std::vector<std::vector<double>> v;
    for (const auto& p : params) v.push_back(test::to_double<S>(p.value));
    return v;
  }
  std::vector<std::vector<double>> grads() const {
    std::vector<std::vector<double>> v;
    for (const auto& p : params) v.push_back(test::to_double<S>(p.grad));
    return v;
  }
};

const std::vector<Shape> kShapes = {Shape{7, 5}, Shape{13}, Shape{3, 4, 6}};

double rms(const std::vector<double>& a) {
  double s = 0;
  for (double x : a) s += x * x;
  return std::sqrt(s / static_cast<double>(a.size()));
}

/// Reference AdamW: the update rule of Loshchilov & Hutter with bias correction, λ scaled by lr.
struct RefAdamW {
  train::AdamWOptions o;
  std::vector<std::vector<double>> m, v;
  std::int64_t t = 0;

  RefAdamW(train::AdamWOptions opts, const std::vector<std::vector<double>>& xs) : o(opts) {
    for (const auto& x : xs) {
      m.emplace_back(x.size(), 0.0);
      v.emplace_back(x.size(), 0.0);
    }
  }
  void step(std::vector<std::vector<double>>& xs, const std::vector<std::vector<double>>& gs, double lr) {
    ++t;
    for (std::size_t k = 0; k < xs.size(); ++k) {
      for (std::size_t i = 0; i < xs[k].size(); ++i) {
        const double g = gs[k][i];
        m[k][i] = o.beta1 * m[k][i] + (1 - o.beta1) * g;
        v[k][i] = o.beta2 * v[k][i] + (1 - o.beta2) * g * g;
        const double mhat = m[k][i] / (1 - std::pow(o.beta1, static_cast<double>(t)));
        const double vhat = v[k][i] / (1 - std::pow(o.beta2, static_cast<double>(t)));
        xs[k][i] -= lr * (mhat / (std::sqrt(vhat) + o.eps) + o.weight_decay * xs[k][i]);
      }
    }
  }
};

/// Reference Adafactor: Algorithms 4/5 of Shazeer & Stern with the options documented in adafactor.hpp.
struct RefAdafactor {
  struct P {
    bool factored = false;
    std::int64_t lead = 1, n = 0, m = 0;
    std::vector<double> r, c, v, mom;  // row sums (lead, n), column sums (lead, m), full v, momentum
  };
  train::AdafactorOptions o;
  std::vector<P> ps;
  std::int64_t t = 0;
  int clipped_steps = 0;  // (step, parameter) pairs where RMS(U) > d

  RefAdafactor(train::AdafactorOptions opts, const std::vector<Shape>& shapes) : o(opts) {
    for (const Shape& s : shapes) {
      P p;
      p.factored = o.factored && s.rank() >= 2;
      if (p.factored) {
        p.n = s[-2];
        p.m = s[-1];
        p.lead = s.numel() / (p.n * p.m);
        p.r.assign(static_cast<std::size_t>(p.lead * p.n), 0.0);
        p.c.assign(static_cast<std::size_t>(p.lead * p.m), 0.0);
      } else {
        p.v.assign(static_cast<std::size_t>(s.numel()), 0.0);
      }
      p.mom.assign(static_cast<std::size_t>(s.numel()), 0.0);
      ps.push_back(p);
    }
  }

  void step(std::vector<std::vector<double>>& xs, const std::vector<std::vector<double>>& gs, double lr) {
    ++t;
    const double td = static_cast<double>(t);
    const double b2 = 1 - std::pow(td, -o.decay_exponent);
    const double rho = o.relative_step ? std::min(1e-2, 1 / std::sqrt(td)) : lr;
    for (std::size_t k = 0; k < xs.size(); ++k) {
      P& p = ps[k];
      std::vector<double>& x = xs[k];
      const std::vector<double>& g = gs[k];
      const std::size_t numel = x.size();
      const double alpha = rho * (o.scale_parameter ? std::max(o.epsilon2, rms(x)) : 1.0);
      std::vector<double> vhat(numel);
      if (p.factored) {
        for (std::int64_t l = 0; l < p.lead; ++l) {
          for (std::int64_t i = 0; i < p.n; ++i) {
            double s = 0;
            for (std::int64_t j = 0; j < p.m; ++j) {
              const double gij = g[static_cast<std::size_t>((l * p.n + i) * p.m + j)];
              s += gij * gij + o.epsilon1;
            }
            double& ri = p.r[static_cast<std::size_t>(l * p.n + i)];
            ri = b2 * ri + (1 - b2) * s;
          }
          for (std::int64_t j = 0; j < p.m; ++j) {
            double s = 0;
            for (std::int64_t i = 0; i < p.n; ++i) {
              const double gij = g[static_cast<std::size_t>((l * p.n + i) * p.m + j)];
              s += gij * gij + o.epsilon1;
            }
            double& cj = p.c[static_cast<std::size_t>(l * p.m + j)];
            cj = b2 * cj + (1 - b2) * s;
          }
          double total = 0;
          for (std::int64_t i = 0; i < p.n; ++i) total += p.r[static_cast<std::size_t>(l * p.n + i)];
          for (std::int64_t i = 0; i < p.n; ++i) {
            for (std::int64_t j = 0; j < p.m; ++j) {
              vhat[static_cast<std::size_t>((l * p.n + i) * p.m + j)] =
                  p.r[static_cast<std::size_t>(l * p.n + i)] * p.c[static_cast<std::size_t>(l * p.m + j)] / total;
            }
          }
        }
      } else {
        for (std::size_t i = 0; i < numel; ++i) {
          p.v[i] = b2 * p.v[i] + (1 - b2) * (g[i] * g[i] + o.epsilon1);
          vhat[i] = p.v[i];
        }
      }
      std::vector<double> u(numel);
      for (std::size_t i = 0; i < numel; ++i) u[i] = g[i] / std::sqrt(vhat[i]);
      const double ratio = rms(u) / o.clip_threshold;
      if (ratio > 1.0 + 1e-9) ++clipped_steps;
      const double den = std::max(1.0, ratio);
      for (std::size_t i = 0; i < numel; ++i) {
        double d = u[i] / den;
        if (o.beta1 > 0) {
          p.mom[i] = o.beta1 * p.mom[i] + (1 - o.beta1) * d;
          d = p.mom[i];
        }
        x[i] = x[i] - alpha * d - alpha * o.weight_decay * x[i];
      }
    }
  }
};

/// max over parameters of the relative error of the values and of the displacement from the start.
double max_rel(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
  double e = 0;
  for (std::size_t k = 0; k < a.size(); ++k) {
    e = std::max(e, test::rel_error(a[k].data(), b[k].data(), static_cast<std::int64_t>(a[k].size())));
  }
  return e;
}
std::vector<std::vector<double>> minus(const std::vector<std::vector<double>>& a,
                                       const std::vector<std::vector<double>>& b) {
  auto d = a;
  for (std::size_t k = 0; k < a.size(); ++k) {
    for (std::size_t i = 0; i < a[k].size(); ++i) d[k][i] -= b[k][i];
  }
  return d;
}

template <class S>
const TensorView<S, Cpu>* find_state(const train::OptimizerState<S>& st, const std::string& name) {
  for (const auto& t : st.tensors) {
    if (t.name == name) return &t.view;
  }
  return nullptr;
}

template <class S>
bool bitwise_equal(ConstTensorView<S, Cpu> a, ConstTensorView<S, Cpu> b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(S)) == 0;
}

}  // namespace

TEST_SUITE("train") {
  // ----------------------------------------------------------------------------------------------------------------
  // Losses

  TEST_CASE_TEMPLATE("label_smoothed_cross_entropy matches the double loop, padding ignored, any thread count", S,
                     float, double) {
    const std::int64_t n = 13, v = 7;
    Tensor<S, Cpu> logits({n, v});
    test::fill_uniform<S>(logits, 11, -3.0, 3.0);
    const std::vector<double> z = test::to_double<S>(logits);
    for (std::int32_t pad : {-1, 1}) {
      for (double eps : {0.0, 0.1}) {
        CAPTURE(pad);
        CAPTURE(eps);
        const auto y = make_targets(n, v, pad);
        const auto targets = to_tensor(y);
        const RefLoss ref = ref_loss(z, y, n, v, pad, eps, nullptr, 0.0);
        CpuContext ctx1{1}, ctx3{3};
        Tensor<S, Cpu> d1({n, v}), d3({n, v});
        for (auto& x : d1.view().span()) x = S(7);  // overwritten, padding rows included
        const auto r1 = train::label_smoothed_cross_entropy<S>(ctx1, d1, logits, targets,
                                                               {.padding_id = pad, .label_smoothing = eps});
        const auto r3 = train::label_smoothed_cross_entropy<S>(ctx3, d3, logits, targets,
                                                               {.padding_id = pad, .label_smoothing = eps});
        CHECK(r1.count == 11);
        CHECK(r1.count == ref.count);
        CHECK(r1.loss == doctest::Approx(ref.loss).epsilon(tol_of<S>()));
        CHECK(r1.nll == doctest::Approx(ref.nll).epsilon(tol_of<S>()));
        if (eps == 0.0) CHECK(r1.loss == doctest::Approx(r1.nll).epsilon(1e-15));
        const auto g = test::to_double<S>(d1);
        CHECK(test::rel_error(g.data(), ref.grad.data(), n * v) < (std::is_same_v<S, float> ? 1e-6 : 1e-14));
        for (std::int64_t j = 0; j < v; ++j) {
          CHECK(d1.view()(2, j) == S(0));
          CHECK(d1.view()(9, j) == S(0));
        }
        // Thread count changes nothing, bit for bit.
        CHECK(r1.loss == r3.loss);
        CHECK(r1.nll == r3.nll);
        CHECK(bitwise_equal<S>(d1, d3));
        // The loss-only overload reports the same numbers.
        const auto r0 = train::label_smoothed_cross_entropy<S>(ctx1, logits.cview(), targets,
                                                               {.padding_id = pad, .label_smoothing = eps});
        CHECK(r0.loss == r1.loss);
        CHECK(r0.nll == r1.nll);
        // dlogits may alias logits.
        Tensor<S, Cpu> inplace({n, v});
        std::copy(logits.data(), logits.data() + n * v, inplace.data());
        const auto ra = train::label_smoothed_cross_entropy<S>(ctx3, inplace, inplace.cview(), targets,
                                                               {.padding_id = pad, .label_smoothing = eps});
        CHECK(ra.loss == r1.loss);
        CHECK(bitwise_equal<S>(inplace, d1));
      }
    }
  }

  TEST_CASE("label_smoothed_cross_entropy: gradient matches central finite differences (double)") {
    const std::int64_t n = 11, v = 9;
    const std::int32_t pad = 0;
    CpuContext ctx{2};
    Tensor<double, Cpu> logits({n, v}), dlogits({n, v});
    test::fill_uniform<double>(logits, 5, -2.0, 2.0);
    const auto targets = to_tensor(make_targets(n, v, pad));
    const train::CrossEntropyOptions opt{.padding_id = pad, .label_smoothing = 0.15};
    (void)train::label_smoothed_cross_entropy<double>(ctx, dlogits, logits, targets, opt);
    std::vector<double> fd(static_cast<std::size_t>(n * v));
    const double h = 1e-5;
    for (std::int64_t i = 0; i < n * v; ++i) {
      const double x0 = logits.data()[i];
      logits.data()[i] = x0 + h;
      const double up = train::label_smoothed_cross_entropy<double>(ctx, logits.cview(), targets, opt).loss;
      logits.data()[i] = x0 - h;
      const double down = train::label_smoothed_cross_entropy<double>(ctx, logits.cview(), targets, opt).loss;
      logits.data()[i] = x0;
      fd[static_cast<std::size_t>(i)] = (up - down) / (2 * h);
    }
    CHECK(test::rel_error(dlogits.data(), fd.data(), n * v) < 1e-6);
  }

  TEST_CASE("label_smoothed_cross_entropy: all padding, empty input") {
    CpuContext ctx{2};
    Tensor<float, Cpu> logits({4, 5}), dlogits({4, 5});
    test::fill_uniform<float>(logits, 3);
    for (auto& x : dlogits.view().span()) x = 1.0f;
    const auto targets = to_tensor({-1, -1, -1, -1});
    const auto r = train::label_smoothed_cross_entropy<float>(ctx, dlogits, logits, targets, {.label_smoothing = 0.1});
    CHECK(r.count == 0);
    CHECK(r.loss == 0.0);
    CHECK(r.nll == 0.0);
    for (float x : dlogits.view().span()) CHECK(x == 0.0f);

    Tensor<float, Cpu> empty({0, 5}), dempty({0, 5});
    Tensor<std::int32_t, Cpu> no_targets({0});
    CHECK(train::label_smoothed_cross_entropy<float>(ctx, dempty, empty, no_targets).count == 0);

    // Changing a padding row's logits changes nothing.
    auto y = to_tensor({2, -1, 4, 0});
    const auto before = train::label_smoothed_cross_entropy<float>(ctx, dlogits, logits, y, {.label_smoothing = 0.1});
    for (std::int64_t j = 0; j < 5; ++j) logits.view()(1, j) = 100.0f * static_cast<float>(j);
    const auto after = train::label_smoothed_cross_entropy<float>(ctx, dlogits, logits, y, {.label_smoothing = 0.1});
    CHECK(before.loss == after.loss);
    CHECK(before.count == 3);
  }

  TEST_CASE("label_smoothed_cross_entropy and distillation_loss: errors") {
    CpuContext ctx{1};
    Tensor<float, Cpu> logits({13, 7}), dlogits({13, 7}), bad({13, 6}), teacher({13, 7});
    auto y = make_targets(13, 7, -1);
    y[4] = 9;
    CHECK_THROWS_WITH_AS(
        (void)train::label_smoothed_cross_entropy<float>(ctx, dlogits, logits, to_tensor(y)),
        "label_smoothed_cross_entropy: targets[4] = 9 is outside [0, V) with V = 7 and is not the padding id -1",
        ShapeError);
    auto y1 = make_targets(13, 7, 1);
    y1[4] = 7;
    CHECK_THROWS_WITH_AS(
        (void)train::label_smoothed_cross_entropy<float>(ctx, logits.cview(), to_tensor(y1), {.padding_id = 1}),
        "label_smoothed_cross_entropy: targets[4] = 7 is outside [0, V) with V = 7 and is not the padding id 1",
        ShapeError);
    y[4] = -3;
    CHECK_THROWS_WITH_AS((void)train::distillation_loss<float>(ctx, dlogits, logits, teacher, to_tensor(y)),
                         "distillation_loss: targets[4] = -3 is outside [0, V) with V = 7 and is not the padding id -1",
                         ShapeError);
    y[4] = 1;
    CHECK_THROWS_WITH_AS((void)train::label_smoothed_cross_entropy<float>(ctx, bad, logits, to_tensor(y)),
                         "label_smoothed_cross_entropy: dlogits must have shape [13, 7] but has shape [13, 6]",
                         ShapeError);
    CHECK_THROWS_WITH_AS((void)train::distillation_loss<float>(ctx, dlogits, logits, bad, to_tensor(y)),
                         "distillation_loss: teacher_probs must have shape [13, 7] but has shape [13, 6]", ShapeError);
    CHECK_THROWS_WITH_AS((void)train::label_smoothed_cross_entropy<float>(ctx, dlogits, logits, to_tensor({1, 2})),
                         "label_smoothed_cross_entropy: targets must have shape [13] but has shape [2]", ShapeError);
    Tensor<float, Cpu> rank3({2, 3, 4});
    CHECK_THROWS_WITH_AS((void)train::label_smoothed_cross_entropy<float>(ctx, rank3, rank3.cview(), to_tensor({1, 2})),
                         "label_smoothed_cross_entropy: logits must have rank 2 (N, V) but has shape [2, 3, 4]",
                         ShapeError);
    CHECK_THROWS_AS(
        (void)train::label_smoothed_cross_entropy<float>(ctx, dlogits, logits, to_tensor(y), {.label_smoothing = 1.5}),
        Error);
    CHECK_THROWS_AS((void)train::distillation_loss<float>(ctx, dlogits, logits, teacher, to_tensor(y), {.alpha = -0.1}),
                    Error);
  }

  TEST_CASE_TEMPLATE("distillation_loss matches the double loop", S, float, double) {
    const std::int64_t n = 13, v = 7;
    const std::int32_t pad = -1;
    Tensor<S, Cpu> logits({n, v}), teacher({n, v}), d1({n, v}), d3({n, v}), dce({n, v});
    test::fill_uniform<S>(logits, 21, -3.0, 3.0);
    const auto t = teacher_probs(n, v, 22);
    for (std::int64_t i = 0; i < n * v; ++i) teacher.data()[i] = static_cast<S>(t[static_cast<std::size_t>(i)]);
    const auto tq = test::to_double<S>(teacher);  // the teacher as the implementation sees it
    const auto y = make_targets(n, v, pad);
    const auto targets = to_tensor(y);
    const auto z = test::to_double<S>(logits);
    CpuContext ctx1{1}, ctx3{3};
    for (double alpha : {0.0, 0.3, 1.0}) {
      CAPTURE(alpha);
      const train::DistillationOptions opt{.padding_id = pad, .label_smoothing = 0.1, .alpha = alpha};
      const RefLoss ref = ref_loss(z, y, n, v, pad, 0.1, &tq, alpha);
      const auto r = train::distillation_loss<S>(ctx1, d1, logits, teacher, targets, opt);
      const auto r3 = train::distillation_loss<S>(ctx3, d3, logits, teacher, targets, opt);
      CHECK(r.count == ref.count);
      CHECK(r.loss == doctest::Approx(ref.loss).epsilon(tol_of<S>()));
      CHECK(r.cross_entropy == doctest::Approx(ref.ce).epsilon(tol_of<S>()));
      CHECK(r.kl == doctest::Approx(ref.kl).epsilon(tol_of<S>()));
      CHECK(r.nll == doctest::Approx(ref.nll).epsilon(tol_of<S>()));
      const auto g = test::to_double<S>(d1);
      CHECK(test::rel_error(g.data(), ref.grad.data(), n * v) < (std::is_same_v<S, float> ? 1e-6 : 1e-14));
      CHECK(r.loss == r3.loss);
      CHECK(bitwise_equal<S>(d1, d3));
      if (alpha == 0.0) {
        const auto ce = train::label_smoothed_cross_entropy<S>(ctx1, dce, logits, targets,
                                                               {.padding_id = pad, .label_smoothing = 0.1});
        CHECK(ce.loss == r.loss);
        CHECK(bitwise_equal<S>(dce, d1));
      }
    }
  }

  TEST_CASE("distillation_loss: zero KL and gradient when the student matches the teacher, finite differences") {
    const std::int64_t n = 10, v = 8;
    CpuContext ctx{2};
    Tensor<double, Cpu> logits({n, v}), teacher({n, v}), dlogits({n, v});
    test::fill_uniform<double>(logits, 31, -2.0, 2.0);
    for (std::int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (std::int64_t j = 0; j < v; ++j) s += std::exp(logits.view()(i, j));
      for (std::int64_t j = 0; j < v; ++j) teacher.view()(i, j) = std::exp(logits.view()(i, j)) / s;
    }
    const auto targets = to_tensor(make_targets(n, v, -1));
    const auto same = train::distillation_loss<double>(ctx, dlogits, logits, teacher, targets, {.alpha = 1.0});
    CHECK(std::abs(same.kl) < 1e-14);
    for (double g : dlogits.view().span()) CHECK(std::abs(g) < 1e-15);

    const auto t = teacher_probs(n, v, 32);
    for (std::int64_t i = 0; i < n * v; ++i) teacher.data()[i] = t[static_cast<std::size_t>(i)];
    const train::DistillationOptions opt{.padding_id = -1, .label_smoothing = 0.1, .alpha = 0.35};
    (void)train::distillation_loss<double>(ctx, dlogits, logits, teacher, targets, opt);
    Tensor<double, Cpu> scratch({n, v});
    std::vector<double> fd(static_cast<std::size_t>(n * v));
    const double h = 1e-5;
    for (std::int64_t i = 0; i < n * v; ++i) {
      const double x0 = logits.data()[i];
      logits.data()[i] = x0 + h;
      const double up = train::distillation_loss<double>(ctx, scratch, logits, teacher, targets, opt).loss;
      logits.data()[i] = x0 - h;
      const double down = train::distillation_loss<double>(ctx, scratch, logits, teacher, targets, opt).loss;
      logits.data()[i] = x0;
      fd[static_cast<std::size_t>(i)] = (up - down) / (2 * h);
    }
    CHECK(test::rel_error(dlogits.data(), fd.data(), n * v) < 1e-6);
  }

  // ----------------------------------------------------------------------------------------------------------------
  // Optimizers

  TEST_CASE_TEMPLATE("AdamW matches the plain-loop reference over several steps", S, float, double) {
    struct Case {
      const char* name;
      train::AdamWOptions opt;
      bool schedule;
    };
    const Case cases[] = {
        {"defaults", {.lr = 0.05}, false},
        {"weight decay, schedule", {.lr = 0.0, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.1}, true},
        {"no momentum", {.lr = 0.02, .beta1 = 0.0, .beta2 = 0.95, .weight_decay = 0.01}, false},
    };
    const train::InverseSqrtSchedule sched(0.08, 3);
    for (const Case& c : cases) {
      const std::string name = c.name;
      CAPTURE(name);
      CpuContext ctx{3};
      Model<S> model(kShapes, 7);
      const auto x0 = model.values();
      auto xr = x0;
      train::AdamW<S> opt(model.refs(), c.opt);
      RefAdamW ref(c.opt, xr);
      for (std::int64_t step = 1; step <= 6; ++step) {
        model.set_grads(step);
        const double lr = c.schedule ? sched(step) : c.opt.lr;
        if (c.schedule) {
          opt.step(ctx, lr);
        } else {
          opt.step(ctx);
        }
        ref.step(xr, model.grads(), lr);
        const auto xi = model.values();
        CHECK(max_rel(xi, xr) < (std::is_same_v<S, float> ? 1e-6 : 1e-14));
        CHECK(max_rel(minus(xi, x0), minus(xr, x0)) < (std::is_same_v<S, float> ? 2e-5 : 1e-12));
      }
      CHECK(opt.step_count() == 6);
      // The buffers are the reference's moments.
      const auto st = opt.state("opt/");
      REQUIRE(st.tensors.size() == 6);
      CHECK(st.tensors[2].name == "opt/layer1.w.adam_m");
      CHECK(st.metadata.at("opt/step") == "6");
      CHECK(st.metadata.at("opt/type") == "adamw");
      for (std::size_t k = 0; k < 3; ++k) {
        const auto m = test::to_double<S>(st.tensors[2 * k].view);
        const auto v = test::to_double<S>(st.tensors[2 * k + 1].view);
        CHECK(test::rel_error(m.data(), ref.m[k].data(), static_cast<std::int64_t>(m.size())) < 1e-6);
        CHECK(test::rel_error(v.data(), ref.v[k].data(), static_cast<std::int64_t>(v.size())) < 1e-6);
      }
    }
  }

  TEST_CASE_TEMPLATE("Adafactor matches the plain-loop reference over several steps", S, float, double) {
    struct Case {
      const char* name;
      train::AdafactorOptions opt;
      bool schedule;
    };
    const Case cases[] = {
        {"paper defaults (relative step, parameter scale)", {}, false},
        {"external lr schedule, momentum, weight decay, no parameter scale",
         {.relative_step = false, .scale_parameter = false, .beta1 = 0.9, .weight_decay = 0.1},
         true},
        {"external constant lr with parameter scale (KUD reading)", {.lr = 0.3, .relative_step = false}, false},
        {"unfactored, momentum, relative step, weight decay",
         {.factored = false, .beta1 = 0.5, .weight_decay = 0.01},
         false},
        {"clip threshold 0.5, decay exponent 0.5", {.decay_exponent = 0.5, .clip_threshold = 0.5}, false},
    };
    const train::CosineSchedule sched(0.05, 0.01, 2, 8);
    for (const Case& c : cases) {
      const std::string name = c.name;
      CAPTURE(name);
      CpuContext ctx{3};
      Model<S> model(kShapes, 9);
      const auto x0 = model.values();
      auto xr = x0;
      train::Adafactor<S> opt(model.refs(), c.opt);
      RefAdafactor ref(c.opt, kShapes);
      for (std::int64_t step = 1; step <= 6; ++step) {
        model.set_grads(step);
        const double lr = c.schedule ? sched(step) : c.opt.lr;
        if (c.schedule) {
          opt.step(ctx, lr);
        } else {
          opt.step(ctx);
        }
        ref.step(xr, model.grads(), lr);
        const auto xi = model.values();
        CHECK(max_rel(xi, xr) < (std::is_same_v<S, float> ? 1e-6 : 1e-14));
        CHECK(max_rel(minus(xi, x0), minus(xr, x0)) < (std::is_same_v<S, float> ? 5e-5 : 1e-11));
      }
      // The gradient spike at step 3 makes RMS(U) exceed d: update clipping was engaged.
      CHECK(ref.clipped_steps > 0);
      // Factored parameters keep row and column statistics; the rank-1 one keeps a full vector.
      const bool factored = c.opt.factored;
      CHECK(opt.is_factored(0) == factored);
      CHECK_FALSE(opt.is_factored(1));
      CHECK(opt.is_factored(2) == factored);
      const auto st = opt.state();
      CHECK(st.metadata.at("optimizer.type") == "adafactor");
      CHECK(st.metadata.at("optimizer.step") == "6");
      const auto* v1 = find_state(st, "optimizer.layer1.w.adafactor_v");
      REQUIRE(v1 != nullptr);
      CHECK(v1->shape() == Shape{13});
      CHECK(test::rel_error(test::to_double<S>(*v1).data(), ref.ps[1].v.data(), 13) < 1e-6);
      if (factored) {
        const auto* vr0 = find_state(st, "optimizer.layer0.w.adafactor_vr");
        const auto* vc0 = find_state(st, "optimizer.layer0.w.adafactor_vc");
        const auto* vr2 = find_state(st, "optimizer.layer2.w.adafactor_vr");
        const auto* vc2 = find_state(st, "optimizer.layer2.w.adafactor_vc");
        REQUIRE((vr0 && vc0 && vr2 && vc2));
        CHECK(vr0->shape() == Shape{7});
        CHECK(vc0->shape() == Shape{5});
        CHECK(vr2->shape() == Shape{3, 4});
        CHECK(vc2->shape() == Shape{3, 6});
        CHECK(test::rel_error(test::to_double<S>(*vr2).data(), ref.ps[2].r.data(), 12) < 1e-6);
        CHECK(test::rel_error(test::to_double<S>(*vc2).data(), ref.ps[2].c.data(), 18) < 1e-6);
        CHECK(find_state(st, "optimizer.layer0.w.adafactor_v") == nullptr);
      } else {
        CHECK(find_state(st, "optimizer.layer2.w.adafactor_v")->shape() == Shape{3, 4, 6});
      }
      CHECK((find_state(st, "optimizer.layer2.w.adafactor_m") != nullptr) == (c.opt.beta1 > 0));
    }
  }

  TEST_CASE("Adafactor: factored and unfactored agree when G² has rank one, a rank-1 parameter") {
    // With g_ij = a_i b_j, R C / ΣR reproduces g_ij² exactly (up to ε1 and rounding), so at t = 1 both estimators
    // give U = sign(G) and the update is -α sign(G).
    CpuContext ctx{2};
    const double a[4] = {0.5, -1.25, 2.0, 0.75}, b[6] = {1.0, -0.5, 0.25, 3.0, -2.0, 0.125};
    nn::Parameter<double, Cpu> pf({4, 6}), pu({4, 6}), pv({24});
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 6; ++j) {
        for (auto* p : {&pf, &pu, &pv}) {
          p->grad.data()[i * 6 + j] = a[i] * b[j];
          p->value.data()[i * 6 + j] = 0.1 * (i - j);
        }
      }
    }
    const train::AdafactorOptions base{.lr = 0.01, .relative_step = false, .scale_parameter = false};
    train::Adafactor<double> f({{"w", pf.value, pf.grad}}, base);
    train::AdafactorOptions unf = base;
    unf.factored = false;
    train::Adafactor<double> u({{"w", pu.value, pu.grad}}, unf);
    train::Adafactor<double> r1({{"w", pv.value, pv.grad}}, base);  // rank 1: never factored
    CHECK(f.is_factored(0));
    CHECK_FALSE(u.is_factored(0));
    CHECK_FALSE(r1.is_factored(0));
    f.step(ctx);
    u.step(ctx);
    r1.step(ctx);
    for (int i = 0; i < 24; ++i) {
      const int row = i / 6, col = i % 6;
      const double expected = 0.1 * (row - col) - 0.01 * (a[row] * b[col] > 0 ? 1.0 : -1.0);
      CHECK(pf.value.data()[i] == doctest::Approx(expected).epsilon(1e-13));
      CHECK(pu.value.data()[i] == doctest::Approx(expected).epsilon(1e-13));
      CHECK(pv.value.data()[i] == pu.value.data()[i]);
    }
  }

  TEST_CASE("Optimizers and clipping: identical results for 1 and 3 threads on a multi-block parameter") {
    const std::vector<Shape> shapes = {Shape{101, 130}, Shape{9000}, Shape{2, 70, 90}};
    auto run = [&](int threads, int which) {
      CpuContext ctx{threads};
      Model<float> model(shapes, 17);
      train::AdamW<float> adam(model.refs(), {.lr = 0.01, .weight_decay = 0.01});
      train::Adafactor<float> ada(model.refs(), {.beta1 = 0.9});
      std::vector<double> norms;
      for (std::int64_t step = 1; step <= 4; ++step) {
        model.set_grads(step);
        norms.push_back(train::clip_grad_norm<float>(ctx, model.refs(), 50.0));
        if (which == 0) {
          adam.step(ctx);
        } else {
          ada.step(ctx);
        }
      }
      return std::make_pair(std::move(model), norms);
    };
    for (int which : {0, 1}) {
      CAPTURE(which);
      auto [m1, n1] = run(1, which);
      auto [m3, n3] = run(3, which);
      CHECK(n1 == n3);
      CHECK(n1[2] > 50.0);  // the spike step was clipped
      for (std::size_t k = 0; k < shapes.size(); ++k)
        CHECK(bitwise_equal<float>(m1.params[k].value, m3.params[k].value));
    }
  }

  TEST_CASE_TEMPLATE("AdamW and Adafactor minimize a quadratic below 5% of its start", S, float, double) {
    // f(x) = ½ Σ c_i (x_i − t_i)², gradient c_i (x_i − t_i).
    const std::vector<Shape> shapes = {Shape{7, 5}, Shape{13}};
    auto loss_and_grad = [](Model<S>& m) {
      double f = 0;
      for (std::size_t k = 0; k < m.params.size(); ++k) {
        for (std::int64_t i = 0; i < m.params[k].numel(); ++i) {
          const double c = 0.5 + 0.1 * static_cast<double>((i + 3 * static_cast<std::int64_t>(k)) % 16);
          const double t = std::sin(0.7 * static_cast<double>(i) + static_cast<double>(k)) * 1.5;
          const double d = static_cast<double>(m.params[k].value.data()[i]) - t;
          f += 0.5 * c * d * d;
          m.params[k].grad.data()[i] = static_cast<S>(c * d);
        }
      }
      return f;
    };
    CpuContext ctx{2};
    for (int which : {0, 1}) {
      CAPTURE(which);
      Model<S> model(shapes, 41);
      train::AdamW<S> adam(model.refs(), {.lr = 0.05});
      train::Adafactor<S> ada(model.refs());
      const double start = loss_and_grad(model);
      double f = start;
      for (int step = 0; step < 600; ++step) {
        if (which == 0) {
          adam.step(ctx);
        } else {
          ada.step(ctx);
        }
        f = loss_and_grad(model);
      }
      CHECK(f < 0.05 * start);
    }
  }

  TEST_CASE("Optimizers: constructor and step errors") {
    nn::Parameter<float, Cpu> a({3, 2}), b({4});
    Tensor<float, Cpu> wrong({2, 3});
    CHECK_THROWS_WITH_AS(train::AdamW<float>({{"a", a.value, a.grad}, {"a", b.value, b.grad}}),
                         "AdamW: parameter name 'a' appears twice", Error);
    CHECK_THROWS_WITH_AS(train::Adafactor<float>({{"a", a.value, wrong}}),
                         "Adafactor: parameter 'a' has value shape [3, 2] but grad shape [2, 3]", ShapeError);
    CHECK_THROWS_WITH_AS(train::AdamW<float>({{"a", a.value, a.grad}}, {.beta2 = 1.0}),
                         "AdamW: beta2 must be in [0, 1), got 1", Error);
    CHECK_THROWS_WITH_AS(train::Adafactor<float>({{"a", a.value, a.grad}}, {.epsilon1 = 0.0}),
                         "Adafactor: epsilon1 must be positive and finite, got 0", Error);
    CpuContext ctx{1};
    train::Adafactor<float> rel({{"a", a.value, a.grad}});
    CHECK_THROWS_WITH_AS(rel.step(ctx, 0.1),
                         "Adafactor::step: an external lr was given but relative_step is on; construct with "
                         ".relative_step = false to use a learning-rate schedule",
                         Error);
    train::AdamW<float> adam({{"a", a.value, a.grad}});
    CHECK_THROWS_WITH_AS(adam.step(ctx, -1.0), "AdamW::step: lr must be finite and >= 0, got -1", Error);
    CHECK(adam.step_count() == 0);
  }

  // ----------------------------------------------------------------------------------------------------------------
  // Checkpoints

  TEST_CASE_TEMPLATE("Optimizer checkpoint: 3 steps + save + load + 3 steps is bit-identical to 6 steps", Opt,
                     train::AdamW<float>, train::Adafactor<float>) {
    using Options = std::remove_cvref_t<decltype(std::declval<Opt>().options())>;
    Options options{};
    if constexpr (std::is_same_v<Opt, train::AdamW<float>>) {
      options.lr = 0.03;
      options.weight_decay = 0.05;
    } else {
      options.beta1 = 0.9;  // every kind of buffer: vr, vc, v and m
      options.weight_decay = 0.01;
    }
    CpuContext ctx{2};
    const std::filesystem::path path = std::filesystem::path(TMOE_TEST_TMPDIR) /
                                       (std::string("train_resume_") + std::string(Opt::kType) + ".safetensors");

    Model<float> straight(kShapes, 5);
    Opt opt_straight(straight.refs(), options);
    for (std::int64_t s = 1; s <= 6; ++s) {
      straight.set_grads(s);
      opt_straight.step(ctx);
    }

    Model<float> first(kShapes, 5);
    Opt opt_first(first.refs(), options);
    for (std::int64_t s = 1; s <= 3; ++s) {
      first.set_grads(s);
      opt_first.step(ctx);
    }
    {
      auto st = opt_first.state();
      auto all = nn::values_of(first.refs());
      all.insert(all.end(), st.tensors.begin(), st.tensors.end());
      auto meta = st.metadata;
      meta["note"] = "resume test";
      io::save(path, all, meta);
    }

    Model<float> resumed(kShapes, 99);  // different values: all of them must come from the file
    Opt opt_resumed(resumed.refs(), options);
    {
      auto st = opt_resumed.state();
      auto all = nn::values_of(resumed.refs());
      all.insert(all.end(), st.tensors.begin(), st.tensors.end());
      const auto meta = io::load(path, all);
      opt_resumed.load_metadata(meta);
    }
    CHECK(opt_resumed.step_count() == 3);

    // The in-memory route too: load_state from the first optimizer's state.
    Model<float> copied(kShapes, 77);
    for (std::size_t k = 0; k < kShapes.size(); ++k) {
      std::memcpy(copied.params[k].value.data(), first.params[k].value.data(), first.params[k].value.bytes());
    }
    Opt opt_copied(copied.refs(), options);
    {
      const auto st = opt_first.state();
      NamedTensorViews<const float, Cpu> src;
      for (const auto& t : st.tensors) src.push_back({t.name, t.view});
      opt_copied.load_state(src, st.metadata);
    }

    for (std::int64_t s = 4; s <= 6; ++s) {
      resumed.set_grads(s);
      opt_resumed.step(ctx);
      copied.set_grads(s);
      opt_copied.step(ctx);
    }
    CHECK(opt_resumed.step_count() == 6);
    for (std::size_t k = 0; k < kShapes.size(); ++k) {
      CHECK(bitwise_equal<float>(straight.params[k].value, resumed.params[k].value));
      CHECK(bitwise_equal<float>(straight.params[k].value, copied.params[k].value));
    }
    const auto a = opt_straight.state(), b = opt_resumed.state(), c = opt_copied.state();
    REQUIRE(a.tensors.size() == b.tensors.size());
    for (std::size_t i = 0; i < a.tensors.size(); ++i) {
      CAPTURE(a.tensors[i].name);
      CHECK(a.tensors[i].name == b.tensors[i].name);
      CHECK(bitwise_equal<float>(a.tensors[i].view, b.tensors[i].view));
      CHECK(bitwise_equal<float>(a.tensors[i].view, c.tensors[i].view));
    }
    CHECK(a.metadata == b.metadata);
    std::filesystem::remove(path);
  }

  TEST_CASE("Optimizer state: load errors name the tensor or key") {
    nn::Parameter<float, Cpu> w({7, 5}), bias({13});
    const nn::ParameterRefs<float, Cpu> refs = {{"w", w.value, w.grad}, {"b", bias.value, bias.grad}};
    train::AdamW<float> adam(refs);
    Tensor<float, Cpu> m_bad({5, 7}), v_ok({7, 5}), bm({13}), bv({13});
    const std::map<std::string, std::string> meta = {{"optimizer.step", "4"}, {"optimizer.type", "adamw"}};

    NamedTensorViews<float, Cpu> src = {{"optimizer.w.adam_m", m_bad},
                                        {"optimizer.w.adam_v", v_ok},
                                        {"optimizer.b.adam_m", bm},
                                        {"optimizer.b.adam_v", bv}};
    CHECK_THROWS_WITH_AS(adam.load_state(src, meta),
                         "AdamW::load_state: tensor 'optimizer.w.adam_m' has shape [5, 7], expected [7, 5]",
                         ShapeError);
    src[0].view = v_ok;
    src.pop_back();
    CHECK_THROWS_WITH_AS(adam.load_state(src, meta), "AdamW::load_state: missing tensor 'optimizer.b.adam_v'", Error);
    src.push_back({"optimizer.b.adam_v", bv});
    src.push_back({"optimizer.b.adafactor_m", bv});
    CHECK_THROWS_WITH_AS(
        adam.load_state(src, meta),
        "AdamW::load_state: unexpected tensor 'optimizer.b.adafactor_m' (no such buffer in this optimizer)", Error);
    src.pop_back();
    src.push_back({"w", v_ok});  // outside the prefix: a parameter in a combined checkpoint, ignored
    CHECK(adam.step_count() == 0);
    for (auto& x : bv.view().span()) x = 2.0f;
    adam.load_state(src, meta);
    CHECK(adam.step_count() == 4);
    CHECK(adam.state().tensors[3].view.data()[5] == 2.0f);

    CHECK_THROWS_WITH_AS(adam.load_metadata({{"optimizer.step", "12x"}, {"optimizer.type", "adamw"}}),
                         "AdamW::load_metadata: metadata 'optimizer.step' is '12x', expected a non-negative integer",
                         Error);
    CHECK_THROWS_WITH_AS(adam.load_metadata({{"optimizer.type", "adamw"}}),
                         "AdamW::load_metadata: metadata has no key 'optimizer.step'", Error);
    train::Adafactor<float> ada(refs);
    CHECK_THROWS_WITH_AS(ada.load_state(src, meta),
                         "Adafactor::load_state: metadata 'optimizer.type' is 'adamw', expected 'adafactor'", Error);
    CHECK(adam.step_count() == 4);
  }

  // ----------------------------------------------------------------------------------------------------------------
  // Schedules and clipping

  TEST_CASE("Schedules at chosen steps") {
    const train::InverseSqrtSchedule rsqrt(0.5, 4);
    CHECK(rsqrt(0) == 0.0);
    CHECK(rsqrt(1) == doctest::Approx(0.125).epsilon(1e-15));
    CHECK(rsqrt(3) == doctest::Approx(0.375).epsilon(1e-15));
    CHECK(rsqrt(4) == doctest::Approx(0.5).epsilon(1e-15));
    CHECK(rsqrt(9) == doctest::Approx(1.0 / 3.0).epsilon(1e-15));
    CHECK(rsqrt(16) == doctest::Approx(0.25).epsilon(1e-15));
    CHECK(rsqrt(400) == doctest::Approx(0.05).epsilon(1e-15));

    const train::CosineSchedule cosine(1.0, 0.1, 10, 110);
    CHECK(cosine(0) == 0.0);
    CHECK(cosine(5) == doctest::Approx(0.5).epsilon(1e-15));
    CHECK(cosine(10) == doctest::Approx(1.0).epsilon(1e-15));
    CHECK(cosine(35) == doctest::Approx(0.8681980515339464).epsilon(1e-14));  // 0.1 + 0.45 (1 + cos(π/4))
    CHECK(cosine(60) == doctest::Approx(0.55).epsilon(1e-15));
    CHECK(cosine(110) == doctest::Approx(0.1).epsilon(1e-15));
    CHECK(cosine(1000) == 0.1);
    const train::CosineSchedule no_warmup(2.0, 0.0, 0, 4);
    CHECK(no_warmup(0) == 2.0);
    CHECK(no_warmup(2) == doctest::Approx(1.0).epsilon(1e-15));

    const train::ConstantSchedule constant(3e-4);
    CHECK(constant(0) == 3e-4);
    CHECK(constant(123456789) == 3e-4);
    static_assert(train::Schedule<train::CosineSchedule>);

    CHECK_THROWS_WITH_AS((void)rsqrt(-1), "InverseSqrtSchedule: step must be >= 0, got -1", Error);
    CHECK_THROWS_WITH_AS(train::InverseSqrtSchedule(1.0, 0), "InverseSqrtSchedule: warmup_steps must be >= 1, got 0",
                         Error);
    CHECK_THROWS_WITH_AS(train::CosineSchedule(1.0, 0.1, 10, 10),
                         "CosineSchedule: total_steps (10) must exceed warmup_steps (10)", Error);
    CHECK_THROWS_AS(train::CosineSchedule(1.0, 2.0, 0, 10), Error);
    CHECK_THROWS_AS(train::CosineSchedule(1.0, 0.0, -1, 10), Error);
    CHECK_THROWS_AS(train::ConstantSchedule(-1.0), Error);
    CHECK_THROWS_AS((void)cosine(-5), Error);
    CHECK_THROWS_AS((void)constant(-5), Error);
  }

  TEST_CASE_TEMPLATE("clip_grad_norm: hand-computed norm, no-clip and clip cases, non-finite norms", S, float, double) {
    CpuContext ctx{2};
    nn::Parameter<S, Cpu> a({2}), b({1, 1});
    const nn::ParameterRefs<S, Cpu> refs = {{"a", a.value, a.grad}, {"b", b.value, b.grad}};
    auto set = [&] {
      a.grad.data()[0] = S(3);
      a.grad.data()[1] = S(4);
      b.grad.data()[0] = S(12);
    };
    set();
    CHECK(train::global_grad_norm<S>(ctx, refs) == 13.0);
    CHECK(train::clip_grad_norm<S>(ctx, refs, 26.0) == 13.0);  // below the threshold: untouched
    CHECK(a.grad.data()[0] == S(3));
    CHECK(b.grad.data()[0] == S(12));
    CHECK(train::clip_grad_norm<S>(ctx, refs, 13.0) == 13.0);  // exactly at it: untouched
    CHECK(a.grad.data()[1] == S(4));
    CHECK(train::clip_grad_norm<S>(ctx, refs, 6.5) == 13.0);
    CHECK(a.grad.data()[0] == S(1.5));
    CHECK(a.grad.data()[1] == S(2));
    CHECK(b.grad.data()[0] == S(6));
    CHECK(train::global_grad_norm<S>(ctx, refs) == 6.5);

    set();
    a.grad.data()[1] = std::numeric_limits<S>::infinity();
    CHECK(std::isinf(train::clip_grad_norm<S>(ctx, refs, 1.0)));
    CHECK(a.grad.data()[0] == S(3));
    CHECK(b.grad.data()[0] == S(12));
    a.grad.data()[1] = std::numeric_limits<S>::quiet_NaN();
    CHECK(std::isnan(train::clip_grad_norm<S>(ctx, refs, 1.0)));
    CHECK(b.grad.data()[0] == S(12));
    CHECK_THROWS_WITH_AS((void)train::clip_grad_norm<S>(ctx, refs, 0.0),
                         "clip_grad_norm: max_norm must be positive and finite, got 0", Error);
    CHECK(train::clip_grad_norm<S>(ctx, nn::ParameterRefs<S, Cpu>{}, 1.0) == 0.0);
  }
}
