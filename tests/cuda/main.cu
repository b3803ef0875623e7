// The doctest runner for tmoe's CUDA tests. Without a visible GPU it reports that and exits with 77 (skipped), so a
// machine without one can build the tests and still run `ctest -L cuda` meaningfully.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstdio>

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "tmoe_cuda_tests: no CUDA device visible; skipping\n");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
