#pragma once
/// @file cuda.cuh
/// @brief Umbrella header for .cu files: everything <tmoe/tmoe.hpp> has, plus the CUDA back-end.
///
/// @code
/// #include <tmoe/cuda.cuh>
/// tmoe::CudaContext ctx;
/// tmoe::Tensor<tmoe::bf16, tmoe::Cuda> x({16384, 1024});
/// tmoe::moe::Layer<Cfg, tmoe::bf16, tmoe::Cuda> layer({.d_model = 1024, .d_ff = 4096});
/// @endcode
///
/// Compile with nvcc, C++20 and --expt-relaxed-constexpr (the tmoe::cuda CMake target adds both): the host-device
/// helpers shared with the CPU back-end (Philox, bf16 rounding, activations) are constexpr functions.

#if !defined(__CUDACC__)
#error "<tmoe/cuda.cuh> must be compiled by nvcc (a .cu file); .cpp files include <tmoe/tmoe.hpp>"
#endif
#if !defined(__CUDACC_RELAXED_CONSTEXPR__)
#error "<tmoe/cuda.cuh> needs nvcc --expt-relaxed-constexpr (the tmoe::cuda CMake target adds it)"
#endif

#include "tmoe/backend/cuda/check.cuh"
#include "tmoe/backend/cuda/context.cuh"
#include "tmoe/backend/cuda/copy.cuh"
#include "tmoe/backend/cuda/elementwise.cuh"
#include "tmoe/backend/cuda/gather_scatter.cuh"
#include "tmoe/backend/cuda/gemm.cuh"
#include "tmoe/backend/cuda/numeric.cuh"
#include "tmoe/backend/cuda/ops.cuh"
#include "tmoe/backend/cuda/reduce.cuh"
#include "tmoe/backend/cuda/storage.cuh"
#include "tmoe/backend/cuda/top_k.cuh"
#include "tmoe/moe/cuda_layer.cuh"
#include "tmoe/train/cuda_adamw.cuh"
#include "tmoe/tmoe.hpp"
