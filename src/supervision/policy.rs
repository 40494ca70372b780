//! The requeue decision: a pure function from how this allocation ended and what the journal
//! says about earlier ones to one of done / requeue / Slurm requeues it / stop — with the reason
//! in words, which goes to the log and the journal.
//!
//! Guarantees: a completed run is never requeued; a run its user cancelled (TERM with no
//! preceding warning and Slurm state CANCELLED) is never requeued; a failure that a retry cannot
//! fix (a refused config, no checkpoint that restores, a failed save under `on_save_error: stop`)
//! is never requeued; the chain stops after `max_restarts`, and after `max_no_progress`
//! allocations in a row without a new checkpoint.

use super::workload::FailureKind;
use crate::config::RequeueConfig;
use crate::exit_code;

/// How the allocation's work ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The program finished its training (exit 0 with no stop signal, or it said `done`).
    Completed,
    /// A stop signal arrived; `warned` is true when it was the early warning (checkpoint and
    /// requeue), false for a bare TERM/INT/HUP.
    Stopped { signal: String, warned: bool },
    /// The program failed on its own (non-zero exit, killed) with no stop signal, or the
    /// workload could not go on (`kind` says whether a retry can help).
    Failed { how: String, kind: FailureKind },
}

/// What the journal says about earlier allocations of this run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Allocations before this one.
    pub previous_allocations: u32,
    /// How many of the latest previous allocations, in a row, ended with no new checkpoint.
    pub no_progress_streak: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Training is complete: no requeue.
    Done,
    /// Work is left and we must requeue (or resubmit) the job ourselves.
    Requeue { reason: String },
    /// Work is left and Slurm requeues the job itself (preemption with REQUEUE, `scontrol
    /// requeue`): nothing to do.
    SlurmRequeues { reason: String },
    /// Stop the chain, for this reason.
    Stop { reason: String, why: StopWhy },
}

/// Why the chain stops: each has its exit code (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// A user's cancel, `max_restarts`, a bare TERM we must not requeue.
    Policy,
    /// `max_no_progress` allocations in a row without a new checkpoint.
    CrashLoop,
    /// A save failed and `on_save_error` is `stop`.
    SaveFailed,
    /// The job config is refused: the user's to fix.
    ConfigRefused,
    /// No checkpoint restores.
    NothingRestores,
}

impl StopWhy {
    pub fn exit_code(self) -> i32 {
        match self {
            StopWhy::Policy | StopWhy::SaveFailed => exit_code::STOPPED,
            StopWhy::CrashLoop => exit_code::CRASH_LOOP,
            StopWhy::ConfigRefused => exit_code::CONFIG,
            StopWhy::NothingRestores => exit_code::CORRUPT,
        }
    }
}

impl Decision {
    /// The journal's name of the decision.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Done => "done",
            Decision::Requeue { .. } => "requeue",
            Decision::SlurmRequeues { .. } => "slurm_requeues",
            Decision::Stop { .. } => "stop",
        }
    }

    /// The reason, in words.
    pub fn reason(&self) -> String {
        match self {
            Decision::Done => "training complete".to_string(),
            Decision::Requeue { reason }
            | Decision::SlurmRequeues { reason }
            | Decision::Stop { reason, .. } => reason.clone(),
        }
    }
}

impl Ending {
    /// The journal's name of the ending.
    pub fn name(&self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::Stopped { warned: true, .. } => "warning_signal",
            Ending::Stopped { .. } => "terminated",
            Ending::Failed { .. } => "failed",
        }
    }
}

/// A failure no retry can fix: stop, whatever the rest of the history says.
fn unretryable(ending: &Ending) -> Option<Decision> {
    let Ending::Failed { how, kind } = ending else {
        return None;
    };
    let (why, what) = match kind {
        FailureKind::Crash => return None,
        FailureKind::SaveFailed => (
            StopWhy::SaveFailed,
            "a checkpoint save failed and checkpoint.on_save_error is stop",
        ),
        FailureKind::ConfigRefused => (
            StopWhy::ConfigRefused,
            "the job config is refused; a requeue would refuse it again: fix the config (or use \
             a new run dir) and resubmit",
        ),
        FailureKind::NothingRestores => (
            StopWhy::NothingRestores,
            "no checkpoint of the run restores; a requeue would fail the same way",
        ),
    };
    Some(Decision::Stop {
        reason: format!("{what}: {how}"),
        why,
    })
}

