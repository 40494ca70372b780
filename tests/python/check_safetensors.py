#!/usr/bin/env python3
"""Check a .safetensors file against an expectation, two independent ways.

    .venv/bin/python tests/python/check_safetensors.py FILE EXPECT_JSON

EXPECT_JSON:
    {"tensors": {"NAME": {"dtype": "F32", "shape": [2, 3],
                          "sha256": "<hex sha256 of the raw little-endian bytes>"}, ...},
     "metadata": {"k": "v", ...} | null}

"metadata": null expects no __metadata__ (an empty {} counts as none); leaving
the "metadata" key out skips the metadata check. Checks, two ways:

  1. the safetensors library: safe_open(FILE, framework="numpy") -- names,
     dtype and shape (get_slice), bytes (get_tensor(...).tobytes() for dtypes
     numpy can represent; BF16/F8/... are read raw, see 2), and metadata();
  2. an independent parser: 8-byte little-endian u64 header length, JSON
     header, data_offsets -- offsets must be contiguous, start at 0, end
     exactly at the end of the file, each span must equal numel * dtype size;
     names, dtype, shape, sha256 of the raw bytes and __metadata__ are checked
     against EXPECT_JSON too.

Exit 0 printing "OK <n_tensors>" on success; exit 1 printing one line per
mismatch otherwise; exit 2 on bad usage.
"""
import hashlib
import json
import math
import mmap
import os
import sys

# safetensors dtype string -> (element size in bytes, numpy dtype name or None)
DTYPES = {
    "F64": (8, "<f8"),
    "F32": (4, "<f4"),
    "F16": (2, "<f2"),
    "BF16": (2, None),
    "I64": (8, "<i8"),
    "I32": (4, "<i4"),
    "I16": (2, "<i2"),
    "I8": (1, "i1"),
    "U64": (8, "<u8"),
    "U32": (4, "<u4"),
    "U16": (2, "<u2"),
    "U8": (1, "u1"),
    "BOOL": (1, "?"),
    "F8_E4M3": (1, None),
    "F8_E5M2": (1, None),
    "F8_E8M0": (1, None),
    "C64": (8, "<c8"),
}


class Checker:
    def __init__(self):
        self.errors = []

    def fail(self, msg):
        self.errors.append(msg)

    def eq(self, what, got, want):
        if got != want:
            self.fail(f"{what}: got {got!r}, expected {want!r}")
            return False
        return True


def norm_meta(m):
    return None if not m else dict(m)


def load_expect(path, ck):
    with open(path, "r", encoding="utf-8") as f:
        exp = json.load(f)
    if not isinstance(exp, dict) or not isinstance(exp.get("tensors"), dict):
        raise ValueError(f"{path}: expected an object with a \"tensors\" object")
    for name, t in exp["tensors"].items():
        for k in ("dtype", "shape", "sha256"):
            if k not in t:
                raise ValueError(f"{path}: tensor {name!r} lacks {k!r}")
        t["shape"] = list(t["shape"])
        t["sha256"] = t["sha256"].lower()
    return exp


