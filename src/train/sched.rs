//! Learning-rate schedulers with explicit, serializable state: constant, step, multistep, cosine,
//! linear (each with an optional linear warmup) and reduce-on-plateau.
//!
//! A scheduler is a pure function of (config, base lr, state, optimizer-step index), so the lr of
//! every step after a resume is exactly the one an uninterrupted run would use, given the
//! [`SchedulerState`] stored in `trainer_state.json`. The state holds the schedule's horizon
//! (fixed when the run first starts, so raising `max_steps` later extends the run without bending
//! the curve already travelled) and the plateau scheduler's counters.
//!
//! Conventions: `t` is the number of optimizer steps already taken (the step about to run is
//! `t + 1`). Warmup: `lr = base * (t + 1) / warmup_steps` while `t < warmup_steps`. `step` and
//! `multistep` count `t` from the start of the run (milestones are absolute step numbers);
//! `cosine` and `linear` measure progress `p = (t - warmup) / (horizon - warmup)`, clamped to
//! `[0, 1]`.

use serde::{Deserialize, Serialize};

pub use crate::config::trainer::sched::{
    AnnealConfig, ConstantConfig, MultiStepConfig, PlateauConfig, PlateauMode, SchedulerConfig,
    StepConfig,
};

/// The plateau scheduler's counters (PyTorch's `ReduceLROnPlateau` state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlateauState {
    /// The current lr (before warmup scaling), as PyTorch keeps it in the param group.
    pub lr: f64,
    pub best: Option<f64>,
    pub num_bad: u64,
    pub cooldown_counter: u64,
}

/// Everything a scheduler carries between steps (stored in `trainer_state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerState {
    pub kind: String,
    pub base_lr: f64,
    /// The step count cosine/linear decay over (fixed at the run's first start).
    pub horizon: u64,
    #[serde(default)]
    pub plateau: Option<PlateauState>,
}

/// A scheduler: config + state.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    state: SchedulerState,
}

impl Scheduler {
    /// A fresh scheduler for a run of `run_steps` optimizer steps.
    pub fn new(config: SchedulerConfig, base_lr: f64, run_steps: u64) -> Scheduler {
        let horizon = match &config {
            SchedulerConfig::Cosine(c) | SchedulerConfig::Linear(c) => {
                c.total_steps.unwrap_or(run_steps)
            }
            _ => run_steps,
        };
        let plateau = match &config {
            SchedulerConfig::Plateau(_) => Some(PlateauState {
                lr: base_lr,
                best: None,
                num_bad: 0,
                cooldown_counter: 0,
            }),
            _ => None,
        };
        let state = SchedulerState {
            kind: config.kind().to_owned(),
            base_lr,
            horizon,
            plateau,
        };
        Scheduler { config, state }
    }

    pub fn state(&self) -> &SchedulerState {
        &self.state
    }

    /// Adopt a saved state (the kind must match; the base lr and horizon come from the state, so
    /// the curve continues where it was).
    pub fn load_state(&mut self, state: SchedulerState) -> Result<(), String> {
        if state.kind != self.config.kind() {
            return Err(format!(
                "scheduler state is for {}, but the config's scheduler is {}",
                state.kind,
                self.config.kind()
            ));
        }
        if state.plateau.is_some() != matches!(self.config, SchedulerConfig::Plateau(_)) {
            return Err("scheduler state's plateau counters do not match its kind".into());
        }
        if !(state.base_lr.is_finite() && state.base_lr >= 0.0) {
            return Err(format!(
                "scheduler state: invalid base lr {}",
                state.base_lr
            ));
        }
        self.state = state;
        Ok(())
    }

    /// The learning rate of the optimizer step that follows `t` completed steps.
    pub fn lr(&self, t: u64) -> f64 {
        let warmup = self.config.warmup();
        let after = self.lr_after_warmup(t);
        if t < warmup {
            return after * (t + 1) as f64 / warmup as f64;
        }
        after
    }

