//! The safetensors file format: encoding a header for tensors we write, and parsing a header we
//! read without trusting it.
//!
//! Layout: an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON (padded with spaces
//! to a multiple of 8, as Python's `safetensors` writes it), then the tensor data, tensor after
//! tensor with no holes. Each header entry gives `dtype`, `shape` and `data_offsets` (relative to
//! the data start); the optional `__metadata__` maps strings to strings.
//!
//! Parsing guarantees: no allocation is sized by the file (the header length is checked against
//! [`MAX_HEADER_BYTES`] and the file size first), every offset is checked against the data region,
//! tensors must tile the data region exactly, and `dtype` × `shape` must equal the byte length
//! (with overflow-checked arithmetic). Nothing in a file is ever executed.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Largest header we accept (Python's safetensors refuses above 100 MB as well).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types, named as in the safetensors format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    pub const ALL: [Dtype; 13] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    pub fn from_name(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }
}

/// What the header says of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the data region: `[begin, end)`.
    pub begin: u64,
    pub end: u64,
}

/// A parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors in data order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data region from the start of the file (8 + header length).
    pub data_start: u64,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Number of bytes a tensor of this dtype and shape holds, or None on overflow.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
}

/// Encode the header for tensors laid out in the given order, returning the full prefix
/// (length + padded JSON) to write before the data.
pub fn encode_header(
    tensors: &[(&str, Dtype, &[usize])],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        map.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        if name.is_empty() || *name == "__metadata__" {
            return Err(format!("invalid tensor name {name:?}"));
        }
        if map.contains_key(*name) {
            return Err(format!("duplicate tensor name {name:?}"));
        }
        let len =
            byte_len(*dtype, shape).ok_or_else(|| format!("tensor {name:?}: size overflows"))?;
        let end = offset + len;
        map.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(map)).map_err(|e| e.to_string())?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Read the 8-byte length prefix and check it against the file size before anything is
/// allocated. Returns the header length.
pub fn header_len(prefix: [u8; 8], file_size: u64) -> Result<u64, String> {
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES {
        return Err(format!(
            "safetensors header claims {n} bytes, more than the {MAX_HEADER_BYTES} allowed"
        ));
    }
    if n.checked_add(8).is_none_or(|end| end > file_size) {
        return Err(format!(
            "safetensors header claims {n} bytes but the file holds only {file_size}"
        ));
    }
    Ok(n)
}

/// Parse and validate a header (the JSON bytes after the length prefix) for a file of
/// `file_size` bytes.
pub fn parse_header(json: &[u8], file_size: u64) -> Result<Header, String> {
    let data_start = 8 + json.len() as u64;
    let data_len = file_size
        .checked_sub(data_start)
        .ok_or("safetensors header runs past the end of the file")?;
    let text = std::str::from_utf8(json).map_err(|_| "safetensors header is not UTF-8")?;
    let value: Value =
        serde_json::from_str(text.trim_end()).map_err(|e| format!("safetensors header: {e}"))?;
    let Value::Object(map) = value else {
        return Err("safetensors header is not a JSON object".into());
    };
    let mut tensors = Vec::with_capacity(map.len().min(1 << 16));
    let mut metadata = BTreeMap::new();
    for (name, v) in map {
        if name == "__metadata__" {
            let Value::Object(m) = v else {
                return Err("__metadata__ is not an object".into());
            };
            for (k, v) in m {
                let Value::String(s) = v else {
                    return Err(format!("__metadata__[{k:?}] is not a string"));
                };
                metadata.insert(k, s);
            }
            continue;
        }
        tensors.push(parse_entry(&name, &v)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut expected = 0u64;
    for t in &tensors {
        if t.begin != expected {
            return Err(format!(
                "tensor {:?} starts at {} but the previous one ends at {expected} (tensors must \
                 tile the data region)",
                t.name, t.begin
            ));
        }
        expected = t.end;
    }
    if expected != data_len {
        return Err(format!(
            "tensors cover {expected} bytes but the data region holds {data_len}"
        ));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

fn parse_entry(name: &str, v: &Value) -> Result<TensorInfo, String> {
    let bad = |what: &str| format!("tensor {name:?}: {what}");
    if name.is_empty() {
        return Err(bad("empty tensor name"));
    }
    let obj = v.as_object().ok_or_else(|| bad("entry is not an object"))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing dtype"))?;
    let dtype =
        Dtype::from_name(dtype_s).ok_or_else(|| bad(&format!("unknown dtype {dtype_s:?}")))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
    let offs = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing data_offsets"))?;
    let (begin, end) = match offs.as_slice() {
        [b, e] => (
            b.as_u64().ok_or_else(|| bad("data_offsets not integers"))?,
            e.as_u64().ok_or_else(|| bad("data_offsets not integers"))?,
        ),
        _ => return Err(bad("data_offsets must be [begin, end]")),
    };
    if end < begin {
        return Err(bad("data_offsets end before they begin"));
    }
    let len = byte_len(dtype, &shape).ok_or_else(|| bad("shape size overflows"))?;
    if len != end - begin {
        return Err(bad(&format!(
            "{dtype_s}{shape:?} needs {len} bytes but data_offsets give {}",
            end - begin
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// Parse a complete safetensors file held in memory.
pub fn parse_bytes(bytes: &[u8]) -> Result<Header, String> {
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|p| p.try_into().ok())
        .ok_or("file is shorter than the 8-byte safetensors header length")?;
    let n = header_len(prefix, bytes.len() as u64)?;
    parse_header(&bytes[8..8 + n as usize], bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tensors: &[(&str, Dtype, &[usize])]) -> Vec<u8> {
        let mut out = encode_header(tensors, &BTreeMap::new()).unwrap();
        for (_, d, s) in tensors {
            out.extend(std::iter::repeat_n(7u8, byte_len(*d, s).unwrap() as usize));
        }
        out
    }

    #[test]
    fn roundtrip() {
        let bytes = file(&[
            ("a", Dtype::F32, &[2, 3]),
            ("b", Dtype::I64, &[]),
            ("z", Dtype::U8, &[0]),
        ]);
        let h = parse_bytes(&bytes).unwrap();
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.get("a").unwrap().end, 24);
        assert_eq!(h.get("b").unwrap().shape, Vec::<usize>::new());
        assert_eq!((h.data_start - 8) % 8, 0);
    }

    #[test]
    fn refuses_hostile_headers() {
        let mut huge = vec![0u8; 16];
        huge[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse_bytes(&huge).unwrap_err().contains("more than"));
        let mut past = vec![0u8; 16];
        past[..8].copy_from_slice(&100u64.to_le_bytes());
        assert!(parse_bytes(&past).unwrap_err().contains("holds only"));
        // Truncated data region.
        let mut t = file(&[("a", Dtype::F32, &[4])]);
        t.pop();
        assert!(parse_bytes(&t).is_err());
        // Overflowing shape.
        let j = br#"{"a":{"dtype":"F64","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#;
        let mut o = (j.len() as u64).to_le_bytes().to_vec();
        o.extend_from_slice(j);
        o.extend_from_slice(&[0; 8]);
        assert!(parse_bytes(&o).unwrap_err().contains("overflow"));
        assert!(parse_bytes(b"short").is_err());
    }

    #[test]
    fn refuses_holes_and_overlaps() {
        let j = br#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        let mut o = (j.len() as u64).to_le_bytes().to_vec();
        o.extend_from_slice(j);
        o.extend_from_slice(&[0; 3]);
        assert!(parse_bytes(&o).unwrap_err().contains("tile"));
    }
}
