//! `hpc-ckpt status`: what happened to a run and what is safe on disk, for a person (text) or a
//! program (`--json`, schema `hpc-ckpt-status/1`, documented in the README).
//!
//! Read-only: it never takes the lock, removes temp entries or moves the pointer. It verifies the
//! checkpoint a resume would use (and, with `--verify`, every checkpoint). The job chain comes
//! from the same fold of the journal the requeue policy uses ([`history::fold`]). [`inspect`]
//! gathers one section at a time; [`render_text`] prints one section at a time.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::storage::fsutil::tree_size;
use crate::storage::journal;
use crate::storage::lock::{self, Holder};
use crate::storage::manifest::Manifest;
use crate::storage::metrics;
use crate::storage::pointer::Pointer;
use crate::storage::retention::{Candidate, Mode, RetentionPolicy, Role};
use crate::storage::run_dir::{Resolution, RunDir};
use crate::storage::verify;
use crate::supervision::events::Stamped;
use crate::supervision::history::{
    self, Account, Allocation, Chain, Goodput, Interruption, TimeLimitWatch,
};
use crate::supervision::{protocol, ranks};

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
    /// The best checkpoint by `keep_best`'s metric: the step whose weights produced it.
    pub best: Option<BestStatus>,
    /// Staged files that were never committed, kept aside, with the command that imports them.
    pub kept: Vec<KeptStatus>,
    pub temp_entries: Vec<TempEntry>,
    pub disk: Disk,
    /// The writer holding `run.lock` now, if any.
    pub writer: Option<Holder>,
    pub journal: JournalSummary,
    /// The job chain, from the journal.
    pub run: RunChain,
    /// `metrics.jsonl`: what the training recorded.
    pub metrics: MetricsSummary,
    /// How saves are timed: the interval chosen last (`interval: auto`) and the time-limit watch.
    pub saves: SaveTiming,
    pub warnings: Vec<String>,
}

/// How saves are timed, from the journal.
#[derive(Debug, Default, Serialize)]
pub struct SaveTiming {
    /// The newest commit that journaled its cadence (`checkpoint.interval: auto`).
    pub interval: Option<IntervalStatus>,
    /// The newest allocation's time-limit watch (a Slurm job with a time limit).
    pub time_limit_watch: Option<TimeLimitWatch>,
}

/// The save interval at one commit: recommended, actual, and why.
#[derive(Debug, Serialize)]
pub struct IntervalStatus {
    pub step: u64,
    pub recommended_seconds: f64,
    pub actual_seconds: f64,
    pub reason: String,
}

/// The save timing facts of the run: the newest commit's interval, the newest allocation's
/// time-limit watch (both from the journal's one fold).
fn save_timing(chain: &Chain) -> SaveTiming {
    SaveTiming {
        interval: chain
            .allocations
            .iter()
            .rev()
            .find_map(|a| a.cadence.as_ref())
            .map(|(step, c)| IntervalStatus {
                step: *step,
                recommended_seconds: c.recommended_seconds,
                actual_seconds: c.actual_seconds,
                reason: c.reason.clone(),
            }),
        time_limit_watch: chain.allocations.last().and_then(|a| a.time_limit_watch),
    }
}

/// What `metrics.jsonl` holds.
#[derive(Debug, Serialize)]
pub struct MetricsSummary {
    pub records: usize,
    /// Lines that do not parse (a torn line from a kill mid-write, garbage): skipped.
    pub unreadable_lines: usize,
    pub last_step: Option<u64>,
    pub last_loss: Option<f64>,
    /// The loss by step as Unicode block characters (null: no loss recorded).
    pub loss_sparkline: Option<String>,
}

