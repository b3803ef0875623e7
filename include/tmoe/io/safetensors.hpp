#pragma once
/// @file safetensors.hpp
/// @brief Reading and writing safetensors files: SafetensorsFile (validating reader) and SafetensorsWriter
/// (atomic writer).
///
/// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. The JSON
/// object maps each tensor name to {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} (offsets
/// relative to the data buffer) and may hold "__metadata__", an object of string -> string.
///
/// What the reader accepts (anything else is an IoError naming the file and the problem, never a crash):
/// - dtypes F32, F64, F16, BF16, I32, I64; ranks 0 to 4; extents and offsets non-negative integers;
/// - every tensor's byte range equal to numel x dtype size, inside the data buffer;
/// - the tensors tile the data buffer exactly: sorted by offset, each starts where the previous ends, the
///   first at 0 and the last at the end of the file. Gaps, overlaps and trailing bytes are errors, as in the
///   reference implementation's validation;
/// - no duplicate keys anywhere in the header and no nesting deeper than the format needs; unknown fields in
///   a tensor entry are ignored (the reference implementation ignores them too).
///
/// @code
/// tmoe::io::SafetensorsWriter w;
/// w.add("decoder.wi", wi.cview());                        // stored as F32
/// w.add("decoder.wo", wo.cview(), tmoe::io::DType::kBF16);  // rounded to nearest even
/// w.set_metadata("format", "pt");
/// w.write("model.safetensors");                           // temporary file + rename
///
/// auto f = tmoe::io::SafetensorsFile::read("model.safetensors");
/// auto wo2 = f.read<float>("decoder.wo");                 // BF16 -> float
/// @endcode

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "tmoe/config.hpp"
#include "tmoe/core/bf16.hpp"
#include "tmoe/core/error.hpp"
#include "tmoe/core/f16.hpp"
#include "tmoe/core/shape.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/core/tensor_view.hpp"
#include "tmoe/io/dtype.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // fsync
#endif

namespace tmoe::io {

/// One tensor's entry in a safetensors header. `begin` and `end` are byte offsets into the data buffer.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

namespace detail {

static_assert(sizeof(f16) == 2 && sizeof(bf16) == 2, "f16 and bf16 must be exactly 16 bits");
static_assert(std::endian::native == std::endian::little || std::endian::native == std::endian::big,
              "safetensors I/O needs a little- or big-endian host");

/// "'name'" for messages.
inline std::string quote(std::string_view s) {
  std::string q;  // appended piecewise: g++ 12 misreports -Wrestrict on `literal + std::string&&` (GCC bug 105651)
  q.reserve(s.size() + 2);
  q += '\'';
  q += s;
  q += '\'';
  return q;
}
/// "'path'" for messages.
inline std::string path_str(const std::filesystem::path& p) { return quote(p.string()); }

template <std::unsigned_integral U>
constexpr U byteswap(U v) noexcept {
  U r = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) {
    r = static_cast<U>((r << 8) | (v & 0xffu));
    v = static_cast<U>(v >> 8);
  }
  return r;
}

/// Reads a little-endian unsigned integer from possibly unaligned bytes.
template <std::unsigned_integral U>
U load_le(const std::byte* p) noexcept {
  U v;
  std::memcpy(&v, p, sizeof(U));
  if constexpr (std::endian::native == std::endian::big) v = byteswap(v);
  return v;
}

/// Writes a little-endian unsigned integer to possibly unaligned bytes.
template <std::unsigned_integral U>
void store_le(std::byte* p, U v) noexcept {
  if constexpr (std::endian::native == std::endian::big) v = byteswap(v);
  std::memcpy(p, &v, sizeof(U));
}

template <class S>
concept FloatScalar =
    std::same_as<S, float> || std::same_as<S, double> || std::same_as<S, f16> || std::same_as<S, bf16>;
template <class S>
concept IntScalar = std::same_as<S, std::int32_t> || std::same_as<S, std::int64_t>;

/// Whether elements of type From convert to To at all (float <-> int never does).
template <class From, class To>
inline constexpr bool convertible_v = (FloatScalar<From> && FloatScalar<To>) || (IntScalar<From> && IntScalar<To>);

/// The unsigned integer with the same bits as S.
template <class S>
using bits_t =
    std::conditional_t<sizeof(S) == 2, std::uint16_t, std::conditional_t<sizeof(S) == 4, std::uint32_t, std::uint64_t>>;

/// Element `S` from its little-endian stored bytes.
template <class S>
S load_elem(const std::byte* p) noexcept {
  if constexpr (std::same_as<S, f16> || std::same_as<S, bf16>) {
    return S::from_bits(load_le<std::uint16_t>(p));
  } else {
    return std::bit_cast<S>(load_le<bits_t<S>>(p));
  }
}

/// Element `S` to its little-endian stored bytes.
template <class S>
void store_elem(std::byte* p, S v) noexcept {
  if constexpr (std::same_as<S, f16> || std::same_as<S, bf16>) {
    store_le<std::uint16_t>(p, v.bits);
  } else {
    store_le<bits_t<S>>(p, std::bit_cast<bits_t<S>>(v));
  }
}

/// double -> float rounded to odd: a float with at least two more significant bits than f16 and bf16, so
/// rounding the result to nearest-even once more gives the correctly rounded f16 / bf16 of `d`.
inline float round_to_odd_float(double d) noexcept {
  const float f = static_cast<float>(d);
  if (std::isnan(d) || static_cast<double>(f) == d) return f;
  auto bits = std::bit_cast<std::uint32_t>(f);
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) --bits;  // truncate toward zero
  return std::bit_cast<float>(bits | 1u);
}

