#pragma once
/// @file corpus.hpp
/// @brief Multi-way parallel corpora: one source side shared by every task (a target language), read from
/// line-aligned files, with misalignment reported by file and line.
///
/// Layout read by read_multiway (the one of ../shared/data/oldi-seed): `<dir>/<split>/<language>.txt`, UTF-8, one
/// segment per line; line i of every file of a split translates line i of the source file.
///
/// @code
/// auto c = tmoe::data::read_multiway("../shared/data/oldi-seed", "train", "eng_Latn", {"spa_Latn", "ita_Latn"});
/// // c.source[i] translates to c.targets[0][i] (Spanish) and c.targets[1][i] (Italian).
/// @endcode

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "tmoe/core/error.hpp"

namespace tmoe::data {

/// One split of a multi-way parallel corpus: the source lines and, per task, the target lines parallel to them.
struct MultiwayCorpus {
  std::vector<std::string> tasks;                 ///< task names (target language codes)
  std::vector<std::string> source;                ///< source segments
  std::vector<std::vector<std::string>> targets;  ///< targets[t][i] translates source[i] for task t

  [[nodiscard]] std::int64_t size() const noexcept { return static_cast<std::int64_t>(source.size()); }
  [[nodiscard]] std::int64_t num_tasks() const noexcept { return static_cast<std::int64_t>(tasks.size()); }
};

/// The lines of a UTF-8 text file: "\n" or "\r\n" endings, a final newline optional, a leading BOM dropped.
/// @throws IoError if the file cannot be opened or read.
inline std::vector<std::string> read_lines(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("read_lines: cannot open " + path.string());
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (lines.empty() && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);
    lines.push_back(std::move(line));
  }
  if (in.bad()) throw IoError("read_lines: error while reading " + path.string());
  return lines;
}

/// Checks that `other` is line-aligned with `source`: the same number of lines, and no line empty on one side only.
/// @throws IoError naming both files, and the first offending line (1-based).
inline void check_aligned(const std::vector<std::string>& source, const std::filesystem::path& source_path,
                          const std::vector<std::string>& other, const std::filesystem::path& other_path) {
  if (source.size() != other.size()) {
    throw IoError("misaligned corpus: " + source_path.string() + " has " + std::to_string(source.size()) +
                  " lines but " + other_path.string() + " has " + std::to_string(other.size()));
  }
  for (std::size_t i = 0; i < source.size(); ++i) {
    if (source[i].empty() != other[i].empty()) {
      const auto& [empty, full] =
          source[i].empty() ? std::pair(source_path, other_path) : std::pair(other_path, source_path);
      throw IoError("misaligned corpus: line " + std::to_string(i + 1) + " is empty in " + empty.string() +
                    " but not in " + full.string());
    }
  }
}

/// Reads `<dir>/<split>/<source_language>.txt` and each `<dir>/<split>/<task>.txt`. Lines empty on every side are
/// dropped. @throws IoError for a missing or unreadable file, or for misaligned files (by file and line);
///         ShapeError if no task is given.
inline MultiwayCorpus read_multiway(const std::filesystem::path& dir, std::string_view split,
                                    std::string_view source_language, const std::vector<std::string>& tasks) {
  if (tasks.empty()) throw ShapeError("read_multiway: no target languages given; expected at least one task");
  const auto file = [&](std::string_view language) {
    return dir / std::string(split) / (std::string(language) + ".txt");
  };
  const auto source_path = file(source_language);
  const auto source = read_lines(source_path);
  std::vector<std::vector<std::string>> targets;
  for (const auto& t : tasks) {
    const auto path = file(t);
    targets.push_back(read_lines(path));
    check_aligned(source, source_path, targets.back(), path);
  }
  MultiwayCorpus c;
  c.tasks = tasks;
  c.targets.resize(tasks.size());
  for (std::size_t i = 0; i < source.size(); ++i) {
    if (source[i].empty()) continue;  // empty on every side (checked above)
    c.source.push_back(source[i]);
    for (std::size_t t = 0; t < tasks.size(); ++t) c.targets[t].push_back(targets[t][i]);
  }
  return c;
}

}  // namespace tmoe::data
