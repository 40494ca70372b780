//! How the trainer's state becomes a checkpoint: a two-phase save through the store's
//! [`Persister`] (DESIGN, "Two-phase saves").
//!
//! Phase 1 ([`Trainer::save`]): wait for the persist in flight, if any (that wait is measured,
//! logged and journaled with the commit), then copy the complete state — model, optimizer,
//! reference batch, `trainer_state.json` — into the persister's host buffers, which the previous
//! save's bytes are reused for. On the training thread: the small parts (RNG, trainer state, the
//! model's buffers, which a forward pass in train mode may update); on a helper thread: the
//! parameters, the optimizer state and the reference batch, then the reference loss (a forward
//! pass of a second model instance over the same weights: `reference.rs`). With
//! `checkpoint.async: true` that thread overlaps the next step's forward and backward, which only
//! read what it copies, and [`Trainer::fence_copy`] joins it just before that step's optimizer
//! update mutates them; the snapshot is then handed over at the next step boundary
//! ([`Trainer::hand_over`]). Phase 2: the persister commits the snapshot with the full protocol,
//! in the background (`async: true`) while training goes on, or before `save` returns
//! (`async: false`). Both phases write the same bytes: a checkpoint does not depend on the mode.
//!
//! Guarantees:
//! - `committed` (the step a stop need not save again) moves only when a persist is durable;
//! - with `keep_best`, `best` takes the saved checkpoint's value at the hand-over (the state it
//!   records names what retention keeps) and goes back when that persist fails;
//! - `on_save_error` applies to periodic saves, whenever their failure is learnt (at the next
//!   step boundary, or the next save); the save a stop or the end must leave
//!   ([`Trainer::commit_unless_committed`]) first waits for the persist in flight, then commits in
//!   the foreground, and its failure is always an error.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::reference::ReferenceJob;
use super::*;
use crate::storage::journal::Cadence;
use crate::storage::persister::{Buffers, Persisted, Persister};
use crate::storage::{SaveTiming, TensorData};

/// A save handed to the persister and not yet durable.
#[derive(Debug)]
pub(super) struct Pending {
    step: u64,
    /// `best` before this save changed it (`None`: it did not).
    best_before: Option<Option<BestMetric>>,
}

/// Why a save did not become durable, and whether the caller must stop.
pub(super) enum SaveFailed {
    /// `on_save_error: continue` and a periodic save: logged, training goes on.
    Tolerated,
    Fatal(TrainError),
}

/// Phase 1 of a background save not yet handed over to the persister.
pub(super) enum Phase1 {
    /// The helper thread is still copying (see the module doc).
    Copying(Copying, Staged),
    /// Copied (or failed): to hand over at the next step boundary.
    /// (The snapshot boxed: the enum stays the size of its copying variant.)
    Copied(
        Box<Result<(Snapshot<'static>, CommitMeta), StorageError>>,
        Staged,
    ),
}

/// What the helper thread copies, and how long it took.
pub(super) struct Copying(JoinHandle<Result<Copied, StorageError>>);

pub(super) struct Copied {
    /// The parameters, with their positions in the model file.
    model: Vec<(usize, TensorData<'static>)>,
    optim: Vec<TensorData<'static>>,
    reference: Vec<TensorData<'static>>,
    /// The loss of the reference batch under the copied weights (f32, as restore compares it).
    reference_loss: f32,
    seconds: f64,
}

/// What phase 1 took on the training thread, for the snapshot once the copy is done.
pub(super) struct Staged {
    step: u64,
    background: bool,
    /// `best` before this save changed it (`None`: it did not).
    best_before: Option<Option<BestMetric>>,
    meta: CommitMeta,
    state: Vec<u8>,
    /// The model's buffers, copied on the training thread, by their position in the model file.
    model_buffers: Vec<(usize, TensorData<'static>)>,
    /// The fp16 loss scaler's state (`scaler.safetensors`), copied on the training thread.
    scaler: Option<Vec<TensorData<'static>>>,
    model_kind: &'static str,
    optimizer_kind: &'static str,
    /// The part of the stall already spent: the wait for the previous persist and the training
    /// thread's share of the copy.
    wait_seconds: f64,
    copy_seconds: f64,
    cadence: Option<Cadence>,
}

impl Trainer {
    /// Save the current step (see the module doc). `background`: return once the state is
    /// copied, or its copy overlaps the next step (the persist goes on); else return once it is
    /// durable. `must`: a failure is an error whatever `on_save_error` says (the save of a stop
    /// or the end).
    pub(super) fn save(
        &mut self,
        p: &mut Persister,
        background: bool,
        must: bool,
    ) -> Result<(), SaveFailed> {
        // The interval that made this save due (before the hand-over below feeds the previous
        // save's stall to it).
        let cadence = self.auto.as_ref().map(|a| {
            let r = a.recommend();
            Cadence {
                recommended_seconds: r.seconds,
                actual_seconds: self.last_save.elapsed().as_secs_f64(),
                reason: r.reason(),
            }
        });
        self.hand_over(p, false)?;
        let step = self.st.global_step;
        let waited = p.wait();
        if let Some(done) = waited.persisted {
            let wait = waited.waited.as_secs_f64();
            if wait >= 0.001 {
                tracing::info!(
                    step,
                    waited_for = done.step,
                    seconds = format!("{wait:.3}"),
                    "save waited for the previous checkpoint's background persist"
                );
            }
            if let Err(SaveFailed::Fatal(e)) = self.settle(done, false) {
                return Err(SaveFailed::Fatal(e));
            }
        }
        self.last_save = Instant::now();
        let copy_started = Instant::now();
        let buffers = p.buffers();
        let (copying, mut staged) = match self.start_snapshot(buffers) {
            Ok(s) => s,
            Err(source) => return Err(self.failed(step, source, must)),
        };
        staged.background = background;
        staged.wait_seconds = waited.waited.as_secs_f64();
        staged.copy_seconds = copy_started.elapsed().as_secs_f64();
        staged.cadence = cadence;
        self.phase1 = Some(Phase1::Copying(copying, staged));
        if background {
            tracing::debug!(step, "state copy overlapping the next step");
            return Ok(());
        }
        let phase1 = self.hand_over(p, must)?;
        match p.wait().persisted {
            Some(done) => {
                self.note_stall(phase1 + done.seconds);
                self.settle(done, must)
            }
            None => unreachable!("a persist was just handed over"),
        }
    }

