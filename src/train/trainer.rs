//! The built-in training loop: [`run`] trains the model of a job config, checkpointing through
//! the [`Store`], and resumes exactly from a checkpoint.
//!
//! A checkpoint at global step N is the state after N optimizer steps; a resume runs step N+1
//! next. It holds:
//! - `model.safetensors`: every variable of the model, parameters and buffers (batchnorm running
//!   statistics), by name;
//! - `optimizer.safetensors`: every optimizer state tensor ([`Optimizer::state_tensors`]);
//! - `reference_batch.safetensors`: a fixed small batch (inputs `x`, targets `y`);
//! - with `precision: fp16`, `scaler.safetensors`: the loss scaler's `scale` (float32) and
//!   `growth_tracker` (int32), as `torch.amp.GradScaler` holds them ([`super::amp`]);
//! - `trainer_state.json` ([`TrainerState`]): counters (epoch, position in the epoch, global step,
//!   samples seen, gradient-accumulation position), scheduler state, best metric and its step,
//!   the CPU generator's state (and each CUDA device's, on CUDA), threads, device (and on CUDA
//!   the determinism settings), the config hash and the hashed config, the data fingerprint, the
//!   optimizer's metadata, the loss scaler's counters (fp16), versions;
//! - in the manifest's `extra`: the reference loss (model in eval mode on the reference batch).
//!
//! Precision (`precision: bf16 | fp16`): the forward pass (and the loss) runs under autocast to
//! the half dtype on the training device's type ([`ffi::Autocast`]); weights, gradients and
//! optimizer state stay float32. fp16 adds the loss scaler ([`GradScaler`]): the loss is scaled
//! before backward, gradients unscaled before clipping, the optimizer step skipped when one is
//! inf/NaN, the scale updated after every step. The guarantee below holds per precision.
//!
//! Guarantees (CPU, `deterministic: true`, same thread count): a run interrupted any number of
//! times — by `stop` or by losing everything since an older checkpoint — produces byte-identical
//! weights and optimizer state and the same per-step losses as an uninterrupted run. This holds
//! because every random draw is derived: libtorch is reseeded from `(seed, global step)` before
//! each optimizer step (dropout), the data order of epoch `e` comes from `(seed, e)`, and the
//! model is initialised from the seed; the CPU generator's real state is saved and restored as
//! well (the streams are listed in [`super::seeds`]). After loading, the reference loss is
//! recomputed and must be bit-equal on the CPU. A resume with a config that differs in a key
//! that changes the results is refused with the list of changed keys.
//!
//! Resuming (`trainer/restore.rs`): `--resume auto` walks the checkpoints newest first and uses
//! the first that verifies and restores; one that does not restore (wrong shapes, missing
//! tensors, a state that disagrees with its manifest, a model that does not reproduce its
//! reference loss, …) is refused and journaled like one that does not verify, and an older one
//! is tried. Only when none restores does [`run`] fail ([`TrainError::NothingRestores`], naming
//! each).
//!
//! Saving (`trainer/save.rs`): two-phase by default (`checkpoint.async`) — the state is copied
//! into host buffers the store's persister owns and training goes on while a background thread
//! commits it; at most one persist is in flight, a stop or the end waits for it and then commits
//! the final state in the foreground. The bytes do not depend on the mode. A data-parallel
//! rank's saves are two-phase as well (`trainer/rank_save.rs`).
//!
//! Metrics and the best checkpoint: a checkpoint's manifest metrics are `loss` (of its step),
//! `lr`, and the eval metric only when it was measured at the checkpoint's own step. With
//! `checkpoint.keep_best` the trainer also commits at every eval step (when the monitor is the
//! eval metric), and `trainer_state.best` is the best monitored value over the committed
//! checkpoints under `keep_best.mode`, ties to the newer — what retention keeps as best.
//! Without `keep_best`, `best` is the lowest eval metric so far.
//!
//! libtorch's generators and thread pool are process-global: one [`run`] at a time per process
//! (a lock serialises concurrent calls).

mod data_parallel;
mod error;
mod rank_save;
mod reference;
mod restore;
mod save;

pub use crate::config::trainer::world_fits;
pub use data_parallel::{run_rank, RANK_STATE_FILE};
pub use error::{Refused, TrainError};

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{nn, Device, Tensor};

