//! `hpc-ckpt wrap`: one allocation of a run under the supervisor, in three steps — open the run
//! ([`Allocation::open`]: lock, frozen config, history, `allocation_start`), run the workload
//! (the built-in trainer in this process, or a program as a child speaking the child protocol
//! of [`super::protocol`] and stopped by the [`super::stop`] sequence), then end it
//! ([`Allocation::end`]: the requeue decision of [`super::policy`], carried out and journaled).

use std::cell::{Cell, RefCell};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::Receiver;
use nix::sys::signal::Signal;

use super::child::{ChildGroup, Exit, Team};
use super::deadline::EndWatch;
use super::events::{self, Event, SupervisorEvent};
use super::history::{self, Chain};
use super::policy::{self, Decision, Ending, History};
use super::protocol::{self, Answer, ChildProtocol};
use super::ranks::{self, Launch};
use super::signals::{self, Sig};
use super::stop::{Action, Cause, Input, StopSequence, StopTiming};
use super::workload::{Failure, FailureKind, InProcess, InProcessEnd, Workload};
use crate::config::{JobConfig, OnSaveError};
use crate::exit_code;
use crate::slurm::{self, JobEnv, Requeued};
use crate::storage::fsutil::replace_file_durable;
use crate::storage::journal::StoreEvent;
use crate::storage::run_dir::{holder, hostname};
use crate::storage::Store;

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
/// Seconds between TERM and KILL when the grace period is over.
const KILL_AFTER: Duration = Duration::from_secs(10);
/// Bare TERM (preemption, time limit, scancel) leaves only Slurm's KillWait: cap the grace.
const TERM_GRACE_CAP: Duration = Duration::from_secs(20);
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
    let mut alloc = Allocation::open(&args.config, &args.run_dir, signals, &args.workload)?;
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
}

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
            (Some(f), None) => failed(f, FailureKind::Crash),
            (None, None) => Ending::Failed {
                how: "stopped early with no signal".into(),
                kind: FailureKind::Crash,
            },
        }
    }
}

/// This allocation: the store it holds and what it knows of the run.
struct Allocation<'a> {
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

