//! tch tensors to and from the store's safetensors files.
//!
//! [`to_tensor_data`] copies a tensor (any device, any layout) into an owned, contiguous,
//! little-endian [`TensorData<'static>`] for a [`crate::storage::Snapshot`], and
//! [`read_safetensors`] turns the bytes of a verified checkpoint file back into CPU tensors.
//! Guarantees: the bytes are exactly the tensor's (no conversion, no rounding); a dtype either side
//! cannot represent is an error, never a silent cast; a file is parsed with the store's
//! untrusting header parser ([`crate::storage::safetensors::parse_bytes`]).

use std::borrow::Cow;

use tch::{Device, Kind, Tensor};

use crate::storage::safetensors::{parse_bytes, Dtype};
use crate::storage::TensorData;

/// Errors converting between tch tensors and safetensors.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("tensor {name}: dtype {kind:?} cannot be stored in safetensors by hpc-ckpt")]
    UnsupportedKind { name: String, kind: Kind },
    #[error("tensor {name}: safetensors dtype {} has no libtorch equivalent in tch", dtype.name())]
    UnsupportedDtype { name: String, dtype: Dtype },
    #[error("tensor {name}: {message}")]
    Torch { name: String, message: String },
    #[error("{file}: not a valid safetensors file: {reason}")]
    BadFile { file: String, reason: String },
}

/// A tch error's message without libtorch's C++ stack dump (kept only with
/// `TORCH_SHOW_CPP_STACKTRACES=1`).
pub fn torch_message(e: &tch::TchError) -> String {
    let full = e.to_string();
    match full.find("\nException raised from ") {
        Some(i) if std::env::var_os("TORCH_SHOW_CPP_STACKTRACES").is_none_or(|v| v != "1") => {
            full[..i].to_owned()
        }
        _ => full,
    }
}

/// The safetensors dtype of a tch kind, if it has one.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::Bool,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

/// The tch kind of a safetensors dtype, if tch has one (tch 0.26 has no unsigned 16/32/64).
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::Bool => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::U16 | Dtype::U32 | Dtype::U64 => return None,
    })
}

const _: () = assert!(
    cfg!(target_endian = "little"),
    "safetensors is little-endian; tensor bytes are copied as they are in memory"
);

/// Copy `t` into an owned safetensors entry named `name` (a host copy: the result is `'static`
/// and can go to a background persist while training continues).
pub fn to_tensor_data(name: &str, t: &Tensor) -> Result<TensorData<'static>, TensorError> {
    copy_tensor(name, t, |len| vec![0u8; len])
}

/// [`to_tensor_data`] into a buffer of the caller's: `buffer(len)` returns one of exactly `len`
/// bytes (e.g. [`crate::storage::persister::Buffers::tensor`], reusing the previous save's
/// memory), which is overwritten with the tensor's bytes in one copy, from any device.
pub fn copy_tensor(
    name: &str,
    t: &Tensor,
    buffer: impl FnOnce(usize) -> Vec<u8>,
) -> Result<TensorData<'static>, TensorError> {
    let torch = |e| TensorError::Torch {
        name: name.to_owned(),
        message: torch_message(&e),
    };
    let kind = t.f_kind().map_err(torch)?;
    let dtype = dtype_of(kind).ok_or_else(|| TensorError::UnsupportedKind {
        name: name.to_owned(),
        kind,
    })?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let numel = t.numel();
    let len = numel * kind.elt_size_in_bytes();
    let mut bytes = buffer(len);
    assert_eq!(
        bytes.len(),
        len,
        "copy_tensor: the buffer must be {len} bytes"
    );
    if numel > 0 {
        // The logical (row-major) content, as bytes (no conversion, so every dtype copies the
        // same way); contiguous() copies only a non-contiguous view.
        let src = t.f_contiguous().map_err(torch)?;
        let flat = src.f_reshape([-1]).map_err(torch)?;
        let src = if kind == Kind::Uint8 {
            flat
        } else {
            flat.f_view_dtype(Kind::Uint8).map_err(torch)?
        };
        // SAFETY: `dst` views `bytes` (len bytes, alive and not otherwise borrowed until `dst`
        // is dropped at the end of this block); copy_ writes exactly len bytes into it, from
        // the CPU or any device.
        let mut dst = unsafe {
            Tensor::f_from_blob(
                bytes.as_mut_ptr(),
                &[len as i64],
                &[1],
                Kind::Uint8,
                Device::Cpu,
            )
        }
        .map_err(torch)?;
        dst.f_copy_(&src).map_err(torch)?;
        drop(dst);
    }
    Ok(TensorData {
        name: name.to_owned(),
        dtype,
        shape,
        bytes: Cow::Owned(bytes),
    })
}

