// expect: the CPU back-end computes in float or double
#include <tmoe/tmoe.hpp>
using Cfg = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<4>>;
int main() { tmoe::moe::Layer<Cfg, int, tmoe::Cpu> layer({.d_model = 4, .d_ff = 4}); (void)layer; }
