#pragma once
/// @file config.hpp
/// @brief Compile-time configuration of an MoE layer: routing granularity, expert count, top-k, capacity and
/// the gating options of GShard/Switch (paper-spec sections 2.3-2.8).
///
/// A configuration is `moe::Config<Route, Options...>`. Options may come in any order; each kind at most once;
/// `Experts<E>` is required and everything else has a default:
///
/// | option kind     | choices                                                      | default                          |
/// |-----------------|--------------------------------------------------------------|----------------------------------|
/// | experts         | `Experts<E>`                                                 | (required)                       |
/// | top-k           | `TopK<K>`                                                    | `TopK<2>`                        |
/// | capacity        | `CapacityFactor<Num, Den, Min, Multiple>`, `CapacityFixed<C>`, `Dropless` | token/sentence: `CapacityFactor<2>`; task: `Dropless` |
/// | second expert   | `SecondExpertAll`, `SecondExpertRandom<Num, Den>`            | `SecondExpertAll`                |
/// | normalization   | `NormalizeBeforeDrop`, `NormalizeAfterDrop`, `NoNormalize`   | K = 1: `NoNormalize`; else `NormalizeBeforeDrop` |
/// | aux loss        | `AuxLoss<Num, Den>`                                          | `AuxLoss<1, 100>` (coef 1e-2)    |
/// | router z-loss   | `ZLoss<Num, Den>`                                            | `ZLoss<0>` (off)                 |
/// | activation      | `ExpertActivation<nn::Relu>` / `<nn::Gelu>` / `<nn::Silu>`   | `ExpertActivation<nn::Relu>`     |
///
/// @code
/// using Enc = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<32>, tmoe::TopK<2>, tmoe::CapacityFactor<5, 4>>;
/// using Dec = tmoe::moe::Config<tmoe::route::Task, tmoe::Experts<32>, tmoe::TopK<2>, tmoe::Dropless>;
/// @endcode
///
/// Named configurations: `moe::LingvoLegacy<Route, E>` (lingvo Top2GatingOnLogits with
/// legacy_mtf_behavior=True: the reference semantics of paper-spec 2.3), `moe::GShardPaper<Route, E>`
/// (GShard Algorithm 1: random second expert with threshold 0.5) and `moe::SwitchTop1<Route, E>`.

#include <cstdint>
#include <limits>
#include <type_traits>

#include "tmoe/nn/activation.hpp"