    /// The end of phase 1 of a background save: wait for the helper thread's copy (if one is
    /// running), and assemble the snapshot. Called just before an optimizer update mutates the
    /// parameters and the optimizer state the thread reads, and before any hand-over.
    pub(super) fn fence_copy(&mut self) {
        let (copying, staged) = match self.phase1.take() {
            Some(Phase1::Copying(copying, staged)) => (copying, staged),
            copied_or_none => {
                self.phase1 = copied_or_none;
                return;
            }
        };
        let fenced = Instant::now();
        let copied = copying.0.join().unwrap_or_else(|_| {
            Err(StorageError::Invalid(
                "the save's copy thread panicked".into(),
            ))
        });
        let mut staged = staged;
        staged.copy_seconds += fenced.elapsed().as_secs_f64();
        let snapshot = copied.map(|c| {
            tracing::debug!(
                step = staged.step,
                copy_seconds = c.seconds,
                waited_seconds = fenced.elapsed().as_secs_f64(),
                "state copied beside the training thread"
            );
            assemble(&mut staged, c)
        });
        self.phase1 = Some(Phase1::Copied(Box::new(snapshot), staged));
    }

    /// Hand the snapshot of phase 1 over to the persister, if there is one (fencing its copy
    /// first). `must`: its failure is an error whatever `on_save_error` says.
    /// Returns the training time phase 1 took (0 when there was none).
    pub(super) fn hand_over(&mut self, p: &mut Persister, must: bool) -> Result<f64, SaveFailed> {
        self.fence_copy();
        self.hand_over_copied(p, must)
    }

    /// [`Trainer::hand_over`] of a copy that is done (fenced by the optimizer update of the step
    /// after the save); a copy still running is left running.
    fn hand_over_copied(&mut self, p: &mut Persister, must: bool) -> Result<f64, SaveFailed> {
        let (snapshot, staged) = match self.phase1.take() {
            Some(Phase1::Copied(snapshot, staged)) => (snapshot, staged),
            copying => {
                self.phase1 = copying;
                return Ok(0.0);
            }
        };
        let (step, background) = (staged.step, staged.background);
        let best_before = staged.best_before;
        let restore_best = |t: &mut Trainer| {
            if let Some(b) = best_before.clone() {
                t.st.best = b;
            }
        };
        let (snapshot, meta) = match *snapshot {
            Ok(s) => s,
            Err(source) => {
                restore_best(self);
                return Err(self.failed(step, source, must));
            }
        };
        let stall = meta
            .save
            .as_ref()
            .map_or(0.0, |s| s.wait_seconds + s.copy_seconds);
        tracing::debug!(step, "state copied; handing over to the persister");
        if let Err(source) = p.submit(snapshot, meta) {
            restore_best(self);
            return Err(self.failed(step, source, must));
        }
        self.pending = Some(Pending {
            step,
            best_before: best_before.clone(),
        });
        if background {
            self.note_stall(stall);
        }
        Ok(stall)
    }

