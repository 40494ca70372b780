//! `hpc-ckpt wrap -- CMD`: run a program under the supervisor.
//!
//! The child gets `HPC_CKPT_RUN_DIR`, `HPC_CKPT_RESUME_FROM` (unset on a fresh start),
//! `HPC_CKPT_STAGING`, `HPC_CKPT_COMMIT_REQUEST` and `HPC_CKPT_SIGNAL` (README, "Child
//! protocol"). The child stages files and writes a request; the supervisor commits them with the
//! store's full protocol, answers in `<request>.result`, empties the staging dir and removes the
//! request (the acknowledgement). On a stop signal it forwards the configured signal to the
//! child's process group, waits the grace period, then TERM, then KILL; commits what the child
//! staged; decides (see [`super::policy`]) whether to requeue; and journals every step.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde::Deserialize;
use serde_json::json;

use super::child::ChildGroup;
use super::policy::{self, Decision, Ending, History};
use super::signals::{self, Sig};
use super::workload::{FailureKind, InProcess, InProcessEnd, Workload};
use crate::config::{JobConfig, OnSaveError};
use crate::exit_code;
use crate::slurm::{self, JobEnv, Requeued};
use crate::storage::fsutil::replace_file_durable;
use crate::storage::journal;
use crate::storage::run_dir::holder;
use crate::storage::{CommitMeta, Snapshot, Store};

pub const STAGING_DIR: &str = "staging";
pub const REQUEST_FILE: &str = "staging.request";
pub const CONFIG_FILE: &str = "config.yaml";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Seconds between TERM and KILL when the grace period is over.
const KILL_AFTER: Duration = Duration::from_secs(10);
/// Bare TERM (preemption, time limit, scancel) leaves only Slurm's KillWait: cap the grace.
const TERM_GRACE_CAP: Duration = Duration::from_secs(20);
const TICK: Duration = Duration::from_millis(50);

/// What the child writes to ask for a commit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    step: u64,
    #[serde(default)]
    epoch: Option<u64>,
    #[serde(default)]
    metrics: BTreeMap<String, f64>,
    /// The child says this is its final checkpoint: training is complete.
    #[serde(default)]
    done: bool,
}

pub struct WrapArgs {
    pub config: JobConfig,
    pub run_dir: PathBuf,
    pub workload: Workload,
}

struct Stop {
    signal: Sig,
    warned: bool,
    at: Instant,
    term_sent: bool,
    kill_sent: bool,
    grace: Duration,
}

/// How the work of this allocation went, whoever did it.
struct Ran {
    stop: Option<(Sig, bool)>,
    progress: Progress,
    /// How the program ended, in words; None when it ran to completion.
    failure: Option<String>,
    completed: bool,
    save_failed_stop: bool,
}

/// What both ways of running share.
struct Ctx<'a> {
    cfg: &'a JobConfig,
    run_dir: PathBuf,
    job: Option<JobEnv>,
    signals: crossbeam_channel::Receiver<Sig>,
    warn_sig: Sig,
    child_sig: Sig,
}

