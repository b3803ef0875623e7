// Step-by-step decoding: KV-cached steps against the full decoder on the prefix, greedy search against a plain
// recompute-everything reference, batching against one-at-a-time, beam search against exhaustive enumeration, the
// sentence-routed decoder's causal prefix mean, and bad input.

#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

namespace {

using TokDropless5 = nn::DroplessTokenStack<5>;
using TokenTokenDropless = nn::Transformer<TokDropless5, TokDropless5, float, Cpu>;
// A token-routed layer with a capacity routes each call's tokens as one group, so what it drops depends on the
// batch; batch invariance holds for dropless routing.
using TokenDroplessTask = nn::Transformer<TokDropless5, nn::TaskStack<6>, float, Cpu>;

nn::TransformerConfig small(std::int64_t vocab = 17) {
  return {.vocab_size = vocab, .d_model = 12, .d_ff = 10, .heads = 3, .encoder_layers = 2, .decoder_layers = 3,
          .max_length = 10, .dropout = 0.1, .num_tasks = 3, .pad_id = 0, .bos_id = 1, .eos_id = 2};
}

const std::vector<std::vector<std::int32_t>> kSources = {{5, 3, 9, 12, 4}, {7, 16, 4}, {11, 6, 8, 3, 15, 13, 10}};
const std::vector<std::int32_t> kTasks = {2, 0, 1};

using test::id_tensor;
using test::pad_rows;

// Each decode_step's logits against forward() on the whole prefix, at every position.
template <class Model>
void check_steps_match_full(std::uint64_t seed) {
  CpuContext ctx(2);
  Model model(small());
  model.init(seed);
  const auto source = pad_rows(kSources);
  const auto tasks = id_tensor(kTasks);
  const std::int64_t B = 3, T = 8, V = 17;
  Tensor<std::int32_t, Cpu> target({B, T});
  const Philox rng(seed);
  for (std::int64_t i = 0; i < B * T; ++i) target.data()[i] = 3 + static_cast<std::int32_t>(rng.block(i, 9)[0] % 14);
  for (std::int64_t b = 0; b < B; ++b) target.data()[b * T] = 1;
  typename Model::Cache full;
  model.forward(ctx, {.source = source, .target_in = target, .task_ids = tasks}, full);
  typename Model::DecodeState st;
  model.begin_decode(ctx, source, tasks, T, st);
  Tensor<float, Cpu> logits({B, V}), expected({B, V});
  Tensor<std::int32_t, Cpu> step({B});
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t b = 0; b < B; ++b) {
      step.data()[b] = target.data()[b * T + t];
      std::copy_n(full.logits.data() + (b * T + t) * V, V, expected.data() + b * V);
    }
    model.decode_step(ctx, st, step, logits);
    CAPTURE(t);
    CHECK(test::rel_error<float>(logits, expected) < 1e-5);
  }
  CHECK_THROWS_WITH_AS(model.decode_step(ctx, st, step, logits), doctest::Contains("reserved positions"), ShapeError);
}

// Greedy by recomputing the whole model on every prefix (no cache), one sequence at a time.
template <class Model>
std::vector<std::int32_t> reference_greedy(CpuContext& ctx, const Model& model, const std::vector<std::int32_t>& src,
                                           std::int32_t task, std::int64_t max_len) {
  const std::int64_t V = model.config().vocab_size;
  std::vector<std::int32_t> out, prefix = {model.config().bos_id};
  const auto source = pad_rows({src});
  const auto tasks = id_tensor({task});
  for (std::int64_t step = 0; step < max_len; ++step) {
    const auto target = pad_rows({prefix});
    typename Model::Cache c;
    model.forward(ctx, {.source = source, .target_in = target, .task_ids = tasks}, c);
    const float* l = c.logits.data() + (static_cast<std::int64_t>(prefix.size()) - 1) * V;
    std::int32_t best = 0;
    for (std::int32_t v = 1; v < V; ++v) best = l[v] > l[best] ? v : best;
    if (best == model.config().eos_id) break;
    out.push_back(best);
    prefix.push_back(best);
  }
  return out;
}

