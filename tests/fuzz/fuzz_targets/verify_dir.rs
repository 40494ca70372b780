//! Fuzz bytes written into a checkpoint directory, then `verify_checkpoint` run over it.
//!
//! First byte even: the rest is `MANIFEST.json`, alone in the directory. Verification must not
//! panic, and it can only succeed for a manifest that lists no files.
//! First byte odd: the rest is `model.safetensors`, listed by a correct manifest (right size and
//! checksum), so verification reaches the header check. It must agree with `parse_bytes` on the
//! same bytes, and a fault must name the file.
//!
//! The directory lives under /dev/shm when it exists (tmpfs: no disk I/O per execution), one per
//! process, named by its pid; a later run removes those of processes that are gone.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hpc_ckpt::storage::checksum::hex_of;
use hpc_ckpt::storage::manifest::{FileEntry, Manifest, FORMAT, FORMAT_VERSION, MANIFEST_FILE};
use hpc_ckpt::storage::safetensors::parse_bytes;
use hpc_ckpt::storage::verify::verify_checkpoint;
use libfuzzer_sys::fuzz_target;

const DATA_FILE: &str = "model.safetensors";

fn ckpt_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        // libFuzzer exits without running destructors: remove what earlier, finished runs left.
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("hpc-ckpt-fuzz-verify-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let root = base.join(format!("hpc-ckpt-fuzz-verify-{}", std::process::id()));
        let dir = root.join("step-000000000001");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&dir).expect("create fuzz checkpoint dir");
        dir
    })
}

fn manifest_for(bytes: &[u8]) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        step: 1,
        epoch: None,
        metrics: Default::default(),
        created_at: "2026-01-01T00:00:00Z".into(),
        host: "fuzz".into(),
        job: None,
        versions: Default::default(),
        checksum_algorithm: "xxh3-128".into(),
        files: vec![FileEntry {
            name: DATA_FILE.into(),
            size: bytes.len() as u64,
            checksum: hex_of(bytes),
        }],
        retention: None,
        extra: Default::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = ckpt_dir();
    let data_path = dir.join(DATA_FILE);
    let manifest_path = dir.join(MANIFEST_FILE);
    if mode & 1 == 0 {
        let _ = std::fs::remove_file(&data_path);
        std::fs::write(&manifest_path, rest).unwrap();
        if let Ok(m) = verify_checkpoint(dir) {
            assert!(
                m.files.is_empty(),
                "verified a manifest whose files are not there: {:?}",
                m.files
            );
        }
    } else {
        std::fs::write(&data_path, rest).unwrap();
        std::fs::write(&manifest_path, manifest_for(rest).to_json()).unwrap();
        let direct = parse_bytes(rest);
        match (verify_checkpoint(dir), direct) {
            (Ok(_), Ok(_)) => {}
            (Err(faults), Err(_)) => {
                assert_eq!(faults.len(), 1, "one bad file, several faults: {faults:?}");
                assert!(
                    faults[0].file.ends_with(DATA_FILE),
                    "fault does not name the file: {faults:?}"
                );
                assert!(!faults[0].reason.is_empty());
            }
            (v, d) => panic!(
                "verify and parse_bytes disagree: verify {:?}, parse_bytes {:?}",
                v.map(|_| ()),
                d.map(|_| ())
            ),
        }
    }
});
