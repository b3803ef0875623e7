// multilingual: the research program. Trains translation models that differ only in how their MoE layers route
// (dense, token/token, sentence/sentence, task/task, token/task) plus a dense student distilled from the token/token
// model, on a multi-way corpus (the built-in generated one by default, or ../shared/data/oldi-seed), then decodes the
// test split with each and prints one table: BLEU per task, parameters, decoding speed. The token/task model is also
// decoded as each task's extracted sub-network, and its translations are compared with the full model's.
//
//   multilingual [--corpus DIR --tasks spa_Latn,ita_Latn,...] [--steps N] [--d-model C] [--d-ff F] [--layers L]
//                [--heads H] [--max-tokens N] [--seed S] [--out DIR] [--models dense,token,...] [--threads T]
//                [--append] [--save] [--resume] [--warmup N]
//
// Long runs can be split: `--models dense` now and `--append --models task` later, with the same data flags and
// --out, give one table (rows of the same model are replaced). The table files are rewritten after each model.
// With --save every model's checkpoint (parameters, AdamW state, step) goes to OUT/checkpoints/ when it finishes
// training; --resume continues each model from its checkpoint up to --steps (the batch stream, dropout and learning
// rate continue exactly as in one uninterrupted run, so give the same --warmup), which lets a model train longer in a
// later session. --append and --resume reuse OUT/tokenizer.model, so token ids stay the same.
//
// Outputs in --out: results.csv, results.md (the table), curves.csv (validation loss by step), usage_decoder.csv
// (the token/token model's decoder routing by task), the tokenizer, and (if Python with matplotlib is there) PNGs
// drawn by plot.py beside this file.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <tmoe/data/sentencepiece.hpp>
#include <tmoe/tmoe.hpp>
#include <vector>

