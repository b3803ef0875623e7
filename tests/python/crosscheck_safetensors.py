#!/usr/bin/env python3
"""Cross-checks tmoe's safetensors reader and writer against the reference implementation.

Usage: crosscheck_safetensors.py SAFETENSORS_TOOL [WORKDIR]

SAFETENSORS_TOOL is tests/tools/safetensors_tool.cpp built; WORKDIR (created if needed, default: a temporary
directory) receives the files exchanged. Both sides compute the expected tensors independently from the same
formulas (kept in step with safetensors_tool.cpp by hand) and compare them bit for bit.

1. tmoe writes -> the reference reads:
   a. without BF16: safetensors.numpy.load_file, every array compared with numpy arrays computed here;
   b. with BF16: safetensors.deserialize (the reference parser and validator, which hands back raw bytes) for
      every tensor, and safe_open(...).metadata() for the metadata.
2. The reference writes -> tmoe reads (safetensors_tool check):
   a. without BF16: safetensors.numpy.save_file with metadata;
   b. with BF16: safetensors.serialize_file (the writer behind save_file) given raw little-endian bytes.
3. A file with one value changed is rejected by safetensors_tool check (the check really checks).

BF16: numpy has no bfloat16, so safetensors.numpy can neither save nor load it. The expected BF16 values are
derived here from numpy float32 values that bf16 represents exactly (their low 16 bits are zero, which is
asserted), as the top 16 bits; they are compared and written as raw uint16 patterns through the reference's
raw-byte interface. Nothing here uses tmoe's bf16 conversion.
"""

import sys
import tempfile
from pathlib import Path
import subprocess

import numpy as np
from safetensors import TensorSpec, deserialize, safe_open, serialize_file
from safetensors.numpy import load_file, save_file

# (name, dtype, shape, specials): keep in step with specs() in tests/tools/safetensors_tool.cpp.
SPECS = [
    ("f32.matrix", "F32", (3, 5), False),
    ("f32.scalar", "F32", (), False),
    ("f32.empty", "F32", (0, 4), False),
    ("f32.specials", "F32", (5,), True),
    ("f64.cube", "F64", (2, 3, 4), False),
    ("f64.specials", "F64", (5,), True),
    ("f16.vector", "F16", (7,), False),
    ("f16.specials", "F16", (5,), True),
    ("bf16.matrix", "BF16", (4, 3), False),
    ("bf16.specials", "BF16", (5,), True),
    ("i32.matrix", "I32", (2, 6), False),
    ("i32.specials", "I32", (4,), True),
    ("i64.tensor4", "I64", (2, 1, 2, 3), False),
    ("i64.specials", "I64", (4,), True),
]

# Keep in step with expected_metadata() in safetensors_tool.cpp.
METADATA = {"format": "pt", "producer": "tmoe crosscheck", "unicode": "h\u00e9llo \u2713", "empty": ""}

NUMPY_DTYPE = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I32": "<i4", "I64": "<i8"}
SPEC_DTYPE = {"F32": "float32", "F64": "float64", "F16": "float16", "I32": "int32", "I64": "int64",
              "BF16": "bfloat16"}


def float_value(t, i):
    """k/8 with |k| <= 50: exact in F16, BF16, F32 and F64."""
    return ((i * 37 + t * 11) % 101 - 50) / 8.0


def int_value(t, i, dtype):
    k = (i * 7919 + t * 104729) % 20011 - 10000
    return k * 200000 + i if dtype == "I32" else k * 900000000000000 + i


def bf16_bits(values):
    """The bf16 bit patterns of float32 values that bf16 represents exactly."""
    u32 = np.asarray(values, dtype="<f4").view("<u4")
    assert not np.any(u32 & 0xFFFF), "value not exactly representable in bf16"
    return (u32 >> 16).astype("<u2")


def expected(t):
    """Tensor t as a little-endian numpy array (BF16: its uint16 bit patterns)."""
    _, dtype, shape, specials = SPECS[t]
    if specials:
        if dtype in ("F32", "F64", "F16"):
            fi = np.finfo(NUMPY_DTYPE[dtype])
            values = [-0.0, np.inf, -np.inf, fi.smallest_subnormal, fi.max]
            return np.array(values, dtype=NUMPY_DTYPE[dtype])
        if dtype == "BF16":
            return bf16_bits([-0.0, np.inf, -np.inf, 2.0**-133, (2.0 - 2.0**-7) * 2.0**127])
        ii = np.iinfo(NUMPY_DTYPE[dtype])
        return np.array([ii.min, ii.max, 0, -1], dtype=NUMPY_DTYPE[dtype])
    n = int(np.prod(shape, dtype=np.int64))
    if dtype in ("I32", "I64"):
        arr = np.array([int_value(t, i, dtype) for i in range(n)], dtype=NUMPY_DTYPE[dtype])
    elif dtype == "BF16":
        arr = bf16_bits([float_value(t, i) for i in range(n)])
    else:
        arr = np.array([float_value(t, i) for i in range(n)], dtype=NUMPY_DTYPE[dtype])
    return arr.reshape(shape)


class Checker:
    def __init__(self):
        self.failures = 0

    def expect(self, ok, what):
        if not ok:
            self.failures += 1
            print(f"FAIL: {what}", file=sys.stderr)


def run_tool(tool, *args):
    return subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, check=False)


def selected(with_bf16):
    return [t for t, spec in enumerate(SPECS) if with_bf16 or spec[1] != "BF16"]


