//! hpc-ckpt: preemption-proof deep-learning training on Slurm.
//!
//! Layers (dependencies flow one way, top to bottom):
//! - [`cli`]: clap definitions; each command is a thin call into the layers below.
//! - [`status`] reads a run directory and tells a person what happened and what is safe on disk;
//!   [`plot`] draws it (`status --plot`, the loss sparkline).
//! - [`train`] (feature `torch`): the built-in tch trainer, run in-process by the supervisor.
//! - [`supervision`]: signals, the workload (in-process or a child), the stop sequence, the
//!   child protocol, the journal's supervisor events and their fold, the requeue policy
//!   (`wrap`).
//! - [`slurm`]: the scheduler's environment, `scontrol`/`sbatch`, the sbatch template.
//! - [`config`]: the job config (`job.yaml`), parsed strictly, read by every layer above.
//! - [`sig`]: the signals hpc-ckpt handles, by name (the config parses into them).
//! - [`storage`] knows nothing of torch or Slurm: checkpoint format, atomic commit, verification,
//!   retention, the run lock and the journal.

pub mod cli;
pub mod config;
pub mod exit_code;
pub mod plot;
pub mod sig;
pub mod slurm;
pub mod status;
pub mod storage;
pub mod supervision;
#[cfg(feature = "torch")]
pub mod train;