namespace {

using namespace tmoe;
namespace fs = std::filesystem;
constexpr int kExperts = 8;
using Clock = std::chrono::steady_clock;

struct Flags {
  std::string corpus;  // empty: generated data
  std::vector<std::string> tasks = {"spa_Latn", "ita_Latn"};
  std::string source_language = "eng_Latn";
  std::int64_t steps = 400, d_model = 64, d_ff = 256, layers = 2, heads = 4, max_tokens = 1024, vocab = 0;
  std::int64_t synthetic_tasks = 4, synthetic_train = 3000, synthetic_test = 100, max_length = 48;
  std::int64_t eval_every = 50, test_limit = 0;
  std::uint64_t seed = 1;
  int threads = 2;
  bool append = false;  // keep the other models' rows of an earlier run in the same --out
  bool save = false;    // write each model's checkpoint to OUT/checkpoints/ after training
  bool resume = false;  // continue each model from its checkpoint in OUT/checkpoints/, if there is one
  std::int64_t warmup = 0;  // learning-rate warmup steps; 0 = steps / 10
  std::string out = "multilingual-out";
  std::vector<std::string> models = {"dense", "token", "sentence", "task", "token-task", "student"};
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

Flags parse(int argc, char** argv) {
  Flags f;
  const auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw Error(std::string("missing value after ") + argv[i]);
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--corpus")
      f.corpus = value(i);
    else if (a == "--tasks")
      f.tasks = split_list(value(i));
    else if (a == "--source")
      f.source_language = value(i);
    else if (a == "--steps")
      f.steps = std::stoll(value(i));
    else if (a == "--d-model")
      f.d_model = std::stoll(value(i));
    else if (a == "--d-ff")
      f.d_ff = std::stoll(value(i));
    else if (a == "--layers")
      f.layers = std::stoll(value(i));
    else if (a == "--heads")
      f.heads = std::stoll(value(i));
    else if (a == "--max-tokens")
      f.max_tokens = std::stoll(value(i));
    else if (a == "--vocab")
      f.vocab = std::stoll(value(i));
    else if (a == "--synthetic-tasks")
      f.synthetic_tasks = std::stoll(value(i));
    else if (a == "--synthetic-train")
      f.synthetic_train = std::stoll(value(i));
    else if (a == "--synthetic-test")
      f.synthetic_test = std::stoll(value(i));
    else if (a == "--max-length")
      f.max_length = std::stoll(value(i));
    else if (a == "--eval-every")
      f.eval_every = std::stoll(value(i));
    else if (a == "--test-limit")
      f.test_limit = std::stoll(value(i));
    else if (a == "--seed")
      f.seed = std::stoull(value(i));
    else if (a == "--threads")
      f.threads = std::stoi(value(i));
    else if (a == "--out")
      f.out = value(i);
    else if (a == "--models")
      f.models = split_list(value(i));
    else if (a == "--append")
      f.append = true;
    else if (a == "--save")
      f.save = true;
    else if (a == "--resume")
      f.resume = true;
    else if (a == "--warmup")
      f.warmup = std::stoll(value(i));
    else if (a == "--help" || a == "-h") {
      std::printf(
          "usage: multilingual [--corpus DIR --tasks a,b,...] [--steps N] [--d-model C] [--d-ff F] "
          "[--layers L] [--heads H] [--max-tokens N] [--seed S] [--out DIR] [--models m,...] [--threads T] "
          "[--append] [--save] [--resume] [--warmup N]\n"
          "models: dense token sentence task token-task student\n");
      std::exit(0);
    } else {
      throw Error("unknown flag " + a + " (try --help)");
    }
  }
  if (f.steps < 1 || f.layers < 2 || f.d_model < 8) throw Error("--steps >= 1, --layers >= 2 and --d-model >= 8");
  return f;
}

// ---------------------------------------------------------------------------------------------------------------
// Data: corpus -> joint SentencePiece model -> id sequences per task.

struct Example {
  std::vector<std::int32_t> source, target;  // source: tag + pieces; target: pieces + EOS
};

struct Data {
  std::vector<std::string> tasks;
  data::Tokenizer tokenizer;
  std::vector<std::vector<Example>> train, dev, test;  // [task][i]
  std::vector<std::vector<std::string>> test_references;
};

std::vector<std::vector<Example>> encode_split(const data::Tokenizer& tok, const data::MultiwayCorpus& c,
                                               std::int64_t max_length, std::int64_t limit) {
  std::vector<std::vector<Example>> out(c.tasks.size());
  const std::int64_t n = limit > 0 ? std::min(limit, c.size()) : c.size();
  for (std::size_t t = 0; t < c.tasks.size(); ++t) {
    const std::int32_t tag = tok.id(data::Tokenizer::tag(c.tasks[t]));
    for (std::int64_t i = 0; i < n; ++i) {
      Example e;
      e.source.push_back(tag);
      for (auto id : tok.encode(c.source[static_cast<std::size_t>(i)])) e.source.push_back(id);
      e.target = tok.encode(c.targets[t][static_cast<std::size_t>(i)]);
      e.target.push_back(data::Tokenizer::kEos);
      e.source.resize(std::min<std::size_t>(e.source.size(), static_cast<std::size_t>(max_length)));
      e.target.resize(std::min<std::size_t>(e.target.size(), static_cast<std::size_t>(max_length - 1)));
      out[t].push_back(std::move(e));
    }
  }
  return out;
}

Data prepare(const Flags& f) {
  data::MultiwayCorpus train, dev, test;
  if (f.corpus.empty()) {
    auto s = data::generate_synthetic(
        {.tasks = f.synthetic_tasks, .train = f.synthetic_train, .dev = 100, .test = f.synthetic_test, .seed = f.seed});
    train = std::move(s.train), dev = std::move(s.dev), test = std::move(s.test);
  } else {
    train = data::read_multiway(f.corpus, "train", f.source_language, f.tasks);
    dev = data::read_multiway(f.corpus, "dev", f.source_language, f.tasks);
    test = data::read_multiway(f.corpus, "test", f.source_language, f.tasks);
  }
  std::vector<std::string> lines = train.source;
  for (const auto& t : train.targets) lines.insert(lines.end(), t.begin(), t.end());
  std::vector<std::string> tags;
  for (const auto& t : train.tasks) tags.push_back(data::Tokenizer::tag(t));
  const std::int64_t vocab = f.vocab > 0 ? f.vocab : (f.corpus.empty() ? 400 : 8000);
  Data d;
  d.tasks = train.tasks;
  const fs::path saved = fs::path(f.out) / "tokenizer.model";
  if ((f.append || f.resume) && fs::exists(saved)) {
    d.tokenizer = data::Tokenizer::load(saved);  // the earlier run's ids, for its checkpoints and table
  } else {
    d.tokenizer = data::Tokenizer::train(lines, {.vocab_size = vocab, .tags = tags});
  }
  d.train = encode_split(d.tokenizer, train, f.max_length, 0);
  d.dev = encode_split(d.tokenizer, dev, f.max_length, 64);
  d.test = encode_split(d.tokenizer, test, f.max_length, f.test_limit);
  const std::int64_t n = f.test_limit > 0 ? std::min(f.test_limit, test.size()) : test.size();
  for (const auto& t : test.targets) d.test_references.emplace_back(t.begin(), t.begin() + n);
  return d;
}

/// A padded batch of rows (task, index) of one split.
struct BatchTensors {
  Tensor<std::int32_t, Cpu> source, target_in, target_out, tasks;
  std::int64_t target_tokens = 0;
  [[nodiscard]] nn::Batch batch() const { return {.source = source, .target_in = target_in, .task_ids = tasks}; }
};

BatchTensors make_batch(const std::vector<std::vector<Example>>& split, const std::vector<data::BatchRow>& rows) {
  std::int64_t S = 1, T = 1;
  for (const auto& r : rows) {
    const auto& e = split[static_cast<std::size_t>(r.task)][static_cast<std::size_t>(r.index)];
    S = std::max<std::int64_t>(S, static_cast<std::int64_t>(e.source.size()));
    T = std::max<std::int64_t>(T, static_cast<std::int64_t>(e.target.size()));
  }
  const auto B = static_cast<std::int64_t>(rows.size());
  BatchTensors b{Tensor<std::int32_t, Cpu>({B, S}), Tensor<std::int32_t, Cpu>({B, T}),
                 Tensor<std::int32_t, Cpu>({B, T}), Tensor<std::int32_t, Cpu>({B}), 0};
  for (std::int64_t i = 0; i < B; ++i) {
    const auto& r = rows[static_cast<std::size_t>(i)];
    const auto& e = split[static_cast<std::size_t>(r.task)][static_cast<std::size_t>(r.index)];
    b.tasks.data()[i] = r.task;
    std::copy(e.source.begin(), e.source.end(), b.source.data() + i * S);
    for (std::size_t t = 0; t < e.target.size(); ++t) {
      b.target_out.data()[i * T + static_cast<std::int64_t>(t)] = e.target[t];
      b.target_in.data()[i * T + static_cast<std::int64_t>(t)] = t == 0 ? data::Tokenizer::kBos : e.target[t - 1];
    }
    b.target_tokens += static_cast<std::int64_t>(e.target.size());
  }
  return b;
}

/// The dev split as fixed batches (every task, up to 64 sentences each).
std::vector<BatchTensors> dev_batches(const Data& d) {
  std::vector<BatchTensors> out;
  for (std::size_t t = 0; t < d.dev.size(); ++t) {
    std::vector<data::BatchRow> rows;
    for (std::size_t i = 0; i < d.dev[t].size(); ++i)
      rows.push_back({static_cast<std::int32_t>(t), static_cast<std::int64_t>(i)});
    for (std::size_t b = 0; b < rows.size(); b += 32) {
      out.push_back(make_batch(d.dev, {rows.begin() + static_cast<std::ptrdiff_t>(b),
                                       rows.begin() + static_cast<std::ptrdiff_t>(std::min(rows.size(), b + 32))}));
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Training and evaluation, one template for every model type.

struct Row {
  std::string name;
  std::vector<double> bleu;
  double average = 0, chrf = 0;
  std::int64_t total = 0, effective = 0;
  double tokens_per_second = 0, train_seconds = 0;
  std::string note;
};

template <class Model>
std::int64_t effective_parameters(const nn::TransformerConfig& c) {
  // A token of a token- or sentence-routed layer uses K of its E experts; task-routed layers keep K on extraction.
  const auto p = Model::parameter_count(c);
  const std::int64_t expert = 2 * c.d_model * c.d_ff;
  const auto unused = [&](auto pattern, std::int64_t layers) -> std::int64_t {
    using P = decltype(pattern);
    if constexpr (nn::task_routed_v<P> || std::is_same_v<P, nn::Dense>)
      return 0;
    else
      return (layers / 2) * (kExperts - 2) * expert;
  };
  return p.embedding + p.encoder_extracted + p.decoder_extracted -
         unused(typename Model::encoder_pattern{}, c.encoder_layers) -
         unused(typename Model::decoder_pattern{}, c.decoder_layers);
}

double validation_loss(CpuContext& ctx, auto& model, const std::vector<BatchTensors>& dev) {
  typename std::remove_cvref_t<decltype(model)>::Cache cache;
  Tensor<float, Cpu> dl;
  double sum = 0;
  std::int64_t count = 0;
  for (const auto& b : dev) {
    model.forward(ctx, b.batch(), cache);
    const std::int64_t N = b.target_out.numel(), V = model.config().vocab_size;
    dl.resize({N, V});
    const auto l = train::label_smoothed_cross_entropy<float>(ctx, dl, cache.logits.view().reshape({N, V}),
                                                              b.target_out.view().reshape({N}),
                                                              {.padding_id = data::Tokenizer::kPad});
    sum += l.nll * static_cast<double>(l.count);
    count += l.count;
  }
  return count ? sum / static_cast<double>(count) : 0.0;
}

/// Trains `model` for f.steps steps; with a teacher, by word-level distillation (alpha 0.5).
template <class Model, class Teacher = Model>
double train_model(CpuContext& ctx, const std::string& name, Model& model, const Flags& f, const Data& d,
                   const std::vector<BatchTensors>& dev, std::ofstream& curves, const Teacher* teacher = nullptr) {
  std::vector<std::vector<std::int64_t>> lengths(d.train.size());
  for (std::size_t t = 0; t < d.train.size(); ++t) {
    for (const auto& e : d.train[t]) {
      lengths[t].push_back(static_cast<std::int64_t>(std::max(e.source.size(), e.target.size())));
    }
  }
  data::Batcher batcher(lengths, {.temperature = 5.0, .max_tokens = f.max_tokens, .seed = f.seed});
  auto params = model.parameter_refs();
  train::AdamW<float> opt(params, {.lr = 0.0, .weight_decay = 0.01});
  const train::InverseSqrtSchedule schedule(2e-3, f.warmup > 0 ? f.warmup : std::max<std::int64_t>(1, f.steps / 10));
  // A checkpoint of this model from an earlier run: continue after its step, with the batch stream where it stopped.
  std::string slug;
  for (char c : name) slug += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  const fs::path checkpoint = fs::path(f.out) / "checkpoints" / (slug + ".safetensors");
  // A student's checkpoint records its teacher's steps: distilled from another teacher, it starts again.
  const std::map<std::string, std::string> teacher_meta =
      teacher != nullptr ? std::map<std::string, std::string>{{"multilingual.teacher_steps", std::to_string(f.steps)}}
                         : std::map<std::string, std::string>{};
  bool resumable = f.resume && fs::exists(checkpoint);
  if (resumable && teacher != nullptr) {
    const auto meta = io::SafetensorsFile::read_header(checkpoint).metadata();
    const auto it = meta.find("multilingual.teacher_steps");
    resumable = it != meta.end() && it->second == std::to_string(f.steps);
    if (!resumable) {
      std::fprintf(stderr, "%s: %s was distilled from a teacher of another length; training from the start\n",
                   name.c_str(), checkpoint.string().c_str());
    }
  }
  std::int64_t first = 0;
  if (resumable) {
    first = std::min(train::load_checkpoint(checkpoint, model, opt), f.steps);
    for (std::int64_t s = 0; s < first; ++s) static_cast<void>(batcher.next());
    std::fprintf(stderr, "%s: resumed from %s at step %lld\n", name.c_str(), checkpoint.string().c_str(),
                 static_cast<long long>(first));
  }
  typename Model::Cache cache;
  typename Teacher::Cache teacher_cache;
  Tensor<float, Cpu> dlogits, teacher_probs;  // reused across steps: resize reallocates only when N * V changes
  const auto start = Clock::now();
  std::int64_t tokens = 0;
  double loss_window = 0;
  int window = 0;
  for (std::int64_t step = first; step < f.steps; ++step) {
    const auto b = make_batch(d.train, batcher.next());
    model.forward(ctx, b.batch(), cache, {.training = true, .seed = f.seed, .step = static_cast<std::uint64_t>(step)});
    const std::int64_t N = b.target_out.numel(), V = model.config().vocab_size;
    dlogits.resize({N, V});
    double loss = 0;
    if (teacher != nullptr) {
      // Word-level distillation: the teacher's next-token distribution (softmax of its logits, temperature 1) at
      // every target position.
      teacher->forward(ctx, b.batch(), teacher_cache);
      teacher_probs.resize({N, V});
      Ops<Cpu>::softmax<float>(ctx, teacher_probs, teacher_cache.logits.view().reshape({N, V}));
      const auto r = train::distillation_loss<float>(
          ctx, dlogits, cache.logits.view().reshape({N, V}), teacher_probs, b.target_out.view().reshape({N}),
          {.padding_id = data::Tokenizer::kPad, .label_smoothing = 0.1, .alpha = 0.5});
      loss = r.loss;
    } else {
      loss = train::label_smoothed_cross_entropy<float>(ctx, dlogits, cache.logits.view().reshape({N, V}),
                                                        b.target_out.view().reshape({N}),
                                                        {.padding_id = data::Tokenizer::kPad, .label_smoothing = 0.1})
                 .loss;
    }
    model.backward(ctx, cache, dlogits.view().reshape(cache.logits.shape()));
    train::clip_grad_norm(ctx, params, 1.0);
    opt.step(ctx, schedule(opt.step_count() + 1));
    nn::zero_grad(params);
    tokens += b.target_tokens;
    loss_window += loss;
    ++window;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double remaining = elapsed / static_cast<double>(step + 1 - first) * static_cast<double>(f.steps - step - 1);
    std::fprintf(stderr, "\r%-12s step %5lld/%lld  loss %7.4f  %7.0f tok/s  %6.0f s elapsed  %6.0f s left   ",
                 name.c_str(), static_cast<long long>(step + 1), static_cast<long long>(f.steps), loss_window / window,
                 static_cast<double>(tokens) / std::max(elapsed, 1e-9), elapsed, remaining);
    if ((step + 1) % f.eval_every == 0 || step + 1 == f.steps) {
      const double v = validation_loss(ctx, model, dev);
      curves << name << ',' << step + 1 << ',' << loss_window / window << ',' << v << std::endl;  // kept if killed
      loss_window = 0;
      window = 0;
    }
  }
  std::fprintf(stderr, "\n");
  if (f.save && first < f.steps) {
    fs::create_directories(checkpoint.parent_path());
    train::save_checkpoint(checkpoint, model, opt, f.steps, teacher_meta);
  }
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// Greedy translations of the test split, per task, and the decoding speed.
template <class Model>
std::vector<std::vector<std::vector<std::int32_t>>> translate(CpuContext& ctx, const Model& model, const Data& d,
                                                              double& tokens_per_second, std::int64_t only_task = -1) {
  std::vector<std::vector<std::vector<std::int32_t>>> out(d.test.size());
  decode::Decoder<Model> decoder(model);
  std::int64_t tokens = 0;
  const auto start = Clock::now();
  for (std::size_t t = 0; t < d.test.size(); ++t) {
    if (only_task >= 0 && static_cast<std::int64_t>(t) != only_task) continue;
    for (std::size_t b = 0; b < d.test[t].size(); b += 32) {
      std::vector<std::vector<std::int32_t>> sources;
      for (std::size_t i = b; i < std::min(d.test[t].size(), b + 32); ++i) sources.push_back(d.test[t][i].source);
      const std::vector<std::int32_t> tasks(sources.size(), static_cast<std::int32_t>(t));
      const auto r = decoder.greedy(ctx, sources, tasks, {.scores = false});
      tokens += r.tokens_decoded;
      out[t].insert(out[t].end(), r.tokens.begin(), r.tokens.end());
    }
  }
  tokens_per_second = static_cast<double>(tokens) / std::chrono::duration<double>(Clock::now() - start).count();
  return out;
}

void score(Row& row, const Data& d, const std::vector<std::vector<std::vector<std::int32_t>>>& ids) {
  std::vector<std::string> all_hyp, all_ref;
  for (std::size_t t = 0; t < ids.size(); ++t) {
    std::vector<std::string> hyp;
    for (const auto& s : ids[t]) hyp.push_back(d.tokenizer.decode(s));
    row.bleu.push_back(eval::corpus_bleu(hyp, {d.test_references[t]}).score);
    all_hyp.insert(all_hyp.end(), hyp.begin(), hyp.end());
    all_ref.insert(all_ref.end(), d.test_references[t].begin(), d.test_references[t].end());
  }
  row.average = 0;
  for (double b : row.bleu) row.average += b / static_cast<double>(row.bleu.size());
  row.chrf = eval::corpus_chrf(all_hyp, {all_ref});
}

nn::TransformerConfig config_for(const Flags& f, const Data& d) {
  return {.vocab_size = d.tokenizer.vocab_size(),
          .d_model = f.d_model,
          .d_ff = f.d_ff,
          .heads = f.heads,
          .encoder_layers = f.layers,
          .decoder_layers = f.layers,
          .max_length = f.max_length,
          .dropout = 0.1,
          .num_tasks = static_cast<std::int64_t>(d.tasks.size()),
          .pad_id = data::Tokenizer::kPad,
          .bos_id = data::Tokenizer::kBos,
          .eos_id = data::Tokenizer::kEos};
}

template <class Model>
Row run(CpuContext& ctx, const std::string& name, Model& model, const Flags& f, const Data& d,
        const std::vector<BatchTensors>& dev, std::ofstream& curves) {
  Row row;
  row.name = name;
  row.train_seconds = train_model(ctx, name, model, f, d, dev, curves);
  row.total = Model::parameter_count(model.config()).total;
  row.effective = effective_parameters<Model>(model.config());
  score(row, d, translate(ctx, model, d, row.tokens_per_second));
  return row;
}

/// The results table: rows replace earlier rows of the same model; the CSV and Markdown files are rewritten after
/// every model, so a long run keeps what it finished. With --append, an earlier run's rows in --out are kept.
class Results {
 public:
  Results(const Flags& f, const std::vector<std::string>& tasks) : dir_(f.out), tasks_(tasks) {
    const auto path = dir_ / "results.csv";
    if (!f.append || !fs::exists(path)) return;
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    if (line != header()) {
      throw Error(path.string() + " was written for other tasks or by another version (header '" + line +
                  "'); expected '" + header() + "'");
    }
    while (std::getline(in, line)) {
      std::vector<std::string> cells;
      std::stringstream cs(line);
      for (std::string c; std::getline(cs, c, ',');) cells.push_back(c);
      if (cells.size() < tasks_.size() + 7) throw Error(path.string() + ": short row '" + line + "'");
      Row r;
      std::size_t k = 0;
      r.name = cells[k++];
      for (std::size_t t = 0; t < tasks_.size(); ++t) r.bleu.push_back(std::stod(cells[k++]));
      r.average = std::stod(cells[k++]);
      r.chrf = std::stod(cells[k++]);
      r.total = std::stoll(cells[k++]);
      r.effective = std::stoll(cells[k++]);
      r.tokens_per_second = std::stod(cells[k++]);
      r.train_seconds = std::stod(cells[k++]);
      r.note = k < cells.size() ? cells[k] : "";
      rows_.push_back(r);
    }
  }

  void add(const Row& row) {
    const auto it = std::find_if(rows_.begin(), rows_.end(), [&](const Row& r) { return r.name == row.name; });
    if (it != rows_.end())
      *it = row;
    else
      rows_.push_back(row);
    write();
  }

  [[nodiscard]] const Row* find(const std::string& name) const {
    for (const auto& r : rows_) {
      if (r.name == name) return &r;
    }
    return nullptr;
  }

  void print() const {
    std::printf("\n%-22s", "model");
    for (const auto& t : tasks_) std::printf(" %9s", t.substr(0, 9).c_str());
    std::printf(" %7s %7s %10s %10s %10s\n", "avg", "chrF", "params", "effective", "tok/s");
    for (const auto& r : rows_) {
      std::printf("%-22s", r.name.c_str());
      for (double b : r.bleu) std::printf(" %9.2f", b);
      std::printf(" %7.2f %7.2f %10lld %10lld %10.0f  %s\n", r.average, r.chrf, static_cast<long long>(r.total),
                  static_cast<long long>(r.effective), r.tokens_per_second, r.note.c_str());
    }
  }

 private:
  [[nodiscard]] std::string header() const {
    std::string h = "model";
    for (const auto& t : tasks_) h += ",bleu_" + t;
    return h + ",bleu_avg,chrf,params_total,params_effective,decode_tok_per_s,train_s,note";
  }

  void write() const {
    std::ofstream csv(dir_ / "results.csv"), md(dir_ / "results.md");
    csv << header() << '\n';
    md << "| model |";
    for (const auto& t : tasks_) md << " BLEU " << t << " |";
    md << " avg | chrF | params | effective | decode tok/s | note |\n|---|";
    for (std::size_t i = 0; i < tasks_.size() + 6; ++i) md << "---:|";
    md << '\n';
    for (const auto& r : rows_) {
      csv << r.name;
      md << "| " << r.name << " |";
      for (double b : r.bleu) {
        csv << ',' << b;
        char cell[32];
        std::snprintf(cell, sizeof cell, " %.2f |", b);
        md << cell;
      }
      char tail[256];
      std::snprintf(tail, sizeof tail, " %.2f | %.2f | %lld | %lld | %.0f | %s |", r.average, r.chrf,
                    static_cast<long long>(r.total), static_cast<long long>(r.effective), r.tokens_per_second,
                    r.note.c_str());
      md << tail << '\n';
      csv << ',' << r.average << ',' << r.chrf << ',' << r.total << ',' << r.effective << ',' << r.tokens_per_second
          << ',' << r.train_seconds << ',' << r.note << '\n';
    }
  }

  fs::path dir_;
  std::vector<std::string> tasks_;
  std::vector<Row> rows_;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    const Flags f = parse(argc, argv);
    fs::create_directories(f.out);
    CpuContext ctx(f.threads);
    const Data d = prepare(f);
    d.tokenizer.save(fs::path(f.out) / "tokenizer.model");
    std::printf("tasks:");
    for (std::size_t t = 0; t < d.tasks.size(); ++t) std::printf(" %s (%zu)", d.tasks[t].c_str(), d.train[t].size());
    std::printf("; vocabulary %lld; test %zu sentences per task\n", static_cast<long long>(d.tokenizer.vocab_size()),
                d.test.empty() ? std::size_t{0} : d.test[0].size());
    std::fflush(stdout);
    const auto cfg = config_for(f, d);
    const auto dev = dev_batches(d);
    const auto curves_path = fs::path(f.out) / "curves.csv";
    const bool curves_exist = f.append && fs::exists(curves_path);
    std::ofstream curves(curves_path, curves_exist ? std::ios::app : std::ios::trunc);
    if (!curves_exist) curves << "model,step,train_loss,val_loss\n";
    const auto wanted = [&](const std::string& m) {
      return std::find(f.models.begin(), f.models.end(), m) != f.models.end();
    };
    Results rows(f, d.tasks);

    if (wanted("dense")) {
      nn::DenseTransformer<> m(cfg);
      m.init(f.seed);
      rows.add(run(ctx, "dense", m, f, d, dev, curves));
    }
    if (wanted("token") || wanted("student")) {
      nn::TokenToken<kExperts> teacher(cfg);
      teacher.init(f.seed);
      rows.add(run(ctx, "token/token", teacher, f, d, dev, curves));
      // The paper's gating analysis: the fraction of each task's decoder tokens routed to each expert.
      std::vector<BatchTensors> usage_batches;
      for (std::size_t t = 0; t < d.test.size(); ++t) {
        std::vector<data::BatchRow> r;
        for (std::size_t i = 0; i < std::min<std::size_t>(d.test[t].size(), 64); ++i) {
          r.push_back({static_cast<std::int32_t>(t), static_cast<std::int64_t>(i)});
        }
        usage_batches.push_back(make_batch(d.test, r));
      }
      std::vector<nn::Batch> views;
      for (const auto& b : usage_batches) views.push_back(b.batch());
      std::ofstream usage(fs::path(f.out) / "usage.csv");
      extract::expert_usage(ctx, teacher, views).write_csv(usage);
      if (wanted("student")) {
        // A dense student: the teacher's non-expert weights (every parameter whose name and shape match), then
        // word-level distillation.
        nn::DenseTransformer<> student(cfg);
        student.init(f.seed + 1);
        auto from = teacher.parameters();
        for (auto& p : student.parameters()) {
          for (const auto& q : from) {
            if (q.name == p.name && q.view.shape() == p.view.shape()) {
              std::copy_n(q.view.data(), q.view.numel(), p.view.data());
            }
          }
        }
        Row row;
        row.name = "student (dense)";
        row.train_seconds = train_model(ctx, row.name, student, f, d, dev, curves, &teacher);
        row.total = nn::DenseTransformer<>::parameter_count(cfg).total;
        row.effective = row.total;
        row.note = "distilled from token/token";
        score(row, d, translate(ctx, student, d, row.tokens_per_second));
        rows.add(row);
      }
    }
    if (wanted("sentence")) {
      nn::SentenceSentence<kExperts> m(cfg);
      m.init(f.seed);
      rows.add(run(ctx, "sentence/sentence", m, f, d, dev, curves));
    }
    if (wanted("task")) {
      nn::TaskTask<kExperts> m(cfg);
      m.init(f.seed);
      rows.add(run(ctx, "task/task", m, f, d, dev, curves));
    }
    if (wanted("token-task")) {
      nn::TokenTask<kExperts> m(cfg);
      m.init(f.seed);
      rows.add(run(ctx, "token/task", m, f, d, dev, curves));
      const auto full_ids = [&] {
        double unused = 0;
        return translate(ctx, m, d, unused);
      }();
      // Each task's extracted sub-network decodes its own test sentences; its translations must be the full model's.
      Row sub;
      sub.name = "token/task extracted";
      std::vector<std::vector<std::vector<std::int32_t>>> ids(d.tasks.size());
      double seconds = 0, tokens = 0;
      bool identical = true;
      for (std::size_t t = 0; t < d.tasks.size(); ++t) {
        auto net = extract::subnetwork(ctx, m, static_cast<std::int64_t>(t));
        double tps = 0;
        auto one = translate(ctx, net, d, tps, static_cast<std::int64_t>(t));
        ids[t] = std::move(one[t]);
        identical = identical && ids[t] == full_ids[t];
        std::int64_t n = 0;
        for (const auto& s : ids[t]) n += static_cast<std::int64_t>(s.size()) + 1;
        tokens += static_cast<double>(n);
        seconds += static_cast<double>(n) / tps;
        if (t == 0) {
          using Sub = extract::subnetwork_t<nn::TokenTask<kExperts>>;
          sub.total = Sub::parameter_count(net.config()).total;
          sub.effective = effective_parameters<Sub>(net.config());
        }
      }
      sub.tokens_per_second = tokens / seconds;
      sub.note = identical ? "same translations as the full model" : "translations DIFFER from the full model";
      score(sub, d, ids);
      rows.add(sub);
    }
    rows.print();
    // The share of the MoE-over-dense gain the student keeps (paper-spec 1.11), both ways.
    const Row *dense = rows.find("dense"), *teacher = rows.find("token/token"), *student = rows.find("student (dense)"),
              *tt = rows.find("token/task");
    const auto share = [&](const Row* moe) {
      const double gain = moe->average - dense->average;
      return gain > 0 ? std::to_string(100.0 * (student->average - dense->average) / gain).substr(0, 5) + "%"
                      : std::string("n/a (no gain over dense)");
    };
    if (dense && teacher && student) {
      std::printf("\ndistillation keeps %s of the token/token gain over dense", share(teacher).c_str());
      if (tt) std::printf("; %s of the token/task gain", share(tt).c_str());
      std::printf("\n");
    }
    curves.close();
    std::printf("\npictures:\n");
    std::fflush(stdout);
    // The pictures, if Python with matplotlib is here (plot.py sits beside this file).
    const std::string plot = std::string(TMOE_MULTILINGUAL_DIR) + "/plot.py";
    const std::string command = "python3 -c 'import matplotlib' 2>/dev/null && python3 '" + plot + "' '" + f.out + "'";
    if (std::system(command.c_str()) != 0) std::printf("(no pictures: python3 with matplotlib is not available)\n");
    std::printf("\nwrote %s/results.md, results.csv, curves.csv%s\n", f.out.c_str(),
                fs::exists(fs::path(f.out) / "usage.csv") ? ", usage.csv" : "");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nmultilingual: error: %s\n", e.what());
    return 1;
  }
}
