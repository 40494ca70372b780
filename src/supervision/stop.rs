//! The stop sequence of a supervised program, as a small state machine: inputs in, actions out.
//!
//! Nothing here touches a process, a file or the clock: the caller passes `now`, carries out the
//! returned [`Action`]s (forward a signal, journal, log) and feeds the next [`Input`]. That keeps
//! the timing rules in one place and lets the unit tests drive them with a fake clock.
//!
//! The rules (README, "Stop sequence"):
//! - the first stop is forwarded at once: the warning signal as the configured child signal with
//!   the full grace period; a bare TERM/INT/HUP as TERM with the grace capped (the kill is near);
//!   a stop the supervisor asks for itself (a failed save under `on_save_error: stop`, the
//!   time-limit watch when no warning came) like the warning;
//! - a later TERM means hurry: it is forwarded, and the grace shrinks to at most the TERM cap
//!   from now; other repeats are only noted;
//! - when the grace is over the program gets TERM (unless it already had one), and `kill_after`
//!   later KILL. Each escalation happens once.

use std::time::{Duration, Instant};

use super::signals::Sig;

/// The timing of a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopTiming {
    /// The early warning Slurm sends (`signals.warn`).
    pub warn: Sig,
    /// What the program gets to checkpoint and exit (`signals.child`).
    pub child: Sig,
    /// `signals.grace_seconds`.
    pub grace: Duration,
    /// The longest grace after a bare TERM (Slurm's KillWait is short).
    pub term_grace_cap: Duration,
    /// From TERM to KILL once the grace is over.
    pub kill_after: Duration,
}

/// Why the program is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// An OS signal reached the supervisor.
    Signal(Sig),
    /// The supervisor asks on its own: a save failed and `on_save_error` is `stop`.
    SaveFailed,
    /// The supervisor asks on its own: the job's time limit is `slurm.signal_lead` away and no
    /// warning signal came ([`super::deadline`]). Announced, like the warning.
    TimeLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A stop cause arrived.
    Stop(Cause),
    /// Time passed (the caller's loop ticks).
    Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The first stop: note it (log, journal) and send `forward` to the program's group.
    Begin {
        cause: Cause,
        /// The warning signal (checkpoint, requeue), as opposed to a bare TERM.
        warned: bool,
        forward: Sig,
        grace: Duration,
    },
    /// A later signal: note it; `forward` is TERM when it hurries the program.
    Repeat { signal: Sig, forward: Option<Sig> },
    /// The grace is over: TERM to the program's group.
    Terminate,
    /// TERM was ignored: KILL to the program's group.
    Kill,
}

/// Where a stop stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopping {
    pub cause: Cause,
    pub warned: bool,
    pub at: Instant,
    pub grace: Duration,
    pub term_sent: bool,
    pub kill_sent: bool,
}

impl Stopping {
    /// The signal to report for this stop (the supervisor's own stop reports the child signal).
    pub fn signal(&self, timing: &StopTiming) -> Sig {
        match self.cause {
            Cause::Signal(s) => s,
            Cause::SaveFailed | Cause::TimeLimit => timing.child,
        }
    }
}

/// The stop sequence of one program.
#[derive(Debug, Clone)]
pub struct StopSequence {
    timing: StopTiming,
    state: Option<Stopping>,
}

impl StopSequence {
    pub fn new(timing: StopTiming) -> StopSequence {
        StopSequence {
            timing,
            state: None,
        }
    }

    /// The stop under way, if any.
    pub fn stopping(&self) -> Option<&Stopping> {
        self.state.as_ref()
    }

    pub fn timing(&self) -> &StopTiming {
        &self.timing
    }

