//! Running the workload of an allocation: the built-in trainer in this process (signals become
//! its `stop` callback), or a program — its ranks started as the launcher says, each a child in
//! its own process group speaking the child protocol — supervised until every process has
//! ended: signals and ticks fed into the stop sequence, its actions carried out
//! ([`super::stopping`]), commit requests answered ([`crate::supervision::protocol`]).

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;

use super::*;
use crate::config::OnSaveError;
use crate::storage::run_dir::hostname;
use crate::supervision::child::{ChildGroup, Exit, Team};
use crate::supervision::events::SupervisorEvent;
use crate::supervision::protocol::{self, Answer, ChildProtocol};
use crate::supervision::ranks::{self, Launch};
use crate::supervision::stop::{Cause, Input, StopSequence};
use crate::supervision::workload::{Failure, FailureKind, InProcess, InProcessEnd};

impl<'a> AllocationRun<'a> {
    /// The built-in trainer in this process: signals become its `stop` callback.
    pub(super) fn run_in_process(&mut self, trainer: &mut dyn InProcess) -> Result<Ran> {
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
            program_stopped: false,
        })
    }

    /// A program as a child: the child protocol, the stop sequence, commits of what it stages.
    /// A multi-rank program is the same, with every rank's files committed together.
    /// Run the program (its ranks) to its end. `coded`: its exit code says why it failed
    /// (the built-in trainer's ranks, [`FailureKind::of_exit_code`]); else a failure is a crash.
    pub(super) fn run_program(&mut self, command: &[String], coded: bool) -> Result<Ran> {
        let (mut proto, mut team, launch) = match self.start_program(command)? {
            Ok(started) => started,
            Err(failure) => {
                tracing::error!(error = %failure, "the program was not started");
                return Ok(Ran {
                    stop: None,
                    failure: Some(failure),
                    completed: false,
                    program_stopped: false,
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
        let program_stopped = stopping.is_none() && save.stopping && !save.done;
        if program_stopped {
            tracing::warn!(
                "the program saved on a stop signal that did not reach the supervisor (sent to \
                 the job's steps only? e.g. `--signal=USR1@T` without `B:`): work is left"
            );
        }
        Ok(Ran {
            stop: stopping.and_then(|s| match s.cause {
                Cause::Signal(_) | Cause::TimeLimit => Some(Stopped {
                    cause: s.cause,
                    warned: s.warned,
                }),
                Cause::SaveFailed => None,
            }),
            completed: save.incomplete.is_none()
                && (save.done || (stopping.is_none() && !save.stopping && exit.success())),
            program_stopped,
            failure,
        })
    }

    /// Set up the protocol and start the program (its ranks), resuming from the run's resume
    /// point. `Ok(Err(..))`: the program must not start (a sharded checkpoint of another world
    /// size, which the program does not reshard).
    pub(super) fn start_program(
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
    pub(super) fn refuse_world_size(
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
    pub(super) fn program_command(
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
    pub(super) fn spawn_members(
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
                let exe =
                    crate::supervision::launcher::exe().context("locate this binary for srun")?;
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
    pub(super) fn supervise(
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
    pub(super) fn answer(
        &mut self,
        proto: &mut ChildProtocol,
        save: &mut SaveOutcome,
    ) -> Result<bool> {
        Ok(match proto.answer(&mut self.store)? {
            Answer::Committed { done, stopping, .. } => {
                save.done |= done;
                save.stopping = stopping;
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
}