/// Where the allocations' time went: the share that became preserved progress, and the rest
/// by cause (Google's ml-goodput-measurement breakdown). Seconds.
#[derive(Debug, Serialize)]
pub struct GoodputStatus {
    /// `productive_seconds / allocation_seconds`; null before any allocation time.
    pub goodput: Option<f64>,
    /// Allocation wall time, summed.
    pub allocation_seconds: f64,
    /// Allocation time and the waits between allocations.
    pub elapsed_seconds: f64,
    /// Training that was kept (with its eval, logging and exit).
    pub productive_seconds: f64,
    pub badput_seconds: Badput,
    /// Steps trained and then redone by a later allocation.
    pub lost_steps: u64,
    /// Interruptions: announced (a stop signal, final commit made), unannounced (killed, node
    /// lost, crash, no final commit).
    pub interruptions: Interruptions,
}

#[derive(Debug, Serialize)]
pub struct Badput {
    /// From each allocation's start until training ran: start-up, model build, restore.
    pub startup_restore: f64,
    /// Training stood still for saves.
    pub save_stall: f64,
    /// Work redone: lost steps × step time (time since the last commit where steps are unknown).
    pub lost_work: f64,
    /// Between one allocation's end and the next one's start (queueing, requeue).
    pub wait: f64,
}

#[derive(Debug, Serialize)]
pub struct Interruptions {
    pub announced: u32,
    pub unannounced: u32,
}

impl GoodputStatus {
    fn of(g: &Goodput) -> GoodputStatus {
        GoodputStatus {
            goodput: g.fraction(),
            allocation_seconds: g.total.wall,
            elapsed_seconds: g.elapsed(),
            productive_seconds: g.total.productive,
            badput_seconds: Badput {
                startup_restore: g.total.startup,
                save_stall: g.total.save_stall,
                lost_work: g.total.lost,
                wait: g.wait,
            },
            lost_steps: g.lost_steps,
            interruptions: Interruptions {
                announced: g.announced,
                unannounced: g.unannounced,
            },
        }
    }
}

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Never ran.
    Fresh,
    /// A writer holds the lock.
    Running,
    /// Training is complete.
    Done,
    /// Requeued, waiting for the next allocation.
    Pending,
    /// Stopped by policy (see the reason).
    Stopped,
    /// The last allocation ended without a word: killed, node lost.
    Interrupted,
}

#[derive(Debug, Serialize)]
pub struct RunChain {
    pub state: RunState,
    pub reason: Option<String>,
    pub allocations: Vec<AllocationStatus>,
    pub goodput: GoodputStatus,
}

#[derive(Debug, Serialize)]
pub struct AllocationStatus {
    pub job_id: Option<String>,
    pub restart_count: u32,
    pub host: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// `completed`, `warning_signal`, `terminated`, `failed`, or null when it never said.
    pub ending: Option<String>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub action: Option<String>,
    pub exit_code: Option<i32>,
    pub resume_step: Option<u64>,
    pub new_checkpoints: u32,
    /// The stop signal received, and seconds from it to the next committed checkpoint.
    pub signal: Option<String>,
    pub signal_to_checkpoint_seconds: Option<f64>,
    /// Steps committed before this allocation but redone by it (it resumed from an older one).
    pub steps_redone: u64,
    /// Commit requests it refused (e.g. a step older than the newest checkpoint).
    pub refused_requests: Vec<String>,
    /// Ranks of its program (null: one).
    pub world_size: Option<u32>,
    /// Multi-rank commits that did not happen because some ranks never asked: which.
    pub incomplete_commits: Vec<IncompleteStatus>,
    /// Ranks that failed (named when the supervisor started the ranks itself).
    pub failed_ranks: Vec<RankFailure>,
    /// `announced` (a stop signal, final commit made), `unannounced` (killed, node lost, crash,
    /// no final commit), or null (completed, or still running).
    pub interruption: Option<Interruption>,
    /// The newest step it is known to have trained (its commits; after a kill, what the next
    /// allocation found in metrics.jsonl).
    pub reached_step: Option<u64>,
    /// Steps it trained that the next allocation redid (known once the next one started).
    pub steps_lost: u64,
    /// Where its wall time went, seconds.
    pub seconds: AllocationSeconds,
}