/// Run the wrapper; returns the process exit code (see [`crate::exit_code`]).
pub fn run(mut args: WrapArgs) -> Result<i32> {
    let cfg = &args.config;
    let command = args.workload.command();
    if command.is_empty() {
        bail!("no command to run: give one after `--`, or `command:` in the config");
    }
    // Install handlers first: a warning that arrives during start-up must not kill us.
    let signals = signals::install().context("install signal handlers")?;
    let job = JobEnv::from_env();
    let run_dir = std::path::absolute(&args.run_dir)
        .with_context(|| format!("run dir {}", args.run_dir.display()))?;
    let mut store = Store::open(
        &run_dir,
        &holder(job.as_ref().map(|j| j.job_id.clone())),
        cfg.checkpoint.retention(),
    )
    .with_context(|| format!("cannot open run dir {}", run_dir.display()))?;
    freeze_config(&mut store, &run_dir, cfg)?;

    let (events, _) = journal::read_all(&run_dir);
    let history = history_of(&events);
    let restart_count = job
        .as_ref()
        .map(|j| j.restart_count)
        .unwrap_or(0)
        .max(history.previous_allocations);
    let host = crate::storage::run_dir::hostname();
    store.journal().record(
        "allocation_start",
        json!({"job_id": job.as_ref().map(|j| &j.job_id), "restart_count": restart_count, "host": host,
               "pid": std::process::id(), "command": command}),
    )?;
    tracing::info!(run_dir = %run_dir.display(), job = ?job.as_ref().map(|j| &j.job_id), restart_count, "allocation started");

    let ctx = Ctx {
        cfg,
        run_dir: run_dir.clone(),
        job: job.clone(),
        signals,
        warn_sig: Sig::from_name(&cfg.signals.warn).expect("validated"),
        child_sig: Sig::from_name(&cfg.signals.child).expect("validated"),
    };
    let ran = match &mut args.workload {
        Workload::InProcess(trainer) => run_in_process(&ctx, &mut store, trainer.as_mut()),
        Workload::Program(command) => run_child(&ctx, &mut store, command),
    };
    let ran = match ran {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("{e:#}");
            store.journal().record(
                "allocation_end",
                json!({"job_id": job.as_ref().map(|j| &j.job_id), "restart_count": restart_count,
                       "ending": "failed", "child": msg, "new_checkpoints": 0, "decision": "stop",
                       "reason": msg, "action": "not requeued", "exit_code": exit_code::FAILURE}),
            )?;
            return Err(e);
        }
    };

    let ending = if ran.completed {
        Ending::Completed
    } else if let Some((sig, warned)) = ran.stop {
        Ending::Stopped {
            signal: sig.name().to_string(),
            warned,
        }
    } else {
        Ending::Failed {
            how: ran
                .failure
                .clone()
                .unwrap_or_else(|| "stopped early".into()),
        }
    };
    let slurm_state = match (&ending, &job) {
        (Ending::Stopped { warned: false, .. }, Some(j)) => {
            slurm::show_job(&j.job_id).map(|s| s.state)
        }
        _ => None,
    };
    let mut decision = policy::decide(
        &ending,
        ran.progress.commits,
        &history,
        restart_count,
        slurm_state.as_deref(),
        &cfg.requeue,
    );
    if ran.save_failed_stop && !matches!(decision, Decision::Done) {
        decision = Decision::Stop {
            reason: "a checkpoint save failed and on_save_error is stop".into(),
            crash_loop: false,
        };
    }
    let (code, action) = act(&decision, job.as_ref());
    let reason = match &decision {
        Decision::Done => "training complete".to_string(),
        Decision::Requeue { reason }
        | Decision::SlurmRequeues { reason }
        | Decision::Stop { reason, .. } => reason.clone(),
    };
    match code {
        exit_code::SUCCESS | exit_code::REQUEUED => {
            tracing::info!(%reason, %action, "allocation ends")
        }
        _ => tracing::warn!(%reason, %action, "allocation ends"),
    }
    if decision == Decision::Done {
        store
            .journal()
            .record("run_done", json!({"new_checkpoints": ran.progress.commits}))?;
    }
    store.journal().record(
        "allocation_end",
        json!({"job_id": job.as_ref().map(|j| &j.job_id), "restart_count": restart_count,
               "ending": ending_name(&ending), "child": ran.failure.as_deref().unwrap_or("exit code 0"),
               "new_checkpoints": ran.progress.commits, "decision": decision_name(&decision),
               "reason": reason, "action": action, "exit_code": code}),
    )?;
    Ok(code)
}

