//! The one fold from journal events to the run's allocations: what each allocation resumed
//! from, committed, was signalled with and decided, how it was interrupted, how far it trained
//! and which of its steps were redone. The requeue policy reads the crash-loop streak from it
//! ([`Chain::history`]), `checkpoint.interval: auto` the MTBF ([`Chain::mtbf`]); `status` shows
//! it with the goodput ([`Chain::goodput`]). One fold, so they never disagree.

use std::time::SystemTime;

use super::events::{Event, Stamped, SupervisorEvent};
use super::policy::History;
use crate::storage::journal::{Cadence, StoreEvent};

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
    /// When its program was ready to train (the built-in trainer's `training_started`; a child's
    /// `child_started`, whose own restore is not seen): the end of start-up and restore.
    pub training_started_at: Option<SystemTime>,
    /// The newest step it is known to have trained: its commits, and what the next allocation
    /// found in the metrics file (`training_started`'s `previous_step`).
    pub reached_step: Option<u64>,
    /// When its newest commit became durable.
    pub last_commit_at: Option<SystemTime>,
    /// Steps it trained that the next allocation redid (past its last commit, or past the
    /// checkpoint the next one fell back to). Known once the next allocation has started.
    pub steps_lost: u64,
    /// What `training_started` of this allocation says of its predecessor: the last step the
    /// metrics file recorded, and when.
    pub predecessor_reached: Option<(u64, Option<SystemTime>)>,
    /// The interval of its newest commit that journaled one (`checkpoint.interval: auto`), with
    /// that commit's step.
    pub cadence: Option<(u64, Cadence)>,
    /// Its time-limit watch (a Slurm job with a time limit), if armed.
    pub time_limit_watch: Option<TimeLimitWatch>,
}

/// An allocation's time-limit watch ([`super::deadline`]): as armed, and whether it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TimeLimitWatch {
    pub seconds_left: u64,
    pub save_in_seconds: u64,
    pub lead_seconds: u64,
    /// The watch stopped the program (no warning signal came before it).
    pub fired: bool,
}

/// Where one allocation's wall time went, seconds (see [`Chain::goodput`]).
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

/// The run's goodput: the share of allocation wall time that became preserved progress, and
/// the badput by cause, in the spirit of Google's ml-goodput-measurement breakdown.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Goodput {
    /// Sums over the allocations.
    pub total: Account,
    /// Time between one allocation's end and the next one's start (queueing, requeue).
    pub wait: f64,
    pub lost_steps: u64,
    pub announced: u32,
    pub unannounced: u32,
}

impl Goodput {
    /// Productive share of allocation time (None: no allocation time yet).
    pub fn fraction(&self) -> Option<f64> {
        (self.total.wall > 0.0).then(|| self.total.productive / self.total.wall)
    }

    /// Allocation time and the waits between allocations.
    pub fn elapsed(&self) -> f64 {
        self.total.wall + self.wait
    }
}

/// A multi-rank commit some ranks asked for and others never did: nothing was committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Incomplete {
    pub step: Option<u64>,
    pub missing: Vec<u32>,
    pub requested: Vec<u32>,
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

    /// How allocation `i` was interrupted, if it was. `running`: a writer holds the run now, so
    /// the newest allocation, without an end, is still going rather than killed.
    pub fn interruption_of(&self, i: usize, running: bool) -> Option<Interruption> {
        let last = i + 1 == self.allocations.len();
        self.allocations[i].interruption(last && running)
    }

    /// The goodput of the run so far (`running`: see [`Chain::interruption_of`]). Robust to a
    /// partial journal: an allocation without an end counts up to its last known moment, one
    /// without a step count loses nothing it cannot show.
    pub fn goodput(&self, running: bool) -> Goodput {
        let mut g = Goodput::default();
        let mut prev_end: Option<SystemTime> = None;
        for (i, a) in self.allocations.iter().enumerate() {
            let how = self.interruption_of(i, running);
            match how {
                Some(Interruption::Announced) => g.announced += 1,
                Some(Interruption::Unannounced) => g.unannounced += 1,
                None => {}
            }
            let x = a.account(how);
            g.total.wall += x.wall;
            g.total.startup += x.startup;
            g.total.save_stall += x.save_stall;
            g.total.lost += x.lost;
            g.total.productive += x.productive;
            g.lost_steps += a.steps_lost;
            if let (Some(end), Some(start)) = (prev_end, a.started_at) {
                g.wait += start.duration_since(end).map_or(0.0, |d| d.as_secs_f64());
            }
            prev_end = a.ended_at.or(a.last_event_at);
        }
        g
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
    settle(&mut chain.allocations);
    chain
}