use super::amp::GradScaler;
use super::config::{changed_keys, DeviceChoice, Precision, TrainConfig};
use super::data::{Dataset, Loader, Position, Split};
use super::ffi::{self, Generator};
use super::models::{named_parameters, named_state, parameter_count, Model};
use super::optim::{Optimizer, OptimizerMeta};
use super::pinned::PinnedStaging;
use super::sched::{Scheduler, SchedulerState};
use super::seeds;
use super::tensors::{copy_tensor, read_safetensors, to_tensor_data, torch_message};
use crate::config::JobConfig;
use crate::storage::journal::now_rfc3339;
use crate::storage::manifest::{parse_checkpoint_name, MANIFEST_FILE};
use crate::storage::metrics::{self as storage_metrics, Record as MetricsRecord};
use crate::storage::persister::{self, Persister};
use crate::storage::retention::Mode;
use crate::storage::verify::Loaded;
use crate::storage::{CommitMeta, Fault, FileSource, Snapshot, StorageError, Store};
use crate::supervision::interval::AutoInterval;
use crate::supervision::{events, history};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const REFERENCE_FILE: &str = "reference_batch.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
/// The fp16 loss scaler's tensors (`precision: fp16` only).
pub const SCALER_FILE: &str = "scaler.safetensors";
/// What a deterministic CUDA run sets `CUBLAS_WORKSPACE_CONFIG` to (PyTorch's "Reproducibility"
/// note: cuBLAS is deterministic only with a fixed workspace).
pub const CUBLAS_WORKSPACE_CONFIG: &str = ":4096:8";
/// Training metrics, one JSON object a line, in the run dir.
pub use crate::storage::metrics::METRICS_FILE;
/// Current [`TrainerState::format_version`].
pub const STATE_FORMAT_VERSION: u32 = 1;
/// The tch crate this build uses and the libtorch it is built for.
pub const TCH_VERSION: &str = "0.26";
pub const LIBTORCH_VERSION: &str = "2.13";

/// Samples in the reference batch: at most this many, and at most one micro-batch
/// (`batch_size`), so that its loss — computed at every save, on the copy thread beside the next
/// step — costs no more than one micro-batch's forward pass.
const REFERENCE_SAMPLES: i64 = 16;

/// What a call of [`run`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Training reached its end (and the final checkpoint is committed).
    pub completed: bool,
    /// Checkpoints committed by this call.
    pub commits: u32,
    /// The global step the model is at.
    pub last_step: u64,
}

/// The best value of the monitored metric so far, and the step it was measured at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestMetric {
    pub metric: String,
    pub value: f64,
    pub step: u64,
}

/// How randomness is derived, and the CPU generator's state at the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngRecord {
    pub seed: u64,
    /// How the per-step seed is derived (documentation for readers of the file).
    pub scheme: String,
    /// `torch.get_rng_state()` of the CPU generator, hex.
    pub cpu_state: String,
    /// On CUDA: `torch.cuda.get_rng_state(n)` of each visible device `n`, hex, in device order
    /// (absent on the CPU, and in checkpoints written before it existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cuda_states: Vec<String>,
}

/// The fp16 loss scaler's counters (its tensors are in [`SCALER_FILE`]; `scale` and
/// `growth_tracker` are repeated here for readers, and must agree with them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerRecord {
    pub scale: f64,
    pub growth_tracker: i64,
    /// Optimizer steps skipped for inf/NaN gradients since the run began.
    pub skipped_steps: u64,
}

/// The determinism settings of a CUDA run, as they were when the trainer started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CudaRecord {
    /// Visible CUDA devices.
    pub devices: usize,
    /// `CUBLAS_WORKSPACE_CONFIG` in this process's environment (`None`: unset).
    pub cublas_workspace_config: Option<String>,
    /// `torch.use_deterministic_algorithms` and `cudnn.deterministic`.
    pub deterministic_algorithms: bool,
    /// `cudnn.benchmark` (off when deterministic).
    pub cudnn_benchmark: bool,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps taken.
    pub global_step: u64,
    /// The data position: the next micro-batch is `batch_in_epoch` of `epoch`.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// Optimizer steps taken since `epoch` began.
    pub step_in_epoch: u64,
    pub samples_seen: u64,
    /// Micro-batches accumulated towards the next optimizer step (0 at every checkpoint: the
    /// trainer checkpoints at step boundaries only).
    pub accum_position: u64,
    pub scheduler: SchedulerState,
    pub best: Option<BestMetric>,
    pub last_eval: Option<f64>,
    pub last_loss: Option<f64>,
    pub rng: RngRecord,
    pub threads: u32,
    pub deterministic: bool,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// On CUDA, the determinism settings (absent on the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<CudaRecord>,
    /// With `precision: fp16`, the loss scaler's counters (absent otherwise, and in checkpoints
    /// written before mixed precision existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<ScalerRecord>,
    pub config_hash: String,
    pub config: serde_json::Value,
    pub data_fingerprint: String,
    pub optimizer: OptimizerMeta,
    pub versions: BTreeMap<String, String>,
}

static TRAINER: Mutex<()> = Mutex::new(());

/// Where a run resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest checkpoint of the run dir that verifies and restores (the pointer's target
    /// first); a fresh start when the run dir holds none.
    Auto,
    /// Never: refuse a run dir that holds checkpoints.
    Never,
    /// This checkpoint dir (verified first), with no fallback.
    From(PathBuf),
}

