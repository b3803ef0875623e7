// safetensors_tool: the C++ half of tests/python/crosscheck_safetensors.py.
//
//   safetensors_tool write PATH [--no-bf16]   writes the fixed tensor set below (and its metadata)
//   safetensors_tool check PATH [--no-bf16]   reads a file written by Python and checks it exactly
//
// The values are a pure function of (tensor index, element index) that is exactly representable in every
// dtype, so the Python side recomputes them independently (see crosscheck_safetensors.py, which must be
// kept in step with kSpecs and the formulas here). --no-bf16 leaves out the BF16 tensors: numpy has no
// bfloat16, so safetensors.numpy can neither save nor load them.
//
// Exit status: 0 on success, 1 if a check fails (with a message on stderr), 2 on bad usage.

#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "tmoe/core/bf16.hpp"
#include "tmoe/core/f16.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/io/safetensors.hpp"

namespace {

using tmoe::io::DType;

struct Spec {
  const char* name;
  DType dtype;
  tmoe::Shape shape;
  bool specials;  // the dtype's extreme values instead of the formula
};

// Keep in step with SPECS in crosscheck_safetensors.py.
const std::vector<Spec>& specs() {
  static const std::vector<Spec> s = {
      {"f32.matrix", DType::kF32, tmoe::Shape{3, 5}, false},
      {"f32.scalar", DType::kF32, tmoe::Shape{}, false},
      {"f32.empty", DType::kF32, tmoe::Shape{0, 4}, false},
      {"f32.specials", DType::kF32, tmoe::Shape{5}, true},
      {"f64.cube", DType::kF64, tmoe::Shape{2, 3, 4}, false},
      {"f64.specials", DType::kF64, tmoe::Shape{5}, true},
      {"f16.vector", DType::kF16, tmoe::Shape{7}, false},
      {"f16.specials", DType::kF16, tmoe::Shape{5}, true},
      {"bf16.matrix", DType::kBF16, tmoe::Shape{4, 3}, false},
      {"bf16.specials", DType::kBF16, tmoe::Shape{5}, true},
      {"i32.matrix", DType::kI32, tmoe::Shape{2, 6}, false},
      {"i32.specials", DType::kI32, tmoe::Shape{4}, true},
      {"i64.tensor4", DType::kI64, tmoe::Shape{2, 1, 2, 3}, false},
      {"i64.specials", DType::kI64, tmoe::Shape{4}, true},
  };
  return s;
}

// Keep in step with METADATA in crosscheck_safetensors.py.
const std::map<std::string, std::string>& expected_metadata() {
  static const std::map<std::string, std::string> m = {
      {"format", "pt"}, {"producer", "tmoe crosscheck"}, {"unicode", "h\xc3\xa9llo \xe2\x9c\x93"}, {"empty", ""}};
  return m;
}

// Formula values: small multiples of 1/8, exact in every floating dtype (|v| <= 6.25, at most 7 significant
// bits), and integers that need the full width of I64.
double float_value(std::size_t t, std::int64_t i) {
  const std::int64_t k = (i * 37 + static_cast<std::int64_t>(t) * 11) % 101 - 50;
  return static_cast<double>(k) / 8.0;
}
std::int64_t int_value(std::size_t t, std::int64_t i, DType d) {
  const std::int64_t k = (i * 7919 + static_cast<std::int64_t>(t) * 104729) % 20011 - 10000;
  return d == DType::kI32 ? k * 200000 + i : k * 900000000000000 + i;  // |.| < 2^31 resp. 2^63
}

// The expected elements of tensor `t` as raw little-endian-independent bit patterns (uint64 holding the bits).
std::vector<std::uint64_t> expected_bits(std::size_t t) {
  const Spec& s = specs()[t];
  std::vector<std::uint64_t> v;
  if (s.specials) {
    switch (s.dtype) {
      case DType::kF32:  // -0, inf, -inf, smallest subnormal, largest finite
        for (float f : {-0.0f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                        std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::max()}) {
          v.push_back(std::bit_cast<std::uint32_t>(f));
        }
        return v;
      case DType::kF64:
        for (double f : {-0.0, std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                         std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::max()}) {
          v.push_back(std::bit_cast<std::uint64_t>(f));
        }
        return v;
      case DType::kF16:
        return {0x8000, 0x7c00, 0xfc00, 0x0001, 0x7bff};
      case DType::kBF16:
        return {0x8000, 0x7f80, 0xff80, 0x0001, 0x7f7f};
      case DType::kI32:
        for (std::int32_t x : {std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max(),
                               std::int32_t{0}, std::int32_t{-1}}) {
          v.push_back(std::bit_cast<std::uint32_t>(x));
        }
        return v;
      case DType::kI64:
        for (std::int64_t x : {std::numeric_limits<std::int64_t>::min(), std::numeric_limits<std::int64_t>::max(),
                               std::int64_t{0}, std::int64_t{-1}}) {
          v.push_back(std::bit_cast<std::uint64_t>(x));
        }
        return v;
    }
  }
  for (std::int64_t i = 0; i < s.shape.numel(); ++i) {
    switch (s.dtype) {
      case DType::kF32:
        v.push_back(std::bit_cast<std::uint32_t>(static_cast<float>(float_value(t, i))));
        break;
      case DType::kF64:
        v.push_back(std::bit_cast<std::uint64_t>(float_value(t, i)));
        break;
      case DType::kF16:
        v.push_back(tmoe::f16(static_cast<float>(float_value(t, i))).bits);
        break;
      case DType::kBF16:
        v.push_back(tmoe::bf16(static_cast<float>(float_value(t, i))).bits);
        break;
      case DType::kI32:
        v.push_back(std::bit_cast<std::uint32_t>(static_cast<std::int32_t>(int_value(t, i, s.dtype))));
        break;
      case DType::kI64:
        v.push_back(std::bit_cast<std::uint64_t>(int_value(t, i, s.dtype)));
        break;
    }
  }
  return v;
}

// A tensor of element type T holding the expected bits of tensor `t`.
template <class T>
tmoe::Tensor<T, tmoe::Cpu> expected_tensor(std::size_t t) {
  const std::vector<std::uint64_t> bits = expected_bits(t);
  tmoe::Tensor<T, tmoe::Cpu> out(specs()[t].shape);
  for (std::size_t i = 0; i < bits.size(); ++i) {
    if constexpr (std::is_same_v<T, tmoe::f16> || std::is_same_v<T, tmoe::bf16>) {
      out.data()[i] = T::from_bits(static_cast<std::uint16_t>(bits[i]));
    } else if constexpr (sizeof(T) == 4) {
      out.data()[i] = std::bit_cast<T>(static_cast<std::uint32_t>(bits[i]));
    } else {
      out.data()[i] = std::bit_cast<T>(bits[i]);
    }
  }
  return out;
}

// The library's own dtype visitor (the tool tests the values, not this dispatch).
template <class F>
void with_type(DType d, F&& f) {
  tmoe::io::detail::visit_dtype(d, std::forward<F>(f));
}

bool skipped(const Spec& s, bool no_bf16) { return no_bf16 && s.dtype == DType::kBF16; }

void write(const std::string& path, bool no_bf16) {
  tmoe::io::SafetensorsWriter w;
  for (std::size_t t = 0; t < specs().size(); ++t) {
    if (skipped(specs()[t], no_bf16)) continue;
    with_type(specs()[t].dtype, [&]<class T>(std::type_identity<T>) {
      const auto x = expected_tensor<T>(t);
      w.add(specs()[t].name, x.cview());
    });
  }
  for (const auto& [k, v] : expected_metadata()) w.set_metadata(k, v);
  w.write(path);
}

// Returns the number of problems found (each printed to stderr).
int check(const std::string& path, bool no_bf16) {
  const auto f = tmoe::io::SafetensorsFile::read(path);
  int problems = 0;
  const auto problem = [&](const std::string& what) {
    std::fprintf(stderr, "safetensors_tool check: %s: %s\n", path.c_str(), what.c_str());
    ++problems;
  };
  if (f.metadata() != expected_metadata()) problem("metadata differs from the expected metadata");
  std::size_t expected_count = 0;
  for (std::size_t t = 0; t < specs().size(); ++t) {
    const Spec& s = specs()[t];
    if (skipped(s, no_bf16)) continue;
    ++expected_count;
    if (!f.contains(s.name)) {
      problem(std::string("missing tensor '") + s.name + "'");
      continue;
    }
    const auto& info = f.info(s.name);
    if (info.dtype != s.dtype) {
      problem(std::string("tensor '") + s.name + "' has dtype " + std::string(tmoe::io::dtype_name(info.dtype)) +
              ", expected " + std::string(tmoe::io::dtype_name(s.dtype)));
      continue;
    }
    if (!(info.shape == s.shape)) {
      problem(std::string("tensor '") + s.name + "' has shape " + info.shape.to_string() + ", expected " +
              s.shape.to_string());
      continue;
    }
    with_type(s.dtype, [&]<class T>(std::type_identity<T>) {
      const auto want = expected_tensor<T>(t);
      const auto got = f.read<T>(s.name);
      if (want.bytes() != 0 && std::memcmp(want.data(), got.data(), want.bytes()) != 0) {
        problem(std::string("tensor '") + s.name + "' differs from the expected values");
      }
    });
  }
  if (f.size() != expected_count) {
    problem("file has " + std::to_string(f.size()) + " tensors, expected " + std::to_string(expected_count));
  }
  if (problems == 0) std::printf("safetensors_tool check: %s: %zu tensors OK\n", path.c_str(), expected_count);
  return problems;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string_view> args(argv + 1, argv + argc);
  const bool no_bf16 = args.size() == 3 && args[2] == "--no-bf16";
  if (!(args.size() == 2 || no_bf16) || (args[0] != "write" && args[0] != "check")) {
    std::fprintf(stderr, "usage: safetensors_tool write|check PATH [--no-bf16]\n");
    return 2;
  }
  try {
    const std::string path(args[1]);
    if (args[0] == "write") {
      write(path, no_bf16);
      return 0;
    }
    return check(path, no_bf16) == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "safetensors_tool %s: %s\n", std::string(args[0]).c_str(), e.what());
    return 1;
  }
}