/// Decide. `restart_count` is the larger of Slurm's `SLURM_RESTART_COUNT` and the journal's
/// allocation count; `slurm_state` is `scontrol`'s JobState when known. The rules, in order:
/// done; a failure a retry cannot fix; a stop without warning ([`unwarned`]); the limits
/// ([`over_limits`]); else requeue.
pub fn decide(
    ending: &Ending,
    new_checkpoints: u32,
    history: &History,
    restart_count: u32,
    slurm_state: Option<&str>,
    cfg: &RequeueConfig,
) -> Decision {
    if *ending == Ending::Completed {
        return Decision::Done;
    }
    if let Some(d) = unretryable(ending) {
        return d;
    }
    if let Ending::Stopped {
        signal,
        warned: false,
    } = ending
    {
        if let Some(d) = unwarned(signal, slurm_state) {
            return d;
        }
    }
    if let Some(d) = over_limits(new_checkpoints, history, restart_count, cfg) {
        return d;
    }
    let reason = match ending {
        Ending::Stopped {
            signal,
            warned: true,
        } => format!("warning signal {signal}: work is left"),
        Ending::Stopped { signal, .. } => format!("{signal} at the time limit: work is left"),
        Ending::Failed { how, .. } => {
            format!("the program failed ({how}); retrying from the last checkpoint")
        }
        Ending::Completed => unreachable!(),
    };
    Decision::Requeue { reason }
}

/// A stop by `signal` with no warning before it: what Slurm's state says it was. `None` only at
/// the time limit (TIMEOUT, DEADLINE), which is requeued like a warning.
fn unwarned(signal: &str, slurm_state: Option<&str>) -> Option<Decision> {
    let stop = |reason: String| {
        Some(Decision::Stop {
            reason,
            why: StopWhy::Policy,
        })
    };
    match slurm_state {
        Some("CANCELLED") => stop(format!(
            "{signal} with no warning and Slurm says CANCELLED: cancelled by its user"
        )),
        Some(s @ ("PREEMPTED" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "PENDING")) => {
            Some(Decision::SlurmRequeues {
                reason: format!("{signal} and Slurm state {s}: Slurm requeues the job itself"),
            })
        }
        Some("TIMEOUT") | Some("DEADLINE") => None,
        // What Slurm shows while it kills a job, whether its user ran `scancel` or it was
        // preempted without a warning signal (measured: both read COMPLETING): never requeue
        // ourselves — a preempted job is requeued by Slurm, a cancelled one must stay dead.
        Some(s @ ("RUNNING" | "COMPLETING")) => stop(format!(
            "{signal} with no warning (Slurm state {s}): cancelled by its user, or preempted \
             (then Slurm requeues it itself); not requeueing"
        )),
        Some(other) => stop(format!(
            "{signal} with no warning, Slurm state {other}: not requeueing"
        )),
        None => stop(format!(
            "{signal} with no warning outside a known Slurm state (a user's interrupt or kill): \
             not requeueing; run again to resume"
        )),
    }
}

