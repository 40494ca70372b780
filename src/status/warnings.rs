//! The warnings at the end of the report: what in the gathered report a person should act on
//! (a corrupt checkpoint, refused commit requests, files kept aside, disk and log space, redone
//! work). Read from the report only.

use super::*;
use crate::storage::run_dir::Resolution;

/// Everything a person should act on, one line each: about the checkpoints, the files staged
/// and requests refused, and the disk and the logs.
pub(super) fn all(r: &StatusReport, res: &Resolution) -> Vec<String> {
    let mut w = checkpoint_warnings(r, res);
    w.extend(protocol_warnings(r));
    w.extend(disk_and_log_warnings(r));
    w
}

/// The pointer, checkpoints it does not name, corrupt ones, none at all.
fn checkpoint_warnings(r: &StatusReport, res: &Resolution) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(d) = &r.pointer.detail {
        w.push(format!(
            "last_checkpoint cannot be used ({d}); a resume would {}",
            match &r.resume_from {
                Some(x) => format!("fall back to {x}"),
                None => "find no valid checkpoint and start fresh only with --resume never".into(),
            }
        ));
    }
    for n in &res.newer_than_pointer {
        if Some(n) != r.pointer.names.as_ref() {
            w.push(format!(
                "{n} is committed and verifies but last_checkpoint does not name it (a writer was \
                 interrupted between rename and pointer swap); the next writer adopts it"
            ));
        }
    }
    for c in &r.checkpoints {
        if !c.faults.is_empty() && Some(&c.name) != r.pointer.names.as_ref() {
            w.push(format!("{} is corrupt: {}", c.name, c.faults.join("; ")));
        }
    }
    if r.checkpoints.is_empty() {
        w.push("nothing committed yet: a resume starts fresh".into());
    }
    w
}

/// Staged files kept aside, commit requests refused.
fn protocol_warnings(r: &StatusReport) -> Vec<String> {
    let mut w = Vec::new();
    for k in &r.kept {
        w.push(format!(
            "staged files were never committed and are kept in {} ({}): {}. To commit them: {}",
            k.dir,
            k.files.join(", "),
            k.reason,
            k.commit_command
        ));
    }
    for a in &r.run.allocations {
        for reason in &a.refused_requests {
            w.push(format!("a commit request was refused: {reason}"));
        }
    }
    w
}

/// Temp entries, free space, unreadable journal and metrics lines, redone work.
fn disk_and_log_warnings(r: &StatusReport) -> Vec<String> {
    let mut w = Vec::new();
    if !r.temp_entries.is_empty() && r.writer.is_none() {
        w.push(format!(
            "{} temp entr{} ({}) left by an interrupted write: never read, removed when a writer \
             next opens the run",
            r.temp_entries.len(),
            if r.temp_entries.len() == 1 {
                "y"
            } else {
                "ies"
            },
            human_bytes(r.temp_entries.iter().map(|t| t.bytes).sum())
        ));
    }
    if let (Some(free), Some(newest)) = (r.disk.free_bytes, r.checkpoints.first()) {
        if free < newest.bytes.saturating_mul(2) {
            w.push(format!(
                "only {} free: less than two checkpoints of {} — the next save may fail",
                human_bytes(free),
                human_bytes(newest.bytes)
            ));
        }
    }
    if r.journal.unreadable_lines > 0 {
        w.push(format!(
            "{} journal line(s) could not be read (a crash mid-append leaves one torn line)",
            r.journal.unreadable_lines
        ));
    }
    if r.metrics.unreadable_lines > 0 {
        w.push(format!(
            "{} line(s) of metrics.jsonl could not be read and were skipped (a kill mid-write \
             tears one line; the next writer ends it)",
            r.metrics.unreadable_lines
        ));
    }
    let redone: u64 = r.run.allocations.iter().map(|a| a.steps_redone).sum();
    if redone > 0 {
        w.push(format!(
            "{redone} step(s) of work were redone after restarts (an allocation resumed from an \
             older checkpoint than the newest ever committed)"
        ));
    }
    w
}
