//! The built-in trainer as one of N data-parallel ranks (`hpc-ckpt train-rank`, which `wrap`
//! starts N times — `srun` in a Slurm job, local processes elsewhere — for a job whose
//! `distributed.world_size` / `slurm.ntasks` is above 1). Collectives are libtorch's c10d Gloo
//! ([`crate::train::collective`]); commits are the child protocol's coordinated commit
//! ([`crate::supervision::client`]): one checkpoint of every rank's files, one manifest.
//!
//! Semantics: `batch_size` stays the global batch. Each micro-batch of the loader (the same
//! order on every rank) is cut into N equal shares, rank r computing the loss and gradients of
//! share r; one all-reduce of the flattened gradients (one buffer, not one call per tensor)
//! averages them, and every rank applies the same optimizer step to the same weights. Float
//! buffers (batchnorm's running statistics, which each rank updates from its own share) are
//! averaged over the ranks after every step, so every rank holds the same ones and the running
//! mean is the one a single rank computes from the whole batch (the average of the shares'
//! momentum updates is the update by the batch's mean); the running variance is the mean of the
//! shares' variances, which leaves out the spread between the shares' means. The forward pass
//! normalises each share by its own statistics, as DDP without `SyncBatchNorm` does.
//!
//! Guarantees:
//! - **Deterministic for a world size.** The shares, the reduction order (Gloo's ring, fixed for
//!   a world size) and every seed (rank r's dropout: [`seeds::rank_step_seed`]) are functions of
//!   the step, so a run of N ranks interrupted any number of times ends byte-identical to an
//!   uninterrupted run of N ranks. Another N sums in another order: a checkpoint of N ranks
//!   resumes with M (with a warning; its replicated state is exact, the per-rank RNG of ranks
//!   that did not exist is not needed because every step reseeds), but the run's numbers are
//!   then neither the N-run's nor the M-run's.
//! - **One step for every rank.** The stop signal, and the clock's part of the save cadence,
//!   travel in the same all-reduce as the loss: all ranks stop, and save, after the same step.
//! - **One checkpoint.** Rank 0 stages the replicated state (model, optimizer, reference batch,
//!   `trainer_state.json`; the reference loss goes to the manifest's `extra`); every rank stages
//!   its [`RANK_STATE_FILE`] (its generator state, its share, the data position). The ranks
//!   first agree that every one staged; only then does each ask for the commit, and the
//!   supervisor commits every rank's files or none. With `checkpoint.async` the staging and the
//!   commit request run in the background and the agreement rides in the steps' all-reduce
//!   (`rank_save.rs`).
//! - **Restore agreed.** Each rank restores the resume point; when any rank cannot, all fall
//!   back to the next older checkpoint together (rank 0 journals `checkpoint_refused`).
//! - **Once.** Metrics, progress and evaluation are rank 0's (the eval value is broadcast: the
//!   scheduler of every rank sees it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::restore::{restore_dir, Source};
use super::*;
use crate::sig::Sig;
use crate::storage::journal::{FaultRecord, Journal, StoreEvent};
use crate::storage::persister::Buffers;
use crate::storage::run_dir::RunDir;
use crate::storage::writer::write_files;
use crate::supervision::client::Client;
use crate::supervision::protocol::Request;
use crate::train::collective::{ConnectOptions, ProcessGroup, Rendezvous};

use super::rank_save::InFlight;

/// Every rank's own file in a data-parallel checkpoint (committed as `rank<NNNNN>.rank_state.json`).
pub const RANK_STATE_FILE: &str = "rank_state.json";

/// How long joining the group, and each collective, may wait for the slowest rank (rank 0 saves
/// and evaluates while the others wait in the next collective).
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);

/// What one rank keeps in its `rank_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RankState {
    rank: u32,
    world_size: u32,
    global_step: u64,
    epoch: u64,
    batch_in_epoch: u64,
    /// This rank's share of every micro-batch: positions `[start, end)`.
    share: (usize, usize),
    /// `torch.get_rng_state()` of this rank's CPU generator, hex.
    cpu_rng_state: String,
    /// On CUDA, this rank's generator state of each visible CUDA device, hex (absent on the CPU).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cuda_rng_states: Vec<String>,
}

