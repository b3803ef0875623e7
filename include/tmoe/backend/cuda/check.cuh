#pragma once
/// @file check.cuh
/// @brief Checked CUDA and cuBLAS calls: a failure throws tmoe::DeviceError naming the call, the file and the line.
///
/// @code
/// TMOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
/// my_kernel<<<grid, block, 0, stream>>>(...);
/// TMOE_CUDA_CHECK_LAUNCH("my_kernel");
/// @endcode

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "tmoe/core/error.hpp"

namespace tmoe::backend::cuda {

/// "call failed at file:line: what", e.g. "cudaMalloc(...) failed at x.cuh:12: cudaErrorMemoryAllocation (out of
/// memory)".
inline std::string call_failure(const char* call, const char* file, int line, const std::string& what) {
  std::string m(call);
  m += " failed at ";
  m += file;
  m += ":";
  m += std::to_string(line);
  m += ": ";
  m += what;
  return m;
}

inline std::string cuda_failure(const char* call, const char* file, int line, cudaError_t status) {
  std::string what = cudaGetErrorName(status);
  what += " (";
  what += cudaGetErrorString(status);
  what += ")";
  return call_failure(call, file, line, what);
}

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  // The runtime also keeps a failed call's status as its "last error"; clear it, so that it is reported once, here,
  // and not again by the next launch check. (A sticky error, one that broke the context, stays and keeps failing.)
  static_cast<void>(cudaGetLastError());
  throw DeviceError(cuda_failure(call, file, line, status));
}

inline const char* cublas_status_name(cublasStatus_t s) noexcept {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "unknown cublasStatus_t";
}

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) throw DeviceError(call_failure(call, file, line, cublas_status_name(status)));
}

}  // namespace tmoe::backend::cuda

/// Throws tmoe::DeviceError if the CUDA runtime call does not return cudaSuccess.
#define TMOE_CUDA_CHECK(call) ::tmoe::backend::cuda::check_cuda((call), #call, __FILE__, __LINE__)
/// Throws tmoe::DeviceError if the cuBLAS call does not return CUBLAS_STATUS_SUCCESS.
#define TMOE_CUBLAS_CHECK(call) ::tmoe::backend::cuda::check_cublas((call), #call, __FILE__, __LINE__)
/// After a kernel launch: throws tmoe::DeviceError naming the kernel if the launch failed.
#define TMOE_CUDA_CHECK_LAUNCH(kernel_name) \
  ::tmoe::backend::cuda::check_cuda(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
