// expect: TopK<K> must not exceed Experts<E>
#include <tmoe/tmoe.hpp>
using Bad = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<2>, tmoe::TopK<3>>;
static_assert(Bad::top_k == 3);
int main() {}