template <class Model>
void check_greedy(std::uint64_t seed) {
  CpuContext ctx(2);
  Model model(small());
  model.init(seed);
  decode::Decoder<Model> decoder(model);
  const auto batched = decoder.greedy(ctx, kSources, kTasks, {.max_length = 9});
  for (std::size_t i = 0; i < kSources.size(); ++i) {
    CAPTURE(i);
    CHECK(batched.tokens[i] == reference_greedy(ctx, model, kSources[i], kTasks[i], 9));
    const auto alone = decoder.greedy(ctx, {kSources[i]}, {kTasks[i]}, {.max_length = 9});
    CHECK(alone.tokens[0] == batched.tokens[i]);
    CHECK(alone.scores[0] == doctest::Approx(batched.scores[i]).epsilon(1e-5));
  }
  // Beam search with one beam and no length penalty is greedy search.
  const auto one = decoder.beam(ctx, kSources, kTasks, {.max_length = 9, .beam_size = 1, .length_penalty = 0.0});
  CHECK(one.tokens == batched.tokens);
  for (std::size_t i = 0; i < kSources.size(); ++i) CHECK(one.scores[i] == doctest::Approx(batched.scores[i]).epsilon(1e-5));
}

}  // namespace

TEST_SUITE("decode") {
  TEST_CASE("KV-cached steps equal the full decoder on the prefix: dense") { check_steps_match_full<nn::DenseTransformer<>>(1); }
  TEST_CASE("KV-cached steps equal the full decoder on the prefix: token routing (dropless)") {
    check_steps_match_full<TokenTokenDropless>(2);
  }
  TEST_CASE("KV-cached steps equal the full decoder on the prefix: task routing") { check_steps_match_full<nn::TaskTask<4>>(3); }
  TEST_CASE("KV-cached steps equal the full decoder on the prefix: token encoder, task decoder") {
    check_steps_match_full<nn::TokenTask<6>>(4);
  }
  TEST_CASE("KV-cached steps equal the full decoder on the prefix: an extracted sub-network") {
    check_steps_match_full<extract::subnetwork_t<nn::TokenTask<6>>>(5);
  }

  TEST_CASE("greedy search equals recomputing the model on every prefix, batched or alone") {
    check_greedy<nn::DenseTransformer<>>(6);
    check_greedy<TokenDroplessTask>(7);
    check_greedy<TokenTokenDropless>(8);
  }

  TEST_CASE("beam search with enough beams finds the best hypothesis of an exhaustive enumeration") {
    // V = 6 (EOS = 2) and at most 3 tokens: 1 + 5 + 25 hypotheses end in EOS and 125 have three tokens. 64 beams
    // keep every live prefix, and the last step's 128 candidates hold the best of the hypotheses it ends (all of
    // length 3 with EOS counted), so the search is exhaustive.
    CpuContext ctx(1);
    const std::int64_t V = 6, L = 3;
    nn::TokenTask<4> model(small(V));
    model.init(17);
    const std::vector<std::int32_t> src = {4, 5, 3, 4};
    const std::int32_t task = 1;
    for (const double alpha : {0.0, 0.6, 2.0}) {
      CAPTURE(alpha);
      const auto r = decode::beam(ctx, model, {src}, {task}, {.max_length = L, .beam_size = 64, .length_penalty = alpha});
      // Every hypothesis: tokens without EOS, ending in EOS (length < L + 1 counting EOS) or at L tokens.
      double best = -1e300;
      std::vector<std::int32_t> best_tokens;
      std::function<void(std::vector<std::int32_t>&)> visit = [&](std::vector<std::int32_t>& y) {
        // Score of y followed by EOS (if room) and of y itself at L tokens, from one full forward on [BOS, y].
        std::vector<std::int32_t> in = {1};
        in.insert(in.end(), y.begin(), y.end());
        typename nn::TokenTask<4>::Cache c;
        const auto target = pad_rows({in});
        const auto source = pad_rows({src});
        const auto tasks = id_tensor({task});
        model.forward(ctx, {.source = source, .target_in = target, .task_ids = tasks}, c);
        auto logp = [&](std::size_t pos, std::int32_t tok) {
          const float* l = c.logits.data() + static_cast<std::int64_t>(pos) * V;
          double mx = -1e300, s = 0;
          for (std::int64_t v = 0; v < V; ++v) mx = std::max(mx, double(l[v]));
          for (std::int64_t v = 0; v < V; ++v) s += std::exp(double(l[v]) - mx);
          return double(l[tok]) - mx - std::log(s);
        };
        double prefix = 0;
        for (std::size_t i = 0; i < y.size(); ++i) prefix += logp(i, y[i]);
        auto consider = [&](double score, std::int64_t len) {
          const double n = score / std::pow((5.0 + double(len)) / 6.0, alpha);
          if (n > best) {
            best = n;
            best_tokens = y;
          }
        };
        if (static_cast<std::int64_t>(y.size()) == L) {
          consider(prefix, L);
          return;
        }
        consider(prefix + logp(y.size(), 2), static_cast<std::int64_t>(y.size()) + 1);
        for (std::int32_t v = 0; v < V; ++v) {
          if (v == 2) continue;
          y.push_back(v);
          visit(y);
          y.pop_back();
        }
      };
      std::vector<std::int32_t> y;
      visit(y);
      CHECK(r.tokens[0] == best_tokens);
      CHECK(r.scores[0] == doctest::Approx(best).epsilon(1e-5));
    }
  }

  TEST_CASE("beam search: batched sources decode as they do alone") {
    CpuContext ctx(2);
    TokenDroplessTask model(small());
    model.init(9);
    const auto all = decode::beam(ctx, model, kSources, kTasks, {.max_length = 9, .beam_size = 4});
    for (std::size_t i = 0; i < kSources.size(); ++i) {
      const auto one = decode::beam(ctx, model, {kSources[i]}, {kTasks[i]}, {.max_length = 9, .beam_size = 4});
      CHECK(one.tokens[0] == all.tokens[i]);
      CHECK(one.scores[0] == doctest::Approx(all.scores[i]).epsilon(1e-5));
    }
  }

  TEST_CASE("a sentence-routed decoder routes each step by the prefix mean: step 0 is the one-token sentence") {
    CpuContext ctx(2);
    nn::SentenceSentence<4> model(small());
    model.init(10);
    const auto source = pad_rows(kSources);
    Tensor<std::int32_t, Cpu> target({3, 1});
    std::fill_n(target.data(), 3, 1);
    nn::SentenceSentence<4>::Cache full;
    model.forward(ctx, {.source = source, .target_in = target}, full);
    nn::SentenceSentence<4>::DecodeState st;
    model.begin_decode(ctx, source, {}, 4, st);
    Tensor<float, Cpu> logits({3, 17});
    model.decode_step(ctx, st, target.view().reshape({3}), logits);
    CHECK(test::rel_error<float>(logits, full.logits.view().reshape({3, 17})) < 1e-5);
    const auto r1 = decode::greedy(ctx, model, kSources, {}, {.max_length = 9});
    const auto r2 = decode::greedy(ctx, model, kSources, {}, {.max_length = 9});
    CHECK(r1.tokens == r2.tokens);
  }

  TEST_CASE("stop_at_eos = false decodes max_length tokens for every sequence") {
    CpuContext ctx(2);
    nn::DenseTransformer<> model(small());
    model.init(12);
    const auto r = decode::greedy(ctx, model, kSources, {}, {.max_length = 7, .stop_at_eos = false});
    for (const auto& t : r.tokens) CHECK(t.size() == 7);
    CHECK(r.steps == 7);
    CHECK(r.tokens_decoded == 21);
  }

  TEST_CASE("bad input gives clear errors") {
    CpuContext ctx(1);
    nn::TokenTask<4> model(small());
    model.init(2);
    CHECK_THROWS_WITH_AS(decode::greedy(ctx, model, kSources, {0, 5, 1}), doctest::Contains("task id 5"), ShapeError);
    CHECK_THROWS_WITH_AS(decode::greedy(ctx, model, kSources, {0}), doctest::Contains("task_ids"), ShapeError);
    CHECK_THROWS_WITH_AS(decode::greedy(ctx, model, {{3, 99}}, {0}), doctest::Contains("99"), ShapeError);
    CHECK_THROWS_WITH_AS(decode::greedy(ctx, model, {{}}, {0}), doctest::Contains("empty"), ShapeError);
    CHECK_THROWS_WITH_AS(decode::greedy(ctx, model, {{3}}, {0}, {.max_length = 11}), doctest::Contains("max_length"),
                         ShapeError);
    CHECK_THROWS_WITH_AS(decode::beam(ctx, model, {{3}}, {0}, {.beam_size = 0}), doctest::Contains("beam_size"),
                         ShapeError);
    CHECK(decode::greedy(ctx, model, {}, {}).tokens.empty());
    nn::TokenTask<4>::DecodeState st;
    const auto source = pad_rows({{3, 4}});
    const auto tasks = id_tensor({1});
    model.begin_decode(ctx, source, tasks, 3, st);
    Tensor<float, Cpu> logits({1, 17});
    CHECK_THROWS_WITH_AS(model.decode_step(ctx, st, id_tensor({17}), logits), doctest::Contains("vocabulary"), ShapeError);
    Tensor<float, Cpu> wrong({2, 17});
    CHECK_THROWS_AS(model.decode_step(ctx, st, id_tensor({3}), wrong), ShapeError);
  }
}
