// nn::Transformer: parameter names and counts (including the paper's counts from the formula), bad input, and the
// whole model's backward against finite differences in double precision.

#include <doctest/doctest.h>

#include <set>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

namespace {

nn::TransformerConfig tiny() {
  return {.vocab_size = 13, .d_model = 8, .d_ff = 12, .heads = 2, .encoder_layers = 2, .decoder_layers = 2,
          .max_length = 9, .dropout = 0.0, .num_tasks = 3, .pad_id = 0};
}

struct TinyBatch {
  Tensor<std::int32_t, Cpu> source{2, 6}, target{2, 5}, tasks{2};
  TinyBatch() {
    const std::int32_t src[] = {5, 3, 9, 2, 0, 0, 7, 1, 4, 12, 6, 8};
    const std::int32_t tgt[] = {1, 4, 4, 11, 0, 1, 2, 10, 3, 5};
    std::copy(std::begin(src), std::end(src), source.data());
    std::copy(std::begin(tgt), std::end(tgt), target.data());
    tasks.data()[0] = 2;
    tasks.data()[1] = 0;
  }
  nn::Batch batch() const { return {.source = source, .target_in = target, .task_ids = tasks}; }
};

// loss = sum(logits * R) + aux; d loss / d every parameter by central differences.
template <class Model>
void model_gradient_check(std::uint64_t seed) {
  auto cfg = tiny();
  using M = Model;
  M model(cfg);
  model.init(seed);
  TinyBatch tb;
  CpuContext ctx(2);
  typename M::Cache cache;
  const nn::StepArgs args{.training = true, .seed = 3, .step = 4};
  model.forward(ctx, tb.batch(), cache, args);
  Tensor<double, Cpu> r(cache.logits.shape());
  test::fill_uniform<double>(r, seed + 7);
  model.backward(ctx, cache, r);
  auto loss = [&] {
    typename M::Cache c;
    model.forward(ctx, tb.batch(), c, args);
    double l = model.aux_loss(c);
    for (std::int64_t i = 0; i < c.logits.numel(); ++i) l += c.logits.data()[i] * r.data()[i];
    return l;
  };
  for (auto& p : model.parameter_refs()) {
    std::vector<double> fd(static_cast<std::size_t>(p.value.numel()));
    for (std::int64_t i = 0; i < p.value.numel(); ++i) {
      double* v = p.value.data() + i;
      const double keep = *v, h = 1e-6;
      *v = keep + h;
      const double lp = loss();
      *v = keep - h;
      const double lm = loss();
      *v = keep;
      fd[static_cast<std::size_t>(i)] = (lp - lm) / (2 * h);
    }
    INFO(p.name);
    if (p.name.ends_with("k_proj.bias")) {
      // Softmax ignores a shift shared by every key, so the key bias's true gradient is exactly zero: both sides
      // are rounding noise, and the analytic one must be far below any real gradient.
      for (std::int64_t i = 0; i < p.value.numel(); ++i) {
        CHECK(std::abs(p.grad.data()[i]) < 1e-9);
        CHECK(std::abs(fd[static_cast<std::size_t>(i)]) < 1e-7);
      }
      continue;
    }
    CHECK(test::rel_error(p.grad.data(), fd.data(), p.value.numel(), 1e-8) < 1e-6);
  }
}

}  // namespace

