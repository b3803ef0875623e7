#pragma once
/// @file cli.hpp
/// @brief The `tmoe` command line, as a function of the model types it knows: `tmoe::cli::run<Models...>`. The
/// installed `tmoe` tool instantiates it for the paper's routing combinations (tools/tmoe.cpp); a project with its
/// own model types builds its own tool with one line:
///
/// @code
/// int main(int argc, char** argv) {
///   return tmoe::cli::run<MyModel, tmoe::extract::subnetwork_t<MyModel>>(argc, argv, std::cin, std::cout, std::cerr);
/// }
/// @endcode
///
/// Commands:
///   tmoe info MODEL                      configuration, parameter counts (total, effective per task), the experts
///                                        each task uses in every task-routed layer (or what an extraction kept)
///   tmoe extract --task T MODEL OUT      writes task T's sub-network (extract::subnetwork) to OUT
///   tmoe decode MODEL [--task T] [--beam N] [--length-penalty A] [--max-length L] [--batch B] [--threads N]
///                                        reads one source per line (token ids separated by spaces) from standard
///                                        input and writes one target per line
///
/// A model file says which architecture it holds (io::read_model_info); run() picks the type among Models whose
/// description matches. Every error (bad arguments, a missing or corrupt file, an unknown task, a bad input line)
/// prints one line "tmoe: error: ..." on `err` and returns a non-zero code: 2 for usage errors, 1 otherwise.
/// run() never throws.

#include <algorithm>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <iomanip>
#include <istream>
#include <map>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/decode/search.hpp"
#include "tmoe/extract/subnetwork.hpp"
#include "tmoe/io/model_config.hpp"
#include "tmoe/io/model_file.hpp"
#include "tmoe/version.hpp"

namespace tmoe::cli {

/// A usage error: wrong command, missing or malformed argument (exit code 2).
class UsageError : public Error {
 public:
  using Error::Error;
};

inline constexpr const char* kUsage =
    "usage: tmoe info MODEL\n"
    "       tmoe extract --task T MODEL OUT\n"
    "       tmoe decode MODEL [--task T] [--beam N] [--length-penalty A] [--max-length L] [--batch B] "
    "[--threads N] < ids\n"
    "       tmoe --help | --version\n";

namespace detail {

inline std::int64_t parse_integer(const std::string& s, const std::string& what, std::int64_t lo, std::int64_t hi) {
  std::int64_t v = 0;
  bool ok = !s.empty();
  try {
    std::size_t used = 0;
    v = std::stoll(s, &used);
    ok = ok && used == s.size();
  } catch (const std::exception&) {
    ok = false;
  }
  if (!ok) throw UsageError(what + " expects an integer, got '" + s + "'");
  if (v < lo || v > hi) {
    throw UsageError(what + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + s);
  }
  return v;
}

/// Parsed command line: positional arguments and --flag value pairs.
struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;

  static Args parse(int argc, const char* const* argv, int first, const std::vector<std::string>& allowed) {
    Args a;
    for (int i = first; i < argc; ++i) {
      const std::string s = argv[i];
      if (s.rfind("--", 0) == 0) {
        if (std::find(allowed.begin(), allowed.end(), s) == allowed.end()) {
          throw UsageError("unknown option '" + s + "'");
        }
        if (i + 1 >= argc) throw UsageError("option '" + s + "' needs a value");
        if (a.flags.count(s)) throw UsageError("option '" + s + "' is given twice");
        a.flags[s] = argv[++i];
      } else {
        a.positional.push_back(s);
      }
    }
    return a;
  }

  [[nodiscard]] std::optional<std::int64_t> integer(const std::string& flag, std::int64_t lo, std::int64_t hi) const {
    const auto it = flags.find(flag);
    if (it == flags.end()) return std::nullopt;
    return parse_integer(it->second, flag, lo, hi);
  }

