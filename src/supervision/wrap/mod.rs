//! `hpc-ckpt wrap`: one allocation of a run under the supervisor, in three steps — open the run
//! ([`AllocationRun::open`]: lock, frozen config, history, `allocation_start`), run the workload
//! (the built-in trainer in this process, or a program as a child speaking the child protocol
//! of [`super::protocol`] and stopped by the [`super::stop`] sequence), then end it
//! ([`AllocationRun::end`]: the requeue decision of [`super::policy`], carried out and journaled).
//!
//! Where each part lives: this file opens and ends the allocation (lock, frozen config,
//! history, the requeue decision carried out and journaled); [`running`] runs the workload;
//! [`stopping`] carries out the stop sequence. Guarantees: the allocation ends with an
//! `allocation_end` event and a decision, whatever the workload did.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::Receiver;

use super::deadline::EndWatch;
use super::events::{self, SupervisorEvent};
use super::history::{self, Chain};
use super::policy::{self, Decision, Ending, History};
use super::ranks::{self};
use super::signals::{self, Sig};
use super::stop::Cause;
use super::workload::{Failure, FailureKind, Workload};
use crate::config::JobConfig;
use crate::exit_code;
use crate::slurm::{self, JobEnv, Requeued};
use crate::storage::fsutil::replace_file_durable;
use crate::storage::run_dir::{holder, hostname};
use crate::storage::Store;

pub mod running;
pub mod stopping;

/// The run's frozen copy of the job config.
pub const CONFIG_FILE: &str = "config.yaml";
/// Protocol variables a child must never inherit from the supervisor's own environment.
const INHERITED_PROTOCOL_ENV: [&str; 9] = [
    "HPC_CKPT_RESUME_FROM",
    super::child::ENV_READY_FILE,
    "HPC_CKPT_STAGING",
    "HPC_CKPT_COMMIT_REQUEST",
    ranks::ENV_RANK,
    ranks::ENV_WORLD_SIZE,
    ranks::ENV_RANK_PREFIX,
    ranks::ENV_RESUME_WORLD_SIZE,
    "HPC_CKPT_RUN_DIR",
];
const TICK: Duration = Duration::from_millis(50);

pub struct WrapArgs {
    pub config: JobConfig,
    pub run_dir: PathBuf,
    pub workload: Workload,
}

/// Run one allocation; returns the process exit code (see [`crate::exit_code`]).
pub fn run(mut args: WrapArgs) -> Result<i32> {
    // Install handlers first: a warning that arrives during start-up must not kill us.
    let signals = signals::install().context("install signal handlers")?;
    let mut alloc = AllocationRun::open(&args.config, &args.run_dir, signals, &args.workload)?;
    let ran = match &mut args.workload {
        Workload::InProcess(trainer) => alloc.run_in_process(trainer.as_mut()),
        Workload::Program(command) => alloc.run_program(command, false),
        Workload::TrainerRanks(command) => alloc.run_program(command, true),
    };
    alloc.end(ran)
}

/// A stop as it ended the allocation.
#[derive(Debug, Clone, Copy)]
struct Stopped {
    cause: Cause,
    warned: bool,
}

impl Stopped {
    /// What stopped it, as the decision's reason names it.
    fn label(&self) -> &'static str {
        match self.cause {
            Cause::Signal(s) => s.name(),
            Cause::TimeLimit => "none (the supervisor's time-limit watch)",
            Cause::SaveFailed => "none (a failed save)",
        }
    }
}

/// What the program's commit requests came to.
#[derive(Debug, Default)]
struct SaveOutcome {
    /// The program said its last commit was the final one.
    done: bool,
    /// The program said its last commit was made on a stop signal: work is left.
    stopping: bool,
    /// The first failed commit's error.
    failed: Option<String>,
    /// A multi-rank commit some ranks never asked for: the last state is not committed.
    incomplete: Option<String>,
}

/// How the work of this allocation went, whoever did it.
struct Ran {
    stop: Option<Stopped>,
    failure: Option<Failure>,
    completed: bool,
    /// The program's last commit was made on a stop signal that did not reach the supervisor.
    program_stopped: bool,
}

/// The stop signal named in the decision when it reached the program but not the supervisor.
const PROGRAM_STOP: &str = "none (a stop signal reached the program, not the supervisor)";

impl Ran {
    /// The policy's view. A failure no retry can fix outranks a stop signal; a stop signal
    /// outranks a crash (a program killed by our own escalation is not a crash).
    fn ending(&self) -> Ending {
        if self.completed {
            return Ending::Completed;
        }
        let failed = |f: &Failure, kind| Ending::Failed {
            how: f.message.clone(),
            kind,
        };
        match (&self.failure, self.stop) {
            (Some(f), _) if f.kind != FailureKind::Crash => failed(f, f.kind),
            (_, Some(s)) => Ending::Stopped {
                signal: s.label().to_string(),
                warned: s.warned,
            },
            // Its work is not done: like Slurm's warning, checkpointed and to be continued.
            (_, None) if self.program_stopped => Ending::Stopped {
                signal: PROGRAM_STOP.into(),
                warned: true,
            },
            (Some(f), None) => failed(f, FailureKind::Crash),
            (None, None) => Ending::Failed {
                how: "stopped early with no signal".into(),
                kind: FailureKind::Crash,
            },
        }
    }
}

