// expect: give the expert count exactly once
#include <tmoe/tmoe.hpp>
using Bad = tmoe::moe::Config<tmoe::route::Token, tmoe::TopK<2>>;
static_assert(Bad::top_k == 2);
int main() {}