  [[nodiscard]] std::optional<double> number(const std::string& flag) const {
    const auto it = flags.find(flag);
    if (it == flags.end()) return std::nullopt;
    try {
      std::size_t used = 0;
      const double v = std::stod(it->second, &used);
      if (used == it->second.size()) return v;
    } catch (const std::exception&) {
    }
    throw UsageError(flag + " expects a number, got '" + it->second + "'");
  }
};

template <class M>
bool matches(const io::ModelInfo& info) {
  const std::string scalar = sizeof(typename M::scalar_type) == 8 ? "f64" : "f32";
  return info.encoder == io::pattern_description<typename M::encoder_pattern>() &&
         info.decoder == io::pattern_description<typename M::decoder_pattern>() && info.scalar == scalar;
}

template <class M>
std::string describe() {
  return "encoder " + io::pattern_description<typename M::encoder_pattern>() + ", decoder " +
         io::pattern_description<typename M::decoder_pattern>();
}

/// Calls f(type tag) for the first of Models matching the file; throws naming what is built in otherwise.
template <class... Models, class F>
void with_model_type(const std::string& path, const io::ModelInfo& info, F&& f) {
  bool found = false;
  ((!found && matches<Models>(info) ? (found = true, f(static_cast<Models*>(nullptr)), 0) : 0), ...);
  if (!found) {
    std::string known;
    ((known += (known.empty() ? "" : "; ") + describe<Models>()), ...);
    throw Error(path + ": this tmoe has no model type for encoder " + info.encoder + ", decoder " + info.decoder +
                " (" + info.scalar + "); it knows: " + known);
  }
}

inline std::filesystem::path existing_file(const std::string& p) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(p, ec)) throw Error(p + ": no such model file");
  return p;
}

template <class M>
void print_info(std::ostream& out, M& model, const io::ModelInfo& info, CpuContext& ctx) {
  const auto& c = model.config();
  out << "architecture: " << describe<M>() << " (" << info.scalar << ")\n";
  out << "config: vocab_size " << c.vocab_size << ", d_model " << c.d_model << ", d_ff " << c.d_ff << ", heads "
      << c.heads << ", layers " << c.encoder_layers << "+" << c.decoder_layers << ", max_length " << c.max_length
      << ", num_tasks " << c.num_tasks << ", pad/bos/eos " << c.pad_id << "/" << c.bos_id << "/" << c.eos_id << "\n";
  const auto n = M::parameter_count(c);
  out << "parameters: total " << n.total << " (embedding " << n.embedding << ", encoder " << n.encoder
      << ", decoder " << n.decoder << ")\n";
  out << "effective per task: " << n.embedding + n.encoder_extracted + n.decoder_extracted << " (encoder "
      << n.encoder_extracted << ", decoder " << n.decoder_extracted << ")\n";
  extract::Extraction rec;
  if (extract::extraction_of(model, rec)) {
    out << "extracted for task " << rec.task << " from encoder " << rec.encoder << ", decoder " << rec.decoder
        << "\n";
    for (const auto& l : rec.layers) {
      out << "  " << l.layer << ": experts";
      for (std::size_t j = 0; j < l.experts.size(); ++j) {
        out << " " << l.experts[j] << " (" << std::fixed << std::setprecision(4) << l.weights[j] << ")";
      }
      out << std::defaultfloat << "\n";
    }
    return;
  }
  if constexpr (extract::folds_v<typename M::encoder_pattern> || extract::folds_v<typename M::decoder_pattern>) {
    out << "experts per task (weight):\n";
    for (std::int64_t t = 0; t < c.num_tasks; ++t) {
      out << "  task " << t << ":";
      auto stack = [&]<class P>(const char* name, std::int64_t layers, auto&& block_of, P*) {
        if constexpr (extract::folds_v<P>) {
          for (std::int64_t i = 0; i < layers; ++i) {
            if (!P::is_moe(i)) continue;
            const auto r = block_of(i).ffn().task_route(ctx, t);
            out << " " << name << "." << i << "=[";
            for (std::size_t j = 0; j < r.experts.size(); ++j) {
              out << (j ? " " : "") << r.experts[j] << " (" << std::fixed << std::setprecision(4)
                  << static_cast<double>(r.weights[j]) << std::defaultfloat << ")";
            }
            out << "]";
          }
        }
      };
      stack("encoder", c.encoder_layers, [&](std::int64_t i) -> const auto& { return model.encoder_moe_block(i); },
            static_cast<typename M::encoder_pattern*>(nullptr));
      stack("decoder", c.decoder_layers, [&](std::int64_t i) -> const auto& { return model.decoder_moe_block(i); },
            static_cast<typename M::decoder_pattern*>(nullptr));
      out << "\n";
    }
  }
}