namespace tmoe {

/// Number of experts E, 1 <= E.
template <int E>
struct Experts {
  static_assert(E >= 1, "Experts<E>: E must be at least 1.");
  static constexpr int value = E;
};

/// Experts chosen per token K, 1 <= K <= 8 (the gate keeps K candidates per token in registers).
template <int K>
struct TopK {
  static_assert(K >= 1 && K <= 8,
                "TopK<K>: K must be between 1 and 8, because the gate keeps K candidates per token in registers.");
  static constexpr int value = K;
};

/// Capacity per expert per group of S tokens: C = max(floor(S * Num / (Den * E)), Min), rounded up to a multiple
/// of `Multiple`. The factor is NOT multiplied by K (GShard convention: CapacityFactor<2> is 2S/E).
/// lingvo's rule (C = 0 -> 4, then up to a multiple of 4) is CapacityFactor<Num, Den, 4, 4>.
template <std::int64_t Num, std::int64_t Den = 1, std::int64_t Min = 1, std::int64_t Multiple = 1>
struct CapacityFactor {
  static_assert(Num > 0 && Den > 0, "CapacityFactor<Num, Den>: the factor Num/Den must be positive.");
  static_assert(Min >= 0, "CapacityFactor<..., Min>: the minimum capacity cannot be negative.");
  static_assert(Multiple >= 1, "CapacityFactor<..., Multiple>: the rounding multiple must be at least 1.");
  static constexpr bool dropless = false;
  static constexpr std::int64_t capacity(std::int64_t group_tokens, int experts) noexcept {
    std::int64_t c = group_tokens * Num / (Den * experts);
    c = c < Min ? Min : c;
    return (c + Multiple - 1) / Multiple * Multiple;
  }
};

/// A fixed capacity C per expert per group (lingvo's expert_capacity_dim).
template <std::int64_t C>
struct CapacityFixed {
  static_assert(C >= 0, "CapacityFixed<C>: C cannot be negative.");
  static constexpr bool dropless = false;
  static constexpr std::int64_t capacity(std::int64_t, int) noexcept { return C; }
};

/// No capacity limit: no token is ever dropped.
struct Dropless {
  static constexpr bool dropless = true;
  static constexpr std::int64_t capacity(std::int64_t, int) noexcept {
    return std::numeric_limits<std::int64_t>::max();
  }
};

/// Every chosen expert is used (subject to capacity). lingvo's default.
struct SecondExpertAll {
  static constexpr bool random = false;
  static constexpr double threshold = 0.0;
};

/// GShard random routing: choice j >= 2 is used with probability min(1, g_j / t), t = Num/Den, where g_j is its
/// weight normalized over the K choices. GShard uses t = 0.5; Mesh TF 0.2. Only in training: at evaluation every
/// chosen expert is used, so inference is deterministic.
template <std::int64_t Num = 1, std::int64_t Den = 2>
struct SecondExpertRandom {
  static_assert(Num >= 0 && Den > 0, "SecondExpertRandom<Num, Den>: the threshold Num/Den must be non-negative.");
  static constexpr bool random = true;
  static constexpr double threshold = static_cast<double>(Num) / static_cast<double>(Den);
};

/// Gate weights g_j / (sum of the K chosen + 1e-9), before capacity and random drops, never renormalized: a lone
/// survivor keeps a weight below 1 (GShard; lingvo legacy_mtf_behavior=True).
struct NormalizeBeforeDrop {};
/// Normalized over the choices that survive capacity and random drops: a lone survivor gets weight 1
/// (fairscale, DeepSpeed, fairseq; lingvo legacy_mtf_behavior=False).
struct NormalizeAfterDrop {};
/// Raw softmax probabilities (Switch top-1).
struct NoNormalize {};

/// Load-balancing loss coefficient Num/Den applied to E * sum_e f_e * m_e (averaged over groups).
template <std::int64_t Num, std::int64_t Den = 1>
struct AuxLoss {
  static_assert(Num >= 0 && Den > 0, "AuxLoss<Num, Den>: the coefficient must be non-negative.");
  static constexpr double coefficient = static_cast<double>(Num) / static_cast<double>(Den);
};

/// Router z-loss coefficient Num/Den applied to mean over valid tokens of logsumexp(logits)^2 (ST-MoE).
template <std::int64_t Num, std::int64_t Den = 1>
struct ZLoss {
  static_assert(Num >= 0 && Den > 0, "ZLoss<Num, Den>: the coefficient must be non-negative.");
  static constexpr double coefficient = static_cast<double>(Num) / static_cast<double>(Den);
};

/// The experts' activation: FFN_e(x) = wo_e * Act(wi_e * x).
template <nn::Activation Act>
struct ExpertActivation {
  using type = Act;
};

namespace route {
/// Each token is routed on its own representation (GShard).
struct Token {
  static constexpr const char* name = "token";
};
/// One decision per sequence, from the mean of the layer's input over the sequence, padding excluded. Sequences
/// are keyed by (row, segment id), so packed rows never mix. Non-causal in a decoder (paper-spec 1.3).
struct Sentence {
  static constexpr const char* name = "sentence";
};
/// One decision per task, from a learned per-layer task embedding of size d_model projected by the gate.
struct Task {
  static constexpr const char* name = "task";
};
template <class R>
concept Granularity = std::same_as<R, Token> || std::same_as<R, Sentence> || std::same_as<R, Task>;
}  // namespace route

namespace moe::detail {

// Option kinds, each recognized by a trait.
template <class T> struct is_experts : std::false_type {};
template <int E> struct is_experts<Experts<E>> : std::true_type {};
template <class T> struct is_top_k : std::false_type {};
template <int K> struct is_top_k<TopK<K>> : std::true_type {};
template <class T> struct is_capacity : std::false_type {};
template <std::int64_t N, std::int64_t D, std::int64_t M, std::int64_t R>
struct is_capacity<CapacityFactor<N, D, M, R>> : std::true_type {};
template <std::int64_t C> struct is_capacity<CapacityFixed<C>> : std::true_type {};
template <> struct is_capacity<Dropless> : std::true_type {};
template <class T> struct is_second : std::false_type {};
template <> struct is_second<SecondExpertAll> : std::true_type {};
template <std::int64_t N, std::int64_t D> struct is_second<SecondExpertRandom<N, D>> : std::true_type {};
template <class T> struct is_normalize : std::false_type {};
template <> struct is_normalize<NormalizeBeforeDrop> : std::true_type {};
template <> struct is_normalize<NormalizeAfterDrop> : std::true_type {};
template <> struct is_normalize<NoNormalize> : std::true_type {};
template <class T> struct is_aux : std::false_type {};
template <std::int64_t N, std::int64_t D> struct is_aux<AuxLoss<N, D>> : std::true_type {};
template <class T> struct is_z : std::false_type {};
template <std::int64_t N, std::int64_t D> struct is_z<ZLoss<N, D>> : std::true_type {};
template <class T> struct is_activation : std::false_type {};
template <class A> struct is_activation<ExpertActivation<A>> : std::true_type {};

template <template <class> class Pred, class... Ts>
inline constexpr int count_v = (0 + ... + (Pred<Ts>::value ? 1 : 0));

/// The first option satisfying Pred, or Default.
template <template <class> class Pred, class Default, class... Ts>
struct find {
  using type = Default;
};
template <template <class> class Pred, class Default, class T, class... Ts>
struct find<Pred, Default, T, Ts...> {
  using type = std::conditional_t<Pred<T>::value, T, typename find<Pred, Default, Ts...>::type>;
};
template <template <class> class Pred, class Default, class... Ts>
using find_t = typename find<Pred, Default, Ts...>::type;

template <class T>
inline constexpr bool is_option_v = is_experts<T>::value || is_top_k<T>::value || is_capacity<T>::value ||
                                    is_second<T>::value || is_normalize<T>::value || is_aux<T>::value ||
                                    is_z<T>::value || is_activation<T>::value;

}  // namespace moe::detail

namespace moe {

/// The compile-time configuration of one MoE layer. See the file comment for the options and defaults.
template <route::Granularity Route, class... Options>
struct Config {
  static_assert((detail::is_option_v<Options> && ...),
                "moe::Config<Route, Options...>: every option must be one of Experts<E>, TopK<K>, "
                "CapacityFactor<...>, CapacityFixed<C>, Dropless, SecondExpertAll, SecondExpertRandom<...>, "
                "NormalizeBeforeDrop, NormalizeAfterDrop, NoNormalize, AuxLoss<...>, ZLoss<...>, "
                "ExpertActivation<Act>.");
  static_assert(detail::count_v<detail::is_experts, Options...> == 1,
                "moe::Config: give the expert count exactly once, e.g. tmoe::Experts<32>.");
  static_assert(detail::count_v<detail::is_top_k, Options...> <= 1, "moe::Config: TopK<K> given more than once.");
  static_assert(detail::count_v<detail::is_capacity, Options...> <= 1,
                "moe::Config: give at most one capacity option (CapacityFactor, CapacityFixed or Dropless).");
  static_assert(detail::count_v<detail::is_second, Options...> <= 1,
                "moe::Config: give at most one second-expert policy.");
  static_assert(detail::count_v<detail::is_normalize, Options...> <= 1,
                "moe::Config: give at most one gate normalization policy.");
  static_assert(detail::count_v<detail::is_aux, Options...> <= 1, "moe::Config: AuxLoss given more than once.");
  static_assert(detail::count_v<detail::is_z, Options...> <= 1, "moe::Config: ZLoss given more than once.");
  static_assert(detail::count_v<detail::is_activation, Options...> <= 1,
                "moe::Config: ExpertActivation given more than once.");

