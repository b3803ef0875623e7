#pragma once
/// @file synthetic.hpp
/// @brief The built-in multi-task translation corpus: a deterministic generator of multi-way parallel text.
///
/// Sources come from one small grammar over an English-like pseudo-language:
///   S -> NP V NP [P NP],  NP -> D A{0,2} N
/// with words drawn from a Zipf-like distribution per category (rank r has weight 1 / (r + 1)). Every target
/// "language" (task) rewrites a source by rules of three kinds, some shared within a family of two languages and
/// some its own, so tasks have something to share and something to fight over:
///  - a lexicon: each lemma maps to a family cognate (same root, the language's own ending) or to a word of its own;
///  - word order: the family fixes the verb position (SVO, SOV or VSO) and the adjective position; each language
///    decides whether the prepositional phrase comes first;
///  - agreement: every noun has one of three classes; determiners and adjectives take the language's suffix for the
///    noun's class, and in two languages of three the verb agrees with its subject's class.
/// Everything is a pure function of the seed and the sentence index (Philox counters), so a corpus is identical on
/// every machine and thread count.
///
/// @code
/// const auto corpus = tmoe::data::generate_synthetic({.tasks = 4, .train = 4000, .seed = 7});
/// // corpus.train.source[i] and corpus.train.targets[t][i] for t in [0, 4)
/// @endcode

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tmoe/core/error.hpp"
#include "tmoe/core/random.hpp"
#include "tmoe/data/corpus.hpp"

namespace tmoe::data {

struct SyntheticOptions {
  std::int64_t tasks = 4;     ///< target languages, at most 26
  std::int64_t train = 4000;  ///< sentences per split, shared by every task (multi-way parallel)
  std::int64_t dev = 300;
  std::int64_t test = 300;
  std::int64_t nouns = 160;  ///< lemmas per category
  std::int64_t adjectives = 60;
  std::int64_t verbs = 80;
  std::uint64_t seed = 1;
};

/// The three splits of a generated corpus; the tasks are named "xa", "xb", ...
struct SyntheticCorpus {
  MultiwayCorpus train, dev, test;
};

namespace detail {

enum class Category : std::uint32_t { kNoun, kAdjective, kVerb, kDeterminer, kPreposition };

constexpr std::array<const char*, 14> kConsonants = {"k", "t", "m", "n", "r", "s", "l",
                                                     "v", "d", "b", "p", "g", "f", "z"};
constexpr std::array<const char*, 5> kVowels = {"a", "e", "i", "o", "u"};

/// Philox stream tags: every draw names what it is for.
enum Stream : std::uint64_t { kWord = 1, kSentence = 2, kClass = 3, kCognate = 4, kEnding = 5 };

/// A uniform [0, 1) draw addressed by (stream, a, b, c).
inline double draw(const Philox& rng, Stream stream, std::uint64_t a, std::uint64_t b, std::uint64_t c = 0) {
  const auto w = rng.block(static_cast<std::uint32_t>(a), static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(c),
                           static_cast<std::uint32_t>(stream));
  return uniform01(w[0], w[1]);
}

/// A pseudo-word of 1 + (extra) consonant-vowel syllables for (owner, category, lemma).
inline std::string pseudo_word(const Philox& rng, std::uint64_t owner, Category cat, std::uint64_t lemma,
                               int syllables) {
  std::string w;
  for (int s = 0; s < syllables; ++s) {
    const double u =
        draw(rng, kWord, owner * 8 + static_cast<std::uint64_t>(cat), lemma, static_cast<std::uint64_t>(s));
    const auto ci = static_cast<std::size_t>(u * kConsonants.size());
    const auto vi = static_cast<std::size_t>(
        draw(rng, kWord, owner * 8 + static_cast<std::uint64_t>(cat), lemma, static_cast<std::uint64_t>(s) + 100) *
        kVowels.size());
    w += kConsonants[std::min(ci, kConsonants.size() - 1)];
    w += kVowels[std::min(vi, kVowels.size() - 1)];
  }
  return w;
}

/// Zipf-like sampling over `n` ranks: weight 1 / (r + 1).
class Zipf {
 public:
  explicit Zipf(std::int64_t n) : cdf_(static_cast<std::size_t>(n)) {
    double acc = 0;
    for (std::int64_t r = 0; r < n; ++r) {
      acc += 1.0 / static_cast<double>(r + 1);
      cdf_[static_cast<std::size_t>(r)] = acc;
    }
    for (auto& c : cdf_) c /= acc;
  }
  [[nodiscard]] std::int64_t operator()(double u) const {
    const auto it = std::upper_bound(cdf_.begin(), cdf_.end(), u);
    return std::min<std::int64_t>(it - cdf_.begin(), static_cast<std::int64_t>(cdf_.size()) - 1);
  }

