#pragma once
/// @file config.hpp
/// @brief The library's only general-purpose macros.
///
/// TMOE_HOST_DEVICE marks small helpers (index arithmetic, the counter-based generator, bf16
/// conversion) that CUDA kernels also call. TMOE_ASSERT checks internal invariants and is compiled
/// out with NDEBUG; bad input at an API boundary throws instead (see core/error.hpp).

#include <cstdio>
#include <cstdlib>

#if defined(__CUDACC__)
#define TMOE_HOST_DEVICE __host__ __device__
#else
#define TMOE_HOST_DEVICE
#endif  // defined(__CUDACC__)

#if defined(NDEBUG)
#define TMOE_ASSERT(cond, why) ((void)0)
#else
#define TMOE_ASSERT(cond, why)                                                         \
  ((cond) ? (void)0                                                                    \
          : (std::fprintf(stderr, "%s:%d: tmoe internal invariant broken: %s (%s)\n", \
                          __FILE__, __LINE__, #cond, why),                             \
             std::abort()))
#endif  // defined(NDEBUG)