/// Train the job of `cfg`, committing checkpoints to `store`, resuming as `resume` says.
///
/// `stop` is asked once at every step boundary while work is left, including once before the
/// first step of this call (so the i-th call, from 0, happens at global step `start + i`). When
/// it answers true, the current step is checkpointed (unless already committed) and `run`
/// returns with `completed: false`. At the end the final step is checkpointed and `run` returns
/// `completed: true`; a run that already reached its end returns at once.
pub fn run(
    cfg: &JobConfig,
    store: &mut Store,
    resume: &Resume,
    stop: &dyn Fn() -> bool,
) -> Result<Outcome, TrainError> {
    let _one_at_a_time = TRAINER.lock().unwrap_or_else(|p| p.into_inner());
    let tc = TrainConfig::from_job(cfg)?;
    let mut t = match resume {
        Resume::Auto => restore::resume_auto(&tc, store)?,
        Resume::Never => {
            if !store.run_dir().list().is_empty() {
                return Err(TrainError::Resume {
                    checkpoint: store.run_dir().root().display().to_string(),
                    reason: "--resume never, but the run dir already holds checkpoints: use a \
                             new run dir (or --resume auto)"
                        .into(),
                });
            }
            Trainer::new(tc, store.run_dir().root())?
        }
        Resume::From(p) => restore::resume_from(&tc, store, p)?,
    };
    t.train(store, stop)
}

/// The device of a choice; `cuda` fails loudly when CUDA is not available. The CUDA device is
/// [`local_cuda_index`]'s: a rank's own on a node with one GPU per rank.
pub fn resolve_device(c: DeviceChoice) -> Result<Device, TrainError> {
    match c {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if tch::Cuda::is_available() => Ok(Device::Cuda(local_cuda_index())),
        DeviceChoice::Auto => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(local_cuda_index()))
            } else {
                Err(TrainError::NoCuda(format!(
                    "device: cuda was asked for, but no CUDA device is visible to libtorch (no \
                     GPU or driver, a CPU-only libtorch, or CUDA_VISIBLE_DEVICES hides them{}); \
                     accepted instead: cpu, or auto (CUDA when available)",
                    std::env::var("CUDA_VISIBLE_DEVICES")
                        .map(|v| format!(": CUDA_VISIBLE_DEVICES={v:?}"))
                        .unwrap_or_default()
                )))
            }
        }
    }
}

