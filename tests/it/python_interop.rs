//! Python interop: the `*.safetensors` files we write load in Python's `safetensors` package
//! (the PyPI release pinned by `tests/setup-python.sh`) with identical names, dtypes, shapes,
//! metadata and bytes; and files Python writes parse with our reader to the same bytes.
//!
//! Needs the project venv (`tests/setup-python.sh`); `HPC_CKPT_PYTHON` overrides the interpreter.

use std::collections::BTreeMap;
use std::process::Command;

use crate::common::*;
use hpc_ckpt::storage::run_dir::holder;
use hpc_ckpt::storage::safetensors::{byte_len, parse_bytes, Dtype};
use hpc_ckpt::storage::{CommitMeta, FileSource, RetentionPolicy, Snapshot, Store, TensorData};
use sha2::{Digest, Sha256};

#[test]
fn our_safetensors_load_in_python_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut rng = Rng(99);
    let shapes: Vec<(&str, Dtype, Vec<usize>)> = vec![
        ("layer.0.weight", Dtype::F32, vec![64, 33]),
        ("layer.0.bias", Dtype::F32, vec![33]),
        ("emb", Dtype::BF16, vec![17, 8]),
        ("half", Dtype::F16, vec![3, 5, 7]),
        ("double", Dtype::F64, vec![10]),
        ("steps", Dtype::I64, vec![]),
        ("mask", Dtype::Bool, vec![12]),
        ("bytes", Dtype::U8, vec![1000]),
        ("ints", Dtype::I32, vec![2, 2]),
        ("empty", Dtype::F32, vec![0, 4]),
    ];
    let mut tensors = Vec::new();
    let mut expect = serde_json::Map::new();
    for (name, dtype, shape) in &shapes {
        let n = byte_len(*dtype, shape).unwrap() as usize;
        let mut bytes = rng.bytes(n);
        if *dtype == Dtype::Bool {
            bytes.iter_mut().for_each(|b| *b &= 1);
        }
        if matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) {
            // Finite values only (numpy compares bytes anyway, but keep them sane).
            for chunk in bytes.chunks_mut(dtype.size()) {
                *chunk.last_mut().unwrap() &= 0x3f;
            }
        }
        expect.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape,
                "sha256": format!("{:x}", Sha256::digest(&bytes))}),
        );
        tensors.push(TensorData {
            name: name.to_string(),
            dtype: *dtype,
            shape: shape.clone(),
            bytes: bytes.into(),
        });
    }
    let metadata: BTreeMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        ("step".to_string(), "7".to_string()),
    ]
    .into();
    let mut snap = Snapshot::new();
    snap.add(
        "model.safetensors",
        FileSource::Tensors {
            tensors,
            metadata: metadata.clone(),
        },
    );
    let mut store = Store::open(&run, &holder(None), RetentionPolicy::default()).unwrap();
    store
        .commit(
            &snap,
            &CommitMeta {
                step: 7,
                ..Default::default()
            },
        )
        .unwrap();
    let file = run
        .join("checkpoints")
        .join(ckpt(7))
        .join("model.safetensors");
    let exp_path = tmp.path().join("expect.json");
    std::fs::write(
        &exp_path,
        serde_json::to_vec(&serde_json::json!({"tensors": expect, "metadata": metadata})).unwrap(),
    )
    .unwrap();
    let o = Command::new(python())
        .arg(repo().join("tests/python/check_safetensors.py"))
        .arg(&file)
        .arg(&exp_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "python check failed:\n{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("OK {}", shapes.len())));
}

#[test]
fn python_written_safetensors_parse_with_our_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("py.safetensors");
    let script = r#"
import sys, hashlib, json, numpy as np
from safetensors.numpy import save_file
rng = np.random.default_rng(5)
t = {"a": rng.standard_normal((7, 3)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
     "c": np.array(3.5, dtype=np.float64), "d": np.zeros((0,), dtype=np.uint8)}
save_file(t, sys.argv[1], metadata={"who": "python"})
print(json.dumps({k: [str(v.dtype), list(v.shape), hashlib.sha256(v.tobytes()).hexdigest()] for k, v in t.items()}))
"#;
    let o = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let want: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let h = parse_bytes(&bytes).expect("our parser accepts Python's file");
    assert_eq!(h.metadata.get("who").map(String::as_str), Some("python"));
    assert_eq!(h.tensors.len(), 4);
    for t in &h.tensors {
        let w = &want[&t.name];
        let data = &bytes[(h.data_start + t.begin) as usize..(h.data_start + t.end) as usize];
        assert_eq!(
            format!("{:x}", Sha256::digest(data)),
            w[2].as_str().unwrap(),
            "{}",
            t.name
        );
        let shape: Vec<usize> = w[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{}", t.name);
    }
}
