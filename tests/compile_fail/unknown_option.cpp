// expect: every option must be one of
#include <tmoe/tmoe.hpp>
struct NotAnOption {};
using Bad = tmoe::moe::Config<tmoe::route::Token, tmoe::Experts<4>, NotAnOption>;
static_assert(Bad::experts == 4);
int main() {}
