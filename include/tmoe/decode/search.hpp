#pragma once
/// @file search.hpp
/// @brief Greedy and beam search over any Transformer type (dense, token-, sentence- or task-routed, or an extracted
/// sub-network), step by step with the model's key/value caches (Transformer::begin_decode / decode_step).
///
/// Sources of different lengths decode as one batch: they are padded with pad_id, which the encoder and the
/// cross-attention mask out. Every target starts from bos_id; a hypothesis ends when it emits eos_id (not part of
/// the returned tokens) or reaches max_length tokens. Finished sequences leave the batch, so later steps cost only
/// what is still decoding. At inference task-routed layers run with no capacity limit and no randomness, and
/// token-routed layers route the tokens of each step.
///
/// Beam search keeps `beam_size` hypotheses per source, scored by the sum of log-probabilities. Each step takes the
/// best 2 * beam_size extensions of a source's beams (ties to the lower beam, then the lower token id); an extension
/// by EOS among the first beam_size of them finishes a hypothesis, the others continue. A source is done when
/// beam_size hypotheses have finished; at max_length the live ones finish too. Finished hypotheses compare by
/// score / lp(length), GNMT's length penalty lp(n) = ((5 + n) / 6)^alpha, with n counting EOS.
///
/// @code
/// tmoe::decode::Decoder<Model> decoder(model);
/// auto out = decoder.greedy(ctx, {{5, 17, 9}, {8, 4}}, /*task_ids=*/{2, 2}, {.max_length = 64});
/// auto best = decoder.beam(ctx, sources, tasks, {.max_length = 64, .beam_size = 4, .length_penalty = 0.6});
/// // out.tokens[i]: the target of source i, without BOS and EOS; out.scores[i]: its (normalized) log-probability
/// @endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "tmoe/backend/cpu/context.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/tensor.hpp"

namespace tmoe::decode {

/// Greedy search settings.
struct GreedyOptions {
  std::int64_t max_length = 0;  ///< most target tokens per sequence (EOS included); 0 = the model's max_length
  bool stop_at_eos = true;      ///< false: always decode max_length tokens (benchmarks)
  bool scores = true;           ///< false: skip the log-probabilities (a log-sum-exp over V per row and step)
};

/// Beam search settings.
struct BeamOptions {
  std::int64_t max_length = 0;  ///< as for greedy
  int beam_size = 4;
  double length_penalty = 0.6;  ///< GNMT alpha; 0 compares raw log-probabilities
};

/// One result per source, in input order.
struct Result {
  std::vector<std::vector<std::int32_t>> tokens;  ///< without BOS and EOS
  std::vector<double> scores;                     ///< greedy: sum of log-probabilities (0 without scores); beam:
                                                  ///< that over lp(length)
  std::int64_t steps = 0;                         ///< decoder steps run
  std::int64_t tokens_decoded = 0;                ///< rows x steps actually computed
};

/// The most probable token of each row of `logits` (B, V), ties to the lower id, rows in parallel; out holds B ids.
template <class Scalar>
void argmax_rows(CpuContext& ctx, ConstTensorView<Scalar, Cpu> logits, std::int32_t* out) {
  const std::int64_t B = logits.dim(0), V = logits.dim(1);
  ctx.parallel_range(B, 1, [&](std::int64_t b0, std::int64_t b1) {
    for (std::int64_t b = b0; b < b1; ++b) {
      const Scalar* l = logits.data() + b * V;
      std::int64_t best = 0;
      for (std::int64_t v = 1; v < V; ++v) best = l[v] > l[best] ? v : best;
      out[b] = static_cast<std::int32_t>(best);
    }
  });
}

/// GNMT length penalty ((5 + n) / 6)^alpha.
inline double length_penalty(std::int64_t n, double alpha) {
  return std::pow((5.0 + static_cast<double>(n)) / 6.0, alpha);
}

/// Decodes with one model, keeping its decoding state and workspaces across calls.
template <class Model>
class Decoder {
 public:
  using Scalar = typename Model::scalar_type;

  explicit Decoder(const Model& model) : model_(&model) {}

