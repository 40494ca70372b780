//! What the journal says of one allocation ([`Allocation`]): what it resumed from, committed,
//! was signalled with and decided, and its time account ([`Allocation::account`]). Filled in by
//! the fold ([`super::fold`](fn@super::fold)); read, never written, by the policy and `status`.
//! Serialized, it is an entry of `status --json`'s `run.allocations` (the fold's bookkeeping
//! left out): one type for the journal's account and the report's, so a field added to the
//! fold is one field to show.

use std::time::SystemTime;

use crate::storage::journal::Cadence;

/// One allocation of the run, as the journal tells it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Allocation {
    pub job_id: Option<String>,
    pub restart_count: u32,
    pub host: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub started_at: Option<SystemTime>,
    #[serde(serialize_with = "rfc3339")]
    pub ended_at: Option<SystemTime>,
    /// `completed`, `warning_signal`, `terminated`, `failed`; None when it never said (killed,
    /// node lost).
    pub ending: Option<String>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub action: Option<String>,
    pub exit_code: Option<i32>,
    /// The step it resumed from (None: a fresh start).
    pub resume_step: Option<u64>,
    pub new_checkpoints: u32,
    /// The newest step it committed.
    #[serde(skip)]
    pub last_step: Option<u64>,
    /// The first stop signal, and seconds from it to the next committed checkpoint.
    pub signal: Option<String>,
    pub signal_to_checkpoint_seconds: Option<f64>,
    /// Steps committed before this allocation but redone by it (it resumed from an older one).
    pub steps_redone: u64,
    /// The time of its last event (how long it lived when it never wrote its end).
    #[serde(skip)]
    pub last_event_at: Option<SystemTime>,
    /// The stall of each save it committed, seconds, where the saver measured it (the built-in
    /// trainer's saves).
    #[serde(skip)]
    pub save_stalls: Vec<f64>,
    /// Staged files it could not commit and kept aside.
    #[serde(skip)]
    pub kept: Vec<Kept>,
    /// Commit requests it refused.
    pub refused_requests: Vec<String>,
    /// Ranks of its program (None: a 1-rank program or the built-in trainer).
    pub world_size: Option<u32>,
    /// Multi-rank commits that never happened because some ranks never asked.
    #[serde(rename = "incomplete_commits")]
    pub incomplete: Vec<Incomplete>,
    /// Ranks that failed (a locally started job names them; under srun, srun's log does).
    #[serde(serialize_with = "rank_failures")]
    pub failed_ranks: Vec<(u32, String)>,
    /// When its program was ready to train (the built-in trainer's `training_started`; a child's
    /// `child_started`, whose own restore is not seen): the end of start-up and restore.
    #[serde(skip)]
    pub training_started_at: Option<SystemTime>,
    /// The newest step it is known to have trained: its commits, and what the next allocation
    /// found in the metrics file (`training_started`'s `previous_step`).
    pub reached_step: Option<u64>,
    /// When its newest commit became durable.
    #[serde(skip)]
    pub last_commit_at: Option<SystemTime>,
    /// Steps it trained that the next allocation redid (past its last commit, or past the
    /// checkpoint the next one fell back to). Known once the next allocation has started.
    pub steps_lost: u64,
    /// What `training_started` of this allocation says of its predecessor: the last step the
    /// metrics file recorded, and when.
    #[serde(skip)]
    pub predecessor_reached: Option<(u64, Option<SystemTime>)>,
    /// The interval of its newest commit that journaled one (`checkpoint.interval: auto`), with
    /// that commit's step.
    #[serde(skip)]
    pub cadence: Option<(u64, Cadence)>,
    /// Its time-limit watch (a Slurm job with a time limit), if armed.
    #[serde(skip)]
    pub time_limit_watch: Option<TimeLimitWatch>,
}

/// An allocation's time-limit watch ([`crate::supervision::deadline`]): as armed, and whether
/// it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TimeLimitWatch {
    pub seconds_left: u64,
    pub save_in_seconds: u64,
    pub lead_seconds: u64,
    /// The watch stopped the program (no warning signal came before it).
    pub fired: bool,
}

