//! Supervision: keeps a training job preemption-proof while it runs. No torch here.
//!
//! - [`signals`]: OS signals become events on a channel; handlers only record, never act.
//! - [`child`]: the supervised program in its own process group; forwarding and escalation.
//! - [`policy`]: whether to requeue, from the allocation's outcome and the run's journal.
//! - [`wrap`]: `hpc-ckpt wrap -- CMD`: the child protocol, commits of staged checkpoints,
//!   the stop sequence, the requeue decision, and the journal of all of it.

pub mod child;
pub mod policy;
pub mod signals;
pub mod workload;
pub mod wrap;