  /// Greedy search: at each step the most probable token (ties to the lower id).
  /// @throws ShapeError for an empty or overlong source, a token outside the vocabulary, a missing or unknown task
  ///         id, or a max_length outside [1, model max_length].
  Result greedy(CpuContext& ctx, const std::vector<std::vector<std::int32_t>>& sources,
                const std::vector<std::int32_t>& task_ids, const GreedyOptions& options = {}) {
    const auto& cfg = model_->config();
    const std::int64_t n = static_cast<std::int64_t>(sources.size());
    const std::int64_t L = max_length(options.max_length);
    Result r;
    r.tokens.assign(sources.size(), {});
    r.scores.assign(sources.size(), 0.0);
    if (n == 0) return r;
    start(ctx, sources, task_ids, L);
    std::vector<std::int64_t> seq(static_cast<std::size_t>(n));  // source of each live row
    for (std::int64_t i = 0; i < n; ++i) seq[static_cast<std::size_t>(i)] = i;
    std::vector<std::int32_t> next(static_cast<std::size_t>(n), cfg.bos_id);
    const std::int64_t V = cfg.vocab_size;
    for (std::int64_t step = 0; step < L && !seq.empty(); ++step) {
      const std::int64_t B = static_cast<std::int64_t>(seq.size());
      step_logits(ctx, next, B);
      r.tokens_decoded += B;
      // Most probable token (ties to the lower id) and its log-probability, rows in parallel.
      best_.resize(static_cast<std::size_t>(B));
      logp_.resize(static_cast<std::size_t>(B));
      argmax_rows<Scalar>(ctx, logits_, best_.data());
      if (options.scores) {
        ctx.parallel_range(B, 1, [&](std::int64_t b0, std::int64_t b1) {
          for (std::int64_t b = b0; b < b1; ++b) {
            const Scalar* l = logits_.data() + b * V;
            logp_[static_cast<std::size_t>(b)] = static_cast<double>(l[best_[static_cast<std::size_t>(b)]]) - log_sum_exp(l, V);
          }
        });
      } else {
        std::fill(logp_.begin(), logp_.end(), 0.0);
      }
      std::vector<std::int64_t> keep;
      keep.reserve(seq.size());
      for (std::int64_t b = 0; b < B; ++b) {
        const std::size_t s = static_cast<std::size_t>(seq[static_cast<std::size_t>(b)]);
        r.scores[s] += logp_[static_cast<std::size_t>(b)];
        const auto token = best_[static_cast<std::size_t>(b)];
        if (options.stop_at_eos && token == cfg.eos_id) continue;
        r.tokens[s].push_back(token);
        if (step + 1 < L) {
          keep.push_back(b);
          next[keep.size() - 1] = token;
        }
      }
      r.steps = step + 1;
      if (static_cast<std::int64_t>(keep.size()) != B) {
        std::vector<std::int64_t> live;
        for (const std::int64_t b : keep) live.push_back(seq[static_cast<std::size_t>(b)]);
        seq = std::move(live);
        next.resize(seq.size());
        if (!seq.empty()) model_->select_rows(state_, keep);
      }
    }
    return r;
  }