/// The CUDA device of this process: `LOCAL_RANK` (which the supervisor sets for each rank: its
/// index on its node) modulo the visible devices, so that the ranks of a node use one device
/// each; 0 without `LOCAL_RANK` (one process), or when each rank sees one device
/// (`--gpus-per-task`, `CUDA_VISIBLE_DEVICES`).
fn local_cuda_index() -> usize {
    let visible = tch::Cuda::device_count().max(1) as usize;
    std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(0, |r| r % visible)
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The total number of optimizer steps of the run.
fn total_steps(tc: &TrainConfig, batches_per_epoch: u64) -> u64 {
    let by_epochs = tc
        .epochs
        .map(|e| e.saturating_mul(batches_per_epoch) / tc.grad_accum);
    match (tc.max_steps, by_epochs) {
        (Some(m), Some(e)) => m.min(e),
        (Some(m), None) => m,
        (None, Some(e)) => e,
        (None, None) => 0,
    }
}

struct Trainer {
    tc: TrainConfig,
    device: Device,
    data: Dataset,
    loader: Loader,
    pos: Position,
    vs: nn::VarStore,
    model: Model,
    params: Vec<Tensor>,
    opt: Optimizer,
    sched: Scheduler,
    st: TrainerState,
    reference: (Tensor, Tensor),
    /// The second model instance that computes a save's reference loss on its copy thread
    /// (built before the first step of [`Trainer::train`], or at the first save).
    reference_model: Option<reference::SharedReference>,
    /// On CUDA, the pinned host tensors a save's copy stages the state in (created at the first
    /// save; see [`super::pinned`]).
    pinned: Option<Arc<Mutex<PinnedStaging>>>,
    /// The fp16 loss scaler (`None` unless `precision: fp16`).
    scaler: Option<GradScaler>,
    total: u64,
    /// This process's rank of a data-parallel run (`None`: the only one).
    dp: Option<data_parallel::Team>,
    /// The newest step durably committed (restored from, or saved by this process).
    committed: Option<u64>,
    /// Checkpoints this process committed.
    commits: u32,
    /// The save handed to the persister and not yet durable.
    pending: Option<save::Pending>,
    /// Phase 1 of a background save not yet handed over (its copy may still be running).
    phase1: Option<save::Phase1>,
    /// When the last save began (or training, in this process).
    last_save: Instant,
    /// `checkpoint.interval: auto`: the interval from the measured stalls and the run's MTBF.
    auto: Option<AutoInterval>,
    /// The eval value measured by this process and its step (the checkpoint of that step alone
    /// carries it).
    eval_at: Option<(u64, f64)>,
    metrics: File,
    /// The last record of `metrics.jsonl` when this process opened it: how far the previous
    /// allocation trained (journaled with `training_started`).
    metrics_last: Option<MetricsRecord>,
}

impl Trainer {
    /// A fresh trainer at step 0 for `tc`, in named steps: the process-wide libtorch settings
    /// and the device, the data, the model (initialised from the seed) and its optimizer, the
    /// schedule and the loss scaler, the reference batch, the metrics file, the state record.
    fn new(tc: TrainConfig, run_dir: &Path) -> Result<Trainer, TrainError> {
        keep_freed_heap_memory();
        let (device, cuda) = prepare_libtorch(&tc)?;
        let data = Dataset::load(&tc)?;
        let loader = Loader::new(tc.seed, &data, tc.batch_size);
        let total = total_steps(&tc, loader.batches_per_epoch());
        let Built {
            vs,
            model,
            params,
            opt,
        } = build_model(&tc, device, &data)?;
        let sched = Scheduler::new(tc.scheduler.clone(), tc.optimizer.lr(), total);
        let scaler =
            (tc.precision == Precision::Fp16).then(|| GradScaler::new(tc.loss_scale, device));
        let reference = reference_batch(&tc, &data);
        let (metrics, metrics_last) =
            storage_metrics::open_append(run_dir).map_err(TrainError::Metrics)?;
        let st = initial_state(&tc, device, cuda, &data, &sched, &opt, scaler.as_ref());
        tracing::info!(
            model = tc.model.kind(),
            parameters = parameter_count(&vs),
            data = tc.data.kind(),
            total_steps = total,
            device = %device_name(device),
            threads = tc.threads,
            precision = tc.precision.name(),
            "trainer ready"
        );
        Ok(Trainer {
            tc,
            device,
            data,
            loader,
            pos: Position::default(),
            vs,
            model,
            params,
            opt,
            sched,
            st,
            reference,
            reference_model: None,
            pinned: None,
            scaler,
            total,
            dp: None,
            committed: None,
            commits: 0,
            pending: None,
            phase1: None,
            last_save: Instant::now(),
            auto: None,
            eval_at: None,
            metrics,
            metrics_last,
        })
    }

    /// The model's loss on `(x, y)`, the forward pass under autocast when the precision asks
    /// for it (the loss comes back in whatever dtype autocast gives it).
    fn forward_loss(&self, x: &Tensor, y: &Tensor, train: bool) -> Result<Tensor, TrainError> {
        let _autocast = match self.tc.precision.autocast_kind() {
            Some(kind) => Some(ffi::Autocast::enter(
                ffi::AutocastDevice::of(self.device),
                kind,
            )?),
            None => None,
        };
        Ok(self.model.loss(x, y, train))
    }

    /// The model's loss on the reference batch (eval mode, no grad, the run's precision), as
    /// f32 (what a save records; see [`reference`]).
    fn reference_loss(&self) -> Result<f32, TrainError> {
        reference::loss_of(&self.model, &self.reference, self.tc.precision, self.device)
    }

    /// Train from the current state until the end (committing the final step) or until `stop`
    /// answers true at a step boundary (committing that step); see [`run`]. For the length of
    /// the loop the store belongs to the persister thread ([`persister::scope`]), which also
    /// finishes the persist in flight when training ends with an error.
    fn train(&mut self, store: &mut Store, stop: &dyn Fn() -> bool) -> Result<Outcome, TrainError> {
        if let Some(prior) = self.tc.checkpoint_auto_mtbf {
            let chain = history::fold(&events::read(store.run_dir().root()).0);
            let auto = AutoInterval::from_history(&chain, prior);
            let r = auto.recommend();
            tracing::info!(
                recommended_seconds = format!("{:.0}", r.seconds),
                reason = %r.reason(),
                "checkpoint interval: auto"
            );
            self.auto = Some(auto);
        }
        let last = self.metrics_last.take();
        store
            .journal()
            .append(&events::SupervisorEvent::TrainingStarted {
                step: self.st.global_step,
                previous_step: last.as_ref().map(|r| r.step),
                previous_at: last
                    .and_then(|r| r.ts)
                    .map(|t| humantime::format_rfc3339_millis(t).to_string()),
            })
            .map_err(TrainError::Journal)?;
        self.prepare_reference_model()?;
        self.last_save = Instant::now();
        persister::scope(store, |p| {
            let r = self.train_with(p, stop);
            if r.is_err() {
                // The last save's copy (the parameters are not updated before it is joined):
                // still persisted, as it would have been before training failed.
                let _ = self.hand_over(p, false);
            }
            r
        })
    }

    fn train_with(
        &mut self,
        p: &mut Persister,
        stop: &dyn Fn() -> bool,
    ) -> Result<Outcome, TrainError> {
        let fatal = |f: save::SaveFailed| match f {
            save::SaveFailed::Fatal(e) => Err(e),
            save::SaveFailed::Tolerated => Ok(()),
        };
        let mut progress = ProgressLine::new(self.total);
        if self.st.global_step >= self.total {
            tracing::info!(
                step = self.st.global_step,
                total = self.total,
                "training already complete"
            );
        }
        while self.st.global_step < self.total {
            self.poll_saves(p).or_else(fatal)?;
            if stop() {
                self.commit_unless_committed(p)?;
                tracing::info!(step = self.st.global_step, "stopped at a step boundary");
                return Ok(Outcome {
                    completed: false,
                    commits: self.commits,
                    last_step: self.st.global_step,
                });
            }
            let started = Instant::now();
            let (loss, lr) = self.step()?;
            let gs = self.st.global_step;
            let samples = (self.tc.batch_size * self.tc.grad_accum) as f64;
            let samples_per_s = samples / started.elapsed().as_secs_f64().max(1e-9);
            let eval = self.evaluate_if_due(gs)?;
            self.log_metrics(gs, loss, lr, samples_per_s, eval)?;
            progress.show(gs, loss, lr, samples_per_s);
            let due = self.commit_due(gs, eval.is_some());
            if due && gs < self.total {
                self.save(p, self.tc.checkpoint_async, false)
                    .or_else(fatal)?;
            }
        }
        self.commit_unless_committed(p)?;
        Ok(Outcome {
            completed: true,
            commits: self.commits,
            last_step: self.st.global_step,
        })
    }

    /// At an eval step, evaluate: feed the scheduler, track `best` (without `keep_best`; with it
    /// `best` follows the commits), and keep the value for the checkpoint of this step alone.
    /// Returns the value, or `None` when `gs` is not an eval step.
    fn evaluate_if_due(&mut self, gs: u64) -> Result<Option<f64>, TrainError> {
        let Some(e) = self.tc.eval.clone() else {
            return Ok(None);
        };
        if !gs.is_multiple_of(e.every_steps.0) {
            return Ok(None);
        }
        let v = self.evaluate(e.batches.0)?;
        self.take_eval(gs, &e.metric, v);
        Ok(Some(v))
    }

    /// The eval value `v` of step `gs`: the scheduler sees it, `best` follows it (without
    /// `keep_best`), the checkpoint of this step alone carries it.
    fn take_eval(&mut self, gs: u64, metric: &str, v: f64) {
        self.eval_at = Some((gs, v));
        self.st.last_eval = Some(v);
        self.sched.observe(v);
        self.st.scheduler = self.sched.state().clone();
        if self.tc.keep_best.is_none() {
            note_best(&mut self.st.best, metric, Mode::Min, v, gs);
        }
    }

    /// Append the line of step `gs` to `metrics.jsonl` (with the eval metric at eval steps).
    fn log_metrics(
        &mut self,
        gs: u64,
        loss: f64,
        lr: f64,
        samples_per_s: f64,
        eval: Option<f64>,
    ) -> Result<(), TrainError> {
        let mut m = serde_json::Map::new();
        m.insert("loss".into(), json!(loss));
        m.insert("lr".into(), json!(lr));
        m.insert("samples_per_s".into(), json!(samples_per_s));
        if let (Some(v), Some(e)) = (eval, &self.tc.eval) {
            m.insert(e.metric.clone(), json!(v));
        }
        if let Some(s) = &self.scaler {
            // The scale the next step uses, and the steps skipped so far.
            m.insert("loss_scale".into(), json!(s.scale()));
            m.insert("skipped_steps".into(), json!(s.skipped_steps()));
        }
        let line = json!({"ts": now_rfc3339(), "step": gs, "epoch": self.st.epoch, "metrics": m});
        // One write of the whole line (O_APPEND); a line a kill tore anyway is ended by the next
        // opener.
        storage_metrics::append(&mut self.metrics, &line).map_err(|source| TrainError::Io {
            what: format!("append to {METRICS_FILE}"),
            source,
        })
    }

    /// Whether step `gs` is due for a periodic checkpoint: by the step or the time cadence, by
    /// the `auto` interval, or because it is an eval step whose value `keep_best` monitors.
    fn commit_due(&self, gs: u64, evaluated: bool) -> bool {
        self.step_due(gs, evaluated) || self.time_due()
    }

    /// The part of [`Self::commit_due`] that depends on the step alone (the same on every rank).
    fn step_due(&self, gs: u64, evaluated: bool) -> bool {
        self.tc
            .checkpoint_every_steps
            .is_some_and(|n| gs.is_multiple_of(n))
            || (evaluated && self.tc.commits_at_eval())
    }

    /// The part of [`Self::commit_due`] that depends on the clock (ranks agree on it).
    fn time_due(&self) -> bool {
        let since = self.last_save.elapsed();
        self.tc
            .checkpoint_every_seconds
            .is_some_and(|s| since.as_secs() >= s)
            || self
                .auto
                .as_ref()
                .is_some_and(|a| since.as_secs_f64() >= a.recommend().seconds)
    }

    /// One optimizer step (over `grad_accum` micro-batches); returns (mean loss, lr).
    fn step(&mut self) -> Result<(f64, f64), TrainError> {
        let gs = self.st.global_step;
        let rank = self.dp.as_ref().map_or(0, |t| t.rank());
        tch::manual_seed(seeds::rank_step_seed(self.tc.seed, gs, rank));
        let lr = self.sched.lr(gs);
        self.opt.zero_grad()?;
        let accum = self.tc.grad_accum;
        let epoch_before = self.pos.epoch;
        let mut loss_sum = 0.0f64;
        for a in 0..accum {
            self.st.accum_position = a;
            let idx = self.loader.next(&mut self.pos);
            let idx = match &self.dp {
                Some(team) => team.shard(&idx).to_vec(),
                None => idx,
            };
            let (x, y) = self.data.batch(Split::Train, &idx, self.device);
            let loss = self.forward_loss(&x, &y, true)?;
            loss_sum += loss.double_value(&[]);
            let scaled = if accum > 1 { loss / accum as f64 } else { loss };
            match &self.scaler {
                Some(s) => s.scale_loss(&scaled).backward(),
                None => scaled.backward(),
            }
        }
        self.st.accum_position = 0;
        let mut loss = loss_sum / accum as f64;
        // Every rank's share of the global batch: gradients and loss averaged over the ranks.
        let due = self.dp.is_some() && self.time_due();
        if let Some(team) = self.dp.as_mut() {
            loss = team.reduce_step(&self.params, loss, due)?;
        }
        // With the loss scaler a non-finite loss gives non-finite gradients: the step is skipped
        // and the scale backs off, as with torch.amp.GradScaler. Without it, training diverged.
        if !loss.is_finite() && self.scaler.is_none() {
            return Err(TrainError::NonFinite { step: gs + 1, loss });
        }
        let found_inf = match &self.scaler {
            Some(s) => Some(s.unscale(&self.params)?),
            None => None,
        };
        if let Some(max_norm) = self.tc.grad_clip {
            clip_grad_norm(&self.params, max_norm);
        }
        // A save's copy of the parameters and optimizer state may still be reading them.
        self.fence_copy();
        match (self.scaler.as_mut(), found_inf) {
            (Some(s), Some(found_inf)) => {
                if s.should_skip(&found_inf) {
                    tracing::debug!(
                        step = gs + 1,
                        scale = s.scale(),
                        "inf/NaN gradients: optimizer step skipped"
                    );
                } else {
                    self.opt.step(lr)?;
                }
                s.update(&found_inf)?;
                self.st.scaler = Some(scaler_record(s));
            }
            _ => self.opt.step(lr)?,
        }
        if self.dp.is_some() {
            self.share_buffers()?;
        }
        self.st.global_step += 1;
        self.st.samples_seen += accum * self.tc.batch_size;
        self.st.step_in_epoch = if self.pos.epoch != epoch_before {
            0
        } else {
            self.st.step_in_epoch + 1
        };
        self.st.epoch = self.pos.epoch;
        self.st.batch_in_epoch = self.pos.batch_in_epoch;
        self.st.last_loss = Some(loss);
        tracing::debug!(step = self.st.global_step, loss, lr, "step");
        Ok((loss, lr))
    }

    /// Mean loss over the first `batches` batches of the held-out split (eval mode).
    fn evaluate(&self, batches: u64) -> Result<f64, TrainError> {
        let n = self.data.len(Split::Val);
        let b = self.tc.batch_size as i64;
        let nb = ((n + b - 1) / b).min(batches as i64);
        if nb == 0 {
            return Ok(f64::NAN);
        }
        let mut sum = 0.0;
        let _g = tch::no_grad_guard();
        for i in 0..nb {
            let idx: Vec<i64> = (i * b..((i + 1) * b).min(n)).collect();
            let (x, y) = self.data.batch(Split::Val, &idx, self.device);
            sum += self.forward_loss(&x, &y, false)?.double_value(&[]);
        }
        Ok(sum / nb as f64)
    }
}

/// Make `(metric, v, step)` the best when `best` tracks another metric or `v` is at least as
/// good under `mode` (ties go to the newer step, as retention's do). A non-finite `v` never is.
fn note_best(best: &mut Option<BestMetric>, metric: &str, mode: Mode, v: f64, step: u64) {
    if !v.is_finite() {
        return;
    }
    let better = match best.as_ref() {
        Some(b) if b.metric == metric => match mode {
            Mode::Min => v <= b.value,
            Mode::Max => v >= b.value,
        },
        _ => true,
    };
    if better {
        *best = Some(BestMetric {
            metric: metric.to_owned(),
            value: v,
            step,
        });
    }
}

/// Stop glibc's malloc from handing the step's freed tensor memory back to the kernel after every
/// step. libtorch's CPU allocator is plain `posix_memalign`/`free`: each step frees its
/// activations, gradients and optimizer temporaries (MiB each), which in this process (unlike a
/// Python one) leaves the top of the heap free, so `free` trims it with `brk` and the next step
/// page-faults all of it back in (~500 minor faults a step for the benchmark's mlp, ~30% of its
/// step time). Keeping up to 256 MiB of free heap and serving blocks up to 32 MiB (glibc's
/// maximum) from the heap removes that. Process-wide, once; skipped when the user tunes malloc
/// through the environment (`MALLOC_*_` or `GLIBC_TUNABLES`). No effect on results.
fn keep_freed_heap_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let user_tuned = std::env::vars_os().any(|(k, _)| {
                let k = k.to_string_lossy();
                (k.starts_with("MALLOC_") && k.ends_with('_')) || k == "GLIBC_TUNABLES"
            });
            if user_tuned {
                return;
            }
            use nix::libc::{mallopt, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD};
            // SAFETY: mallopt only sets allocator parameters; it is thread-safe in glibc.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, 256 << 20);
            }
        });
    }
}