#[derive(Debug, Serialize)]
pub struct AllocationSeconds {
    pub wall: f64,
    pub startup_restore: f64,
    pub save_stall: f64,
    pub lost_work: f64,
    pub productive: f64,
}

/// A multi-rank commit some ranks asked for and others never did (nothing was committed).
#[derive(Debug, Serialize)]
pub struct IncompleteStatus {
    pub step: Option<u64>,
    pub missing_ranks: Vec<u32>,
    pub requested_ranks: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct RankFailure {
    pub rank: u32,
    pub how: String,
}

impl AllocationStatus {
    fn of(a: &Allocation, interruption: Option<Interruption>) -> AllocationStatus {
        let x: Account = a.account(interruption);
        let time = |t: Option<std::time::SystemTime>| {
            t.map(|t| humantime::format_rfc3339_millis(t).to_string())
        };
        AllocationStatus {
            job_id: a.job_id.clone(),
            restart_count: a.restart_count,
            host: a.host.clone(),
            started_at: time(a.started_at),
            ended_at: time(a.ended_at),
            ending: a.ending.clone(),
            decision: a.decision.clone(),
            reason: a.reason.clone(),
            action: a.action.clone(),
            exit_code: a.exit_code,
            resume_step: a.resume_step,
            new_checkpoints: a.new_checkpoints,
            signal: a.signal.clone(),
            signal_to_checkpoint_seconds: a.signal_to_checkpoint_seconds,
            steps_redone: a.steps_redone,
            refused_requests: a.refused_requests.clone(),
            world_size: a.world_size,
            incomplete_commits: a
                .incomplete
                .iter()
                .map(|i| IncompleteStatus {
                    step: i.step,
                    missing_ranks: i.missing.clone(),
                    requested_ranks: i.requested.clone(),
                })
                .collect(),
            failed_ranks: a
                .failed_ranks
                .iter()
                .map(|(rank, how)| RankFailure {
                    rank: *rank,
                    how: how.clone(),
                })
                .collect(),
            interruption,
            reached_step: a.reached_step,
            steps_lost: a.steps_lost,
            seconds: AllocationSeconds {
                wall: x.wall,
                startup_restore: x.startup,
                save_stall: x.save_stall,
                lost_work: x.lost,
                productive: x.productive,
            },
        }
    }
}

/// The job chain of the journal's one fold ([`history::fold`]), and where it stands.
pub fn chain_of(chain: &Chain, writer_running: bool) -> RunChain {
    let (state, reason) = match chain.allocations.last() {
        _ if writer_running => (RunState::Running, None),
        None => (RunState::Fresh, None),
        Some(_) if chain.done => (RunState::Done, Some("training complete".to_string())),
        Some(a) => match a.decision.as_deref() {
            Some("requeue") | Some("slurm_requeues") => (
                RunState::Pending,
                Some(format!(
                    "{} ({})",
                    a.reason.clone().unwrap_or_default(),
                    a.action.clone().unwrap_or_default()
                )),
            ),
            Some("stop") => (RunState::Stopped, a.reason.clone()),
            Some("done") => (RunState::Done, Some("training complete".to_string())),
            _ => (
                RunState::Interrupted,
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
        allocations: chain
            .allocations
            .iter()
            .enumerate()
            .map(|(i, a)| AllocationStatus::of(a, chain.interruption_of(i, writer_running)))
            .collect(),
        goodput: GoodputStatus::of(&chain.goodput(writer_running)),
    }
}

/// What the pointer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PointerState {
    Ok,
    Absent,
    /// Not a checkpoint name (garbage).
    Invalid,
    MissingTarget,
    CorruptTarget,
}

#[derive(Debug, Serialize)]
pub struct PointerStatus {
    pub state: PointerState,
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
    /// Ranks that wrote it (null: one).
    pub world_size: Option<u32>,
    /// A multi-rank checkpoint's bytes by rank (index = rank); empty for one rank.
    pub rank_bytes: Vec<u64>,
}

/// The best checkpoint by the monitored metric.
#[derive(Debug, Serialize)]
pub struct BestStatus {
    pub metric: String,
    pub mode: Mode,
    pub value: f64,
    /// The checkpoint whose weights produced `value` (its manifest records it at its step).
    pub checkpoint: String,
    pub step: u64,
}

/// Staged files kept aside.
#[derive(Debug, Serialize)]
pub struct KeptStatus {
    /// Relative to the run dir.
    pub dir: String,
    pub files: Vec<String>,
    pub step: Option<u64>,
    pub reason: String,
    /// The command that commits them (with `STEP` to fill in when the step is unknown).
    pub commit_command: String,
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
                PointerState::Invalid | PointerState::CorruptTarget | PointerState::MissingTarget
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
    let pointer = pointer_status(&dir, &res);
    let resume_from = res.chosen.as_ref().map(|(l, _)| l.name.clone());
    let (manifests, faults) = read_checkpoints(&dir, &res, verify_all);
    let policy = policy_of(&dir, &manifests);
    let checkpoints = checkpoint_rows(&dir, &res, &manifests, &faults, &policy, verify_all);
    let best = best_of(&checkpoints, &policy);
    let writer = lock::probe(root);
    let temp_entries = temp_entries(&dir);
    let disk = Disk {
        checkpoints_bytes: tree_size(&dir.checkpoints_dir()),
        free_bytes: fs2::available_space(root).ok(),
        total_bytes: fs2::total_space(root).ok(),
    };
    let (raw, unreadable) = journal::read_all(root);
    let stamped: Vec<Stamped> = raw.iter().cloned().map(Stamped::from_value).collect();
    let chain = history::fold(&stamped);
    let run = chain_of(&chain, writer.is_some());
    let kept = kept_of(root, &stamped);
    let metrics = metrics_of(root);
    let saves = save_timing(&chain);
    let journal = JournalSummary {
        events: raw.len(),
        unreadable_lines: unreadable,
        last: raw[raw.len().saturating_sub(JOURNAL_TAIL)..].to_vec(),
    };
    let mut report = StatusReport {
        schema: SCHEMA,
        run_dir: root.display().to_string(),
        fell_back: res.fell_back() && resume_from.is_some(),
        pointer,
        resume_from,
        checkpoints,
        best,
        kept,
        temp_entries,
        disk,
        writer,
        journal,
        run,
        metrics,
        saves,
        warnings: Vec::new(),
    };
    report.warnings = warnings(&report, &res);
    Ok(report)
}

/// The pointer's state: ok, absent, garbage, or naming a missing or corrupt checkpoint.
fn pointer_status(dir: &RunDir, res: &Resolution) -> PointerStatus {
    let (state, names, detail) = match &res.pointer {
        Ok(Pointer::Absent) => (PointerState::Absent, None, None),
        Err(f) => (PointerState::Invalid, None, Some(f.to_string())),
        Ok(Pointer::Names(n)) => match res.refused.iter().find(|(name, _)| name == n) {
            None => (PointerState::Ok, Some(n.clone()), None),
            Some((_, faults)) => {
                let state = if dir.checkpoints_dir().join(n).exists() {
                    PointerState::CorruptTarget
                } else {
                    PointerState::MissingTarget
                };
                (state, Some(n.clone()), Some(join(faults)))
            }
        },
    };
    PointerStatus {
        state,
        names,
        detail,
    }
}

/// Each checkpoint's manifest (verified when asked or already verified), or its faults.
fn read_checkpoints(
    dir: &RunDir,
    res: &Resolution,
    verify_all: bool,
) -> (BTreeMap<String, Manifest>, BTreeMap<String, Vec<String>>) {
    let mut manifests = BTreeMap::new();
    let mut faults_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, f) in &res.refused {
        faults_of.insert(name.clone(), f.iter().map(|x| x.to_string()).collect());
    }
    for l in dir.list() {
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
    (manifests, faults_of)
}

/// The retention policy recorded by the newest readable manifest.
fn policy_of(dir: &RunDir, manifests: &BTreeMap<String, Manifest>) -> RetentionPolicy {
    dir.list()
        .iter()
        .rev()
        .find_map(|l| manifests.get(&l.name).and_then(|m| m.retention.clone()))
        .unwrap_or_default()
}

/// One row per checkpoint, newest first, with why retention keeps it.
fn checkpoint_rows(
    dir: &RunDir,
    res: &Resolution,
    manifests: &BTreeMap<String, Manifest>,
    faults_of: &BTreeMap<String, Vec<String>>,
    policy: &RetentionPolicy,
    verify_all: bool,
) -> Vec<CheckpointStatus> {
    let listed = dir.list();
    let target = match &res.pointer {
        Ok(Pointer::Names(n)) => Some(n.clone()),
        _ => None,
    };
    let resume_from = res.chosen.as_ref().map(|(l, _)| l.name.clone());
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
    listed
        .iter()
        .rev()
        .map(|l| {
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
            CheckpointStatus {
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
                world_size: m.map(|m| protocol::world_of(m).world).filter(|w| *w > 1),
                rank_bytes: m.map(rank_bytes).unwrap_or_default(),
            }
        })
        .collect()
}

/// A multi-rank checkpoint's bytes by rank, from its file names ([`ranks::rank_of_file`]).
fn rank_bytes(m: &Manifest) -> Vec<u64> {
    let world = protocol::world_of(m).world;
    if world <= 1 {
        return Vec::new();
    }
    let mut by_rank = vec![0u64; world as usize];
    for f in &m.files {
        if let Some(r) = ranks::rank_of_file(&f.name) {
            if let Some(b) = by_rank.get_mut(r as usize) {
                *b += f.size;
            }
        }
    }
    by_rank
}

/// The best checkpoint by `keep_best`'s metric, among those that record it.
fn best_of(rows: &[CheckpointStatus], policy: &RetentionPolicy) -> Option<BestStatus> {
    let b = policy.keep_best.as_ref()?;
    let better = |x: f64, y: f64| match b.mode {
        Mode::Min => x < y,
        Mode::Max => x > y,
    };
    rows.iter()
        .filter(|c| c.faults.is_empty())
        .filter_map(|c| c.metrics.get(&b.monitor).map(|v| (c, *v)))
        .fold(
            None,
            |acc: Option<(&CheckpointStatus, f64)>, (c, v)| match acc {
                Some((_, best)) if !better(v, best) => acc,
                _ => Some((c, v)),
            },
        )
        .map(|(c, v)| BestStatus {
            metric: b.monitor.clone(),
            mode: b.mode,
            value: v,
            checkpoint: c.name.clone(),
            step: c.step,
        })
}

/// Characters of the loss sparkline.
const SPARKLINE_WIDTH: usize = 60;

fn metrics_of(root: &Path) -> MetricsSummary {
    let (records, unreadable_lines) = metrics::read(root);
    let last = records.last();
    MetricsSummary {
        records: records.len(),
        unreadable_lines,
        last_step: last.map(|r| r.step),
        last_loss: records
            .iter()
            .rev()
            .find_map(|r| r.metrics.get("loss").copied()),
        loss_sparkline: crate::plot::sparkline(&records, SPARKLINE_WIDTH),
    }
}

/// Kept staged files that are still there, with the command that would commit them.
fn kept_of(root: &Path, events: &[Stamped]) -> Vec<KeptStatus> {
    let chain = history::fold(events);
    chain
        .allocations
        .iter()
        .flat_map(|a| a.kept.iter())
        .filter(|k| root.join(&k.dir).is_dir())
        .map(|k| KeptStatus {
            commit_command: format!(
                "hpc-ckpt commit --run-dir {} --step {} {}",
                shell_word(&root.display().to_string()),
                k.step.map_or("STEP".to_string(), |s| s.to_string()),
                shell_word(&root.join(&k.dir).display().to_string())
            ),
            dir: k.dir.clone(),
            files: k.files.clone(),
            step: k.step,
            reason: k.reason.clone(),
        })
        .collect()
}

/// A word for a shell command line: as is when plain, else single-quoted.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn temp_entries(dir: &RunDir) -> Vec<TempEntry> {
    dir.temp_entries()
        .into_iter()
        .map(|p| TempEntry {
            name: p
                .strip_prefix(dir.root())
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned(),
            bytes: if p.is_dir() {
                tree_size(&p)
            } else {
                p.metadata().map(|m| m.len()).unwrap_or(0)
            },
        })
        .collect()
}

/// Everything a person should act on, one line each: about the checkpoints, the files staged
/// and requests refused, and the disk and the logs.
fn warnings(r: &StatusReport, res: &Resolution) -> Vec<String> {
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

/// Render for a person, one section at a time.
pub fn render_text(r: &StatusReport) -> String {
    let mut o = String::new();
    render_summary(&mut o, r);
    render_checkpoints(&mut o, r);
    render_allocations(&mut o, r);
    render_goodput(&mut o, r);
    render_saves(&mut o, r);
    render_kept(&mut o, r);
    render_temp(&mut o, r);
    render_events(&mut o, r);
    if !r.warnings.is_empty() {
        o.push_str("\nWarnings:\n");
        for w in &r.warnings {
            o.push_str(&format!("  - {w}\n"));
        }
    }
    o
}

fn render_summary(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    let _ = writeln!(o, "Run dir:      {}", r.run_dir);
    let state = serde_json::to_value(r.run.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_uppercase))
        .unwrap_or_default();
    let why = r.run.reason.as_ref().map(|x| format!(" — {x}"));
    let _ = writeln!(o, "Run:          {state}{}", why.unwrap_or_default());
    let resume = match (&r.resume_from, r.fell_back) {
        (Some(n), false) => format!("{n} (verified)"),
        (Some(n), true) => format!("{n} (verified; FALLBACK — the pointer's target is unusable)"),
        (None, _) if r.checkpoints.is_empty() => "none — a resume starts fresh".into(),
        (None, _) => "NONE VERIFIES — see warnings".into(),
    };
    let _ = writeln!(o, "Resume from:  {resume}");
    let pointer = serde_json::to_value(r.pointer.state)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let names = r.pointer.names.as_ref().map(|n| format!(" ({n})"));
    let _ = writeln!(o, "Pointer:      {pointer}{}", names.unwrap_or_default());
    if let Some(b) = &r.best {
        let _ = writeln!(
            o,
            "Best:         {} = {} at {} (the weights of step {}; mode {})",
            b.metric,
            b.value,
            b.checkpoint,
            b.step,
            if b.mode == Mode::Min { "min" } else { "max" }
        );
    }
    let writer = match &r.writer {
        Some(h) => format!("running: {h}"),
        None => "none running".into(),
    };
    let _ = writeln!(o, "Writer:       {writer}");
    let _ = writeln!(
        o,
        "Disk:         checkpoints use {}; {} free of {}",
        human_bytes(r.disk.checkpoints_bytes),
        r.disk.free_bytes.map(human_bytes).unwrap_or("?".into()),
        r.disk.total_bytes.map(human_bytes).unwrap_or("?".into())
    );
}

fn render_checkpoints(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    let _ = writeln!(o, "\nCheckpoints ({}):", r.checkpoints.len());
    if r.checkpoints.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "  {:<18} {:>6} {:>10} {:>7} {:>11}  {:<22} {:<20} STATE",
        "NAME", "EPOCH", "SIZE", "AGE", "JOB.RESTART", "METRICS", "KEPT AS"
    );
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
            .filter_map(|r| serde_json::to_value(r).ok()?.as_str().map(String::from))
            .collect::<Vec<_>>()
            .join(",");
        let state = match c.verified {
            Some(true) => "verified",
            Some(false) => "CORRUPT",
            None => "manifest ok (use --verify)",
        };
        let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
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
            dash(metrics),
            dash(roles),
        );
        if let Some(w) = c.world_size {
            let per: Vec<String> = c
                .rank_bytes
                .iter()
                .enumerate()
                .map(|(r, b)| format!("rank {r} {}", human_bytes(*b)))
                .collect();
            let _ = writeln!(o, "    {w} ranks: {}", per.join(", "));
        }
    }
}

