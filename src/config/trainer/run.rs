//! The small trainer keys of how a run computes: `device`, `precision` and the fp16 loss
//! scaler (`loss_scale`), and `eval`. Each is parsed and checked on its own here; the checks
//! across keys (a loss scaler needs fp16, eval needs held-out data) are the trainer config's
//! ([`super::TrainConfig::from_job`]).

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::value::{de, err, Pos};
use crate::config::ConfigError;

/// Where the trainer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Cpu,
    /// CUDA device 0; an error when CUDA is not available.
    Cuda,
    /// CUDA when available, else the CPU.
    Auto,
}

/// The arithmetic of the forward pass (`precision:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32.
    #[default]
    Fp32,
    /// Forward pass under autocast to bfloat16; float32 master weights and optimizer state.
    Bf16,
    /// Forward pass under autocast to float16, with a dynamic loss scaler
    /// (`torch.amp.GradScaler`'s semantics); float32 master weights and optimizer state.
    Fp16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

/// The fp16 loss scaler (`loss_scale:`), `torch.amp.GradScaler`'s arguments and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossScaleConfig {
    #[serde(default = "d_init_scale")]
    pub init_scale: f64,
    #[serde(default = "d_growth_factor")]
    pub growth_factor: f64,
    #[serde(default = "d_backoff_factor")]
    pub backoff_factor: f64,
    #[serde(default = "d_growth_interval")]
    pub growth_interval: Pos,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            init_scale: d_init_scale(),
            growth_factor: d_growth_factor(),
            backoff_factor: d_backoff_factor(),
            growth_interval: d_growth_interval(),
        }
    }
}

fn d_init_scale() -> f64 {
    65536.0
}
fn d_growth_factor() -> f64 {
    2.0
}
fn d_backoff_factor() -> f64 {
    0.5
}
fn d_growth_interval() -> Pos {
    Pos(2000)
}

impl LossScaleConfig {
    /// The values torch.amp.GradScaler accepts and a float32 scale can hold: `init_scale` finite
    /// and positive within float32, `growth_factor` > 1, `backoff_factor` in (0, 1). Errors name
    /// the key under `loss_scale`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = self.init_scale;
        if !(s.is_finite() && s > 0.0 && s <= f64::from(f32::MAX)) {
            return Err(err(
                "loss_scale.init_scale",
                format!("expected a positive scale that float32 can hold, found {s}"),
            ));
        }
        let g = self.growth_factor;
        if !(g.is_finite() && g > 1.0) {
            return Err(err(
                "loss_scale.growth_factor",
                format!("expected a factor > 1, found {g}"),
            ));
        }
        let b = self.backoff_factor;
        if !(b.is_finite() && b > 0.0 && b < 1.0) {
            return Err(err(
                "loss_scale.backoff_factor",
                format!("expected a factor in (0, 1), found {b}"),
            ));
        }
        Ok(())
    }
}

/// `eval: {every_steps, batches, metric}`: evaluate on the held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub every_steps: Pos,
    #[serde(default = "d_eval_batches")]
    pub batches: Pos,
    #[serde(default = "d_metric")]
    pub metric: String,
}

fn d_eval_batches() -> Pos {
    Pos(10)
}
fn d_metric() -> String {
    EvalConfig::DEFAULT_METRIC.into()
}

impl EvalConfig {
    /// The metric the built-in trainer measures on the held-out split.
    pub const DEFAULT_METRIC: &'static str = "val_loss";

    /// Type and check the `eval:` section: its metric one the trainer records.
    pub fn parse(v: &Value) -> Result<EvalConfig, ConfigError> {
        let e: EvalConfig = de("eval", v.clone())?;
        if e.metric != EvalConfig::DEFAULT_METRIC {
            return Err(err(
                "eval.metric",
                format!(
                    "unknown metric {:?}; accepted: {}",
                    e.metric,
                    EvalConfig::DEFAULT_METRIC
                ),
            ));
        }
        Ok(e)
    }
}

/// A one-word key (`device`, `precision`) as `T`, or an error that lists `accepted`.
fn word<T: serde::de::DeserializeOwned>(
    key: &str,
    what: &str,
    accepted: &str,
    v: &Value,
) -> Result<T, ConfigError> {
    de::<T>(key, v.clone()).map_err(|_| {
        let found = match v {
            Value::String(s) => format!("{s:?}"),
            other => super::value::found(other),
        };
        err(key, format!("unknown {what} {found}; accepted: {accepted}"))
    })
}

impl DeviceChoice {
    /// `device`: cpu, cuda or auto.
    pub fn parse(v: &Value) -> Result<DeviceChoice, ConfigError> {
        word("device", "device", "cpu, cuda, auto", v)
    }
}

impl Precision {
    /// `precision`: fp32, bf16 or fp16.
    pub fn parse(v: &Value) -> Result<Precision, ConfigError> {
        word("precision", "precision", "fp32, bf16, fp16", v)
    }
}

impl LossScaleConfig {
    /// Type and check the `loss_scale:` section.
    pub fn parse(v: &Value) -> Result<LossScaleConfig, ConfigError> {
        let c: LossScaleConfig = de("loss_scale", v.clone())?;
        c.validate()?;
        Ok(c)
    }

    /// The scaler's settings for a run in `precision`: `loss_scale` only with fp16.
    pub fn resolve(
        given: Option<LossScaleConfig>,
        precision: Precision,
    ) -> Result<LossScaleConfig, ConfigError> {
        match given {
            None => Ok(LossScaleConfig::default()),
            Some(_) if precision != Precision::Fp16 => Err(err(
                "loss_scale",
                format!(
                    "configures the fp16 loss scaler, but precision is {}; accepted: \
                     precision: fp16 with loss_scale, or no loss_scale",
                    precision.name()
                ),
            )),
            Some(c) => Ok(c),
        }
    }
}
