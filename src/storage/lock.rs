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
        if FileExt::try_lock_exclusive(&file).is_err() {
            let holder = read_holder(&mut file)
                .map(|h| h.to_string())
                .unwrap_or_else(|| "holder unknown".into());
            return Err(StorageError::Locked {
                run_dir: run_dir.to_path_buf(),
                holder,
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