fn render_allocations(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if r.run.allocations.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nAllocations ({}):", r.run.allocations.len());
    let _ = writeln!(
        o,
        "  {:>3} {:>12} {:<10} {:>5} {:<20} {:<15} {:<12} {:>10} {:>7} {:>7}  {:<14} WHY",
        "#",
        "JOB.RESTART",
        "HOST",
        "RANKS",
        "STARTED",
        "ENDING",
        "INTERRUPTION",
        "SIG→CKPT",
        "REDONE",
        "LOST",
        "DECISION"
    );
    let cut = |s: Option<&str>, n: usize| s.unwrap_or("?").chars().take(n).collect::<String>();
    for (i, a) in r.run.allocations.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {:>3} {:>12} {:<10} {:>5} {:<20} {:<15} {:<12} {:>10} {:>7} {:>7}  {:<14} {}",
            i + 1,
            format!("{}.{}", a.job_id.as_deref().unwrap_or("-"), a.restart_count),
            cut(a.host.as_deref(), 10),
            a.world_size.unwrap_or(1),
            cut(a.started_at.as_deref(), 19),
            a.ending.as_deref().unwrap_or("(no word)"),
            match a.interruption {
                Some(Interruption::Announced) => "announced",
                Some(Interruption::Unannounced) => "UNANNOUNCED",
                None => "-",
            },
            a.signal_to_checkpoint_seconds
                .map(|s| format!("{s:.1}s"))
                .unwrap_or("-".into()),
            a.steps_redone,
            a.steps_lost,
            a.decision.as_deref().unwrap_or("-"),
            a.reason.as_deref().unwrap_or("")
        );
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        for f in &a.failed_ranks {
            let _ = writeln!(o, "      rank {} failed: {}", f.rank, f.how);
        }
        for i in &a.incomplete_commits {
            let _ = writeln!(
                o,
                "      NOT committed{}: rank(s) {} never asked (rank(s) {} did)",
                i.step.map(|s| format!(" (step {s})")).unwrap_or_default(),
                list(&i.missing_ranks),
                list(&i.requested_ranks)
            );
        }
    }
}