/// Journal and log the first stop signal.
fn note_stop(
    ctx: &Ctx,
    store: &mut Store,
    sig: Sig,
    warned: bool,
    fwd: &str,
    grace: Duration,
) -> Result<()> {
    tracing::warn!(
        signal = sig.name(),
        forwarded = fwd,
        grace_s = grace.as_secs(),
        "stop signal: checkpoint and exit"
    );
    budget_check(&ctx.run_dir, ctx.cfg, warned, grace);
    store.journal().record(
        "signal_received",
        json!({"signal": sig.name(), "warning": warned, "forwarded": fwd, "grace_seconds": grace.as_secs()}),
    )?;
    Ok(())
}

/// The built-in trainer in this process: signals become its `stop` callback.
fn run_in_process(ctx: &Ctx, store: &mut Store, trainer: &mut dyn InProcess) -> Result<Ran> {
    store.journal().record(
        "child_started",
        json!({"pid": std::process::id(), "in_process": true}),
    )?;
    let first: std::cell::Cell<Option<(Sig, Instant)>> = std::cell::Cell::new(None);
    let stop = || {
        if first.get().is_none() {
            if let Ok(sig) = ctx.signals.try_recv() {
                first.set(Some((sig, Instant::now())));
            }
        }
        first.get().is_some()
    };
    let started = Instant::now();
    let commits_before = commits_so_far(&ctx.run_dir);
    let result = trainer.run(store, &stop);
    let commits = commits_so_far(&ctx.run_dir) - commits_before;
    let stop = first.get();
    if let Some((sig, at)) = stop {
        let warned = sig == ctx.warn_sig;
        note_stop(
            ctx,
            store,
            sig,
            warned,
            "in-process",
            Duration::from_secs(ctx.cfg.signals.grace_seconds),
        )?;
        store.journal().record(
            "stop_completed",
            json!({"signal": sig.name(), "seconds_since_signal": at.elapsed().as_secs_f64()}),
        )?;
    }
    let save_failed_stop = matches!(&result, Err(f) if f.kind == FailureKind::SaveFailed);
    let (completed, failure) = match &result {
        Ok(end) => (*end == InProcessEnd::Completed, None),
        Err(e) => (false, Some(format!("the trainer failed: {e}"))),
    };
    if let Some(f) = &failure {
        tracing::error!(error = %f, "training failed");
    }
    store.journal().record(
        "child_exited",
        json!({"how": failure.as_deref().unwrap_or(if completed { "completed" } else { "stopped" }),
               "seconds": started.elapsed().as_secs_f64()}),
    )?;
    Ok(Ran {
        stop: stop.map(|(s, _)| (s, s == ctx.warn_sig)),
        progress: Progress {
            commits,
            done: completed,
        },
        failure,
        completed,
        save_failed_stop,
    })
}

/// Commits journaled so far (the in-process trainer commits through the store itself).
fn commits_so_far(run_dir: &Path) -> u32 {
    journal::read_all(run_dir)
        .0
        .iter()
        .filter(|e| e["event"] == "checkpoint_committed")
        .count() as u32
}