/// This rank's place among the ranks: the group, its share, the stop flag.
pub(super) struct Team {
    pg: ProcessGroup,
    rank: u32,
    world: u32,
    /// Set by the stop signal's handler; read at every step.
    signalled: Arc<AtomicBool>,
    /// Every rank saw the stop flag of some rank at the last step.
    stop_agreed: bool,
    /// Some rank's clock said a save is due at the last step.
    time_due: bool,
    /// `[start, end)` of every micro-batch.
    share: (usize, usize),
    /// The background save in flight (`checkpoint.async`; see `rank_save.rs`).
    pub(super) save: Option<InFlight>,
    /// The ranks' votes on it at the last step: (staged, failed).
    pub(super) votes: (u32, u32),
}

impl Team {
    pub(super) fn rank(&self) -> u32 {
        self.rank
    }

    pub(super) fn world(&self) -> u32 {
        self.world
    }

    /// This rank's share of the micro-batch `idx`.
    pub(super) fn shard<'a>(&self, idx: &'a [i64]) -> &'a [i64] {
        &idx[self.share.0..self.share.1]
    }

    /// Average the gradients (one all-reduce of all of them, flattened) and the loss over the
    /// ranks; agree on the stop flag, on `due` (the clock's save cadence) and count the votes on
    /// the background save in flight. Returns the mean loss.
    pub(super) fn reduce_step(
        &mut self,
        params: &[Tensor],
        loss: f64,
        due: bool,
    ) -> Result<f64, TrainError> {
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        self.average(&grads)?;
        let stop = self.signalled.load(Ordering::SeqCst);
        let (staged, failed) = self.save.as_mut().map_or((false, false), InFlight::vote);
        let mut scalars = Tensor::from_slice(&[
            loss,
            f64::from(stop),
            f64::from(due),
            f64::from(staged),
            f64::from(failed),
        ]);
        self.collective(|pg| pg.all_reduce_sum(&mut scalars))?;
        let s: Vec<f64> = Vec::<f64>::try_from(&scalars).expect("five f64");
        self.stop_agreed = s[1] > 0.0;
        self.time_due = s[2] > 0.0;
        self.votes = (s[3].round() as u32, s[4].round() as u32);
        Ok(s[0] / self.world as f64)
    }

    /// Average `tensors` (of one dtype, on one device) over the ranks, in place: flattened into
    /// one buffer, one all-reduce (through host memory), written back.
    pub(super) fn average(&mut self, tensors: &[Tensor]) -> Result<(), TrainError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let device = tensors[0].device();
        let flat: Vec<Tensor> = tensors.iter().map(|t| t.reshape([-1])).collect();
        let mut flat = Tensor::cat(&flat, 0).to_device(Device::Cpu).contiguous();
        self.collective(|pg| pg.all_reduce_sum(&mut flat))?;
        let flat = (flat / self.world as f64).to_device(device);
        let mut at = 0;
        tch::no_grad(|| {
            for t in tensors {
                let n = t.numel() as i64;
                t.shallow_clone().copy_(&flat.narrow(0, at, n).view_as(t));
                at += n;
            }
        });
        Ok(())
    }

    /// Rank 0's `v`, on every rank.
    fn broadcast_value(&mut self, v: f64) -> Result<f64, TrainError> {
        let mut t = Tensor::from_slice(&[v]);
        self.collective(|pg| pg.broadcast(&mut t, 0))?;
        Ok(t.double_value(&[0]))
    }

    /// The sum over the ranks of each of `flags` (0 or 1 each).
    pub(super) fn count(&mut self, flags: &[bool]) -> Result<Vec<u32>, TrainError> {
        let v: Vec<f64> = flags.iter().map(|&f| f64::from(f)).collect();
        let mut t = Tensor::from_slice(&v);
        self.collective(|pg| pg.all_reduce_sum(&mut t))?;
        Ok(Vec::<f64>::try_from(&t)
            .expect("f64s")
            .into_iter()
            .map(|x| x.round() as u32)
            .collect())
    }

    fn collective(
        &mut self,
        f: impl FnOnce(&mut ProcessGroup) -> Result<(), crate::train::collective::CollectiveError>,
    ) -> Result<(), TrainError> {
        f(&mut self.pg).map_err(|e| TrainError::Team(e.to_string()))
    }
}