/// The goodput section: where the allocations' time went, and the loss sparkline.
fn render_goodput(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    let g = &r.run.goodput;
    if r.run.allocations.is_empty() {
        return;
    }
    let elapsed = g.elapsed_seconds;
    let pct = |x: f64| {
        if elapsed > 0.0 {
            format!("{:5.1}%", 100.0 * x / elapsed)
        } else {
            "    -".into()
        }
    };
    let _ = writeln!(
        o,
        "\nGoodput:      {} of allocation time ({:.1}s of {:.1}s became kept progress); \
         interruptions: {} announced, {} unannounced",
        g.goodput
            .map(|x| format!("{:.1}%", 100.0 * x))
            .unwrap_or("-".into()),
        g.productive_seconds,
        g.allocation_seconds,
        g.interruptions.announced,
        g.interruptions.unannounced
    );
    let _ = writeln!(
        o,
        "  {elapsed:.1}s elapsed (allocations and the waits between them):"
    );
    let b = &g.badput_seconds;
    let lost = format!("{} step(s) redone", g.lost_steps);
    for (name, secs, note) in [
        ("productive", g.productive_seconds, ""),
        ("start-up/restore", b.startup_restore, ""),
        ("save stall", b.save_stall, ""),
        ("lost work", b.lost_work, lost.as_str()),
        ("wait", b.wait, "between allocations"),
    ] {
        let line = format!("  {name:<17} {secs:>9.1}s {}  {note}", pct(secs));
        let _ = writeln!(o, "{}", line.trim_end());
    }
    if let Some(line) = &r.metrics.loss_sparkline {
        let _ = writeln!(
            o,
            "  loss {line} {}",
            r.metrics
                .last_loss
                .zip(r.metrics.last_step)
                .map(|(l, s)| format!("{l:.4} at step {s}"))
                .unwrap_or_default()
        );
    }
}