TEST_SUITE("transformer") {
  TEST_CASE("parameter counts from the formula equal what the layers allocate, for every routing combination") {
    auto cfg = tiny();
    auto check = [&]<class M>(M* /*tag*/) {
      M m(cfg);
      const auto n = M::parameter_count(cfg);
      CHECK(n.total == test::parameter_elements(m));
      CHECK(n.embedding == 13 * 8);
    };
    check(static_cast<nn::DenseTransformer<float>*>(nullptr));
    check(static_cast<nn::TokenToken<4, float>*>(nullptr));
    check(static_cast<nn::SentenceSentence<4, float>*>(nullptr));
    check(static_cast<nn::TaskTask<4, float>*>(nullptr));
    check(static_cast<nn::TaskToken<4, float>*>(nullptr));
    check(static_cast<nn::TokenTask<4, float>*>(nullptr));
  }

  TEST_CASE("the paper's counts (paper-spec 1.6) without allocating: 214M encoder, 221M decoder, 32M extracted") {
    const nn::TransformerConfig wmt{.vocab_size = 64000, .d_model = 512, .d_ff = 2048, .heads = 8,
                                    .encoder_layers = 6, .decoder_layers = 6, .max_length = 256, .num_tasks = 16};
    const auto n = nn::TokenTask<32>::parameter_count(wmt);
    // The paper's counts leave out biases and layer norms (under 0.1%); compare within 1%.
    CHECK(static_cast<double>(n.encoder) == doctest::Approx(214e6).epsilon(0.01));
    CHECK(static_cast<double>(n.decoder) == doctest::Approx(221e6).epsilon(0.01));
    CHECK(static_cast<double>(n.decoder_extracted) == doctest::Approx(32e6).epsilon(0.02));
    CHECK(n.encoder_extracted == n.encoder);  // token-routed encoder keeps every expert
    CHECK(static_cast<double>(n.embedding) == doctest::Approx(33e6).epsilon(0.01));
    const auto dense = nn::DenseTransformer<float>::parameter_count(wmt);
    CHECK(static_cast<double>(dense.encoder) == doctest::Approx(19e6).epsilon(0.01));
    CHECK(static_cast<double>(dense.decoder) == doctest::Approx(25e6).epsilon(0.01));
  }

  TEST_CASE("stable names: DESIGN section 6") {
    nn::TokenTask<4, float> m(tiny());
    std::set<std::string> names;
    for (auto& p : m.parameter_refs()) names.insert(p.name);
    CHECK(names.count("embedding.weight"));
    CHECK(names.count("encoder.layers.1.moe.gate.weight"));
    CHECK(names.count("encoder.layers.1.moe.experts.wi"));
    CHECK(names.count("decoder.layers.1.moe.task_embedding"));
    CHECK(names.count("decoder.layers.0.ffn.wi.weight"));
    CHECK(names.count("decoder.layers.0.cross_attn.q_proj.weight"));
    CHECK(names.count("decoder.final_ln.weight"));
  }

  TEST_CASE("bad input names the argument") {
    nn::TokenTask<4, float> m(tiny());
    m.init(1);
    CpuContext ctx(1);
    nn::TokenTask<4, float>::Cache c;
    TinyBatch tb;
    tb.source.data()[3] = 13;
    CHECK_THROWS_WITH_AS(m.forward(ctx, tb.batch(), c),
                         "Transformer::forward: source token id 13 at (row 0, position 3) is outside the vocabulary "
                         "[0, 13)",
                         ShapeError);
    tb.source.data()[3] = 2;
    tb.tasks.data()[1] = 3;
    CHECK_THROWS_WITH_AS(m.forward(ctx, tb.batch(), c),
                         "Transformer::forward: task id 3 of row 1 is unknown; expected an id in [0, 3)", ShapeError);
    tb.tasks.data()[1] = 0;
    Tensor<std::int32_t, Cpu> longer({2, 10}), other({3, 5});
    CHECK_THROWS_WITH_AS(m.forward(ctx, {.source = longer, .target_in = tb.target, .task_ids = tb.tasks}, c),
                         "Transformer::forward: source length 10 exceeds max_length 9", ShapeError);
    CHECK_THROWS_WITH_AS(m.forward(ctx, {.source = tb.source, .target_in = other, .task_ids = tb.tasks}, c),
                         "Transformer::forward: source has 2 sequences but target_in has 3; the batch sizes must match",
                         ShapeError);
  }

  TEST_CASE("float32 and double forward agree to 1e-5 relative (token/task and sentence/sentence)") {
    auto agree = [&]<template <int, class, class> class M>() {
      M<4, double, Cpu> md(tiny());
      M<4, float, Cpu> mf(tiny());
      md.init(17);
      auto pd = md.parameter_refs();
      auto pf = mf.parameter_refs();
      REQUIRE(pd.size() == pf.size());
      for (std::size_t i = 0; i < pd.size(); ++i) {
        REQUIRE(pd[i].name == pf[i].name);
        for (std::int64_t j = 0; j < pd[i].value.numel(); ++j) {
          pf[i].value.data()[j] = static_cast<float>(pd[i].value.data()[j]);
          pd[i].value.data()[j] = static_cast<double>(pf[i].value.data()[j]);  // both hold the float-rounded value
        }
      }
      TinyBatch tb;
      CpuContext ctx(2);
      typename M<4, double, Cpu>::Cache cd;
      typename M<4, float, Cpu>::Cache cf;
      md.forward(ctx, tb.batch(), cd);
      mf.forward(ctx, tb.batch(), cf);
      const auto lf = test::to_double<float>(cf.logits);
      const auto ld = test::to_double<double>(cd.logits);
      CHECK(test::rel_error(lf.data(), ld.data(), cd.logits.numel()) < 1e-5);
    };
    agree.template operator()<nn::TokenTask>();
    agree.template operator()<nn::SentenceSentence>();
  }

  TEST_CASE("whole-model gradient check, token/task MoE, training mode") {
    model_gradient_check<nn::TokenTask<3, double>>(5);
  }
  TEST_CASE("whole-model gradient check, sentence/sentence MoE") {
    model_gradient_check<nn::SentenceSentence<3, double>>(9);
  }
}
