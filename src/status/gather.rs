//! Gathering: reads a run directory once into a [`StatusReport`], one section at a time. The job
//! chain comes from the same fold of the journal the requeue policy uses
//! ([`history::fold`](fn@history::fold)), converted here into the report's types.
//!
//! Read-only: it never takes the lock, removes temp entries or moves the pointer. It verifies the
//! checkpoint a resume would use (and, with `verify_all`, every checkpoint).

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::storage::error::join_faults;
use crate::storage::fsutil::tree_size;
use crate::storage::journal;
use crate::storage::lock;
use crate::storage::manifest::Manifest;
use crate::storage::metrics;
use crate::storage::pointer::Pointer;
use crate::storage::retention::{Candidate, Mode, RetentionPolicy, Role};
use crate::storage::run_dir::{Resolution, RunDir};
use crate::storage::verify;
use crate::supervision::events::Stamped;
use crate::supervision::history::{self, Account, Allocation, Chain, Goodput, Interruption};
use crate::supervision::{protocol, ranks};

const JOURNAL_TAIL: usize = 10;

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
    report.warnings = warnings::all(&report, &res);
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
                (state, Some(n.clone()), Some(join_faults(faults)))
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

/// The job chain of the journal's one fold ([`history::fold`](fn@history::fold)), and where it
/// stands.
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

impl AllocationStatus {
    fn of(a: &Allocation, interruption: Option<Interruption>) -> AllocationStatus {
        let x: Account = a.account(interruption);
        AllocationStatus {
            allocation: a.clone(),
            interruption,
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

/// The save timing facts of the run: the newest commit's interval, the newest allocation's
/// time-limit watch (both from the journal's one fold).
pub(super) fn save_timing(chain: &Chain) -> SaveTimingStatus {
    SaveTimingStatus {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn timing(v: Vec<Value>) -> SaveTimingStatus {
        let events: Vec<Stamped> = v.into_iter().map(Stamped::from_value).collect();
        save_timing(&history::fold(&events))
    }

    #[test]
    fn an_allocation_serializes_as_the_schema_says() {
        let a = Allocation {
            started_at: Some(std::time::UNIX_EPOCH),
            failed_ranks: vec![(1, "exit 3".into())],
            incomplete: vec![history::Incomplete {
                step: Some(4),
                missing: vec![1],
                requested: vec![0],
            }],
            ..Allocation::default()
        };
        let v = serde_json::to_value(AllocationStatus::of(&a, None)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut schema = [
            "job_id",
            "restart_count",
            "host",
            "started_at",
            "ended_at",
            "ending",
            "decision",
            "reason",
            "action",
            "exit_code",
            "resume_step",
            "new_checkpoints",
            "signal",
            "signal_to_checkpoint_seconds",
            "steps_redone",
            "refused_requests",
            "world_size",
            "incomplete_commits",
            "failed_ranks",
            "interruption",
            "reached_step",
            "steps_lost",
            "seconds",
        ];
        schema.sort_unstable();
        assert_eq!(keys, schema);
        assert_eq!(v["started_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["failed_ranks"], json!([{"rank": 1, "how": "exit 3"}]));
        assert_eq!(
            v["incomplete_commits"],
            json!([{"step": 4, "missing_ranks": [1], "requested_ranks": [0]}])
        );
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