/// How saves are timed: the interval (auto) and the time-limit watch, each with why.
fn render_saves(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if let Some(i) = &r.saves.interval {
        let _ = writeln!(
            o,
            "Save interval: {:.0}s recommended, {:.0}s actual (at step {}) — {}",
            i.recommended_seconds, i.actual_seconds, i.step, i.reason
        );
    }
    if let Some(w) = &r.saves.time_limit_watch {
        let what = if w.fired {
            "it stopped the program for a last save (no warning signal came)"
        } else {
            "not needed so far"
        };
        let _ = writeln!(
            o,
            "Time limit:   {}s left at the allocation's start; the time-limit watch saves \
             {}s before it (after {}s): {what}",
            w.seconds_left, w.lead_seconds, w.save_in_seconds
        );
    }
}

fn render_kept(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if r.kept.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nKept staged files (NOT committed):");
    for k in &r.kept {
        let _ = writeln!(o, "  {}: {} — {}", k.dir, k.files.join(", "), k.reason);
        let _ = writeln!(o, "    commit them with: {}", k.commit_command);
    }
}

fn render_temp(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if r.temp_entries.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nTemp entries (in-progress or abandoned writes):");
    for t in &r.temp_entries {
        let _ = writeln!(o, "  {} ({})", t.name, human_bytes(t.bytes));
    }
}

