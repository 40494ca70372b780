//! The status report: what `status` knows of a run, as types. Serialized as they are, they are
//! the JSON schema [`SCHEMA`] (`status --json`, documented in the README); [`super::text`]
//! renders the same report for a person. Nothing here reads the disk.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::storage::lock::Holder;
use crate::storage::retention::{Mode, Role};
use crate::supervision::history::{Allocation, Interruption, TimeLimitWatch};

pub const SCHEMA: &str = "hpc-ckpt-status/1";

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub schema: &'static str,
    pub run_dir: String,
    pub pointer: PointerStatus,
    /// The checkpoint a resume would load now (verified), if any.
    pub resume_from: Option<String>,
    /// True when `resume_from` is not what the pointer names (a fallback).
    pub fell_back: bool,
    pub checkpoints: Vec<CheckpointStatus>,
    /// The best checkpoint by `keep_best`'s metric: the step whose weights produced it.
    pub best: Option<BestStatus>,
    /// Staged files that were never committed, kept aside, with the command that imports them.
    pub kept: Vec<KeptStatus>,
    pub temp_entries: Vec<TempEntry>,
    pub disk: Disk,
    /// The writer holding `run.lock` now, if any.
    pub writer: Option<Holder>,
    pub journal: JournalSummary,
    /// The job chain, from the journal.
    pub run: RunChain,
    /// `metrics.jsonl`: what the training recorded.
    pub metrics: MetricsSummary,
    /// How saves are timed: the interval chosen last (`interval: auto`) and the time-limit watch.
    pub saves: SaveTimingStatus,
    pub warnings: Vec<String>,
}

/// How saves are timed, from the journal.
#[derive(Debug, Default, Serialize)]
pub struct SaveTimingStatus {
    /// The newest commit that journaled its cadence (`checkpoint.interval: auto`).
    pub interval: Option<IntervalStatus>,
    /// The newest allocation's time-limit watch (a Slurm job with a time limit).
    pub time_limit_watch: Option<TimeLimitWatch>,
}

/// The save interval at one commit: recommended, actual, and why.
#[derive(Debug, Serialize)]
pub struct IntervalStatus {
    pub step: u64,
    pub recommended_seconds: f64,
    pub actual_seconds: f64,
    pub reason: String,
}

/// What `metrics.jsonl` holds.
#[derive(Debug, Serialize)]
pub struct MetricsSummary {
    pub records: usize,
    /// Lines that do not parse (a torn line from a kill mid-write, garbage): skipped.
    pub unreadable_lines: usize,
    pub last_step: Option<u64>,
    pub last_loss: Option<f64>,
    /// The loss by step as Unicode block characters (null: no loss recorded).
    pub loss_sparkline: Option<String>,
}

/// Where the allocations' time went: the share that became preserved progress, and the rest
/// by cause (Google's ml-goodput-measurement breakdown). Seconds.
#[derive(Debug, Serialize)]
pub struct GoodputStatus {
    /// `productive_seconds / allocation_seconds`; null before any allocation time.
    pub goodput: Option<f64>,
    /// Allocation wall time, summed.
    pub allocation_seconds: f64,
    /// Allocation time and the waits between allocations.
    pub elapsed_seconds: f64,
    /// Training that was kept (with its eval, logging and exit).
    pub productive_seconds: f64,
    pub badput_seconds: Badput,
    /// Steps trained and then redone by a later allocation.
    pub lost_steps: u64,
    /// Interruptions: announced (a stop signal, final commit made), unannounced (killed, node
    /// lost, crash, no final commit).
    pub interruptions: Interruptions,
}

#[derive(Debug, Serialize)]
pub struct Badput {
    /// From each allocation's start until training ran: start-up, model build, restore.
    pub startup_restore: f64,
    /// Training stood still for saves.
    pub save_stall: f64,
    /// Work redone: lost steps × step time (time since the last commit where steps are unknown).
    pub lost_work: f64,
    /// Between one allocation's end and the next one's start (queueing, requeue).
    pub wait: f64,
}

