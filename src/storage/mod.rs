//! The checkpoint store: everything that touches checkpoint bytes on disk.
//!
//! Knows nothing of torch or Slurm. Guarantees, each tested in `tests/`:
//! - a checkpoint directory with a final name (`step-N`) is complete: every file was written and
//!   fsynced, then `MANIFEST.json` (sizes and xxh3-128 checksums) was written and fsynced, then the
//!   directory was fsynced and renamed into place ([`writer`]);
//! - `last_checkpoint` is replaced atomically and only after the checkpoint it names is durable
//!   ([`pointer`]);
//! - a reader trusts nothing it has not verified; on any fault it falls back to the newest
//!   checkpoint that verifies and says which file failed and why ([`run_dir`], [`verify`]);
//! - retention never deletes the pointer's target or the best checkpoint, and deletes only after
//!   the newer commit is durable ([`retention`]);
//! - one writer per run directory ([`lock`]); every commit, fallback, deletion and error is
//!   appended to `journal.jsonl` ([`journal`]); a torn last line of it or of `metrics.jsonl` is
//!   ended before the next append ([`metrics`]);
//! - a two-phase save hands an owned snapshot to a background thread that holds the store for a
//!   scope and commits one snapshot at a time, reusing its host buffers ([`persister`]).

pub mod checksum;
pub mod error;
pub mod fsutil;
pub mod journal;
pub mod lock;
pub mod manifest;
pub mod metrics;
pub mod persister;
pub mod pointer;
pub mod retention;
pub mod run_dir;
pub mod safetensors;
pub mod verify;
pub mod writer;

pub use error::{Fault, StorageError};
pub use manifest::Manifest;
pub use retention::RetentionPolicy;
pub use run_dir::{RunDir, Store};
pub use writer::{CommitMeta, CommitReport, FileSource, SaveTiming, Snapshot, TensorData};