/// Where one allocation's wall time went, seconds (see [`super::Chain::goodput`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Account {
    /// From its start to its end (or its last known moment when it never wrote its end).
    pub wall: f64,
    /// From its start until its program was ready to train.
    pub startup: f64,
    /// Training stood still for saves (the saver's measured stalls).
    pub save_stall: f64,
    /// Work that was redone: `steps_lost` × its mean step time; for an unannounced interruption
    /// with no step count, the time from its last commit to its end.
    pub lost: f64,
    /// The rest: training that was preserved (with eval, logging and exit).
    pub productive: f64,
}

/// A multi-rank commit some ranks asked for and others never did: nothing was committed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Incomplete {
    pub step: Option<u64>,
    #[serde(rename = "missing_ranks")]
    pub missing: Vec<u32>,
    #[serde(rename = "requested_ranks")]
    pub requested: Vec<u32>,
}

/// A time as RFC 3339 with milliseconds (`status --json`'s times).
fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
        None => s.serialize_none(),
    }
}

/// Failed ranks as `[{rank, how}]`.
fn rank_failures<S: serde::Serializer>(v: &[(u32, String)], s: S) -> Result<S::Ok, S::Error> {
    #[derive(serde::Serialize)]
    struct RankFailure<'a> {
        rank: u32,
        how: &'a str,
    }
    s.collect_seq(v.iter().map(|(rank, how)| RankFailure { rank: *rank, how }))
}

/// How an allocation's work was cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interruption {
    /// A stop signal came and the final checkpoint was committed after it: only the steps since
    /// that signal's step boundary were at risk, and none were lost.
    Announced,
    /// Killed, node lost, crashed, or signalled without a final commit: the work since the last
    /// checkpoint was lost.
    Unannounced,
}

impl Allocation {
    /// How this allocation was interrupted, if it was. `None` when it completed or has not
    /// ended (`last`: the newest allocation, which may still be running, is never counted as
    /// killed for lack of an end).
    pub fn interruption(&self, last: bool) -> Option<Interruption> {
        match self.ending.as_deref() {
            Some("completed") => None,
            Some("warning_signal" | "terminated")
                if self.signal_to_checkpoint_seconds.is_some() =>
            {
                Some(Interruption::Announced)
            }
            None if last => None,
            _ => Some(Interruption::Unannounced),
        }
    }

    /// Where its wall time went. `interrupted`: how it was interrupted, if it was.
    pub fn account(&self, interrupted: Option<Interruption>) -> Account {
        let since = |t: Option<SystemTime>, from: Option<SystemTime>| {
            t.zip(from)
                .and_then(|(t, f)| t.duration_since(f).ok())
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let end = self.ended_at.or(self.last_event_at);
        let wall = since(end, self.started_at);
        let startup = since(self.training_started_at, self.started_at).min(wall);
        let save_stall = self.save_stalls.iter().sum::<f64>().min(wall - startup);
        let trained = self
            .reached_step
            .unwrap_or(0)
            .saturating_sub(self.resume_step.unwrap_or(0));
        let training = wall - startup - save_stall;
        let lost = if self.steps_lost > 0 && trained > 0 {
            self.steps_lost.min(trained) as f64 * training / trained as f64
        } else if interrupted == Some(Interruption::Unannounced) {
            since(
                end,
                self.last_commit_at
                    .or(self.training_started_at)
                    .or(self.started_at),
            )
        } else {
            0.0
        }
        .min(training);
        Account {
            wall,
            startup,
            save_stall,
            lost,
            productive: training - lost,
        }
    }

    /// Seconds from its start to its end (or its last event when it never wrote its end).
    pub fn seconds(&self) -> Option<f64> {
        let end = self.ended_at.or(self.last_event_at)?;
        end.duration_since(self.started_at?)
            .ok()
            .map(|d| d.as_secs_f64())
    }
}

/// Staged files kept aside (never deleted) because they could not be committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    pub dir: String,
    pub files: Vec<String>,
    pub step: Option<u64>,
    pub reason: String,
}