  using route_type = Route;
  static constexpr int experts = detail::find_t<detail::is_experts, Experts<1>, Options...>::value;
  static constexpr int top_k = detail::find_t<detail::is_top_k, TopK<2>, Options...>::value;

  static_assert(top_k <= experts,
                "moe::Config: TopK<K> must not exceed Experts<E>: a token cannot choose more distinct experts than "
                "exist. Lower K or raise E.");

  using capacity_type = detail::find_t<detail::is_capacity,
                                       std::conditional_t<std::is_same_v<Route, route::Task>, Dropless, CapacityFactor<2>>,
                                       Options...>;
  using second_expert_type = detail::find_t<detail::is_second, SecondExpertAll, Options...>;
  using normalize_type = detail::find_t<detail::is_normalize,
                                        std::conditional_t<top_k == 1, NoNormalize, NormalizeBeforeDrop>, Options...>;
  using aux_loss_type = detail::find_t<detail::is_aux, AuxLoss<1, 100>, Options...>;
  using z_loss_type = detail::find_t<detail::is_z, ZLoss<0>, Options...>;
  using activation_type = typename detail::find_t<detail::is_activation, ExpertActivation<nn::Relu>, Options...>::type;

  static_assert(!(second_expert_type::random && top_k == 1),
                "moe::Config: SecondExpertRandom needs TopK<K> with K >= 2; with K = 1 there is no second expert.");

  static constexpr bool dropless = capacity_type::dropless;
  static constexpr double aux_loss_coefficient = aux_loss_type::coefficient;
  static constexpr double z_loss_coefficient = z_loss_type::coefficient;
};

/// lingvo `Top2GatingOnLogits` with legacy_mtf_behavior=True (paper-spec 2.3): top-2, C = floor(S*cf/E) with 0 -> 4
/// and rounding up to a multiple of 4, every second expert used ('all'), weights normalized before dropping and
/// never renormalized, aux loss coefficient 1e-2.
template <route::Granularity Route, int E, std::int64_t CfNum = 2, std::int64_t CfDen = 1>
using LingvoLegacy = Config<Route, Experts<E>, TopK<2>, CapacityFactor<CfNum, CfDen, 4, 4>, SecondExpertAll,
                            NormalizeBeforeDrop, AuxLoss<1, 100>>;

/// GShard Algorithm 1 as in lingvo's 'random' policy: second expert with probability min(1, 2 g2), C = 2S/E.
template <route::Granularity Route, int E>
using GShardPaper = Config<Route, Experts<E>, TopK<2>, CapacityFactor<2>, SecondExpertRandom<1, 2>,
                           NormalizeBeforeDrop, AuxLoss<1, 100>>;

/// Switch Transformer top-1: raw probability as the gate, C = floor(1.25 S / E).
template <route::Granularity Route, int E>
using SwitchTop1 = Config<Route, Experts<E>, TopK<1>, CapacityFactor<5, 4>, NoNormalize, AuxLoss<1, 100>>;

}  // namespace moe
}  // namespace tmoe
