// expect: TopK<K>: K must be between 1 and 8
#include <tmoe/tmoe.hpp>
using Bad = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<4>, tmoe::TopK<0>>;
static_assert(Bad::top_k == 0);
int main() {}