fn render_events(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if r.journal.last.is_empty() {
        return;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn timing(v: Vec<Value>) -> SaveTiming {
        let events: Vec<Stamped> = v.into_iter().map(Stamped::from_value).collect();
        save_timing(&history::fold(&events))
    }

    #[test]
    fn save_timing_takes_the_newest_cadence_and_the_newest_allocations_watch() {
        let commit = |step: u64, rec: f64| {
            json!({"event": "checkpoint_committed", "checkpoint": format!("step-{step:012}"),
                   "step": step, "bytes": 1, "seconds": 0.1,
                   "cadence": {"recommended_seconds": rec, "actual_seconds": rec + 1.0,
                               "reason": "Daly"}})
        };
        let start = json!({"event": "allocation_start", "restart_count": 0});
        let watch = json!({"event": "time_limit_watch", "seconds_left": 600,
                           "save_in_seconds": 480, "lead_seconds": 120});
        let near = json!({"event": "time_limit_near", "lead_seconds": 120});
        let t = timing(vec![
            start.clone(),
            watch.clone(),
            commit(10, 5.0),
            near,
            commit(20, 7.0),
        ]);
        let i = t.interval.unwrap();
        assert_eq!(
            (i.step, i.recommended_seconds, i.actual_seconds),
            (20, 7.0, 8.0)
        );
        let w = t.time_limit_watch.unwrap();
        assert!(w.fired);
        assert_eq!(
            (w.seconds_left, w.save_in_seconds, w.lead_seconds),
            (600, 480, 120)
        );
        // A new allocation without a watch (no time limit): nothing to show for it.
        let t = timing(vec![start.clone(), watch.clone(), start.clone()]);
        assert!(t.time_limit_watch.is_none());
        let t = timing(vec![start, watch]);
        assert!(!t.time_limit_watch.unwrap().fired);
    }
}
