//! The built-in trainer's keys of the job file (`seed`, `device`, `threads`, `deterministic`,
//! `precision`, `loss_scale`, `model`, `data`, `batch_size`, `epochs`, `max_steps`,
//! `grad_accum`, `grad_clip`, `optimizer`, `scheduler`, `eval`): their types, parsed with the
//! rest of the file, once, by [`crate::config::JobConfig::parse`]. No torch here: a build without
//! libtorch (`hpc-ckpt sbatch` on a login node) types and checks them the same way.
//!
//! Guarantees: parsing is strict — an unknown key, a wrong type or an impossible value is refused
//! with the config's one [`ConfigError`], which names the key path (`model.hidden[1]`), what was
//! found and what is accepted; nothing here panics on user input. Each section is checked where
//! it is defined:
//! - [`value`]: [`Pos`] and the helpers that type a section and name its key path;
//! - [`model`], [`data`], [`optim`], [`sched`]: the `{kind: ..., ...}` sections;
//! - [`run`]: `device`, `precision`, `loss_scale`, `eval`;
//! - [`resolved`]: [`TrainConfig`], the keys with their defaults and the checks across keys that
//!   only the built-in trainer needs (a model and a length given, the data feeds the model and
//!   its files exist, `keep_best` monitors a metric the trainer records), and the config hash.

pub mod data;
pub mod model;
pub mod optim;
pub mod resolved;
pub mod run;
pub mod sched;
pub mod value;

use serde::Serialize;
use serde_yaml::Mapping;

pub use data::{DataConfig, MnistConfig, SyntheticConfig, SyntheticImagesConfig, TextConfig};
pub use model::{CnnConfig, GptConfig, MlpConfig, ModelConfig};
pub use optim::{AdamConfig, OptimizerConfig, SgdConfig};
pub use resolved::{changed_keys, world_fits, TrainConfig};
pub use run::{DeviceChoice, EvalConfig, LossScaleConfig, Precision};
pub use sched::SchedulerConfig;
pub use value::Pos;

use super::ConfigError;
use value::{de, err, positive};

/// The trainer's keys as the file gives them, each typed and checked on its own; `None` where
/// the file leaves a key out (or writes `null`). [`TrainConfig::from_job`] fills the defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrainerKeys {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deterministic: Option<bool>,
    /// `fp32` (default), `bf16` or `fp16`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// The fp16 loss scaler's settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScaleConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<DataConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalConfig>,
}

/// The trainer's top-level keys, for taking them out of the file's mapping (and for the error
/// that lists the accepted keys).
pub const KEYS: [&str; 16] = [
    "seed",
    "device",
    "threads",
    "deterministic",
    "precision",
    "loss_scale",
    "model",
    "data",
    "batch_size",
    "epochs",
    "max_steps",
    "grad_accum",
    "grad_clip",
    "optimizer",
    "scheduler",
    "eval",
];

impl TrainerKeys {
    /// Type and check the trainer's keys among the file's top-level keys that are not the job's
    /// (`others`), each where its type is defined; a key that is neither the job's (`job_keys`)
    /// nor the trainer's is refused with both lists. A key written `null` counts as left out.
    pub fn parse(others: &Mapping, job_keys: &[&str]) -> Result<TrainerKeys, ConfigError> {
        let mut mine = Mapping::new();
        for (k, v) in others {
            let name = k.as_str().unwrap_or_default();
            if !KEYS.contains(&name) {
                return Err(unknown_key(k, job_keys));
            }
            if !v.is_null() {
                mine.insert(k.clone(), v.clone());
            }
        }
        let mine = &mine;
        let get = |k: &str| mine.get(k);
        let scalar = |k: &str| scalar_of::<u64>(mine, k);
        Ok(TrainerKeys {
            seed: scalar_of(mine, "seed")?,
            device: get("device").map(DeviceChoice::parse).transpose()?,
            threads: parse_threads(scalar_of::<u32>(mine, "threads")?)?,
            deterministic: scalar_of(mine, "deterministic")?,
            precision: get("precision").map(Precision::parse).transpose()?,
            loss_scale: get("loss_scale").map(LossScaleConfig::parse).transpose()?,
            model: get("model").map(ModelConfig::parse).transpose()?,
            data: get("data").map(DataConfig::parse).transpose()?,
            batch_size: parse_batch_size(scalar("batch_size")?)?,
            epochs: positive("epochs", scalar("epochs")?)?,
            max_steps: positive("max_steps", scalar("max_steps")?)?,
            grad_accum: positive("grad_accum", scalar("grad_accum")?)?,
            grad_clip: parse_grad_clip(scalar_of(mine, "grad_clip")?)?,
            optimizer: get("optimizer").map(OptimizerConfig::parse).transpose()?,
            scheduler: get("scheduler").map(SchedulerConfig::parse).transpose()?,
            eval: get("eval").map(EvalConfig::parse).transpose()?,
        })
    }
}

/// The key `k` of `mine`, typed as `T` (absent: `None`).
fn scalar_of<T: serde::de::DeserializeOwned>(
    mine: &Mapping,
    k: &str,
) -> Result<Option<T>, ConfigError> {
    mine.get(k).map(|v| de(k, v.clone())).transpose()
}

/// `threads`: 1 to 1024.
fn parse_threads(v: Option<u32>) -> Result<Option<u32>, ConfigError> {
    match v {
        Some(0) => Err(err("threads", "expected a positive integer, found 0")),
        Some(n) if n > 1024 => Err(err(
            "threads",
            format!("expected at most 1024 threads, found {n}"),
        )),
        n => Ok(n),
    }
}

/// `batch_size`: 1 to 2^20.
fn parse_batch_size(v: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match positive("batch_size", v)? {
        Some(b) if b > 1 << 20 => Err(err(
            "batch_size",
            format!("expected at most {}, found {b}", 1u64 << 20),
        )),
        b => Ok(b),
    }
}

/// `grad_clip`: a positive max norm, or none.
fn parse_grad_clip(v: Option<f64>) -> Result<Option<f64>, ConfigError> {
    match v {
        Some(c) if !(c.is_finite() && c > 0.0) => Err(err(
            "grad_clip",
            format!("expected a positive max norm, found {c}"),
        )),
        c => Ok(c),
    }
}

/// A top-level key that is neither the job's nor the trainer's: the accepted keys, both kinds.
fn unknown_key(k: &serde_yaml::Value, job_keys: &[&str]) -> ConfigError {
    let name = match k.as_str() {
        Some(s) => s.to_owned(),
        None => value::found(k),
    };
    ConfigError::at(
        name.clone(),
        format!(
            "unknown field `{name}`, expected one of the job's keys ({}) or the built-in \
             trainer's ({})",
            job_keys.join(", "),
            KEYS.join(", ")
        ),
    )
}