#[derive(Debug, Serialize)]
pub struct Interruptions {
    pub announced: u32,
    pub unannounced: u32,
}

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Never ran.
    Fresh,
    /// A writer holds the lock.
    Running,
    /// Training is complete.
    Done,
    /// Requeued, waiting for the next allocation.
    Pending,
    /// Stopped by policy (see the reason).
    Stopped,
    /// The last allocation ended without a word: killed, node lost.
    Interrupted,
}

#[derive(Debug, Serialize)]
pub struct RunChain {
    pub state: RunState,
    pub reason: Option<String>,
    pub allocations: Vec<AllocationStatus>,
    pub goodput: GoodputStatus,
}

/// One allocation: the journal's account of it ([`Allocation`], serialized as it is), and what
/// the report adds: how it was interrupted and where its wall time went.
#[derive(Debug, Serialize)]
pub struct AllocationStatus {
    #[serde(flatten)]
    pub allocation: Allocation,
    /// `announced` (a stop signal, final commit made), `unannounced` (killed, node lost, crash,
    /// no final commit), or null (completed, or still running).
    pub interruption: Option<Interruption>,
    /// Where its wall time went, seconds.
    pub seconds: AllocationSeconds,
}

impl std::ops::Deref for AllocationStatus {
    type Target = Allocation;
    fn deref(&self) -> &Allocation {
        &self.allocation
    }
}

#[derive(Debug, Serialize)]
pub struct AllocationSeconds {
    pub wall: f64,
    pub startup_restore: f64,
    pub save_stall: f64,
    pub lost_work: f64,
    pub productive: f64,
}

/// What the pointer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PointerState {
    Ok,
    Absent,
    /// Not a checkpoint name (garbage).
    Invalid,
    MissingTarget,
    CorruptTarget,
}

#[derive(Debug, Serialize)]
pub struct PointerStatus {
    pub state: PointerState,
    pub names: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckpointStatus {
    pub name: String,
    pub step: u64,
    pub epoch: Option<u64>,
    pub bytes: u64,
    pub created_at: Option<String>,
    pub age_seconds: Option<u64>,
    pub metrics: BTreeMap<String, f64>,
    /// The batch job that wrote it (scheduler, id, restart count), when there was one.
    pub job: Option<crate::storage::manifest::JobInfo>,
    pub roles: Vec<Role>,
    /// `true`/`false` when verified in this call, `null` when only the manifest was read.
    pub verified: Option<bool>,
    pub faults: Vec<String>,
    /// Ranks that wrote it (null: one).
    pub world_size: Option<u32>,
    /// A multi-rank checkpoint's bytes by rank (index = rank); empty for one rank.
    pub rank_bytes: Vec<u64>,
}

/// The best checkpoint by the monitored metric.
#[derive(Debug, Serialize)]
pub struct BestStatus {
    pub metric: String,
    pub mode: Mode,
    pub value: f64,
    /// The checkpoint whose weights produced `value` (its manifest records it at its step).
    pub checkpoint: String,
    pub step: u64,
}

/// Staged files kept aside.
#[derive(Debug, Serialize)]
pub struct KeptStatus {
    /// Relative to the run dir.
    pub dir: String,
    pub files: Vec<String>,
    pub step: Option<u64>,
    pub reason: String,
    /// The command that commits them (with `STEP` to fill in when the step is unknown).
    pub commit_command: String,
}

#[derive(Debug, Serialize)]
pub struct TempEntry {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Disk {
    pub checkpoints_bytes: u64,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct JournalSummary {
    pub events: usize,
    pub unreadable_lines: usize,
    pub last: Vec<Value>,
}

impl StatusReport {
    /// Whether anything inspected failed verification.
    pub fn has_faults(&self) -> bool {
        self.checkpoints.iter().any(|c| c.verified == Some(false))
            || matches!(
                self.pointer.state,
                PointerState::Invalid | PointerState::CorruptTarget | PointerState::MissingTarget
            )
    }
}