impl<'a> Allocation<'a> {
    /// Take the run dir (lock), freeze the config, read the history, journal the start.
    fn open(
        cfg: &'a JobConfig,
        run_dir: &Path,
        signals: Receiver<Sig>,
        workload: &Workload,
    ) -> Result<Allocation<'a>> {
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
            cfg.checkpoint.retention(),
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
        Ok(Allocation {
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

    fn timing(&self) -> StopTiming {
        StopTiming {
            warn: self.cfg.signals.warn,
            child: self.cfg.signals.child,
            grace: Duration::from_secs(self.cfg.signals.grace_seconds),
            term_grace_cap: TERM_GRACE_CAP,
            kill_after: KILL_AFTER,
        }
    }

    /// The built-in trainer in this process: signals become its `stop` callback.
    fn run_in_process(&mut self, trainer: &mut dyn InProcess) -> Result<Ran> {
        self.store
            .journal()
            .append(&SupervisorEvent::ChildStarted {
                pid: std::process::id(),
                in_process: true,
                resume_from: None,
                resume_step: None,
                world_size: None,
                launcher: None,
                pids: Vec::new(),
            })?;
        let first: Cell<Option<(Cause, Instant)>> = Cell::new(None);
        let watch = RefCell::new(&mut self.end_watch);
        let signals = &self.signals;
        let stop = || {
            if first.get().is_none() {
                if let Ok(sig) = signals.try_recv() {
                    first.set(Some((Cause::Signal(sig), Instant::now())));
                } else if watch.borrow_mut().due(Instant::now()) {
                    first.set(Some((Cause::TimeLimit, Instant::now())));
                }
            }
            first.get().is_some()
        };
        let started = Instant::now();
        let result = trainer.run(&mut self.store, &stop);
        let stopped = first.get().map(|(cause, at)| {
            let warned = match cause {
                Cause::Signal(signal) => signal == self.cfg.signals.warn,
                Cause::TimeLimit => true,
                Cause::SaveFailed => false,
            };
            (Stopped { cause, warned }, at)
        });
        if let Some((s, at)) = stopped {
            let grace = Duration::from_secs(self.cfg.signals.grace_seconds);
            self.note_stop(s.cause, s.warned, "in-process", grace)?;
            self.store
                .journal()
                .append(&SupervisorEvent::StopCompleted {
                    signal: s.label().into(),
                    seconds_since_signal: at.elapsed().as_secs_f64(),
                })?;
        }
        let how = match &result {
            Ok(InProcessEnd::Completed) => "completed".to_string(),
            Ok(InProcessEnd::Stopped) => "stopped".to_string(),
            Err(f) => {
                tracing::error!(error = %f, kind = ?f.kind, "training failed");
                format!("the trainer failed: {f}")
            }
        };
        self.store.journal().append(&SupervisorEvent::ChildExited {
            how,
            seconds: started.elapsed().as_secs_f64(),
        })?;
        Ok(Ran {
            stop: stopped.map(|(s, _)| s),
            completed: result.as_ref().is_ok_and(|e| *e == InProcessEnd::Completed),
            failure: result.err(),
        })
    }

    /// A program as a child: the child protocol, the stop sequence, commits of what it stages.
    /// A multi-rank program is the same, with every rank's files committed together.
    /// Run the program (its ranks) to its end. `coded`: its exit code says why it failed
    /// (the built-in trainer's ranks, [`FailureKind::of_exit_code`]); else a failure is a crash.
    fn run_program(&mut self, command: &[String], coded: bool) -> Result<Ran> {
        let (mut proto, mut team, launch) = match self.start_program(command)? {
            Ok(started) => started,
            Err(failure) => {
                tracing::error!(error = %failure, "the program was not started");
                return Ok(Ran {
                    stop: None,
                    failure: Some(failure),
                    completed: false,
                });
            }
        };
        let mut seq = StopSequence::new(self.timing());
        let mut save = SaveOutcome::default();
        self.supervise(&mut proto, &mut team, launch, &mut seq, &mut save)?;
        let secs = team.started.elapsed().as_secs_f64();
        let how = team.describe();
        self.store.journal().append(&SupervisorEvent::ChildExited {
            how: how.clone(),
            seconds: secs,
        })?;
        tracing::info!(%how, seconds = format!("{secs:.1}"), "program exited");
        // The final checkpoint, staged as the program stopped.
        if proto.has_request() {
            self.answer(&mut proto, &mut save)?;
        }
        if let Some(reason) = proto.settle_incomplete(&mut self.store)? {
            save.incomplete.get_or_insert(reason);
        }
        proto.finish(&mut self.store)?;
        let stopping = seq.stopping().copied();
        if let Some(s) = &stopping {
            self.store
                .journal()
                .append(&SupervisorEvent::StopCompleted {
                    signal: s.signal(seq.timing()).name().into(),
                    seconds_since_signal: s.at.elapsed().as_secs_f64(),
                })?;
        }
        let exit = team.exit();
        let failure = match save.failed {
            Some(e) if self.cfg.checkpoint.on_save_error == OnSaveError::Stop => {
                Some(Failure::new(FailureKind::SaveFailed, e))
            }
            _ if !exit.success() => {
                let kind = match exit {
                    Exit::Code(c) if coded => FailureKind::of_exit_code(c),
                    _ => FailureKind::Crash,
                };
                Some(Failure::new(kind, how))
            }
            // Every rank exited 0, but not every rank's last state was committed: not complete.
            _ => save
                .incomplete
                .clone()
                .map(|r| Failure::new(FailureKind::Crash, r)),
        };
        Ok(Ran {
            stop: stopping.and_then(|s| match s.cause {
                Cause::Signal(_) | Cause::TimeLimit => Some(Stopped {
                    cause: s.cause,
                    warned: s.warned,
                }),
                Cause::SaveFailed => None,
            }),
            completed: save.incomplete.is_none()
                && (save.done || (stopping.is_none() && exit.success())),
            failure,
        })
    }

    /// Set up the protocol and start the program (its ranks), resuming from the run's resume
    /// point. `Ok(Err(..))`: the program must not start (a sharded checkpoint of another world
    /// size, which the program does not reshard).
    fn start_program(
        &mut self,
        command: &[String],
    ) -> Result<std::result::Result<(ChildProtocol, Team, Launch), Failure>> {
        let resume = self.store.resume_point()?;
        let resume_step = resume.as_ref().map(|(l, _)| l.step);
        let world = self.cfg.world_size();
        let launch = Launch::resolve(self.cfg.distributed.launcher, world, self.job.is_some());
        // The checkpoint to resume from and the world size that wrote it.
        let resume_from = resume
            .as_ref()
            .map(|(l, m)| (l.name.clone(), l.path.clone(), protocol::world_of(m)));
        if let Some(refusal) = self.refuse_world_size(resume_from.as_ref(), world) {
            return Ok(Err(refusal));
        }
        let token = format!(
            "a{:04}-{}",
            self.history.previous_allocations + 1,
            std::process::id()
        );
        let slots = if launch == Launch::Single { 1 } else { world };
        let proto = ChildProtocol::prepare(
            &mut self.store,
            &token,
            slots,
            resume_step,
            self.cfg.checkpoint.allow_step_backwards,
            self.job.as_ref().map(|j| j.job_info()),
        )?;
        match &resume_from {
            Some((name, ..)) => tracing::info!(checkpoint = %name, "resuming"),
            None => tracing::info!("fresh start: no checkpoint to resume from"),
        }
        let resume_env = resume_from.as_ref().map(|(_, p, w)| (p.clone(), w.world));
        let members = self.spawn_members(launch, command, &proto, resume_env.as_ref(), slots)?;
        let team = Team::new(members);
        let pids = team.pids();
        self.store
            .journal()
            .append(&SupervisorEvent::ChildStarted {
                pid: pids[0],
                in_process: false,
                resume_from: resume_from.map(|(name, ..)| name),
                resume_step,
                world_size: (world > 1).then_some(world),
                launcher: (launch != Launch::Single).then(|| launch.name().to_string()),
                pids: if pids.len() > 1 { pids } else { Vec::new() },
            })?;
        Ok(Ok((proto, team, launch)))
    }

    /// Sharded state loads only with the world size that wrote it, unless its format reshards
    /// (DCP: the ranks said `reshardable`) or the program reshards (`distributed.reshard`);
    /// replicated state loads anywhere, with a warning.
    fn refuse_world_size(
        &self,
        resume: Option<&(String, PathBuf, protocol::SavedWorld)>,
        world: u32,
    ) -> Option<Failure> {
        let (name, _, saved_world) = resume?;
        let saved = saved_world.world;
        if saved == world {
            return None;
        }
        let sharded = saved_world.sharding.sharded;
        let reshardable = saved_world.sharding.reshardable;
        if saved_world.pinned() && !self.cfg.distributed.reshard {
            return Some(Failure::new(
                FailureKind::ConfigRefused,
                format!(
                    "checkpoint {name} holds sharded state written by {saved} ranks, and this job \
                     has {world}: sharded state that is not reshardable (one shard per rank, such \
                     as a ZeroRedundancyOptimizer's) loads only with the world size that wrote \
                     it. Run with {saved} ranks, or set distributed.reshard: true if the program \
                     reshards (it reads HPC_CKPT_RESUME_WORLD_SIZE); state saved through \
                     torch.distributed.checkpoint (FSDP2, DTensor) reshards by itself"
                ),
            ));
        }
        tracing::warn!(checkpoint = %name, saved_world_size = saved, world_size = world,
            sharded, reshardable, "resuming with another world size (the program sees HPC_CKPT_RESUME_WORLD_SIZE)");
        None
    }

    /// A command with the protocol's environment (and the resume point, when there is one).
    fn program_command(
        &self,
        proto: &ChildProtocol,
        resume: Option<&(PathBuf, u32)>,
        program: &str,
        args: &[String],
    ) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args);
        for k in INHERITED_PROTOCOL_ENV {
            cmd.env_remove(k);
        }
        cmd.envs(proto.env(self.cfg.signals.child.name()));
        if let Some((path, saved)) = resume {
            cmd.env("HPC_CKPT_RESUME_FROM", path)
                .env(ranks::ENV_RESUME_WORLD_SIZE, saved.to_string());
        }
        cmd
    }