def tmoe_writes_numpy_reads(tool, work, c):
    path = work / "from_tmoe_no_bf16.safetensors"
    r = run_tool(tool, "write", path, "--no-bf16")
    c.expect(r.returncode == 0, f"safetensors_tool write --no-bf16 failed: {r.stderr}")
    if r.returncode != 0:
        return
    loaded = load_file(path)
    names = [SPECS[t][0] for t in selected(False)]
    c.expect(sorted(loaded) == sorted(names), f"load_file names {sorted(loaded)} != {sorted(names)}")
    for t in selected(False):
        name, dtype, shape, _ = SPECS[t]
        if name not in loaded:
            continue
        got, want = loaded[name], expected(t)
        c.expect(got.dtype == np.dtype(NUMPY_DTYPE[dtype]), f"{name}: dtype {got.dtype}, expected {dtype}")
        c.expect(got.shape == tuple(shape), f"{name}: shape {got.shape}, expected {shape}")
        c.expect(got.tobytes() == want.tobytes(), f"{name}: values differ:\n{got}\nexpected\n{want}")
    with safe_open(path, framework="np") as f:
        c.expect(f.metadata() == METADATA, f"metadata {f.metadata()} != {METADATA}")


def tmoe_writes_reference_parses(tool, work, c):
    path = work / "from_tmoe.safetensors"
    r = run_tool(tool, "write", path)
    c.expect(r.returncode == 0, f"safetensors_tool write failed: {r.stderr}")
    if r.returncode != 0:
        return
    raw = dict(deserialize(path.read_bytes()))
    names = [SPECS[t][0] for t in selected(True)]
    c.expect(sorted(raw) == sorted(names), f"deserialize names {sorted(raw)} != {sorted(names)}")
    for t in selected(True):
        name, dtype, shape, _ = SPECS[t]
        if name not in raw:
            continue
        entry = raw[name]
        c.expect(entry["dtype"] == dtype, f"{name}: dtype {entry['dtype']}, expected {dtype}")
        c.expect(list(entry["shape"]) == list(shape), f"{name}: shape {entry['shape']}, expected {shape}")
        c.expect(bytes(entry["data"]) == expected(t).tobytes(), f"{name}: raw bytes differ")
    with safe_open(path, framework="np") as f:
        c.expect(f.metadata() == METADATA, f"metadata {f.metadata()} != {METADATA}")
        for name in f.keys():
            dtype = f.get_slice(name).get_dtype()
            c.expect(dtype == dict((s[0], s[1]) for s in SPECS)[name], f"{name}: safe_open dtype {dtype}")


def reference_writes_tmoe_reads(tool, work, c):
    # a. numpy arrays through save_file (no BF16).
    path = work / "from_numpy.safetensors"
    save_file({SPECS[t][0]: expected(t) for t in selected(False)}, path, metadata=METADATA)
    r = run_tool(tool, "check", path, "--no-bf16")
    c.expect(r.returncode == 0, f"safetensors_tool check --no-bf16 rejected save_file output:\n{r.stderr}")

    # b. raw bytes through serialize_file, BF16 included.
    path = work / "from_reference_raw.safetensors"
    arrays = {SPECS[t][0]: expected(t) for t in selected(True)}  # (np.ascontiguousarray would make 0-d 1-d)
    assert all(a.flags.c_contiguous for a in arrays.values())
    specs = {
        name: TensorSpec(dtype=SPEC_DTYPE[dict((s[0], s[1]) for s in SPECS)[name]], shape=list(a.shape),
                         data_ptr=a.ctypes.data, data_len=a.nbytes)
        for name, a in arrays.items()
    }
    serialize_file(specs, path, metadata=METADATA)
    r = run_tool(tool, "check", path)
    c.expect(r.returncode == 0, f"safetensors_tool check rejected serialize_file output:\n{r.stderr}")
    with safe_open(path, framework="np") as f:  # the reference reads its own BF16 file back as BF16
        c.expect(f.get_slice("bf16.matrix").get_dtype() == "BF16", "serialize_file did not store BF16")

    # 3. One changed value must be caught.
    bad = {SPECS[t][0]: expected(t).copy() for t in selected(False)}
    bad["f32.matrix"].flat[4] += 1.0
    path = work / "from_numpy_bad.safetensors"
    save_file(bad, path, metadata=METADATA)
    r = run_tool(tool, "check", path, "--no-bf16")
    c.expect(r.returncode == 1 and "'f32.matrix' differs" in r.stderr,
             f"safetensors_tool check accepted a wrong value (rc {r.returncode}): {r.stderr}")
    # And different metadata.
    path = work / "from_numpy_bad_meta.safetensors"
    save_file({SPECS[t][0]: expected(t) for t in selected(False)}, path, metadata={"format": "np"})
    r = run_tool(tool, "check", path, "--no-bf16")
    c.expect(r.returncode == 1 and "metadata differs" in r.stderr,
             f"safetensors_tool check accepted wrong metadata (rc {r.returncode}): {r.stderr}")


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    tool = Path(argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(argv[2]) if len(argv) == 3 else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        c = Checker()
        tmoe_writes_numpy_reads(tool, work, c)
        tmoe_writes_reference_parses(tool, work, c)
        reference_writes_tmoe_reads(tool, work, c)
    if c.failures:
        print(f"safetensors cross-check: {c.failures} failure(s)", file=sys.stderr)
        return 1
    print(f"safetensors cross-check: OK ({len(SPECS)} tensors, numpy {np.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
