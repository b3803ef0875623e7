// expect: Storage<T, Device>: no storage for this device here
// A Tensor on the Cuda device needs the CUDA back-end, which only <tmoe/cuda.cuh> provides, from a .cu file compiled
// by nvcc. In a plain .cpp, the primary Storage template's static_assert must say so.
#include <tmoe/tmoe.hpp>

int main() {
  tmoe::Tensor<float, tmoe::Cuda> t({2, 3});
  return static_cast<int>(t.numel());
}
