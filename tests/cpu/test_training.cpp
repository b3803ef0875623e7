// End-to-end training on the CPU: a tiny MoE Transformer learns a fixed batch at each routing granularity, and a
// checkpointed run resumes bit-identically.

#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

namespace {

nn::TransformerConfig tiny_config(double dropout) {
  return {.vocab_size = 17, .d_model = 32, .d_ff = 48, .heads = 4, .encoder_layers = 2, .decoder_layers = 2,
          .max_length = 16, .dropout = dropout, .num_tasks = 2, .pad_id = 0};
}

// A fixed batch: targets are a per-task transformation of the source, so there is something to learn.
struct FixedBatch {
  static constexpr std::int64_t B = 4, S = 7, T = 6;
  Tensor<std::int32_t, Cpu> source{B, S}, target_in{B, T}, target_out{B, T}, tasks{B};
  FixedBatch() {
    for (std::int64_t b = 0; b < B; ++b) {
      tasks.data()[b] = static_cast<std::int32_t>(b % 2);
      const std::int64_t len = S - (b % 3);
      for (std::int64_t s = 0; s < S; ++s) {
        source.view()(b, s) = s < len ? static_cast<std::int32_t>(2 + (b * 5 + s * 3) % 15) : 0;
      }
      for (std::int64_t t = 0; t < T; ++t) {
        const std::int32_t y = static_cast<std::int32_t>(2 + (source.view()(b, t) * (b % 2 ? 3 : 7) + t) % 15);
        target_out.view()(b, t) = t < len - 1 ? y : 0;
        target_in.view()(b, t) = t == 0 ? 1 : target_out.view()(b, t - 1);
      }
    }
  }
  nn::Batch batch() const { return {.source = source, .target_in = target_in, .task_ids = tasks}; }
};

// One step: forward, loss + aux, backward, clip, AdamW, zero_grad. Returns the label loss.
template <class Model, class Opt>
double train_step(CpuContext& ctx, Model& model, Opt& opt, typename Model::Cache& cache, const FixedBatch& fb,
                  std::uint64_t step) {
  model.forward(ctx, fb.batch(), cache, {.training = true, .seed = 77, .step = step});
  const std::int64_t N = cache.logits.dim(0) * cache.logits.dim(1), V = cache.logits.dim(2);
  Tensor<float, Cpu> dlogits({N, V});
  const auto r = train::label_smoothed_cross_entropy<float>(ctx, dlogits, cache.logits.view().reshape({N, V}),
                                                            fb.target_out.view().reshape({N}),
                                                            {.padding_id = 0, .label_smoothing = 0.0});
  model.backward(ctx, cache, dlogits.view().reshape(cache.logits.shape()));
  auto params = model.parameter_refs();
  train::clip_grad_norm(ctx, params, 1.0);
  opt.step(ctx);
  nn::zero_grad(params);
  return r.loss;
}

template <class Model>
void learns(int max_steps) {
  Model model(tiny_config(0.0));
  model.init(3);
  train::AdamW<float> opt(model.parameter_refs(), {.lr = 3e-3});
  typename Model::Cache cache;
  FixedBatch fb;
  CpuContext ctx(2);
  const double first = train_step(ctx, model, opt, cache, fb, 0);
  double last = first;
  int steps = 1;
  for (; steps < max_steps && last > 0.05 * first; ++steps) last = train_step(ctx, model, opt, cache, fb, steps);
  MESSAGE("start " << first << ", end " << last << " after " << steps << " steps");
  CHECK(last < 0.05 * first);
}

}  // namespace

TEST_SUITE("training") {
  TEST_CASE("a tiny token/token MoE model learns a fixed batch (loss below 5% of its start)") {
    learns<nn::TokenToken<4, float>>(400);
  }
  TEST_CASE("a tiny sentence/sentence MoE model learns a fixed batch") { learns<nn::SentenceSentence<4, float>>(400); }
  TEST_CASE("a tiny task/task MoE model learns a fixed batch") { learns<nn::TaskTask<4, float>>(400); }

  TEST_CASE("save, load and resume: bit-identical to an uninterrupted run (dropout and random routing on)") {
    using Model = nn::Transformer<nn::MoeEvery<2, moe::GShardPaper<route::Token, 4>>, nn::TaskStack<4>, float, Cpu>;
    const auto dir = std::filesystem::path(TMOE_TEST_TMPDIR);
    const auto path = dir / "resume.safetensors";
    FixedBatch fb;
    CpuContext ctx(2);

    Model straight(tiny_config(0.1));
    straight.init(5);
    train::AdamW<float> opt_s(straight.parameter_refs(), {.lr = 1e-3, .weight_decay = 0.01});
    Model::Cache cache;
    for (std::uint64_t s = 0; s < 6; ++s) train_step(ctx, straight, opt_s, cache, fb, s);

    Model first(tiny_config(0.1));
    first.init(5);
    train::AdamW<float> opt_f(first.parameter_refs(), {.lr = 1e-3, .weight_decay = 0.01});
    for (std::uint64_t s = 0; s < 3; ++s) train_step(ctx, first, opt_f, cache, fb, s);
    train::save_checkpoint(path, first, opt_f, 3);

    Model resumed(tiny_config(0.1));
    resumed.init(999);  // different weights: everything must come from the checkpoint
    train::AdamW<float> opt_r(resumed.parameter_refs(), {.lr = 1e-3, .weight_decay = 0.01});
    const std::int64_t step = train::load_checkpoint(path, resumed, opt_r);
    CHECK(step == 3);
    CHECK(opt_r.step_count() == 3);
    for (std::uint64_t s = 3; s < 6; ++s) train_step(ctx, resumed, opt_r, cache, fb, s);

    auto a = straight.parameter_refs();
    auto b = resumed.parameter_refs();
    REQUIRE(a.size() == b.size());
    int differ = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      differ += std::memcmp(a[i].value.data(), b[i].value.data(), static_cast<std::size_t>(a[i].value.numel()) * 4) != 0;
    }
    CHECK(differ == 0);

    // A checkpoint from a different config is refused, naming the field; the model is left untouched.
    auto other_cfg = tiny_config(0.1);
    other_cfg.d_ff = 40;
    Model other(other_cfg);
    train::AdamW<float> opt_o(other.parameter_refs());
    CHECK_THROWS_WITH_AS(train::load_checkpoint(path, other, opt_o),
                         ("load_checkpoint: " + path.string() +
                          ": written for a different model: d_ff is 48 in the file but 40 in this model")
                             .c_str(),
                         IoError);
    using Dense = nn::DenseTransformer<float>;
    Dense dense(tiny_config(0.1));
    train::AdamW<float> opt_d(dense.parameter_refs());
    CHECK_THROWS_WITH_AS(train::load_checkpoint(path, dense, opt_d),
                         ("load_checkpoint: " + path.string() +
                          ": written for a different model: decoder is \"task/E=4/K=2/every=2\" in the file but "
                          "\"dense\" in this model")
                             .c_str(),
                         IoError);
    std::filesystem::remove(path);
  }
}