    /// With `interval: auto`, feed a save's stall to the interval; log a changed recommendation.
    pub(super) fn note_stall(&mut self, seconds: f64) {
        let Some(auto) = self.auto.as_mut() else {
            return;
        };
        let before = auto.recommend().seconds;
        auto.note_stall(seconds);
        let r = auto.recommend();
        if (r.seconds - before).abs() > 0.1 * before {
            tracing::info!(
                recommended_seconds = format!("{:.0}", r.seconds),
                reason = %r.reason(),
                "checkpoint interval changed"
            );
        }
    }

    /// Take in the outcome of a persist that ended, if one has, and hand over a phase 1 whose
    /// copy is done, without blocking.
    pub(super) fn poll_saves(&mut self, p: &mut Persister) -> Result<(), SaveFailed> {
        self.hand_over_copied(p, false)?;
        match p.poll() {
            Some(done) => self.settle(done, false),
            None => Ok(()),
        }
    }

    /// The checkpoint a stop or the end must leave: wait for the persist in flight, then commit
    /// the current step in the foreground unless it is committed already. A failure here is
    /// always an error (`on_save_error` applies to periodic saves only).
    pub(super) fn commit_unless_committed(&mut self, p: &mut Persister) -> Result<(), TrainError> {
        if let Err(SaveFailed::Fatal(e)) = self.hand_over(p, false) {
            return Err(e);
        }
        // The persist in flight may be this very step (or fail, with on_save_error: stop).
        if let Some(done) = p.wait().persisted {
            if let Err(SaveFailed::Fatal(e)) = self.settle(done, false) {
                return Err(e);
            }
        }
        if self.committed == Some(self.st.global_step) {
            return Ok(());
        }
        match self.save(p, false, true) {
            Ok(()) => Ok(()),
            Err(SaveFailed::Fatal(e)) => Err(e),
            Err(SaveFailed::Tolerated) => unreachable!("a save that must be made fails fatally"),
        }
    }

    /// A persist ended: move `committed` on success; on failure put `best` back and apply
    /// `on_save_error` (or fail, when `must`).
    fn settle(&mut self, done: Persisted, must: bool) -> Result<(), SaveFailed> {
        let pending = self.pending.take();
        debug_assert_eq!(pending.as_ref().map(|p| p.step), Some(done.step));
        match done.result {
            Ok(_) => {
                self.committed = Some(done.step);
                self.commits += 1;
                Ok(())
            }
            Err(source) => {
                if let Some(Pending {
                    best_before: Some(b),
                    ..
                }) = pending
                {
                    self.st.best = b;
                }
                Err(self.failed(done.step, source, must))
            }
        }
    }

    /// A save of `step` failed (the store logged and journaled it when it got that far).
    fn failed(&self, step: u64, source: StorageError, must: bool) -> SaveFailed {
        if must || self.tc.stop_on_save_error {
            return SaveFailed::Fatal(TrainError::Save { step, source });
        }
        tracing::error!(step, error = %source, "checkpoint failed; training on (checkpoint.on_save_error: continue)");
        SaveFailed::Tolerated
    }

    /// Phase 1 in one go, on the calling thread's time: the current state as a snapshot in
    /// `buffers`, the commit's metadata, and `best` before this save changed it (see
    /// [`Trainer::start_snapshot`]). For the ranks' saves.
    #[allow(clippy::type_complexity)]
    pub(super) fn snapshot(
        &mut self,
        buffers: Buffers,
    ) -> Result<(Snapshot<'static>, CommitMeta, Option<Option<BestMetric>>), StorageError> {
        let (copying, mut staged) = self.start_snapshot(buffers)?;
        let copied = copying.0.join().unwrap_or_else(|_| {
            Err(StorageError::Invalid(
                "the save's copy thread panicked".into(),
            ))
        });
        match copied {
            Ok(c) => {
                let (snap, mut meta) = assemble(&mut staged, c);
                meta.save = None;
                Ok((snap, meta, staged.best_before))
            }
            Err(e) => {
                if let Some(b) = staged.best_before {
                    self.st.best = b;
                }
                Err(e)
            }
        }
    }