/// `hpc-ckpt train-rank`: train the job of `cfg` as the rank the child protocol's environment
/// names (see the module doc). Returns when training is complete or stopped (committed either
/// way), or with the error that ended it.
pub fn run_rank(cfg: &JobConfig) -> Result<Outcome, TrainError> {
    let _one_at_a_time = TRAINER.lock().unwrap_or_else(|p| p.into_inner());
    let client = Client::from_env().map_err(|e| TrainError::Team(e.to_string()))?;
    let tc = TrainConfig::from_job(cfg)?;
    world_fits(tc.batch_size, client.world_size)?;
    let signalled = stop_flag()?;
    let pg = connect(&client)?;
    let per = tc.batch_size as usize / client.world_size as usize;
    let r = client.rank as usize;
    let mut team = Team {
        pg,
        rank: client.rank,
        world: client.world_size,
        signalled,
        stop_agreed: false,
        time_due: false,
        share: (r * per, (r + 1) * per),
        save: None,
        votes: (0, 0),
    };
    let mut t = restore_agreed(&tc, &client, &mut team)?;
    t.dp = Some(team);
    t.train_as_rank(&client)
}

/// The stop flag: set by the child signal the supervisor forwards (`HPC_CKPT_SIGNAL`), by TERM
/// (its escalation) and by INT. Once set up, the stop signals held since start-up are unblocked
/// and the supervisor is told this rank is ready for them ([`crate::supervision::client::say_ready`]).
fn stop_flag() -> Result<Arc<AtomicBool>, TrainError> {
    let flag = Arc::new(AtomicBool::new(false));
    let child = std::env::var("HPC_CKPT_SIGNAL")
        .ok()
        .and_then(|s| Sig::from_name(&s))
        .unwrap_or(Sig::Usr1);
    for sig in [child, Sig::Term, Sig::Int] {
        signal_hook::flag::register(sig.raw(), Arc::clone(&flag))
            .map_err(|e| TrainError::Team(format!("cannot handle SIG{}: {e}", sig.name())))?;
    }
    crate::supervision::signals::unblock_stop();
    crate::supervision::client::say_ready();
    Ok(flag)
}

/// Join the ranks: a c10d TCPStore at `MASTER_ADDR:MASTER_PORT` (which `wrap` sets).
fn connect(client: &Client) -> Result<ProcessGroup, TrainError> {
    let var = |k: &str| {
        std::env::var(k).map_err(|_| {
            TrainError::Team(format!(
                "{k} is not set: `hpc-ckpt wrap` sets it for the ranks it starts"
            ))
        })
    };
    let host = var("MASTER_ADDR")?;
    let port = var("MASTER_PORT")?;
    let port = port
        .parse()
        .map_err(|_| TrainError::Team(format!("MASTER_PORT={port:?} is not a port")))?;
    let pg = ProcessGroup::connect(&ConnectOptions {
        rank: client.rank as usize,
        world_size: client.world_size as usize,
        rendezvous: Rendezvous::Tcp { host, port },
        timeout: COLLECTIVE_TIMEOUT,
        device_host: None,
    })
    .map_err(|e| TrainError::Team(e.to_string()))?;
    if client.rank == 0 {
        tracing::info!(
            world_size = client.world_size,
            "data-parallel ranks joined (c10d Gloo)"
        );
    }
    Ok(pg)
}

