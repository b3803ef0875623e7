// extract::subnetwork and extract::expert_usage: the sub-network's type, its logits and decoded outputs against the
// full model's for the same task, the fold against a plain double-precision gate, parameter counts and file size,
// the extraction record, save/load, and the usage table.

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/extract/expert_usage.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

namespace {

using TokDropless5 = nn::MoeEvery<2, moe::Config<route::Token, Experts<5>, TopK<2>, Dropless>>;
using TaskK1 = nn::MoeEvery<2, moe::Config<route::Task, Experts<4>, TopK<1>, Dropless>>;
using TaskEvery1 = nn::MoeEvery<1, moe::Config<route::Task, Experts<3>, TopK<2>, Dropless>>;
using SentStack = nn::SentenceStack<4>;

// The combinations whose decoder routes by task.
using TokenTaskK2 = nn::TokenTask<6>;
using TokenTaskK1 = nn::Transformer<TokDropless5, TaskK1, float, Cpu>;
using TaskTaskE5 = nn::TaskTask<5>;
using DenseTaskEvery1 = nn::Transformer<nn::Dense, TaskEvery1, float, Cpu>;
using SentenceTask = nn::Transformer<SentStack, nn::TaskStack<4>, float, Cpu>;

static_assert(std::is_same_v<extract::subnetwork_t<TokenTaskK2>::encoder_pattern, nn::TokenStack<6>>);
static_assert(std::is_same_v<extract::subnetwork_t<TokenTaskK2>::decoder_pattern,
                             nn::FoldedEvery<2, nn::TaskStack<6>::moe_config>>);
static_assert(extract::subnetwork_t<TaskTaskE5>::encoder_pattern::folded);
static_assert(!extract::subnetwork_t<TokenTaskK2>::kNeedsTasks);

nn::TransformerConfig small() {
  return {.vocab_size = 17, .d_model = 12, .d_ff = 10, .heads = 3, .encoder_layers = 3, .decoder_layers = 3,
          .max_length = 11, .dropout = 0.1, .num_tasks = 3, .pad_id = 0, .bos_id = 1, .eos_id = 2};
}

// Three sources of different lengths (padded), three target prefixes.
struct Data {
  Tensor<std::int32_t, Cpu> source{3, 7}, target{3, 6}, tasks{3};
  explicit Data(std::int32_t task) {
    const std::int32_t src[] = {5, 3, 9, 12, 4, 0, 0, 7, 16, 4, 0, 0, 0, 0, 11, 6, 8, 3, 15, 13, 10};
    const std::int32_t tgt[] = {1, 4, 4, 11, 6, 9, 1, 14, 10, 3, 5, 7, 1, 8, 12, 3, 16, 4};
    std::copy(std::begin(src), std::end(src), source.data());
    std::copy(std::begin(tgt), std::end(tgt), target.data());
    std::fill_n(tasks.data(), 3, task);
  }
  nn::Batch batch() const { return {.source = source, .target_in = target, .task_ids = tasks}; }
  std::vector<std::vector<std::int32_t>> sources() const {
    return {{5, 3, 9, 12, 4}, {7, 16, 4}, {11, 6, 8, 3, 15, 13, 10}};
  }
};

// Logits, greedy and beam outputs of the sub-network equal the full model's, for every task.
template <class Model>
void check_exact(std::uint64_t seed) {
  CpuContext ctx(2);
  Model model(small());
  model.init(seed);
  for (std::int32_t task = 0; task < 3; ++task) {
    CAPTURE(task);
    auto sub = extract::subnetwork(ctx, model, task);
    const Data d(task);
    typename Model::Cache full_cache;
    typename extract::subnetwork_t<Model>::Cache sub_cache;
    model.forward(ctx, d.batch(), full_cache);
    sub.forward(ctx, {.source = d.source, .target_in = d.target}, sub_cache);
    CHECK(test::rel_error<float>(sub_cache.logits, full_cache.logits) < 1e-5);

    const std::vector<std::int32_t> tasks(3, task);
    const auto g_full = decode::greedy(ctx, model, d.sources(), tasks, {.max_length = 9});
    const auto g_sub = decode::greedy(ctx, sub, d.sources(), {}, {.max_length = 9});
    CHECK(g_full.tokens == g_sub.tokens);
    const auto b_full = decode::beam(ctx, model, d.sources(), tasks, {.max_length = 9, .beam_size = 3});
    const auto b_sub = decode::beam(ctx, sub, d.sources(), {}, {.max_length = 9, .beam_size = 3});
    CHECK(b_full.tokens == b_sub.tokens);
    for (std::size_t i = 0; i < 3; ++i) CHECK(std::abs(b_full.scores[i] - b_sub.scores[i]) < 1e-4);

    // Size: the formula, what is allocated, and the file.
    const auto n = Model::parameter_count(small());
    const std::int64_t expected = n.embedding + n.encoder_extracted + n.decoder_extracted;
    CHECK(test::parameter_elements(sub) == expected);
    CHECK(extract::subnetwork_t<Model>::parameter_count(small()).total == expected);
    CHECK(expected < n.total);
    // One file per case: ctest runs the cases in parallel.
    std::string file = "sub_";
    file += std::to_string(seed);
    file += ".safetensors";
    const auto path = std::filesystem::path(TMOE_TEST_TMPDIR) / file;
    io::save_model(path, sub);
    std::ifstream f(path, std::ios::binary);
    unsigned char len[8];
    f.read(reinterpret_cast<char*>(len), 8);
    std::uint64_t header = 0;
    for (int i = 7; i >= 0; --i) header = header * 256 + len[i];
    CHECK(std::filesystem::file_size(path) == 8 + header + 4 * static_cast<std::uint64_t>(expected));

    // Loaded back, it still gives the same logits and keeps its extraction record.
    auto loaded = io::load_model<extract::subnetwork_t<Model>>(path);
    typename extract::subnetwork_t<Model>::Cache c2;
    loaded.forward(ctx, {.source = d.source, .target_in = d.target}, c2);
    CHECK(test::rel_error<float>(c2.logits, sub_cache.logits) == 0.0);
    extract::Extraction rec;
    REQUIRE(extract::extraction_of(loaded, rec));
    CHECK(rec.task == task);
    CHECK(!rec.layers.empty());
  }
}

}  // namespace

