#pragma once
/// @file storage.cuh
/// @brief Storage<T, Cuda>: RAII over stream-ordered device memory (cudaMallocAsync / cudaFreeAsync).
///
/// Allocation, zero-fill and release are ordered on the legacy default stream, which every blocking stream (the
/// CudaContext's among them) synchronizes with, so a buffer is ready before any op on the context's stream reads it
/// and is freed only after the work queued before its release. A Tensor<T, Cuda>(shape) is zero-filled like its CPU
/// counterpart. Allocating inside a CUDA-graph capture is not allowed; reused buffers (Tensor::resize keeps the
/// allocation when the element count is unchanged) make a second forward pass allocation-free.

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/core/storage.hpp"

namespace tmoe {

template <class T>
class Storage<T, Cuda> {
 public:
  Storage() = default;
  explicit Storage(std::int64_t count) : size_(count) {
    if (count < 0) throw ShapeError("Storage<Cuda>: negative element count " + std::to_string(count));
    if (count == 0) return;
    void* p = nullptr;
    TMOE_CUDA_CHECK(cudaMallocAsync(&p, bytes(), cudaStreamLegacy));
    data_ = static_cast<T*>(p);
    const cudaError_t fill = cudaMemsetAsync(p, 0, bytes(), cudaStreamLegacy);
    if (fill != cudaSuccess) {
      release();
      backend::cuda::check_cuda(fill, "cudaMemsetAsync(storage, 0)", __FILE__, __LINE__);
    }
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  Storage(Storage&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Storage& operator=(Storage&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~Storage() { release(); }

  [[nodiscard]] T* data() noexcept { return data_; }
  [[nodiscard]] const T* data() const noexcept { return data_; }
  [[nodiscard]] std::int64_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return static_cast<std::size_t>(size_) * sizeof(T); }

 private:
  void release() noexcept {
    // A failed free cannot be reported from a destructor; the memory is then lost, never double-freed.
    if (data_) static_cast<void>(cudaFreeAsync(data_, cudaStreamLegacy));
    data_ = nullptr;
  }
  T* data_ = nullptr;
  std::int64_t size_ = 0;
};

}  // namespace tmoe
