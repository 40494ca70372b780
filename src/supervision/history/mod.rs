//! The one fold from journal events to the run's allocations: what each allocation resumed
//! from, committed, was signalled with and decided, how it was interrupted, how far it trained
//! and which of its steps were redone. The requeue policy reads the crash-loop streak from it
//! ([`Chain::history`]), `checkpoint.interval: auto` the MTBF ([`Chain::mtbf`]); `status` shows
//! it with the goodput ([`Chain::goodput`]). One fold, so they never disagree.
//!
//! Where each part lives: [`fold`](mod@fold) the journal fold; [`allocation`] what it says of one
//! allocation; this file the chain of allocations and what is read from it (history, MTBF,
//! goodput).

use std::time::SystemTime;

use super::policy::History;

pub mod allocation;
pub mod fold;

pub use allocation::*;
pub use fold::fold;

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

/// The mean time between unannounced interruptions, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mtbf {
    pub seconds: f64,
    /// Unannounced interruptions observed (0: `seconds` is the prior).
    pub observed: u32,
    /// Allocation time they were observed over, seconds.
    pub over_seconds: f64,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervision::events::Stamped;
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
