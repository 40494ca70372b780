//! The reference loss of a save, computed beside the training thread.
//!
//! Every checkpoint records the loss of its reference batch under the weights it saves
//! (`reference_loss_bits` in the manifest's `extra`); a restore recomputes it from the loaded
//! weights ([`Trainer::reference_loss`]) and on the CPU must find the same bits. That forward
//! pass used to run on the training thread during a save's phase 1, and was most of the
//! two-phase save's stall. It now runs on the save's copy thread (`save.rs`), on a second
//! instance of the model, [`ReferenceModel`], prepared on the training thread at the save by
//! [`ReferenceModel::sync_with`]:
//! - its parameters *alias* the live ones (`set_data`: no copy). The live parameters are only
//!   read until the copy thread is joined, which happens before the next optimizer update
//!   mutates them (`Trainer::fence_copy`), so the thread sees exactly the saved weights;
//! - its buffers (batchnorm running statistics) are *copies* of the live ones taken at the save:
//!   the next step's forward pass in train mode updates the live buffers while the thread runs.
//!
//! Guarantees: [`ReferenceModel::loss`] computes what [`Trainer::reference_loss`] computes on
//! the saved state, through the same function ([`loss_of`]): eval mode, no grad, the run's
//! precision (autocast is per thread, so it is entered on the calling thread), on the run's
//! device, with the run's intra-op thread count set on the calling thread (with OpenMP
//! libtorch's count is per thread; the reduction order depends on it). Building the instance
//! draws its (discarded) initial values from the CPU generator, whose state is put back: the
//! run's random streams never see it. The eval-mode forward pass draws no random numbers, so it
//! does not race the training thread's dropout on the process-wide generator.

use std::sync::{Arc, Mutex, MutexGuard};

use super::*;

/// A second instance of the trainer's model that computes a save's reference loss off the
/// training thread (see the module doc). Shared with the copy thread of the save in flight.
pub(super) type SharedReference = Arc<Mutex<ReferenceModel>>;

#[derive(Debug)]
pub(super) struct ReferenceModel {
    vs: nn::VarStore,
    model: Model,
}

/// What the copy thread needs to compute a save's reference loss.
pub(super) struct ReferenceJob {
    pub model: SharedReference,
    pub batch: (Tensor, Tensor),
    pub precision: Precision,
    pub device: Device,
    pub threads: u32,
}

impl ReferenceJob {
    /// The reference loss of the saved weights (on the calling thread; see the module doc).
    pub fn run(&self) -> Result<f32, TrainError> {
        let m = lock(&self.model);
        tch::set_num_threads(self.threads as i32);
        loss_of(&m.model, &self.batch, self.precision, self.device)
    }
}

impl ReferenceModel {
    /// A model of the run's architecture on the CPU, its initial values discarded at the first
    /// [`ReferenceModel::sync_with`]; the CPU generator's state is the same after as before.
    fn build(tc: &TrainConfig, data: &Dataset) -> Result<ReferenceModel, TrainError> {
        let rng = ffi::rng_state(Generator::Cpu)?;
        let vs = nn::VarStore::new(Device::Cpu);
        let built = Model::build(&vs.root(), &tc.model, data.task());
        ffi::set_rng_state(Generator::Cpu, &rng)?;
        Ok(ReferenceModel { vs, model: built? })
    }

    /// Make this instance the live model `live` as it is now (its variables in file order, as
    /// [`named_state`] lists them): parameters aliased, buffers copied (on the buffers' device).
    fn sync_with(&mut self, live: &[(String, Tensor)]) -> Result<(), TrainError> {
        let mine = named_state(&self.vs);
        if mine.len() != live.len() {
            return Err(TrainError::Device(format!(
                "the reference model has {} variables, the trainer's {}",
                mine.len(),
                live.len()
            )));
        }
        tch::no_grad(|| {
            for ((name, mut var), (live_name, t)) in mine.into_iter().zip(live) {
                if &name != live_name {
                    return Err(TrainError::Device(format!(
                        "the reference model's variable {name} is not the trainer's {live_name}"
                    )));
                }
                let data = if t.requires_grad() {
                    t.shallow_clone()
                } else {
                    t.f_detach_copy()
                        .map_err(|e| TrainError::Device(torch_message(&e)))?
                };
                var.f_set_data(&data)
                    .map_err(|e| TrainError::Device(format!("{name}: {}", torch_message(&e))))?;
            }
            Ok(())
        })
    }
}

