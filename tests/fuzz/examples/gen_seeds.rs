//! Regenerates the committed seed corpora under `tests/fuzz/seeds/<target>/` and checks that each
//! seed is accepted by the parser it feeds:
//!
//!     cargo run --manifest-path tests/fuzz/Cargo.toml --example gen_seeds

use std::collections::BTreeMap;
use std::path::Path;

use hpc_ckpt::storage::checksum::hex_of;
use hpc_ckpt::storage::manifest::{FileEntry, JobInfo, Manifest, FORMAT, FORMAT_VERSION};
use hpc_ckpt::storage::safetensors::{byte_len, encode_header, parse_bytes, Dtype};
use hpc_ckpt::storage::RetentionPolicy;

fn safetensors(tensors: &[(&str, Dtype, &[usize])], meta: &[(&str, &str)]) -> Vec<u8> {
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut out = encode_header(tensors, &meta).unwrap();
    let mut x = 0u8;
    for (_, d, s) in tensors {
        for _ in 0..byte_len(*d, s).unwrap() {
            x = x.wrapping_mul(31).wrapping_add(7);
            out.push(x);
        }
    }
    parse_bytes(&out).expect("seed safetensors parses");
    out
}

fn manifest(files: &[(&str, &[u8])], full: bool) -> Vec<u8> {
    let mut m = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        step: 1,
        epoch: None,
        metrics: BTreeMap::new(),
        created_at: "2026-01-01T00:00:00Z".into(),
        host: "node001".into(),
        job: None,
        versions: BTreeMap::from([("hpc_ckpt".into(), "0.1.0".into())]),
        checksum_algorithm: "xxh3-128".into(),
        files: files
            .iter()
            .map(|(n, b)| FileEntry {
                name: n.to_string(),
                size: b.len() as u64,
                checksum: hex_of(b),
            })
            .collect(),
        retention: None,
        extra: Default::default(),
    };
    if full {
        m.step = 1200;
        m.epoch = Some(3);
        m.metrics = BTreeMap::from([("loss".into(), 0.123456789), ("val_loss".into(), 1.5e-3)]);
        m.job = Some(JobInfo {
            scheduler: "slurm".into(),
            id: "4242".into(),
            restart_count: 2,
        });
        m.versions.insert("tch".into(), "0.17.0".into());
        m.retention = Some(
            serde_json::from_str::<RetentionPolicy>(
                r#"{"keep_last":3,"keep_best":{"monitor":"val_loss","mode":"min","keep":1},
                    "periodic":{"every":1000,"keep":2},"milestones":[5000]}"#,
            )
            .unwrap(),
        );
        m.extra
            .insert("reference_loss".into(), serde_json::json!(2.25));
        m.extra.insert(
            "notes".into(),
            serde_json::json!({"a": [1, -2, true, null, "x"]}),
        );
    }
    let json = m.to_json();
    assert_eq!(Manifest::parse(&json).expect("seed manifest parses"), m);
    json
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
    println!("{target}/{name}: {} bytes", bytes.len());
}

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let small = safetensors(
        &[
            ("w", Dtype::F32, &[2, 3]),
            ("b", Dtype::F32, &[3]),
            ("step", Dtype::I64, &[]),
        ],
        &[("format", "pt")],
    );
    let mixed = safetensors(
        &[
            ("layer.0.weight", Dtype::BF16, &[4, 2]),
            ("layer.0.bias", Dtype::F16, &[4]),
            ("mask", Dtype::Bool, &[5]),
            ("ids", Dtype::U64, &[2]),
            ("empty", Dtype::U8, &[0, 7]),
            ("i8", Dtype::I8, &[1, 1, 1]),
            ("i16", Dtype::I16, &[1]),
            ("u16", Dtype::U16, &[1]),
            ("i32", Dtype::I32, &[1]),
            ("u32", Dtype::U32, &[1]),
            ("f64", Dtype::F64, &[1]),
        ],
        &[],
    );
    let empty = safetensors(&[], &[]);
    write(&seeds, "safetensors_header", "small.safetensors", &small);
    write(
        &seeds,
        "safetensors_header",
        "all_dtypes.safetensors",
        &mixed,
    );
    write(&seeds, "safetensors_header", "empty.safetensors", &empty);

    write(
        &seeds,
        "manifest",
        "minimal.json",
        &manifest(&[("model.safetensors", &small)], false),
    );
    write(
        &seeds,
        "manifest",
        "full.json",
        &manifest(
            &[
                ("model.safetensors", &small),
                ("optim.safetensors", &mixed),
                ("rng.bin", b"rng"),
            ],
            true,
        ),
    );
    write(&seeds, "manifest", "no_files.json", &manifest(&[], false));

    // verify_dir: first byte odd = the rest is model.safetensors; even = the rest is MANIFEST.json.
    for (name, st) in [("small", &small), ("all_dtypes", &mixed)] {
        let mut b = vec![1u8];
        b.extend_from_slice(st);
        write(
            &seeds,
            "verify_dir",
            &format!("{name}.safetensors.seed"),
            &b,
        );
    }
    let mut b = vec![0u8];
    b.extend_from_slice(&manifest(&[], false));
    write(&seeds, "verify_dir", "manifest_no_files.seed", &b);
    let mut b = vec![0u8];
    b.extend_from_slice(&manifest(&[("model.safetensors", &small)], true));
    write(&seeds, "verify_dir", "manifest_missing_file.seed", &b);
}
