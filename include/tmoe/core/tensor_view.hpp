#pragma once
/// @file tensor_view.hpp
/// @brief Non-owning views of contiguous row-major tensors.
///
/// `TensorView<float, Cpu>` is mutable; `ConstTensorView<float, Cpu>` (= `TensorView<const float, Cpu>`)
/// is read-only. A mutable view converts to a const view. Views never own memory and are cheap to copy.

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

#include "tmoe/core/device.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/shape.hpp"

namespace tmoe {

/// A contiguous row-major view. `T` may be const-qualified.
template <class T, DeviceTag Device>
class TensorView {
 public:
  using value_type = std::remove_const_t<T>;
  using device_type = Device;

  TensorView() = default;
  TensorView(T* data, Shape shape) : data_(data), shape_(shape) {
    if (data == nullptr && shape.numel() != 0) {
      throw ShapeError("TensorView: null data for non-empty shape " + shape.to_string());
    }
  }

  /// Mutable → const conversion.
  template <class U>
    requires(std::is_const_v<T> && std::same_as<std::remove_const_t<T>, U>)
  TensorView(const TensorView<U, Device>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.data()), shape_(other.shape()) {}

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] const Shape& shape() const noexcept { return shape_; }
  [[nodiscard]] int rank() const noexcept { return shape_.rank(); }
  [[nodiscard]] std::int64_t numel() const noexcept { return shape_.numel(); }
  [[nodiscard]] std::int64_t dim(int i) const { return shape_[i]; }
  [[nodiscard]] bool empty() const noexcept { return numel() == 0; }

  /// Rows [begin, end) of dimension 0, still contiguous.
  [[nodiscard]] TensorView rows(std::int64_t begin, std::int64_t end) const {
    if (rank() == 0 || begin < 0 || end < begin || end > shape_[0]) {
      throw ShapeError("TensorView::rows: range [" + std::to_string(begin) + ", " + std::to_string(end) +
                       ") out of bounds for shape " + shape_.to_string());
    }
    return TensorView(data_ + begin * shape_.row_numel(), shape_.with_rows(end - begin));
  }

  /// The same elements under another shape with the same element count.
  [[nodiscard]] TensorView reshape(Shape s) const {
    if (s.numel() != numel()) {
      throw ShapeError("TensorView::reshape: cannot view " + shape_.to_string() + " (" + std::to_string(numel()) +
                       " elements) as " + s.to_string() + " (" + std::to_string(s.numel()) + " elements)");
    }
    return TensorView(data_, s);
  }

  /// Element access for host views (row-major). Not bounds-checked.
  template <class... I>
    requires(std::same_as<Device, Cpu> && (std::is_integral_v<I> && ...))
  T& operator()(I... idx) const noexcept {
    const std::int64_t ix[] = {static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (int d = 0; d < static_cast<int>(sizeof...(I)); ++d) off = off * shape_[d] + ix[d];
    return data_[off];
  }

  /// All elements as a span (host views only).
  [[nodiscard]] std::span<T> span() const noexcept
    requires std::same_as<Device, Cpu>
  {
    return {data_, static_cast<std::size_t>(numel())};
  }

 private:
  T* data_ = nullptr;
  Shape shape_;
};

template <class T, DeviceTag Device>
using ConstTensorView = TensorView<const T, Device>;

/// Throws ShapeError unless `view` has exactly `expected` shape.
template <class T, class D>
void require_shape(std::string_view op, std::string_view arg, const TensorView<T, D>& view, const Shape& expected) {
  if (!(view.shape() == expected)) {
    throw ShapeError(std::string(op) + ": " + std::string(arg) + " must have shape " + expected.to_string() +
                     " but has shape " + view.shape().to_string());
  }
}

}  // namespace tmoe