/// The trainer of the newest checkpoint every rank restores: the resume point the supervisor
/// chose, then each older checkpoint; a fresh one when the run has none.
fn restore_agreed(
    tc: &TrainConfig,
    client: &Client,
    team: &mut Team,
) -> Result<Trainer, TrainError> {
    let run_dir = client.run_dir.as_path();
    let Some(first) = client.resume_from.clone() else {
        return Trainer::new(tc.clone(), run_dir);
    };
    let first_step = first
        .file_name()
        .and_then(|n| parse_checkpoint_name(&n.to_string_lossy()));
    let older = RunDir::new(run_dir)
        .list()
        .into_iter()
        .rev()
        .filter(|l| first_step.is_some_and(|s| l.step < s))
        .map(|l| l.path);
    let mut journal = (client.rank == 0)
        .then(|| Journal::open(run_dir))
        .transpose()
        .map_err(TrainError::Journal)?;
    let mut tried = Vec::new();
    for dir in std::iter::once(first).chain(older) {
        let got = restore_dir(tc, run_dir, &dir, (client.rank, client.world_size));
        let faults = got.as_ref().err().and_then(TrainError::checkpoint_faults);
        let fatal = got.is_err() && faults.is_none();
        let n = team.count(&[faults.is_some(), fatal])?;
        if n[1] > 0 {
            return Err(got.err().unwrap_or_else(|| {
                TrainError::Team(format!(
                    "another rank could not restore {}: see its error above",
                    dir.display()
                ))
            }));
        }
        let name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        if n[0] == 0 {
            let trainer = got?;
            if let Some(j) = journal.as_mut() {
                if !tried.is_empty() {
                    j.append(&StoreEvent::Fallback {
                        checkpoint: name.clone(),
                        step: trainer.st.global_step,
                    })
                    .map_err(TrainError::Journal)?;
                }
            }
            return Ok(trainer);
        }
        let faults = faults.unwrap_or_else(|| {
            vec![Fault::new(
                name.clone(),
                format!("{} rank(s) could not restore it (see their errors)", n[0]),
            )]
        });
        for f in &faults {
            tracing::error!(checkpoint = %dir.display(), file = %f.file, reason = %f.reason, rank = client.rank, "checkpoint refused");
        }
        if let Some(j) = journal.as_mut() {
            j.append(&StoreEvent::CheckpointRefused {
                checkpoint: name.clone(),
                faults: faults.iter().map(FaultRecord::from).collect(),
            })
            .map_err(TrainError::Journal)?;
        }
        tried.push(Refused {
            checkpoint: name,
            faults,
        });
    }
    Err(TrainError::NothingRestores {
        searched: run_dir.to_path_buf(),
        tried,
    })
}

/// Rank `rank`'s generator from its [`RANK_STATE_FILE`] (after the replicated state restored
/// rank 0's). A checkpoint of fewer ranks has none for it: every step reseeds, so nothing is
/// lost but the warning says so.
pub(super) fn restore_rank_rng(src: &Source, rank: u32, device: Device) -> Result<(), TrainError> {
    let Some(bytes) = src.loaded.files.get(RANK_STATE_FILE) else {
        tracing::warn!(checkpoint = %src.dir.display(), rank, "no rank_state.json of this rank (a checkpoint of fewer ranks): its generator starts from the step's seed");
        return Ok(());
    };
    let fault = |reason: String| TrainError::Unrestorable {
        dir: src.dir.to_path_buf(),
        file: crate::supervision::ranks::rank_file(rank, RANK_STATE_FILE),
        reason,
    };
    let st: RankState = serde_json::from_slice(bytes)
        .map_err(|e| fault(format!("not valid JSON of a rank state: {e}")))?;
    if st.rank != rank || st.global_step != src.loaded.manifest.step {
        return Err(fault(format!(
            "rank {} at step {} (expected rank {rank} at the manifest's step {})",
            st.rank, st.global_step, src.loaded.manifest.step
        )));
    }
    let rng = unhex(&st.cpu_rng_state)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| fault("cpu_rng_state is not a hex byte string".into()))?;
    restore::restore_cuda_rng(&st.cuda_rng_states, device, |reason| {
        fault(format!("cuda_rng_states{reason}"))
    })?;
    ffi::set_rng_state(Generator::Cpu, &Tensor::from_slice(&rng))
        .map_err(|e| fault(format!("cpu_rng_state: {e}")))
}

impl Trainer {
    pub(super) fn team(&mut self) -> &mut Team {
        self.dp.as_mut().expect("a data-parallel trainer")
    }

    pub(super) fn is_lead(&self) -> bool {
        self.dp.as_ref().is_none_or(|t| t.rank == 0)
    }