/// A program as a child: the child protocol, the stop sequence, commits of what it stages.
fn run_child(ctx: &Ctx, store: &mut Store, command: &[String]) -> Result<Ran> {
    let cfg = ctx.cfg;
    let (run_dir, job) = (&ctx.run_dir, ctx.job.as_ref());
    let resume = store.resume_point()?;
    let staging = run_dir.join(STAGING_DIR);
    let request = run_dir.join(REQUEST_FILE);
    reset_staging(&staging, &request)?;

    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("HPC_CKPT_RUN_DIR", run_dir)
        .env("HPC_CKPT_STAGING", &staging)
        .env("HPC_CKPT_COMMIT_REQUEST", &request)
        .env("HPC_CKPT_SIGNAL", ctx.child_sig.name())
        .env_remove("HPC_CKPT_RESUME_FROM");
    if let Some((l, _)) = &resume {
        cmd.env("HPC_CKPT_RESUME_FROM", &l.path);
        tracing::info!(checkpoint = %l.name, "resuming");
    } else {
        tracing::info!("fresh start: no checkpoint to resume from");
    }
    let resume_step = resume.as_ref().map(|(l, _)| l.step);
    let mut child = ChildGroup::spawn(cmd).with_context(|| format!("cannot start {command:?}"))?;
    store.journal().record(
        "child_started",
        json!({"pid": child.pid(), "resume_from": resume.as_ref().map(|(l, _)| &l.name), "resume_step": resume_step}),
    )?;

    let mut stop: Option<Stop> = None;
    let mut progress = Progress::default();
    let mut save_failed_stop = false;
    let exit = loop {
        if let Ok(sig) = ctx.signals.recv_timeout(TICK) {
            match &mut stop {
                None => {
                    let warned = sig == ctx.warn_sig;
                    let (fwd, grace) = if warned {
                        (
                            ctx.child_sig,
                            Duration::from_secs(cfg.signals.grace_seconds),
                        )
                    } else {
                        (
                            Sig::Term,
                            Duration::from_secs(cfg.signals.grace_seconds).min(TERM_GRACE_CAP),
                        )
                    };
                    note_stop(ctx, store, sig, warned, fwd.name(), grace)?;
                    child.signal(fwd.to_nix());
                    stop = Some(Stop {
                        signal: sig,
                        warned,
                        at: Instant::now(),
                        term_sent: fwd == Sig::Term,
                        kill_sent: false,
                        grace,
                    });
                }
                Some(s) => {
                    // A second signal means hurry, never corrupt: pass TERM on; commits stay atomic.
                    tracing::warn!(
                        signal = sig.name(),
                        "another stop signal: hurrying the program"
                    );
                    store.journal().record(
                        "signal_received",
                        json!({"signal": sig.name(), "repeat": true}),
                    )?;
                    if sig == Sig::Term {
                        s.warned = false;
                        s.signal = Sig::Term;
                        child.signal(Signal::SIGTERM);
                        s.term_sent = true;
                        s.grace = s.grace.min(s.at.elapsed() + TERM_GRACE_CAP);
                    }
                }
            }
        }
        if request.exists() {
            if let Err(e) = commit_request(store, &staging, &request, job, run_dir, &mut progress) {
                tracing::error!(error = %format!("{e:#}"), "commit of the staged checkpoint failed");
                if cfg.checkpoint.on_save_error == OnSaveError::Stop && stop.is_none() {
                    save_failed_stop = true;
                    child.signal(ctx.child_sig.to_nix());
                    stop = Some(Stop {
                        signal: ctx.child_sig,
                        warned: false,
                        at: Instant::now(),
                        term_sent: false,
                        kill_sent: false,
                        grace: Duration::from_secs(cfg.signals.grace_seconds),
                    });
                }
            }
        }
        if let Some(e) = child.poll()? {
            break e;
        }
        if let Some(s) = &mut stop {
            let waited = s.at.elapsed();
            if !s.term_sent && waited >= s.grace {
                tracing::warn!("grace period over: sending TERM to the program");
                store
                    .journal()
                    .record("child_escalated", json!({"signal": "TERM"}))?;
                child.signal(Signal::SIGTERM);
                s.term_sent = true;
            }
            if !s.kill_sent && waited >= s.grace + KILL_AFTER {
                tracing::error!("the program ignored TERM: sending KILL (its staged files, if complete, are still committed)");
                store
                    .journal()
                    .record("child_escalated", json!({"signal": "KILL"}))?;
                child.signal(Signal::SIGKILL);
                s.kill_sent = true;
            }
        }
    };
    let secs = child.started.elapsed().as_secs_f64();
    store.journal().record(
        "child_exited",
        json!({"how": exit.describe(), "seconds": secs}),
    )?;
    tracing::info!(how = %exit.describe(), seconds = format!("{secs:.1}"), "program exited");
    // The final checkpoint, staged as the child stopped.
    if request.exists() {
        if let Err(e) = commit_request(store, &staging, &request, job, run_dir, &mut progress) {
            tracing::error!(error = %format!("{e:#}"), "final commit failed; the previous checkpoint is the resume point")
        }
    }
    if let Some(s) = &stop {
        let secs = s.at.elapsed().as_secs_f64();
        store.journal().record("stop_completed", json!({"signal": s.signal.name(), "seconds_since_signal": secs, "new_checkpoints": progress.commits}))?;
    }
    let _ = fs::remove_dir_all(&staging);
    let completed = progress.done || (stop.is_none() && exit.success());
    Ok(Ran {
        stop: stop.map(|s| (s.signal, s.warned)),
        failure: (!exit.success()).then(|| exit.describe()),
        completed,
        progress,
        save_failed_stop,
    })
}

