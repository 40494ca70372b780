//! How a checkpoint becomes the trainer's state: choosing it ([`resume_auto`] walks the
//! candidates newest first) and restoring it ([`Trainer::restore`], a sequence of named steps).
//!
//! Guarantees:
//! - every restore error names the checkpoint dir and the file at fault;
//! - a checkpoint that does not restore is treated like one that does not verify: logged at
//!   ERROR, journaled as `checkpoint_refused` (`{"checkpoint", "faults": [{"file", "reason"}]}`,
//!   the store's shape), and the next older checkpoint is tried in a fresh [`Trainer`] (a failed
//!   restore leaves its trainer half-written, so it is dropped);
//! - an error that says the job does not fit the run (a changed config, thread count or data:
//!   [`TrainError::checkpoint_faults`] is `None`) stops the walk at once: no older checkpoint of
//!   the run would fit either;
//! - `checkpoint_loaded` is journaled for the checkpoint used and no other, `fallback` when it is
//!   not the first candidate; when none restores, [`TrainError::NothingRestores`] names each
//!   checkpoint tried and why.

use std::path::Path;

use super::*;
use crate::storage::journal::{FaultRecord, StoreEvent};
use crate::storage::run_dir::Listed;
use crate::storage::verify;
use crate::storage::Fault;

/// `--resume auto`: the newest checkpoint that verifies and restores. Candidates, newest first:
/// the one the store resolves (the pointer's target when it verifies), then every older one.
/// Returns a fresh trainer when the run has no checkpoint at all.
pub(super) fn resume_auto(tc: &TrainConfig, store: &mut Store) -> Result<Trainer, TrainError> {
    let resolution = store.run_dir().resolve();
    let mut refused = Vec::new();
    for (checkpoint, faults) in resolution.refused {
        refuse(store, Refused { checkpoint, faults }, &mut refused)?;
    }
    let Some((first, _)) = resolution.chosen else {
        if refused.is_empty() {
            return Trainer::new(tc.clone(), store.run_dir().root());
        }
        return Err(nothing_restores(store, refused));
    };
    let older: Vec<Listed> = store
        .run_dir()
        .list()
        .into_iter()
        .rev()
        .filter(|l| l.step < first.step)
        .collect();
    for candidate in std::iter::once(first).chain(older) {
        match restore_dir(tc, store.run_dir().root(), &candidate.path, (0, 1)) {
            Ok(trainer) => {
                journal_used(store, &candidate, !refused.is_empty())?;
                return Ok(trainer);
            }
            Err(e) => match e.checkpoint_faults() {
                Some(faults) => {
                    let checkpoint = candidate.name.clone();
                    refuse(store, Refused { checkpoint, faults }, &mut refused)?
                }
                None => return Err(e),
            },
        }
    }
    Err(nothing_restores(store, refused))
}

/// `--resume PATH`: that checkpoint (verified first) or nothing; when it does not verify or
/// restore, [`TrainError::NothingRestores`] names it.
pub(super) fn resume_from(
    tc: &TrainConfig,
    store: &Store,
    dir: &Path,
) -> Result<Trainer, TrainError> {
    restore_dir(tc, store.run_dir().root(), dir, (0, 1)).map_err(|e| match e.checkpoint_faults() {
        Some(faults) => TrainError::NothingRestores {
            searched: dir.to_path_buf(),
            tried: vec![Refused {
                checkpoint: dir.display().to_string(),
                faults,
            }],
        },
        None => e,
    })
}

/// Verify and read the checkpoint in `dir`, then restore it into a fresh trainer, as rank
/// `rank` of `world` (`(0, 1)` for a run of one rank). A checkpoint written by several ranks is
/// read through [`rank_view`]; one of another world size restores its replicated state, with a
/// warning (the run's numbers then differ from an uninterrupted run of either size).
pub(super) fn restore_dir(
    tc: &TrainConfig,
    run_dir: &Path,
    dir: &Path,
    (rank, world): (u32, u32),
) -> Result<Trainer, TrainError> {
    let loaded = verify::load_checkpoint(dir).map_err(|faults| {
        TrainError::Load(StorageError::Corrupt {
            dir: dir.to_path_buf(),
            faults,
        })
    })?;
    let saved = crate::supervision::protocol::world_of(&loaded.manifest).world;
    // A rank of a multi-rank job: its supervisor has said so already (once, for the job).
    if saved != world && rank == 0 && world > 1 {
        tracing::info!(checkpoint = %dir.display(), saved_world_size = saved, world_size = world,
            "resuming with another world size: the numbers differ from an uninterrupted run of \
             either size");
    } else if saved != world && rank == 0 {
        tracing::warn!(checkpoint = %dir.display(), saved_world_size = saved, world_size = world,
            "resuming with another world size: the replicated state is restored exactly, but the \
             gradients are now summed over another number of ranks, so the numbers differ from an \
             uninterrupted run of either size");
    }
    let loaded = rank_view(loaded, rank);
    let mut trainer = Trainer::new(tc.clone(), run_dir)?;
    let src = Source {
        dir,
        loaded: &loaded,
    };
    trainer.restore(&src)?;
    if rank > 0 {
        data_parallel::restore_rank_rng(&src, rank, trainer.device)?;
    }
    Ok(trainer)
}

