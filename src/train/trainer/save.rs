//! How the trainer's state becomes a checkpoint: a two-phase save through the store's
//! [`Persister`] (DESIGN, "Two-phase saves").
//!
//! Phase 1 ([`Trainer::save`], on the training thread): wait for the persist in flight, if any
//! (that wait is measured, logged and journaled with the commit), then copy the complete state —
//! model, optimizer, reference batch, `trainer_state.json` — into the persister's host buffers,
//! which the previous save's bytes are reused for. Phase 2: the persister commits the snapshot
//! with the full protocol, in the background (`checkpoint.async: true`) while training goes on,
//! or before `save` returns (`async: false`). Both phases write the same bytes: a checkpoint does
//! not depend on the mode.
//!
//! Guarantees:
//! - `committed` (the step a stop need not save again) moves only when a persist is durable;
//! - with `keep_best`, `best` takes the saved checkpoint's value at the hand-over (the state it
//!   records names what retention keeps) and goes back when that persist fails;
//! - `on_save_error` applies to periodic saves, whenever their failure is learnt (at the next
//!   step boundary, or the next save); the save a stop or the end must leave
//!   ([`Trainer::commit_unless_committed`]) first waits for the persist in flight, then commits in
//!   the foreground, and its failure is always an error.

use std::time::Instant;

use super::*;
use crate::storage::journal::Cadence;
use crate::storage::persister::{Buffers, Persisted, Persister};
use crate::storage::SaveTiming;

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