fn ending_name(e: &Ending) -> &'static str {
    match e {
        Ending::Completed => "completed",
        Ending::Stopped { warned: true, .. } => "warning_signal",
        Ending::Stopped { .. } => "terminated",
        Ending::Failed { .. } => "failed",
    }
}

fn decision_name(d: &Decision) -> &'static str {
    match d {
        Decision::Done => "done",
        Decision::Requeue { .. } => "requeue",
        Decision::SlurmRequeues { .. } => "slurm_requeues",
        Decision::Stop { .. } => "stop",
    }
}

/// Carry out a decision; returns (exit code, what was done).
fn act(decision: &Decision, job: Option<&JobEnv>) -> (i32, String) {
    match decision {
        Decision::Done => (exit_code::SUCCESS, "none".into()),
        Decision::SlurmRequeues { .. } => (exit_code::REQUEUED, "left to Slurm".into()),
        Decision::Stop {
            crash_loop: true, ..
        } => (exit_code::CRASH_LOOP, "not requeued".into()),
        Decision::Stop { .. } => (exit_code::STOPPED, "not requeued".into()),
        Decision::Requeue { .. } => match job {
            None => (
                exit_code::REQUEUE_NEEDED,
                "not in a Slurm job: run the same command again to resume".into(),
            ),
            Some(j) => match slurm::requeue(&j.job_id) {
                Ok(Requeued::Scontrol) => (
                    exit_code::REQUEUED,
                    format!("scontrol requeue {}", j.job_id),
                ),
                Ok(Requeued::Resubmitted { new_job_id }) => (
                    exit_code::REQUEUED,
                    format!("resubmitted as job {new_job_id} (afterany:{})", j.job_id),
                ),
                Err(e) => (exit_code::REQUEUE_NEEDED, format!("requeue failed: {e}")),
            },
        },
    }
}

/// Allocations so far, and how many of the latest ended, in a row, without a new checkpoint.
fn history_of(events: &[serde_json::Value]) -> History {
    let previous_allocations = events
        .iter()
        .filter(|e| e["event"] == "allocation_start")
        .count() as u32;
    // Count each allocation's commits from the journal: one that never wrote its end (killed,
    // node lost) still counts by what it committed.
    let mut streak = 0;
    let mut commits_since_start = 0u64;
    let mut open = false;
    let mut per_alloc = Vec::new();
    for e in events {
        match e["event"].as_str() {
            Some("allocation_start") => {
                if open {
                    per_alloc.push(commits_since_start);
                }
                open = true;
                commits_since_start = 0;
            }
            Some("checkpoint_committed") => commits_since_start += 1,
            Some("allocation_end") => {
                if open {
                    per_alloc.push(commits_since_start);
                }
                open = false;
            }
            _ => {}
        }
    }
    if open {
        per_alloc.push(commits_since_start);
    }
    for n in per_alloc.iter().rev() {
        if *n == 0 {
            streak += 1;
        } else {
            break;
        }
    }
    History {
        previous_allocations,
        no_progress_streak: streak,
    }
}