/// A checkpoint as rank `rank` reads it: in one written by several ranks
/// (`rank<NNNNN>.<name>`), rank 0's files under their plain names (the replicated state) and
/// this rank's [`RANK_STATE_FILE`]; a 1-rank checkpoint as it is.
fn rank_view(loaded: Loaded, rank: u32) -> Loaded {
    let world = crate::supervision::protocol::world_of(&loaded.manifest).world;
    if world <= 1 {
        return loaded;
    }
    let Loaded { manifest, files } = loaded;
    let files = files
        .into_iter()
        .filter_map(|(name, bytes)| {
            let (r, plain) = crate::supervision::ranks::parse_rank_file(&name)?;
            let keep =
                (r == 0 && plain != RANK_STATE_FILE) || (r == rank && plain == RANK_STATE_FILE);
            keep.then(|| (plain.to_string(), bytes))
        })
        .collect();
    Loaded { manifest, files }
}

/// Log (ERROR, naming the checkpoint dir and each file) and journal a refused checkpoint, as the
/// store does for one that does not verify; then add it to `all`.
fn refuse(store: &mut Store, r: Refused, all: &mut Vec<Refused>) -> Result<(), TrainError> {
    let dir = match parse_checkpoint_name(&r.checkpoint) {
        Some(_) => store.run_dir().checkpoints_dir().join(&r.checkpoint),
        None => store.run_dir().root().join(&r.checkpoint),
    };
    for f in &r.faults {
        tracing::error!(checkpoint = %dir.display(), file = %f.file, reason = %f.reason, "checkpoint refused");
    }
    store
        .journal()
        .append(&StoreEvent::CheckpointRefused {
            checkpoint: r.checkpoint.clone(),
            faults: r.faults.iter().map(FaultRecord::from).collect(),
        })
        .map_err(TrainError::Load)?;
    all.push(r);
    Ok(())
}

/// Journal the checkpoint a resume uses (`checkpoint_loaded`), after `fallback` when newer
/// candidates were refused.
fn journal_used(store: &mut Store, used: &Listed, fell_back: bool) -> Result<(), TrainError> {
    let (checkpoint, step) = (used.name.clone(), used.step);
    if fell_back {
        tracing::warn!(checkpoint = %used.name, "FELL BACK to an older checkpoint: the newer ones could not be used (see the errors above)");
        store
            .journal()
            .append(&StoreEvent::Fallback {
                checkpoint: checkpoint.clone(),
                step,
            })
            .map_err(TrainError::Load)?;
    }
    store
        .journal()
        .append(&StoreEvent::CheckpointLoaded { checkpoint, step })
        .map_err(TrainError::Load)
}

/// The error of a run whose checkpoints all were refused (journaled as `load_failed`, as the
/// store does when none verifies).
fn nothing_restores(store: &mut Store, tried: Vec<Refused>) -> TrainError {
    let e = TrainError::NothingRestores {
        searched: store.run_dir().root().to_path_buf(),
        tried,
    };
    if let Err(j) = store.journal().append(&StoreEvent::LoadFailed {
        detail: e.to_string(),
    }) {
        tracing::error!(error = %j, "cannot journal load_failed");
    }
    e
}

/// A verified checkpoint being restored: where it is and its files' bytes.
pub(super) struct Source<'a> {
    pub dir: &'a Path,
    pub loaded: &'a Loaded,
}

