// expect: (constraints not satisfied|template constraint failure|Granularity)
#include <tmoe/tmoe.hpp>
struct Expert {};
using Bad = tmoe::moe::Config<Expert, tmoe::Experts<4>>;
static_assert(Bad::experts == 4);
int main() {}
