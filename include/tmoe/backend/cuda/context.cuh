#pragma once
/// @file context.cuh
/// @brief CudaContext: the device, one stream, a cuBLAS handle on it and a workspace arena. Passed explicitly to
/// every op; there are no globals.
///
/// @code
/// tmoe::CudaContext ctx;                 // device 0, a new blocking stream, float32 GEMMs in full precision
/// ctx.set_allow_tf32(true);              // opt in to TF32 tensor cores for float32 GEMMs
/// ... ops on ctx ...
/// ctx.synchronize();
/// @endcode
///
/// The stream is a blocking stream, so it is ordered with the legacy default stream that Storage<T, Cuda> allocates
/// and frees on. The workspace grows on demand and never shrinks; a pass that has run once needs no growth when
/// replayed, which keeps it capturable in a CUDA graph.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/storage.cuh"

namespace tmoe {

class CudaContext {
 public:
  /// Binds `device`, creates a blocking stream and a cuBLAS handle on it. @throws DeviceError if either fails.
  explicit CudaContext(int device = 0) : device_(device) {
    int count = 0;
    TMOE_CUDA_CHECK(cudaGetDeviceCount(&count));
    if (device < 0 || device >= count) {
      throw DeviceError("CudaContext: device " + std::to_string(device) + " requested, but " + std::to_string(count) +
                        " CUDA device(s) are visible");
    }
    TMOE_CUDA_CHECK(cudaSetDevice(device));
    TMOE_CUDA_CHECK(cudaGetDeviceProperties(&props_, device));
    TMOE_CUDA_CHECK(cudaStreamCreate(&stream_));
    const cublasStatus_t s = cublasCreate(&cublas_);
    if (s != CUBLAS_STATUS_SUCCESS) {
      static_cast<void>(cudaStreamDestroy(stream_));
      backend::cuda::check_cublas(s, "cublasCreate(&handle)", __FILE__, __LINE__);
    }
    TMOE_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    // cuBLAS gets its own fixed workspace: required for graph capture, and it keeps its choice of kernels (and so
    // the bits of a result) independent of what else is allocated.
    cublas_workspace_ = Storage<std::byte, Cuda>(kCublasWorkspaceBytes);
    TMOE_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_.data(), cublas_workspace_.bytes()));
    TMOE_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  }
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;
  ~CudaContext() {
    if (cublas_) static_cast<void>(cublasDestroy(cublas_));
    if (stream_) {
      static_cast<void>(cudaStreamSynchronize(stream_));
      static_cast<void>(cudaStreamDestroy(stream_));
    }
  }

  [[nodiscard]] int device() const noexcept { return device_; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
  [[nodiscard]] cublasHandle_t cublas() const noexcept { return cublas_; }
  [[nodiscard]] const cudaDeviceProp& properties() const noexcept { return props_; }
  [[nodiscard]] int multiprocessors() const noexcept { return props_.multiProcessorCount; }

  /// float32 GEMMs use TF32 tensor cores only when this is set (off by default).
  void set_allow_tf32(bool on) noexcept { allow_tf32_ = on; }
  [[nodiscard]] bool allow_tf32() const noexcept { return allow_tf32_; }

  /// Waits for all work queued on the stream. @throws DeviceError with the first asynchronous error, if any.
  void synchronize() const { TMOE_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  /// At least `bytes` of scratch device memory, 256-byte aligned, valid until the next call that grows it. Ops take
  /// their whole scratch in one call and carve it with WorkspaceCarver.
  [[nodiscard]] std::byte* workspace(std::size_t bytes) {
    if (bytes > workspace_.bytes()) {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      TMOE_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
      if (capture != cudaStreamCaptureStatusNone) {
        throw DeviceError("CudaContext::workspace: " + std::to_string(bytes) + " bytes needed but " +
                          std::to_string(workspace_.bytes()) +
                          " reserved while a CUDA graph is being captured; run the pass once before capturing it");
      }
      workspace_ = Storage<std::byte, Cuda>(static_cast<std::int64_t>(bytes + bytes / 4));
    }
    return workspace_.data();
  }

 private:
  static constexpr std::int64_t kCublasWorkspaceBytes = std::int64_t{32} << 20;
  int device_ = 0;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  bool allow_tf32_ = false;
  Storage<std::byte, Cuda> cublas_workspace_;
  Storage<std::byte, Cuda> workspace_;
};

namespace backend::cuda {

/// Carves typed, 256-byte aligned pieces out of one workspace block. First `reserve` every piece to size the block,
/// then `take` them in the same order from the base pointer.
class WorkspaceCarver {
 public:
  template <class T>
  void reserve(std::int64_t count) noexcept {
    bytes_ += align(static_cast<std::size_t>(count) * sizeof(T));
  }
  void reserve_bytes(std::size_t bytes) noexcept { bytes_ += align(bytes); }
  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

  void start(std::byte* base) noexcept {
    base_ = base;
    used_ = 0;
  }
  template <class T>
  [[nodiscard]] T* take(std::int64_t count) noexcept {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += align(static_cast<std::size_t>(count) * sizeof(T));
    return p;
  }
  [[nodiscard]] std::byte* take_bytes(std::size_t bytes) noexcept {
    std::byte* p = base_ + used_;
    used_ += align(bytes);
    return p;
  }

 private:
  static constexpr std::size_t align(std::size_t b) noexcept { return (b + 255) / 256 * 256; }
  std::byte* base_ = nullptr;
  std::size_t bytes_ = 0;
  std::size_t used_ = 0;
};

}  // namespace backend::cuda
}  // namespace tmoe
