//! `last_checkpoint`: the name of the newest committed checkpoint, one line.
//!
//! Replaced atomically (write temp, fsync, rename, fsync the run dir) and only after the
//! checkpoint it names is durable, so it never names a partial checkpoint. Reading is bounded and
//! accepts only a valid checkpoint name: anything else is reported as a fault, never followed.

use std::path::Path;

use super::error::{Fault, Result};
use super::fsutil::{read_bounded, replace_file_durable};
use super::manifest::parse_checkpoint_name;

pub const POINTER_FILE: &str = "last_checkpoint";

/// What the pointer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pointer {
    /// No pointer file: nothing was ever committed (or it was deleted).
    Absent,
    /// A valid checkpoint name.
    Names(String),
}

/// Read the pointer of `run_dir`. A garbage pointer is a fault naming the file.
pub fn read(run_dir: &Path) -> std::result::Result<Pointer, Fault> {
    let path = run_dir.join(POINTER_FILE);
    if !path.exists() && std::fs::symlink_metadata(&path).is_err() {
        return Ok(Pointer::Absent);
    }
    let bytes = read_bounded(&path, 4096).map_err(|r| Fault::new(POINTER_FILE, r))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| Fault::new(POINTER_FILE, "is not UTF-8"))?;
    let name = text.trim();
    if parse_checkpoint_name(name).is_none() {
        return Err(Fault::new(
            POINTER_FILE,
            format!(
                "does not name a checkpoint (expected step-NNNNNNNNNNNN, found {:?})",
                name.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok(Pointer::Names(name.to_string()))
}

/// Point `last_checkpoint` at `name`, atomically and durably.
pub fn write(run_dir: &Path, name: &str) -> Result<()> {
    replace_file_durable(&run_dir.join(POINTER_FILE), format!("{name}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_garbage() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), Pointer::Absent);
        write(d.path(), "step-000000000007").unwrap();
        assert_eq!(
            read(d.path()).unwrap(),
            Pointer::Names("step-000000000007".into())
        );
        std::fs::write(d.path().join(POINTER_FILE), "../../etc\n").unwrap();
        assert!(read(d.path()).unwrap_err().reason.contains("does not name"));
        std::fs::write(d.path().join(POINTER_FILE), [0xff, 0xfe]).unwrap();
        assert!(read(d.path()).is_err());
    }
}
