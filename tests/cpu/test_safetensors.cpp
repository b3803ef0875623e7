// safetensors I/O: round trips for every dtype, conversions, metadata, state dicts, atomic writes, and every
// kind of corrupt file (hand-crafted byte by byte here, never produced by the writer).

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "../test_util.hpp"
#include "tmoe/core/bf16.hpp"
#include "tmoe/core/f16.hpp"
#include "tmoe/core/named_tensor.hpp"
#include "tmoe/core/tensor.hpp"
#include "tmoe/io/dtype.hpp"
#include "tmoe/io/safetensors.hpp"
#include "tmoe/io/state_dict.hpp"

using namespace tmoe;
using namespace tmoe::io;
namespace fs = std::filesystem;

namespace {

/// A fresh, empty directory for one test case.
fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::path(TMOE_TEST_TMPDIR) / "io" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

/// The names of the entries of `dir`, sorted.
std::vector<std::string> listing(const fs::path& dir) {
  std::vector<std::string> v;
  for (const auto& e : fs::directory_iterator(dir)) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// 8 little-endian bytes of `v`.
std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xffu);
  return s;
}

/// A file: the header's length, the header, then `data`.
std::string file_bytes(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

/// `n` little-endian F32 values 1, 2, 3, ...
std::string f32_data(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) {
    const auto u = std::bit_cast<std::uint32_t>(static_cast<float>(i + 1));
    for (int b = 0; b < 4; ++b) s.push_back(static_cast<char>((u >> (8 * b)) & 0xffu));
  }
  return s;
}

/// The message of the exception `f()` throws, prefixed by its kind ("IoError: ..."), or a marker.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const IoError& e) {
    return std::string("IoError: ") + e.what();
  } catch (const ShapeError& e) {
    return std::string("ShapeError: ") + e.what();
  } catch (const Error& e) {
    return std::string("Error: ") + e.what();
  } catch (const std::exception& e) {
    return std::string("std::exception: ") + e.what();
  }
  return "no exception";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

/// Writes `bytes` as a file and checks that reading it throws an IoError naming the file and `problem`.
void check_corrupt(const fs::path& dir, const std::string& case_name, const std::string& bytes,
                   const std::string& problem) {
  const fs::path p = dir / (case_name + ".safetensors");
  write_bytes(p, bytes);
  const std::string msg = error_of([&] { (void)SafetensorsFile::read(p); });
  INFO("case: ", case_name);
  INFO("message: ", msg);
  CHECK(has(msg, "IoError: SafetensorsFile::read: '" + p.string() + "'"));
  CHECK(has(msg, problem));
}

template <class T>
void fill(TensorView<T, Cpu> t, std::uint64_t seed) {
  if constexpr (std::is_same_v<T, std::int32_t>) {
    test::fill_uniform(t, seed, -2.0e9, 2.0e9);
  } else if constexpr (std::is_same_v<T, std::int64_t>) {
    test::fill_uniform(t, seed, -9.0e18, 9.0e18);
  } else {
    test::fill_uniform(t, seed, -3.0, 3.0);
  }
}

template <class T>
bool same_bits(const Tensor<T, Cpu>& a, const Tensor<T, Cpu>& b) {
  if (!(a.shape() == b.shape())) return false;
  return a.bytes() == 0 || std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

}  // namespace