  /// Beam search (see the file comment).
  /// @throws ShapeError as greedy, or for beam_size < 1.
  Result beam(CpuContext& ctx, const std::vector<std::vector<std::int32_t>>& sources,
              const std::vector<std::int32_t>& task_ids, const BeamOptions& options = {}) {
    const auto& cfg = model_->config();
    if (options.beam_size < 1) {
      throw ShapeError("decode::Decoder::beam: beam_size must be at least 1, got " + std::to_string(options.beam_size));
    }
    const std::int64_t n = static_cast<std::int64_t>(sources.size());
    const std::int64_t L = max_length(options.max_length);
    const std::int64_t W = options.beam_size, V = cfg.vocab_size;
    Result r;
    r.tokens.assign(sources.size(), {});
    r.scores.assign(sources.size(), 0.0);
    if (n == 0) return r;
    start(ctx, sources, task_ids, L);

    struct Hyp {
      std::vector<std::int32_t> tokens;
      double score = 0;  // sum of log-probabilities
    };
    struct Finished {
      std::vector<std::int32_t> tokens;
      double normalized = 0;
    };
    std::vector<std::vector<Hyp>> live(static_cast<std::size_t>(n));
    std::vector<std::vector<Finished>> done(static_cast<std::size_t>(n));
    std::vector<std::int64_t> srcs;  // live sources, in row-block order (W rows each)
    for (std::int64_t i = 0; i < n; ++i) {
      live[static_cast<std::size_t>(i)].assign(1, Hyp{});
      srcs.push_back(i);
    }
    // Row layout: each live source owns W consecutive rows; beams beyond its live count are idle copies.
    std::vector<std::int64_t> rows;
    for (std::int64_t i = 0; i < n; ++i) {
      for (std::int64_t w = 0; w < W; ++w) rows.push_back(i);
    }
    model_->select_rows(state_, rows);
    std::vector<std::int32_t> next(rows.size(), cfg.bos_id);
    std::vector<double> logp(static_cast<std::size_t>(V));
    struct Cand {
      double score;
      std::int64_t beam, token;
    };
    std::vector<Cand> cands;

    for (std::int64_t step = 0; step < L && !srcs.empty(); ++step) {
      const std::int64_t B = static_cast<std::int64_t>(srcs.size()) * W;
      step_logits(ctx, next, B);
      r.tokens_decoded += B;
      r.steps = step + 1;
      const bool last = step + 1 == L;
      std::vector<std::int64_t> new_rows;
      std::vector<std::int32_t> new_next;
      std::vector<std::int64_t> new_srcs;
      for (std::size_t si = 0; si < srcs.size(); ++si) {
        const std::size_t s = static_cast<std::size_t>(srcs[si]);
        auto& beams = live[s];
        cands.clear();
        for (std::size_t w = 0; w < beams.size(); ++w) {
          const Scalar* l = logits_.data() + (static_cast<std::int64_t>(si) * W + static_cast<std::int64_t>(w)) * V;
          const double lse = log_sum_exp(l, V);
          for (std::int64_t v = 0; v < V; ++v) {
            cands.push_back({beams[w].score + static_cast<double>(l[v]) - lse, static_cast<std::int64_t>(w), v});
          }
        }
        const std::size_t take = std::min(cands.size(), static_cast<std::size_t>(2 * W));
        std::partial_sort(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(take), cands.end(),
                          [](const Cand& a, const Cand& b) {
                            if (a.score != b.score) return a.score > b.score;
                            if (a.beam != b.beam) return a.beam < b.beam;
                            return a.token < b.token;
                          });
        std::vector<Hyp> next_beams;
        std::vector<std::int64_t> parent;
        for (std::size_t c = 0; c < take; ++c) {
          const Cand& cd = cands[c];
          const auto& from = beams[static_cast<std::size_t>(cd.beam)];
          if (cd.token == cfg.eos_id) {
            if (c < static_cast<std::size_t>(W) && static_cast<std::int64_t>(done[s].size()) < W) {
              const auto len = static_cast<std::int64_t>(from.tokens.size()) + 1;
              done[s].push_back({from.tokens, cd.score / length_penalty(len, options.length_penalty)});
            }
            continue;
          }
          if (static_cast<std::int64_t>(next_beams.size()) == W) continue;
          Hyp h{from.tokens, cd.score};
          h.tokens.push_back(static_cast<std::int32_t>(cd.token));
          next_beams.push_back(std::move(h));
          parent.push_back(cd.beam);
        }
        const bool finished = static_cast<std::int64_t>(done[s].size()) >= W || last || next_beams.empty();
        if (finished) {
          if (static_cast<std::int64_t>(done[s].size()) < W) {
            for (auto& h : next_beams) {
              const auto len = static_cast<std::int64_t>(h.tokens.size());
              done[s].push_back({std::move(h.tokens), h.score / length_penalty(len, options.length_penalty)});
            }
          }
          continue;
        }
        beams = std::move(next_beams);
        new_srcs.push_back(static_cast<std::int64_t>(s));
        for (std::int64_t w = 0; w < W; ++w) {
          const std::size_t b = static_cast<std::size_t>(std::min<std::int64_t>(w, static_cast<std::int64_t>(beams.size()) - 1));
          const std::int64_t p = parent[b];
          new_rows.push_back(static_cast<std::int64_t>(si) * W + p);
          new_next.push_back(beams[b].tokens.back());
        }
      }
      srcs = std::move(new_srcs);
      next = std::move(new_next);
      if (!srcs.empty()) model_->select_rows(state_, new_rows);
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const auto& d = done[static_cast<std::size_t>(i)];
      std::size_t best = 0;
      for (std::size_t j = 1; j < d.size(); ++j) best = d[j].normalized > d[best].normalized ? j : best;
      if (!d.empty()) {
        r.tokens[static_cast<std::size_t>(i)] = d[best].tokens;
        r.scores[static_cast<std::size_t>(i)] = d[best].normalized;
      }
    }
    return r;
  }

