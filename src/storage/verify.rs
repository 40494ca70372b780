//! Verification of one committed checkpoint directory.
//!
//! A checkpoint verifies when its name parses, `MANIFEST.json` parses (bounded size, valid names),
//! its step matches the name, the directory holds exactly the listed files (regular files, no
//! symlinks), each file has the listed size and checksum, and each `*.safetensors` file has a
//! header that is valid for its size. Every fault names the file and the reason; verification
//! reads with fixed-size buffers and allocates nothing sized by the files' content.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use super::checksum::Checksum;
use super::error::Fault;
use super::fsutil::{open_regular_nofollow, read_bounded};
use super::manifest::{
    parse_checkpoint_name, FileEntry, Manifest, MANIFEST_FILE, MAX_MANIFEST_BYTES,
};
use super::safetensors;

const CHUNK: usize = 8 << 20;

fn label(dir: &Path, file: &str) -> String {
    let d = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    if file.is_empty() {
        d
    } else {
        format!("{d}/{file}")
    }
}

/// Read and check the manifest alone (no file contents): cheap, used by listings.
pub fn read_manifest(dir: &Path) -> Result<Manifest, Fault> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Fault::new(dir.display().to_string(), "directory name is not UTF-8"))?;
    let step = parse_checkpoint_name(name).ok_or_else(|| {
        Fault::new(
            label(dir, ""),
            "not a checkpoint directory name (expected step-NNNNNNNNNNNN)",
        )
    })?;
    let path = dir.join(MANIFEST_FILE);
    let bytes = read_bounded(&path, MAX_MANIFEST_BYTES)
        .map_err(|r| Fault::new(label(dir, MANIFEST_FILE), r))?;
    let m = Manifest::parse(&bytes).map_err(|r| Fault::new(label(dir, MANIFEST_FILE), r))?;
    if m.step != step {
        return Err(Fault::new(
            label(dir, MANIFEST_FILE),
            format!(
                "says step {} but the directory is named for step {step}",
                m.step
            ),
        ));
    }
    Ok(m)
}

/// Verify a checkpoint completely. On success returns its manifest.
pub fn verify_checkpoint(dir: &Path) -> Result<Manifest, Vec<Fault>> {
    check(dir, None)
}

/// A verified checkpoint read into memory.
pub struct Loaded {
    pub manifest: Manifest,
    /// File name → bytes, every one checked against the manifest.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Verify a checkpoint and return its files' bytes, read once.
pub fn load_checkpoint(dir: &Path) -> Result<Loaded, Vec<Fault>> {
    let mut files = BTreeMap::new();
    let manifest = check(dir, Some(&mut files))?;
    Ok(Loaded { manifest, files })
}

/// Verify `dir` as named steps: the manifest, no file it does not list, then every listed file
/// (size, checksum, safetensors header), keeping their bytes in `keep` when asked.
fn check(
    dir: &Path,
    mut keep: Option<&mut BTreeMap<String, Vec<u8>>>,
) -> Result<Manifest, Vec<Fault>> {
    let m = read_manifest(dir).map_err(|f| vec![f])?;
    let mut faults = unlisted_files(dir, &m);
    for entry in &m.files {
        match check_file(dir, entry, keep.is_some()) {
            Ok(bytes) => {
                if let (Some(k), Some(b)) = (keep.as_deref_mut(), bytes) {
                    k.insert(entry.name.clone(), b);
                }
            }
            Err(f) => faults.push(f),
        }
    }
    if faults.is_empty() {
        Ok(m)
    } else {
        Err(faults)
    }
}

/// A fault for every entry of `dir` the manifest does not list (or one if `dir` cannot be
/// listed).
fn unlisted_files(dir: &Path, m: &Manifest) -> Vec<Fault> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => return vec![Fault::new(label(dir, ""), format!("cannot list: {e}"))],
    };
    rd.flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n != MANIFEST_FILE && m.file(&n).is_none())
                .then(|| Fault::new(label(dir, &n), "not listed in the manifest"))
        })
        .collect()
}

/// Check one listed file: a regular file of the listed size whose content has the listed
/// checksum (and a valid header for a `*.safetensors`). Returns its bytes when `keep`.
fn check_file(dir: &Path, entry: &FileEntry, keep: bool) -> Result<Option<Vec<u8>>, Fault> {
    let path = dir.join(&entry.name);
    let fault = |r: String| Fault::new(label(dir, &entry.name), r);
    let (mut f, size) = open_regular_nofollow(&path).map_err(fault)?;
    if size != entry.size {
        return Err(fault(format!(
            "size is {size} bytes, the manifest says {}",
            entry.size
        )));
    }
    let (sum, bytes) = read_summed(&mut f, size, keep).map_err(fault)?;
    if sum != entry.checksum {
        return Err(fault(format!(
            "checksum mismatch (content changed or corrupted): {sum} on disk, {} in the manifest",
            entry.checksum
        )));
    }
    if entry.name.ends_with(".safetensors") {
        check_safetensors(&path, size).map_err(fault)?;
    }
    Ok(bytes)
}

/// Read `f` (expected `size` bytes) in fixed chunks: its checksum, and its bytes when `keep`.
/// Fails if the file grows or shrinks while being read.
fn read_summed(
    f: &mut fs::File,
    size: u64,
    keep: bool,
) -> Result<(String, Option<Vec<u8>>), String> {
    let mut sum = Checksum::new();
    let mut buf = keep.then(|| Vec::with_capacity(size as usize));
    let mut chunk = vec![0u8; CHUNK.min(size as usize).max(1)];
    let mut read_total = 0u64;
    loop {
        match f.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                sum.update(&chunk[..n]);
                if let Some(b) = buf.as_mut() {
                    b.extend_from_slice(&chunk[..n]);
                }
                read_total += n as u64;
                if read_total > size {
                    return Err("grew while being read".to_string());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
    if read_total != size {
        return Err("shrank while being read".to_string());
    }
    Ok((sum.hex(), buf))
}

/// Validate a safetensors file's header against its size (bounded reads only).
pub fn check_safetensors(path: &Path, size: u64) -> Result<safetensors::Header, String> {
    let (mut f, _) = open_regular_nofollow(path)?;
    let mut prefix = [0u8; 8];
    f.read_exact(&mut prefix)
        .map_err(|_| "shorter than the 8-byte safetensors header length".to_string())?;
    let n = safetensors::header_len(prefix, size)?;
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json)
        .map_err(|e| format!("cannot read safetensors header: {e}"))?;
    safetensors::parse_header(&json, size)
}
