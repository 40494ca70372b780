#!/usr/bin/env python3
"""Self-test for check_safetensors.py (needs only numpy + safetensors).

    .venv/bin/python tests/python/selftest_check_safetensors.py

Writes a file with safetensors.numpy.save_file-compatible tensors (F64, F32,
F16, I64, I32, I16, I8, U8, BOOL, a 0-d scalar, a zero-length tensor) plus a
BF16 tensor given as raw bytes, checks that check_safetensors.py accepts it,
then that it rejects a series of corrupted copies / wrong expectations.
Prints one line per case and "N passed, N failed"; exit 1 if any failed.
"""
import copy
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import safetensors
import safetensors.numpy

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKER = os.path.join(HERE, "check_safetensors.py")


def sha(b):
    return hashlib.sha256(b).hexdigest()


def build(path):
    """Write the reference file; return the expectation dict."""
    rng = np.random.default_rng(1234)
    arrays = {
        "f64": rng.standard_normal((3, 2)),
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "i64": np.arange(-4, 8, dtype=np.int64).reshape(3, 4),
        "i32": np.array([-(2**31), 0, 2**31 - 1], dtype=np.int32),
        "i16": np.array([-7, 7], dtype=np.int16),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u8": np.arange(10, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float32),  # 0-d
        "empty": np.zeros((0, 4), dtype=np.float32),  # zero-length
    }
    metadata = {"format": "pt", "step": "42"}
    expect = {"tensors": {}, "metadata": metadata}
    npdt = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
            "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
    for k, a in arrays.items():
        expect["tensors"][k] = {"dtype": npdt[a.dtype.name], "shape": list(a.shape),
                                "sha256": sha(a.astype(a.dtype.newbyteorder("<")).tobytes())}

    # BF16 given as raw bits: 1.0, 2.0, -3.0, 0.5 (top 16 bits of the float32)
    f = np.array([1.0, 2.0, -3.0, 0.5], dtype=np.float32)
    bf16 = (f.view(np.uint32) >> 16).astype("<u2").reshape(2, 2)

    # 1) the numpy-representable tensors through the high-level API
    np_path = path + ".numpy"
    safetensors.numpy.save_file(arrays, np_path, metadata=metadata)
    np_expect = copy.deepcopy(expect)

    # 2) the same plus BF16 as raw bytes, through the low-level serializer
    keep = {k: np.array(a, order="C", copy=True) for k, a in arrays.items()}  # TensorSpec holds raw pointers
    keep["bf16"] = bf16
    specs = {}
    for k, a in keep.items():
        dt = "bfloat16" if k == "bf16" else a.dtype.name
        shape = [2, 2] if k == "bf16" else list(a.shape)
        specs[k] = safetensors.TensorSpec(dtype=dt, shape=shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
    expect["tensors"]["bf16"] = {"dtype": "BF16", "shape": [2, 2], "sha256": sha(bf16.tobytes())}
    safetensors.serialize_file(specs, path, metadata)
    del keep
    return expect, np_path, np_expect


def header_of(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n)), f.read()


def write_with_header(path, header, data):
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def run(file, expect, tmp):
    ep = os.path.join(tmp, "expect.json")
    with open(ep, "w") as f:
        json.dump(expect, f)
    p = subprocess.run([sys.executable, CHECKER, file, ep], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def main():
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ref.safetensors")
        expect, np_ref, np_expect = build(ref)
        raw = open(ref, "rb").read()
        n, header, data = header_of(ref)

        def case(name, file, exp, want_rc, want_text=None):
            nonlocal passed, failed
            rc, out = run(file, exp, tmp)
            ok = rc == want_rc and (want_text is None or want_text in out)
            passed += ok
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: rc={rc} {out.strip().splitlines()[0] if out.strip() else ''}")
            if not ok:
                print("      output: " + out.strip().replace("\n", "\n              "))

        case("valid file (safetensors.numpy.save_file)", np_ref, np_expect, 0, f"OK {len(np_expect['tensors'])}")
        case("valid file (serialize_file, with BF16)", ref, expect, 0, f"OK {len(expect['tensors'])}")

        def variant(tag, content):
            p = os.path.join(tmp, tag + ".safetensors")
            with open(p, "wb") as f:
                f.write(content)
            return p

        # flip one byte inside f32's data
        b = bytearray(raw)
        off = 8 + n + header["f32"]["data_offsets"][0] + 1
        b[off] ^= 0xFF
        case("flipped data byte (f32)", variant("flip", bytes(b)), expect, 1, "f32: sha256")

        # flip one byte inside bf16's data (raw path)
        b = bytearray(raw)
        b[8 + n + header["bf16"]["data_offsets"][0]] ^= 0x01
        case("flipped data byte (bf16)", variant("flipbf", bytes(b)), expect, 1, "bf16: sha256")

        case("truncated file", variant("trunc", raw[:-3]), expect, 1)
        case("trailing garbage", variant("trail", raw + b"\0\0\0\0"), expect, 1, "data region")

        # gap in offsets: shift every tensor after the first by 4 bytes of padding
        h = copy.deepcopy(header)
        first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        e0 = h[first]["data_offsets"][1]
        for k, v in h.items():
            if k != "__metadata__" and v["data_offsets"][0] >= e0 and k != first:
                v["data_offsets"] = [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]
        p = os.path.join(tmp, "gap.safetensors")
        write_with_header(p, h, data[:e0] + b"\0" * 4 + data[e0:])
        case("gap between tensors", p, expect, 1, "gap")

        # wrong dtype in header (F32 -> I32 has the same element size)
        h = copy.deepcopy(header)
        h["f32"]["dtype"] = "I32"
        p = os.path.join(tmp, "dtype.safetensors")
        write_with_header(p, h, data)
        case("wrong dtype in file", p, expect, 1, "f32: dtype")

        # expectation mismatches on the valid file
        e = copy.deepcopy(expect)
        e["tensors"]["i64"]["shape"] = [4, 3]
        case("expected shape differs", ref, e, 1, "i64: shape")
        e = copy.deepcopy(expect)
        e["tensors"]["extra"] = {"dtype": "F32", "shape": [1], "sha256": "0" * 64}
        case("expected tensor missing from file", ref, e, 1, "missing tensor 'extra'")
        e = copy.deepcopy(expect)
        del e["tensors"]["u8"]
        case("unexpected tensor in file", ref, e, 1, "unexpected tensor 'u8'")
        e = copy.deepcopy(expect)
        e["metadata"] = {"format": "pt", "step": "43"}
        case("metadata differs", ref, e, 1, "__metadata__")
        e = copy.deepcopy(expect)
        e["metadata"] = None
        case("metadata expected null", ref, e, 1, "__metadata__")

        # no metadata at all, expected null
        a = np.ones(3, dtype=np.float32)
        p = os.path.join(tmp, "nometa.safetensors")
        safetensors.numpy.save_file({"x": a}, p)
        case("no metadata, expected null", p,
             {"tensors": {"x": {"dtype": "F32", "shape": [3], "sha256": sha(a.tobytes())}}, "metadata": None}, 0, "OK 1")

        case("not a safetensors file", variant("junk", b"hello world, not safetensors"), expect, 1)

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
