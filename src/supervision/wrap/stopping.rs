//! The stop sequence, carried out: [`crate::supervision::stop`] decides (a pure state machine:
//! forward the stop signal, wait the grace period, TERM, KILL) and this file acts on its
//! [`Action`]s — signals sent to the program's process groups, a held signal released once the
//! program is ready, each step journaled, and the time budget of the last save said at the stop
//! signal. Guarantees: the program gets the configured signal first and the grace period to
//! save; TERM and KILL follow only when it is over (a bare TERM caps the grace at
//! Slurm's KillWait).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;

use super::*;
use crate::config::JobConfig;
use crate::slurm::{self};
use crate::storage::journal::StoreEvent;
use crate::supervision::child::Team;
use crate::supervision::events::{self, Event, SupervisorEvent};
use crate::supervision::signals::Sig;
use crate::supervision::stop::{Action, Cause, StopTiming};

/// Seconds between TERM and KILL when the grace period is over.
pub(super) const KILL_AFTER: Duration = Duration::from_secs(10);
/// Bare TERM (preemption, time limit, scancel) leaves only Slurm's KillWait: cap the grace.
pub(super) const TERM_GRACE_CAP: Duration = Duration::from_secs(20);

impl<'a> AllocationRun<'a> {
    pub(super) fn timing(&self) -> StopTiming {
        StopTiming {
            warn: self.cfg.signals.warn,
            child: self.cfg.signals.child,
            grace: Duration::from_secs(self.cfg.signals.grace_seconds),
            term_grace_cap: TERM_GRACE_CAP,
            kill_after: KILL_AFTER,
        }
    }

    /// Carry out what the stop sequence says.
    pub(super) fn carry_out(&mut self, actions: &[Action], child: &mut Team) -> Result<()> {
        for a in actions {
            match *a {
                Action::Begin {
                    cause,
                    warned,
                    forward,
                    grace,
                } => {
                    self.note_stop(cause, warned, forward.name(), grace)?;
                    self.forward(child, forward, grace)?;
                }
                Action::Repeat { signal, forward } => {
                    tracing::warn!(
                        signal = signal.name(),
                        "another stop signal: hurrying the program"
                    );
                    self.store
                        .journal()
                        .append(&SupervisorEvent::SignalReceived {
                            signal: signal.name().into(),
                            warning: false,
                            repeat: true,
                            forwarded: forward.map(|f| f.name().to_string()),
                            grace_seconds: None,
                        })?;
                    if let Some(f) = forward {
                        child.signal(f.to_nix());
                    }
                }
                Action::Terminate => self.escalate(child, Signal::SIGTERM)?,
                Action::Kill => self.escalate(child, Signal::SIGKILL)?,
            }
        }
        Ok(())
    }

    /// The first stop's signal to the program: held for a group that has not said it handles
    /// stop signals yet, at most half the grace period ([`crate::supervision::child`]).
    pub(super) fn forward(
        &mut self,
        child: &mut Team,
        forward: Sig,
        grace: Duration,
    ) -> Result<()> {
        let now = Instant::now();
        let ready_wait = Duration::from_secs(self.cfg.signals.ready_seconds);
        let held = child.forward(forward.to_nix(), now, ready_wait, now + grace / 2);
        if held.is_empty() {
            return Ok(());
        }
        let at_most = child
            .hold_deadline()
            .map_or(0.0, |t| t.saturating_duration_since(now).as_secs_f64());
        tracing::warn!(
            signal = forward.name(),
            ?held,
            at_most_s = format!("{at_most:.1}"),
            "the program has not said it handles stop signals yet (HPC_CKPT_READY_FILE): \
             holding the signal until it does"
        );
        self.store.journal().append(&SupervisorEvent::SignalHeld {
            signal: forward.name().into(),
            ranks: held,
            at_most_seconds: at_most,
        })?;
        Ok(())
    }

