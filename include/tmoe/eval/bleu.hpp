#pragma once
/// @file bleu.hpp
/// @brief Corpus BLEU as sacreBLEU computes it by default: mteval-v13a tokenization, n-grams up to 4, the closest
/// reference length (ties to the shorter), exponential ("exp", NIST) smoothing, no lowercasing.
///
/// @code
/// const auto s = tmoe::eval::corpus_bleu(hypotheses, {references});   // s.score in [0, 100]
/// @endcode

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tmoe/core/error.hpp"
#include "tmoe/eval/text.hpp"

namespace tmoe::eval {

/// mteval-v13a tokenization as sacreBLEU's Tokenizer13a: drop "<skipped>", join "-\n" hyphenations, unescape four
/// HTML entities, pad ASCII punctuation and symbols with spaces, split periods and commas off unless next to a digit,
/// split a dash after a digit, and rejoin the words with single spaces (Python's whitespace).
inline std::string tokenize_13a(std::string_view text) {
  std::string line(text);
  const auto replace_all = [&line](std::string_view from, std::string_view to) {
    std::string out;
    std::size_t i = 0;
    for (std::size_t j; (j = line.find(from, i)) != std::string::npos; i = j + from.size()) {
      out.append(line, i, j - i);
      out.append(to);
    }
    out.append(line, i, std::string::npos);
    line = std::move(out);
  };
  replace_all("<skipped>", "");
  replace_all("-\n", "");
  replace_all("\n", " ");
  if (line.find('&') != std::string::npos) {
    replace_all("&quot;", "\"");
    replace_all("&amp;", "&");
    replace_all("&lt;", "<");
    replace_all("&gt;", ">");
  }
  line = " " + line + " ";
  // The four substitutions work on bytes: their patterns are ASCII, and a multi-byte character never matches them.
  const auto digit = [](char c) { return c >= '0' && c <= '9'; };
  const auto symbol = [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return (u >= 0x7B && u <= 0x7E) || (u >= 0x5B && u <= 0x60) || (u >= 0x20 && u <= 0x26) ||
           (u >= 0x28 && u <= 0x2B) || (u >= 0x3A && u <= 0x40) || u == 0x2F;
  };
  const auto period_comma = [](char c) { return c == '.' || c == ','; };
  std::string a;
  for (char c : line) {
    if (symbol(c)) {
      a += ' ';
      a += c;
      a += ' ';
    } else {
      a += c;
    }
  }
  // (non-digit)(.|,) -> "\1 \2 ", left to right without overlap, as re.sub does.
  std::string b;
  for (std::size_t i = 0; i < a.size();) {
    if (i + 1 < a.size() && !digit(a[i]) && period_comma(a[i + 1])) {
      b += a[i];
      b += ' ';
      b += a[i + 1];
      b += ' ';
      i += 2;
    } else {
      b += a[i++];
    }
  }
  // (.|,)(non-digit) -> " \1 \2".
  std::string c;
  for (std::size_t i = 0; i < b.size();) {
    if (i + 1 < b.size() && period_comma(b[i]) && !digit(b[i + 1])) {
      c += ' ';
      c += b[i];
      c += ' ';
      c += b[i + 1];
      i += 2;
    } else {
      c += b[i++];
    }
  }
  // (digit)(-) -> "\1 \2 ".
  std::string d;
  for (std::size_t i = 0; i < c.size();) {
    if (i + 1 < c.size() && digit(c[i]) && c[i + 1] == '-') {
      d += c[i];
      d += " - ";
      i += 2;
    } else {
      d += c[i++];
    }
  }
  std::u32string joined;
  for (const auto& w : split(utf8_decode(d))) {
    if (!joined.empty()) joined += U' ';
    joined += w;
  }
  return utf8_encode(joined);
}

/// A BLEU score and its sufficient statistics.
struct BleuScore {
  static constexpr int kOrder = 4;
  double score = 0;                         ///< in [0, 100]
  std::array<double, kOrder> precisions{};  ///< per order, in percent (smoothed where no n-gram matched)
  double brevity_penalty = 0;
  std::int64_t sys_len = 0, ref_len = 0;
  std::array<std::int64_t, kOrder> correct{}, total{};
};

namespace detail {

/// n-gram counts (orders 1 to 4) of a tokenized line, keyed by the words joined with single spaces.
inline std::unordered_map<std::string, std::int64_t> word_ngrams(const std::vector<std::string>& words) {
  std::unordered_map<std::string, std::int64_t> counts;
  for (int n = 1; n <= BleuScore::kOrder; ++n) {
    for (std::size_t i = 0; i + static_cast<std::size_t>(n) <= words.size(); ++i) {
      std::string key = std::to_string(n);
      for (int k = 0; k < n; ++k) {
        key += ' ';
        key += words[i + static_cast<std::size_t>(k)];
      }
      ++counts[key];
    }
  }
  return counts;
}

inline std::vector<std::string> bleu_words(std::string_view line) {
  const std::string tok = tokenize_13a(utf8_encode(rstrip(utf8_decode(line))));
  std::vector<std::string> words;
  for (const auto& w : split(utf8_decode(tok))) words.push_back(utf8_encode(w));
  return words;
}

inline int ngram_order(const std::string& key) { return key[0] - '0'; }

}  // namespace detail

/// BLEU of `hypotheses` against one or more reference streams, each parallel to the hypotheses.
/// @throws ShapeError if no reference stream is given or a stream's length differs from the hypotheses'.
inline BleuScore corpus_bleu(const std::vector<std::string>& hypotheses,
                             const std::vector<std::vector<std::string>>& references) {
  check_reference_streams("corpus_bleu", hypotheses, references);
  BleuScore s;
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    // Reference n-gram counts: the maximum over the references; the reference length closest to the hypothesis'.
    std::unordered_map<std::string, std::int64_t> ref_counts;
    std::vector<std::int64_t> ref_lens;
    for (const auto& stream : references) {
      const auto words = detail::bleu_words(stream[i]);
      ref_lens.push_back(static_cast<std::int64_t>(words.size()));
      for (const auto& [g, c] : detail::word_ngrams(words)) {
        auto& m = ref_counts[g];
        m = c > m ? c : m;
      }
    }
    const auto hyp = detail::bleu_words(hypotheses[i]);
    const auto hyp_len = static_cast<std::int64_t>(hyp.size());
    std::int64_t closest = -1, best = -1;
    for (std::int64_t len : ref_lens) {
      const std::int64_t diff = len > hyp_len ? len - hyp_len : hyp_len - len;
      if (best < 0 || diff < best || (diff == best && len < closest)) {
        best = diff;
        closest = len;
      }
    }
    s.sys_len += hyp_len;
    s.ref_len += closest;
    for (const auto& [g, c] : detail::word_ngrams(hyp)) {
      const int n = detail::ngram_order(g) - 1;
      s.total[static_cast<std::size_t>(n)] += c;
      const auto it = ref_counts.find(g);
      if (it != ref_counts.end()) s.correct[static_cast<std::size_t>(n)] += c < it->second ? c : it->second;
    }
  }
  s.brevity_penalty = 1.0;
  if (s.sys_len < s.ref_len) {
    s.brevity_penalty =
        s.sys_len > 0 ? std::exp(1.0 - static_cast<double>(s.ref_len) / static_cast<double>(s.sys_len)) : 0.0;
  }
  bool any = false;
  for (auto c : s.correct) any = any || c > 0;
  if (!any) return s;
  double smooth = 1.0;
  for (int n = 0; n < BleuScore::kOrder; ++n) {
    const auto un = static_cast<std::size_t>(n);
    if (s.total[un] == 0) break;
    if (s.correct[un] == 0) {
      smooth *= 2;
      s.precisions[un] = 100.0 / (smooth * static_cast<double>(s.total[un]));
    } else {
      s.precisions[un] = 100.0 * static_cast<double>(s.correct[un]) / static_cast<double>(s.total[un]);
    }
  }
  double log_sum = 0;
  for (double p : s.precisions) log_sum += p > 0 ? std::log(p) : -9999999999.0;
  s.score = s.brevity_penalty * std::exp(log_sum / BleuScore::kOrder);
  return s;
}

}  // namespace tmoe::eval