fn reset_staging(staging: &Path, request: &Path) -> Result<()> {
    if staging.exists() {
        fs::remove_dir_all(staging).with_context(|| format!("clear {}", staging.display()))?;
    }
    fs::create_dir_all(staging).with_context(|| format!("create {}", staging.display()))?;
    for p in [
        request.to_path_buf(),
        result_path(request),
        request.with_extension("request.tmp"),
    ] {
        let _ = fs::remove_file(p);
    }
    Ok(())
}

fn result_path(request: &Path) -> PathBuf {
    let mut s = request.as_os_str().to_owned();
    s.push(".result");
    PathBuf::from(s)
}

/// What this allocation's commits achieved.
#[derive(Default)]
struct Progress {
    commits: u32,
    /// The child said its last commit was the final one.
    done: bool,
}

/// Commit what the child staged. Always answers the child (result file, emptied staging dir,
/// request removed), success or not; on success counts the commit in `progress`.
fn commit_request(
    store: &mut Store,
    staging: &Path,
    request: &Path,
    job: Option<&JobEnv>,
    run_dir: &Path,
    progress: &mut Progress,
) -> Result<()> {
    let outcome = (|| -> Result<(String, bool)> {
        let bytes = crate::storage::fsutil::read_bounded(request, 1 << 20)
            .map_err(|r| anyhow::anyhow!("{}: {r}", request.display()))?;
        let req: Request = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a valid commit request (expected {{\"step\": N, \"epoch\"?: E, \"metrics\"?: {{..}}, \"done\"?: bool}})", request.display()))?;
        let snapshot = Snapshot::from_dir(staging)?;
        let meta = CommitMeta {
            step: req.step,
            epoch: req.epoch,
            metrics: req.metrics.clone(),
            job: job.map(|j| j.job_info()),
            ..Default::default()
        };
        let report = store.commit(&snapshot, &meta)?;
        let line = json!({"ts": journal::now_rfc3339(), "step": req.step, "epoch": req.epoch, "metrics": req.metrics});
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(METRICS_FILE))?;
        writeln!(f, "{line}")?;
        Ok((report.name, req.done))
    })();
    let result = match &outcome {
        Ok((name, _)) => json!({"ok": true, "checkpoint": name}),
        Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
    };
    replace_file_durable(&result_path(request), result.to_string().as_bytes())?;
    for e in fs::read_dir(staging).into_iter().flatten().flatten() {
        let p = e.path();
        let _ = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
    fs::remove_file(request).with_context(|| format!("remove {}", request.display()))?;
    let (_, done) = outcome?;
    progress.commits += 1;
    progress.done |= done;
    Ok(())
}

/// Keep a frozen copy of the job config in the run dir; a later allocation with a different
/// config is journaled and logged (the trainer refuses unsafe changes).
fn freeze_config(store: &mut Store, run_dir: &Path, cfg: &JobConfig) -> Result<()> {
    let path = run_dir.join(CONFIG_FILE);
    let text = serde_yaml::to_string(cfg)?;
    if !path.exists() {
        replace_file_durable(&path, text.as_bytes())?;
        return Ok(());
    }
    let frozen = fs::read_to_string(&path).unwrap_or_default();
    if frozen != text {
        tracing::warn!(file = %path.display(), "the job config differs from the run's frozen copy; continuing with the new one");
        store
            .journal()
            .record("config_changed", json!({"frozen": CONFIG_FILE}))?;
    }
    Ok(())
}

/// Say, at the stop signal, how much time there is and whether the last save fits in it.
/// Budget: the warning's lead (`slurm.signal_lead`) for the warning signal, Slurm's KillWait
/// (`scontrol show config`, 30 s when unknown) for a bare TERM; both capped by the grace period.
fn budget_check(run_dir: &Path, cfg: &JobConfig, warned: bool, grace: Duration) {
    let (events, _) = journal::read_all(run_dir);
    let last_save = events
        .iter()
        .rev()
        .find(|e| e["event"] == "checkpoint_committed")
        .and_then(|e| e["seconds"].as_f64());
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