impl Source<'_> {
    /// "This checkpoint does not restore", naming its dir and `file`.
    fn fault(&self, file: &str, reason: impl std::fmt::Display) -> TrainError {
        TrainError::Unrestorable {
            dir: self.dir.to_path_buf(),
            file: file.to_owned(),
            reason: reason.to_string(),
        }
    }

    /// "This job does not fit the checkpoint" (no older checkpoint would either).
    fn mismatch(&self, reason: String) -> TrainError {
        TrainError::Resume {
            checkpoint: self.dir.display().to_string(),
            reason,
        }
    }

    /// The bytes of `file`.
    fn bytes(&self, file: &str) -> Result<&[u8], TrainError> {
        self.loaded
            .files
            .get(file)
            .map(Vec::as_slice)
            .ok_or_else(|| self.fault(file, "is missing: not a checkpoint of the built-in trainer"))
    }

    /// The tensors of the safetensors `file`, in file order.
    fn tensors(&self, file: &str) -> Result<Vec<(String, Tensor)>, TrainError> {
        read_safetensors(file, self.bytes(file)?).map_err(|e| self.fault(file, e))
    }
}

impl Trainer {
    /// Restore the state of a verified checkpoint, one named step after another; each error
    /// names the checkpoint dir and the file. The process-wide generator is set last. On error
    /// `self` is half-written: drop it.
    pub(super) fn restore(&mut self, src: &Source) -> Result<(), TrainError> {
        let saved = read_state(src)?;
        check_format(src, &saved)?;
        self.check_compatible(src, &saved)?;
        self.restore_model(src)?;
        self.restore_optimizer(src, &saved)?;
        self.restore_scheduler(src, &saved)?;
        self.restore_scaler(src, &saved)?;
        let reference_loss = self.check_reference(src, &saved)?;
        let pos = self.data_position(src, &saved)?;
        restore_rng(src, &saved, self.device)?;
        self.adopt(saved, pos);
        tracing::info!(checkpoint = %src.dir.display(), step = self.st.global_step, epoch = self.st.epoch, batch_in_epoch = self.st.batch_in_epoch, reference_loss, "resumed; reference loss reproduced");
        Ok(())
    }

    /// The job fits the checkpoint: the same results-changing config, thread count (under
    /// `deterministic`) and data. A changed device is only warned about.
    fn check_compatible(&self, src: &Source, saved: &TrainerState) -> Result<(), TrainError> {
        if saved.config_hash != self.st.config_hash {
            let mut changes = changed_keys(&saved.config, &self.st.config);
            if changes.is_empty() {
                changes.push(format!(
                    "(config hash {} → {})",
                    saved.config_hash, self.st.config_hash
                ));
            }
            return Err(TrainError::ConfigChanged {
                checkpoint: src.dir.display().to_string(),
                changes,
            });
        }
        if saved.threads != self.tc.threads {
            if self.tc.deterministic {
                return Err(src.mismatch(format!(
                    "{STATE_FILE}: threads: the checkpoint was made with {} threads and this run \
                     has {}; with deterministic: true the results depend on the thread count \
                     (accepted: threads: {}, or deterministic: false)",
                    saved.threads, self.tc.threads, saved.threads
                )));
            }
            tracing::warn!(
                saved = saved.threads,
                now = self.tc.threads,
                "thread count changed since the checkpoint; results will differ from an uninterrupted run"
            );
        }
        if saved.data_fingerprint != self.st.data_fingerprint {
            return Err(src.mismatch(format!(
                "{STATE_FILE}: the data differ from the checkpoint's (fingerprint {} now, {} \
                 then): the data file changed since the run started",
                self.st.data_fingerprint, saved.data_fingerprint
            )));
        }
        if saved.device != self.st.device {
            tracing::warn!(saved = %saved.device, now = %self.st.device, "device changed since the checkpoint; results will not be bit-identical");
        }
        Ok(())
    }

    /// Every variable of the model (parameters and buffers) from `model.safetensors`, with the
    /// model's shapes and dtypes, and nothing else.
    fn restore_model(&mut self, src: &Source) -> Result<(), TrainError> {
        let mut saved: BTreeMap<String, Tensor> = src.tensors(MODEL_FILE)?.into_iter().collect();
        let vars = named_state(&self.vs);
        let names: BTreeSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = saved.keys().find(|k| !names.contains(k.as_str())) {
            return Err(src.fault(
                MODEL_FILE,
                format!("tensor {extra} is not a variable of this model"),
            ));
        }
        tch::no_grad(|| {
            for (n, mut var) in vars {
                let t = saved
                    .remove(&n)
                    .ok_or_else(|| src.fault(MODEL_FILE, format!("variable {n} is missing")))?;
                if t.size() != var.size() || t.kind() != var.kind() {
                    return Err(src.fault(
                        MODEL_FILE,
                        format!(
                            "{n} is {:?} {:?}, the model's is {:?} {:?}",
                            t.kind(),
                            t.size(),
                            var.kind(),
                            var.size()
                        ),
                    ));
                }
                var.f_copy_(&t)
                    .map_err(|e| src.fault(MODEL_FILE, format!("{n}: {}", torch_message(&e))))?;
            }
            Ok(())
        })
    }

