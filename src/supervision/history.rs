//! The one fold from journal events to the run's allocations: what each allocation resumed
//! from, committed, was signalled with and decided. The requeue policy reads the crash-loop
//! streak from it ([`Chain::history`]); `status` shows it. One fold, so the two never disagree.

use std::time::SystemTime;

use super::events::{Event, Stamped, SupervisorEvent};
use super::policy::History;
use crate::storage::journal::StoreEvent;

/// One allocation of the run, as the journal tells it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    pub job_id: Option<String>,
    pub restart_count: u32,
    pub host: Option<String>,
    pub started_at: Option<SystemTime>,
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
    pub last_step: Option<u64>,
    /// The first stop signal, and seconds from it to the next committed checkpoint.
    pub signal: Option<String>,
    pub signal_to_checkpoint_seconds: Option<f64>,
    /// Steps committed before this allocation but redone by it (it resumed from an older one).
    pub steps_redone: u64,
    /// The time of its last event (how long it lived when it never wrote its end).
    pub last_event_at: Option<SystemTime>,
    /// The stall of each save it committed, seconds, where the saver measured it (the built-in
    /// trainer's saves).
    pub save_stalls: Vec<f64>,
    /// Staged files it could not commit and kept aside.
    pub kept: Vec<Kept>,
    /// Commit requests it refused.
    pub refused_requests: Vec<String>,
    /// Ranks of its program (None: a 1-rank program or the built-in trainer).
    pub world_size: Option<u32>,
    /// Multi-rank commits that never happened because some ranks never asked.
    pub incomplete: Vec<Incomplete>,
    /// Ranks that failed (a locally started job names them; under srun, srun's log does).
    pub failed_ranks: Vec<(u32, String)>,
}

/// A multi-rank commit some ranks asked for and others never did: nothing was committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Incomplete {
    pub step: Option<u64>,
    pub missing: Vec<u32>,
    pub requested: Vec<u32>,
}

/// How an allocation's work was cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// Seconds from its start to its end (or its last event when it never wrote its end).
    pub fn seconds(&self) -> Option<f64> {
        let end = self.ended_at.or(self.last_event_at)?;
        end.duration_since(self.started_at?)
            .ok()
            .map(|d| d.as_secs_f64())
    }
}

/// The mean time between unannounced interruptions, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mtbf {
    pub seconds: f64,
    /// Unannounced interruptions observed (0: `seconds` is the prior).
    pub observed: u32,
    /// Allocation time they were observed over, seconds.
    pub over_seconds: f64,
}

/// Staged files kept aside (never deleted) because they could not be committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    pub dir: String,
    pub files: Vec<String>,
    pub step: Option<u64>,
    pub reason: String,
}

/// The whole job chain.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chain {
    pub allocations: Vec<Allocation>,
    /// The last word of the journal is that training is complete.
    pub done: bool,
}

impl Chain {
    /// What the requeue policy needs: how many allocations came before, and how many of the
    /// latest ended, in a row, without a new checkpoint (an allocation that never wrote its end
    /// still counts by what it committed).
    pub fn history(&self) -> History {
        History {
            previous_allocations: self.allocations.len() as u32,
            no_progress_streak: self
                .allocations
                .iter()
                .rev()
                .take_while(|a| a.new_checkpoints == 0)
                .count() as u32,
        }
    }
}

impl Chain {
    /// The mean time between unannounced interruptions of this run: the time of its ended
    /// allocations over the number of unannounced interruptions among them; `prior_seconds`
    /// until it has observed one. Announced interruptions got their final save and do not
    /// count; the newest allocation counts only once it has ended.
    pub fn mtbf(&self, prior_seconds: f64) -> Mtbf {
        let n = self.allocations.len();
        let (mut over, mut observed) = (0.0, 0u32);
        for (i, a) in self.allocations.iter().enumerate() {
            let last = i + 1 == n;
            if last && a.ended_at.is_none() {
                continue;
            }
            over += a.seconds().unwrap_or(0.0);
            if a.interruption(last) == Some(Interruption::Unannounced) {
                observed += 1;
            }
        }
        let seconds = if observed == 0 {
            prior_seconds
        } else {
            over / observed as f64
        };
        Mtbf {
            seconds,
            observed,
            over_seconds: over,
        }
    }

