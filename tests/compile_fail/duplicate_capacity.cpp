// expect: give at most one capacity option
#include <tmoe/tmoe.hpp>
using Bad = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<4>, tmoe::Dropless, tmoe::CapacityFactor<2>>;
static_assert(Bad::dropless);
int main() {}