impl Trainer {
    /// Save the current step (see the module doc). `background`: return once the state is
    /// copied (the persist goes on); else return once it is durable. `must`: a failure is an
    /// error whatever `on_save_error` says (the save of a stop or the end).
    pub(super) fn save(
        &mut self,
        p: &mut Persister,
        background: bool,
        must: bool,
    ) -> Result<(), SaveFailed> {
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
        let cadence = self.auto.as_ref().map(|a| {
            let r = a.recommend();
            Cadence {
                recommended_seconds: r.seconds,
                actual_seconds: self.last_save.elapsed().as_secs_f64(),
                reason: r.reason(),
            }
        });
        self.last_save = Instant::now();
        let copy_started = Instant::now();
        let mut buffers = p.buffers();
        let (snapshot, mut meta, best_before) = match self.snapshot(&mut buffers) {
            Ok(s) => s,
            Err(source) => return Err(self.failed(step, source, must)),
        };
        drop(buffers);
        let phase1 = waited.waited.as_secs_f64() + copy_started.elapsed().as_secs_f64();
        meta.save = Some(SaveTiming {
            background,
            wait_seconds: waited.waited.as_secs_f64(),
            copy_seconds: copy_started.elapsed().as_secs_f64(),
            cadence,
        });
        tracing::debug!(
            step,
            background,
            "state copied; handing over to the persister"
        );
        if let Err(source) = p.submit(snapshot, meta) {
            if let Some(b) = best_before {
                self.st.best = b;
            }
            return Err(self.failed(step, source, must));
        }
        self.pending = Some(Pending { step, best_before });
        if background {
            self.note_stall(phase1);
            return Ok(());
        }
        match p.wait().persisted {
            Some(done) => {
                self.note_stall(phase1 + done.seconds);
                self.settle(done, must)
            }
            None => unreachable!("a persist was just handed over"),
        }
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

    /// Take in the outcome of a persist that ended, if one has, without blocking.
    pub(super) fn poll_saves(&mut self, p: &mut Persister) -> Result<(), SaveFailed> {
        match p.poll() {
            Some(done) => self.settle(done, false),
            None => Ok(()),
        }
    }

    /// The checkpoint a stop or the end must leave: wait for the persist in flight, then commit
    /// the current step in the foreground unless it is committed already. A failure here is
    /// always an error (`on_save_error` applies to periodic saves only).
    pub(super) fn commit_unless_committed(&mut self, p: &mut Persister) -> Result<(), TrainError> {
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

    /// Phase 1: the current state as a snapshot in `buffers`, the commit's metadata, and `best`
    /// before this save changed it. With `keep_best`, `best` takes this checkpoint's monitored
    /// value when it is at least as good, so the state it records names what retention keeps.
    pub(super) fn snapshot(
        &mut self,
        buffers: &mut Buffers,
    ) -> Result<(Snapshot<'static>, CommitMeta, Option<Option<BestMetric>>), StorageError> {
        let invalid = |e: &dyn std::fmt::Display| StorageError::Invalid(e.to_string());
        let step = self.st.global_step;
        let metrics = self.checkpoint_metrics();
        let mut best_before = None;
        if let Some(b) = &self.tc.keep_best {
            if let Some(&v) = metrics.get(&b.monitor) {
                let before = self.st.best.clone();
                note_best(&mut self.st.best, &b.monitor, b.mode, v, step);
                if self.st.best != before {
                    best_before = Some(before);
                }
            }
        }
        let restore_best = |t: &mut Trainer, e: StorageError| {
            if let Some(b) = best_before.clone() {
                t.st.best = b;
            }
            e
        };
        let rng = ffi::rng_state(Generator::Cpu).map_err(|e| restore_best(self, invalid(&e)))?;
        let rng = to_tensor_data("rng", &rng).map_err(|e| restore_best(self, invalid(&e)))?;
        self.st.rng.cpu_state = hex(&rng.bytes);
        self.st.rng.cuda_states =
            cuda_rng_states(self.device).map_err(|e| restore_best(self, invalid(&e)))?;
        self.st.scheduler = self.sched.state().clone();
        self.st.optimizer = self.opt.meta();
        let copied = |buffers: &mut Buffers, file: &str, list: Vec<(String, Tensor)>| {
            list.iter()
                .map(|(n, t)| copy_tensor(n, t, |len| buffers.tensor(file, n, len)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(&e))
        };
        let scaler = match &self.scaler {
            Some(s) => Some(
                copied(buffers, SCALER_FILE, s.state_tensors())
                    .map_err(|e| restore_best(self, e))?,
            ),
            None => None,
        };
        // The copy into the host buffers (memory bandwidth) runs on a helper thread while this
        // thread computes the reference batch's loss (a forward pass in eval mode, which only
        // reads the parameters): the save's stall is the longer of the two, not their sum.
        let lists = (
            named_state(&self.vs),
            self.opt.state_tensors(),
            vec![
                ("x".to_string(), self.reference.0.shallow_clone()),
                ("y".to_string(), self.reference.1.shallow_clone()),
            ],
        );
        let started = Instant::now();
        let (files, ref_loss, reference_seconds) = std::thread::scope(|scope| {
            let copier = std::thread::Builder::new()
                .name("save-copy".into())
                .spawn_scoped(scope, || {
                    let (model, optim, reference) = lists;
                    let model = copied(buffers, MODEL_FILE, model)?;
                    let optim = copied(buffers, OPTIMIZER_FILE, optim)?;
                    let reference = copied(buffers, REFERENCE_FILE, reference)?;
                    Ok::<_, StorageError>((model, optim, reference, started.elapsed()))
                })
                .map_err(|e| StorageError::Invalid(format!("cannot start the copy thread: {e}")));
            let ref_loss = self
                .reference_loss()
                .map_err(|e| StorageError::Invalid(format!("the reference loss: {e}")));
            let reference_seconds = started.elapsed().as_secs_f64();
            let files = copier.and_then(|c| c.join().expect("the save's copy thread panicked"));
            (files, ref_loss, reference_seconds)
        });
        let ref_loss = ref_loss.map_err(|e| restore_best(self, e))?;
        let (model, optim, reference, copy_time) = files.map_err(|e| restore_best(self, e))?;
        tracing::debug!(
            step,
            reference_seconds,
            copy_seconds = copy_time.as_secs_f64(),
            "state copied and reference loss computed side by side"
        );
        let mut state = buffers.file(STATE_FILE, 0);
        serde_json::to_writer_pretty(&mut state, &self.st)
            .map_err(|e| restore_best(self, invalid(&e)))?;
        let meta_of = |kind: &str| {
            BTreeMap::from([
                ("format".to_owned(), "hpc-ckpt-trainer".to_owned()),
                ("content".to_owned(), kind.to_owned()),
            ])
        };
        let mut snap = Snapshot::new();
        snap.add(
            MODEL_FILE,
            FileSource::Tensors {
                tensors: model,
                metadata: meta_of(self.tc.model.kind()),
            },
        );
        snap.add(
            OPTIMIZER_FILE,
            FileSource::Tensors {
                tensors: optim,
                metadata: meta_of(self.tc.optimizer.kind()),
            },
        );
        snap.add(
            REFERENCE_FILE,
            FileSource::Tensors {
                tensors: reference,
                metadata: meta_of("reference batch"),
            },
        );
        if let Some(tensors) = scaler {
            snap.add(
                SCALER_FILE,
                FileSource::Tensors {
                    tensors,
                    metadata: meta_of("loss scaler"),
                },
            );
        }
        snap.add(STATE_FILE, FileSource::Bytes(state.into()));
        let mut extra = serde_json::Map::new();
        extra.insert("reference_loss".into(), json!(ref_loss as f64));
        extra.insert(
            "reference_loss_bits".into(),
            json!(format!("{:#010x}", ref_loss.to_bits())),
        );
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
        Ok((snap, meta, best_before))
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
