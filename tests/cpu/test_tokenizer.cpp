// data/sentencepiece.hpp: a joint model trained on generated text, round trips, tags as single pieces, save and load.
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tmoe/data/sentencepiece.hpp"
#include "tmoe/data/synthetic.hpp"

using namespace tmoe;
using namespace tmoe::data;

TEST_SUITE("data") {
  TEST_CASE("SentencePiece: a joint model round-trips every line, keeps tags whole, and saves and loads") {
    const auto corpus = generate_synthetic({.tasks = 3, .train = 600, .dev = 0, .test = 20, .seed = 5});
    std::vector<std::string> lines = corpus.train.source;
    for (const auto& t : corpus.train.targets) lines.insert(lines.end(), t.begin(), t.end());
    std::vector<std::string> tags;
    for (const auto& name : corpus.train.tasks) tags.push_back(Tokenizer::tag(name));
    const Tokenizer tok = Tokenizer::train(lines, {.vocab_size = 300, .tags = tags});
    CHECK(tok.vocab_size() <= 300);
    CHECK(tok.vocab_size() > 100);

    // Round trips on held-out lines of every language.
    std::vector<const std::vector<std::string>*> sides = {&corpus.test.source};
    for (const auto& t : corpus.test.targets) sides.push_back(&t);
    for (const auto* side : sides) {
      for (const auto& line : *side) {
        const auto ids = tok.encode(line);
        CHECK(!ids.empty());
        CHECK(tok.decode(ids) == line);
      }
    }
    // A tag is one piece, distinct from the special ids.
    const std::int32_t xb = tok.id("<2xb>");
    CHECK(xb > Tokenizer::kUnk);
    const auto tagged = tok.encode("<2xb> " + corpus.test.source[0]);
    CHECK(std::count(tagged.begin(), tagged.end(), xb) == 1);
    CHECK_THROWS_AS(static_cast<void>(tok.id("<2zz>")), ShapeError);
    // Special ids are skipped by decode.
    auto with_specials = tok.encode(corpus.test.source[1]);
    with_specials.insert(with_specials.begin(), Tokenizer::kBos);
    with_specials.push_back(Tokenizer::kEos);
    with_specials.push_back(Tokenizer::kPad);
    CHECK(tok.decode(with_specials) == corpus.test.source[1]);

    // Save, load: the same ids.
    const auto path = std::filesystem::path(TMOE_TEST_TMPDIR) / "tokenizer_roundtrip.model";
    tok.save(path);
    const Tokenizer again = Tokenizer::load(path);
    CHECK(again.encode(corpus.test.targets[2][3]) == tok.encode(corpus.test.targets[2][3]));
    // Training is deterministic.
    const Tokenizer twin = Tokenizer::train(lines, {.vocab_size = 300, .tags = tags});
    CHECK(twin.encode(corpus.test.targets[1][4]) == tok.encode(corpus.test.targets[1][4]));

    // Errors: a missing file, a file that is not a model, no training text.
    CHECK_THROWS_AS(static_cast<void>(Tokenizer::load(std::filesystem::path(TMOE_TEST_TMPDIR) / "missing.model")),
                    IoError);
    const auto junk = std::filesystem::path(TMOE_TEST_TMPDIR) / "tokenizer_junk.model";
    std::ofstream(junk) << "not a model";
    CHECK_THROWS_AS(static_cast<void>(Tokenizer::load(junk)), IoError);
    CHECK_THROWS_AS(static_cast<void>(Tokenizer::train({}, {})), Error);
  }

}  // TEST_SUITE
