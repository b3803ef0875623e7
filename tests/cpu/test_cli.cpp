// The `tmoe` command line, run in-process through tmoe::cli::run: info, extract and decode against the library calls
// they stand for, and every error path (one line on stderr, a non-zero exit, never a crash or a partial file).

#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tmoe/cli/cli.hpp"
#include "tmoe/tmoe.hpp"

using namespace tmoe;

namespace {

using Full = nn::TokenTask<4>;
using Sub = extract::subnetwork_t<Full>;
using NoTask = nn::TokenToken<4>;

struct Out {
  int rc = 0;
  std::string out, err;
};

Out tool(std::vector<std::string> args, const std::string& input = "") {
  args.insert(args.begin(), "tmoe");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  std::istringstream in(input);
  std::ostringstream out, err;
  Out r;
  r.rc = cli::run<nn::DenseTransformer<>, Full, Sub, NoTask>(static_cast<int>(argv.size()), argv.data(), in, out, err);
  r.out = out.str();
  r.err = err.str();
  return r;
}

// An error: non-zero code, exactly one line on stderr naming the problem, nothing on stdout.
void check_error(const Out& r, int code, const std::string& needle) {
  CAPTURE(r.err);
  CHECK(r.rc == code);
  CHECK(r.err.starts_with("tmoe: error: "));
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  CHECK(r.err.find(needle) != std::string::npos);
  CHECK(r.out.empty());
}

nn::TransformerConfig config() {
  return {.vocab_size = 23, .d_model = 12, .d_ff = 10, .heads = 3, .encoder_layers = 2, .decoder_layers = 2,
          .max_length = 12, .num_tasks = 3};
}

std::filesystem::path tmp(const std::string& name) { return std::filesystem::path(TMOE_TEST_TMPDIR) / name; }

std::filesystem::path full_model_file() {
  const auto p = tmp("cli_full.safetensors");
  Full model(config());
  model.init(77);
  io::save_model(p, model);
  return p;
}

const std::string kInput = "5 3 9 12 4\n7 16 4\n11 6 8 3 15 13 10\n";
const std::vector<std::vector<std::int32_t>> kSources = {{5, 3, 9, 12, 4}, {7, 16, 4}, {11, 6, 8, 3, 15, 13, 10}};

std::string lines(const decode::Result& r) {
  std::string s;
  for (const auto& t : r.tokens) {
    for (std::size_t i = 0; i < t.size(); ++i) {
      if (i) s += ' ';
      s += std::to_string(t[i]);
    }
    s += "\n";
  }
  return s;
}

}  // namespace

