#pragma once
// Helpers for tmoe's CUDA tests: random host tensors moved to the device, poisoned outputs, and comparisons with the
// CPU back-end by relative error (NaN never passes).

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "../test_util.hpp"
#include "tmoe/cuda.cuh"

namespace tmoe::test {

/// Fills a device tensor with all-ones bytes: NaN for float, double, bf16 and f16, -1 for integers. Every output is
/// poisoned before an op runs, so an element the op fails to write shows up as NaN or -1.
template <class T>
void poison(CudaContext& ctx, TensorView<T, Cuda> t) {
  if (t.numel() == 0) return;
  TMOE_CUDA_CHECK(cudaMemsetAsync(t.data(), 0xFF, static_cast<std::size_t>(t.numel()) * sizeof(T), ctx.stream()));
}

/// A scalar as double: bf16 and f16 go through float, their only conversion.
template <class S>
double as_double(S x) {
  if constexpr (std::is_same_v<S, bf16> || std::is_same_v<S, f16>)
    return static_cast<double>(static_cast<float>(x));
  else
    return static_cast<double>(x);
}
/// A double as scalar S, rounded once (through float for bf16 and f16, which is exact for values already in range).
template <class S>
S from_double(double x) {
  if constexpr (std::is_same_v<S, bf16> || std::is_same_v<S, f16>)
    return S(static_cast<float>(x));
  else
    return static_cast<S>(x);
}

/// A host tensor of `shape` with uniform values in [lo, hi) from `seed`, rounded to S.
template <class S>
Tensor<S, Cpu> random_host(Shape shape, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  Tensor<S, Cpu> t(shape);
  const Philox rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const auto w = rng.block(static_cast<std::uint64_t>(i), 0xC0FFEEu);
    t.data()[i] = from_double<S>(lo + (hi - lo) * uniform01(w[0], w[1]));
  }
  return t;
}

/// Elements of a host tensor converted to another scalar type (e.g. bf16 inputs as float for the CPU reference).
template <class To, class From>
Tensor<To, Cpu> convert(ConstTensorView<From, Cpu> t) {
  Tensor<To, Cpu> out(t.shape());
  for (std::int64_t i = 0; i < t.numel(); ++i) out.data()[i] = from_double<To>(as_double(t.data()[i]));
  return out;
}

/// rel_error of a device result against a host reference of another scalar type, compared in double.
template <class S, class R>
double rel_error_vs(CudaContext& ctx, ConstTensorView<S, Cuda> got, ConstTensorView<R, Cpu> want) {
  REQUIRE(got.shape() == want.shape());
  const Tensor<S, Cpu> h = to_host<S>(ctx, got);
  std::vector<double> a(static_cast<std::size_t>(h.numel())), b(a.size());
  for (std::int64_t i = 0; i < h.numel(); ++i) {
    a[static_cast<std::size_t>(i)] = as_double(h.data()[i]);
    b[static_cast<std::size_t>(i)] = as_double(want.data()[i]);
  }
  return rel_error(a.data(), b.data(), h.numel());
}

}  // namespace tmoe::test