    /// The float buffers averaged over the ranks, after each step (see the module doc). A
    /// buffer is a variable that requires no grad (the parameters are those that do, as
    /// [`crate::train::models::named_parameters`] selects): one pass over the store, no set of
    /// names built at every step.
    pub(super) fn share_buffers(&mut self) -> Result<(), TrainError> {
        let buffers: Vec<Tensor> = named_state(&self.vs)
            .into_iter()
            .filter(|(_, t)| !t.requires_grad() && t.is_floating_point())
            .map(|(_, t)| t)
            .collect();
        self.team().average(&buffers)
    }

    /// The loop of one rank (as [`Trainer::train_with`] is for one process).
    fn train_as_rank(&mut self, client: &Client) -> Result<Outcome, TrainError> {
        if self.is_lead() {
            self.journal_started(client)?;
        }
        let mut progress = self.is_lead().then(|| ProgressLine::new(self.total));
        while self.st.global_step < self.total {
            if self.team().stop_agreed {
                self.commit_as_rank(client, false)?;
                if self.is_lead() {
                    tracing::info!(step = self.st.global_step, "stopped at a step boundary");
                }
                return Ok(self.outcome(false));
            }
            let started = Instant::now();
            let (loss, lr) = self.step()?;
            self.advance_rank_save(client)?;
            let gs = self.st.global_step;
            let samples = (self.tc.batch_size * self.tc.grad_accum) as f64;
            let samples_per_s = samples / started.elapsed().as_secs_f64().max(1e-9);
            let eval = self.evaluate_as_rank(gs)?;
            if let Some(p) = progress.as_mut() {
                self.log_metrics(gs, loss, lr, samples_per_s, eval)?;
                p.show(gs, loss, lr, samples_per_s);
            }
            let due = self.step_due(gs, eval.is_some()) || self.team().time_due;
            if due && gs < self.total && self.tc.checkpoint_async {
                self.start_rank_save(client)?;
            } else if due && gs < self.total {
                self.commit_as_rank(client, false)?;
            }
        }
        self.commit_as_rank(client, true)?;
        Ok(self.outcome(true))
    }

    fn outcome(&self, completed: bool) -> Outcome {
        Outcome {
            completed,
            commits: self.commits,
            last_step: self.st.global_step,
        }
    }

    /// `training_started` and the `auto` interval, as [`Trainer::train`] does (rank 0).
    fn journal_started(&mut self, client: &Client) -> Result<(), TrainError> {
        if let Some(prior) = self.tc.checkpoint_auto_mtbf {
            let chain = history::fold(&events::read(&client.run_dir).0);
            self.auto = Some(AutoInterval::from_history(&chain, prior));
        }
        let last = self.metrics_last.take();
        Journal::open(&client.run_dir)
            .and_then(|mut j| {
                j.append(&events::SupervisorEvent::TrainingStarted {
                    step: self.st.global_step,
                    previous_step: last.as_ref().map(|r| r.step),
                    previous_at: last
                        .and_then(|r| r.ts)
                        .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                })
            })
            .map_err(TrainError::Journal)
    }

    /// At an eval step, rank 0 evaluates and every rank takes its value (see
    /// [`Trainer::evaluate_if_due`]).
    fn evaluate_as_rank(&mut self, gs: u64) -> Result<Option<f64>, TrainError> {
        let Some(e) = self.tc.eval.clone() else {
            return Ok(None);
        };
        if !gs.is_multiple_of(e.every_steps.0) {
            return Ok(None);
        }
        let mine = if self.is_lead() {
            self.evaluate(e.batches.0)?
        } else {
            0.0
        };
        let v = self.team().broadcast_value(mine)?;
        self.take_eval(gs, &e.metric, v);
        Ok(Some(v))
    }