TEST_SUITE("cli") {
  TEST_CASE("help, version and usage errors") {
    const auto help = tool({"--help"});
    CHECK(help.rc == 0);
    CHECK(help.out.find("tmoe extract --task T MODEL OUT") != std::string::npos);
    CHECK(tool({"--version"}).out.starts_with("tmoe 0."));
    check_error(tool({}), 2, "no command");
    check_error(tool({"serve"}), 2, "unknown command 'serve'");
    check_error(tool({"info"}), 2, "one MODEL");
    check_error(tool({"info", "a", "b"}), 2, "one MODEL");
    check_error(tool({"info", "--bogus", "1", "a"}), 2, "unknown option '--bogus'");
    check_error(tool({"decode", "m", "--beam"}), 2, "needs a value");
    check_error(tool({"extract", "a", "b"}), 2, "--task");
    check_error(tool({"extract", "--task", "x", "a", "b"}), 2, "expects an integer, got 'x'");
    check_error(tool({"extract", "--task", "-1", "a", "b"}), 2, "must be in");
    check_error(tool({"extract", "--task", "1", "--task", "2", "a", "b"}), 2, "twice");
  }

  TEST_CASE("missing, corrupt, truncated and foreign files") {
    check_error(tool({"info", tmp("nope.safetensors").string()}), 1, "no such model file");
    check_error(tool({"info", TMOE_TEST_TMPDIR}), 1, "no such model file");
    const auto junk = tmp("junk.safetensors");
    std::ofstream(junk) << "this is not a model";
    check_error(tool({"info", junk.string()}), 1, junk.string());
    // A truncated model file.
    const auto full = full_model_file();
    const auto cut = tmp("cut.safetensors");
    std::filesystem::copy_file(full, cut, std::filesystem::copy_options::overwrite_existing);
    std::filesystem::resize_file(cut, std::filesystem::file_size(full) - 100);
    check_error(tool({"info", cut.string()}), 1, cut.string());
    check_error(tool({"decode", cut.string(), "--task", "0"}, kInput), 1, cut.string());
    // A safetensors file that is not a tmoe model.
    const auto plain = tmp("plain.safetensors");
    Tensor<float, Cpu> t({3});
    io::save<float>(plain, {{"x", t.view()}});
    check_error(tool({"info", plain.string()}), 1, "not a tmoe model");
    // A model type this tool was not built with.
    const auto sent = tmp("sentence.safetensors");
    nn::SentenceSentence<4> s(config());
    io::save_model(sent, s);
    check_error(tool({"info", sent.string()}), 1, "no model type for encoder sentence/E=4");
  }

  TEST_CASE("info: configuration, counts and each task's experts") {
    const auto full = full_model_file();
    const auto r = tool({"info", full.string()});
    CHECK(r.rc == 0);
    CHECK(r.err.empty());
    const auto n = Full::parameter_count(config());
    CHECK(r.out.find(std::string("parameters: total ") += std::to_string(n.total)) != std::string::npos);
    CHECK(r.out.find(std::string("effective per task: ") += std::to_string(n.embedding + n.encoder_extracted + n.decoder_extracted)) !=
          std::string::npos);
    Full model = io::load_model<Full>(full);
    CpuContext ctx(1);
    for (int t = 0; t < 3; ++t) {
      const auto route = model.decoder_moe_block(1).ffn().task_route(ctx, t);
      std::string expect = "task ";
      expect += std::to_string(t);
      expect += ": decoder.1=[";
      expect += std::to_string(route.experts[0]);
      expect += " (";
      CHECK(r.out.find(expect) != std::string::npos);
    }
  }

  TEST_CASE("extract writes the sub-network, decode gives the library's greedy and beam outputs") {
    const auto full = full_model_file();
    const auto sub = tmp("cli_sub.safetensors");
    std::filesystem::remove(sub);
    const auto x = tool({"extract", "--task", "1", full.string(), sub.string()});
    CHECK(x.rc == 0);
    CHECK(x.out.find("task 1") != std::string::npos);
    auto loaded = io::load_model<Sub>(sub);
    extract::Extraction rec;
    REQUIRE(extract::extraction_of(loaded, rec));
    CHECK(rec.task == 1);
    const auto info = tool({"info", sub.string()});
    CHECK(info.out.find("extracted for task 1") != std::string::npos);

    CpuContext ctx(1);
    Full model = io::load_model<Full>(full);
    const auto greedy = lines(decode::greedy(ctx, model, kSources, {1, 1, 1}));
    const auto d_full = tool({"decode", full.string(), "--task", "1"}, kInput);
    CHECK(d_full.rc == 0);
    CHECK(d_full.out == greedy);
    CHECK(tool({"decode", sub.string()}, kInput).out == greedy);
    CHECK(tool({"decode", sub.string(), "--task", "1", "--batch", "2", "--threads", "2"}, kInput).out == greedy);
    const auto beam = lines(decode::beam(ctx, model, kSources, {1, 1, 1}, {.max_length = 7, .beam_size = 3,
                                                                           .length_penalty = 1.0}));
    const auto d_beam = tool({"decode", full.string(), "--task", "1", "--beam", "3", "--max-length", "7",
                             "--length-penalty", "1.0"},
                            kInput);
    CHECK(d_beam.out == beam);
    CHECK(tool({"decode", sub.string(), "--beam", "3", "--max-length", "7", "--length-penalty", "1"}, kInput).out ==
          beam);
    CHECK(tool({"decode", full.string(), "--task", "1"}, "").out.empty());
  }

  TEST_CASE("decode and extract errors") {
    const auto full = full_model_file();
    check_error(tool({"decode", full.string()}, kInput), 2, "give --task");
    check_error(tool({"decode", full.string(), "--task", "3"}, kInput), 1, "unknown task 3");
    check_error(tool({"decode", full.string(), "--task", "0", "--beam", "0"}, kInput), 2, "--beam must be in");
    check_error(tool({"decode", full.string(), "--task", "0", "--max-length", "13"}, kInput), 2, "--max-length");
    check_error(tool({"decode", full.string(), "--task", "0", "--length-penalty", "abc"}, kInput), 2, "number");
    check_error(tool({"decode", full.string(), "--task", "0"}, "5 3\n4 x 2\n"), 1, "input line 2: 'x'");
    check_error(tool({"decode", full.string(), "--task", "0"}, "5 23\n"), 1, "'23' is not a token id");
    check_error(tool({"decode", full.string(), "--task", "0"}, "5 -1\n"), 1, "input line 1");
    check_error(tool({"decode", full.string(), "--task", "0"}, "5\n\n4\n"), 1, "input line 2 is empty");
    check_error(tool({"decode", full.string(), "--task", "0"}, "1 2 3 4 5 6 7 8 9 10 11 12 13\n"), 1, "max_length");
    const auto sub = tmp("cli_sub2.safetensors");
    REQUIRE(tool({"extract", "--task", "2", full.string(), sub.string()}).rc == 0);
    check_error(tool({"decode", sub.string(), "--task", "0"}, kInput), 1, "serves task 2");
    check_error(tool({"extract", "--task", "5", full.string(), tmp("never.safetensors").string()}), 1, "unknown task 5");
    CHECK_FALSE(std::filesystem::exists(tmp("never.safetensors")));
    check_error(tool({"extract", "--task", "0", sub.string(), tmp("never.safetensors").string()}), 1,
                "nothing to extract");
    const auto plain = tmp("tok.safetensors");
    NoTask tok(config());
    io::save_model(plain, tok);
    check_error(tool({"extract", "--task", "0", plain.string(), tmp("never.safetensors").string()}), 1,
                "routes no stack by task");
    const auto nodir = tmp("no/such/dir/out.safetensors");
    check_error(tool({"extract", "--task", "0", full.string(), nodir.string()}), 1, "no/such/dir");
    CHECK_FALSE(std::filesystem::exists(nodir));
  }
}