/// The process-wide libtorch settings of a run: the device (`device: cuda` without one is
/// refused), the thread count, deterministic algorithms, on CUDA the determinism record, and a
/// check that autocast takes the precision's dtype on this device type (before any step relies
/// on it).
fn prepare_libtorch(tc: &TrainConfig) -> Result<(Device, Option<CudaRecord>), TrainError> {
    let device = resolve_device(tc.device)?;
    tch::set_num_threads(tc.threads as i32);
    ffi::set_deterministic(tc.deterministic).map_err(|e| TrainError::Device(e.to_string()))?;
    let cuda = device.is_cuda().then(|| cuda_determinism(tc.deterministic));
    if let Some(kind) = tc.precision.autocast_kind() {
        drop(ffi::Autocast::enter(ffi::AutocastDevice::of(device), kind)?);
    }
    Ok((device, cuda))
}

/// A model, its parameters and its optimizer, as [`build_model`] makes them.
struct Built {
    vs: nn::VarStore,
    model: Model,
    params: Vec<Tensor>,
    opt: Optimizer,
}

/// The model on `device`, initialised from the seed's init stream, and its optimizer (fresh
/// state) over its named parameters.
fn build_model(tc: &TrainConfig, device: Device, data: &Dataset) -> Result<Built, TrainError> {
    tch::manual_seed(seeds::init_seed(tc.seed));
    let vs = nn::VarStore::new(device);
    let model = Model::build(&vs.root(), &tc.model, data.task())?;
    let named = named_parameters(&vs);
    let params = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let opt = Optimizer::new(tc.optimizer.clone(), named)?;
    Ok(Built {
        vs,
        model,
        params,
        opt,
    })
}