    /// Feed one input; returns what to do, in order.
    pub fn on(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match (input, self.state.as_mut()) {
            (Input::Stop(cause), None) => vec![self.begin(cause, now)],
            (Input::Stop(Cause::Signal(sig)), Some(s)) => {
                let hurry = sig == Sig::Term;
                if hurry {
                    s.warned = false;
                    s.cause = Cause::Signal(Sig::Term);
                    s.term_sent = true;
                    s.grace = s.grace.min(now - s.at + self.timing.term_grace_cap);
                }
                vec![Action::Repeat {
                    signal: sig,
                    forward: hurry.then_some(Sig::Term),
                }]
            }
            // Already stopping: a failed save or the time-limit watch changes nothing.
            (Input::Stop(Cause::SaveFailed | Cause::TimeLimit), Some(_)) => Vec::new(),
            (Input::Tick, None) => Vec::new(),
            (Input::Tick, Some(s)) => {
                let waited = now - s.at;
                let mut out = Vec::new();
                if !s.term_sent && waited >= s.grace {
                    s.term_sent = true;
                    out.push(Action::Terminate);
                }
                if !s.kill_sent && waited >= s.grace + self.timing.kill_after {
                    s.kill_sent = true;
                    out.push(Action::Kill);
                }
                out
            }
        }
    }