    /// Every optimizer state tensor from `optimizer.safetensors`, with the saved metadata.
    fn restore_optimizer(&mut self, src: &Source, saved: &TrainerState) -> Result<(), TrainError> {
        let tensors = src.tensors(OPTIMIZER_FILE)?;
        self.opt
            .load_state(&saved.optimizer, tensors)
            .map_err(|e| src.fault(OPTIMIZER_FILE, e))
    }

    /// The scheduler's saved state (its kind must match the config's).
    fn restore_scheduler(&mut self, src: &Source, saved: &TrainerState) -> Result<(), TrainError> {
        self.sched
            .load_state(saved.scheduler.clone())
            .map_err(|e| src.fault(STATE_FILE, format!("scheduler: {e}")))
    }

    /// With `precision: fp16`, the loss scaler from [`SCALER_FILE`] (scale, growth tracker) and
    /// `trainer_state.json` (skipped steps), which must agree. Other precisions have none.
    fn restore_scaler(&mut self, src: &Source, saved: &TrainerState) -> Result<(), TrainError> {
        let Some(scaler) = self.scaler.as_mut() else {
            return Ok(());
        };
        let record = saved.scaler.as_ref().ok_or_else(|| {
            src.fault(
                STATE_FILE,
                "scaler is missing: a precision: fp16 run needs the loss scaler's state",
            )
        })?;
        let tensors = src.tensors(SCALER_FILE)?;
        scaler
            .load(tensors, record.skipped_steps)
            .map_err(|e| src.fault(SCALER_FILE, e))?;
        if scaler.scale() != record.scale || scaler.growth_tracker() != record.growth_tracker {
            return Err(src.fault(
                STATE_FILE,
                format!(
                    "scaler: scale {} and growth_tracker {} disagree with {SCALER_FILE} ({} and {})",
                    record.scale,
                    record.growth_tracker,
                    scaler.scale(),
                    scaler.growth_tracker()
                ),
            ));
        }
        Ok(())
    }

    /// The restored model reproduces the reference loss the manifest recorded, on the
    /// checkpoint's reference batch: bit-equal on the CPU, within 1e-3 (relative) elsewhere.
    /// Returns the loss.
    fn check_reference(&mut self, src: &Source, saved: &TrainerState) -> Result<f32, TrainError> {
        let mut refs: BTreeMap<String, Tensor> = src.tensors(REFERENCE_FILE)?.into_iter().collect();
        let (Some(x), Some(y)) = (refs.remove("x"), refs.remove("y")) else {
            return Err(src.fault(REFERENCE_FILE, "tensors x and y expected"));
        };
        self.reference = (x, y);
        let stored_bits = src
            .loaded
            .manifest
            .extra
            .get("reference_loss_bits")
            .and_then(|v| v.as_str())
            .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .ok_or_else(|| {
                src.fault(
                    MANIFEST_FILE,
                    "no reference_loss_bits in extra: not a checkpoint the built-in trainer \
                     committed",
                )
            })?;
        let stored = f32::from_bits(stored_bits);
        let found = self.reference_loss()?;
        let ok = if self.device == Device::Cpu && saved.device == "cpu" {
            found.to_bits() == stored_bits
        } else {
            (found - stored).abs() <= 1e-3 * stored.abs().max(1e-6)
        };
        if !ok {
            return Err(src.fault(
                MODEL_FILE,
                format!(
                    "the reference loss recomputed after loading is {found:e} (f32 bits \
                     {:#010x}) but the checkpoint recorded {stored:e} (bits {stored_bits:#010x}): \
                     the restored model does not reproduce the saved one",
                    found.to_bits()
                ),
            ));
        }
        Ok(found)
    }

    /// The saved data position, which must lie inside an epoch of this loader.
    fn data_position(&self, src: &Source, saved: &TrainerState) -> Result<Position, TrainError> {
        let per_epoch = self.loader.batches_per_epoch();
        if saved.batch_in_epoch >= per_epoch {
            return Err(src.fault(
                STATE_FILE,
                format!(
                    "batch_in_epoch: data position {}/{} is past the end of an epoch of \
                     {per_epoch} batches",
                    saved.epoch, saved.batch_in_epoch
                ),
            ));
        }
        Ok(Position {
            epoch: saved.epoch,
            batch_in_epoch: saved.batch_in_epoch,
        })
    }

