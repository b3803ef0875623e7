// A downstream program: includes the umbrella header, builds tensors and runs a small GEMM on the CPU back-end.
// Returns non-zero when the result is wrong. Shared by the find_package and add_subdirectory consumer projects.
#include <cstdio>
#include <tmoe/tmoe.hpp>

int main() {
  // a = [[1, 2, 3], [4, 5, 6]], b = [[7, 8], [9, 10], [11, 12]]: a * b = [[58, 64], [139, 154]] exactly.
  tmoe::Tensor<float, tmoe::Cpu> a({2, 3}), b({3, 2}), c({2, 2});
  for (int i = 0; i < 6; ++i) {
    a.data()[i] = static_cast<float>(i + 1);
    b.data()[i] = static_cast<float>(i + 7);
  }
  tmoe::CpuContext ctx{2};
  tmoe::Ops<tmoe::Cpu>::gemm<float>(ctx, c, a, tmoe::Trans::kN, b, tmoe::Trans::kN);

  const float expected[4] = {58.0f, 64.0f, 139.0f, 154.0f};
  int wrong = 0;
  for (int i = 0; i < 4; ++i) {
    if (c.data()[i] != expected[i]) {
      std::fprintf(stderr, "c[%d] = %g, expected %g\n", i, static_cast<double>(c.data()[i]),
                   static_cast<double>(expected[i]));
      ++wrong;
    }
  }
  std::printf("tmoe %d.%d.%d consumer: gemm %s\n", TMOE_VERSION_MAJOR, TMOE_VERSION_MINOR, TMOE_VERSION_PATCH,
              wrong == 0 ? "ok" : "WRONG");
  return wrong == 0 ? 0 : 1;
}
