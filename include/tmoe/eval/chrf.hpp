#pragma once
/// @file chrf.hpp
/// @brief Corpus chrF as sacreBLEU computes it by default: character n-grams of orders 1 to 6 over the text with its
/// whitespace removed, beta = 2, no word n-grams, statistics summed over the corpus, and the F-score of the precision
/// and recall averaged over the orders both sides have (sacreBLEU's "effective order").
///
/// @code
/// const double chrf = tmoe::eval::corpus_chrf(hypotheses, {references});   // in [0, 100]
/// @endcode

#include <array>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "tmoe/core/error.hpp"
#include "tmoe/eval/text.hpp"

namespace tmoe::eval {

namespace detail {

constexpr int kChrfOrder = 6;
constexpr double kChrfBeta = 2.0;

/// Per order: the character n-gram counts of a line without its whitespace.
inline std::array<std::unordered_map<std::u32string, std::int64_t>, kChrfOrder> char_ngrams(const std::string& line) {
  std::u32string text;
  for (const auto& w : split(utf8_decode(line))) text += w;
  std::array<std::unordered_map<std::u32string, std::int64_t>, kChrfOrder> out;
  for (int n = 1; n <= kChrfOrder; ++n) {
    for (std::size_t i = 0; i + static_cast<std::size_t>(n) <= text.size(); ++i) {
      ++out[static_cast<std::size_t>(n - 1)][text.substr(i, static_cast<std::size_t>(n))];
    }
  }
  return out;
}

/// (hypothesis, reference, matched) n-gram counts per order; the hypothesis count is 0 where the reference has no
/// n-gram of that order, as in sacreBLEU.
using ChrfStats = std::array<std::int64_t, 3 * kChrfOrder>;

inline ChrfStats chrf_stats(const std::array<std::unordered_map<std::u32string, std::int64_t>, kChrfOrder>& hyp,
                            const std::array<std::unordered_map<std::u32string, std::int64_t>, kChrfOrder>& ref) {
  ChrfStats s{};
  for (std::size_t n = 0; n < kChrfOrder; ++n) {
    std::int64_t h = 0, r = 0, m = 0;
    for (const auto& [g, c] : hyp[n]) {
      h += c;
      const auto it = ref[n].find(g);
      if (it != ref[n].end()) m += c < it->second ? c : it->second;
    }
    for (const auto& [g, c] : ref[n]) r += c;
    s[3 * n] = ref[n].empty() ? 0 : h;
    s[3 * n + 1] = r;
    s[3 * n + 2] = m;
  }
  return s;
}

inline double chrf_from_stats(const ChrfStats& s) {
  const double factor = kChrfBeta * kChrfBeta;
  double avg_prec = 0, avg_rec = 0;
  int effective = 0;
  for (std::size_t n = 0; n < kChrfOrder; ++n) {
    const auto h = s[3 * n], r = s[3 * n + 1], m = s[3 * n + 2];
    if (h > 0 && r > 0) {
      avg_prec += static_cast<double>(m) / static_cast<double>(h);
      avg_rec += static_cast<double>(m) / static_cast<double>(r);
      ++effective;
    }
  }
  if (effective == 0) return 0.0;
  avg_prec /= effective;
  avg_rec /= effective;
  if (avg_prec + avg_rec == 0) return 0.0;
  return 100.0 * (1 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec);
}

}  // namespace detail

/// chrF of `hypotheses` against one or more reference streams; per line the reference with the best F-score counts.
/// @throws ShapeError if no reference stream is given or a stream's length differs from the hypotheses'.
inline double corpus_chrf(const std::vector<std::string>& hypotheses,
                          const std::vector<std::vector<std::string>>& references) {
  check_reference_streams("corpus_chrf", hypotheses, references);
  detail::ChrfStats total{};
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    const auto hyp = detail::char_ngrams(hypotheses[i]);
    detail::ChrfStats best{};
    double best_f = -1;
    for (const auto& stream : references) {
      const auto s = detail::chrf_stats(hyp, detail::char_ngrams(stream[i]));
      const double f = detail::chrf_from_stats(s);
      if (f > best_f) {
        best_f = f;
        best = s;
      }
    }
    for (std::size_t k = 0; k < best.size(); ++k) total[k] += best[k];
  }
  return detail::chrf_from_stats(total);
}

}  // namespace tmoe::eval