    /// Finish the background save in flight, if any; then stage this rank's files, agree that
    /// every rank staged, and ask for the commit of the current step (`done`: the end of
    /// training). Unless this step is committed already. A
    /// failure stops training when it is the save of a stop or the end (`must`), or under
    /// `on_save_error: stop`; otherwise it is logged and training goes on.
    fn commit_as_rank(&mut self, client: &Client, done: bool) -> Result<(), TrainError> {
        let step = self.st.global_step;
        let must = done || self.team().stop_agreed;
        self.finish_rank_save(client)?;
        if self.committed == Some(step) {
            return Ok(());
        }
        self.last_save = Instant::now();
        let started = Instant::now();
        let staged = self.stage(client);
        let failed_here = staged.is_err();
        let failed = self.team().count(&[failed_here])?[0];
        let (result, best_before) = match staged {
            Ok((_, best_before)) if failed > 0 => (
                Err(format!(
                    "{failed} rank(s) could not stage their files (see their errors)"
                )),
                best_before,
            ),
            Ok((req, best_before)) => (client.commit(&req).map_err(|e| e.to_string()), best_before),
            Err(e) => (Err(e.to_string()), None),
        };
        if let Ok(name) = &result {
            self.committed = Some(step);
            self.commits += 1;
            if self.is_lead() {
                // Training waited for all of it: the stall `interval: auto` weighs.
                self.note_stall(started.elapsed().as_secs_f64());
                tracing::debug!(step, checkpoint = %name, "committed");
            }
            return Ok(());
        }
        if let Some(b) = best_before {
            self.st.best = b;
        }
        if failed > 0 {
            clear_dir(client.staging());
        }
        let reason = result.expect_err("handled above");
        let stop = must || self.tc.stop_on_save_error;
        if stop {
            return Err(TrainError::Commit { step, reason });
        }
        tracing::error!(step, error = %reason, "checkpoint failed; training on (checkpoint.on_save_error: continue)");
        Ok(())
    }

    /// Write this rank's files into its staging dir; the request to post, and `best` before
    /// this save changed it (rank 0, with `keep_best`; see [`Trainer::snapshot`]).
    #[allow(clippy::type_complexity)]
    fn stage(
        &mut self,
        client: &Client,
    ) -> Result<(Request, Option<Option<BestMetric>>), TrainError> {
        let step = self.st.global_step;
        let storage = |source| TrainError::Save { step, source };
        let mut req = self.rank_request();
        let own = self.rank_state_json()?;
        let mut snap = Snapshot::new();
        let mut best_before = None;
        if self.is_lead() {
            let (s, meta, before) = self.snapshot(Buffers::default()).map_err(storage)?;
            best_before = before;
            snap = s;
            req.metrics = meta.metrics;
            req.extra = meta.extra;
        }
        snap.add(RANK_STATE_FILE, FileSource::Bytes(own.into()));
        if let Err(e) = write_files(client.staging(), &snap) {
            if let Some(b) = best_before {
                self.st.best = b;
            }
            return Err(storage(e));
        }
        Ok((req, best_before))
    }
}

impl Trainer {
    /// The commit request of the current step (rank 0 adds the metrics and the reference loss
    /// of its snapshot).
    pub(super) fn rank_request(&self) -> Request {
        Request {
            step: self.st.global_step,
            epoch: Some(self.st.epoch),
            done: self.st.global_step >= self.total,
            metrics_logged: true,
            // A stop of the ranks (a signal that may have reached them, not the supervisor).
            stopping: self.dp.as_ref().is_some_and(|t| t.stop_agreed),
            ..Default::default()
        }
    }

    /// This rank's [`RANK_STATE_FILE`] as of now: its generators, its share, the data position.
    pub(super) fn rank_state_json(&self) -> Result<Vec<u8>, TrainError> {
        let rng = ffi::rng_state(Generator::Cpu)?;
        let rng = to_tensor_data("rng", &rng)?;
        let team = self.dp.as_ref().expect("a data-parallel trainer");
        let own = RankState {
            rank: team.rank,
            world_size: team.world,
            global_step: self.st.global_step,
            epoch: self.pos.epoch,
            batch_in_epoch: self.pos.batch_in_epoch,
            share: team.share,
            cpu_rng_state: hex(&rng.bytes),
            cuda_rng_states: cuda_rng_states(self.device)?,
        };
        Ok(serde_json::to_vec_pretty(&own).expect("a rank state serializes"))
    }
}

/// Remove what this rank staged for a save that no rank will ask to commit.
pub(super) fn clear_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
