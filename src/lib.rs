//! hpc-ckpt: preemption-proof deep-learning training on Slurm.
//!
//! Layers (dependencies flow one way, top to bottom):
//! - [`cli`]: clap definitions; each command is a thin call into the layers below.
//! - [`config`]: the job config (`job.yaml`), parsed strictly.
//! - [`status`] reads a run directory and tells a person what happened and what is safe on disk.
//! - [`supervision`]: signals, the supervised child, requeue policy (`wrap`).
//! - [`slurm`]: the scheduler's environment (job id, restart count).
//! - [`storage`] knows nothing of torch or Slurm: checkpoint format, atomic commit, verification,
//!   retention, the run lock and the journal.

pub mod cli;
pub mod config;
pub mod exit_code;
pub mod slurm;
pub mod status;
pub mod storage;
pub mod supervision;
#[cfg(feature = "torch")]
pub mod train;
