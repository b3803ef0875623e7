// BLEU, chrF and the 13a tokenizer on hand-checked cases (tests/python/crosscheck_sacrebleu.py compares them with
// sacrebleu itself on 30 more).
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tmoe/eval/bleu.hpp"
#include "tmoe/eval/chrf.hpp"

using namespace tmoe;
using namespace tmoe::eval;

TEST_SUITE("eval") {
  TEST_CASE("13a tokenization: punctuation, numbers, entities, Unicode whitespace") {
    CHECK(tokenize_13a("Hello, world!") == "Hello , world !");
    CHECK(tokenize_13a("1,000. 3.14 10-20") == "1,000 . 3.14 10 - 20");
    CHECK(tokenize_13a("a-b (c) x/y") == "a-b ( c ) x / y");
    CHECK(tokenize_13a("&lt;b&gt; &amp; &quot;q&quot;") == "< b > & \" q \"");
    CHECK(tokenize_13a("it's") == "it's");
    CHECK(tokenize_13a("caf\xC3\xA9,\xC2\xA0na\xC3\xAFve") == "caf\xC3\xA9 , na\xC3\xAFve");  // NBSP splits
    CHECK(tokenize_13a("  ").empty());
  }

  TEST_CASE("BLEU: identity is 100, no match is 0, and the n-gram arithmetic of a small case") {
    CHECK(corpus_bleu({"the cat sat on the mat"}, {{"the cat sat on the mat"}}).score == doctest::Approx(100.0));
    CHECK(corpus_bleu({"a b c d"}, {{"w x y z"}}).score == 0.0);
    CHECK(corpus_bleu({}, {{}}).score == 0.0);

    // Hypothesis "the cat sat on a mat" (6 words) against "the cat sat on the mat": matches 5/6, 3/5, 2/4, 1/3.
    const BleuScore s = corpus_bleu({"the cat sat on a mat"}, {{"the cat sat on the mat"}});
    CHECK(s.correct == std::array<std::int64_t, 4>{5, 3, 2, 1});
    CHECK(s.total == std::array<std::int64_t, 4>{6, 5, 4, 3});
    const double want =
        100.0 * std::exp((std::log(5.0 / 6) + std::log(3.0 / 5) + std::log(2.0 / 4) + std::log(1.0 / 3)) / 4);
    CHECK(s.score == doctest::Approx(want).epsilon(1e-12));
    CHECK(s.brevity_penalty == 1.0);

    // No 4-gram matches: exponential smoothing gives p4 = 100 / (2 * total4).
    const BleuScore t = corpus_bleu({"the cat sat on mat"}, {{"the cat sat at mat"}});
    CHECK(t.correct[3] == 0);
    CHECK(t.precisions[3] == doctest::Approx(100.0 / (2.0 * 2.0)));

    // A short hypothesis is penalized: BP = exp(1 - 6 / 3).
    const BleuScore u = corpus_bleu({"the cat sat"}, {{"the cat sat on the mat"}});
    CHECK(u.brevity_penalty == doctest::Approx(std::exp(1.0 - 2.0)));

    // The closest reference length counts, ties to the shorter one.
    const BleuScore v = corpus_bleu({"a b c d"}, {{"a b c"}, {"a b c d e"}});
    CHECK(v.ref_len == 3);
  }

  TEST_CASE("chrF: identity is 100, disjoint characters are 0, and a one-character change") {
    CHECK(corpus_chrf({"abc def"}, {{"abcdef"}}) == doctest::Approx(100.0));  // whitespace is ignored
    CHECK(corpus_chrf({"xyz"}, {{"abc"}}) == 0.0);
    // "ab" vs "ac": order 1 matches 1 of 2 both ways, order 2 matches 0 of 1; orders 3-6 absent on both sides.
    // Averages over the 2 orders present: P = R = 0.25, so F = 0.25.
    CHECK(corpus_chrf({"ab"}, {{"ac"}}) == doctest::Approx(25.0));
  }

  TEST_CASE("reference streams must match the hypotheses") {
    CHECK_THROWS_AS(static_cast<void>(corpus_bleu({"a"}, {})), ShapeError);
    CHECK_THROWS_AS(static_cast<void>(corpus_bleu({"a", "b"}, {{"a"}})), ShapeError);
    CHECK_THROWS_AS(static_cast<void>(corpus_chrf({"a"}, {{"a"}, {}})), ShapeError);
  }

}  // TEST_SUITE
