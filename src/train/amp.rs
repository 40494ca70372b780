//! Mixed precision (`precision: bf16 | fp16`): the dynamic loss scaler of fp16 training, with
//! `torch.amp.GradScaler`'s semantics and torch's own kernels. (Autocast itself is
//! [`super::ffi::Autocast`].)
//!
//! One optimizer step with the scaler, as PyTorch's recipe does it:
//! 1. `backward()` of [`GradScaler::scale_loss`] (`loss * scale`, the scale a float32 tensor);
//! 2. [`GradScaler::unscale`]: every gradient times `1/scale` (computed in float64, rounded to
//!    float32, as `GradScaler.unscale_`), and whether any is inf/NaN, through
//!    `torch._amp_foreach_non_finite_check_and_unscale_`;
//! 3. clipping (on the unscaled gradients), then the optimizer step — skipped when a gradient
//!    was not finite;
//! 4. [`GradScaler::update`]: `torch._amp_update_scale_` — a non-finite step multiplies the scale
//!    by `backoff_factor` and resets the growth tracker; `growth_interval` finite steps in a row
//!    multiply it by `growth_factor`.
//!
//! Guarantees: given the same gradients, the scale, the growth tracker and the skip decisions
//! are bit-equal to `torch.amp.GradScaler`'s (tests/it/train_precision.rs,
//! `scaler_matches_torch_grad_scaler`); the state ([`GradScaler::state_tensors`] plus the count
//! of skipped steps) restores exactly.

use tch::{Device, Kind, Tensor};

use super::config::LossScaleConfig;
use super::ffi::{self, ShimError};
use super::trainer::TrainError;

/// The fp16 dynamic loss scaler (`torch.amp.GradScaler(device, init_scale, growth_factor,
/// backoff_factor, growth_interval)`).
#[derive(Debug)]
pub struct GradScaler {
    cfg: LossScaleConfig,
    /// `_scale`: float32, 0-dim, on the training device.
    scale: Tensor,
    /// `_growth_tracker`: int32, 0-dim: finite steps in a row since the last change.
    growth_tracker: Tensor,
    /// Optimizer steps skipped for non-finite gradients over the run.
    skipped: u64,
}

impl GradScaler {
    pub const SCALE: &'static str = "scale";
    pub const GROWTH_TRACKER: &'static str = "growth_tracker";

    /// A fresh scaler on `device`, as GradScaler's lazy init makes it: `torch.full((),
    /// init_scale, dtype=float32)` and `torch.full((), 0, dtype=int32)`.
    pub fn new(cfg: LossScaleConfig, device: Device) -> GradScaler {
        GradScaler {
            cfg,
            scale: Tensor::full([], cfg.init_scale, (Kind::Float, device)),
            growth_tracker: Tensor::full([], 0, (Kind::Int, device)),
            skipped: 0,
        }
    }

