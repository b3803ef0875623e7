// The C++ half of tests/python/crosscheck_sacrebleu.py: reads cases (JSON: [{"hyps": [...], "refs": [[...], ...]}])
// and prints, per case, tmoe's corpus BLEU, corpus chrF and the 13a tokenization of every hypothesis, as JSON.
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "tmoe/eval/bleu.hpp"
#include "tmoe/eval/chrf.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: eval_tool CASES.json\n";
    return 2;
  }
  std::ifstream in(argv[1]);
  if (!in) {
    std::cerr << "eval_tool: cannot open " << argv[1] << "\n";
    return 1;
  }
  const nlohmann::json cases = nlohmann::json::parse(in);
  nlohmann::json out = nlohmann::json::array();
  for (const auto& c : cases) {
    const auto hyps = c.at("hyps").get<std::vector<std::string>>();
    const auto refs = c.at("refs").get<std::vector<std::vector<std::string>>>();
    nlohmann::json tokenized = nlohmann::json::array();
    for (const auto& h : hyps) tokenized.push_back(tmoe::eval::tokenize_13a(h));
    out.push_back({{"bleu", tmoe::eval::corpus_bleu(hyps, refs).score},
                   {"chrf", tmoe::eval::corpus_chrf(hyps, refs)},
                   {"tokenized", tokenized}});
  }
  std::cout << out.dump() << "\n";
  return 0;
}