 private:
  std::vector<double> cdf_;
};

/// One noun phrase of a source sentence, as lemma indices.
struct NounPhrase {
  bool definite = true;
  std::vector<std::int64_t> adjectives;
  std::int64_t noun = 0;
};

/// One source sentence: subject, verb, object, optional prepositional phrase.
struct Clause {
  NounPhrase subject, object;
  std::int64_t verb = 0;
  bool has_pp = false;
  std::int64_t preposition = 0;
  NounPhrase pp_object;
};

constexpr std::int64_t kPrepositions = 6;
constexpr int kClasses = 3;
constexpr std::uint64_t kSourceOwner = 1000;

/// A language's rules and lexicon (the source language is the one with owner kSourceOwner and no agreement).
struct Language {
  std::uint64_t owner = kSourceOwner;
  int verb_position = 1;  // 0: V S O, 1: S V O, 2: S O V
  bool adjective_after = false;
  bool pp_first = false;
  bool verb_agrees = false;
  std::vector<std::string> nouns, adjectives, verbs;
  std::array<std::string, 2 * kClasses> determiners;  // [definite? 0 : 1][class]
  std::array<std::string, kPrepositions> prepositions;
  std::array<std::string, kClasses> adjective_suffix, verb_suffix;
};

}  // namespace detail

/// Generates the corpus for `options`. @throws ShapeError for counts out of range.
inline SyntheticCorpus generate_synthetic(const SyntheticOptions& options) {
  using namespace detail;
  if (options.tasks < 1 || options.tasks > 26) {
    throw ShapeError("generate_synthetic: tasks must be in [1, 26], got " + std::to_string(options.tasks));
  }
  if (options.train < 0 || options.dev < 0 || options.test < 0 || options.nouns < 1 || options.adjectives < 1 ||
      options.verbs < 1) {
    throw ShapeError("generate_synthetic: split sizes must be >= 0 and lemma counts >= 1");
  }
  const Philox rng(options.seed);
  std::vector<int> noun_class(static_cast<std::size_t>(options.nouns));
  for (std::int64_t n = 0; n < options.nouns; ++n) {
    noun_class[static_cast<std::size_t>(n)] =
        std::min(kClasses - 1, static_cast<int>(draw(rng, kClass, static_cast<std::uint64_t>(n), 0) * kClasses));
  }

  // The source language: two or three syllables a word, English-like order, no agreement.
  const auto lexicon = [&](Language& lang, std::uint64_t family, bool source) {
    const auto word = [&](Category cat, std::int64_t lemma, int syllables) {
      if (source) return pseudo_word(rng, kSourceOwner, cat, static_cast<std::uint64_t>(lemma), syllables);
      // A family cognate (shared root, the language's own final vowel) for 60% of the lemmas, else its own word.
      const bool cognate = draw(rng, kCognate, family,
                                static_cast<std::uint64_t>(cat) * 100000 + static_cast<std::uint64_t>(lemma)) < 0.6;
      std::string w =
          pseudo_word(rng, cognate ? 100 + family : lang.owner, cat, static_cast<std::uint64_t>(lemma), syllables);
      if (cognate) w.back() = kVowels[lang.owner % kVowels.size()][0];
      return w;
    };
    for (std::int64_t i = 0; i < options.nouns; ++i) lang.nouns.push_back(word(Category::kNoun, i, 2 + (i % 2)));
    for (std::int64_t i = 0; i < options.adjectives; ++i) lang.adjectives.push_back(word(Category::kAdjective, i, 2));
    for (std::int64_t i = 0; i < options.verbs; ++i) lang.verbs.push_back(word(Category::kVerb, i, 2 + (i % 2)));
    for (std::int64_t i = 0; i < kPrepositions; ++i) {
      lang.prepositions[static_cast<std::size_t>(i)] = word(Category::kPreposition, i, 1);
    }
  };
  Language source;
  lexicon(source, 0, true);
  source.determiners = {"the", "the", "the", "a", "a", "a"};
  std::vector<Language> targets(static_cast<std::size_t>(options.tasks));
  for (std::int64_t t = 0; t < options.tasks; ++t) {
    Language& l = targets[static_cast<std::size_t>(t)];
    const auto family = static_cast<std::uint64_t>(t / 2);
    l.owner = static_cast<std::uint64_t>(t);
    l.verb_position = static_cast<int>((family + 1) % 3);
    l.adjective_after = family % 2 == 0;
    l.pp_first = t % 2 == 1;
    l.verb_agrees = t % 3 != 0;
    lexicon(l, family, false);
    for (int c = 0; c < kClasses; ++c) {
      const auto uc = static_cast<std::size_t>(c);
      l.determiners[uc] = pseudo_word(rng, l.owner, Category::kDeterminer, uc, 1);
      l.determiners[kClasses + uc] = pseudo_word(rng, l.owner, Category::kDeterminer, uc + 10, 1);
      l.adjective_suffix[uc] = pseudo_word(rng, l.owner, Category::kAdjective, 900 + uc, 1).substr(1);
      l.verb_suffix[uc] = pseudo_word(rng, l.owner, Category::kVerb, 900 + uc, 1);
    }
  }

  const Zipf zn(options.nouns), za(options.adjectives), zv(options.verbs), zp(kPrepositions);
  const auto clause = [&](std::uint64_t index) {
    std::uint64_t k = 0;
    const auto u = [&] { return draw(rng, kSentence, index, k++); };
    const auto phrase = [&] {
      NounPhrase np;
      np.definite = u() < 0.6;
      const double a = u();
      const int adjectives = a < 0.5 ? 0 : (a < 0.85 ? 1 : 2);
      for (int i = 0; i < adjectives; ++i) np.adjectives.push_back(za(u()));
      np.noun = zn(u());
      return np;
    };
    Clause c;
    c.subject = phrase();
    c.verb = zv(u());
    c.object = phrase();
    c.has_pp = u() < 0.5;
    c.preposition = zp(u());
    c.pp_object = phrase();
    return c;
  };
  const auto render_np = [&](const Language& l, const NounPhrase& np, bool agree) {
    const int cls = noun_class[static_cast<std::size_t>(np.noun)];
    std::string s = l.determiners[static_cast<std::size_t>((np.definite ? 0 : kClasses) + (agree ? cls : 0))];
    std::string adjs;
    for (std::int64_t a : np.adjectives) {
      adjs += ' ';
      adjs += l.adjectives[static_cast<std::size_t>(a)];
      if (agree) adjs += l.adjective_suffix[static_cast<std::size_t>(cls)];
    }
    const std::string& noun = l.nouns[static_cast<std::size_t>(np.noun)];
    return l.adjective_after ? s + ' ' + noun + adjs : s + adjs + ' ' + noun;
  };
  const auto render = [&](const Language& l, const Clause& c, bool agree) {
    const std::string subj = render_np(l, c.subject, agree), obj = render_np(l, c.object, agree);
    std::string verb = l.verbs[static_cast<std::size_t>(c.verb)];
    if (agree && l.verb_agrees)
      verb += l.verb_suffix[static_cast<std::size_t>(noun_class[static_cast<std::size_t>(c.subject.noun)])];
    std::string core = l.verb_position == 0   ? verb + ' ' + subj + ' ' + obj
                       : l.verb_position == 1 ? subj + ' ' + verb + ' ' + obj
                                              : subj + ' ' + obj + ' ' + verb;
    if (!c.has_pp) return core;
    const std::string pp =
        l.prepositions[static_cast<std::size_t>(c.preposition)] + ' ' + render_np(l, c.pp_object, agree);
    return l.pp_first ? pp + ' ' + core : core + ' ' + pp;
  };

  SyntheticCorpus out;
  const auto fill = [&](MultiwayCorpus& split, std::uint64_t first, std::int64_t count) {
    for (std::int64_t t = 0; t < options.tasks; ++t)
      split.tasks.push_back(std::string("x") + static_cast<char>('a' + t));
    split.targets.resize(static_cast<std::size_t>(options.tasks));
    for (std::int64_t i = 0; i < count; ++i) {
      const Clause c = clause(first + static_cast<std::uint64_t>(i));
      split.source.push_back(render(source, c, false));
      for (std::int64_t t = 0; t < options.tasks; ++t) {
        split.targets[static_cast<std::size_t>(t)].push_back(render(targets[static_cast<std::size_t>(t)], c, true));
      }
    }
  };
  fill(out.train, 0, options.train);
  fill(out.dev, static_cast<std::uint64_t>(options.train), options.dev);
  fill(out.test, static_cast<std::uint64_t>(options.train + options.dev), options.test);
  return out;
}

}  // namespace tmoe::data