/// This allocation: the store it holds and what it knows of the run.
struct AllocationRun<'a> {
    cfg: &'a JobConfig,
    run_dir: PathBuf,
    job: Option<JobEnv>,
    store: Store,
    signals: Receiver<Sig>,
    /// The last save before the time limit when no warning comes.
    end_watch: EndWatch,
    history: History,
    restart_count: u32,
}

impl<'a> AllocationRun<'a> {
    /// Take the run dir (lock), freeze the config, read the history, journal the start.
    fn open(
        cfg: &'a JobConfig,
        run_dir: &Path,
        signals: Receiver<Sig>,
        workload: &Workload,
    ) -> Result<AllocationRun<'a>> {
        let command = workload.command();
        if command.is_empty() || command[0].is_empty() {
            bail!("no command to run: give one after `--`, or `command:` in the config");
        }
        let job = JobEnv::from_env();
        let run_dir = std::path::absolute(run_dir)
            .with_context(|| format!("run dir {}", run_dir.display()))?;
        let mut store = Store::open(
            &run_dir,
            &holder(job.as_ref().map(|j| j.job_id.clone())),
            cfg.checkpoint.retention.clone(),
        )
        .with_context(|| format!("cannot open run dir {}", run_dir.display()))?;
        freeze_config(&mut store, &run_dir, cfg)?;
        let history = history::fold(&events::read(&run_dir).0).history();
        let restart_count = job
            .as_ref()
            .map_or(0, |j| j.restart_count)
            .max(history.previous_allocations);
        store.journal().append(&SupervisorEvent::AllocationStart {
            job_id: job.as_ref().map(|j| j.job_id.clone()),
            restart_count,
            host: Some(hostname()),
            pid: Some(std::process::id()),
            command,
        })?;
        tracing::info!(run_dir = %run_dir.display(), job = ?job.as_ref().map(|j| &j.job_id), restart_count, "allocation started");
        let end_watch = match &job {
            Some(j) => {
                let id = j.job_id.clone();
                let lead = Duration::from_secs(cfg.slurm.signal_lead as u64);
                let (watch, armed) = EndWatch::arm(lead, Instant::now(), move || {
                    slurm::show_job(&id)?.time_left()
                });
                if let Some(a) = armed {
                    store.journal().append(&SupervisorEvent::TimeLimitWatch {
                        seconds_left: a.left.as_secs(),
                        save_in_seconds: a.save_in.as_secs(),
                        lead_seconds: lead.as_secs(),
                    })?;
                }
                watch
            }
            None => EndWatch::off(),
        };
        Ok(AllocationRun {
            cfg,
            run_dir,
            job,
            store,
            signals,
            end_watch,
            history,
            restart_count,
        })
    }

    /// Decide, carry out the decision, journal the end; the exit code.
    fn end(mut self, ran: Result<Ran>) -> Result<i32> {
        let ran = match ran {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("{e:#}");
                self.journal_end(
                    "failed",
                    &msg,
                    "stop",
                    &msg,
                    "not requeued",
                    exit_code::FAILURE,
                )?;
                return Err(e);
            }
        };
        let ending = ran.ending();
        let commits = self
            .chain()
            .allocations
            .last()
            .map_or(0, |a| a.new_checkpoints);
        let slurm_state = match (&ending, &self.job) {
            (Ending::Stopped { warned: false, .. }, Some(j)) => {
                slurm::show_job(&j.job_id).map(|s| s.state)
            }
            _ => None,
        };
        let decision = policy::decide(
            &ending,
            commits,
            &self.history,
            self.restart_count,
            slurm_state.as_deref(),
            &self.cfg.requeue,
        );
        let (code, action) = act(&decision, self.job.as_ref());
        let reason = decision.reason();
        match code {
            exit_code::SUCCESS | exit_code::REQUEUED => {
                tracing::info!(%reason, %action, "allocation ends")
            }
            _ => tracing::warn!(%reason, %action, "allocation ends"),
        }
        if decision == Decision::Done {
            self.store.journal().append(&SupervisorEvent::RunDone)?;
        }
        let child = match &ran.failure {
            Some(f) => f.message.clone(),
            None => "exit code 0".into(),
        };
        self.journal_end(
            ending.name(),
            &child,
            decision.name(),
            &reason,
            &action,
            code,
        )?;
        Ok(code)
    }

    fn journal_end(
        &mut self,
        ending: &str,
        child: &str,
        decision: &str,
        reason: &str,
        action: &str,
        code: i32,
    ) -> Result<()> {
        self.store
            .journal()
            .append(&SupervisorEvent::AllocationEnd {
                job_id: self.job.as_ref().map(|j| j.job_id.clone()),
                restart_count: self.restart_count,
                ending: ending.into(),
                child: Some(child.into()),
                decision: decision.into(),
                reason: reason.into(),
                action: action.into(),
                exit_code: code,
            })?;
        Ok(())
    }

    fn chain(&self) -> Chain {
        history::fold(&events::read(&self.run_dir).0)
    }
}

/// Carry out a decision; returns (exit code, what was done).
fn act(decision: &Decision, job: Option<&JobEnv>) -> (i32, String) {
    match decision {
        Decision::Done => (exit_code::SUCCESS, "none".into()),
        Decision::SlurmRequeues { .. } => (exit_code::REQUEUED, "left to Slurm".into()),
        Decision::Stop { why, .. } => (why.exit_code(), "not requeued".into()),
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
        store.journal().append(&SupervisorEvent::ConfigChanged {
            frozen: CONFIG_FILE.into(),
        })?;
    }
    Ok(())
}