/// The model's loss on the reference batch `(x, y)` (eval mode, no grad, under autocast when
/// `precision` asks for it), as f32: the one computation behind both the saved
/// `reference_loss` and the restore's check.
pub(super) fn loss_of(
    model: &Model,
    (x, y): &(Tensor, Tensor),
    precision: Precision,
    device: Device,
) -> Result<f32, TrainError> {
    let (x, y) = (x.to_device(device), y.to_device(device));
    let _g = tch::no_grad_guard();
    let _autocast = match precision.autocast_kind() {
        Some(kind) => Some(ffi::Autocast::enter(ffi::AutocastDevice::of(device), kind)?),
        None => None,
    };
    Ok(model.loss(&x, &y, false).double_value(&[]) as f32)
}

/// The reference model, whatever a panicked holder left it as (it is re-synced at every save).
fn lock(m: &SharedReference) -> MutexGuard<'_, ReferenceModel> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Trainer {
    /// The reference model synced with the live model for a save of the current step (built at
    /// the first call: see [`Trainer::prepare_reference_model`]), and the job for the copy
    /// thread.
    pub(super) fn reference_job(&mut self) -> Result<ReferenceJob, TrainError> {
        let model = self.prepare_reference_model()?;
        lock(&model).sync_with(&named_state(&self.vs))?;
        Ok(ReferenceJob {
            model,
            batch: (
                self.reference.0.shallow_clone(),
                self.reference.1.shallow_clone(),
            ),
            precision: self.tc.precision,
            device: self.device,
            threads: self.tc.threads,
        })
    }

    /// Build the reference model unless it is built (the training loop calls this before its
    /// first step, so that the build, a model initialisation, is not part of a save's stall).
    pub(super) fn prepare_reference_model(&mut self) -> Result<SharedReference, TrainError> {
        if let Some(m) = &self.reference_model {
            return Ok(m.clone());
        }
        let mut m = ReferenceModel::build(&self.tc, &self.data)?;
        // Aliasing the parameters at once frees the initial values it drew.
        m.sync_with(&named_state(&self.vs))?;
        let m = Arc::new(Mutex::new(m));
        self.reference_model = Some(m.clone());
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cnn (batchnorm buffers, dropout) trainer in `dir`.
    fn cnn_trainer(dir: &Path) -> Trainer {
        let yaml = "name: reference-test\nseed: 3\nthreads: 1\n\
            model: {kind: cnn, channels: [4, 8], dropout: 0.1}\n\
            data: {kind: synthetic-images, samples: 64, size: 8, classes: 3}\n\
            batch_size: 8\nmax_steps: 4\noptimizer: {kind: sgd, lr: 0.05, momentum: 0.9}\n\
            checkpoint: {every_steps: 2}\n";
        let cfg = JobConfig::parse(yaml).expect("job config");
        let tc = TrainConfig::from_job(&cfg).expect("trainer config");
        Trainer::new(tc, dir).expect("trainer")
    }

    #[test]
    fn the_copy_threads_loss_has_the_training_threads_bits_and_the_generator_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = cnn_trainer(dir.path());
        t.step().unwrap();
        let rng = hex(
            &to_tensor_data("rng", &ffi::rng_state(Generator::Cpu).unwrap())
                .unwrap()
                .bytes,
        );
        let job = t.reference_job().unwrap();
        let after = hex(
            &to_tensor_data("rng", &ffi::rng_state(Generator::Cpu).unwrap())
                .unwrap()
                .bytes,
        );
        assert_eq!(
            rng, after,
            "building the reference model drew from the generator"
        );
        let expected = t.reference_loss().unwrap();
        // A forward pass in train mode, as the next step's runs beside a save's copy thread:
        // batchnorm's running statistics change (the optimizer update comes after the join).
        let (x, y) = (t.reference.0.shallow_clone(), t.reference.1.shallow_clone());
        drop(t.forward_loss(&x, &y, true).unwrap());
        assert_ne!(
            t.reference_loss().unwrap().to_bits(),
            expected.to_bits(),
            "the forward pass changed no buffer: the test would not see a stale one"
        );
        let found = std::thread::spawn(move || job.run().unwrap())
            .join()
            .unwrap();
        assert_eq!(found.to_bits(), expected.to_bits());
    }
}
