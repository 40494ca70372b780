//! The job config (`job.yaml`): one file describes a training job for every command — what to
//! run, where its run dir is, how often to checkpoint and what to keep, when to requeue, and the
//! Slurm allocation to ask for. The ground the other layers stand on: it imports nothing from
//! above it (only storage's retention policy type and the signal names, [`crate::sig`]).
//!
//! Parsing is strict: an unknown key, a wrong type or an impossible value is refused with one
//! error type, [`ConfigError`]: the file, the key path (`checkpoint.keep_last`), what was found,
//! and what is accepted. Each part is validated where it is defined:
//! - [`job`]: [`JobConfig`], the file as a whole: its top-level keys, `requeue`, `signals`,
//!   `distributed`, and the checks that span sections (world size against Slurm's tasks);
//! - [`checkpoint`]: the `checkpoint:` section — cadence, `interval: auto` and its MTBF prior,
//!   and the retention keys, parsed into storage's one
//!   [`RetentionPolicy`](crate::storage::retention::RetentionPolicy);
//! - [`slurm`]: the `slurm:` section, every `#SBATCH` value checked;
//! - [`error`]: the one [`ConfigError`].
//!
//! - [`trainer`]: the built-in trainer's keys (`model`, `data`, `optimizer`, `scheduler`,
//!   `eval`, …), typed with the rest of the file and checked each where it is defined, without
//!   torch (a login node's `hpc-ckpt sbatch` checks them too); and [`trainer::TrainConfig`], the
//!   trainer's resolved view of them with the checks across keys it needs.

pub mod checkpoint;
pub mod error;
pub mod job;
pub mod slurm;
pub mod trainer;

pub use checkpoint::{CheckpointConfig, Interval, OnSaveError, DEFAULT_MTBF_SECONDS};
pub use error::ConfigError;
pub use job::{DistributedConfig, JobConfig, Launcher, RequeueConfig, SignalConfig};
pub use slurm::SlurmConfig;