  /// The decoding state (key/value caches and workspaces), for inspection.
  [[nodiscard]] const typename Model::DecodeState& state() const noexcept { return state_; }

 private:
  std::int64_t max_length(std::int64_t requested) const {
    const std::int64_t m = model_->config().max_length;
    const std::int64_t L = requested == 0 ? m : requested;
    if (L < 1 || L > m) {
      throw ShapeError("decode: max_length " + std::to_string(requested) + " is outside [1, " + std::to_string(m) +
                       "] (the model's max_length)");
    }
    return L;
  }

  // Pads the sources into (B, S) and runs the encoder.
  void start(CpuContext& ctx, const std::vector<std::vector<std::int32_t>>& sources,
             const std::vector<std::int32_t>& task_ids, std::int64_t L) {
    const auto& cfg = model_->config();
    const std::int64_t B = static_cast<std::int64_t>(sources.size());
    std::int64_t S = 1;
    for (std::size_t i = 0; i < sources.size(); ++i) {
      const auto len = static_cast<std::int64_t>(sources[i].size());
      if (len == 0) throw ShapeError("decode: source " + std::to_string(i) + " is empty");
      S = std::max(S, len);
    }
    source_.resize({B, S});
    std::fill_n(source_.data(), B * S, cfg.pad_id);
    for (std::int64_t b = 0; b < B; ++b) {
      std::copy(sources[static_cast<std::size_t>(b)].begin(), sources[static_cast<std::size_t>(b)].end(),
                source_.data() + b * S);
    }
    tasks_.resize({static_cast<std::int64_t>(task_ids.size())});
    std::copy(task_ids.begin(), task_ids.end(), tasks_.data());
    model_->begin_decode(ctx, source_, tasks_, L, state_);
  }

  void step_logits(CpuContext& ctx, const std::vector<std::int32_t>& next, std::int64_t B) {
    tokens_.resize({B});
    std::copy_n(next.data(), B, tokens_.data());
    logits_.resize({B, model_->config().vocab_size});
    model_->decode_step(ctx, state_, tokens_, logits_);
  }

  static double log_sum_exp(const Scalar* l, std::int64_t V) {
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(l[v]));
    double s = 0;
    for (std::int64_t v = 0; v < V; ++v) s += std::exp(static_cast<double>(l[v]) - mx);
    return mx + std::log(s);
  }

  const Model* model_;
  typename Model::DecodeState state_;
  Tensor<std::int32_t, Cpu> source_, tasks_, tokens_;
  Tensor<Scalar, Cpu> logits_;
  std::vector<std::int32_t> best_;
  std::vector<double> logp_;
};

/// Greedy search with a one-off Decoder.
template <class Model>
Result greedy(CpuContext& ctx, const Model& model, const std::vector<std::vector<std::int32_t>>& sources,
              const std::vector<std::int32_t>& task_ids, const GreedyOptions& options = {}) {
  Decoder<Model> d(model);
  return d.greedy(ctx, sources, task_ids, options);
}

/// Beam search with a one-off Decoder.
template <class Model>
Result beam(CpuContext& ctx, const Model& model, const std::vector<std::vector<std::int32_t>>& sources,
            const std::vector<std::int32_t>& task_ids, const BeamOptions& options = {}) {
  Decoder<Model> d(model);
  return d.beam(ctx, sources, task_ids, options);
}

}  // namespace tmoe::decode