/// The tensors of a safetensors file held in memory (e.g. a file of a verified checkpoint), as
/// CPU tensors in file order. `file` names the file in errors.
pub fn read_safetensors(file: &str, bytes: &[u8]) -> Result<Vec<(String, Tensor)>, TensorError> {
    let header = parse_bytes(bytes).map_err(|reason| TensorError::BadFile {
        file: file.to_owned(),
        reason,
    })?;
    let mut out = Vec::with_capacity(header.tensors.len());
    for info in &header.tensors {
        let kind = kind_of(info.dtype).ok_or_else(|| TensorError::UnsupportedDtype {
            name: info.name.clone(),
            dtype: info.dtype,
        })?;
        // parse_bytes checked every offset against the file size.
        let start = (header.data_start + info.begin) as usize;
        let end = (header.data_start + info.end) as usize;
        let data = &bytes[start..end];
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(data, &shape, kind).map_err(|e| TensorError::Torch {
            name: info.name.clone(),
            message: torch_message(&e),
        })?;
        out.push((info.name.clone(), t));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::storage::{FileSource, Snapshot};

    /// Commit through the real store and load the verified checkpoint back.
    fn round_trip(tensors: Vec<TensorData<'static>>) -> Vec<(String, Tensor)> {
        use crate::storage::{run_dir::holder, CommitMeta, RetentionPolicy, Store};
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), &holder(None), RetentionPolicy::default()).unwrap();
        let mut snap = Snapshot::new();
        snap.add(
            "t.safetensors",
            FileSource::Tensors {
                tensors,
                metadata: BTreeMap::new(),
            },
        );
        let meta = CommitMeta {
            step: 1,
            ..CommitMeta::default()
        };
        store.commit(&snap, &meta).unwrap();
        let loaded = store.load_latest().unwrap().unwrap();
        read_safetensors("t.safetensors", &loaded.files["t.safetensors"]).unwrap()
    }

    #[test]
    fn every_kind_round_trips_bit_for_bit() {
        let base =
            Tensor::from_slice(&[1.5f64, -0.0, f64::NAN, 1e-300, -7.25, 3.0]).reshape([2, 3]);
        let kinds = [
            Kind::Float,
            Kind::Double,
            Kind::Half,
            Kind::BFloat16,
            Kind::Int64,
            Kind::Int,
            Kind::Int16,
            Kind::Int8,
            Kind::Uint8,
            Kind::Bool,
        ];
        let mut data = Vec::new();
        let mut orig = Vec::new();
        for (i, k) in kinds.iter().enumerate() {
            let t = base.to_kind(*k);
            // A non-contiguous view must be stored as its logical (row-major) content.
            let t = if i % 2 == 0 {
                t.tr().contiguous().tr()
            } else {
                t
            };
            data.push(to_tensor_data(&format!("k{i}"), &t).unwrap());
            orig.push(t);
        }
        data.push(to_tensor_data("scalar", &Tensor::from(3.0f32)).unwrap());
        data.push(
            to_tensor_data("empty", &Tensor::zeros([0, 4], (Kind::Float, Device::Cpu))).unwrap(),
        );
        assert_eq!(data[0].shape, vec![2, 3]);
        let back = round_trip(data);
        for (i, t) in orig.iter().enumerate() {
            let (n, b) = &back[i];
            assert_eq!(n, &format!("k{i}"));
            assert_eq!(b.kind(), t.kind());
            assert_eq!(b.size(), t.size());
            let (x, y) = (
                to_tensor_data("x", t).unwrap(),
                to_tensor_data("y", b).unwrap(),
            );
            assert_eq!(x.bytes, y.bytes, "kind {:?}", t.kind());
        }
        assert_eq!(back[kinds.len()].1.size(), Vec::<i64>::new());
        assert_eq!(back[kinds.len()].1.double_value(&[]), 3.0);
        assert_eq!(back[kinds.len() + 1].1.size(), vec![0, 4]);
    }

    #[test]
    fn unsupported_and_bad_inputs_are_errors() {
        let t = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu));
        let e = to_tensor_data("c", &t).unwrap_err();
        assert!(
            e.to_string().contains("tensor c: dtype ComplexFloat"),
            "{e}"
        );
        let e = read_safetensors("x.safetensors", b"garbage").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("x.safetensors: not a valid safetensors file"),
            "{e}"
        );
    }
}
