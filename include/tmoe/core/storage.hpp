#pragma once
/// @file storage.hpp
/// @brief Storage<T, Device>: an owning, move-only buffer. Back-ends specialize it.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>

#include "tmoe/core/device.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/detail/dependent_false.hpp"

namespace tmoe {

/// Primary template: only specializations are usable.
template <class T, DeviceTag Device>
class Storage {
  static_assert(detail::dependent_false<T, Device>,
                "Storage<T, Device>: no storage for this device here. For Cuda, include <tmoe/cuda.cuh> "
                "from a .cu file compiled by nvcc.");
};

/// Host storage: 64-byte aligned, value-initialized (zeros), move-only.
template <class T>
class Storage<T, Cpu> {
 public:
  static constexpr std::size_t kAlignment = 64;

  Storage() = default;
  explicit Storage(std::int64_t count) : size_(count) {
    if (count < 0) throw ShapeError("Storage: negative element count " + std::to_string(count));
    if (count == 0) return;
    data_ = static_cast<T*>(::operator new(bytes(), std::align_val_t{kAlignment}));
    std::memset(static_cast<void*>(data_), 0, bytes());
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
    if (data_) ::operator delete(static_cast<void*>(data_), std::align_val_t{kAlignment});
    data_ = nullptr;
  }
  T* data_ = nullptr;
  std::int64_t size_ = 0;
};

}  // namespace tmoe
