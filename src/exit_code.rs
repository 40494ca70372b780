//! Process exit codes of the `hpc-ckpt` binary: one documented table (README, "Exit codes").
//!
//! Scripts and the sbatch template branch on these, so a code never changes meaning once shipped.

/// Everything asked for was done.
pub const SUCCESS: i32 = 0;
/// An unexpected error (I/O, a bug); the message says what failed.
pub const FAILURE: i32 = 1;
/// Bad command-line usage (clap's own code).
pub const USAGE: i32 = 2;
/// Verification found a fault in a checkpoint or run directory (`verify`, `status --verify`).
pub const CORRUPT: i32 = 3;
/// Another writer holds the run directory's lock.
pub const LOCKED: i32 = 4;
/// A save did not fit on disk; every committed checkpoint is intact.
pub const NO_SPACE: i32 = 5;
/// Invalid input: a source directory, a metric, a job config.
pub const BAD_INPUT: i32 = 6;