/// float for float/f16/bf16 (exact), double for double.
template <FloatScalar S>
auto widen(S v) noexcept {
  if constexpr (std::same_as<S, double>) {
    return v;
  } else {
    return static_cast<float>(v);
  }
}

/// The floating type To nearest to `w` (float or double), ties to even.
template <FloatScalar To, class W>
To narrow(W w) noexcept {
  if constexpr (std::same_as<To, float> || std::same_as<To, double>) {
    return static_cast<To>(w);
  } else if constexpr (std::same_as<W, double>) {
    return To(round_to_odd_float(w));
  } else {
    return To(w);
  }
}

/// Converts one element between two convertible types (integers: the caller checked the range).
template <class To, class From>
To convert_elem(From v) noexcept {
  if constexpr (std::same_as<To, From>) {
    return v;
  } else if constexpr (FloatScalar<To>) {
    return narrow<To>(widen(v));
  } else {
    return static_cast<To>(v);
  }
}

/// Whether integer `v` fits To (always true for floating types and widening).
template <class To, class From>
bool fits(From v) noexcept {
  if constexpr (IntScalar<To> && IntScalar<From> && sizeof(To) < sizeof(From)) {
    return v >= static_cast<From>(std::numeric_limits<To>::min()) &&
           v <= static_cast<From>(std::numeric_limits<To>::max());
  } else {
    return true;
  }
}

/// Calls `f(std::type_identity<S>{})` with S the C++ element type of `t`.
template <class F>
void visit_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      f(std::type_identity<float>{});
      return;
    case DType::kF64:
      f(std::type_identity<double>{});
      return;
    case DType::kF16:
      f(std::type_identity<f16>{});
      return;
    case DType::kBF16:
      f(std::type_identity<bf16>{});
      return;
    case DType::kI32:
      f(std::type_identity<std::int32_t>{});
      return;
    case DType::kI64:
      f(std::type_identity<std::int64_t>{});
      return;
  }
  TMOE_ASSERT(false, "visit_dtype: invalid DType");
}

/// Decodes `n` stored elements of type S into `out`, converting to T.
template <class S, class T>
void decode(const std::byte* in, T* out, std::size_t n) noexcept {
  constexpr std::size_t width = dtype_size(dtype_of_v<S>);
  if constexpr (std::same_as<S, T> && std::endian::native == std::endian::little) {
    if (n != 0) std::memcpy(static_cast<void*>(out), in, n * width);
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = convert_elem<T>(load_elem<S>(in + i * width));
  }
}

/// Encodes `n` elements of T as stored type S.
template <class S, class T>
void encode(const T* in, std::byte* out, std::size_t n) noexcept {
  constexpr std::size_t width = dtype_size(dtype_of_v<S>);
  if constexpr (std::same_as<S, T> && std::endian::native == std::endian::little) {
    if (n != 0) std::memcpy(out, static_cast<const void*>(in), n * width);
  } else {
    for (std::size_t i = 0; i < n; ++i) store_elem<S>(out + i * width, convert_elem<S>(in[i]));
  }
}

/// a * b, or false on overflow.
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

/// A Shape from `rank` (0..4) extents.
inline Shape make_shape(const std::int64_t* e, int rank) { return Shape::from_extents(e, rank); }

