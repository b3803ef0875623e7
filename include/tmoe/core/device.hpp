#pragma once
/// @file device.hpp
/// @brief Device tags. The back-end is a type, never a run-time value.

#include <concepts>
#include <string_view>

namespace tmoe {

/// The CPU back-end: Eigen GEMMs and plain loops, threads from a CpuContext.
struct Cpu {};
/// The CUDA back-end: cuBLAS, CUB and Thrust. Only usable from .cu files that include <tmoe/cuda.cuh>.
struct Cuda {};

/// Satisfied by exactly the device tags the library knows.
template <class D>
concept DeviceTag = std::same_as<D, Cpu> || std::same_as<D, Cuda>;

/// The device's name, for error messages.
template <DeviceTag D>
inline constexpr std::string_view device_name_v = std::same_as<D, Cpu> ? "Cpu" : "Cuda";

}  // namespace tmoe