    fn begin(&mut self, cause: Cause, now: Instant) -> Action {
        let t = &self.timing;
        let (warned, forward, grace) = match cause {
            Cause::Signal(s) if s == t.warn => (true, t.child, t.grace),
            Cause::Signal(_) => (false, Sig::Term, t.grace.min(t.term_grace_cap)),
            Cause::SaveFailed => (false, t.child, t.grace),
            Cause::TimeLimit => (true, t.child, t.grace),
        };
        self.state = Some(Stopping {
            cause,
            warned,
            at: now,
            grace,
            term_sent: forward == Sig::Term,
            kill_sent: false,
        });
        Action::Begin {
            cause,
            warned,
            forward,
            grace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timing() -> StopTiming {
        StopTiming {
            warn: Sig::Usr1,
            child: Sig::Usr1,
            grace: 60 * S,
            term_grace_cap: 20 * S,
            kill_after: 10 * S,
        }
    }

    /// Feed ticks every second from `from` to `to` (seconds after `t0`); collect the actions
    /// with the second they happened at.
    fn ticks(seq: &mut StopSequence, t0: Instant, from: u32, to: u32) -> Vec<(u32, Action)> {
        (from..=to)
            .flat_map(|s| {
                seq.on(Input::Tick, t0 + s * S)
                    .into_iter()
                    .map(move |a| (s, a))
            })
            .collect()
    }

    #[test]
    fn nothing_happens_without_a_stop() {
        let mut seq = StopSequence::new(timing());
        let t0 = Instant::now();
        assert!(ticks(&mut seq, t0, 0, 500).is_empty());
        assert!(seq.stopping().is_none());
    }

    #[test]
    fn warning_forwards_the_child_signal_then_term_at_grace_then_kill() {
        let mut seq = StopSequence::new(timing());
        let t0 = Instant::now();
        let a = seq.on(Input::Stop(Cause::Signal(Sig::Usr1)), t0);
        assert_eq!(
            a,
            vec![Action::Begin {
                cause: Cause::Signal(Sig::Usr1),
                warned: true,
                forward: Sig::Usr1,
                grace: 60 * S
            }]
        );
        assert_eq!(
            ticks(&mut seq, t0, 1, 100),
            vec![(60, Action::Terminate), (70, Action::Kill)]
        );
    }

    #[test]
    fn bare_term_is_forwarded_as_term_with_a_capped_grace_and_no_second_term() {
        let mut seq = StopSequence::new(timing());
        let t0 = Instant::now();
        let a = seq.on(Input::Stop(Cause::Signal(Sig::Term)), t0);
        assert_eq!(
            a,
            vec![Action::Begin {
                cause: Cause::Signal(Sig::Term),
                warned: false,
                forward: Sig::Term,
                grace: 20 * S
            }]
        );
        assert_eq!(ticks(&mut seq, t0, 1, 100), vec![(30, Action::Kill)]);
    }

    #[test]
    fn a_term_after_the_warning_hurries_and_shortens_the_grace() {
        let mut seq = StopSequence::new(timing());
        let t0 = Instant::now();
        seq.on(Input::Stop(Cause::Signal(Sig::Usr1)), t0);
        assert!(ticks(&mut seq, t0, 1, 5).is_empty());
        let a = seq.on(Input::Stop(Cause::Signal(Sig::Term)), t0 + 5 * S);
        assert_eq!(
            a,
            vec![Action::Repeat {
                signal: Sig::Term,
                forward: Some(Sig::Term)
            }]
        );
        let s = *seq.stopping().unwrap();
        assert!(!s.warned && s.term_sent);
        assert_eq!(s.grace, 25 * S, "at most the TERM cap from the repeat");
        // TERM was already sent: only KILL is left, at grace + kill_after.
        assert_eq!(ticks(&mut seq, t0, 6, 100), vec![(35, Action::Kill)]);
    }

    #[test]
    fn other_repeats_are_only_noted() {
        let mut seq = StopSequence::new(timing());
        let t0 = Instant::now();
        seq.on(Input::Stop(Cause::Signal(Sig::Usr1)), t0);
        let a = seq.on(Input::Stop(Cause::Signal(Sig::Usr1)), t0 + S);
        assert_eq!(
            a,
            vec![Action::Repeat {
                signal: Sig::Usr1,
                forward: None
            }]
        );
        assert!(seq.stopping().unwrap().warned);
        assert!(seq
            .on(Input::Stop(Cause::SaveFailed), t0 + 2 * S)
            .is_empty());
    }

    #[test]
    fn a_failed_save_under_stop_policy_asks_the_child_like_the_warning_does() {
        let mut seq = StopSequence::new(timing());
        let t0 = Instant::now();
        let a = seq.on(Input::Stop(Cause::SaveFailed), t0);
        assert_eq!(
            a,
            vec![Action::Begin {
                cause: Cause::SaveFailed,
                warned: false,
                forward: Sig::Usr1,
                grace: 60 * S
            }]
        );
        assert_eq!(seq.stopping().unwrap().signal(seq.timing()), Sig::Usr1);
        assert_eq!(
            ticks(&mut seq, t0, 1, 100),
            vec![(60, Action::Terminate), (70, Action::Kill)]
        );
    }

    #[test]
    fn the_time_limit_watch_is_a_warning_and_a_later_warning_only_a_repeat() {
        let mut seq = StopSequence::new(timing());
        let t0 = Instant::now();
        let a = seq.on(Input::Stop(Cause::TimeLimit), t0);
        assert_eq!(
            a,
            vec![Action::Begin {
                cause: Cause::TimeLimit,
                warned: true,
                forward: Sig::Usr1,
                grace: 60 * S
            }]
        );
        // Slurm's own warning after the watch's: noted, nothing forwarded.
        assert_eq!(
            seq.on(Input::Stop(Cause::Signal(Sig::Usr1)), t0 + S),
            vec![Action::Repeat {
                signal: Sig::Usr1,
                forward: None
            }]
        );
        // The watch after Slurm's warning: nothing.
        let mut seq = StopSequence::new(timing());
        seq.on(Input::Stop(Cause::Signal(Sig::Usr1)), t0);
        assert!(seq.on(Input::Stop(Cause::TimeLimit), t0 + S).is_empty());
        assert!(seq.stopping().unwrap().warned);
    }

    #[test]
    fn a_late_tick_sends_term_and_kill_together() {
        let mut seq = StopSequence::new(timing());
        let t0 = Instant::now();
        seq.on(Input::Stop(Cause::Signal(Sig::Usr1)), t0);
        assert_eq!(
            seq.on(Input::Tick, t0 + 200 * S),
            vec![Action::Terminate, Action::Kill]
        );
        assert!(seq.on(Input::Tick, t0 + 300 * S).is_empty());
    }
}