TEST_SUITE("extract") {
  TEST_CASE("sub-network logits and decoded outputs equal the full model's: token encoder, task decoder, K=2") {
    check_exact<TokenTaskK2>(11);
  }
  TEST_CASE("sub-network equals the full model: K=1") { check_exact<TokenTaskK1>(12); }
  TEST_CASE("sub-network equals the full model: task-routed encoder and decoder both fold") {
    check_exact<TaskTaskE5>(13);
  }
  TEST_CASE("sub-network equals the full model: dense encoder, MoE in every decoder block") {
    check_exact<DenseTaskEvery1>(14);
  }
  TEST_CASE("sub-network equals the full model: sentence-routed encoder") { check_exact<SentenceTask>(15); }

  TEST_CASE("the fold matches a plain double-precision gate and the expert weights") {
    CpuContext ctx(1);
    TokenTaskK2 model(small());
    model.init(21);
    auto params = model.parameters();
    auto find = [&](const std::string& name) {
      for (auto& p : params) {
        if (p.name == name) return p.view;
      }
      FAIL("no parameter " << name);
      return params[0].view;
    };
    const std::int64_t E = 6, C = 12, F = 10;
    for (std::int32_t task = 0; task < 3; ++task) {
      auto sub = extract::subnetwork(ctx, model, task);
      auto sp = sub.parameters();
      extract::Extraction rec;
      REQUIRE(extract::extraction_of(sub, rec));
      REQUIRE(rec.layers.size() == 1);  // decoder blocks 0..2, MoE in block 1
      CHECK(rec.layers[0].layer == "decoder.layers.1");
      const auto gate = find("decoder.layers.1.moe.gate.weight");
      const auto emb = find("decoder.layers.1.moe.task_embedding");
      const auto wi = find("decoder.layers.1.moe.experts.wi");
      const auto wo = find("decoder.layers.1.moe.experts.wo");
      // Reference gate: softmax(emb[t] . gate^T) in double, the two largest (ties to the lower index).
      std::vector<double> p(E);
      double mx = -1e300, sum = 0;
      for (std::int64_t e = 0; e < E; ++e) {
        double z = 0;
        for (std::int64_t c = 0; c < C; ++c) z += double(emb.data()[task * C + c]) * double(gate.data()[e * C + c]);
        p[static_cast<std::size_t>(e)] = z;
        mx = std::max(mx, z);
      }
      for (auto& v : p) sum += (v = std::exp(v - mx));
      for (auto& v : p) v /= sum;
      std::int64_t e1 = 0;
      for (std::int64_t e = 1; e < E; ++e) e1 = p[e] > p[e1] ? e : e1;
      std::int64_t e2 = e1 == 0 ? 1 : 0;
      for (std::int64_t e = 0; e < E; ++e) e2 = (e != e1 && p[e] > p[e2]) ? e : e2;
      const double w1 = p[e1] / (p[e1] + p[e2]), w2 = p[e2] / (p[e1] + p[e2]);
      CHECK(rec.layers[0].experts == std::vector<std::int32_t>{static_cast<std::int32_t>(e1), static_cast<std::int32_t>(e2)});
      CHECK(rec.layers[0].weights[0] == doctest::Approx(w1).epsilon(1e-5));
      CHECK(rec.layers[0].weights[1] == doctest::Approx(w2).epsilon(1e-5));
      TensorView<float, Cpu> fwi = sp[0].view, fwo = sp[0].view;
      for (auto& q : sp) {
        if (q.name == "decoder.layers.1.ffn.wi.weight") fwi = q.view;
        if (q.name == "decoder.layers.1.ffn.wo.weight") fwo = q.view;
      }
      REQUIRE(fwi.shape() == Shape{2 * F, C});
      REQUIRE(fwo.shape() == Shape{C, 2 * F});
      double err = 0;
      const std::int64_t ex[2] = {e1, e2};
      const double wt[2] = {w1, w2};
      for (int j = 0; j < 2; ++j) {
        for (std::int64_t f = 0; f < F; ++f) {
          for (std::int64_t c = 0; c < C; ++c) {
            err = std::max(err, std::abs(double(fwi.data()[(j * F + f) * C + c]) - double(wi.data()[(ex[j] * F + f) * C + c])));
            err = std::max(err, std::abs(double(fwo.data()[c * 2 * F + j * F + f]) -
                                         wt[j] * double(wo.data()[(ex[j] * C + c) * F + f])));
          }
        }
      }
      CHECK(err < 1e-6);
      // Non-expert weights are copied unchanged.
      for (auto& q : sp) {
        if (q.name.find(".ffn.") != std::string::npos && q.name.find("layers.1.") != std::string::npos &&
            q.name.starts_with("decoder")) {
          continue;
        }
        const auto src = find(q.name);
        REQUIRE(src.numel() == q.view.numel());
        CHECK(std::equal(src.data(), src.data() + src.numel(), q.view.data()));
      }
    }
  }

  TEST_CASE("bad input: unknown task, and a sub-network file into the full model") {
    CpuContext ctx(1);
    TokenTaskK2 model(small());
    model.init(3);
    CHECK_THROWS_WITH_AS(extract::subnetwork(ctx, model, 3), doctest::Contains("unknown task id 3"), ShapeError);
    CHECK_THROWS_AS(extract::subnetwork(ctx, model, -1), ShapeError);
    auto sub = extract::subnetwork(model, 1);
    const auto path = std::filesystem::path(TMOE_TEST_TMPDIR) / "sub_wrong.safetensors";
    io::save_model(path, sub);
    CHECK_THROWS_WITH_AS(io::load_model<TokenTaskK2>(path), doctest::Contains("decoder"), IoError);
    const auto info = io::read_model_info(path);
    CHECK(info.decoder == "task/E=6/K=2/every=2/folded");
    CHECK(info.parameters == test::parameter_elements(sub));
  }

  TEST_CASE("expert usage: a task-routed layer sends every token of a task to its K experts") {
    CpuContext ctx(2);
    TaskTaskE5 model(small());
    model.init(31);
    Data d0(0), d2(2);
    Tensor<std::int32_t, Cpu> mixed{3};
    mixed.data()[0] = 1;
    mixed.data()[1] = 2;
    mixed.data()[2] = 1;
    std::vector<nn::Batch> batches = {d0.batch(), d2.batch(),
                                      {.source = d0.source, .target_in = d0.target, .task_ids = mixed}};
    const auto usage = extract::expert_usage(ctx, model, batches);
    // Encoder blocks 1, decoder block 1: two MoE layers.
    REQUIRE(usage.layers.size() == 2);
    CHECK(usage.layers[0] == "encoder.layers.1");
    CHECK(usage.layers[1] == "decoder.layers.1");
    // Tokens per task: source tokens 5 + 3 + 7 = 15 per batch; target tokens 6 + 6 + 6 = 18.
    const std::int64_t src_rows[3] = {5, 3, 7};
    for (std::size_t l = 0; l < 2; ++l) {
      const bool enc = l == 0;
      std::int64_t tok[3] = {0, 0, 0};
      auto add = [&](int task, int row) { tok[task] += enc ? src_rows[row] : 6; };
      for (int r = 0; r < 3; ++r) add(0, r);
      for (int r = 0; r < 3; ++r) add(2, r);
      add(1, 0);
      add(2, 1);
      add(1, 2);
      const auto* layer = enc ? &model.encoder_moe_block(1).ffn() : nullptr;
      const auto* dlayer = enc ? nullptr : &model.decoder_moe_block(1).ffn();
      for (int t = 0; t < 3; ++t) {
        CAPTURE(l);
        CAPTURE(t);
        CHECK(usage.tokens_of(l, t) == tok[t]);
        const auto route = enc ? layer->task_route(ctx, t) : dlayer->task_route(ctx, t);
        std::int64_t total = 0;
        for (int e = 0; e < 5; ++e) {
          const bool kept = route.experts[0] == e || route.experts[1] == e;
          CHECK(usage.count(l, t, e) == (kept ? tok[t] : 0));
          total += usage.count(l, t, e);
        }
        CHECK(total == 2 * tok[t]);
        CHECK(usage.fraction(l, t, route.experts[0]) == doctest::Approx(1.0));
      }
    }
    std::ostringstream csv;
    usage.write_csv(csv);
    const std::string s = csv.str();
    CHECK(s.starts_with("layer,task,expert,count,tokens,fraction\n"));
    CHECK(std::count(s.begin(), s.end(), '\n') == 1 + 2 * 3 * 5);
  }

  TEST_CASE("expert usage: token routing counts every choice once, and bad task ids are refused") {
    CpuContext ctx(2);
    nn::Transformer<TokDropless5, TokDropless5, float, Cpu> model(small());
    model.init(5);
    Data d(1);
    const auto usage = extract::expert_usage(ctx, model, {d.batch()});
    REQUIRE(usage.layers.size() == 2);
    std::int64_t total = 0;
    for (int e = 0; e < 5; ++e) total += usage.count(1, 1, e);
    CHECK(total == 2 * 18);
    CHECK(usage.tokens_of(0, 1) == 15);
    CHECK(usage.tokens_of(0, 0) == 0);
    CHECK(usage.fraction(0, 0, 0) == 0.0);
    Data bad(1);
    bad.tasks.data()[1] = 7;
    CHECK_THROWS_WITH_AS(extract::expert_usage(ctx, model, {bad.batch()}), doctest::Contains("task id 7"), ShapeError);
  }
}
