//! `hpc-ckpt status`: what happened to a run and what is safe on disk, for a person (text) or a
//! program (`--json`, schema `hpc-ckpt-status/1`, documented in the README).
//!
//! Read-only: it never takes the lock, removes temp entries or moves the pointer. It verifies the
//! checkpoint a resume would use (and, with `--verify`, every checkpoint).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::storage::fsutil::tree_size;
use crate::storage::journal;
use crate::storage::lock::{self, Holder};
use crate::storage::pointer::Pointer;
use crate::storage::retention::{Candidate, RetentionPolicy, Role};
use crate::storage::run_dir::RunDir;
use crate::storage::verify;

pub const SCHEMA: &str = "hpc-ckpt-status/1";
const JOURNAL_TAIL: usize = 10;

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub schema: &'static str,
    pub run_dir: String,
    pub pointer: PointerStatus,
    /// The checkpoint a resume would load now (verified), if any.
    pub resume_from: Option<String>,
    /// True when `resume_from` is not what the pointer names (a fallback).
    pub fell_back: bool,
    pub checkpoints: Vec<CheckpointStatus>,
    pub temp_entries: Vec<TempEntry>,
    pub disk: Disk,
    /// The writer holding `run.lock` now, if any.
    pub writer: Option<Holder>,
    pub journal: JournalSummary,
    /// The job chain, from the journal.
    pub run: RunChain,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RunChain {
    /// `fresh` (never ran), `running` (a writer holds the lock), `done`, `pending` (requeued,
    /// waiting for the next allocation), `stopped` (by policy; see reason), `interrupted` (the
    /// last allocation ended without a word: killed, node lost).
    pub state: &'static str,
    pub reason: Option<String>,
    pub allocations: Vec<AllocationStatus>,
}

#[derive(Debug, Serialize)]
pub struct AllocationStatus {
    pub job_id: Option<String>,
    pub restart_count: u64,
    pub host: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// `completed`, `warning_signal`, `terminated`, `failed`, or null when it never said.
    pub ending: Option<String>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub action: Option<String>,
    pub exit_code: Option<i64>,
    pub resume_step: Option<u64>,
    pub new_checkpoints: u64,
    /// The stop signal received, and seconds from it to the next committed checkpoint.
    pub signal: Option<String>,
    pub signal_to_checkpoint_seconds: Option<f64>,
    /// Steps committed before this allocation but redone by it (it resumed from an older one).
    pub steps_redone: u64,
}