/// The reference batch (on the CPU): the first samples of the held-out split (of the training
/// split when none is held out), at most [`REFERENCE_SAMPLES`] and one micro-batch.
fn reference_batch(tc: &TrainConfig, data: &Dataset) -> (Tensor, Tensor) {
    let split = if data.is_empty(Split::Val) {
        Split::Train
    } else {
        Split::Val
    };
    let k = data
        .len(split)
        .min(REFERENCE_SAMPLES)
        .min(tc.batch_size as i64);
    let idx: Vec<i64> = (0..k).collect();
    data.batch(split, &idx, Device::Cpu)
}

/// The state record of a fresh run (step 0; the generator states are filled in at each save).
fn initial_state(
    tc: &TrainConfig,
    device: Device,
    cuda: Option<CudaRecord>,
    data: &Dataset,
    sched: &Scheduler,
    opt: &Optimizer,
    scaler: Option<&GradScaler>,
) -> TrainerState {
    TrainerState {
        format_version: STATE_FORMAT_VERSION,
        global_step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        step_in_epoch: 0,
        samples_seen: 0,
        accum_position: 0,
        scheduler: sched.state().clone(),
        best: None,
        last_eval: None,
        last_loss: None,
        rng: RngRecord {
            seed: tc.seed,
            scheme: seeds::SCHEME.into(),
            cpu_state: String::new(),
            cuda_states: Vec::new(),
        },
        threads: tc.threads,
        deterministic: tc.deterministic,
        device: device_name(device),
        cuda,
        scaler: scaler.map(scaler_record),
        config_hash: tc.hash(),
        config: tc.hashed(),
        data_fingerprint: data.fingerprint().to_owned(),
        optimizer: opt.meta(),
        versions: versions(),
    }
}