    /// Take the saved state as the trainer's, keeping this run's view of the config (safe keys
    /// may differ), versions, threads and device.
    fn adopt(&mut self, saved: TrainerState, pos: Position) {
        let (config_hash, config) = (self.st.config_hash.clone(), self.st.config.clone());
        let cuda = self.st.cuda.take();
        self.st = TrainerState {
            config_hash,
            config,
            cuda,
            versions: versions(),
            threads: self.tc.threads,
            device: device_name(self.device),
            ..saved
        };
        self.pos = pos;
        self.committed = Some(self.st.global_step);
    }
}

/// `trainer_state.json`, parsed.
fn read_state(src: &Source) -> Result<TrainerState, TrainError> {
    serde_json::from_slice(src.bytes(STATE_FILE)?).map_err(|e| {
        src.fault(
            STATE_FILE,
            format!("not valid JSON of a trainer state: {e}"),
        )
    })
}

/// The state is of a format this build reads, and of the step its manifest says.
fn check_format(src: &Source, saved: &TrainerState) -> Result<(), TrainError> {
    if saved.format_version != STATE_FORMAT_VERSION {
        return Err(src.fault(
            STATE_FILE,
            format!(
                "format version {} is not supported (this build reads {STATE_FORMAT_VERSION})",
                saved.format_version
            ),
        ));
    }
    let step = src.loaded.manifest.step;
    if saved.global_step != step {
        return Err(src.fault(
            STATE_FILE,
            format!(
                "global_step is {} but the manifest says step {step}",
                saved.global_step
            ),
        ));
    }
    Ok(())
}

/// The generators' saved states: the CPU's, and on CUDA each device's that the checkpoint
/// holds (a checkpoint of another device or device count is restored as far as it goes, with a
/// warning: the device change is warned about already). Last of the steps: the only one with a
/// process-wide effect.
fn restore_rng(src: &Source, saved: &TrainerState, device: Device) -> Result<(), TrainError> {
    let bytes = unhex(&saved.rng.cpu_state)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| src.fault(STATE_FILE, "rng.cpu_state is not a hex byte string"))?;
    restore_cuda_rng(&saved.rng.cuda_states, device, |reason| {
        src.fault(STATE_FILE, format!("rng.cuda_states{reason}"))
    })?;
    ffi::set_rng_state(Generator::Cpu, &Tensor::from_slice(&bytes))
        .map_err(|e| src.fault(STATE_FILE, format!("rng.cpu_state: {e}")))
}

/// On CUDA, each device's generator state from `states` (hex, device order); a checkpoint of
/// another device count is restored as far as it goes, with a warning. On the CPU, nothing
/// (the states are still checked to be hex). `fault` gets the reason after the key, e.g.
/// `[1]: …`.
pub(super) fn restore_cuda_rng(
    states: &[String],
    device: Device,
    fault: impl Fn(String) -> TrainError,
) -> Result<(), TrainError> {
    let cuda: Vec<Vec<u8>> = states
        .iter()
        .enumerate()
        .map(|(n, h)| {
            unhex(h)
                .filter(|b| !b.is_empty())
                .ok_or_else(|| fault(format!("[{n}] is not a hex byte string")))
        })
        .collect::<Result<_, _>>()?;
    if !device.is_cuda() {
        return Ok(());
    }
    let visible = tch::Cuda::device_count().max(0) as usize;
    if cuda.len() != visible {
        tracing::warn!(
            saved = cuda.len(),
            visible,
            "the checkpoint holds the generator states of another number of CUDA devices; the \
             first ones are restored"
        );
    }
    for (n, state) in cuda.iter().enumerate().take(visible) {
        ffi::set_rng_state(Generator::Cuda(n), &Tensor::from_slice(state))
            .map_err(|e| fault(format!("[{n}]: {e}")))?;
    }
    Ok(())
}

impl TrainError {
    /// When this error means "this checkpoint does not verify or does not restore" (an older
    /// one may), what is wrong with it, by file; `None` when the job or the run is at fault.
    pub fn checkpoint_faults(&self) -> Option<Vec<Fault>> {
        match self {
            TrainError::Unrestorable { dir, file, reason } => {
                let name = dir
                    .file_name()
                    .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
                Some(vec![Fault::new(format!("{name}/{file}"), reason.clone())])
            }
            TrainError::Load(StorageError::Corrupt { faults, .. }) => Some(faults.clone()),
            _ => None,
        }
    }
}