/// Rebuild the job chain from journal events.
pub fn chain_of(events: &[Value], writer_running: bool) -> RunChain {
    let mut allocs: Vec<AllocationStatus> = Vec::new();
    let mut max_step: Option<u64> = None;
    let mut done = false;
    let mut signal_at: Option<std::time::SystemTime> = None;
    let ts = |e: &Value| {
        e["ts"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
    };
    for e in events {
        match e["event"].as_str().unwrap_or("") {
            "allocation_start" => {
                done = false;
                signal_at = None;
                allocs.push(AllocationStatus {
                    job_id: e["job_id"].as_str().map(String::from),
                    restart_count: e["restart_count"].as_u64().unwrap_or(0),
                    host: e["host"].as_str().map(String::from),
                    started_at: e["ts"].as_str().map(String::from),
                    ended_at: None,
                    ending: None,
                    decision: None,
                    reason: None,
                    action: None,
                    exit_code: None,
                    resume_step: None,
                    new_checkpoints: 0,
                    signal: None,
                    signal_to_checkpoint_seconds: None,
                    steps_redone: 0,
                });
            }
            "child_started" => {
                if let Some(a) = allocs.last_mut() {
                    a.resume_step = e["resume_step"].as_u64();
                    let from = a.resume_step.unwrap_or(0);
                    a.steps_redone = max_step.map(|m| m.saturating_sub(from)).unwrap_or(0);
                }
            }
            "signal_received" if e["repeat"] != true => {
                if let Some(a) = allocs.last_mut() {
                    a.signal = e["signal"].as_str().map(String::from);
                    signal_at = ts(e);
                }
            }
            "checkpoint_committed" => {
                let step = e["step"].as_u64().unwrap_or(0);
                max_step = Some(max_step.map_or(step, |m| m.max(step)));
                if let Some(a) = allocs.last_mut() {
                    a.new_checkpoints += 1;
                    if let (Some(s), Some(t), None) =
                        (signal_at, ts(e), a.signal_to_checkpoint_seconds)
                    {
                        a.signal_to_checkpoint_seconds =
                            t.duration_since(s).ok().map(|d| d.as_secs_f64());
                    }
                }
            }
            "stop_completed" => {
                // In-process stops journal the signal after the fact; take the measured time.
                if let Some(a) = allocs.last_mut() {
                    if a.signal_to_checkpoint_seconds.is_none() && a.new_checkpoints > 0 {
                        a.signal_to_checkpoint_seconds = e["seconds_since_signal"].as_f64();
                    }
                }
            }
            "run_done" => done = true,
            "allocation_end" => {
                if let Some(a) = allocs.last_mut() {
                    a.ended_at = e["ts"].as_str().map(String::from);
                    a.ending = e["ending"].as_str().map(String::from);
                    a.decision = e["decision"].as_str().map(String::from);
                    a.reason = e["reason"].as_str().map(String::from);
                    a.action = e["action"].as_str().map(String::from);
                    a.exit_code = e["exit_code"].as_i64();
                }
            }
            _ => {}
        }
    }
    let (state, reason) = match allocs.last() {
        _ if writer_running => ("running", None),
        None => ("fresh", None),
        Some(_) if done => ("done", Some("training complete".to_string())),
        Some(a) => match a.decision.as_deref() {
            Some("requeue") | Some("slurm_requeues") => (
                "pending",
                Some(format!(
                    "{} ({})",
                    a.reason.clone().unwrap_or_default(),
                    a.action.clone().unwrap_or_default()
                )),
            ),
            Some("stop") => ("stopped", a.reason.clone()),
            Some("done") => ("done", Some("training complete".to_string())),
            _ => (
                "interrupted",
                Some(
                    "the last allocation ended without a word (killed, or its node was lost): \
                      Slurm may requeue it; else resubmit to resume"
                        .to_string(),
                ),
            ),
        },
    };
    RunChain {
        state,
        reason,
        allocations: allocs,
    }
}

#[derive(Debug, Serialize)]
pub struct PointerStatus {
    /// `ok`, `absent`, `invalid` (garbage), `missing_target`, `corrupt_target`.
    pub state: &'static str,
    pub names: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckpointStatus {
    pub name: String,
    pub step: u64,
    pub epoch: Option<u64>,
    pub bytes: u64,
    pub created_at: Option<String>,
    pub age_seconds: Option<u64>,
    pub metrics: BTreeMap<String, f64>,
    /// The batch job that wrote it (scheduler, id, restart count), when there was one.
    pub job: Option<crate::storage::manifest::JobInfo>,
    pub roles: Vec<Role>,
    /// `true`/`false` when verified in this call, `null` when only the manifest was read.
    pub verified: Option<bool>,
    pub faults: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TempEntry {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Disk {
    pub checkpoints_bytes: u64,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct JournalSummary {
    pub events: usize,
    pub unreadable_lines: usize,
    pub last: Vec<Value>,
}

impl StatusReport {
    /// Whether anything inspected failed verification.
    pub fn has_faults(&self) -> bool {
        self.checkpoints.iter().any(|c| c.verified == Some(false))
            || matches!(
                self.pointer.state,
                "invalid" | "corrupt_target" | "missing_target"
            )
    }
}

/// Inspect `root`. `verify_all` verifies every checkpoint, not only the resume point.
pub fn inspect(root: &Path, verify_all: bool) -> std::io::Result<StatusReport> {
    if !root.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not a directory (is it the run dir?)", root.display()),
        ));
    }
    let dir = RunDir::new(root);
    let res = dir.resolve();
    let mut warnings = Vec::new();

    let target = match &res.pointer {
        Ok(Pointer::Names(n)) => Some(n.clone()),
        _ => None,
    };
    let pointer = match &res.pointer {
        Ok(Pointer::Absent) => PointerStatus {
            state: "absent",
            names: None,
            detail: None,
        },
        Err(f) => PointerStatus {
            state: "invalid",
            names: None,
            detail: Some(f.to_string()),
        },
        Ok(Pointer::Names(n)) => match res.refused.iter().find(|(name, _)| name == n) {
            None => PointerStatus {
                state: "ok",
                names: Some(n.clone()),
                detail: None,
            },
            Some((_, faults)) => {
                let missing = !dir.checkpoints_dir().join(n).exists();
                PointerStatus {
                    state: if missing {
                        "missing_target"
                    } else {
                        "corrupt_target"
                    },
                    names: Some(n.clone()),
                    detail: Some(join(faults)),
                }
            }
        },
    };
    let resume_from = res.chosen.as_ref().map(|(l, _)| l.name.clone());
    if let Some(d) = &pointer.detail {
        warnings.push(format!(
            "last_checkpoint cannot be used ({d}); a resume would {}",
            match &resume_from {
                Some(r) => format!("fall back to {r}"),
                None => "find no valid checkpoint and start fresh only with --resume never".into(),
            }
        ));
    }
    for n in &res.newer_than_pointer {
        if Some(n) != target.as_ref() {
            warnings.push(format!(
                "{n} is committed and verifies but last_checkpoint does not name it (a writer was \
                 interrupted between rename and pointer swap); the next writer adopts it"
            ));
        }
    }

    // Checkpoints, with the retention policy recorded by the newest readable manifest.
    let listed = dir.list();
    let mut manifests = BTreeMap::new();
    let mut faults_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, f) in &res.refused {
        faults_of.insert(name.clone(), f.iter().map(|x| x.to_string()).collect());
    }
    for l in &listed {
        if let Some((c, m)) = res.chosen.as_ref().filter(|(c, _)| c.name == l.name) {
            // Verified by resolve() already.
            manifests.insert(c.name.clone(), m.clone());
            continue;
        }
        let result = if verify_all {
            verify::verify_checkpoint(&l.path)
                .map_err(|f| f.iter().map(|x| x.to_string()).collect())
        } else {
            verify::read_manifest(&l.path).map_err(|f| vec![f.to_string()])
        };
        match result {
            Ok(m) => {
                manifests.insert(l.name.clone(), m);
            }
            Err(f) => {
                faults_of.insert(l.name.clone(), f);
            }
        }
    }
    let policy: RetentionPolicy = listed
        .iter()
        .rev()
        .find_map(|l| manifests.get(&l.name).and_then(|m| m.retention.clone()))
        .unwrap_or_default();
    let monitor = policy.keep_best.as_ref().map(|b| b.monitor.clone());
    let cands: Vec<Candidate> = listed
        .iter()
        .filter_map(|l| {
            let m = manifests.get(&l.name)?;
            Some(Candidate {
                name: l.name.clone(),
                step: l.step,
                metric: monitor.as_ref().and_then(|k| m.metrics.get(k).copied()),
            })
        })
        .collect();
    let roles: BTreeMap<String, Vec<Role>> = policy
        .roles(&cands, target.as_deref())
        .into_iter()
        .map(|(n, r)| (n, r.into_iter().collect()))
        .collect();
    let now = std::time::SystemTime::now();
    let mut checkpoints = Vec::new();
    for l in listed.iter().rev() {
        let m = manifests.get(&l.name);
        let created = m.map(|m| m.created_at.clone());
        let age = created
            .as_deref()
            .and_then(|c| humantime::parse_rfc3339(c).ok())
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| d.as_secs());
        let faults = faults_of.get(&l.name).cloned().unwrap_or_default();
        let verified = if !faults.is_empty() {
            Some(false)
        } else if verify_all || Some(&l.name) == resume_from.as_ref() {
            Some(true)
        } else {
            None
        };
        if !faults.is_empty() && Some(&l.name) != target.as_ref() {
            warnings.push(format!("{} is corrupt: {}", l.name, faults.join("; ")));
        }
        checkpoints.push(CheckpointStatus {
            name: l.name.clone(),
            step: l.step,
            epoch: m.and_then(|m| m.epoch),
            bytes: m
                .map(|m| m.total_bytes())
                .unwrap_or_else(|| tree_size(&l.path)),
            created_at: created,
            age_seconds: age,
            metrics: m.map(|m| m.metrics.clone()).unwrap_or_default(),
            job: m.and_then(|m| m.job.clone()),
            roles: roles.get(&l.name).cloned().unwrap_or_default(),
            verified,
            faults,
        });
    }
    if checkpoints.is_empty() {
        warnings.push("nothing committed yet: a resume starts fresh".into());
    }

    let writer = lock::probe(root);
    let temp_entries: Vec<TempEntry> = dir
        .temp_entries()
        .into_iter()
        .map(|p| TempEntry {
            name: p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned(),
            bytes: if p.is_dir() {
                tree_size(&p)
            } else {
                p.metadata().map(|m| m.len()).unwrap_or(0)
            },
        })
        .collect();
    if !temp_entries.is_empty() && writer.is_none() {
        warnings.push(format!(
            "{} temp entr{} ({}) left by an interrupted write: never read, removed when a writer \
             next opens the run",
            temp_entries.len(),
            if temp_entries.len() == 1 { "y" } else { "ies" },
            human_bytes(temp_entries.iter().map(|t| t.bytes).sum())
        ));
    }

    let ckpt_dir = dir.checkpoints_dir();
    let disk = Disk {
        checkpoints_bytes: tree_size(&ckpt_dir),
        free_bytes: fs2::available_space(root).ok(),
        total_bytes: fs2::total_space(root).ok(),
    };
    if let (Some(free), Some(newest)) = (disk.free_bytes, checkpoints.first()) {
        if free < newest.bytes.saturating_mul(2) {
            warnings.push(format!(
                "only {} free: less than two checkpoints of {} — the next save may fail",
                human_bytes(free),
                human_bytes(newest.bytes)
            ));
        }
    }

    let (events, unreadable) = journal::read_all(root);
    if unreadable > 0 {
        warnings.push(format!(
            "{unreadable} journal line(s) could not be read (a crash mid-append leaves one torn line)"
        ));
    }
    let last = events
        .iter()
        .rev()
        .take(JOURNAL_TAIL)
        .rev()
        .cloned()
        .collect();
    let run = chain_of(&events, writer.is_some());
    let redone: u64 = run.allocations.iter().map(|a| a.steps_redone).sum();
    if redone > 0 {
        warnings.push(format!(
            "{redone} step(s) of work were redone after restarts (an allocation resumed from an \
             older checkpoint than the newest ever committed)"
        ));
    }

    Ok(StatusReport {
        schema: SCHEMA,
        run_dir: root.display().to_string(),
        fell_back: res.fell_back() && resume_from.is_some(),
        pointer,
        resume_from,
        checkpoints,
        temp_entries,
        disk,
        writer,
        journal: JournalSummary {
            events: events.len(),
            unreadable_lines: unreadable,
            last,
        },
        run,
        warnings,
    })
}