    fn lr_after_warmup(&self, t: u64) -> f64 {
        let base = self.state.base_lr;
        match &self.config {
            SchedulerConfig::Constant(_) => base,
            SchedulerConfig::Step(c) => base * c.gamma.powi(exp(t / c.step_size)),
            SchedulerConfig::MultiStep(c) => {
                let passed = c.milestones.iter().filter(|&&m| m <= t).count() as u64;
                base * c.gamma.powi(exp(passed))
            }
            SchedulerConfig::Cosine(c) => {
                let p = self.progress(t, c.warmup_steps);
                c.min_lr + (base - c.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
            SchedulerConfig::Linear(c) => {
                let p = self.progress(t, c.warmup_steps);
                base + (c.min_lr - base) * p
            }
            SchedulerConfig::Plateau(_) => self.state.plateau.as_ref().map_or(base, |s| s.lr),
        }
    }

    fn progress(&self, t: u64, warmup: u64) -> f64 {
        let span = self.state.horizon.saturating_sub(warmup);
        if span == 0 {
            return 1.0;
        }
        (t.saturating_sub(warmup) as f64 / span as f64).clamp(0.0, 1.0)
    }

    /// Feed an evaluation result (only the plateau scheduler uses it).
    pub fn observe(&mut self, metric: f64) {
        let SchedulerConfig::Plateau(c) = &self.config else {
            return;
        };
        let Some(s) = self.state.plateau.as_mut() else {
            return;
        };
        let better = match s.best {
            None => true,
            Some(best) => match c.mode {
                PlateauMode::Min => metric < best * (1.0 - c.threshold),
                PlateauMode::Max => metric > best * (1.0 + c.threshold),
            },
        };
        if better {
            s.best = Some(metric);
            s.num_bad = 0;
        } else {
            s.num_bad += 1;
        }
        if s.cooldown_counter > 0 {
            s.cooldown_counter -= 1;
            s.num_bad = 0;
        }
        if s.num_bad > c.patience {
            let new_lr = (s.lr * c.factor).max(c.min_lr);
            if s.lr - new_lr > 1e-8 {
                tracing::info!(
                    from = s.lr,
                    to = new_lr,
                    "plateau: reducing the learning rate"
                );
                s.lr = new_lr;
            }
            s.cooldown_counter = c.cooldown;
            s.num_bad = 0;
        }
    }
}

fn exp(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_reaches_min_and_stays() {
        let c = SchedulerConfig::Cosine(AnnealConfig {
            warmup_steps: 4,
            total_steps: None,
            min_lr: 0.0,
        });
        let s = Scheduler::new(c, 1.0, 14);
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(9) - 0.5).abs() < 1e-12);
        assert!(s.lr(14).abs() < 1e-12);
        assert!(s.lr(100).abs() < 1e-12);
    }

    #[test]
    fn step_multistep_linear() {
        let s = Scheduler::new(
            SchedulerConfig::Step(StepConfig {
                step_size: 10,
                gamma: 0.5,
                warmup_steps: 0,
            }),
            1.0,
            100,
        );
        assert_eq!((s.lr(9), s.lr(10), s.lr(25)), (1.0, 0.5, 0.25));
        let s = Scheduler::new(
            SchedulerConfig::MultiStep(MultiStepConfig {
                milestones: vec![5, 8],
                gamma: 0.1,
                warmup_steps: 0,
            }),
            1.0,
            100,
        );
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(5) - 0.1).abs() < 1e-15 && (s.lr(8) - 0.01).abs() < 1e-15);
        let s = Scheduler::new(
            SchedulerConfig::Linear(AnnealConfig {
                warmup_steps: 0,
                total_steps: Some(10),
                min_lr: 0.0,
            }),
            1.0,
            999,
        );
        assert_eq!((s.lr(0), s.lr(5), s.lr(10)), (1.0, 0.5, 0.0));
    }

    #[test]
    fn plateau_reduces_and_state_round_trips() {
        let c = SchedulerConfig::Plateau(PlateauConfig {
            patience: 1,
            factor: 0.5,
            ..PlateauConfig::default()
        });
        let mut s = Scheduler::new(c.clone(), 1.0, 100);
        for m in [1.0, 1.0, 1.0] {
            s.observe(m);
        }
        assert_eq!(s.lr(50), 0.5);
        let json = serde_json::to_string(s.state()).unwrap();
        let mut t = Scheduler::new(c, 1.0, 100);
        t.load_state(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(t.lr(50), 0.5);
        assert_eq!(t.state(), s.state());
        let mut other = Scheduler::new(SchedulerConfig::default(), 1.0, 1);
        assert!(other.load_state(s.state().clone()).is_err());
    }
}
