//! The time-limit watch: a last save before the job's time limit even when no warning comes.
//!
//! Slurm warns a job before its time limit only when it was submitted with `--signal` (the
//! script `hpc-ckpt sbatch` writes always is; a hand-written one may not be). Without that
//! warning the job gets TERM at the limit and KILL `KillWait` seconds later: too late for a large
//! save. So in a Slurm job with a time limit the supervisor keeps its own watch, armed at
//! `time left − slurm.signal_lead` (the lead the user gave a save). When it is due and no stop
//! has begun, the supervisor stops the workload as the warning would ([`Cause::TimeLimit`]:
//! final save, commit, requeue). When Slurm's warning comes first, the watch is a no-op repeat.
//!
//! Guarantees: the watch asks `scontrol` twice at most in the ordinary case (when armed and when
//! due); when due it asks again, and a limit extended meanwhile (`scontrol update TimeLimit=`)
//! re-arms it instead of stopping. A job with less time left than the lead at start is not
//! watched (the log says so): stopping at once would make no progress, allocation after
//! allocation.
//!
//! [`Cause::TimeLimit`]: super::stop::Cause::TimeLimit

use std::time::{Duration, Instant};

/// Slack for "the limit was extended": re-arm only when the new deadline is this much later.
const EXTENDED: Duration = Duration::from_secs(5);

/// What the watch knew when it was armed (journaled, logged).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Armed {
    /// Time left before the job's time limit, as Slurm said.
    pub left: Duration,
    /// When the watch will stop the workload, from now.
    pub save_in: Duration,
}

/// The watch of one allocation. `due` is called from the supervisor's loop.
pub struct EndWatch {
    lead: Duration,
    deadline: Option<Instant>,
    time_left: Box<dyn Fn() -> Option<Duration>>,
}

impl EndWatch {
    /// A watch that never fires (no Slurm job, or no time limit).
    pub fn off() -> EndWatch {
        EndWatch {
            lead: Duration::ZERO,
            deadline: None,
            time_left: Box::new(|| None),
        }
    }

    /// Arm the watch for `time_left()` (Slurm's time left, None when unlimited or unknown)
    /// minus `lead`. Returns the watch and, when armed, what it knew.
    pub fn arm(
        lead: Duration,
        now: Instant,
        time_left: impl Fn() -> Option<Duration> + 'static,
    ) -> (EndWatch, Option<Armed>) {
        let left = time_left();
        let mut w = EndWatch {
            lead,
            deadline: None,
            time_left: Box::new(time_left),
        };
        let armed = match left {
            Some(left) if left > lead => {
                let save_in = left - lead;
                w.deadline = Some(now + save_in);
                tracing::info!(
                    time_left_s = left.as_secs(),
                    lead_s = lead.as_secs(),
                    save_in_s = save_in.as_secs(),
                    "time-limit watch armed: unless a warning signal comes first, the last save \
                     starts slurm.signal_lead before the time limit"
                );
                Some(Armed { left, save_in })
            }
            Some(left) => {
                tracing::warn!(
                    time_left_s = left.as_secs(),
                    lead_s = lead.as_secs(),
                    "less time left than slurm.signal_lead: no save before the time limit is \
                     scheduled (only a warning signal or the periodic saves protect this \
                     allocation; lower slurm.signal_lead or raise the time limit)"
                );
                None
            }
            None => None,
        };
        (w, armed)
    }

    /// True once, when the watch is due: the time limit is `lead` away. Asks Slurm again first;
    /// a limit extended meanwhile re-arms the watch instead.
    pub fn due(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if now >= d => {}
            _ => return false,
        }
        if let Some(left) = (self.time_left)() {
            if left > self.lead + EXTENDED {
                let save_in = left - self.lead;
                tracing::info!(
                    time_left_s = left.as_secs(),
                    save_in_s = save_in.as_secs(),
                    "the job's time limit moved later: time-limit watch re-armed"
                );
                self.deadline = Some(now + save_in);
                return false;
            }
        }
        self.deadline = None;
        true
    }

    /// When the watch is due (None: off, or already fired).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    const S: Duration = Duration::from_secs(1);

    fn answers(v: &[Option<u64>]) -> impl Fn() -> Option<Duration> + 'static {
        let v: Vec<Option<u64>> = v.to_vec();
        let i = Rc::new(Cell::new(0));
        move || {
            let k = i.get();
            i.set(k + 1);
            v.get(k).copied().flatten().map(Duration::from_secs)
        }
    }

    #[test]
    fn fires_once_lead_before_the_limit() {
        let t0 = Instant::now();
        let (mut w, armed) = EndWatch::arm(30 * S, t0, answers(&[Some(300), Some(30)]));
        assert_eq!(
            armed,
            Some(Armed {
                left: 300 * S,
                save_in: 270 * S
            })
        );
        assert!(!w.due(t0 + 269 * S));
        assert!(w.due(t0 + 270 * S));
        assert!(!w.due(t0 + 280 * S), "once");
        assert_eq!(w.deadline(), None);
    }

    #[test]
    fn an_extended_limit_rearms_instead_of_stopping() {
        let t0 = Instant::now();
        // Armed with 100 s left; when due, Slurm says 400 s are left (the limit was raised).
        let (mut w, _) = EndWatch::arm(30 * S, t0, answers(&[Some(100), Some(400), Some(30)]));
        assert!(!w.due(t0 + 70 * S));
        assert_eq!(w.deadline(), Some(t0 + 70 * S + 370 * S));
        assert!(w.due(t0 + 440 * S));
    }

    #[test]
    fn no_limit_or_too_little_time_is_not_watched() {
        let t0 = Instant::now();
        let (mut w, armed) = EndWatch::arm(30 * S, t0, answers(&[None]));
        assert_eq!(armed, None);
        assert!(!w.due(t0 + 10_000 * S));
        let (mut w, armed) = EndWatch::arm(120 * S, t0, answers(&[Some(60)]));
        assert_eq!(armed, None);
        assert!(!w.due(t0 + 10_000 * S));
        assert!(!EndWatch::off().due(t0 + 10_000 * S));
    }

    #[test]
    fn slurm_unreachable_when_due_still_fires() {
        let t0 = Instant::now();
        let (mut w, _) = EndWatch::arm(30 * S, t0, answers(&[Some(100), None]));
        assert!(w.due(t0 + 70 * S));
    }
}
