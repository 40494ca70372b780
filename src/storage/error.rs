//! Error types of the store.
//!
//! [`Fault`] is what verification finds wrong with one checkpoint (always naming the file and the
//! reason); [`StorageError`] is what a store operation returns to its caller.

use std::path::PathBuf;

/// One thing wrong with a checkpoint on disk, found by verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct Fault {
    /// The file at fault (a path relative to the run dir where possible).
    pub file: String,
    /// Why, in plain words.
    pub reason: String,
}

impl Fault {
    pub fn new(file: impl Into<String>, reason: impl Into<String>) -> Self {
        Fault {
            file: file.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "run dir {run_dir} is locked by another writer ({holder}); two allocations must never \
         write one run at once: wait for it to end, or cancel it"
    )]
    Locked { run_dir: PathBuf, holder: String },
    #[error(
        "cannot lock {path}: the file system does not support flock ({source}). Some NFS and \
         Lustre mounts refuse locks (Lustre without -o flock, NFS without a lock manager); \
         hpc-ckpt will not write a run dir it cannot lock, because two allocations writing one \
         run at once would corrupt it. Put the run dir on a file system with locks (e.g. Lustre \
         mounted with -o flock, a local or GPFS path), or ask your admins which mounts have them"
    )]
    LockUnsupported {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not enough disk space for checkpoint step {step} in {dir}: needs {need} bytes, {free} bytes \
         free (after applying retention); every committed checkpoint is intact — free space or lower \
         keep_last"
    )]
    NoSpace {
        dir: PathBuf,
        step: u64,
        need: u64,
        free: u64,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("checkpoint {dir} failed verification: {faults}", faults = join_faults(.faults))]
    Corrupt { dir: PathBuf, faults: Vec<Fault> },
    #[error("no checkpoint in {run_dir} verifies: {detail}")]
    NothingValid { run_dir: PathBuf, detail: String },
}

/// Faults as one line, `; `-separated.
pub fn join_faults(faults: &[Fault]) -> String {
    faults
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl StorageError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the underlying I/O error means the disk (or a file-size limit) is full.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            StorageError::NoSpace { .. } => true,
            StorageError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc_errno::ENOSPC) | Some(libc_errno::EFBIG) | Some(libc_errno::EDQUOT)
            ),
            _ => false,
        }
    }
}

/// errno values used to classify I/O errors (stable on Linux).
mod libc_errno {
    pub const ENOSPC: i32 = 28;
    pub const EFBIG: i32 = 27;
    pub const EDQUOT: i32 = 122;
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Attach a context string to an `io::Result`.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| StorageError::io(context(), e))
    }
}