fn join(faults: &[crate::storage::Fault]) -> String {
    faults
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Bytes in binary units, one decimal.
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn human_age(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Render for a person.
pub fn render_text(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "Run dir:      {}", r.run_dir);
    let _ = writeln!(
        o,
        "Run:          {}{}",
        r.run.state.to_uppercase(),
        r.run
            .reason
            .as_ref()
            .map(|x| format!(" — {x}"))
            .unwrap_or_default()
    );
    let resume = match (&r.resume_from, r.fell_back) {
        (Some(n), false) => format!("{n} (verified)"),
        (Some(n), true) => format!("{n} (verified; FALLBACK — the pointer's target is unusable)"),
        (None, _) if r.checkpoints.is_empty() => "none — a resume starts fresh".into(),
        (None, _) => "NONE VERIFIES — see warnings".into(),
    };
    let _ = writeln!(o, "Resume from:  {resume}");
    let _ = writeln!(
        o,
        "Pointer:      {}{}",
        r.pointer.state,
        r.pointer
            .names
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "Writer:       {}",
        r.writer
            .as_ref()
            .map(|h| format!("running: {h}"))
            .unwrap_or_else(|| "none running".into())
    );
    let _ = writeln!(
        o,
        "Disk:         checkpoints use {}; {} free of {}",
        human_bytes(r.disk.checkpoints_bytes),
        r.disk.free_bytes.map(human_bytes).unwrap_or("?".into()),
        r.disk.total_bytes.map(human_bytes).unwrap_or("?".into())
    );
    let _ = writeln!(o, "\nCheckpoints ({}):", r.checkpoints.len());
    if !r.checkpoints.is_empty() {
        let _ = writeln!(
            o,
            "  {:<18} {:>6} {:>10} {:>7} {:>11}  {:<22} {:<20} STATE",
            "NAME", "EPOCH", "SIZE", "AGE", "JOB.RESTART", "METRICS", "KEPT AS"
        );
    }
    for c in &r.checkpoints {
        let metrics = c
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={v:.4}"))
            .collect::<Vec<_>>()
            .join(",");
        let roles = c
            .roles
            .iter()
            .map(|r| {
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(",");
        let state = match c.verified {
            Some(true) => "verified".to_string(),
            Some(false) => "CORRUPT".to_string(),
            None => "manifest ok (use --verify)".to_string(),
        };
        let _ = writeln!(
            o,
            "  {:<18} {:>6} {:>10} {:>7} {:>11}  {:<22} {:<20} {state}",
            c.name,
            c.epoch.map(|e| e.to_string()).unwrap_or("-".into()),
            human_bytes(c.bytes),
            c.age_seconds.map(human_age).unwrap_or("?".into()),
            c.job
                .as_ref()
                .map(|j| format!("{}.{}", j.id, j.restart_count))
                .unwrap_or("-".into()),
            if metrics.is_empty() {
                "-".into()
            } else {
                metrics
            },
            if roles.is_empty() { "-".into() } else { roles },
        );
    }
    if !r.run.allocations.is_empty() {
        let _ = writeln!(o, "\nAllocations ({}):", r.run.allocations.len());
        let _ = writeln!(
            o,
            "  {:>3} {:>12} {:<10} {:<20} {:<15} {:>10} {:>7}  {:<14} WHY",
            "#", "JOB.RESTART", "HOST", "STARTED", "ENDING", "SIG→CKPT", "REDONE", "DECISION"
        );
        for (i, a) in r.run.allocations.iter().enumerate() {
            let _ = writeln!(
                o,
                "  {:>3} {:>12} {:<10} {:<20} {:<15} {:>10} {:>7}  {:<14} {}",
                i + 1,
                format!("{}.{}", a.job_id.as_deref().unwrap_or("-"), a.restart_count),
                a.host
                    .as_deref()
                    .unwrap_or("?")
                    .chars()
                    .take(10)
                    .collect::<String>(),
                a.started_at
                    .as_deref()
                    .unwrap_or("?")
                    .chars()
                    .take(19)
                    .collect::<String>(),
                a.ending.as_deref().unwrap_or("(no word)"),
                a.signal_to_checkpoint_seconds
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or("-".into()),
                a.steps_redone,
                a.decision.as_deref().unwrap_or("-"),
                a.reason.as_deref().unwrap_or("")
            );
        }
    }
    if !r.temp_entries.is_empty() {
        let _ = writeln!(o, "\nTemp entries (in-progress or abandoned writes):");
        for t in &r.temp_entries {
            let _ = writeln!(o, "  {} ({})", t.name, human_bytes(t.bytes));
        }
    }
    if !r.journal.last.is_empty() {
        let _ = writeln!(o, "\nRecent events ({} in journal):", r.journal.events);
        for e in &r.journal.last {
            let ts = e["ts"].as_str().unwrap_or("?");
            let ev = e["event"].as_str().unwrap_or("?");
            let mut rest: Vec<String> = e
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| *k != "ts" && *k != "event")
                .map(|(k, v)| format!("{k}={}", compact(v)))
                .collect();
            rest.truncate(6);
            let _ = writeln!(o, "  {ts}  {ev:<22} {}", rest.join(" "));
        }
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(o, "\nWarnings:");
        for w in &r.warnings {
            let _ = writeln!(o, "  - {w}");
        }
    }
    o
}

fn compact(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.len() > 60 {
        format!("{}…", &s[..s.floor_char_boundary(57)])
    } else {
        s
    }
}