/// The shape's extents as a JSON-ready vector.
inline std::vector<std::int64_t> extents(const Shape& s) {
  std::vector<std::int64_t> v;
  for (int i = 0; i < s.rank(); ++i) v.push_back(s[i]);
  return v;
}

/// Whether `s` is valid UTF-8 (what the JSON writer accepts).
inline bool is_valid_utf8(std::string_view s) {
  try {
    (void)nlohmann::json(s).dump();
    return true;
  } catch (const nlohmann::json::exception&) {
    return false;
  }
}

/// A hard-to-guess hexadecimal suffix for temporary file names.
inline std::string unique_suffix() {
  static std::atomic<std::uint64_t> counter{0};
  auto x = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  x ^= (counter.fetch_add(1) + 1) * 0x9E3779B97F4A7C15ull;
  try {
    std::random_device rd;
    x ^= (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  } catch (...) {  // NOLINT(bugprone-empty-catch): no entropy source; the time and counter still differ
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s(16, '0');
  for (std::size_t i = 0; i < 16; ++i) s[15 - i] = kHex[(x >> (4 * i)) & 0xfu];
  return s;
}

/// Writes `pieces` to `target` atomically: a fresh temporary file in the same directory is written, flushed,
/// synced and closed, then renamed over `target`. On any failure the temporary is removed and IoError thrown;
/// `target` is either untouched or wholly replaced.
inline void write_atomically(std::string_view op, const std::filesystem::path& target,
                             std::span<const std::span<const std::byte>> pieces) {
  namespace fs = std::filesystem;
  const auto fail = [&](const std::string& what) -> IoError {
    // Built with += : g++ 12 misreports -Wrestrict on `std::string&& + literal` chains (GCC bug 105651).
    std::string m = path_str(target);
    m += ": ";
    m += what;
    return IoError(tmoe::detail::message(op, m));
  };
  if (!target.has_filename()) throw fail("the path names no file");

  struct Temp {
    fs::path path;
    std::FILE* file = nullptr;
    bool keep = false;
    Temp() = default;
    Temp(const Temp&) = delete;
    Temp& operator=(const Temp&) = delete;
    ~Temp() {
      if (file != nullptr) std::fclose(file);
      if (!keep && !path.empty()) {
        std::error_code ignored;
        fs::remove(path, ignored);
      }
    }
  } temp;

  for (int attempt = 0;; ++attempt) {
    std::string name(".");  // appended piecewise: g++ 12 misreports -Wrestrict on `literal + std::string&&`
    name += target.filename().string();
    name += ".tmp-";
    name += unique_suffix();
    fs::path candidate = target.parent_path() / name;
    errno = 0;
    temp.file = std::fopen(candidate.string().c_str(), "wbx");  // "x": fail if it exists
    if (temp.file != nullptr) {
      temp.path = std::move(candidate);
      break;
    }
    const int err = errno;
    if (err != EEXIST || attempt >= 8) {
      throw fail("cannot create temporary file " + path_str(candidate) + ": " + std::generic_category().message(err));
    }
  }

  for (const auto& piece : pieces) {
    if (piece.empty()) continue;
    if (std::fwrite(piece.data(), 1, piece.size(), temp.file) != piece.size()) {
      throw fail("writing temporary file " + path_str(temp.path) +
                 " failed: " + std::generic_category().message(errno));
    }
  }
  if (std::fflush(temp.file) != 0) {
    throw fail("flushing temporary file " + path_str(temp.path) + " failed: " + std::generic_category().message(errno));
  }
#if defined(__unix__) || defined(__APPLE__)
  if (::fsync(fileno(temp.file)) != 0) {
    throw fail("syncing temporary file " + path_str(temp.path) + " failed: " + std::generic_category().message(errno));
  }
#endif
  std::FILE* f = std::exchange(temp.file, nullptr);
  if (std::fclose(f) != 0) {
    throw fail("closing temporary file " + path_str(temp.path) + " failed: " + std::generic_category().message(errno));
  }
  std::error_code ec;
  fs::rename(temp.path, target, ec);
  if (ec) throw fail("renaming temporary file " + path_str(temp.path) + " over it failed: " + ec.message());
  temp.keep = true;
}

}  // namespace detail

/// A validated safetensors file held in memory. Every allocation is bounded by the file's size.
class SafetensorsFile {
 public:
  /// Reads and validates the whole file.
  /// @throws IoError naming `path` and the problem if it cannot be read or is not a valid safetensors file
  /// (see the file comment for the exact rules).
  [[nodiscard]] static SafetensorsFile read(const std::filesystem::path& path) { return open(path, true); }

  /// Reads and validates the header only (names, dtypes, shapes, offsets against the file's size, metadata),
  /// without reading the tensor data: for inspecting a large model file. Its tensors cannot be read.
  /// @throws IoError as read() does for everything but unreadable data bytes.
  [[nodiscard]] static SafetensorsFile read_header(const std::filesystem::path& path) { return open(path, false); }

  /// Whether the tensor data was read (false for read_header()).
  [[nodiscard]] bool has_data() const noexcept { return has_data_; }

 private:
  [[nodiscard]] static SafetensorsFile open(const std::filesystem::path& path, bool with_data) {
    static constexpr std::string_view kOp = "SafetensorsFile::read";
    namespace fs = std::filesystem;
    SafetensorsFile f;
    f.path_ = path;
    const auto fail = [&](const std::string& what) -> IoError {
      return IoError(tmoe::detail::message(kOp, detail::path_str(path) + ": " + what));
    };

    std::error_code ec;
    const fs::file_status st = fs::status(path, ec);
    if (st.type() == fs::file_type::not_found) throw fail("cannot open: no such file");
    if (ec) throw fail("cannot open: " + ec.message());
    if (!fs::is_regular_file(st)) throw fail("cannot open: not a regular file");
    const std::uintmax_t size = fs::file_size(path, ec);
    if (ec) throw fail("cannot determine the file size: " + ec.message());
    if (size > std::numeric_limits<std::size_t>::max()) throw fail("file too large for this platform");
    if (size < 8) {
      throw fail("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) throw fail("cannot open for reading");
    const auto read_exact = [&](void* dst, std::uint64_t n, std::string_view what) {
      if (n == 0) return;
      in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
      if (static_cast<std::uint64_t>(in.gcount()) != n) {
        throw fail("could not read the " + std::string(what) + " (" + std::to_string(n) +
                   " bytes): the file is shorter than its size or unreadable");
      }
    };

    std::byte len_bytes[8];
    read_exact(len_bytes, 8, "header length");
    const std::uint64_t header_len = detail::load_le<std::uint64_t>(len_bytes);
    if (header_len > size - 8) {
      throw fail("header length " + std::to_string(header_len) + " exceeds the " + std::to_string(size - 8) +
                 " bytes that follow the length field");
    }
    std::string header(static_cast<std::size_t>(header_len), '\0');
    read_exact(header.data(), header_len, "header");
    f.data_size_ = static_cast<std::size_t>(size - 8 - header_len);
    f.has_data_ = with_data;
    if (with_data) {
      f.data_.resize(f.data_size_);
      read_exact(f.data_.data(), f.data_.size(), "data buffer");
    }
    f.parse_header(header);
    return f;
  }

  void require_data(std::string_view op) const {
    if (!has_data_) {
      throw IoError(tmoe::detail::message(op, detail::path_str(path_) +
                                                  ": opened with read_header(); its tensor data was not read"));
    }
  }

 public:

  /// The path the file was read from.
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

  /// The "__metadata__" entries (empty if the header has none).
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  /// The tensor names, sorted.
  [[nodiscard]] std::vector<std::string> names() const {
    std::vector<std::string> v;
    v.reserve(infos_.size());
    for (const auto& [name, ti] : infos_) v.push_back(name);
    return v;
  }

  /// Number of tensors.
  [[nodiscard]] std::size_t size() const noexcept { return infos_.size(); }

  /// Size of the data buffer in bytes.
  [[nodiscard]] std::size_t data_size() const noexcept { return data_size_; }

  /// Whether the file holds a tensor called `name`.
  [[nodiscard]] bool contains(std::string_view name) const { return infos_.find(name) != infos_.end(); }

  /// The header entry of tensor `name`.
  /// @throws IoError naming the tensor and the file if there is no such tensor.
  [[nodiscard]] const TensorInfo& info(std::string_view name) const {
    const auto it = infos_.find(name);
    if (it == infos_.end()) {
      throw IoError("SafetensorsFile::info: no tensor " + detail::quote(name) + " in " + detail::path_str(path_));
    }
    return it->second;
  }

  /// The stored little-endian bytes of tensor `name`.
  [[nodiscard]] std::span<const std::byte> raw(std::string_view name) const {
    const TensorInfo& ti = info(name);
    require_data("SafetensorsFile::raw");
    return {data_.data() + ti.begin, static_cast<std::size_t>(ti.end - ti.begin)};
  }

  /// Throws exactly what `read_into(name, dst)` would for a destination of element type T and shape
  /// `dst_shape`, without writing anything: IoError if the tensor is missing, its dtype does not convert to T,
  /// or an I64 value does not fit T; ShapeError if the shapes differ.
  template <IoScalar T>
  void check_readable(std::string_view name, const Shape& dst_shape) const {
    static constexpr std::string_view kOp = "SafetensorsFile::read_into";
    const TensorInfo& ti = info(name);
    if (!(ti.shape == dst_shape)) {
      throw ShapeError(tmoe::detail::message(kOp, "tensor " + detail::quote(name) + " in " + detail::path_str(path_) +
                                                      " has shape " + ti.shape.to_string() + ", expected " +
                                                      dst_shape.to_string() + " (the destination's shape)"));
    }
    check_convertible<std::remove_cv_t<T>>(kOp, ti);
  }

  /// Copies tensor `name` into `dst`, converting its stored dtype to T: floating dtypes convert among
  /// themselves (rounding to nearest even, F64 -> F16/BF16 correctly rounded), integer dtypes among
  /// themselves (I64 -> I32 range-checked). `dst` is untouched if anything throws.
  /// @throws IoError if the tensor is missing, float <-> int conversion is asked for, or a value is out of
  /// range; ShapeError if `dst` does not have the stored shape.
  template <MutableIoScalar T>
  void read_into(std::string_view name, TensorView<T, Cpu> dst) const {
    check_readable<T>(name, dst.shape());
    copy_unchecked(info(name), dst.data());
  }

  /// Tensor `name` as a new Tensor<T, Cpu> of its stored shape (conversions as in read_into).
  template <MutableIoScalar T>
  [[nodiscard]] Tensor<T, Cpu> read(std::string_view name) const {
    const TensorInfo& ti = info(name);
    check_convertible<T>("SafetensorsFile::read", ti);
    Tensor<T, Cpu> out(ti.shape);
    copy_unchecked(ti, out.data());
    return out;
  }

 private:
  SafetensorsFile() = default;

  /// IoError unless stored elements of `ti` convert to T, value by value.
  template <class T>
  void check_convertible(std::string_view op, const TensorInfo& ti) const {
    require_data(op);
    detail::visit_dtype(ti.dtype, [&]<class S>(std::type_identity<S>) {
      if constexpr (!detail::convertible_v<S, T>) {
        throw IoError(tmoe::detail::message(
            op, "tensor " + detail::quote(ti.name) + " in " + detail::path_str(path_) + " is stored as " +
                    std::string(dtype_name(ti.dtype)) + ", which does not convert to the destination type " +
                    std::string(dtype_name(dtype_of_v<T>)) + " (no float <-> integer conversion)"));
      } else if constexpr (!std::same_as<S, T> && detail::IntScalar<S>) {
        constexpr std::size_t width = dtype_size(dtype_of_v<S>);
        const std::byte* p = data_.data() + ti.begin;
        const auto n = static_cast<std::size_t>((ti.end - ti.begin) / width);
        for (std::size_t i = 0; i < n; ++i) {
          const S v = detail::load_elem<S>(p + i * width);
          if (!detail::fits<T>(v)) {
            throw IoError(tmoe::detail::message(op, "tensor " + detail::quote(ti.name) + " in " +
                                                        detail::path_str(path_) + ": element " + std::to_string(i) +
                                                        " has " + std::string(dtype_name(ti.dtype)) + " value " +
                                                        std::to_string(v) + ", out of range for the destination type " +
                                                        std::string(dtype_name(dtype_of_v<T>))));
          }
        }
      }
    });
  }

  /// Decodes `ti` into `out` (which holds numel elements); the caller validated everything.
  template <class T>
  void copy_unchecked(const TensorInfo& ti, T* out) const {
    detail::visit_dtype(ti.dtype, [&]<class S>(std::type_identity<S>) {
      if constexpr (detail::convertible_v<S, T>) {
        const auto n = static_cast<std::size_t>(ti.shape.numel());
        detail::decode<S>(data_.data() + ti.begin, out, n);
      }
    });
  }

  void parse_header(const std::string& text) {
    using json = nlohmann::json;
    const auto fail = [&](const std::string& what) -> IoError {
      return IoError(tmoe::detail::message("SafetensorsFile::read", detail::path_str(path_) + ": " + what));
    };

    // The callback rejects duplicate keys (nlohmann keeps the last silently) and nesting deeper than the
    // format's top object > tensor entry > shape array.
    std::set<std::string, std::less<>> top_keys, entry_keys;
    std::string current;
    const auto guard = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
      if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) && depth >= 3) {
        throw fail("invalid header: JSON nested deeper than the format allows");
      }
      if (event == json::parse_event_t::object_start && depth == 1) entry_keys.clear();
      if (event == json::parse_event_t::key && parsed.is_string()) {
        const auto& key = parsed.get_ref<const std::string&>();
        if (depth == 1) {
          if (!top_keys.insert(key).second) throw fail("invalid header: duplicate entry " + detail::quote(key));
          current = key;
        } else if (depth == 2 && !entry_keys.insert(key).second) {
          throw fail("invalid header: duplicate key " + detail::quote(key) + " in entry " + detail::quote(current));
        }
      }
      return true;
    };
    // nlohmann's lexer takes a NUL byte for the end of the input and would ignore what follows it.
    if (const auto nul = text.find('\0'); nul != std::string::npos) {
      throw fail("invalid JSON header: NUL byte at header offset " + std::to_string(nul));
    }
    json header;
    try {
      header = json::parse(text, guard);
    } catch (const json::exception& e) {
      throw fail(std::string("invalid JSON header: ") + e.what());
    }
    if (!header.is_object()) {
      throw fail(std::string("invalid header: expected a JSON object, got ") + header.type_name());
    }

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        if (!value.is_object()) {
          throw fail(std::string("invalid header: __metadata__ must be an object, got ") + value.type_name());
        }
        for (const auto& [mk, mv] : value.items()) {
          if (!mv.is_string()) {
            throw fail("invalid header: __metadata__ value for key " + detail::quote(mk) + " must be a string, got " +
                       mv.type_name());
          }
          metadata_.emplace(mk, mv.get<std::string>());
        }
        continue;
      }
      TensorInfo ti = parse_entry(key, value, fail);
      std::string name = ti.name;
      infos_.emplace(std::move(name), std::move(ti));
    }

    // The tensors must tile the data buffer: sorted by offsets, no overlap, no gap, nothing after the last.
    std::vector<const TensorInfo*> order;
    order.reserve(infos_.size());
    for (const auto& [name, ti] : infos_) order.push_back(&ti);
    std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::uint64_t cursor = 0;
    const TensorInfo* previous = nullptr;
    for (const TensorInfo* ti : order) {
      if (ti->begin < cursor) {
        throw fail("invalid data offsets: tensor " + detail::quote(ti->name) + " [" + std::to_string(ti->begin) + ", " +
                   std::to_string(ti->end) + ") overlaps tensor " + detail::quote(previous->name) + " [" +
                   std::to_string(previous->begin) + ", " + std::to_string(previous->end) + ")");
      }
      if (ti->begin > cursor) {
        throw fail("invalid data offsets: gap of " + std::to_string(ti->begin - cursor) + " bytes at offset " +
                   std::to_string(cursor) + " before tensor " + detail::quote(ti->name));
      }
      cursor = ti->end;
      previous = ti;
    }
    if (cursor != data_size_) {
      throw fail("invalid data offsets: the tensors cover " + std::to_string(cursor) +
                 " bytes but the data buffer has " + std::to_string(data_size_) + " (trailing bytes)");
    }
  }

  template <class Fail>
  TensorInfo parse_entry(const std::string& name, const nlohmann::json& entry, const Fail& fail) const {
    using json = nlohmann::json;
    const std::string what = "invalid header: tensor " + detail::quote(name);
    if (!entry.is_object()) throw fail(what + ": expected an object, got " + entry.type_name());
    const auto field = [&](const char* key) -> const json& {
      const auto it = entry.find(key);
      if (it == entry.end()) throw fail(what + ": missing field '" + key + "'");
      return *it;
    };
    const auto non_negative = [](const json& j) {
      return j.is_number_unsigned() || (j.is_number_integer() && j.get<std::int64_t>() >= 0);
    };

    TensorInfo ti;
    ti.name = name;
    const json& dtype = field("dtype");
    if (!dtype.is_string()) throw fail(what + ": field 'dtype' must be a string, got " + dtype.type_name());
    const auto& dtype_str = dtype.get_ref<const std::string&>();
    try {
      ti.dtype = parse_dtype(dtype_str);
    } catch (const IoError&) {
      throw fail(what + ": unsupported dtype " + detail::quote(dtype_str) +
                 " (expected F32, F64, F16, BF16, I32 or I64)");
    }

    const json& shape = field("shape");
    if (!shape.is_array()) throw fail(what + ": field 'shape' must be an array, got " + shape.type_name());
    if (shape.size() > static_cast<std::size_t>(Shape::kMaxRank)) {
      throw fail(what + ": rank " + std::to_string(shape.size()) + " exceeds the supported maximum of " +
                 std::to_string(Shape::kMaxRank));
    }
    // Bytes = dtype size x the product of the extents. A zero extent makes the tensor empty, but the product
    // of the other extents must still fit (Shape::numel multiplies left to right in int64).
    std::int64_t ext[Shape::kMaxRank] = {};
    std::uint64_t product = dtype_size(ti.dtype);  // >= 2, so a product that fits uint64 leaves numel in int64
    bool overflow = false, empty = false;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      const json& e = shape[i];
      if (!non_negative(e)) {
        throw fail(what + ": shape entries must be non-negative integers, got " + e.dump() + " at index " +
                   std::to_string(i));
      }
      const auto u = e.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        throw fail(what + ": extent " + std::to_string(u) + " at index " + std::to_string(i) + " is too large");
      }
      ext[i] = static_cast<std::int64_t>(u);
      if (u == 0) {
        empty = true;
      } else if (!overflow && !detail::checked_mul(product, u, product)) {
        overflow = true;
      }
    }
    ti.shape = detail::make_shape(ext, static_cast<int>(shape.size()));
    if (overflow) {
      throw fail(what + ": shape " + ti.shape.to_string() + " x " + std::to_string(dtype_size(ti.dtype)) +
                 " bytes per element overflows 64 bits");
    }
    const std::uint64_t nbytes = empty ? 0 : product;

    const json& offsets = field("data_offsets");
    if (!offsets.is_array() || offsets.size() != 2 || !non_negative(offsets[0]) || !non_negative(offsets[1])) {
      throw fail(what + ": field 'data_offsets' must be two non-negative integers, got " + offsets.dump());
    }
    ti.begin = offsets[0].get<std::uint64_t>();
    ti.end = offsets[1].get<std::uint64_t>();
    const std::string range = "[" + std::to_string(ti.begin) + ", " + std::to_string(ti.end) + ")";
    if (ti.begin > ti.end) throw fail(what + ": data offsets " + range + " have begin > end");
    if (ti.end - ti.begin != nbytes) {
      throw fail(what + ": data offsets " + range + " span " + std::to_string(ti.end - ti.begin) + " bytes but shape " +
                 ti.shape.to_string() + " of " + std::string(dtype_name(ti.dtype)) + " needs " +
                 std::to_string(nbytes));
    }
    if (ti.end > data_size_) {
      throw fail(what + ": data offsets " + range + " exceed the data buffer of " + std::to_string(data_size_) +
                 " bytes (truncated file?)");
    }
    return ti;
  }

  std::filesystem::path path_;
  std::map<std::string, TensorInfo, std::less<>> infos_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::byte> data_;  // empty when only the header was read
  std::size_t data_size_ = 0;    // bytes after the header, from the file's size
  bool has_data_ = false;
};