    /// Start the program's process groups as the launcher says: one (a single rank, or a
    /// program that launches its own ranks), `srun` for the job's ranks, or one per local rank.
    fn spawn_members(
        &self,
        launch: Launch,
        command: &[String],
        proto: &ChildProtocol,
        resume: Option<&(PathBuf, u32)>,
        slots: u32,
    ) -> Result<Vec<ChildGroup>> {
        let world = self.cfg.world_size();
        let has = |k: &str| std::env::var_os(k).is_some();
        // Each group says it is ready beside its first rank's request: `<token>[-rNNNNN].ready`
        // (what an allocation leaves in staging/ the next one clears).
        let spawn = |cmd: Command, rank: u32| {
            let ready = proto.request_of(rank).with_extension("ready");
            ChildGroup::spawn(cmd, Some(ready)).with_context(|| format!("cannot start {command:?}"))
        };
        let base =
            |program: &str, args: &[String]| self.program_command(proto, resume, program, args);
        Ok(match launch {
            Launch::Single | Launch::Command => vec![spawn(base(&command[0], &command[1..]), 0)?],
            Launch::Srun => {
                let exe = super::launcher::exe().context("locate this binary for srun")?;
                let exe = exe.to_str().context("this binary's path is not UTF-8")?;
                let line = if slots == 1 {
                    let mut c = vec![
                        "srun".to_string(),
                        "--ntasks=1".into(),
                        "--export=ALL".into(),
                    ];
                    c.extend(command.iter().cloned());
                    c
                } else {
                    ranks::srun_command(world, exe, command)
                };
                tracing::info!(command = %line.join(" "), "starting the ranks with srun");
                let mut cmd = base(&line[0], &line[1..]);
                if !has("MASTER_ADDR") {
                    cmd.env("MASTER_ADDR", hostname());
                }
                if !has("MASTER_PORT") {
                    cmd.env("MASTER_PORT", ranks::free_port()?.to_string());
                }
                vec![spawn(cmd, 0)?]
            }
            Launch::Local => {
                let port = ranks::free_port()?;
                let mut members = Vec::new();
                for rank in 0..world {
                    let mut cmd = base(&command[0], &command[1..]);
                    cmd.envs(proto.rank_env(rank))
                        .envs(ranks::local_dist_env(rank, world, port, has));
                    members.push(spawn(cmd, rank)?);
                }
                members
            }
        })
    }