/// On CUDA, every visible device's generator state (hex, device order); nothing on the CPU.
fn cuda_rng_states(device: Device) -> Result<Vec<String>, TrainError> {
    if !device.is_cuda() {
        return Ok(Vec::new());
    }
    (0..tch::Cuda::device_count().max(0) as usize)
        .map(|n| {
            let t = ffi::rng_state(Generator::Cuda(n))?;
            Ok(hex(&to_tensor_data("cuda_rng", &t)?.bytes))
        })
        .collect()
}

/// The loss scaler's counters for `trainer_state.json`.
fn scaler_record(s: &GradScaler) -> ScalerRecord {
    ScalerRecord {
        scale: s.scale(),
        growth_tracker: s.growth_tracker(),
        skipped_steps: s.skipped_steps(),
    }
}

/// A CUDA run's determinism settings: `CUBLAS_WORKSPACE_CONFIG` checked (the process sets it
/// before CUDA starts, see [`set_cuda_determinism_env`]), cuDNN autotuning off when
/// deterministic (it picks algorithms by timing: not reproducible); returned for the record.
fn cuda_determinism(deterministic: bool) -> CudaRecord {
    tch::Cuda::cudnn_set_benchmark(!deterministic);
    let cublas = std::env::var("CUBLAS_WORKSPACE_CONFIG").ok();
    if deterministic && !matches!(cublas.as_deref(), Some(":4096:8" | ":16:8")) {
        tracing::warn!(
            CUBLAS_WORKSPACE_CONFIG = ?cublas,
            "deterministic CUDA run without a fixed cuBLAS workspace (:4096:8 or :16:8): \
             deterministic algorithms will refuse cuBLAS calls"
        );
    }
    CudaRecord {
        devices: tch::Cuda::device_count().max(0) as usize,
        cublas_workspace_config: cublas,
        deterministic_algorithms: deterministic,
        cudnn_benchmark: !deterministic,
    }
}

