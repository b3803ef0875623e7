// data/: the synthetic corpus generator, the multi-way corpus reader and its misalignment errors, temperature
// sampling and the length-bucketed batcher.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tmoe/data/batching.hpp"
#include "tmoe/data/corpus.hpp"
#include "tmoe/data/synthetic.hpp"

using namespace tmoe;
using namespace tmoe::data;

namespace {

std::size_t words(const std::string& s) {
  std::istringstream in(s);
  std::size_t n = 0;
  for (std::string w; in >> w;) ++n;
  return n;
}

/// A fresh directory under the test temp dir (test cases run in parallel: one directory each).
std::filesystem::path fresh_dir(const std::string& name) {
  const auto d = std::filesystem::path(TMOE_TEST_TMPDIR) / ("data_" + name);
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d / "train");
  return d;
}

void write(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

}  // namespace

TEST_SUITE("data") {
  TEST_CASE("the synthetic corpus is a pure function of its seed, multi-way parallel, with distinct languages") {
    const SyntheticOptions o{.tasks = 5, .train = 300, .dev = 40, .test = 37, .seed = 11};
    const auto a = generate_synthetic(o), b = generate_synthetic(o);
    CHECK(a.train.source == b.train.source);
    CHECK(a.train.targets == b.train.targets);
    CHECK(a.test.targets == b.test.targets);
    auto o2 = o;
    o2.seed = 12;
    CHECK(generate_synthetic(o2).train.source != a.train.source);

    CHECK(a.train.tasks == std::vector<std::string>{"xa", "xb", "xc", "xd", "xe"});
    CHECK(a.train.size() == 300);
    CHECK(a.dev.size() == 40);
    CHECK(a.test.size() == 37);
    for (const auto* split : {&a.train, &a.dev, &a.test}) {
      REQUIRE(split->targets.size() == 5);
      for (std::size_t t = 0; t < 5; ++t) {
        REQUIRE(split->targets[t].size() == split->source.size());
        for (std::size_t i = 0; i < split->source.size(); ++i) {
          // Every language rewrites word for word: the same number of words as the source.
          CHECK(words(split->targets[t][i]) == words(split->source[i]));
        }
      }
    }
    // Languages differ from each other on nearly every line, and the splits hold different sentences.
    for (std::size_t s = 0; s < 5; ++s) {
      for (std::size_t t = s + 1; t < 5; ++t) {
        int same = 0;
        for (std::size_t i = 0; i < 300; ++i) same += a.train.targets[s][i] == a.train.targets[t][i] ? 1 : 0;
        CHECK(same < 3);
      }
    }
    CHECK(a.dev.source.front() != a.train.source.front());
    // A Zipf-like vocabulary: the most frequent source word is far more common than the median one.
    std::map<std::string, int> freq;
    for (const auto& line : a.train.source) {
      std::istringstream in(line);
      for (std::string w; in >> w;) ++freq[w];
    }
    std::vector<int> counts;
    for (const auto& [w, c] : freq) counts.push_back(c);
    std::sort(counts.rbegin(), counts.rend());
    CHECK(counts.size() > 100);
    CHECK(counts[counts.size() / 2] * 20 < counts[2]);

    CHECK_THROWS_AS(static_cast<void>(generate_synthetic({.tasks = 0})), ShapeError);
    CHECK_THROWS_AS(static_cast<void>(generate_synthetic({.tasks = 27})), ShapeError);
  }

  TEST_CASE("the corpus reader keeps aligned lines, drops lines empty on every side, and reads CRLF files") {
    const auto d = fresh_dir("aligned");
    write(d / "train" / "src.txt", "a b\r\n\r\nc d\r\n");
    write(d / "train" / "xx.txt", "1 2\r\n\r\n3 4\r\n");
    write(d / "train" / "yy.txt", "5\n\n6");  // no final newline
    const auto c = read_multiway(d, "train", "src", {"xx", "yy"});
    CHECK(c.source == std::vector<std::string>{"a b", "c d"});
    CHECK(c.targets[0] == std::vector<std::string>{"1 2", "3 4"});
    CHECK(c.targets[1] == std::vector<std::string>{"5", "6"});
    CHECK(c.num_tasks() == 2);
  }

  TEST_CASE("the corpus reader reports misaligned files by file and line") {
    const auto d = fresh_dir("misaligned");
    write(d / "train" / "src.txt", "a\nb\nc\n");
    write(d / "train" / "short.txt", "1\n2\n");
    write(d / "train" / "hole.txt", "1\n\n3\n");
    const auto message = [&](const std::vector<std::string>& tasks) {
      try {
        static_cast<void>(read_multiway(d, "train", "src", tasks));
      } catch (const IoError& e) {
        return std::string(e.what());
      }
      return std::string("no error");
    };
    const std::string count = message({"short"});
    CHECK(count.find("src.txt has 3 lines") != std::string::npos);
    CHECK(count.find("short.txt has 2") != std::string::npos);
    const std::string hole = message({"hole"});
    CHECK(hole.find("line 2 is empty in") != std::string::npos);
    CHECK(hole.find("hole.txt") != std::string::npos);
    const std::string missing = message({"nope"});
    CHECK(missing.find("cannot open") != std::string::npos);
    CHECK(missing.find("nope.txt") != std::string::npos);
    CHECK_THROWS_AS(static_cast<void>(read_multiway(d, "train", "src", {})), ShapeError);
  }

  TEST_CASE("the real corpus, when it is beside the repository, reads as the README describes") {
    const std::filesystem::path dir = std::filesystem::path(TMOE_SHARED_DIR) / "data" / "oldi-seed";
    if (!std::filesystem::exists(dir / "train" / "eng_Latn.txt")) {
      MESSAGE("skipped: " << dir.string() << " is not there");
      return;
    }
    const auto c = read_multiway(dir, "dev", "eng_Latn", {"spa_Latn", "ita_Latn"});
    CHECK(c.size() == 516);
    CHECK(c.targets[1].size() == 516);
  }

  TEST_CASE("temperature sampling: T = 1 follows the data, T = 5 as the formula, large T is nearly uniform") {
    const auto p1 = temperature_probabilities({900, 100, 0}, 1.0);
    CHECK(p1[0] == doctest::Approx(0.9));
    CHECK(p1[1] == doctest::Approx(0.1));
    CHECK(p1[2] == 0.0);
    const auto p5 = temperature_probabilities({900, 100}, 5.0);
    const double a = std::pow(0.9, 0.2), b = std::pow(0.1, 0.2);
    CHECK(p5[0] == doctest::Approx(a / (a + b)));
    CHECK(p5[1] == doctest::Approx(b / (a + b)));
    const auto pinf = temperature_probabilities({900, 100}, 1e6);
    CHECK(pinf[0] == doctest::Approx(0.5).epsilon(1e-4));
    CHECK_THROWS_AS(static_cast<void>(temperature_probabilities({1, 2}, 0.0)), ShapeError);
    CHECK_THROWS_AS(static_cast<void>(temperature_probabilities({0, 0}, 5.0)), ShapeError);
    CHECK_THROWS_AS(static_cast<void>(temperature_probabilities({3, -1}, 5.0)), ShapeError);
  }

  TEST_CASE("the batcher: token budget, rows grouped by task, sampling frequencies, determinism, full epochs") {
    // Task 0: 800 examples, task 1: 50, task 2: 150, lengths 1..37.
    std::vector<std::vector<std::int64_t>> lengths(3);
    const std::vector<int> sizes = {800, 50, 150};
    for (std::size_t t = 0; t < 3; ++t) {
      for (int i = 0; i < sizes[t]; ++i) lengths[t].push_back(1 + (i * 7 + static_cast<int>(t)) % 37);
    }
    const BatchOptions o{.temperature = 5.0, .max_tokens = 211, .pool_batches = 8, .seed = 9};
    Batcher batcher(lengths, o), twin(lengths, o);
    auto other_options = o;
    other_options.seed = 10;
    Batcher other(lengths, other_options);
    const auto& p = batcher.probabilities();
    std::vector<double> rows_per_task(3, 0);
    std::map<std::pair<int, std::int64_t>, int> seen;
    double rows = 0;
    bool differs = false;
    for (int step = 0; step < 3000; ++step) {
      const auto b = batcher.next();
      CHECK(b == twin.next());
      differs = differs || b != other.next();
      REQUIRE(!b.empty());
      std::int64_t longest = 0;
      for (std::size_t r = 0; r < b.size(); ++r) {
        longest = std::max(longest, lengths[static_cast<std::size_t>(b[r].task)][static_cast<std::size_t>(b[r].index)]);
        if (r > 0) CHECK(b[r - 1].task <= b[r].task);
        rows_per_task[static_cast<std::size_t>(b[r].task)] += 1;
        ++seen[{b[r].task, b[r].index}];
      }
      CHECK((b.size() == 1 || longest * static_cast<std::int64_t>(b.size()) <= 211));
      rows += static_cast<double>(b.size());
    }
    CHECK(differs);
    for (std::size_t t = 0; t < 3; ++t) CHECK(rows_per_task[t] / rows == doctest::Approx(p[t]).epsilon(0.03));
    // Examples are drawn without replacement within an epoch: within a task, counts differ by at most 2 (a pool can end
    // mid-epoch), never by the spread of sampling with replacement.
    for (int t = 0; t < 3; ++t) {
      int lo = 1 << 30, hi = 0;
      for (std::int64_t i = 0; i < sizes[static_cast<std::size_t>(t)]; ++i) {
        const int c = seen[{t, i}];
        lo = std::min(lo, c);
        hi = std::max(hi, c);
      }
      CHECK(hi - lo <= 2);
      CHECK(lo >= 1);
    }
    CHECK(batcher.epoch(1) > batcher.epoch(0));  // temperature 5 revisits the small task more often

    CHECK_THROWS_AS(Batcher({}, o), ShapeError);
    CHECK_THROWS_AS(Batcher({{1, 0, 2}}, o), ShapeError);
    CHECK_THROWS_AS(Batcher({{1, 2}}, {.max_tokens = 0}), ShapeError);
  }

}  // TEST_SUITE
