//! `MANIFEST.json`: the last file written into a checkpoint, and the one that makes it whole.
//!
//! It lists every file with its size and checksum, and records the step, epoch, metrics, versions
//! and origin (host, scheduler job). A checkpoint without a manifest that parses and matches its
//! files is never trusted. Parsing is bounded ([`MAX_MANIFEST_BYTES`]) and every file name is
//! checked by [`check_file_name`] before it is joined to a path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// `format` field of every manifest.
pub const FORMAT: &str = "hpc-ckpt-checkpoint";
/// The checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Manifests larger than this are refused unread.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// Checksum of the whole file, hex, by [`Manifest::checksum_algorithm`].
    pub checksum: String,
}

/// The batch job a checkpoint was written by, when there was one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Scheduler name, e.g. "slurm".
    pub scheduler: String,
    pub id: String,
    pub restart_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Global step: the state after this many optimizer steps.
    pub step: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobInfo>,
    /// Component versions: `hpc_ckpt`, and whatever the writer adds (tch, libtorch).
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    pub checksum_algorithm: String,
    pub files: Vec<FileEntry>,
    /// The retention policy in force when this checkpoint was committed (read by `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<super::retention::RetentionPolicy>,
    /// Writer-specific data (e.g. the trainer's reference loss).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    /// Parse manifest bytes and check everything that can be checked without the files:
    /// format, version, names, duplicates, checksum syntax.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a valid manifest: {e}"))?;
        if m.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", m.format));
        }
        if m.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported by this build (reads {FORMAT_VERSION}); use a \
                 matching hpc-ckpt",
                m.format_version
            ));
        }
        if m.checksum_algorithm != super::checksum::ALGORITHM {
            return Err(format!(
                "checksum_algorithm {:?} is not supported",
                m.checksum_algorithm
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &m.files {
            check_file_name(&f.name).map_err(|e| format!("file entry {:?}: {e}", f.name))?;
            if f.name == MANIFEST_FILE {
                return Err("the manifest lists itself".into());
            }
            if !seen.insert(f.name.as_str()) {
                return Err(format!("file {:?} is listed twice", f.name));
            }
            if f.checksum.len() != 32
                || !f
                    .checksum
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(format!(
                    "file {:?}: checksum is not 32 lowercase hex digits",
                    f.name
                ));
            }
        }
        Ok(m)
    }
}

/// The one hidden file name a checkpoint may hold: the metadata file of a
/// torch.distributed.checkpoint directory, which DCP's readers look for under exactly this name
/// (a checkpoint's sharded part stays loadable by plain DCP).
pub const DCP_METADATA_FILE: &str = ".metadata";

/// A checkpoint file name must be one plain path component of letters, digits, `.`, `_`, `-`,
/// not starting with `.` (except [`DCP_METADATA_FILE`]), at most 255 bytes. This refuses `..`,
/// absolute paths, separators, control characters and non-UTF-8 names before any path is built
/// from them.
pub fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty file name".into());
    }
    if name.len() > 255 {
        return Err("file name longer than 255 bytes".into());
    }
    if name.starts_with('.') && name != DCP_METADATA_FILE {
        return Err(format!(
            "file name starts with '.' (hidden names and '..' are refused; the one allowed is \
             {DCP_METADATA_FILE}, torch.distributed.checkpoint's metadata file)"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "file name contains {c:?}; allowed are letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Directory name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:012}")
}

/// The step of a checkpoint directory name, if it is one.
/// Only the canonical name of a step parses (`step-` and at least 12 digits, no extra leading
/// zeros), so one step has exactly one directory name.
pub fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (checkpoint_name(step) == name).then_some(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(checkpoint_name(1200), "step-000000001200");
        assert_eq!(parse_checkpoint_name("step-000000001200"), Some(1200));
        assert_eq!(parse_checkpoint_name("step-12"), None);
        assert_eq!(parse_checkpoint_name("step-00000000120a"), None);
        assert_eq!(parse_checkpoint_name("step-0000000001200"), None);
        assert_eq!(
            parse_checkpoint_name("step-1234567890123"),
            Some(1234567890123)
        );
        for bad in [
            "",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            ".hidden",
            ".metadata.tmp",
            ".",
            "a\u{0}b",
            "é",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        check_file_name("model.safetensors").unwrap();
        check_file_name(DCP_METADATA_FILE).unwrap();
    }

    #[test]
    fn parse_refuses_bad_manifests() {
        assert!(Manifest::parse(b"garbage").is_err());
        assert!(Manifest::parse(b"{}").is_err());
        let good = Manifest {
            format: FORMAT.into(),
            format_version: 1,
            step: 3,
            epoch: None,
            metrics: Default::default(),
            created_at: "2026-01-01T00:00:00Z".into(),
            host: "h".into(),
            job: None,
            versions: Default::default(),
            checksum_algorithm: "xxh3-128".into(),
            files: vec![FileEntry {
                name: "../x".into(),
                size: 1,
                checksum: "0".repeat(32),
            }],
            retention: None,
            extra: Default::default(),
        };
        let e = Manifest::parse(&good.to_json()).unwrap_err();
        assert!(e.contains("../x"), "{e}");
        let mut ok = good.clone();
        ok.files[0].name = "a.bin".into();
        assert_eq!(Manifest::parse(&ok.to_json()).unwrap(), ok);
    }
}
