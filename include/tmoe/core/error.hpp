#pragma once
/// @file error.hpp
/// @brief The exception hierarchy. Every message names the operation, what it expected and what it got.
///
/// Bad input at a public entry point throws one of these. Past the boundary, code trusts its inputs and
/// guards its own invariants with TMOE_ASSERT.

#include <stdexcept>
#include <string>

namespace tmoe {

/// Base of every exception the library throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A tensor, index or size does not have the shape or range an operation requires.
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// A file could not be read or written, or its contents are not what the format requires.
class IoError : public Error {
 public:
  using Error::Error;
};

/// A device call failed (CUDA, cuBLAS).
class DeviceError : public Error {
 public:
  using Error::Error;
};

namespace detail {
/// Builds "op: what" messages without iostreams.
inline std::string message(std::string_view op, std::string_view what) {
  std::string m(op);
  m += ": ";
  m += what;
  return m;
}
}  // namespace detail

}  // namespace tmoe