    /// The stalls of the newest `n` saves that measured one, oldest first.
    pub fn recent_save_stalls(&self, n: usize) -> Vec<f64> {
        let all: Vec<f64> = self
            .allocations
            .iter()
            .flat_map(|a| a.save_stalls.iter().copied())
            .collect();
        all[all.len().saturating_sub(n)..].to_vec()
    }
}

/// Fold the journal's events into the job chain.
pub fn fold(events: &[Stamped]) -> Chain {
    let mut chain = Chain::default();
    let mut max_step: Option<u64> = None;
    let mut signal_at: Option<SystemTime> = None;
    for e in events {
        if let Event::Supervisor(SupervisorEvent::AllocationStart {
            job_id,
            restart_count,
            host,
            ..
        }) = &e.event
        {
            chain.done = false;
            signal_at = None;
            chain.allocations.push(Allocation {
                job_id: job_id.clone(),
                restart_count: *restart_count,
                host: host.clone(),
                started_at: e.ts,
                last_event_at: e.ts,
                ..Default::default()
            });
            continue;
        }
        if matches!(e.event, Event::Supervisor(SupervisorEvent::RunDone)) {
            chain.done = true;
        }
        let before = max_step;
        if let Event::Store(StoreEvent::CheckpointCommitted { step, .. }) = &e.event {
            max_step = Some(max_step.map_or(*step, |m| m.max(*step)));
        }
        if let Some(a) = chain.allocations.last_mut() {
            if e.ts.is_some() {
                a.last_event_at = e.ts;
            }
            apply(a, e, before, &mut signal_at);
        }
    }
    chain
}