/// For a deterministic job that may run on CUDA (`device: cuda | auto`), set
/// `CUBLAS_WORKSPACE_CONFIG` to [`CUBLAS_WORKSPACE_CONFIG`] unless the user set it: cuBLAS
/// reads it when CUDA starts, so this must run before anything touches CUDA, and while the
/// process has a single thread (the environment is process-global). Returns whether it set it.
pub fn set_cuda_determinism_env(tc: &TrainConfig) -> bool {
    if !tc.deterministic
        || tc.device == DeviceChoice::Cpu
        || std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_some()
    {
        return false;
    }
    std::env::set_var("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG);
    true
}

fn versions() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("tch".to_owned(), TCH_VERSION.to_owned()),
        ("libtorch".to_owned(), LIBTORCH_VERSION.to_owned()),
    ])
}

/// `torch.nn.utils.clip_grad_norm_` (2-norm over all gradients, scale by
/// `min(1, max_norm / (norm + 1e-6))`).
fn clip_grad_norm(params: &[Tensor], max_norm: f64) {
    let _g = tch::no_grad_guard();
    let mut grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    let Some(first) = grads.first() else {
        return;
    };
    let (kind, device) = (first.kind(), first.device());
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm();
    let coef = (Tensor::full([], max_norm, (kind, device)) / (total + 1e-6)).clamp_max(1.0);
    for g in &mut grads {
        let _ = g.g_mul_(&coef);
    }
}

/// A progress line: rewritten in place about once a second when stderr is a terminal, else a
/// log line at every tenth of the run.
struct ProgressLine {
    tty: bool,
    total: u64,
    last: Instant,
    next_tenth: u64,
}

impl ProgressLine {
    fn new(total: u64) -> Self {
        use std::io::IsTerminal;
        ProgressLine {
            tty: std::io::stderr().is_terminal(),
            total,
            last: Instant::now(),
            next_tenth: 1,
        }
    }

    fn show(&mut self, step: u64, loss: f64, lr: f64, samples_per_s: f64) {
        let pct = step as f64 * 100.0 / self.total.max(1) as f64;
        if self.tty {
            if self.last.elapsed().as_millis() >= 1000 || step == self.total {
                self.last = Instant::now();
                eprint!(
                    "\r  step {step}/{} ({pct:.0}%)  loss {loss:.4}  lr {lr:.2e}  {samples_per_s:.0} samples/s   ",
                    self.total
                );
                if step == self.total {
                    eprintln!();
                }
            }
        } else if step * 10 >= self.next_tenth * self.total {
            self.next_tenth = step * 10 / self.total.max(1) + 1;
            tracing::info!(
                step,
                total = self.total,
                loss = format!("{loss:.4}"),
                lr = format!("{lr:.2e}"),
                samples_per_s = format!("{samples_per_s:.0}"),
                "progress"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_follows_the_mode_and_ties_go_to_the_newer_step() {
        let steps = |mode, values: &[(u64, f64)]| {
            let mut best = None;
            for &(step, v) in values {
                note_best(&mut best, "val_loss", mode, v, step);
            }
            best.map(|b: BestMetric| (b.step, b.value))
        };
        let seen = [(10, 0.5), (20, 0.3), (30, f64::NAN), (40, 0.7), (50, 0.3)];
        assert_eq!(steps(Mode::Min, &seen), Some((50, 0.3)));
        assert_eq!(steps(Mode::Max, &seen), Some((40, 0.7)));
        assert_eq!(steps(Mode::Min, &[(10, f64::NAN)]), None);
        // A best of another metric (the monitor changed) is replaced.
        let mut best = Some(BestMetric {
            metric: "loss".into(),
            value: 0.1,
            step: 5,
        });
        note_best(&mut best, "val_loss", Mode::Min, 0.9, 10);
        assert_eq!(best.map(|b| b.step), Some(10));
    }
}