// One source per line; "line N: ..." errors.
inline std::vector<std::vector<std::int32_t>> read_sources(std::istream& in, std::int64_t vocab) {
  std::vector<std::vector<std::int32_t>> sources;
  std::string line;
  std::int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::istringstream ss(line);
    std::string tok;
    std::vector<std::int32_t> ids;
    while (ss >> tok) {
      std::int64_t v = 0;
      try {
        v = parse_integer(tok, "input line " + std::to_string(number), 0, vocab - 1);
      } catch (const UsageError&) {
        throw Error("input line " + std::to_string(number) + ": '" + tok +
                    "' is not a token id in the vocabulary [0, " + std::to_string(vocab) + ")");
      }
      ids.push_back(static_cast<std::int32_t>(v));
    }
    if (ids.empty()) throw Error("input line " + std::to_string(number) + " is empty; expected token ids");
    sources.push_back(std::move(ids));
  }
  if (in.bad()) throw Error("reading standard input failed");
  return sources;
}

template <class M>
int decode(M& model, const Args& a, std::istream& in, std::ostream& out) {
  const auto& c = model.config();
  const std::int64_t threads = a.integer("--threads", 1, 1024).value_or(1);
  const std::int64_t beam = a.integer("--beam", 1, 1024).value_or(1);
  const std::int64_t batch = a.integer("--batch", 1, 1 << 20).value_or(32);
  const std::int64_t max_length = a.integer("--max-length", 1, c.max_length).value_or(c.max_length);
  const double alpha = a.number("--length-penalty").value_or(0.6);
  const std::optional<std::int64_t> task = a.integer("--task", 0, std::int64_t{1} << 30);
  extract::Extraction rec;
  const bool extracted = extract::extraction_of(model, rec);
  if constexpr (M::kNeedsTasks) {
    if (!task) throw UsageError("this model routes by task: give --task T with T in [0, " + std::to_string(c.num_tasks) + ")");
    if (*task >= c.num_tasks) {
      throw Error("unknown task " + std::to_string(*task) + "; the model has tasks [0, " +
                  std::to_string(c.num_tasks) + ")");
    }
  } else {
    if (extracted && task && *task != rec.task) {
      throw Error("this sub-network serves task " + std::to_string(rec.task) + ", not task " + std::to_string(*task) +
                  "; extract task " + std::to_string(*task) + " from the full model");
    }
  }
  const auto sources = read_sources(in, c.vocab_size);
  for (std::size_t i = 0; i < sources.size(); ++i) {
    if (static_cast<std::int64_t>(sources[i].size()) > c.max_length) {
      throw Error("input line " + std::to_string(i + 1) + " has " + std::to_string(sources[i].size()) +
                  " tokens; the model's max_length is " + std::to_string(c.max_length));
    }
  }
  CpuContext ctx{static_cast<int>(threads)};
  decode::Decoder<M> decoder(model);
  for (std::size_t b0 = 0; b0 < sources.size(); b0 += static_cast<std::size_t>(batch)) {
    const std::size_t b1 = std::min(sources.size(), b0 + static_cast<std::size_t>(batch));
    const std::vector<std::vector<std::int32_t>> chunk(sources.begin() + static_cast<std::ptrdiff_t>(b0),
                                                       sources.begin() + static_cast<std::ptrdiff_t>(b1));
    const std::vector<std::int32_t> tasks(chunk.size(), static_cast<std::int32_t>(task.value_or(0)));
    const auto r = beam == 1 ? decoder.greedy(ctx, chunk, M::kNeedsTasks ? tasks : std::vector<std::int32_t>{},
                                              {.max_length = max_length})
                             : decoder.beam(ctx, chunk, M::kNeedsTasks ? tasks : std::vector<std::int32_t>{},
                                            {.max_length = max_length, .beam_size = static_cast<int>(beam),
                                             .length_penalty = alpha});
    for (const auto& t : r.tokens) {
      for (std::size_t i = 0; i < t.size(); ++i) out << (i ? " " : "") << t[i];
      out << "\n";
    }
  }
  out.flush();
  return 0;
}