/// Collects tensors and metadata, then writes them as one safetensors file.
///
/// `add` converts and copies the data at once, so views need not outlive the call. The file lays tensors out
/// contiguously in sorted name order; the JSON header is padded with spaces so the data buffer starts at an
/// 8-byte-aligned file offset. "__metadata__" is written only when metadata was set.
class SafetensorsWriter {
 public:
  /// Adds tensor `name` with the elements of `view`, converted to `stored`: floating types to F32/F64/F16/BF16
  /// (round to nearest even, NaN stays NaN), integer types to I32/I64.
  /// @throws Error if `name` was added before, is "__metadata__" or is not valid UTF-8, if `stored` is an
  /// integer dtype for floating T or vice versa, or if an int64 value does not fit I32.
  template <IoScalar T>
  void add(std::string name, ConstTensorView<T, Cpu> view, DType stored = dtype_of_v<T>) {
    static constexpr std::string_view kOp = "SafetensorsWriter::add";
    using V = std::remove_cv_t<T>;
    if (entries_.find(name) != entries_.end()) {
      throw Error(tmoe::detail::message(kOp, "duplicate tensor name " + detail::quote(name)));
    }
    if (name == "__metadata__") {
      throw Error(tmoe::detail::message(kOp, "the tensor name '__metadata__' is reserved for the metadata"));
    }
    if (!detail::is_valid_utf8(name)) {
      throw Error(tmoe::detail::message(kOp, "tensor name " + detail::quote(name) + " is not valid UTF-8"));
    }
    Entry e;
    e.dtype = stored;
    e.shape = view.shape();
    const auto n = static_cast<std::size_t>(view.numel());
    e.bytes.resize(n * dtype_size(stored));
    detail::visit_dtype(stored, [&]<class S>(std::type_identity<S>) {
      if constexpr (!detail::convertible_v<V, S>) {
        throw Error(tmoe::detail::message(
            kOp, "tensor " + detail::quote(name) + " of element type " + std::string(dtype_name(dtype_of_v<V>)) +
                     " cannot be stored as " + std::string(dtype_name(stored)) + " (no float <-> integer conversion)"));
      } else {
        if constexpr (detail::IntScalar<V>) {
          for (std::size_t i = 0; i < n; ++i) {
            if (!detail::fits<S>(view.data()[i])) {
              throw Error(tmoe::detail::message(
                  kOp, "tensor " + detail::quote(name) + ": element " + std::to_string(i) + " has value " +
                           std::to_string(view.data()[i]) + ", out of range for " + std::string(dtype_name(stored))));
            }
          }
        }
        detail::encode<S>(view.data(), e.bytes.data(), n);
      }
    });
    entries_.emplace(std::move(name), std::move(e));
  }

