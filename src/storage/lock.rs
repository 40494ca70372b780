//! `run.lock`: one writer per run directory.
//!
//! An exclusive `flock` (fs2) held for the writer's lifetime; the kernel releases it when the
//! process dies, however it dies, so a crashed writer never leaves a stale lock. The holder writes
//! who it is (pid, host, job id, since) into the file so that a second writer's error names it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fs2::FileExt;
use serde::{Deserialize, Serialize};

use super::error::{IoContext, Result, StorageError};

pub const LOCK_FILE: &str = "run.lock";

/// Who holds (or last held) the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    pub since: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on host {}", self.pid, self.host)?;
        if let Some(j) = &self.job_id {
            write!(f, ", Slurm job {j}")?;
        }
        write!(f, ", since {}", self.since)
    }
}

/// The held lock; released on drop.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

impl RunLock {
    /// Take the lock of `run_dir` or fail at once, naming the holder.
    pub fn acquire(run_dir: &Path, me: &Holder) -> Result<RunLock> {
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        if let Err(e) = FileExt::try_lock_exclusive(&file) {
            return Err(match classify(&e) {
                LockFailure::Contended => StorageError::Locked {
                    run_dir: run_dir.to_path_buf(),
                    holder: read_holder(&mut file)
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| "holder unknown".into()),
                },
                LockFailure::Unsupported => StorageError::LockUnsupported { path, source: e },
                LockFailure::Other => StorageError::io(format!("lock {}", path.display()), e),
            });
        }
        let text = serde_json::to_string(me).expect("holder serializes") + "\n";
        file.set_len(0)
            .ctx(|| format!("truncate {}", path.display()))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(text.as_bytes()))
            .and_then(|_| file.sync_data())
            .ctx(|| format!("write {}", path.display()))?;
        Ok(RunLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.file);
    }
}

/// Why `flock` failed: another holder (the only case that means "another writer"), a file
/// system without locks, or some other I/O error — told apart as cargo's `flock.rs` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockFailure {
    Contended,
    Unsupported,
    Other,
}

fn classify(e: &std::io::Error) -> LockFailure {
    use nix::libc;
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => LockFailure::Contended,
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => LockFailure::Unsupported,
        _ if e.kind() == std::io::ErrorKind::WouldBlock => LockFailure::Contended,
        _ if e.kind() == std::io::ErrorKind::Unsupported => LockFailure::Unsupported,
        _ => LockFailure::Other,
    }
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(4096).read_to_string(&mut s).ok()?;
    serde_json::from_str(s.trim()).ok()
}

/// Whether the run dir's lock is held right now, and by whom (for `status`).
pub fn probe(run_dir: &Path) -> Option<Holder> {
    let mut file = File::open(run_dir.join(LOCK_FILE)).ok()?;
    if FileExt::try_lock_shared(&file).is_ok() {
        let _ = FileExt::unlock(&file);
        return None;
    }
    read_holder(&mut file).or(Some(Holder {
        pid: 0,
        host: "unknown".into(),
        job_id: None,
        since: "unknown".into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc;
    use std::io::Error;

    #[test]
    fn contention_and_unsupported_locks_are_told_apart() {
        assert_eq!(
            classify(&Error::from_raw_os_error(libc::EWOULDBLOCK)),
            LockFailure::Contended
        );
        for errno in [libc::ENOLCK, libc::EOPNOTSUPP, libc::ENOSYS] {
            assert_eq!(
                classify(&Error::from_raw_os_error(errno)),
                LockFailure::Unsupported,
                "errno {errno}"
            );
        }
        assert_eq!(
            classify(&Error::from_raw_os_error(libc::EIO)),
            LockFailure::Other
        );
        let msg = StorageError::LockUnsupported {
            path: "/nfs/run/run.lock".into(),
            source: Error::from_raw_os_error(libc::ENOLCK),
        }
        .to_string();
        assert!(
            msg.contains("/nfs/run/run.lock") && msg.contains("does not support flock"),
            "{msg}"
        );
        assert!(!msg.contains("another writer"), "{msg}");
    }

    #[test]
    fn a_second_holder_is_contention() {
        let d = tempfile::tempdir().unwrap();
        let me = Holder {
            pid: 1,
            host: "h".into(),
            job_id: None,
            since: "now".into(),
        };
        let _held = RunLock::acquire(d.path(), &me).unwrap();
        match RunLock::acquire(d.path(), &me) {
            Err(StorageError::Locked { holder, .. }) => assert!(holder.contains("pid 1")),
            other => panic!("expected Locked, got {other:?}"),
        }
    }
}
