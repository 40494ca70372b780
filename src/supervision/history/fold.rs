//! The journal fold: the one function from the journal's events to the run's allocations
//! ([`fold`](fn@fold)), one event at a time ([`apply`], one match arm per event kind), each
//! allocation settled against the next ([`settle`]). Guarantees: every reader of the run's history (the
//! requeue policy, the MTBF of `interval: auto`, `status` and its goodput) reads this one fold,
//! so they never disagree; an event of a kind it does not know is passed over.

use std::time::SystemTime;

use super::*;
use crate::storage::journal::StoreEvent;
use crate::supervision::events::{Event, Stamped, SupervisorEvent};

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
pub(super) fn settle(allocations: &mut [Allocation]) {
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
pub(super) fn apply(
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
