#pragma once
/// @file ops.hpp
/// @brief Ops<Device>: the one customization point per back-end. Layers are written once against it.
///
/// The primary template is never usable; back-ends specialize it (backend/cpu/ops.hpp for Cpu,
/// backend/cuda/ops.cuh for Cuda).

#include "tmoe/core/device.hpp"
#include "tmoe/detail/dependent_false.hpp"

namespace tmoe {

template <DeviceTag Device>
struct Ops {
  static_assert(detail::dependent_false<Device>,
                "Ops<Device>: no back-end for this device in this translation unit. For Cuda, include "
                "<tmoe/cuda.cuh> from a .cu file compiled by nvcc.");
};

}  // namespace tmoe
