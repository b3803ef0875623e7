// expect: SecondExpertRandom needs TopK<K> with K >= 2
#include <tmoe/tmoe.hpp>
using Bad = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<4>, tmoe::TopK<1>, tmoe::SecondExpertRandom<1, 2>>;
static_assert(Bad::top_k == 1);
int main() {}