    /// Send the held stop signals that are due, and journal each.
    pub(super) fn release_held(&mut self, team: &mut Team) -> Result<()> {
        for r in team.release(Instant::now()) {
            let signal = r.signal.as_str().trim_start_matches("SIG");
            let held_s = r.held.as_secs_f64();
            if r.ready {
                tracing::info!(
                    rank = r.rank,
                    signal,
                    held_s = format!("{held_s:.2}"),
                    "the program is ready for stop signals: forwarded the held signal"
                );
            } else {
                tracing::warn!(
                    rank = r.rank,
                    signal,
                    held_s = format!("{held_s:.2}"),
                    "the program never said it handles stop signals: forwarded the held signal"
                );
            }
            self.store
                .journal()
                .append(&SupervisorEvent::SignalReleased {
                    signal: signal.into(),
                    rank: r.rank,
                    held_seconds: held_s,
                    ready: r.ready,
                })?;
        }
        Ok(())
    }

    pub(super) fn escalate(&mut self, child: &mut Team, sig: Signal) -> Result<()> {
        if sig == Signal::SIGKILL {
            tracing::error!("the program ignored TERM: sending KILL (its staged files, if complete, are still committed)");
        } else {
            tracing::warn!("grace period over: sending TERM to the program");
        }
        self.store
            .journal()
            .append(&SupervisorEvent::ChildEscalated {
                signal: sig.as_str().trim_start_matches("SIG").into(),
            })?;
        child.signal(sig);
        Ok(())
    }

    /// Log and journal the first stop.
    pub(super) fn note_stop(
        &mut self,
        cause: Cause,
        warned: bool,
        fwd: &str,
        grace: Duration,
    ) -> Result<()> {
        let sig = match cause {
            Cause::Signal(sig) => sig,
            Cause::SaveFailed => {
                tracing::warn!(
                    forwarded = fwd,
                    "a save failed and checkpoint.on_save_error is stop: asking the program to stop"
                );
                return Ok(());
            }
            Cause::TimeLimit => {
                let lead = self.cfg.slurm.signal_lead;
                tracing::warn!(
                    forwarded = fwd,
                    lead_s = lead,
                    grace_s = grace.as_secs(),
                    "the job's time limit is slurm.signal_lead away and no warning signal came: \
                     checkpoint and exit (the job was submitted without --signal?)"
                );
                budget_check(&self.run_dir, self.cfg, warned, grace);
                self.store
                    .journal()
                    .append(&SupervisorEvent::TimeLimitNear {
                        lead_seconds: lead as u64,
                        forwarded: Some(fwd.into()),
                        grace_seconds: Some(grace.as_secs()),
                    })?;
                return Ok(());
            }
        };
        tracing::warn!(
            signal = sig.name(),
            forwarded = fwd,
            grace_s = grace.as_secs(),
            "stop signal: checkpoint and exit"
        );
        budget_check(&self.run_dir, self.cfg, warned, grace);
        self.store
            .journal()
            .append(&SupervisorEvent::SignalReceived {
                signal: sig.name().into(),
                warning: warned,
                repeat: false,
                forwarded: Some(fwd.into()),
                grace_seconds: Some(grace.as_secs()),
            })?;
        Ok(())
    }
}

/// Say, at the stop signal, how much time there is and whether the last save fits in it.
/// Budget: the warning's lead (`slurm.signal_lead`) for the warning signal, Slurm's KillWait
/// (`scontrol show config`, 30 s when unknown) for a bare TERM; both capped by the grace period.
pub(super) fn budget_check(run_dir: &Path, cfg: &JobConfig, warned: bool, grace: Duration) {
    let last_save = events::read(run_dir)
        .0
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            Event::Store(StoreEvent::CheckpointCommitted { seconds, .. }) => Some(*seconds),
            _ => None,
        });
    let budget = if warned {
        Duration::from_secs(cfg.slurm.signal_lead as u64).min(grace)
    } else {
        slurm::kill_wait()
            .unwrap_or(Duration::from_secs(30))
            .min(grace)
    };
    match last_save {
        Some(s) if s > budget.as_secs_f64() * 0.5 => tracing::warn!(
            last_save_s = format!("{s:.2}"),
            budget_s = budget.as_secs(),
            "the last save took more than half the time left before the kill: this checkpoint may \
             not make it (raise slurm.signal_lead / signals.grace_seconds, or checkpoint more often)"
        ),
        Some(s) => tracing::info!(
            last_save_s = format!("{s:.2}"),
            budget_s = budget.as_secs(),
            "time budget for the final checkpoint"
        ),
        None => tracing::info!(
            budget_s = budget.as_secs(),
            "time budget for the final checkpoint (no save measured yet)"
        ),
    }
}
