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
/// The job config is invalid (the message names the file and the key).
pub const CONFIG: i32 = 7;
/// `wrap`: work is left and the job was requeued (or Slurm requeues it itself).
pub const REQUEUED: i32 = 10;
/// `wrap`: work is left but no requeue was possible here (outside Slurm, no `scontrol`): run the
/// same command again to resume.
pub const REQUEUE_NEEDED: i32 = 11;
/// `wrap`: stopped by policy (user cancel, `max_restarts`, a failed save with
/// `on_save_error: stop`): not requeued.
pub const STOPPED: i32 = 12;
/// `wrap`: a crash loop — `max_no_progress` allocations in a row without a new checkpoint.
pub const CRASH_LOOP: i32 = 13;
