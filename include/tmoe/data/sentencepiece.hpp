#pragma once
/// @file sentencepiece.hpp
/// @brief Subword tokenization with SentencePiece: a joint model trained on the training text, the paper's
/// target-language tags `<2xx>` as single pieces, and ids laid out as the Transformer expects (pad 0, bos 1, eos 2,
/// unk 3).
///
/// Needs the SentencePiece library (Debian: libsentencepiece-dev): link `sentencepiece` and `sentencepiece_train`.
/// This header is therefore not part of <tmoe/tmoe.hpp>.
///
/// @code
/// auto tok = tmoe::data::Tokenizer::train(lines, {.vocab_size = 8000, .tags = {"<2spa_Latn>", "<2ita_Latn>"}});
/// tok.save("joint.model");
/// std::vector<std::int32_t> ids = tok.encode(source);
/// ids.insert(ids.begin(), tok.id(tmoe::data::Tokenizer::tag("spa_Latn")));   // the tag leads the source
/// @endcode

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tmoe/core/error.hpp"

namespace tmoe::data {

struct TokenizerOptions {
  std::int64_t vocab_size = 8000;
  std::string model_type = "unigram";  ///< "unigram" or "bpe"
  double character_coverage = 1.0;
  std::vector<std::string> tags;  ///< pieces kept whole, e.g. the "<2xx>" target-language tags
};

class Tokenizer {
 public:
  static constexpr std::int32_t kPad = 0, kBos = 1, kEos = 2, kUnk = 3;

  /// The paper's target-language tag for `language`: "<2" + language + ">".
  [[nodiscard]] static std::string tag(std::string_view language) { return "<2" + std::string(language) + ">"; }

  /// Trains a model on `lines` (one thread, so the model is the same on every run).
  /// @throws Error with SentencePiece's message if training fails (for example too few lines for the vocabulary).
  [[nodiscard]] static Tokenizer train(const std::vector<std::string>& lines, const TokenizerOptions& options) {
    if (lines.empty()) throw Error("Tokenizer::train: no training lines");
    std::string tags;
    for (const auto& t : options.tags) tags += (tags.empty() ? "" : ",") + t;
    const std::unordered_map<std::string, std::string> args = {
        {"vocab_size", std::to_string(options.vocab_size)},
        {"model_type", options.model_type},
        {"character_coverage", std::to_string(options.character_coverage)},
        {"pad_id", std::to_string(kPad)},
        {"bos_id", std::to_string(kBos)},
        {"eos_id", std::to_string(kEos)},
        {"unk_id", std::to_string(kUnk)},
        {"user_defined_symbols", tags},
        {"num_threads", "1"},
        {"minloglevel", "2"},
        {"hard_vocab_limit", "false"},
    };
    Lines it(lines);
    std::string proto;
    const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &proto);
    if (!status.ok()) throw Error("Tokenizer::train: SentencePiece failed: " + status.ToString());
    return from_proto(std::move(proto));
  }

  /// Loads a model written by save() (or by SentencePiece's own trainer).
  /// @throws IoError if the file cannot be read or is not a SentencePiece model.
  [[nodiscard]] static Tokenizer load(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw IoError("Tokenizer::load: cannot open " + path.string());
    std::string proto((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    try {
      return from_proto(std::move(proto));
    } catch (const Error& e) {
      throw IoError("Tokenizer::load: " + path.string() + " is not a SentencePiece model (" + e.what() + ")");
    }
  }

  /// Writes the model (the serialized SentencePiece proto). @throws IoError if writing fails.
  void save(const std::filesystem::path& path) const {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(proto_.data(), static_cast<std::streamsize>(proto_.size()));
    if (!out) throw IoError("Tokenizer::save: cannot write " + path.string());
  }

  [[nodiscard]] std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<int> ids;
    const auto status = sp_->Encode(std::string(text), &ids);
    if (!status.ok()) throw Error("Tokenizer::encode: " + status.ToString());
    return {ids.begin(), ids.end()};
  }

  /// The text of `ids`; pad, bos and eos are skipped.
  [[nodiscard]] std::string decode(const std::vector<std::int32_t>& ids) const {
    std::vector<int> keep;
    for (std::int32_t id : ids) {
      if (id != kPad && id != kBos && id != kEos) keep.push_back(id);
    }
    std::string text;
    const auto status = sp_->Decode(keep, &text);
    if (!status.ok()) throw Error("Tokenizer::decode: " + status.ToString());
    return text;
  }

  /// The id of a piece, e.g. a tag. @throws ShapeError if the model has no such piece.
  [[nodiscard]] std::int32_t id(std::string_view piece) const {
    const int i = sp_->PieceToId(std::string(piece));
    if (i == kUnk && piece != sp_->IdToPiece(kUnk)) {
      throw ShapeError("Tokenizer::id: the model has no piece '" + std::string(piece) + "'");
    }
    return i;
  }

  [[nodiscard]] std::int64_t vocab_size() const { return sp_->GetPieceSize(); }

 private:
  class Lines : public sentencepiece::SentenceIterator {
   public:
    explicit Lines(const std::vector<std::string>& lines) : lines_(lines) {}
    bool done() const override { return i_ >= lines_.size(); }
    void Next() override { ++i_; }
    const std::string& value() const override { return lines_[i_]; }
    sentencepiece::util::Status status() const override { return {}; }

   private:
    const std::vector<std::string>& lines_;
    std::size_t i_ = 0;
  };

  static Tokenizer from_proto(std::string proto) {
    Tokenizer t;
    t.sp_ = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto status = t.sp_->LoadFromSerializedProto(proto);
    if (!status.ok()) throw Error(status.ToString());
    t.proto_ = std::move(proto);
    return t;
  }

  std::shared_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string proto_;
};

}  // namespace tmoe::data