  /// Mutable views are added like const views.
  template <MutableIoScalar T>
  void add(std::string name, TensorView<T, Cpu> view, DType stored = dtype_of_v<T>) {
    add<T>(std::move(name), ConstTensorView<T, Cpu>(view), stored);
  }

  /// Tensors are added through their const view.
  template <IoScalar T>
  void add(std::string name, const Tensor<T, Cpu>& tensor, DType stored = dtype_of_v<T>) {
    add<T>(std::move(name), tensor.cview(), stored);
  }

  /// Sets (or replaces) metadata entry `key`.
  /// @throws Error if `key` or `value` is not valid UTF-8.
  void set_metadata(std::string key, std::string value) {
    if (!detail::is_valid_utf8(key) || !detail::is_valid_utf8(value)) {
      throw Error(tmoe::detail::message("SafetensorsWriter::set_metadata",
                                        "metadata key " + detail::quote(key) + " or its value is not valid UTF-8"));
    }
    metadata_.insert_or_assign(std::move(key), std::move(value));
  }

  /// Whether a tensor called `name` was added.
  [[nodiscard]] bool contains(std::string_view name) const { return entries_.find(name) != entries_.end(); }
  /// Number of tensors added.
  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }

  /// Writes the file atomically: a temporary file next to `path` is written, flushed, synced and closed, then
  /// renamed over `path`. On failure the temporary is removed and `path` is left as it was.
  /// @throws IoError naming `path` and the failing step.
  void write(const std::filesystem::path& path) const {
    using json = nlohmann::json;
    json header = json::object();
    std::uint64_t offset = 0;
    for (const auto& [name, e] : entries_) {
      json entry = json::object();
      entry["dtype"] = std::string(dtype_name(e.dtype));
      entry["shape"] = detail::extents(e.shape);
      entry["data_offsets"] = json::array({offset, offset + e.bytes.size()});
      header[name] = std::move(entry);
      offset += e.bytes.size();
    }
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::string text;
    try {
      text = header.dump();
    } catch (const json::exception& ex) {
      throw IoError(tmoe::detail::message("SafetensorsWriter::write",
                                          detail::path_str(path) + ": cannot encode the header: " + ex.what()));
    }
    text.append((8 - text.size() % 8) % 8, ' ');  // the data buffer starts 8-byte aligned
    std::byte len[8];
    detail::store_le<std::uint64_t>(len, text.size());

    std::vector<std::span<const std::byte>> pieces;
    pieces.reserve(entries_.size() + 2);
    pieces.emplace_back(len, 8);
    pieces.emplace_back(reinterpret_cast<const std::byte*>(text.data()), text.size());
    for (const auto& [name, e] : entries_) pieces.emplace_back(e.bytes);
    detail::write_atomically("SafetensorsWriter::write", path, pieces);
  }

 private:
  struct Entry {
    DType dtype = DType::kF32;
    Shape shape;
    std::vector<std::byte> bytes;
  };
  std::map<std::string, Entry, std::less<>> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace tmoe::io