    /// `scaler.scale(loss)`: `loss * scale`.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.scale.to_device(loss.device())
    }

    /// `scaler.unscale_(optimizer)`: multiply every defined gradient of `params` by `1/scale`
    /// (per dtype, one foreach call each, as GradScaler groups them); returns `found_inf`, a
    /// float32 0-dim tensor that is 1.0 when any gradient held an inf or NaN.
    pub fn unscale(&self, params: &[Tensor]) -> Result<Tensor, TrainError> {
        let _g = tch::no_grad_guard();
        let device = self.scale.device();
        let inv_scale = self
            .scale
            .to_kind(Kind::Double)
            .reciprocal()
            .to_kind(Kind::Float);
        let mut found_inf = Tensor::zeros([], (Kind::Float, device));
        let mut by_kind: Vec<(Kind, Vec<Tensor>)> = Vec::new();
        for g in params.iter().map(Tensor::grad).filter(Tensor::defined) {
            if g.device() != device {
                return Err(TrainError::Scaler(format!(
                    "a gradient is on {:?}, the scale on {device:?}",
                    g.device()
                )));
            }
            match by_kind.iter_mut().find(|(k, _)| *k == g.kind()) {
                Some((_, list)) => list.push(g),
                None => by_kind.push((g.kind(), vec![g])),
            }
        }
        for (_, mut grads) in by_kind {
            ffi::amp_foreach_unscale_(&mut grads, &mut found_inf, &inv_scale)?;
        }
        Ok(found_inf)
    }

    /// Whether `found_inf` (from [`Self::unscale`]) says to skip the optimizer step; counts the
    /// skip.
    pub fn should_skip(&mut self, found_inf: &Tensor) -> bool {
        let skip = found_inf.double_value(&[]) != 0.0;
        if skip {
            self.skipped += 1;
        }
        skip
    }

    /// `scaler.update()`: `torch._amp_update_scale_(scale, growth_tracker, found_inf,
    /// growth_factor, backoff_factor, growth_interval)`.
    pub fn update(&mut self, found_inf: &Tensor) -> Result<(), TrainError> {
        let _g = tch::no_grad_guard();
        let interval = i64::try_from(self.cfg.growth_interval.0).unwrap_or(i64::MAX);
        // In place on `scale` and `growth_tracker`; the returned handle aliases `scale`.
        let _alias = self
            .scale
            .f_internal_amp_update_scale_(
                &self.growth_tracker,
                found_inf,
                self.cfg.growth_factor,
                self.cfg.backoff_factor,
                interval,
            )
            .map_err(|e| {
                TrainError::Shim(ShimError {
                    op: "_amp_update_scale_",
                    message: super::tensors::torch_message(&e),
                })
            })?;
        Ok(())
    }

    /// The current scale (exact: a float32 widened).
    pub fn scale(&self) -> f64 {
        self.scale.double_value(&[])
    }

    /// The growth tracker.
    pub fn growth_tracker(&self) -> i64 {
        self.growth_tracker.int64_value(&[])
    }

    /// Optimizer steps skipped so far.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// The state tensors, by name ([`Self::SCALE`], [`Self::GROWTH_TRACKER`]), as GradScaler's
    /// `_scale` and `_growth_tracker`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (Self::SCALE.into(), self.scale.shallow_clone()),
            (
                Self::GROWTH_TRACKER.into(),
                self.growth_tracker.shallow_clone(),
            ),
        ]
    }

    /// Take a saved state: the two tensors of [`Self::state_tensors`] (0-dim float32 and int32;
    /// the scale finite and positive, the tracker ≥ 0) and the skipped count.
    pub fn load(&mut self, tensors: Vec<(String, Tensor)>, skipped: u64) -> Result<(), TrainError> {
        let (mut scale, mut tracker) = (None, None);
        for (name, t) in tensors {
            match name.as_str() {
                Self::SCALE => scale = Some(t),
                Self::GROWTH_TRACKER => tracker = Some(t),
                other => {
                    return Err(TrainError::Scaler(format!(
                        "tensor {other} is not part of a loss scaler's state"
                    )))
                }
            }
        }
        let check = |t: Option<Tensor>, name: &str, kind: Kind| match t {
            None => Err(TrainError::Scaler(format!("tensor {name} is missing"))),
            Some(t) if t.kind() != kind || t.dim() != 0 => Err(TrainError::Scaler(format!(
                "{name} is {:?} {:?}, expected a 0-dim {kind:?}",
                t.kind(),
                t.size()
            ))),
            Some(t) => Ok(t),
        };
        let scale = check(scale, Self::SCALE, Kind::Float)?;
        let tracker = check(tracker, Self::GROWTH_TRACKER, Kind::Int)?;
        let s = scale.double_value(&[]);
        if !(s.is_finite() && s > 0.0) {
            return Err(TrainError::Scaler(format!(
                "scale is {s}, expected a finite positive value"
            )));
        }
        if tracker.int64_value(&[]) < 0 {
            return Err(TrainError::Scaler(format!(
                "growth_tracker is {}, expected ≥ 0",
                tracker.int64_value(&[])
            )));
        }
        let device = self.scale.device();
        self.scale = scale.to_device(device).copy();
        self.growth_tracker = tracker.to_device(device).copy();
        self.skipped = skipped;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::Pos;

    fn params(grads: &[&[f32]]) -> Vec<Tensor> {
        grads
            .iter()
            .map(|g| {
                let mut p = Tensor::zeros([g.len() as i64], (Kind::Float, Device::Cpu))
                    .set_requires_grad(true);
                ffi::set_grad(&mut p, Some(&Tensor::from_slice(g))).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn skips_back_off_and_finite_runs_grow() {
        let cfg = LossScaleConfig {
            init_scale: 8.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: Pos(2),
        };
        let mut s = GradScaler::new(cfg, Device::Cpu);
        let ps = params(&[&[8.0, 16.0], &[4.0]]);
        let f = s.unscale(&ps).unwrap();
        assert!(!s.should_skip(&f));
        assert_eq!(Vec::<f32>::try_from(&ps[0].grad()).unwrap(), vec![1.0, 2.0]);
        s.update(&f).unwrap();
        assert_eq!((s.scale(), s.growth_tracker()), (8.0, 1));
        s.update(&f).unwrap();
        assert_eq!((s.scale(), s.growth_tracker()), (16.0, 0), "grown after 2");
        let bad = params(&[&[1.0, f32::NAN]]);
        let f = s.unscale(&bad).unwrap();
        assert!(s.should_skip(&f));
        s.update(&f).unwrap();
        assert_eq!(
            (s.scale(), s.growth_tracker(), s.skipped_steps()),
            (8.0, 0, 1)
        );
        // The state round-trips.
        let mut t = GradScaler::new(cfg, Device::Cpu);
        t.load(s.state_tensors(), s.skipped_steps()).unwrap();
        assert_eq!(
            (t.scale(), t.growth_tracker(), t.skipped_steps()),
            (8.0, 0, 1)
        );
        let e = t
            .load(vec![("scale".into(), Tensor::from(1.0f64))], 0)
            .unwrap_err();
        assert!(e.to_string().contains("scale is Double"), "{e}");
    }
}
