#pragma once
/// @file tensor.hpp
/// @brief Tensor<Scalar, Device>: an owning, move-only, contiguous row-major tensor.
///
/// @code
/// tmoe::Tensor<float, tmoe::Cpu> x({37, 24});   // zero-filled
/// x.view()(3, 5) = 1.0f;
/// tmoe::ConstTensorView<float, tmoe::Cpu> cx = x;
/// @endcode

#include <cstdint>
#include <utility>

#include "tmoe/core/shape.hpp"
#include "tmoe/core/storage.hpp"
#include "tmoe/core/tensor_view.hpp"

namespace tmoe {

template <class Scalar, DeviceTag Device>
class Tensor {
 public:
  using value_type = Scalar;
  using device_type = Device;

  Tensor() = default;
  /// Allocates a zero-filled tensor of `shape`.
  explicit Tensor(Shape shape) : storage_(shape.numel()), shape_(shape) {}
  Tensor(std::initializer_list<std::int64_t> extents) : Tensor(Shape(extents)) {}

  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  ~Tensor() = default;

  [[nodiscard]] Scalar* data() noexcept { return storage_.data(); }
  [[nodiscard]] const Scalar* data() const noexcept { return storage_.data(); }
  [[nodiscard]] const Shape& shape() const noexcept { return shape_; }
  [[nodiscard]] int rank() const noexcept { return shape_.rank(); }
  [[nodiscard]] std::int64_t numel() const noexcept { return shape_.numel(); }
  [[nodiscard]] std::int64_t dim(int i) const { return shape_[i]; }
  [[nodiscard]] std::size_t bytes() const noexcept { return storage_.bytes(); }

  [[nodiscard]] TensorView<Scalar, Device> view() noexcept { return {data(), shape_}; }
  [[nodiscard]] ConstTensorView<Scalar, Device> view() const noexcept { return {data(), shape_}; }
  [[nodiscard]] ConstTensorView<Scalar, Device> cview() const noexcept { return {data(), shape_}; }

  operator TensorView<Scalar, Device>() noexcept { return view(); }                 // NOLINT
  operator ConstTensorView<Scalar, Device>() const noexcept { return cview(); }     // NOLINT

  /// Reallocates (zero-filled) only when the element count changes; otherwise only reshapes.
  void resize(Shape shape) {
    if (shape.numel() != storage_.size()) storage_ = Storage<Scalar, Device>(shape.numel());
    shape_ = shape;
  }

 private:
  Storage<Scalar, Device> storage_;
  Shape shape_;
};

}  // namespace tmoe