/// `max_restarts` reached, or `max_no_progress` allocations in a row without a new checkpoint
/// (a crash loop).
fn over_limits(
    new_checkpoints: u32,
    history: &History,
    restart_count: u32,
    cfg: &RequeueConfig,
) -> Option<Decision> {
    if restart_count >= cfg.max_restarts {
        return Some(Decision::Stop {
            reason: format!(
                "max_restarts reached ({restart_count} of {}); work is left: resubmit to continue",
                cfg.max_restarts
            ),
            why: StopWhy::Policy,
        });
    }
    let streak = history.no_progress_streak + 1;
    if new_checkpoints == 0 && streak >= cfg.max_no_progress {
        return Some(Decision::Stop {
            reason: format!(
                "{streak} allocation(s) in a row ended without a new checkpoint (max_no_progress \
                 = {}): a crash loop, not requeueing",
                cfg.max_no_progress
            ),
            why: StopWhy::CrashLoop,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_a_retry_cannot_fix_stop_with_their_own_exit_code() {
        for (kind, why, code) in [
            (FailureKind::SaveFailed, StopWhy::SaveFailed, 12),
            (FailureKind::ConfigRefused, StopWhy::ConfigRefused, 7),
            (FailureKind::NothingRestores, StopWhy::NothingRestores, 3),
        ] {
            let f = Ending::Failed {
                how: "what failed".into(),
                kind,
            };
            // Even with a fresh history and commits this allocation: never requeued.
            match decide(&f, 1, &h(0), 0, Some("RUNNING"), &cfg()) {
                Decision::Stop { reason, why: w } => {
                    assert_eq!(w, why);
                    assert_eq!(w.exit_code(), code);
                    assert!(reason.contains("what failed"), "{reason}");
                }
                d => panic!("{kind:?}: {d:?}"),
            }
        }
    }

    fn cfg() -> RequeueConfig {
        RequeueConfig {
            max_restarts: 5,
            max_no_progress: 2,
        }
    }
    fn h(streak: u32) -> History {
        History {
            previous_allocations: 1,
            no_progress_streak: streak,
        }
    }
    fn warned() -> Ending {
        Ending::Stopped {
            signal: "USR1".into(),
            warned: true,
        }
    }
    fn term() -> Ending {
        Ending::Stopped {
            signal: "TERM".into(),
            warned: false,
        }
    }

    #[test]
    fn completed_is_never_requeued() {
        assert_eq!(
            decide(&Ending::Completed, 0, &h(9), 99, Some("CANCELLED"), &cfg()),
            Decision::Done
        );
    }

    #[test]
    fn warning_requeues_until_limits() {
        assert!(matches!(
            decide(&warned(), 1, &h(0), 0, Some("RUNNING"), &cfg()),
            Decision::Requeue { .. }
        ));
        assert!(matches!(
            decide(&warned(), 1, &h(0), 5, Some("RUNNING"), &cfg()),
            Decision::Stop {
                why: StopWhy::Policy,
                ..
            }
        ));
        // No checkpoint this time, one before without: crash loop at 2.
        assert!(matches!(
            decide(&warned(), 0, &h(1), 1, None, &cfg()),
            Decision::Stop {
                why: StopWhy::CrashLoop,
                ..
            }
        ));
        assert!(matches!(
            decide(&warned(), 0, &h(0), 1, None, &cfg()),
            Decision::Requeue { .. }
        ));
    }

    #[test]
    fn bare_term_follows_slurm_state() {
        assert!(matches!(
            decide(&term(), 1, &h(0), 0, Some("CANCELLED"), &cfg()),
            Decision::Stop { .. }
        ));
        assert!(matches!(
            decide(&term(), 1, &h(0), 0, Some("PREEMPTED"), &cfg()),
            Decision::SlurmRequeues { .. }
        ));
        assert!(matches!(
            decide(&term(), 1, &h(0), 0, Some("TIMEOUT"), &cfg()),
            Decision::Requeue { .. }
        ));
        assert!(matches!(
            decide(&term(), 1, &h(0), 0, None, &cfg()),
            Decision::Stop { .. }
        ));
    }

    #[test]
    fn failures_retry_then_stop() {
        let f = Ending::Failed {
            how: "exit code 1".into(),
            kind: FailureKind::Crash,
        };
        assert!(matches!(
            decide(&f, 0, &h(0), 0, Some("RUNNING"), &cfg()),
            Decision::Requeue { .. }
        ));
        assert!(matches!(
            decide(&f, 0, &h(1), 1, Some("RUNNING"), &cfg()),
            Decision::Stop {
                why: StopWhy::CrashLoop,
                ..
            }
        ));
    }
}
