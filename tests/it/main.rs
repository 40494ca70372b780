//! The integration tests: one test binary (`cargo test --test it`), one module per suite.
//!
//! One binary instead of one per file links libtorch once, not ten times (README, "Guarantees and
//! the tests that hold them").
//! Suites that need the built-in trainer are compiled only with the `torch` feature; the suites
//! that need a Slurm cluster start the project's local one themselves
//! (`sbatch/local-cluster.sh start`, idempotent). Filter by module: `cargo test --test it
//! fault_injection::`.

mod common;

mod child_adoption;
#[cfg(feature = "torch")]
mod collective;
mod crash_consistency;
mod fault_injection;
#[cfg(feature = "torch")]
mod optim_parity;
mod python_interop;
mod sbatch_template;
#[cfg(feature = "torch")]
mod slurm_e2e;
mod supervisor_rules;
#[cfg(feature = "torch")]
mod train_async;
#[cfg(feature = "torch")]
mod train_best;
#[cfg(feature = "torch")]
mod train_fallback;
#[cfg(feature = "torch")]
mod train_kill;
#[cfg(feature = "torch")]
mod train_precision;
#[cfg(feature = "torch")]
mod train_ranks;
#[cfg(feature = "torch")]
mod train_ranks_async;
#[cfg(feature = "torch")]
mod train_resume;
mod wrap_in_process;
mod wrap_lifetime;
mod wrap_local;
mod wrap_ranks;