/// One event's effect on the allocation it belongs to. One match arm per event kind: long by
/// design, so that the whole fold reads in one place. `max_before` is the newest step
/// committed by anyone before this event.
fn apply(
    a: &mut Allocation,
    e: &Stamped,
    max_before: Option<u64>,
    signal_at: &mut Option<SystemTime>,
) {
    let resumed = |a: &mut Allocation, step: Option<u64>| {
        a.resume_step = step;
        a.steps_redone = max_before
            .map(|m| m.saturating_sub(step.unwrap_or(0)))
            .unwrap_or(0);
    };
    match &e.event {
        Event::Supervisor(SupervisorEvent::ChildStarted {
            in_process: false,
            resume_step,
            world_size,
            ..
        }) => {
            a.world_size = *world_size;
            resumed(a, *resume_step)
        }
        Event::Supervisor(SupervisorEvent::RanksIncomplete {
            step,
            missing,
            requested,
            ..
        }) => a.incomplete.push(Incomplete {
            step: *step,
            missing: missing.clone(),
            requested: requested.clone(),
        }),
        Event::Supervisor(SupervisorEvent::RankFailed { rank, how }) => {
            a.failed_ranks.push((*rank, how.clone()))
        }
        // The built-in trainer picks its checkpoint itself: the one it loaded.
        Event::Store(StoreEvent::CheckpointLoaded { step, .. }) if a.new_checkpoints == 0 => {
            resumed(a, Some(*step))
        }
        Event::Supervisor(SupervisorEvent::SignalReceived {
            signal,
            repeat: false,
            ..
        }) => {
            a.signal = Some(signal.clone());
            *signal_at = e.ts;
        }
        Event::Store(StoreEvent::CheckpointCommitted {
            step,
            stall_seconds,
            ..
        }) => {
            a.new_checkpoints += 1;
            a.save_stalls.extend(*stall_seconds);
            a.last_step = Some(a.last_step.map_or(*step, |m| m.max(*step)));
            if let (Some(s), Some(t), None) = (*signal_at, e.ts, a.signal_to_checkpoint_seconds) {
                a.signal_to_checkpoint_seconds = t.duration_since(s).ok().map(|d| d.as_secs_f64());
            }
        }
        // In-process stops journal the signal after the fact; take the measured time.
        Event::Supervisor(SupervisorEvent::StopCompleted {
            seconds_since_signal,
            ..
        }) if a.signal_to_checkpoint_seconds.is_none() && a.new_checkpoints > 0 => {
            a.signal_to_checkpoint_seconds = Some(*seconds_since_signal);
        }
        Event::Supervisor(SupervisorEvent::StagedKept {
            dir,
            files,
            step,
            reason,
        }) => a.kept.push(Kept {
            dir: dir.clone(),
            files: files.clone(),
            step: *step,
            reason: reason.clone(),
        }),
        Event::Supervisor(SupervisorEvent::RequestRefused { reason, .. }) => {
            a.refused_requests.push(reason.clone())
        }
        Event::Supervisor(SupervisorEvent::AllocationEnd {
            ending,
            decision,
            reason,
            action,
            exit_code,
            ..
        }) => {
            a.ended_at = e.ts;
            a.ending = Some(ending.clone());
            a.decision = Some(decision.clone());
            a.reason = Some(reason.clone());
            a.action = Some(action.clone());
            a.exit_code = Some(*exit_code);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(v: serde_json::Value) -> Stamped {
        Stamped::from_value(v)
    }
    fn start() -> Stamped {
        ev(json!({"event": "allocation_start", "restart_count": 0}))
    }
    fn commit(step: u64) -> Stamped {
        ev(
            json!({"event": "checkpoint_committed", "checkpoint": format!("step-{step:012}"),
                  "step": step, "bytes": 1, "seconds": 0.1}),
        )
    }
    fn end(decision: &str) -> Stamped {
        ev(
            json!({"event": "allocation_end", "ending": "failed", "decision": decision,
                  "reason": "r", "action": "a", "exit_code": 11}),
        )
    }

    #[test]
    fn streak_counts_trailing_allocations_without_commits_ended_or_not() {
        let chain = fold(&[
            start(),
            commit(5),
            end("requeue"),
            start(),
            end("requeue"),
            start(), // killed: never ended, committed nothing
        ]);
        assert_eq!(chain.allocations.len(), 3);
        assert_eq!(
            chain.history(),
            History {
                previous_allocations: 3,
                no_progress_streak: 2
            }
        );
        let chain = fold(&[start(), end("requeue"), start(), commit(3)]);
        assert_eq!(chain.history().no_progress_streak, 0);
    }

    #[test]
    fn resume_points_and_redone_steps_for_children_and_the_builtin_trainer() {
        let chain = fold(&[
            start(),
            commit(10),
            commit(20),
            end("requeue"),
            start(),
            ev(json!({"event": "child_started", "pid": 1, "resume_step": 10})),
            commit(30),
            end("requeue"),
            start(),
            ev(json!({"event": "child_started", "pid": 1, "in_process": true})),
            ev(
                json!({"event": "checkpoint_loaded", "checkpoint": "step-000000000030", "step": 30}),
            ),
            commit(40),
            ev(json!({"event": "run_done"})),
        ]);
        let a = &chain.allocations;
        assert_eq!((a[1].resume_step, a[1].steps_redone), (Some(10), 10));
        assert_eq!((a[2].resume_step, a[2].steps_redone), (Some(30), 0));
        assert_eq!(a[2].last_step, Some(40));
        assert!(chain.done);
    }

    #[test]
    fn kept_staging_and_refused_requests_belong_to_their_allocation() {
        let chain = fold(&[
            start(),
            ev(json!({"event": "request_refused", "step": 5, "reason": "older"})),
            ev(
                json!({"event": "staged_kept", "dir": "kept/x", "files": ["a"], "reason": "no request"}),
            ),
            ev(json!({"event": "something_new", "x": 1})),
        ]);
        let a = &chain.allocations[0];
        assert_eq!(a.refused_requests, vec!["older".to_string()]);
        assert_eq!(a.kept[0].files, vec!["a".to_string()]);
    }

    #[test]
    fn rank_facts_belong_to_their_allocation() {
        let chain = fold(&[
            start(),
            ev(
                json!({"event": "child_started", "pid": 1, "world_size": 2, "launcher": "local",
                      "pids": [1, 2]}),
            ),
            ev(json!({"event": "rank_failed", "rank": 1, "how": "killed by signal SIGKILL"})),
            ev(
                json!({"event": "ranks_incomplete", "step": 40, "missing": [1], "requested": [0],
                      "reason": "r"}),
            ),
            end("requeue"),
        ]);
        let a = &chain.allocations[0];
        assert_eq!(a.world_size, Some(2));
        assert_eq!(
            a.failed_ranks,
            vec![(1, "killed by signal SIGKILL".to_string())]
        );
        assert_eq!(
            a.incomplete,
            vec![Incomplete {
                step: Some(40),
                missing: vec![1],
                requested: vec![0]
            }]
        );
        assert_eq!(chain.history().no_progress_streak, 1);
    }
}