    /// Phase 1 of a rank's background save (no persister: the rank stages its own files, see
    /// `rank_save.rs`): start the copy as [`Trainer::save`] does; the next step's optimizer
    /// update fences it ([`Trainer::fence_copy`]) and [`Trainer::take_copied`] takes it.
    pub(super) fn start_background_copy(&mut self) -> Result<(), StorageError> {
        let (copying, mut staged) = self.start_snapshot(Buffers::default())?;
        staged.background = true;
        self.phase1 = Some(Phase1::Copying(copying, staged));
        Ok(())
    }

    /// The snapshot of a fenced phase 1 (`None` while none is fenced), without its timing, and
    /// `best` before that save changed it (the caller puts it back when the save fails).
    #[allow(clippy::type_complexity)]
    pub(super) fn take_copied(
        &mut self,
    ) -> Option<(
        Result<(Snapshot<'static>, CommitMeta), StorageError>,
        Option<Option<BestMetric>>,
    )> {
        match self.phase1.take() {
            Some(Phase1::Copied(snapshot, staged)) => {
                let snapshot = (*snapshot).map(|(snap, mut meta)| {
                    meta.save = None;
                    (snap, meta)
                });
                Some((snapshot, staged.best_before))
            }
            other => {
                self.phase1 = other;
                None
            }
        }
    }

    /// Start phase 1 as named steps: take this checkpoint's `best`, write down the small state
    /// (RNG, scheduler, optimizer meta, `trainer_state.json`), copy the model's buffers here,
    /// sync the reference model, and start the helper thread that copies the parameters, the
    /// optimizer state and the reference batch into `buffers`, then computes the reference loss.
    /// On an error `best` is put back; an error of the thread comes with its join (the caller
    /// puts `best` back).
    pub(super) fn start_snapshot(
        &mut self,
        mut buffers: Buffers,
    ) -> Result<(Copying, Staged), StorageError> {
        let step = self.st.global_step;
        let metrics = self.checkpoint_metrics();
        let best_before = self.take_best(&metrics);
        let restore_best = |t: &mut Trainer, e: StorageError| {
            if let Some(b) = best_before.clone() {
                t.st.best = b;
            }
            e
        };
        let state = self
            .state_json(&mut buffers)
            .map_err(|e| restore_best(self, e))?;
        let (model_buffers, params) =
            split_model(named_state(&self.vs), &mut buffers).map_err(|e| restore_best(self, e))?;
        // The loss scaler's few bytes here: the next step updates them after its fence.
        let scaler = self
            .scaler_tensors(&mut buffers)
            .map_err(|e| restore_best(self, e))?;
        let job = self.reference_job().map_err(|e| {
            let e = StorageError::Invalid(format!("the reference loss: {e}"));
            restore_best(self, e)
        })?;
        let pinned = self
            .device
            .is_cuda()
            .then(|| self.pinned.get_or_insert_with(Default::default).clone());
        let copying = start_copy(
            buffers,
            (params, self.opt.state_tensors(), pinned),
            vec![
                ("x".to_string(), self.reference.0.shallow_clone()),
                ("y".to_string(), self.reference.1.shallow_clone()),
            ],
            job,
        )
        .map_err(|e| restore_best(self, e))?;
        // The reference loss's keys join these in `assemble`, once the thread computed it.
        let mut extra = serde_json::Map::new();
        extra.insert("reference_device".into(), json!(device_name(self.device)));
        let meta = CommitMeta {
            step,
            epoch: Some(self.st.epoch),
            metrics,
            job: None,
            versions: versions(),
            extra,
            save: None,
        };
        let staged = Staged {
            step,
            background: false,
            best_before,
            meta,
            state,
            model_buffers,
            scaler,
            model_kind: self.tc.model.kind(),
            optimizer_kind: self.tc.optimizer.kind(),
            wait_seconds: 0.0,
            copy_seconds: 0.0,
            cadence: None,
        };
        Ok((copying, staged))
    }

    /// With `keep_best`, `best` takes this checkpoint's monitored value when it is at least as
    /// good, so the state it records names what retention keeps. Returns `best` before, if it
    /// changed.
    fn take_best(&mut self, metrics: &BTreeMap<String, f64>) -> Option<Option<BestMetric>> {
        let b = self.tc.keep_best.as_ref()?;
        let &v = metrics.get(&b.monitor)?;
        let before = self.st.best.clone();
        note_best(
            &mut self.st.best,
            &b.monitor,
            b.mode,
            v,
            self.st.global_step,
        );
        (self.st.best != before).then_some(before)
    }

    /// The CPU (and CUDA) generators' state, the scheduler's and the optimizer's meta into the
    /// trainer state, and that as `trainer_state.json`'s bytes.
    fn state_json(&mut self, buffers: &mut Buffers) -> Result<Vec<u8>, StorageError> {
        let invalid = |e: &dyn std::fmt::Display| StorageError::Invalid(e.to_string());
        let rng = ffi::rng_state(Generator::Cpu).map_err(|e| invalid(&e))?;
        let rng = to_tensor_data("rng", &rng).map_err(|e| invalid(&e))?;
        self.st.rng.cpu_state = hex(&rng.bytes);
        self.st.rng.cuda_states = cuda_rng_states(self.device).map_err(|e| invalid(&e))?;
        self.st.scheduler = self.sched.state().clone();
        self.st.optimizer = self.opt.meta();
        let mut state = buffers.file(STATE_FILE, 0);
        serde_json::to_writer_pretty(&mut state, &self.st).map_err(|e| invalid(&e))?;
        Ok(state)
    }

    /// The fp16 loss scaler's tensors (scale, growth tracker) copied into `buffers`, if the
    /// run has a scaler.
    fn scaler_tensors(
        &self,
        buffers: &mut Buffers,
    ) -> Result<Option<Vec<TensorData<'static>>>, StorageError> {
        let Some(s) = &self.scaler else {
            return Ok(None);
        };
        s.state_tensors()
            .iter()
            .map(|(n, t)| {
                copy_tensor(n, t, |len| buffers.tensor(SCALER_FILE, n, len))
                    .map_err(|e| StorageError::Invalid(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The manifest metrics of the checkpoint of the current step: its `loss` and `lr`, and the
    /// eval metric only when it was measured at this very step.
    fn checkpoint_metrics(&self) -> BTreeMap<String, f64> {
        let step = self.st.global_step;
        let mut metrics = BTreeMap::new();
        if let Some(l) = self.st.last_loss {
            metrics.insert("loss".to_owned(), l);
        }
        if let (Some(e), Some((at, v))) = (&self.tc.eval, self.eval_at) {
            if at == step && v.is_finite() {
                metrics.insert(e.metric.clone(), v);
            }
        }
        metrics.insert("lr".to_owned(), self.sched.lr(step.saturating_sub(1)));
        metrics
    }
}

/// The model's variables in file order, split: its buffers (no grad; a forward pass in train
/// mode may update them, e.g. batchnorm's running statistics) copied here, by position, and its
/// parameters (with their positions) left for the helper thread.
#[allow(clippy::type_complexity)]
fn split_model(
    vars: Vec<(String, Tensor)>,
    buffers: &mut Buffers,
) -> Result<
    (
        Vec<(usize, TensorData<'static>)>,
        Vec<(usize, String, Tensor)>,
    ),
    StorageError,
> {
    let mut copied = Vec::new();
    let mut params = Vec::new();
    for (i, (n, t)) in vars.into_iter().enumerate() {
        if t.requires_grad() {
            params.push((i, n, t));
        } else {
            let d = copy_tensor(&n, &t, |len| buffers.tensor(MODEL_FILE, &n, len))
                .map_err(|e| StorageError::Invalid(e.to_string()))?;
            copied.push((i, d));
        }
    }
    Ok((copied, params))
}

/// What the copy thread copies: the parameters (with their positions in the model file), the
/// optimizer state, and on CUDA the pinned staging to copy them through.
type State = (
    Vec<(usize, String, Tensor)>,
    Vec<(String, Tensor)>,
    Option<Arc<Mutex<PinnedStaging>>>,
);

/// Start the helper thread that copies the parameters and the optimizer state (`state`) and the
/// reference batch into `buffers`, then computes the reference loss (`job`, whose model aliases
/// the live parameters). Shallow clones: the thread reads the live tensors, so they must not
/// change until it is joined.
fn start_copy(
    mut buffers: Buffers,
    state: State,
    reference: Vec<(String, Tensor)>,
    job: ReferenceJob,
) -> Result<Copying, StorageError> {
    let thread = std::thread::Builder::new()
        .name("save-copy".into())
        .spawn(move || {
            let started = Instant::now();
            let (params, optim) = stage_on_host(state)?;
            let mut copy = |file: &str, n: &str, t: &Tensor| {
                copy_tensor(n, t, |len| buffers.tensor(file, n, len))
                    .map_err(|e| StorageError::Invalid(e.to_string()))
            };
            let model = params
                .iter()
                .map(|(_, n, t)| copy(MODEL_FILE, n, t))
                .collect::<Result<Vec<_>, _>>()?;
            let optim = optim
                .iter()
                .map(|(n, t)| copy(OPTIMIZER_FILE, n, t))
                .collect::<Result<Vec<_>, _>>()?;
            let reference = reference
                .iter()
                .map(|(n, t)| copy(REFERENCE_FILE, n, t))
                .collect::<Result<Vec<_>, _>>()?;
            let reference_loss = job
                .run()
                .map_err(|e| StorageError::Invalid(format!("the reference loss: {e}")))?;
            // Params in file order, each with its position, for `assemble`.
            let model = params.iter().map(|(i, ..)| *i).zip(model).collect();
            Ok(Copied {
                model,
                optim,
                reference,
                reference_loss,
                seconds: started.elapsed().as_secs_f64(),
            })
        })
        .map_err(|e| StorageError::Invalid(format!("cannot start the copy thread: {e}")))?;
    Ok(Copying(thread))
}

/// On CUDA, the parameters and the optimizer state staged in pinned host memory (complete when
/// this returns; see [`crate::train::pinned`]); on the CPU (no staging), as they are.
#[allow(clippy::type_complexity)]
fn stage_on_host(
    (params, optim, pinned): State,
) -> Result<(Vec<(usize, String, Tensor)>, Vec<(String, Tensor)>), StorageError> {
    let Some(pinned) = pinned else {
        return Ok((params, optim));
    };
    let keyed: Vec<(String, &Tensor)> = params
        .iter()
        .map(|(_, n, t)| (format!("{MODEL_FILE}/{n}"), t))
        .chain(
            optim
                .iter()
                .map(|(n, t)| (format!("{OPTIMIZER_FILE}/{n}"), t)),
        )
        .collect();
    let staged = pinned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stage(&keyed)
        .map_err(|e| StorageError::Invalid(e.to_string()))?;
    let mut host = staged.into_iter();
    let mut next = || host.next().expect("stage returns one tensor per input");
    let params = params.into_iter().map(|(i, n, _)| (i, n, next())).collect();
    let optim = optim.into_iter().map(|(n, _)| (n, next())).collect();
    Ok((params, optim))
}

/// The snapshot of phase 1 once the copy is done: the model file (buffers and parameters back
/// in file order), the optimizer's, the reference batch's and the trainer state; the commit's
/// metadata with the save's timing.
fn assemble(staged: &mut Staged, c: Copied) -> (Snapshot<'static>, CommitMeta) {
    let meta_of = |kind: &str| {
        BTreeMap::from([
            ("format".to_owned(), "hpc-ckpt-trainer".to_owned()),
            ("content".to_owned(), kind.to_owned()),
        ])
    };
    let mut model: Vec<(usize, TensorData<'static>)> = std::mem::take(&mut staged.model_buffers);
    model.extend(c.model);
    model.sort_by_key(|(i, _)| *i);
    let mut snap = Snapshot::new();
    snap.add(
        MODEL_FILE,
        FileSource::Tensors {
            tensors: model.into_iter().map(|(_, t)| t).collect(),
            metadata: meta_of(staged.model_kind),
        },
    );
    snap.add(
        OPTIMIZER_FILE,
        FileSource::Tensors {
            tensors: c.optim,
            metadata: meta_of(staged.optimizer_kind),
        },
    );
    snap.add(
        REFERENCE_FILE,
        FileSource::Tensors {
            tensors: c.reference,
            metadata: meta_of("reference batch"),
        },
    );
    if let Some(tensors) = staged.scaler.take() {
        snap.add(
            SCALER_FILE,
            FileSource::Tensors {
                tensors,
                metadata: meta_of("loss scaler"),
            },
        );
    }
    snap.add(
        STATE_FILE,
        FileSource::Bytes(std::mem::take(&mut staged.state).into()),
    );
    let mut meta = staged.meta.clone();
    let loss = c.reference_loss;
    meta.extra
        .insert("reference_loss".into(), json!(loss as f64));
    meta.extra.insert(
        "reference_loss_bits".into(),
        json!(format!("{:#010x}", loss.to_bits())),
    );
    meta.save = Some(SaveTiming {
        background: staged.background,
        wait_seconds: staged.wait_seconds,
        copy_seconds: staged.copy_seconds,
        cadence: staged.cadence.clone(),
    });
    (snap, meta)
}