TEST_SUITE("io") {
  TEST_CASE("DType: names, sizes, parse") {
    CHECK(dtype_name(DType::kF32) == "F32");
    CHECK(dtype_name(DType::kF64) == "F64");
    CHECK(dtype_name(DType::kF16) == "F16");
    CHECK(dtype_name(DType::kBF16) == "BF16");
    CHECK(dtype_name(DType::kI32) == "I32");
    CHECK(dtype_name(DType::kI64) == "I64");
    for (DType t : {DType::kF32, DType::kF64, DType::kF16, DType::kBF16, DType::kI32, DType::kI64}) {
      CHECK(parse_dtype(dtype_name(t)) == t);
    }
    CHECK(dtype_size(DType::kF16) == 2);
    CHECK(dtype_size(DType::kBF16) == 2);
    CHECK(dtype_size(DType::kF32) == 4);
    CHECK(dtype_size(DType::kI32) == 4);
    CHECK(dtype_size(DType::kF64) == 8);
    CHECK(dtype_size(DType::kI64) == 8);
    static_assert(dtype_of_v<float> == DType::kF32);
    static_assert(dtype_of_v<double> == DType::kF64);
    static_assert(dtype_of_v<f16> == DType::kF16);
    static_assert(dtype_of_v<bf16> == DType::kBF16);
    static_assert(dtype_of_v<std::int32_t> == DType::kI32);
    static_assert(dtype_of_v<std::int64_t> == DType::kI64);
    static_assert(dtype_of_v<const float> == DType::kF32);
    CHECK_THROWS_WITH_AS((void)parse_dtype("U8"),
                         "parse_dtype: expected one of F32, F64, F16, BF16, I32, I64, got unsupported dtype 'U8'",
                         IoError);
    CHECK_THROWS_AS((void)parse_dtype("f32"), IoError);
  }

  TEST_CASE_TEMPLATE("round trip keeps every bit", T, float, double, f16, bf16, std::int32_t, std::int64_t) {
    const fs::path dir = fresh_dir(std::string("round_trip_") + std::string(dtype_name(dtype_of_v<T>)));
    const std::vector<Shape> shapes = {Shape{37, 5}, Shape{3, 1, 7}, Shape{0, 4}, Shape{}, Shape{2, 3, 1, 4}};
    std::vector<Tensor<T, Cpu>> src;
    SafetensorsWriter w;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      src.emplace_back(shapes[i]);
      fill(src.back().view(), 100 + i);
      w.add("t" + std::to_string(i), src.back().cview());
    }
    w.write(dir / "x.safetensors");
    CHECK(listing(dir) == std::vector<std::string>{"x.safetensors"});

    const auto f = SafetensorsFile::read(dir / "x.safetensors");
    CHECK(f.size() == shapes.size());
    CHECK(f.metadata().empty());
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const std::string name = "t" + std::to_string(i);
      INFO("tensor ", name);
      const TensorInfo& ti = f.info(name);
      CHECK(ti.name == name);
      CHECK(ti.dtype == dtype_of_v<T>);
      CHECK(ti.shape == shapes[i]);
      CHECK(ti.end - ti.begin == static_cast<std::uint64_t>(shapes[i].numel()) * dtype_size(dtype_of_v<T>));
      CHECK(same_bits(f.read<T>(name), src[i]));
      Tensor<T, Cpu> dst(shapes[i]);
      f.read_into(name, dst.view());
      CHECK(same_bits(dst, src[i]));
    }
  }

  TEST_CASE("layout: sorted names, contiguous data, 8-byte aligned data buffer, space padding") {
    const fs::path dir = fresh_dir("layout");
    Tensor<float, Cpu> a({3}), b({2, 2});
    Tensor<std::int64_t, Cpu> c({1});
    SafetensorsWriter w;
    w.add("zeta", a.cview());
    w.add("alpha", b.cview(), DType::kF16);
    w.add("mid", c.cview());
    CHECK(w.size() == 3);
    CHECK(w.contains("mid"));
    w.write(dir / "x.safetensors");

    const std::string bytes = read_bytes(dir / "x.safetensors");
    REQUIRE(bytes.size() >= 8);
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
    CHECK(n % 8 == 0);
    CHECK(bytes[8] == '{');
    const std::string header = bytes.substr(8, n);
    const auto last = header.find_last_not_of(' ');
    CHECK(header[last] == '}');
    CHECK(header.size() - last - 1 < 8);
    CHECK(bytes.size() == 8 + n + 8 + 8 + 12);

    const auto f = SafetensorsFile::read(dir / "x.safetensors");
    CHECK(f.names() == std::vector<std::string>{"alpha", "mid", "zeta"});
    CHECK(f.info("alpha").begin == 0);
    CHECK(f.info("alpha").end == 8);
    CHECK(f.info("mid").begin == 8);
    CHECK(f.info("mid").end == 16);
    CHECK(f.info("zeta").begin == 16);
    CHECK(f.info("zeta").end == 28);
    CHECK(f.data_size() == 28);
    CHECK(f.raw("mid").size() == 8);
  }

  TEST_CASE("empty file: zero tensors, with and without metadata") {
    const fs::path dir = fresh_dir("empty");
    SafetensorsWriter().write(dir / "a.safetensors");
    CHECK(read_bytes(dir / "a.safetensors") == file_bytes("{}      "));
    const auto f = SafetensorsFile::read(dir / "a.safetensors");
    CHECK(f.size() == 0);
    CHECK(f.names().empty());
    CHECK(f.metadata().empty());
    CHECK(!f.contains("x"));

    write_bytes(dir / "b.safetensors", file_bytes("{}"));  // unpadded is fine too
    CHECK(SafetensorsFile::read(dir / "b.safetensors").size() == 0);
    write_bytes(dir / "c.safetensors", file_bytes(R"({"__metadata__":{"k":"v"}})"));
    CHECK(SafetensorsFile::read(dir / "c.safetensors").metadata() == std::map<std::string, std::string>{{"k", "v"}});
  }

  TEST_CASE("read_header: names, shapes and metadata without the data, truncation still detected") {
    const fs::path dir = fresh_dir("header_only");
    Tensor<float, Cpu> a({3, 5}), b({7});
    for (std::int64_t i = 0; i < 15; ++i) a.data()[i] = static_cast<float>(i);
    save<float>(dir / "m.safetensors", {{"a", a.view()}, {"b", b.view()}}, {{"k", "v"}});
    const auto h = SafetensorsFile::read_header(dir / "m.safetensors");
    CHECK_FALSE(h.has_data());
    CHECK(h.names() == std::vector<std::string>{"a", "b"});
    CHECK(h.info("a").shape == Shape{3, 5});
    CHECK(h.data_size() == 4 * 22);
    CHECK(h.metadata().at("k") == "v");
    CHECK_THROWS_WITH_AS(static_cast<void>(h.raw("a")), doctest::Contains("read_header"), IoError);
    CHECK_THROWS_WITH_AS(static_cast<void>(h.read<float>("a")), doctest::Contains("read_header"), IoError);
    const auto full = SafetensorsFile::read(dir / "m.safetensors");
    CHECK(full.has_data());
    CHECK(full.data_size() == h.data_size());
    fs::resize_file(dir / "m.safetensors", fs::file_size(dir / "m.safetensors") - 4);
    CHECK_THROWS_WITH_AS(static_cast<void>(SafetensorsFile::read_header(dir / "m.safetensors")),
                         doctest::Contains("exceed"), IoError);
  }

  TEST_CASE("hand-crafted valid files: zero-element tensors, unknown fields, whitespace") {
    const fs::path dir = fresh_dir("valid_crafted");
    // A zero-element tensor may sit anywhere its offsets say, including between two others.
    const std::string header = R"({"b":{"dtype":"F32","shape":[0,4],"data_offsets":[8,8]},)"
                               R"( "a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":{"ignored":true}},)"
                               R"( "c":{"dtype":"F32","shape":[],"data_offsets":[8,12]}}   )";
    write_bytes(dir / "x.safetensors", file_bytes(header, f32_data(3)));
    const auto f = SafetensorsFile::read(dir / "x.safetensors");
    CHECK(f.names() == std::vector<std::string>{"a", "b", "c"});
    CHECK(f.info("b").shape == Shape{0, 4});
    const auto a = f.read<float>("a");
    CHECK(a.data()[0] == 1.0f);
    CHECK(a.data()[1] == 2.0f);
    CHECK(f.read<double>("c").data()[0] == 3.0);
    CHECK(f.read<float>("b").numel() == 0);
  }

  TEST_CASE("conversions: F32 stored as F16 / BF16 rounds like tmoe::f16 / tmoe::bf16") {
    const fs::path dir = fresh_dir("convert");
    Tensor<float, Cpu> x({37, 5});
    test::fill_uniform(x.view(), 7, -70000.0, 70000.0);  // beyond f16's range: some overflow to infinity
    x.data()[0] = 1.0f + 0.5f / 1024.0f;                 // f16 tie, stays even
    x.data()[1] = 1.0f + 1.5f / 1024.0f;                 // f16 tie, rounds up
    x.data()[2] = std::bit_cast<float>(0x3f818000u);     // bf16 tie, rounds up
    x.data()[3] = 1e-7f;                                 // f16 subnormal
    x.data()[4] = -0.0f;
    SafetensorsWriter w;
    w.add("h", x.cview(), DType::kF16);
    w.add("b", x.cview(), DType::kBF16);
    w.add("d", x.cview(), DType::kF64);
    w.write(dir / "x.safetensors");

    const auto f = SafetensorsFile::read(dir / "x.safetensors");
    CHECK(f.info("h").dtype == DType::kF16);
    CHECK(f.info("b").dtype == DType::kBF16);
    const auto h = f.read<f16>("h");
    const auto hf = f.read<float>("h");
    const auto b = f.read<bf16>("b");
    const auto bd = f.read<double>("b");
    const auto d = f.read<double>("d");
    int overflowed = 0;
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      const float v = x.data()[i];
      REQUIRE(h.data()[i].bits == f16(v).bits);
      REQUIRE(std::bit_cast<std::uint32_t>(hf.data()[i]) == std::bit_cast<std::uint32_t>(static_cast<float>(f16(v))));
      REQUIRE(b.data()[i].bits == bf16(v).bits);
      REQUIRE(bd.data()[i] == static_cast<double>(static_cast<float>(bf16(v))));
      REQUIRE(d.data()[i] == static_cast<double>(v));
      overflowed += std::isinf(hf.data()[i]) ? 1 : 0;
    }
    CHECK(overflowed > 0);
    CHECK(h.data()[0].bits == 0x3c00);
    CHECK(h.data()[1].bits == 0x3c02);
    CHECK(b.data()[2].bits == 0x3f82);
    CHECK(h.data()[4].bits == 0x8000);

    // Stored F16 read as BF16 and F32 goes through float exactly once.
    const auto hb = f.read<bf16>("h");
    for (std::int64_t i = 0; i < x.numel(); ++i)
      REQUIRE(hb.data()[i].bits == bf16(static_cast<float>(h.data()[i])).bits);
    // F64 -> F32 rounds to nearest.
    const auto df = f.read<float>("d");
    for (std::int64_t i = 0; i < x.numel(); ++i) REQUIRE(df.data()[i] == x.data()[i]);
  }

  TEST_CASE("conversions: F64 -> F16 / BF16 rounds once, not through float") {
    const fs::path dir = fresh_dir("convert_f64");
    // 1 + 2^-11 + 2^-40: float rounding gives the f16 tie 1 + 2^-11, which would then round to even (1.0);
    // correct rounding of the double gives 1 + 2^-10.
    Tensor<double, Cpu> x({4});
    x.data()[0] = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
    x.data()[1] = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);  // the same for bf16 (7 mantissa bits)
    x.data()[2] = 1e300;                                             // beyond float: infinity in both
    x.data()[3] = -std::ldexp(1.0, -30);                             // f16 underflow to -0
    SafetensorsWriter w;
    w.add("x", x.cview());
    w.add("h", x.cview(), DType::kF16);
    w.add("b", x.cview(), DType::kBF16);
    w.write(dir / "x.safetensors");
    const auto f = SafetensorsFile::read(dir / "x.safetensors");
    const auto h = f.read<f16>("x");
    const auto b = f.read<bf16>("x");
    CHECK(h.data()[0].bits == 0x3c01);
    CHECK(b.data()[1].bits == 0x3f81);
    CHECK(h.data()[2].bits == 0x7c00);
    CHECK(b.data()[2].bits == 0x7f80);
    CHECK(h.data()[3].bits == 0x8000);
    // The writer agrees with the reader.
    const auto hw = f.read<f16>("h");
    const auto bw = f.read<bf16>("b");
    for (int i = 0; i < 4; ++i) {
      CHECK(hw.data()[i].bits == h.data()[i].bits);
      CHECK(bw.data()[i].bits == b.data()[i].bits);
    }
  }

  TEST_CASE("conversions: integers widen, narrow with a range check, never mix with floats") {
    const fs::path dir = fresh_dir("convert_int");
    Tensor<std::int64_t, Cpu> big({3});
    big.data()[0] = -5;
    big.data()[1] = std::int64_t{1} << 40;
    big.data()[2] = 7;
    Tensor<std::int64_t, Cpu> small({2});
    small.data()[0] = std::numeric_limits<std::int32_t>::min();
    small.data()[1] = std::numeric_limits<std::int32_t>::max();
    Tensor<std::int32_t, Cpu> i32({2});
    i32.data()[0] = -123456;
    i32.data()[1] = 2147483647;
    Tensor<float, Cpu> fl({1});
    SafetensorsWriter w;
    w.add("big", big.cview());
    w.add("small", small.cview(), DType::kI32);
    w.add("i32", i32.cview());
    w.add("i32_as_i64", i32.cview(), DType::kI64);
    w.add("f", fl.cview());
    w.write(dir / "x.safetensors");
    const fs::path p = dir / "x.safetensors";
    const auto f = SafetensorsFile::read(p);

    CHECK(f.info("small").dtype == DType::kI32);
    const auto s32 = f.read<std::int32_t>("small");
    CHECK(s32.data()[0] == std::numeric_limits<std::int32_t>::min());
    CHECK(s32.data()[1] == std::numeric_limits<std::int32_t>::max());
    const auto w64 = f.read<std::int64_t>("i32");
    CHECK(w64.data()[0] == -123456);
    CHECK(w64.data()[1] == 2147483647);
    CHECK(f.read<std::int32_t>("i32_as_i64").data()[0] == -123456);

    Tensor<std::int32_t, Cpu> dst({3});
    dst.data()[0] = 99;
    const std::string msg = error_of([&] { f.read_into("big", dst.view()); });
    CHECK(msg == "IoError: SafetensorsFile::read_into: tensor 'big' in '" + p.string() +
                     "': element 1 has I64 value 1099511627776, out of range for the destination type I32");
    CHECK(dst.data()[0] == 99);  // untouched
    CHECK(has(error_of([&] { (void)f.read<std::int32_t>("big"); }), "IoError: SafetensorsFile::read: tensor 'big'"));

    CHECK(error_of([&] { (void)f.read<float>("i32"); }) ==
          "IoError: SafetensorsFile::read: tensor 'i32' in '" + p.string() +
              "' is stored as I32, which does not convert to the destination type F32 (no float <-> integer "
              "conversion)");
    CHECK(has(error_of([&] { (void)f.read<std::int64_t>("f"); }), "is stored as F32, which does not convert"));

    // The writer refuses the same conversions.
    SafetensorsWriter w2;
    CHECK(error_of([&] { w2.add("x", fl.cview(), DType::kI32); }) ==
          "Error: SafetensorsWriter::add: tensor 'x' of element type F32 cannot be stored as I32 (no float <-> "
          "integer conversion)");
    CHECK(has(error_of([&] { w2.add("x", i32.cview(), DType::kBF16); }), "cannot be stored as BF16"));
    CHECK(error_of([&] { w2.add("x", big.cview(), DType::kI32); }) ==
          "Error: SafetensorsWriter::add: tensor 'x': element 1 has value 1099511627776, out of range for I32");
    CHECK(w2.size() == 0);
  }

  TEST_CASE("reader API: names, contains, info, shape errors") {
    const fs::path dir = fresh_dir("reader_api");
    Tensor<float, Cpu> a({2, 3});
    test::fill_uniform(a.view(), 3);
    SafetensorsWriter w;
    w.add("layer.1.w", a.cview());
    w.add("layer.0.w", a.view());  // mutable view
    w.add<float>("b", a);          // the tensor itself
    w.write(dir / "x.safetensors");
    const fs::path p = dir / "x.safetensors";
    const auto f = SafetensorsFile::read(p);
    CHECK(f.path() == p);
    CHECK(f.names() == std::vector<std::string>{"b", "layer.0.w", "layer.1.w"});
    CHECK(f.contains("layer.0.w"));
    CHECK(!f.contains("layer.2.w"));
    CHECK(error_of([&] { (void)f.info("layer.2.w"); }) ==
          "IoError: SafetensorsFile::info: no tensor 'layer.2.w' in '" + p.string() + "'");
    CHECK(has(error_of([&] { (void)f.read<float>("nope"); }), "no tensor 'nope'"));

    Tensor<float, Cpu> wrong({3, 2});
    CHECK(error_of([&] { f.read_into("b", wrong.view()); }) ==
          "ShapeError: SafetensorsFile::read_into: tensor 'b' in '" + p.string() +
              "' has shape [2, 3], expected [3, 2] (the destination's shape)");
    for (float v : wrong.view().span()) CHECK(v == 0.0f);
    CHECK_THROWS_AS(f.check_readable<float>("b", Shape{6}), ShapeError);
    CHECK_NOTHROW(f.check_readable<double>("b", Shape{2, 3}));
  }

  TEST_CASE("writer: duplicate, reserved and invalid names") {
    Tensor<float, Cpu> a({1});
    SafetensorsWriter w;
    w.add("x", a.cview());
    CHECK(error_of([&] { w.add("x", a.cview()); }) == "Error: SafetensorsWriter::add: duplicate tensor name 'x'");
    CHECK(has(error_of([&] { w.add("__metadata__", a.cview()); }), "reserved"));
    CHECK(has(error_of([&] { w.add("bad\xff", a.cview()); }), "is not valid UTF-8"));
    CHECK(has(error_of([&] { w.set_metadata("k", "\xc3"); }), "is not valid UTF-8"));
    CHECK(w.size() == 1);
  }

  TEST_CASE("metadata round trip") {
    const fs::path dir = fresh_dir("metadata");
    const std::map<std::string, std::string> meta = {{"format", "pt"},
                                                     {"step", "1000"},
                                                     {"empty", ""},
                                                     {"unicode", "h\xc3\xa9llo \xe2\x9c\x93"},
                                                     {"quote\"and\\slash", "line\nbreak\ttab"}};
    Tensor<float, Cpu> a({2});
    SafetensorsWriter w;
    for (const auto& [k, v] : meta) w.set_metadata(k, v);
    w.set_metadata("step", "999");  // replaced
    w.set_metadata("step", "1000");
    w.add("a", a.cview());
    w.write(dir / "x.safetensors");
    CHECK(SafetensorsFile::read(dir / "x.safetensors").metadata() == meta);
  }

  TEST_CASE("state dict: save and strict load") {
    const fs::path dir = fresh_dir("state_dict");
    const fs::path p = dir / "x.safetensors";
    Tensor<float, Cpu> wi({4, 3}), wo({3, 4}), bias({4});
    test::fill_uniform(wi.view(), 1);
    test::fill_uniform(wo.view(), 2);
    test::fill_uniform(bias.view(), 3);
    const NamedTensorViews<float> params = {{"wi", wi.view()}, {"wo", wo.view()}, {"bias", bias.view()}};
    save(p, params, {{"step", "7"}});

    Tensor<float, Cpu> wi2({4, 3}), wo2({3, 4}), bias2({4});
    const NamedTensorViews<float> into = {{"wi", wi2.view()}, {"wo", wo2.view()}, {"bias", bias2.view()}};
    const auto meta = load(p, into);
    CHECK(meta == std::map<std::string, std::string>{{"step", "7"}});
    CHECK(same_bits(wi, wi2));
    CHECK(same_bits(wo, wo2));
    CHECK(same_bits(bias, bias2));

    // Const views save too, and a stored dtype applies to all.
    const NamedTensorViews<const float> cparams = {{"wi", wi.cview()}, {"wo", wo.cview()}, {"bias", bias.cview()}};
    save(dir / "h.safetensors", cparams, {}, DType::kBF16);
    const auto hf = SafetensorsFile::read(dir / "h.safetensors");
    CHECK(hf.info("wo").dtype == DType::kBF16);
    CHECK(hf.metadata().empty());
    load(dir / "h.safetensors", into);
    for (std::int64_t i = 0; i < wo.numel(); ++i) {
      REQUIRE(wo2.data()[i] == static_cast<float>(bf16(wo.data()[i])));
    }
  }

  TEST_CASE("state dict: strict errors name the tensor and leave destinations untouched") {
    const fs::path dir = fresh_dir("state_dict_errors");
    const fs::path p = dir / "x.safetensors";
    Tensor<float, Cpu> a({2, 2}), b({3});
    test::fill_uniform(a.view(), 1);
    test::fill_uniform(b.view(), 2);
    save(p, NamedTensorViews<float>{{"a", a.view()}, {"b", b.view()}});

    Tensor<float, Cpu> a2({2, 2}), b2({3}), c2({5}), bad({3, 1});
    const std::string file = "'" + p.string() + "'";

    // Missing: "c" is not in the file.
    CHECK(error_of([&] {
            load(p, NamedTensorViews<float>{{"a", a2.view()}, {"b", b2.view()}, {"c", c2.view()}});
          }) == "IoError: tmoe::io::load: " + file + ": missing tensor(s) 'c'");
    // Extra: the file's "b" has no destination.
    CHECK(error_of([&] {
            load(p, NamedTensorViews<float>{{"a", a2.view()}});
          }) == "IoError: tmoe::io::load: " + file + ": unexpected tensor(s) 'b' with no destination");
    // Wrong shape, after a tensor that would have loaded fine: nothing is written.
    CHECK(error_of([&] {
            load(p, NamedTensorViews<float>{{"a", a2.view()}, {"b", bad.view()}});
          }) == "ShapeError: tmoe::io::load: " + file +
                    ": tensor 'b' has shape [3], expected [3, 1] (the destination's shape)");
    // Wrong dtype family.
    Tensor<std::int32_t, Cpu> ai({2, 2});
    Tensor<std::int32_t, Cpu> bi({3});
    CHECK(has(error_of([&] {
                load(p, NamedTensorViews<std::int32_t>{{"a", ai.view()}, {"b", bi.view()}});
              }),
              "IoError: SafetensorsFile::read_into: tensor 'a'"));
    // Duplicate destination names.
    CHECK(has(error_of([&] {
                load(p, NamedTensorViews<float>{{"a", a2.view()}, {"a", a2.view()}});
              }),
              "Error: tmoe::io::load: destination name 'a' appears twice"));
    for (float v : a2.view().span()) CHECK(v == 0.0f);
    for (float v : b2.view().span()) CHECK(v == 0.0f);
    for (float v : c2.view().span()) CHECK(v == 0.0f);

    // Lenient modes.
    c2.data()[0] = 42.0f;
    load(p, NamedTensorViews<float>{{"a", a2.view()}, {"b", b2.view()}, {"c", c2.view()}}, LoadMode::kAllowMissing);
    CHECK(same_bits(a, a2));
    CHECK(same_bits(b, b2));
    CHECK(c2.data()[0] == 42.0f);
    CHECK_THROWS_AS(load(p, NamedTensorViews<float>{{"a", a2.view()}}, LoadMode::kAllowMissing), IoError);

    Tensor<float, Cpu> a3({2, 2});
    load(p, NamedTensorViews<float>{{"a", a3.view()}}, LoadMode::kAllowExtra);
    CHECK(same_bits(a, a3));
    CHECK_THROWS_AS(load(p, NamedTensorViews<float>{{"a", a3.view()}, {"c", c2.view()}}, LoadMode::kAllowExtra),
                    IoError);
    CHECK_THROWS_AS(load(p, NamedTensorViews<float>{{"a", a3.view()}, {"b", bad.view()}}, LoadMode::kAllowExtra),
                    ShapeError);
  }

  TEST_CASE("atomic write: missing directory, overwrite, target is a directory, no temporaries left") {
    const fs::path dir = fresh_dir("atomic");
    Tensor<float, Cpu> big({100, 10}), small({3});
    test::fill_uniform(big.view(), 1);
    test::fill_uniform(small.view(), 2);

    // Into a directory that does not exist: IoError, and nothing is created.
    SafetensorsWriter w;
    w.add("x", small.cview());
    const fs::path nowhere = dir / "no_such_dir" / "x.safetensors";
    const std::string msg = error_of([&] { w.write(nowhere); });
    CHECK(has(msg, "IoError: SafetensorsWriter::write: '" + nowhere.string() + "': cannot create temporary file"));
    CHECK(!fs::exists(dir / "no_such_dir"));
    CHECK(listing(dir).empty());

    // Overwrite a bigger file: the result is wholly the new file.
    SafetensorsWriter wb;
    wb.add("big", big.cview());
    wb.write(dir / "x.safetensors");
    const auto big_size = fs::file_size(dir / "x.safetensors");
    w.write(dir / "x.safetensors");
    CHECK(fs::file_size(dir / "x.safetensors") < big_size);
    const auto f = SafetensorsFile::read(dir / "x.safetensors");
    CHECK(f.names() == std::vector<std::string>{"x"});
    CHECK(same_bits(f.read<float>("x"), small));
    CHECK(listing(dir) == std::vector<std::string>{"x.safetensors"});

    // The target is a directory: the rename fails after the data was written; the temporary is removed.
    fs::create_directory(dir / "d.safetensors");
    fs::create_directory(dir / "d.safetensors" / "child");
    CHECK(
        has(error_of([&] { w.write(dir / "d.safetensors"); }),
            "IoError: SafetensorsWriter::write: '" + (dir / "d.safetensors").string() + "': renaming temporary file"));
    CHECK(fs::is_directory(dir / "d.safetensors" / "child"));
    CHECK(listing(dir) == std::vector<std::string>{"d.safetensors", "x.safetensors"});

    // A path with no file name.
    CHECK(has(error_of([&] { w.write(dir / ""); }), "the path names no file"));
    CHECK(listing(dir) == std::vector<std::string>{"d.safetensors", "x.safetensors"});
  }

  TEST_CASE("unreadable paths") {
    const fs::path dir = fresh_dir("unreadable");
    CHECK(error_of([&] { (void)SafetensorsFile::read(dir / "missing.safetensors"); }) ==
          "IoError: SafetensorsFile::read: '" + (dir / "missing.safetensors").string() +
              "': cannot open: no such file");
    CHECK(error_of([&] { (void)SafetensorsFile::read(dir); }) ==
          "IoError: SafetensorsFile::read: '" + dir.string() + "': cannot open: not a regular file");
  }

  TEST_CASE("corrupt: too short, header length out of range") {
    const fs::path dir = fresh_dir("corrupt_length");
    check_corrupt(dir, "empty", "", "file is 0 bytes, shorter than the 8-byte header length");
    check_corrupt(dir, "seven", std::string(7, '\0'), "file is 7 bytes, shorter than the 8-byte header length");
    check_corrupt(dir, "longer_than_file", le64(100) + "{}", "header length 100 exceeds the 2 bytes that follow");
    check_corrupt(dir, "one_too_long", le64(3) + "{}", "header length 3 exceeds the 2 bytes that follow");
    check_corrupt(dir, "2^63", le64(std::uint64_t{1} << 63) + "{}",
                  "header length 9223372036854775808 exceeds the 2 bytes that follow");
    check_corrupt(dir, "2^64-1", le64(~std::uint64_t{0}), "header length 18446744073709551615 exceeds the 0 bytes");
    check_corrupt(dir, "zero_header", le64(0), "invalid JSON header");
  }

  TEST_CASE("corrupt: invalid JSON, not an object, bad nesting, duplicates") {
    const fs::path dir = fresh_dir("corrupt_json");
    check_corrupt(dir, "truncated_json", file_bytes(R"({"a": )"), "invalid JSON header");
    check_corrupt(dir, "garbage", file_bytes("not json"), "invalid JSON header");
    check_corrupt(dir, "nul_padding", file_bytes(std::string("{}\0\0", 4)),
                  "invalid JSON header: NUL byte at header offset 2");
    check_corrupt(
        dir, "nul_then_entry",
        file_bytes(std::string("{}\0", 3) + R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", f32_data(1)),
        "invalid JSON header: NUL byte at header offset 2");
    check_corrupt(dir, "trailing_garbage", file_bytes("{} x"), "invalid JSON header");
    check_corrupt(dir, "comment", file_bytes("{} // c"), "invalid JSON header");
    check_corrupt(dir, "bad_utf8", file_bytes("{\"\xff\": 1}"), "invalid JSON header");
    check_corrupt(dir, "array", file_bytes("[]"), "expected a JSON object, got array");
    check_corrupt(dir, "number", file_bytes("5"), "expected a JSON object, got number");
    check_corrupt(dir, "string", file_bytes(R"("x")"), "expected a JSON object, got string");
    check_corrupt(dir, "null", file_bytes("null"), "expected a JSON object, got null");
    check_corrupt(dir, "deep_array", file_bytes(std::string(100000, '[') + std::string(100000, ']')),
                  "JSON nested deeper than the format allows");
    check_corrupt(dir, "deep_object", file_bytes(R"({"a":{"b":{"c":{}}}})"),
                  "JSON nested deeper than the format allows");
    check_corrupt(dir, "nested_shape",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}})", f32_data(1)),
                  "JSON nested deeper than the format allows");
    check_corrupt(dir, "duplicate_tensor",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                             f32_data(2)),
                  "duplicate entry 'a'");
    check_corrupt(dir, "duplicate_field",
                  file_bytes(R"({"a":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", f32_data(1)),
                  "duplicate key 'dtype' in entry 'a'");
    check_corrupt(dir, "duplicate_metadata", file_bytes(R"({"__metadata__":{"k":"1","k":"2"}})"),
                  "duplicate key 'k' in entry '__metadata__'");
  }

  TEST_CASE("corrupt: entries with missing or wrongly typed fields") {
    const fs::path dir = fresh_dir("corrupt_fields");
    const std::string d4 = f32_data(1);
    check_corrupt(dir, "entry_number", file_bytes(R"({"a":5})"), "tensor 'a': expected an object, got number");
    check_corrupt(dir, "entry_array", file_bytes(R"({"a":[]})"), "tensor 'a': expected an object, got array");
    check_corrupt(dir, "no_dtype", file_bytes(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", d4),
                  "tensor 'a': missing field 'dtype'");
    check_corrupt(dir, "no_shape", file_bytes(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", d4),
                  "tensor 'a': missing field 'shape'");
    check_corrupt(dir, "no_offsets", file_bytes(R"({"a":{"dtype":"F32","shape":[1]}})", d4),
                  "tensor 'a': missing field 'data_offsets'");
    check_corrupt(dir, "dtype_number", file_bytes(R"({"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", d4),
                  "tensor 'a': field 'dtype' must be a string, got number");
    check_corrupt(dir, "dtype_unknown", file_bytes(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", d4),
                  "tensor 'a': unsupported dtype 'U8'");
    check_corrupt(dir, "dtype_lowercase", file_bytes(R"({"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", d4),
                  "tensor 'a': unsupported dtype 'f32'");
    check_corrupt(dir, "shape_number", file_bytes(R"({"a":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", d4),
                  "tensor 'a': field 'shape' must be an array, got number");
    check_corrupt(dir, "shape_negative", file_bytes(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", d4),
                  "tensor 'a': shape entries must be non-negative integers, got -1 at index 0");
    check_corrupt(dir, "shape_float", file_bytes(R"({"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", d4),
                  "shape entries must be non-negative integers, got 1.0 at index 0");
    check_corrupt(dir, "shape_string", file_bytes(R"({"a":{"dtype":"F32","shape":[1,"2"],"data_offsets":[0,4]}})", d4),
                  "shape entries must be non-negative integers, got \"2\" at index 1");
    check_corrupt(dir, "shape_null", file_bytes(R"({"a":{"dtype":"F32","shape":[null],"data_offsets":[0,4]}})", d4),
                  "shape entries must be non-negative integers, got null at index 0");
    check_corrupt(dir, "shape_huge",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4]}})", d4),
                  "tensor 'a': extent 9223372036854775808 at index 0 is too large");
    check_corrupt(dir, "rank_5", file_bytes(R"({"a":{"dtype":"F32","shape":[1,1,1,1,1],"data_offsets":[0,4]}})", d4),
                  "tensor 'a': rank 5 exceeds the supported maximum of 4");
    check_corrupt(dir, "offsets_number", file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":4}})", d4),
                  "tensor 'a': field 'data_offsets' must be two non-negative integers, got 4");
    check_corrupt(dir, "offsets_one", file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4]}})", d4),
                  "field 'data_offsets' must be two non-negative integers, got [4]");
    check_corrupt(dir, "offsets_three", file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", d4),
                  "field 'data_offsets' must be two non-negative integers, got [0,4,8]");
    check_corrupt(dir, "offsets_negative", file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", d4),
                  "field 'data_offsets' must be two non-negative integers, got [-4,0]");
    check_corrupt(dir, "offsets_float", file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}})", d4),
                  "field 'data_offsets' must be two non-negative integers");
    check_corrupt(dir, "offsets_string",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}})", d4),
                  "field 'data_offsets' must be two non-negative integers");
    check_corrupt(dir, "metadata_number", file_bytes(R"({"__metadata__":5})"),
                  "__metadata__ must be an object, got number");
    check_corrupt(dir, "metadata_value_number", file_bytes(R"({"__metadata__":{"k":1}})"),
                  "__metadata__ value for key 'k' must be a string, got number");
    check_corrupt(dir, "metadata_value_null", file_bytes(R"({"__metadata__":{"ok":"x","k":null}})"),
                  "__metadata__ value for key 'k' must be a string, got null");
  }

  TEST_CASE("corrupt: data offsets out of range, inconsistent, overlapping, gaps, truncation") {
    const fs::path dir = fresh_dir("corrupt_offsets");
    check_corrupt(dir, "begin_after_end",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", f32_data(2)),
                  "tensor 'a': data offsets [8, 4) have begin > end");
    check_corrupt(dir, "size_mismatch",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", f32_data(2)),
                  "tensor 'a': data offsets [0, 8) span 8 bytes but shape [3] of F32 needs 12");
    check_corrupt(dir, "size_mismatch_dtype",
                  file_bytes(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", f32_data(2)),
                  "shape [2] of F64 needs 16");
    check_corrupt(dir, "zero_elements_nonzero_bytes",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[0,3],"data_offsets":[0,4]}})", f32_data(1)),
                  "shape [0, 3] of F32 needs 0");
    check_corrupt(dir, "overflow",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
                  "tensor 'a': shape [4294967296, 4294967296] x 4 bytes per element overflows 64 bits");
    check_corrupt(dir, "overflow_to_zero",  // 2^62 * 4 wraps to exactly 0 modulo 2^64
                  file_bytes(R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
                  "overflows 64 bits");
    check_corrupt(dir, "overflow_with_zero_extent",
                  file_bytes(R"({"a":{"dtype":"F16","shape":[4611686018427387904,4,0],"data_offsets":[0,0]}})"),
                  "overflows 64 bits");
    check_corrupt(
        dir, "offset_huge",
        file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,18446744073709551616]}})"),
        "must be two non-negative integers");  // 2^64 is not an integer JSON can hold in 64 bits
    check_corrupt(dir, "out_of_range",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", f32_data(2)),
                  "tensor 'a': data offsets [8, 16) exceed the data buffer of 8 bytes (truncated file?)");
    check_corrupt(
        dir, "offset_near_2^64",
        file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551608,18446744073709551612]}})",
                   f32_data(1)),
        "exceed the data buffer of 4 bytes");
    check_corrupt(dir, "truncated_data",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", f32_data(2) + "xy"),
                  "tensor 'a': data offsets [0, 16) exceed the data buffer of 10 bytes (truncated file?)");
    check_corrupt(dir, "truncated_no_data", file_bytes(R"({"a":{"dtype":"I64","shape":[2,2],"data_offsets":[0,32]}})"),
                  "exceed the data buffer of 0 bytes");
    check_corrupt(dir, "overlap",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             f32_data(3)),
                  "tensor 'b' [4, 12) overlaps tensor 'a' [0, 8)");
    check_corrupt(dir, "same_range",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                             f32_data(2)),
                  "overlaps tensor");
    check_corrupt(dir, "empty_inside_other",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                             f32_data(2)),
                  "tensor 'b' [4, 4) overlaps tensor 'a' [0, 8)");
    check_corrupt(dir, "gap_between",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                             f32_data(3)),
                  "invalid data offsets: gap of 4 bytes at offset 4 before tensor 'b'");
    check_corrupt(dir, "gap_at_start",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f32_data(2)),
                  "gap of 4 bytes at offset 0 before tensor 'a'");
    check_corrupt(dir, "trailing_bytes",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", f32_data(2)),
                  "the tensors cover 4 bytes but the data buffer has 8 (trailing bytes)");
    check_corrupt(dir, "no_tensors_trailing", file_bytes("{}", "x"),
                  "the tensors cover 0 bytes but the data buffer has 1 (trailing bytes)");
  }

  TEST_CASE("corrupt: every truncation of a valid file is rejected cleanly") {
    const fs::path dir = fresh_dir("corrupt_truncations");
    Tensor<float, Cpu> a({3, 2});
    Tensor<std::int64_t, Cpu> b({2});
    test::fill_uniform(a.view(), 1);
    SafetensorsWriter w;
    w.add("a", a.cview());
    w.add("b", b.cview());
    w.set_metadata("k", "v");
    w.write(dir / "full.safetensors");
    const std::string full = read_bytes(dir / "full.safetensors");
    CHECK_NOTHROW((void)SafetensorsFile::read(dir / "full.safetensors"));
    for (std::size_t n = 0; n < full.size(); ++n) {
      const fs::path p = dir / "cut.safetensors";
      write_bytes(p, full.substr(0, n));
      const std::string msg = error_of([&] { (void)SafetensorsFile::read(p); });
      INFO("length ", n, ": ", msg);
      REQUIRE(has(msg, "IoError: SafetensorsFile::read: '" + p.string() + "': "));
    }
    // One extra byte is as bad as one missing.
    write_bytes(dir / "long.safetensors", full + "!");
    CHECK(has(error_of([&] { (void)SafetensorsFile::read(dir / "long.safetensors"); }), "(trailing bytes)"));
  }
}
