//! What the supervisor runs: the built-in trainer in this process, or a program as a child.
//!
//! [`Workload`] replaces string checks on the command line (`["train"]`) with a type; the
//! [`InProcess`] trait is the seam between the supervisor (no torch) and the built-in trainer
//! (feature `torch`); [`Failure`] says, in the requeue policy's terms, why a workload could not
//! go on — a crash is retried, a refused config or an unrestorable run is not.

use std::fmt;

use crate::storage::Store;

/// The built-in trainer's name after `--` (`wrap -- train`).
pub const BUILTIN: &str = "train";

/// What an allocation runs.
pub enum Workload {
    /// The built-in trainer, in this process.
    InProcess(Box<dyn InProcess>),
    /// Any other program, as a child in its own process group, speaking the child protocol.
    Program(Vec<String>),
    /// The built-in trainer's ranks (`hpc-ckpt train-rank`): a program like any other, except
    /// that its exit code says why it failed ([`FailureKind::exit_code`]).
    TrainerRanks(Vec<String>),
}

impl Workload {
    /// The command as journaled (`["train"]` for the built-in trainer in this process).
    pub fn command(&self) -> Vec<String> {
        match self {
            Workload::InProcess(_) => vec![BUILTIN.to_string()],
            Workload::Program(c) | Workload::TrainerRanks(c) => c.clone(),
        }
    }
}

/// Whether a command names the built-in trainer.
pub fn is_builtin(command: &[String]) -> bool {
    command.len() == 1 && command[0] == BUILTIN
}

/// A training loop that runs inside the supervisor's process (the built-in trainer). It chooses
/// the checkpoint to resume from through the store (falling back past checkpoints that verify
/// but do not restore), commits through the store itself, and polls `stop` at every step
/// boundary: when it answers true, the loop checkpoints (unless the current step is committed)
/// and returns [`InProcessEnd::Stopped`].
pub trait InProcess {
    fn run(&mut self, store: &mut Store, stop: &dyn Fn() -> bool) -> Result<InProcessEnd, Failure>;
}

/// How an in-process run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InProcessEnd {
    /// Training reached its end; the final checkpoint is committed.
    Completed,
    /// Stopped at a step boundary on request; the current step is committed.
    Stopped,
}

/// Why a workload could not go on, as the requeue policy needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A crash, an I/O error, a panic: retried from the last checkpoint (until the crash-loop
    /// guard stops it).
    Crash,
    /// A checkpoint save failed and `checkpoint.on_save_error` is `stop`.
    SaveFailed,
    /// The job config is refused (invalid, or changed in keys that change the results): the
    /// user's to fix; retrying cannot help.
    ConfigRefused,
    /// Checkpoints exist but none of them restores: retrying cannot help.
    NothingRestores,
}

impl FailureKind {
    /// The exit code a built-in trainer rank ends with for this kind (and the kind its
    /// supervisor reads back with [`FailureKind::of_exit_code`]).
    pub fn exit_code(self) -> i32 {
        match self {
            FailureKind::Crash => crate::exit_code::FAILURE,
            FailureKind::SaveFailed => crate::exit_code::STOPPED,
            FailureKind::ConfigRefused => crate::exit_code::CONFIG,
            FailureKind::NothingRestores => crate::exit_code::CORRUPT,
        }
    }

    /// The kind of a built-in trainer rank's exit code; any other failure is a crash.
    pub fn of_exit_code(code: i32) -> FailureKind {
        [
            FailureKind::SaveFailed,
            FailureKind::ConfigRefused,
            FailureKind::NothingRestores,
        ]
        .into_iter()
        .find(|k| k.exit_code() == code)
        .unwrap_or(FailureKind::Crash)
    }
}

/// A failure with its kind and its message (which names the file, key or checkpoint).
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any other error is a crash: retried from the last checkpoint.
impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::new(FailureKind::Crash, format!("{e:#}"))
    }
}

impl From<crate::storage::StorageError> for Failure {
    fn from(e: crate::storage::StorageError) -> Failure {
        Failure::new(FailureKind::Crash, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ranks_exit_code_says_its_failure_kind() {
        for k in [
            FailureKind::Crash,
            FailureKind::SaveFailed,
            FailureKind::ConfigRefused,
            FailureKind::NothingRestores,
        ] {
            assert_eq!(FailureKind::of_exit_code(k.exit_code()), k);
        }
        assert_eq!(FailureKind::of_exit_code(137), FailureKind::Crash);
        assert_eq!(FailureKind::of_exit_code(0), FailureKind::Crash);
    }

    #[test]
    fn only_the_bare_word_is_the_builtin_trainer() {
        assert!(is_builtin(&["train".into()]));
        assert!(!is_builtin(&["train".into(), "--x".into()]));
        assert!(!is_builtin(&["./train".into()]));
        assert!(!is_builtin(&[]));
    }
}
