//! hpc-ckpt: preemption-proof deep-learning training on Slurm.
//!
//! Layers (dependencies flow one way, top to bottom):
//! - [`cli`]: clap definitions; each command is a thin call into the layers below.
//! - [`status`] reads a run directory and tells a person what happened and what is safe on disk.
//! - [`slurm`]: the scheduler's environment (job id, restart count).
//! - [`storage`] knows nothing of torch or Slurm: checkpoint format, atomic commit, verification,
//!   retention, the run lock and the journal.

pub mod cli;
pub mod exit_code;
pub mod slurm;
pub mod status;
pub mod storage;