/// What an allocation's successor tells of it: how far it trained (from the metrics file), and
/// so which of its steps were redone.
fn settle(allocations: &mut [Allocation]) {
    for i in 1..allocations.len() {
        let (before, after) = allocations.split_at_mut(i);
        let (prev, next) = (&mut before[i - 1], &after[0]);
        // A record older than the predecessor's start is not its own (it never logged one).
        let own = |at: Option<SystemTime>| at.zip(prev.started_at).is_none_or(|(t, s)| t >= s);
        if let Some((step, at)) = next.predecessor_reached.filter(|(_, at)| own(*at)) {
            if prev.reached_step.is_none_or(|r| r < step) {
                prev.reached_step = Some(step);
            }
            if prev.ended_at.is_none() && at > prev.last_event_at {
                prev.last_event_at = at;
            }
        }
        if next.resume_step.is_none() && next.training_started_at.is_none() {
            continue; // the next has not resumed yet: what it redoes is not known
        }
        let floor = next
            .resume_step
            .unwrap_or(0)
            .max(prev.resume_step.unwrap_or(0));
        prev.steps_lost = prev.reached_step.unwrap_or(0).saturating_sub(floor);
    }
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
            a.training_started_at = a.training_started_at.or(e.ts);
            a.reached_step = a.reached_step.max(*resume_step);
            resumed(a, *resume_step)
        }
        Event::Supervisor(SupervisorEvent::TrainingStarted {
            step,
            previous_step,
            previous_at,
        }) => {
            a.training_started_at = e.ts;
            a.reached_step = a.reached_step.max(Some(*step));
            a.predecessor_reached = previous_step.map(|s| {
                let at = previous_at
                    .as_deref()
                    .and_then(|t| humantime::parse_rfc3339(t).ok());
                (s, at)
            });
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
            a.reached_step = a.reached_step.max(Some(*step));
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
        Event::Supervisor(SupervisorEvent::TimeLimitWatch {
            seconds_left,
            save_in_seconds,
            lead_seconds,
        }) => {
            a.time_limit_watch = Some(TimeLimitWatch {
                seconds_left: *seconds_left,
                save_in_seconds: *save_in_seconds,
                lead_seconds: *lead_seconds,
                fired: false,
            });
        }
        Event::Supervisor(SupervisorEvent::TimeLimitNear { .. }) => {
            if let Some(w) = a.time_limit_watch.as_mut() {
                w.fired = true;
            }
        }
        Event::Store(StoreEvent::CheckpointCommitted {
            step,
            stall_seconds,
            cadence,
            ..
        }) => {
            if let Some(c) = cadence {
                a.cadence = Some((*step, c.clone()));
            }
            a.new_checkpoints += 1;
            a.save_stalls.extend(*stall_seconds);
            a.last_step = Some(a.last_step.map_or(*step, |m| m.max(*step)));
            a.reached_step = a.reached_step.max(Some(*step));
            a.last_commit_at = e.ts.or(a.last_commit_at);
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

    /// An event at second `t` of the day.
    fn at(t: u64, mut v: serde_json::Value) -> Stamped {
        v["ts"] = json!(format!(
            "2026-01-01T{:02}:{:02}:{:02}Z",
            t / 3600,
            t / 60 % 60,
            t % 60
        ));
        ev(v)
    }
    fn commit_at(t: u64, step: u64, stall: f64) -> Stamped {
        at(
            t,
            json!({"event": "checkpoint_committed", "checkpoint": format!("step-{step:012}"),
                  "step": step, "bytes": 1, "seconds": 0.1, "stall_seconds": stall}),
        )
    }

    /// Allocation 1 (0–100 s): ready at 10, commits step 100 at 50 (stall 2), is killed after
    /// logging step 180 at 90. Allocation 2 starts at 130, restores step 100 (ready at 140),
    /// gets USR1 at 190, commits step 250 at 200 (stall 1), ends announced at 205. Allocation 3
    /// starts at 265, restores 250 (ready at 270), finishes at step 300 at 320.
    fn three_allocations() -> Vec<Stamped> {
        vec![
            at(0, json!({"event": "allocation_start", "restart_count": 0})),
            at(
                0,
                json!({"event": "child_started", "pid": 1, "in_process": true}),
            ),
            at(10, json!({"event": "training_started", "step": 0})),
            commit_at(50, 100, 2.0),
            // killed at ~90: nothing more in the journal
            at(
                130,
                json!({"event": "allocation_start", "restart_count": 1}),
            ),
            at(
                135,
                json!({"event": "checkpoint_loaded", "checkpoint": "step-000000000100", "step": 100}),
            ),
            at(
                140,
                json!({"event": "training_started", "step": 100, "previous_step": 180,
                      "previous_at": "2026-01-01T00:01:30Z"}),
            ),
            at(
                190,
                json!({"event": "signal_received", "signal": "SIGUSR1", "warning": true}),
            ),
            commit_at(200, 250, 1.0),
            at(
                205,
                json!({"event": "allocation_end", "ending": "warning_signal", "decision": "requeue",
                      "reason": "r", "action": "a", "exit_code": 0}),
            ),
            at(
                265,
                json!({"event": "allocation_start", "restart_count": 2}),
            ),
            at(
                268,
                json!({"event": "checkpoint_loaded", "checkpoint": "step-000000000250", "step": 250}),
            ),
            at(
                270,
                json!({"event": "training_started", "step": 250, "previous_step": 250,
                      "previous_at": "2026-01-01T00:03:19Z"}),
            ),
            commit_at(320, 300, 0.5),
            at(320, json!({"event": "run_done"})),
            at(
                320,
                json!({"event": "allocation_end", "ending": "completed", "decision": "done",
                      "reason": "r", "action": "a", "exit_code": 0}),
            ),
        ]
    }

    #[test]
    fn interruptions_are_classified_and_lost_steps_counted() {
        let chain = fold(&three_allocations());
        let a = &chain.allocations;
        assert_eq!(
            chain.interruption_of(0, false),
            Some(Interruption::Unannounced)
        );
        assert_eq!(
            chain.interruption_of(1, false),
            Some(Interruption::Announced)
        );
        assert_eq!(chain.interruption_of(2, false), None);
        // Trained to 180, committed 100, the next resumed from 100: 80 steps redone.
        assert_eq!((a[0].reached_step, a[0].steps_lost), (Some(180), 80));
        // The killed allocation lived until its last logged step.
        assert_eq!(a[0].seconds(), Some(90.0));
        assert_eq!((a[1].reached_step, a[1].steps_lost), (Some(250), 0));
        assert_eq!(a[2].steps_lost, 0);
    }

    #[test]
    fn goodput_splits_wall_time_by_cause() {
        let chain = fold(&three_allocations());
        let g = chain.goodput(false);
        let close = |x: f64, y: f64| assert!((x - y).abs() < 1e-9, "{x} != {y}");
        // Walls: 90 + 75 + 55.
        close(g.total.wall, 220.0);
        // Start-up: 10 + 10 + 5.
        close(g.total.startup, 25.0);
        close(g.total.save_stall, 3.5);
        // Allocation 1 trained 180 steps in 90 - 10 - 2 = 78 s; 80 of them were lost.
        close(g.total.lost, 80.0 * 78.0 / 180.0);
        // Waits: 130 - 90 and 265 - 205.
        close(g.wait, 100.0);
        close(g.total.productive, 220.0 - 25.0 - 3.5 - 80.0 * 78.0 / 180.0);
        close(g.elapsed(), 320.0);
        assert_eq!((g.lost_steps, g.announced, g.unannounced), (80, 1, 1));
        assert!(g.fraction().unwrap() > 0.0 && g.fraction().unwrap() < 1.0);
    }

    #[test]
    fn goodput_of_partial_journals() {
        // Nothing at all.
        let g = fold(&[]).goodput(false);
        assert_eq!(g.fraction(), None);
        // One allocation, still running, no step yet.
        let chain = fold(&[
            at(0, json!({"event": "allocation_start", "restart_count": 0})),
            at(
                4,
                json!({"event": "child_started", "pid": 1, "in_process": true}),
            ),
        ]);
        let g = chain.goodput(true);
        assert_eq!(
            (g.total.wall, g.total.startup, g.total.lost),
            (4.0, 0.0, 0.0)
        );
        assert_eq!((g.announced, g.unannounced), (0, 0));
        // The same journal with no writer: the allocation was killed. A child (no step count)
        // loses the time since its start.
        let chain = fold(&[
            at(0, json!({"event": "allocation_start", "restart_count": 0})),
            at(
                2,
                json!({"event": "child_started", "pid": 1, "resume_step": 5}),
            ),
            at(9, json!({"event": "signal_received", "signal": "SIGTERM"})),
        ]);
        let g = chain.goodput(false);
        assert_eq!(g.unannounced, 1);
        assert_eq!(
            (g.total.wall, g.total.startup, g.total.lost),
            (9.0, 2.0, 7.0)
        );
        assert_eq!(g.total.productive, 0.0);
    }

    #[test]
    fn a_killed_allocation_without_a_metrics_record_loses_the_time_since_its_last_commit() {
        // An older journal: no training_started anywhere.
        let chain = fold(&[
            at(0, json!({"event": "allocation_start", "restart_count": 0})),
            commit_at(30, 10, 0.0),
            at(40, json!({"event": "signal_received", "signal": "SIGTERM"})),
            at(60, json!({"event": "allocation_start", "restart_count": 1})),
        ]);
        assert_eq!(
            chain.interruption_of(0, false),
            Some(Interruption::Unannounced)
        );
        let g = chain.goodput(true);
        assert_eq!((g.total.lost, g.wait, g.lost_steps), (10.0, 20.0, 0));
    }
}