template <class... Models>
int dispatch(int argc, const char* const* argv, std::istream& in, std::ostream& out) {
  if (argc < 2) throw UsageError("no command given");
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    out << kUsage;
    return 0;
  }
  if (cmd == "--version") {
    out << "tmoe " << TMOE_VERSION_MAJOR << "." << TMOE_VERSION_MINOR << "." << TMOE_VERSION_PATCH << "\n";
    return 0;
  }
  if (cmd == "info") {
    const Args a = Args::parse(argc, argv, 2, {"--threads"});
    if (a.positional.size() != 1) throw UsageError("info takes one MODEL path");
    const auto path = existing_file(a.positional[0]);
    const auto info = io::read_model_info(path);
    with_model_type<Models...>(path.string(), info, [&]<class M>(M*) {
      M model = io::load_model<M>(path);
      CpuContext ctx{1};
      out << "model: " << path.string() << "\n";
      print_info(out, model, info, ctx);
    });
    return 0;
  }
  if (cmd == "extract") {
    const Args a = Args::parse(argc, argv, 2, {"--task"});
    if (a.positional.size() != 2) throw UsageError("extract takes MODEL and OUT paths");
    const auto task = a.integer("--task", 0, std::int64_t{1} << 30);
    if (!task) throw UsageError("extract needs --task T");
    const auto path = existing_file(a.positional[0]);
    const std::filesystem::path dest = a.positional[1];
    const auto info = io::read_model_info(path);
    with_model_type<Models...>(path.string(), info, [&]<class M>(M*) {
      if constexpr (extract::folds_v<typename M::encoder_pattern> || extract::folds_v<typename M::decoder_pattern>) {
        M model = io::load_model<M>(path);
        if (*task >= model.config().num_tasks) {
          throw Error("unknown task " + std::to_string(*task) + "; the model has tasks [0, " +
                      std::to_string(model.config().num_tasks) + ")");
        }
        CpuContext ctx{1};
        auto sub = extract::subnetwork(ctx, model, *task);
        io::save_model(dest, sub);
        const auto n = M::parameter_count(model.config());
        out << "wrote " << dest.string() << ": task " << *task << ", "
            << n.embedding + n.encoder_extracted + n.decoder_extracted << " parameters (the full model has "
            << n.total << ")\n";
      } else {
        throw Error(path.string() + ": " + describe<M>() +
                    " routes no stack by task (or is extracted already); there is nothing to extract");
      }
    });
    return 0;
  }
  if (cmd == "decode") {
    const Args a = Args::parse(argc, argv, 2,
                               {"--task", "--beam", "--length-penalty", "--max-length", "--batch", "--threads"});
    if (a.positional.size() != 1) throw UsageError("decode takes one MODEL path (sources come on standard input)");
    const auto path = existing_file(a.positional[0]);
    const auto info = io::read_model_info(path);
    int rc = 0;
    with_model_type<Models...>(path.string(), info, [&]<class M>(M*) {
      M model = io::load_model<M>(path);
      rc = decode(model, a, in, out);
    });
    return rc;
  }
  throw UsageError("unknown command '" + cmd + "'");
}

}  // namespace detail

/// Runs the tool; returns its exit code (0 success, 1 error, 2 usage error). Never throws.
template <class... Models>
int run(int argc, const char* const* argv, std::istream& in, std::ostream& out, std::ostream& err) noexcept {
  try {
    try {
      return detail::dispatch<Models...>(argc, argv, in, out);
    } catch (const UsageError& e) {
      err << "tmoe: error: " << e.what() << " (see tmoe --help)\n";
      return 2;
    } catch (const std::bad_alloc&) {
      err << "tmoe: error: out of memory\n";
      return 1;
    } catch (const std::exception& e) {
      std::string m = e.what();
      std::replace(m.begin(), m.end(), '\n', ' ');
      err << "tmoe: error: " << m << "\n";
      return 1;
    }
  } catch (...) {
    return 1;
  }
}

}  // namespace tmoe::cli
