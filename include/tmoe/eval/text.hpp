#pragma once
/// @file text.hpp
/// @brief UTF-8 text helpers with Python's semantics, for metrics that must agree with sacreBLEU: decoding to code
/// points, Python's `str.isspace()`, `str.split()` and `str.rstrip()`.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tmoe/core/error.hpp"

namespace tmoe::eval {

/// Code points of a UTF-8 string. A malformed sequence becomes U+FFFD, so any byte string can be scored (valid UTF-8,
/// which is what sacreBLEU reads, decodes exactly as in Python).
inline std::u32string utf8_decode(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  std::size_t i = 0;
  while (i < s.size()) {
    const unsigned char b = byte(i);
    int len = 0;
    char32_t cp = 0;
    char32_t min = 0;
    if (b < 0x80) {
      out.push_back(b);
      ++i;
      continue;
    } else if ((b & 0xE0) == 0xC0) {
      len = 2, cp = b & 0x1F, min = 0x80;
    } else if ((b & 0xF0) == 0xE0) {
      len = 3, cp = b & 0x0F, min = 0x800;
    } else if ((b & 0xF8) == 0xF0) {
      len = 4, cp = b & 0x07, min = 0x10000;
    } else {
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    int k = 1;
    for (; k < len && i + static_cast<std::size_t>(k) < s.size(); ++k) {
      const unsigned char c = byte(i + static_cast<std::size_t>(k));
      if ((c & 0xC0) != 0x80) break;
      cp = (cp << 6) | (c & 0x3F);
    }
    if (k < len || cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      out.push_back(0xFFFD);
      i += static_cast<std::size_t>(k < len ? k : len);
      continue;
    }
    out.push_back(cp);
    i += static_cast<std::size_t>(len);
  }
  return out;
}

/// UTF-8 encoding of code points.
inline std::string utf8_encode(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) {
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (c >> 12)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (c >> 18)));
      out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

/// Python's str.isspace() for one code point: the separators and the Unicode space characters.
constexpr bool is_space(char32_t c) noexcept {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/// Python's str.split() with no arguments: runs of whitespace separate, no empty pieces.
inline std::vector<std::u32string> split(std::u32string_view s) {
  std::vector<std::u32string> out;
  std::size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && is_space(s[i])) ++i;
    const std::size_t b = i;
    while (i < s.size() && !is_space(s[i])) ++i;
    if (i > b) out.emplace_back(s.substr(b, i - b));
  }
  return out;
}

/// Python's str.rstrip() with no arguments.
inline std::u32string_view rstrip(std::u32string_view s) noexcept {
  std::size_t n = s.size();
  while (n > 0 && is_space(s[n - 1])) --n;
  return s.substr(0, n);
}

/// Checks a metric's inputs: at least one reference stream, each as long as the hypotheses.
/// @throws ShapeError naming `op` and the stream that differs.
inline void check_reference_streams(std::string_view op, const std::vector<std::string>& hypotheses,
                                    const std::vector<std::vector<std::string>>& references) {
  if (references.empty()) throw ShapeError(std::string(op) + ": at least one reference stream is needed, got none");
  for (std::size_t r = 0; r < references.size(); ++r) {
    if (references[r].size() != hypotheses.size()) {
      throw ShapeError(std::string(op) + ": reference stream " + std::to_string(r) + " has " +
                       std::to_string(references[r].size()) + " lines, but there are " +
                       std::to_string(hypotheses.size()) + " hypotheses");
    }
  }
}

}  // namespace tmoe::eval
