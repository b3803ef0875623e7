#pragma once
/// @file copy.cuh
/// @brief Host/device copies of whole tensors, on the context's stream.
///
/// @code
/// tmoe::Tensor<float, tmoe::Cuda> d = tmoe::to_device(ctx, host_tensor);
/// tmoe::Tensor<float, tmoe::Cpu> h = tmoe::to_host(ctx, d);   // waits for the stream
/// @endcode

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/core/tensor.hpp"

namespace tmoe {

namespace backend::cuda {
template <class T, DeviceTag D1, DeviceTag D2>
void check_same_shape(const TensorView<T, D1>& dst, const TensorView<const T, D2>& src) {
  if (!(dst.shape() == src.shape())) {
    throw ShapeError("copy: destination has shape " + dst.shape().to_string() + " but the source has shape " +
                     src.shape().to_string());
  }
}
template <DeviceTag From, DeviceTag To>
constexpr cudaMemcpyKind copy_kind() noexcept {
  if constexpr (std::is_same_v<From, Cpu> && std::is_same_v<To, Cuda>)
    return cudaMemcpyHostToDevice;
  else if constexpr (std::is_same_v<From, Cuda> && std::is_same_v<To, Cpu>)
    return cudaMemcpyDeviceToHost;
  else if constexpr (std::is_same_v<From, Cuda>)
    return cudaMemcpyDeviceToDevice;
  else
    return cudaMemcpyHostToHost;
}
}  // namespace backend::cuda

/// dst = src for any pair of devices, queued on ctx's stream. A copy to the host waits for the stream before it
/// returns (the host buffer is pageable); copies to the device return at once. @throws ShapeError on a shape
/// mismatch, DeviceError if CUDA fails.
template <class T, DeviceTag To, DeviceTag From>
void copy(CudaContext& ctx, TensorView<T, To> dst, ConstTensorView<T, From> src) {
  backend::cuda::check_same_shape(dst, src);
  if (src.numel() == 0) return;
  TMOE_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), static_cast<std::size_t>(src.numel()) * sizeof(T),
                                  backend::cuda::copy_kind<From, To>(), ctx.stream()));
  if constexpr (std::is_same_v<To, Cpu>) ctx.synchronize();
}

/// A new device tensor holding a copy of `src` (host or device).
template <class T, DeviceTag From>
[[nodiscard]] Tensor<T, Cuda> to_device(CudaContext& ctx, ConstTensorView<T, From> src) {
  Tensor<T, Cuda> out(src.shape());
  copy<T, Cuda, From>(ctx, out.view(), src);
  return out;
}
template <class T, DeviceTag From>
[[nodiscard]] Tensor<T, Cuda> to_device(CudaContext& ctx, const Tensor<T, From>& src) {
  return to_device<T, From>(ctx, src.cview());
}

/// A new host tensor holding a copy of the device tensor `src`; waits for the stream.
template <class T>
[[nodiscard]] Tensor<T, Cpu> to_host(CudaContext& ctx, ConstTensorView<T, Cuda> src) {
  Tensor<T, Cpu> out(src.shape());
  copy<T, Cpu, Cuda>(ctx, out.view(), src);
  return out;
}
template <class T>
[[nodiscard]] Tensor<T, Cpu> to_host(CudaContext& ctx, const Tensor<T, Cuda>& src) {
  return to_host<T>(ctx, src.cview());
}

}  // namespace tmoe