    /// The loop while the program runs: signals and ticks into the stop sequence, its actions
    /// carried out, requests answered. Returns when every process of the program has ended. A
    /// locally started rank that fails takes its peers down (as `srun --kill-on-bad-exit`
    /// does): a peer left alone would wait in a collective forever.
    fn supervise(
        &mut self,
        proto: &mut ChildProtocol,
        team: &mut Team,
        launch: Launch,
        seq: &mut StopSequence,
        save: &mut SaveOutcome,
    ) -> Result<()> {
        let mut peers_killed = false;
        loop {
            if let Ok(sig) = self.signals.recv_timeout(TICK) {
                let actions = seq.on(Input::Stop(Cause::Signal(sig)), Instant::now());
                self.carry_out(&actions, team)?;
            }
            if seq.stopping().is_none() && self.end_watch.due(Instant::now()) {
                let actions = seq.on(Input::Stop(Cause::TimeLimit), Instant::now());
                self.carry_out(&actions, team)?;
            }
            let actions = seq.on(Input::Tick, Instant::now());
            self.carry_out(&actions, team)?;
            self.release_held(team)?;
            if proto.has_request()
                && self.answer(proto, save)?
                && self.cfg.checkpoint.on_save_error == OnSaveError::Stop
            {
                let actions = seq.on(Input::Stop(Cause::SaveFailed), Instant::now());
                self.carry_out(&actions, team)?;
            }
            for (rank, exit) in team.poll()? {
                if launch == Launch::Local && !exit.success() && !peers_killed && team.running() {
                    peers_killed = true;
                    tracing::error!(rank, how = %exit.describe(), "a rank failed: killing its peers");
                    self.store.journal().append(&SupervisorEvent::RankFailed {
                        rank,
                        how: exit.describe(),
                    })?;
                    team.signal(Signal::SIGKILL);
                }
            }
            // A local rank that ended without asking while a peer waits for an answer: that
            // commit can never happen; answer now rather than leave the peer waiting.
            if launch == Launch::Local
                && (0..proto.world_size()).any(|r| team.ended(r) && !proto.has_asked(r))
            {
                if let Some(reason) = proto.settle_incomplete(&mut self.store)? {
                    save.incomplete.get_or_insert(reason);
                }
            }
            if team.done() {
                return Ok(());
            }
        }
    }

    /// Answer the program's request; true when the commit failed.
    fn answer(&mut self, proto: &mut ChildProtocol, save: &mut SaveOutcome) -> Result<bool> {
        Ok(match proto.answer(&mut self.store)? {
            Answer::Committed { done, .. } => {
                save.done |= done;
                false
            }
            Answer::Refused { .. } => false,
            Answer::Failed { error } => {
                tracing::error!(%error, "commit of the staged checkpoint failed");
                save.failed.get_or_insert(error);
                true
            }
        })
    }

    /// Carry out what the stop sequence says.
    fn carry_out(&mut self, actions: &[Action], child: &mut Team) -> Result<()> {
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
    /// stop signals yet, at most half the grace period ([`super::child`]).
    fn forward(&mut self, child: &mut Team, forward: Sig, grace: Duration) -> Result<()> {
        let now = Instant::now();
        let held = child.forward(forward.to_nix(), now, now + grace / 2);
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
    fn release_held(&mut self, team: &mut Team) -> Result<()> {
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

    fn escalate(&mut self, child: &mut Team, sig: Signal) -> Result<()> {
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
    fn note_stop(&mut self, cause: Cause, warned: bool, fwd: &str, grace: Duration) -> Result<()> {
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

/// Say, at the stop signal, how much time there is and whether the last save fits in it.
/// Budget: the warning's lead (`slurm.signal_lead`) for the warning signal, Slurm's KillWait
/// (`scontrol show config`, 30 s when unknown) for a bare TERM; both capped by the grace period.
fn budget_check(run_dir: &Path, cfg: &JobConfig, warned: bool, grace: Duration) {
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
