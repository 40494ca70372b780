//! The `scheduler:` section: which learning-rate schedule (`constant`, `step`, `multistep`,
//! `cosine`, `linear`, `plateau`) and its settings, each checked to be one PyTorch's
//! `torch.optim.lr_scheduler` accepts. The schedule itself is the trainer's (`train::sched`).

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::value::{de, err, split_kind};
use crate::config::ConfigError;

/// Which scheduler, with its settings; as written in a job config
/// (`scheduler: {kind: cosine, warmup_steps: 50}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SchedulerConfig {
    Constant(ConstantConfig),
    Step(StepConfig),
    #[serde(rename = "multistep")]
    MultiStep(MultiStepConfig),
    Cosine(AnnealConfig),
    Linear(AnnealConfig),
    Plateau(PlateauConfig),
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig::Constant(ConstantConfig::default())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConstantConfig {
    pub warmup_steps: u64,
}

/// `torch.optim.lr_scheduler.StepLR` counted in optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    pub step_size: u64,
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    #[serde(default)]
    pub warmup_steps: u64,
}

/// `torch.optim.lr_scheduler.MultiStepLR` counted in optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiStepConfig {
    pub milestones: Vec<u64>,
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    #[serde(default)]
    pub warmup_steps: u64,
}

/// Cosine or linear decay from the base lr to `min_lr` over `total_steps` (default: the run's
/// length when it first started).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnealConfig {
    pub warmup_steps: u64,
    pub total_steps: Option<u64>,
    pub min_lr: f64,
}

/// `torch.optim.lr_scheduler.ReduceLROnPlateau` (relative threshold), fed by each evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlateauConfig {
    /// `min` (a lower metric is better) or `max`.
    pub mode: PlateauMode,
    pub factor: f64,
    /// Evaluations without improvement before the lr is reduced.
    pub patience: u64,
    pub threshold: f64,
    pub cooldown: u64,
    pub min_lr: f64,
    pub warmup_steps: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    #[default]
    Min,
    Max,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        PlateauConfig {
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
            warmup_steps: 0,
        }
    }
}

fn default_gamma() -> f64 {
    0.1
}

impl SchedulerConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SchedulerConfig::Constant(_) => "constant",
            SchedulerConfig::Step(_) => "step",
            SchedulerConfig::MultiStep(_) => "multistep",
            SchedulerConfig::Cosine(_) => "cosine",
            SchedulerConfig::Linear(_) => "linear",
            SchedulerConfig::Plateau(_) => "plateau",
        }
    }

    /// The linear warmup's length in optimizer steps (0: none).
    pub fn warmup(&self) -> u64 {
        match self {
            SchedulerConfig::Constant(c) => c.warmup_steps,
            SchedulerConfig::Step(c) => c.warmup_steps,
            SchedulerConfig::MultiStep(c) => c.warmup_steps,
            SchedulerConfig::Cosine(c) | SchedulerConfig::Linear(c) => c.warmup_steps,
            SchedulerConfig::Plateau(c) => c.warmup_steps,
        }
    }

    /// Check the values; the error is `(key under scheduler, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_owned(), m));
        let unit = |k: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err((
                    k.to_owned(),
                    format!("expected a number in (0, 1], found {v}"),
                ))
            }
        };
        let nonneg = |k: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err((
                    k.to_owned(),
                    format!("expected a finite number >= 0, found {v}"),
                ))
            }
        };
        match self {
            SchedulerConfig::Constant(_) => {}
            SchedulerConfig::Step(c) => {
                if c.step_size == 0 {
                    return bad("step_size", "expected a positive integer, found 0".into());
                }
                unit("gamma", c.gamma)?;
            }
            SchedulerConfig::MultiStep(c) => {
                unit("gamma", c.gamma)?;
                if c.milestones.windows(2).any(|w| w[0] >= w[1]) {
                    return bad(
                        "milestones",
                        format!(
                            "expected strictly increasing steps, found {:?}",
                            c.milestones
                        ),
                    );
                }
            }
            SchedulerConfig::Cosine(c) | SchedulerConfig::Linear(c) => {
                nonneg("min_lr", c.min_lr)?;
                if let Some(t) = c.total_steps {
                    if t <= c.warmup_steps {
                        return bad(
                            "total_steps",
                            format!("{t} must be larger than warmup_steps ({})", c.warmup_steps),
                        );
                    }
                }
            }
            SchedulerConfig::Plateau(c) => {
                if !(c.factor.is_finite() && c.factor > 0.0 && c.factor < 1.0) {
                    return bad(
                        "factor",
                        format!("expected a number in (0, 1), found {}", c.factor),
                    );
                }
                nonneg("threshold", c.threshold)?;
                nonneg("min_lr", c.min_lr)?;
            }
        }
        Ok(())
    }
}

impl SchedulerConfig {
    /// Type and check the `scheduler:` section.
    pub fn parse(v: &Value) -> Result<SchedulerConfig, ConfigError> {
        let kinds = [
            "constant",
            "step",
            "multistep",
            "cosine",
            "linear",
            "plateau",
        ];
        let (kind, rest) = split_kind("scheduler", v, &kinds)?;
        let c = match kind.as_str() {
            "constant" => SchedulerConfig::Constant(de("scheduler", rest)?),
            "step" => SchedulerConfig::Step(de("scheduler", rest)?),
            "multistep" => SchedulerConfig::MultiStep(de("scheduler", rest)?),
            "cosine" => SchedulerConfig::Cosine(de::<AnnealConfig>("scheduler", rest)?),
            "linear" => SchedulerConfig::Linear(de::<AnnealConfig>("scheduler", rest)?),
            _ => SchedulerConfig::Plateau(de("scheduler", rest)?),
        };
        c.validate()
            .map_err(|(k, m)| err(format!("scheduler.{k}"), m))?;
        Ok(c)
    }
}
