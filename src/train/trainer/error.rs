//! Why training stops with an error: [`TrainError`], one variant per cause, each naming what
//! failed (the key, the checkpoint, the file, the step), and [`Refused`], a checkpoint a resume
//! passed over and why. The supervisor maps the variants to exit codes and journal reasons
//! (`cli`'s train command): a config refusal, a run nothing restores, a crash to retry.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::storage::{Fault, StorageError};
use crate::train::ffi::ShimError;
use crate::train::optim::OptimError;
use crate::train::tensors::TensorError;

/// Why training stopped with an error; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid trainer config: {0}")]
    Config(#[from] ConfigError),
    /// A model/data mismatch the config could not see (e.g. a CNN on flat features).
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Device(String),
    /// `device: cuda` and no CUDA device is visible: the user's to fix (a config refusal).
    #[error("{0}")]
    NoCuda(String),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error(transparent)]
    Shim(#[from] ShimError),
    /// A loss scaler state that cannot be used (a missing or mis-shaped tensor, a device
    /// mismatch).
    #[error("loss scaler state: {0}")]
    Scaler(String),
    /// The job or the run does not fit the checkpoint (threads, data, `--resume never`): no
    /// older checkpoint of the run would fit either.
    #[error("cannot resume from checkpoint {checkpoint}: {reason}")]
    Resume { checkpoint: String, reason: String },
    #[error(
        "cannot resume from checkpoint {checkpoint}: the job config changed since it was written \
         (trainer_state.json), in keys that change the results:\n  {}\n(safe to change: max_steps, \
         epochs, eval.every_steps, the checkpoint policy); restore those keys or use a new run dir",
        changes.join("\n  ")
    )]
    ConfigChanged {
        checkpoint: String,
        changes: Vec<String>,
    },
    /// The checkpoint verifies but does not restore (a wrong shape, a missing tensor, a state
    /// that disagrees with its manifest, a model that does not reproduce its reference loss, …):
    /// an older checkpoint may.
    #[error("checkpoint {} does not restore: {file}: {reason}", dir.display())]
    Unrestorable {
        dir: PathBuf,
        file: String,
        reason: String,
    },
    /// Every checkpoint tried was refused: retrying cannot help.
    #[error(
        "no checkpoint restores from {}; tried, newest first: {}",
        searched.display(),
        tried.iter().map(Refused::to_string).collect::<Vec<_>>().join("; ")
    )]
    NothingRestores {
        /// The run dir (or the `--resume` checkpoint).
        searched: PathBuf,
        tried: Vec<Refused>,
    },
    #[error("cannot load a checkpoint to resume from: {0}")]
    Load(#[source] StorageError),
    #[error("step {step}: the training loss is {loss}; training diverged")]
    NonFinite { step: u64, loss: f64 },
    #[error("saving the checkpoint of step {step} failed: {source}")]
    Save {
        step: u64,
        #[source]
        source: StorageError,
    },
    /// A rank's checkpoint was not committed (the supervisor's reason).
    #[error("the checkpoint of step {step} was not committed: {reason}")]
    Commit { step: u64, reason: String },
    /// The ranks of a data-parallel run could not work together (the protocol's environment,
    /// joining the group, a collective, another rank's failure).
    #[error("{0}")]
    Team(String),
    #[error("the metrics file: {0}")]
    Metrics(#[source] StorageError),
    #[error("the journal: {0}")]
    Journal(#[source] StorageError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A checkpoint refused on resume, and why (file and reason each).
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub checkpoint: String,
    pub faults: Vec<Fault>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let faults: Vec<String> = self.faults.iter().map(Fault::to_string).collect();
        write!(f, "{} ({})", self.checkpoint, faults.join(", "))
    }
}
