// The `tmoe` command-line tool: tmoe::cli::run for the paper's routing combinations (nn::DenseTransformer,
// TokenToken, SentenceSentence, TaskTask, TaskToken, TokenTask, and the sub-networks extracted from the task-routed
// ones), float, at the expert counts in TMOE_CLI_EXPERTS (set by CMake; default 4 8 16 32 64 128). Models of other
// types get their own tool from tmoe/cli/cli.hpp in a few lines.

#include <iostream>

#include "tmoe/cli/cli.hpp"
#include "tmoe/tmoe.hpp"

#ifndef TMOE_CLI_EXPERTS
#define TMOE_CLI_EXPERTS 4, 8, 16, 32, 64, 128
#endif

namespace {

template <class... Ts>
struct List {};
template <class... A, class... B>
List<A..., B...> operator+(List<A...>, List<B...>);

template <int E>
using Family = List<tmoe::nn::TokenToken<E>, tmoe::nn::SentenceSentence<E>, tmoe::nn::TaskTask<E>,
                    tmoe::nn::TaskToken<E>, tmoe::nn::TokenTask<E>,
                    tmoe::extract::subnetwork_t<tmoe::nn::TaskTask<E>>,
                    tmoe::extract::subnetwork_t<tmoe::nn::TaskToken<E>>,
                    tmoe::extract::subnetwork_t<tmoe::nn::TokenTask<E>>>;

template <int... Es>
using Builtin = decltype((List<tmoe::nn::DenseTransformer<>>{} + ... + Family<Es>{}));

template <class... Models>
int run(List<Models...>, int argc, char** argv) {
  return tmoe::cli::run<Models...>(argc, argv, std::cin, std::cout, std::cerr);
}

}  // namespace

int main(int argc, char** argv) { return run(Builtin<TMOE_CLI_EXPERTS>{}, argc, argv); }
