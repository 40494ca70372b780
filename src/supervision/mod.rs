//! Supervision: keeps a training job preemption-proof while it runs. No torch here.
//!
//! - [`signals`]: OS signals become events on a channel; handlers only record, never act.
//! - [`launcher`]: what `hpc-ckpt` is when it starts: a launcher that holds the stop signals
//!   and `exec`s the real program (libtorch's start-up no longer a window for them).
//! - [`child`]: the supervised program in its own process group, dying with its supervisor.
//! - [`workload`]: what runs (built-in trainer in-process, or a program) and how it can fail.
//! - [`deadline`]: the time-limit watch: a last save before the time limit when no warning
//!   signal comes.
//! - [`stop`]: the stop sequence (forward, grace, TERM, KILL) as a state machine; `wrap/stopping.rs`
//!   carries out its actions.
//! - [`protocol`]: the child protocol: staging, commit requests, answers, kept files — per rank,
//!   with one coordinated commit of every rank's files (the commit protocol itself:
//!   `protocol/commit.rs`; the wire format: `protocol/request.rs`).
//! - [`client`]: the program's side of the protocol, for the built-in trainer's ranks.
//! - [`ranks`]: the ranks of a multi-rank job: how they start (`srun`, locally, the program's
//!   own launcher), each rank's environment (`hpc-ckpt rank`), per-rank file names.
//! - [`events`] and [`history`]: the supervisor's journal events and the one fold from the
//!   journal to allocations (`history/fold.rs`; read by the policy and by `status`).
//! - [`interval`]: the checkpoint interval from data (Daly's optimum for the measured save stall
//!   and the journal's mean time between unannounced interruptions).
//! - [`policy`]: whether to requeue, from the allocation's outcome and the run's history.
//! - [`wrap`]: one allocation: open, run the workload (`wrap/running.rs`), decide, journal.

pub mod child;
pub mod client;
pub mod deadline;
pub mod events;
pub mod history;
pub mod interval;
pub mod launcher;
pub mod policy;
pub mod protocol;
pub mod ranks;
pub mod signals;
pub mod stop;
pub mod workload;
pub mod wrap;
