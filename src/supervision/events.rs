//! The supervisor's journal events, and the one type a reader of `journal.jsonl` gets.
//!
//! The store journals its own commits, fallbacks and deletions ([`StoreEvent`]); the supervisor
//! adds what only it knows ([`SupervisorEvent`]): allocations, the program, signals, staged files
//! it kept, refused requests, decisions. [`Event`] is either, or an event this build does not
//! know (a newer writer's): readers tolerate those. README "Journal events" documents each.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::storage::journal::{self, StoreEvent};

/// What the supervisor journals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SupervisorEvent {
    /// A supervisor took the run dir.
    AllocationStart {
        #[serde(default)]
        job_id: Option<String>,
        #[serde(default)]
        restart_count: u32,
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        pid: Option<u32>,
        #[serde(default)]
        command: Vec<String>,
    },
    /// The workload started (a child's pid, or this process for the built-in trainer).
    ChildStarted {
        pid: u32,
        #[serde(default)]
        in_process: bool,
        #[serde(default)]
        resume_from: Option<String>,
        #[serde(default)]
        resume_step: Option<u64>,
        /// Ranks of a multi-rank job (absent: 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        world_size: Option<u32>,
        /// How the ranks were started: `srun`, `local`, `command` (absent: a 1-rank program).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        launcher: Option<String>,
        /// Every process the supervisor started, by rank (`local`), else the launcher's.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pids: Vec<u32>,
    },
    /// The built-in trainer is ready to run its first step (model built, checkpoint restored):
    /// the end of start-up and restore. `previous_step`/`previous_at`: the last step the
    /// metrics file recorded before, and when — how far an interrupted predecessor trained past
    /// its last commit (older journals lack this event: start-up then ends at `child_started`).
    TrainingStarted {
        step: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_step: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_at: Option<String>,
    },
    /// A rank of a locally started multi-rank job failed; its peers were then killed (a peer
    /// left alone would wait in a collective forever).
    RankFailed { rank: u32, how: String },
    /// Some ranks asked for a commit and others never did: nothing was committed.
    RanksIncomplete {
        #[serde(default)]
        step: Option<u64>,
        missing: Vec<u32>,
        requested: Vec<u32>,
        reason: String,
    },
    /// A stop signal arrived (`repeat`: not the first of this allocation).
    SignalReceived {
        signal: String,
        #[serde(default)]
        warning: bool,
        #[serde(default)]
        repeat: bool,
        #[serde(default)]
        forwarded: Option<String>,
        #[serde(default)]
        grace_seconds: Option<u64>,
    },
    /// The stop signal is held for ranks whose program has not said it handles stop signals
    /// yet (`HPC_CKPT_READY_FILE`): it goes out when they do, at the latest in
    /// `at_most_seconds` (README, "Stop sequence").
    SignalHeld {
        signal: String,
        ranks: Vec<u32>,
        at_most_seconds: f64,
    },
    /// A held stop signal went out to a rank: `ready`, the program said so; else its bound ran
    /// out (a program that never says so).
    SignalReleased {
        signal: String,
        rank: u32,
        held_seconds: f64,
        ready: bool,
    },
    /// In a Slurm job with a time limit: the time-limit watch is armed (`deadline`).
    TimeLimitWatch {
        seconds_left: u64,
        save_in_seconds: u64,
        lead_seconds: u64,
    },
    /// The time-limit watch was due with no warning signal: the supervisor stopped the
    /// workload as the warning would (final save, commit, requeue).
    TimeLimitNear {
        lead_seconds: u64,
        #[serde(default)]
        forwarded: Option<String>,
        #[serde(default)]
        grace_seconds: Option<u64>,
    },
    /// The grace period ran out: the program got TERM, then KILL.
    ChildEscalated { signal: String },
    /// The program ended.
    ChildExited { how: String, seconds: f64 },
    /// The stop sequence is over.
    StopCompleted {
        signal: String,
        seconds_since_signal: f64,
    },
    /// A commit request was refused (answered in its `.result`).
    RequestRefused { step: Option<u64>, reason: String },
    /// Staged files were not committed; they were moved aside, never deleted.
    StagedKept {
        dir: String,
        files: Vec<String>,
        #[serde(default)]
        step: Option<u64>,
        reason: String,
    },
    /// The job config differs from the run's frozen copy.
    ConfigChanged { frozen: String },
    /// Training is complete.
    RunDone,
    /// The allocation's end: how it ended, and the requeue decision.
    AllocationEnd {
        #[serde(default)]
        job_id: Option<String>,
        #[serde(default)]
        restart_count: u32,
        ending: String,
        #[serde(default)]
        child: Option<String>,
        decision: String,
        reason: String,
        action: String,
        exit_code: i32,
    },
}

/// One journal event, whoever wrote it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Event {
    Store(StoreEvent),
    Supervisor(SupervisorEvent),
    /// An event this build does not know (or a known one with fields it cannot read).
    Other(serde_json::Value),
}

/// An event and when it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    pub ts: Option<std::time::SystemTime>,
    pub event: Event,
}

impl Stamped {
    /// Parse one journal line's object.
    pub fn from_value(v: serde_json::Value) -> Stamped {
        let ts = v["ts"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok());
        let event = serde_json::from_value(v).unwrap_or(Event::Other(serde_json::Value::Null));
        Stamped { ts, event }
    }
}

/// Every readable event of a run's journal, typed, and the number of unreadable lines.
pub fn read(run_dir: &Path) -> (Vec<Stamped>, usize) {
    let (values, bad) = journal::read_all(run_dir);
    (values.into_iter().map(Stamped::from_value).collect(), bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_events_are_typed_and_unknown_ones_tolerated() {
        let s = Stamped::from_value(json!({"ts": "2026-01-01T00:00:00.000Z",
            "event": "checkpoint_deleted", "checkpoint": "step-000000000001", "reason": "retention"}));
        assert!(s.ts.is_some());
        assert!(matches!(
            s.event,
            Event::Store(StoreEvent::CheckpointDeleted { .. })
        ));
        let s = Stamped::from_value(json!({"event": "run_done", "new_checkpoints": 3}));
        assert_eq!(s.event, Event::Supervisor(SupervisorEvent::RunDone));
        let s = Stamped::from_value(json!({"event": "from_the_future", "x": 1}));
        assert!(matches!(s.event, Event::Other(_)));
    }
}