def parse_raw(path, ck):
    """Independent parse. Returns (header dict, metadata, {name: (dtype, shape, sha256)})."""
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            ck.fail(f"raw: file is {size} bytes, shorter than the 8-byte header length")
            return None, None, out
        n = int.from_bytes(head, "little")
        if n > size - 8:
            ck.fail(f"raw: header length {n} exceeds file size {size} - 8")
            return None, None, out
        hbytes = f.read(n)
    dups = []

    def no_dups(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                dups.append(k)
            seen.add(k)
        return dict(pairs)

    try:
        header = json.loads(hbytes.decode("utf-8"), object_pairs_hook=no_dups)
    except (UnicodeDecodeError, ValueError) as e:
        ck.fail(f"raw: header is not valid UTF-8 JSON: {e}")
        return None, None, out
    if not isinstance(header, dict):
        ck.fail("raw: header JSON is not an object")
        return None, None, out
    for k in dups:
        ck.fail(f"raw: duplicate key {k!r} in header JSON")
    if not hbytes.startswith(b"{"):
        ck.fail("raw: header does not start with '{'")

    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        ck.fail(f"raw: __metadata__ is not a str->str object: {meta!r}")

    data_start = 8 + n
    data_len = size - data_start
    spans = []
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            ck.fail(f"raw: {name}: entry lacks dtype/shape/data_offsets: {info!r}")
            continue
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(x, int) and x >= 0 for x in offs)
                and offs[0] <= offs[1]):
            ck.fail(f"raw: {name}: bad data_offsets {offs!r}")
            continue
        if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
            ck.fail(f"raw: {name}: bad shape {shape!r}")
            continue
        if dtype not in DTYPES:
            ck.fail(f"raw: {name}: unknown dtype {dtype!r}")
        else:
            want_len = math.prod(shape) * DTYPES[dtype][0]
            ck.eq(f"raw: {name}: byte length of data_offsets {offs}", offs[1] - offs[0], want_len)
        spans.append((offs[0], offs[1], name))
        entries[name] = (dtype, shape, offs)

    # Offsets: contiguous, from 0, covering the data region exactly.
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            kind = "gap" if b > pos else "overlap"
            ck.fail(f"raw: {name}: data_offsets start {b}, expected {pos} ({kind})")
        pos = max(pos, e)
    if pos != data_len:
        ck.fail(f"raw: tensors cover {pos} data bytes but the data region is {data_len} bytes "
                f"(file {size}, header {n})")

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            for name, (dtype, shape, offs) in entries.items():
                b, e = data_start + offs[0], data_start + offs[1]
                if e > size:
                    ck.fail(f"raw: {name}: data_offsets {offs} run past end of file")
                    continue
                h = hashlib.sha256()
                if e > b:
                    h.update(memoryview(mm)[b:e])
                out[name] = (dtype, shape, h.hexdigest())
        finally:
            if mm is not None:
                mm.close()
    return header, meta, out


def read_lib(path, raw, ck):
    """Read with the safetensors library. Returns ({name: (dtype, shape, sha256)}, metadata)."""
    import numpy as np
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        for name in f.keys():
            sl = f.get_slice(name)
            dtype = str(sl.get_dtype())
            shape = list(sl.get_shape())
            npdt = DTYPES.get(dtype, (None, None))[1]
            if npdt is None:
                # numpy cannot represent it (BF16, F8...): bytes from the raw parse.
                sha = raw.get(name, (None, None, None))[2]
            else:
                arr = f.get_tensor(name)
                if arr.dtype != np.dtype(npdt):
                    ck.fail(f"safetensors: {name}: numpy dtype {arr.dtype} for {dtype}, expected {np.dtype(npdt)}")
                if list(arr.shape) != shape:
                    ck.fail(f"safetensors: {name}: get_tensor shape {list(arr.shape)} != get_slice shape {shape}")
                arr = np.ascontiguousarray(arr, dtype=np.dtype(npdt))
                sha = hashlib.sha256(arr.tobytes()).hexdigest()
            out[name] = (dtype, shape, sha)
    return out, meta


def compare(label, got, got_meta, exp, ck):
    want = exp["tensors"]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    for name in missing:
        ck.fail(f"{label}: missing tensor {name!r}")
    for name in extra:
        ck.fail(f"{label}: unexpected tensor {name!r}")
    for name in sorted(set(want) & set(got)):
        dtype, shape, sha = got[name]
        w = want[name]
        ck.eq(f"{label}: {name}: dtype", dtype, w["dtype"])
        ck.eq(f"{label}: {name}: shape", shape, w["shape"])
        ck.eq(f"{label}: {name}: sha256", sha, w["sha256"])
    if "metadata" in exp:
        ck.eq(f"{label}: __metadata__", norm_meta(got_meta), norm_meta(exp["metadata"]))


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        print("usage: check_safetensors.py FILE EXPECT_JSON", file=sys.stderr)
        return 2
    path, exp_path = argv[1], argv[2]
    ck = Checker()
    try:
        exp = load_expect(exp_path, ck)
    except (OSError, ValueError) as e:
        print(f"bad EXPECT_JSON: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(path):
        print(f"{path}: no such file")
        return 1

    header, raw_meta, raw = parse_raw(path, ck)
    if header is not None:
        compare("raw", raw, raw_meta, exp, ck)
    try:
        lib, lib_meta = read_lib(path, raw, ck)
        compare("safetensors", lib, lib_meta, exp, ck)
    except Exception as e:  # the library rejects the file: that is a mismatch too
        ck.fail(f"safetensors: cannot read {path}: {type(e).__name__}: {e}")

    if ck.errors:
        # de-duplicate while keeping order (both readers may report the same thing)
        seen = set()
        for msg in ck.errors:
            if msg not in seen:
                seen.add(msg)
                print(msg)
        return 1
    print(f"OK {len(exp['tensors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
