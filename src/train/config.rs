//! The built-in trainer's typed config, read from the trainer keys of a [`JobConfig`]
//! (`seed`, `device`, `threads`, `deterministic`, `precision`, `loss_scale`, `model`, `data`, `batch_size`, `epochs`,
//! `max_steps`, `grad_accum`, `grad_clip`, `optimizer`, `scheduler`, `eval`) and the trainer's
//! view of `checkpoint` (cadence, `on_save_error`, and `keep_best`, whose monitor must be a
//! metric the trainer records).
//!
//! Guarantees: parsing is strict — an unknown key, a wrong type or an impossible value is refused
//! with the config's one [`ConfigError`], which names the key path (`model.hidden[1]`), what was
//! found and what is accepted; nothing here panics on user input. Files named by `data` are checked to
//! exist. [`TrainConfig::hashed`] is the canonical JSON of every key that changes the numbers
//! a run produces (all but the safe keys `max_steps`, `epochs`, `eval.every_steps`, `threads`
//! and the `checkpoint` policy), which a checkpoint records to refuse resuming a different job.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml::{Mapping, Value};

use super::optim::{AdamConfig, OptimizerConfig, SgdConfig};
use super::sched::{AnnealConfig, ConstantConfig, SchedulerConfig};
use crate::config::{
    CheckpointConfig, ConfigError, Interval, JobConfig, OnSaveError, DEFAULT_MTBF_SECONDS,
};
use crate::storage::retention::Best;

/// A trainer key refused: its path and what is wrong with it (the config's one error).
fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::at(key, message)
}

/// An integer ≥ 1 (errors say "expected a positive integer" and what was found).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Pos(pub u64);

impl<'de> Deserialize<'de> for Pos {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Pos, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Pos;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a positive integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Pos, E> {
                if v == 0 {
                    return Err(E::invalid_value(de::Unexpected::Unsigned(0), &self));
                }
                Ok(Pos(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Pos, E> {
                if v <= 0 {
                    return Err(E::invalid_value(de::Unexpected::Signed(v), &self));
                }
                Ok(Pos(v as u64))
            }
        }
        d.deserialize_u64(V)
    }
}

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

    /// The autocast dtype (`None`: no autocast).
    pub fn autocast_kind(self) -> Option<tch::Kind> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(tch::Kind::BFloat16),
            Precision::Fp16 => Some(tch::Kind::Half),
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
    fn validate(&self) -> Result<(), ConfigError> {
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

/// The model (`model: {kind: mlp, ...}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    /// Fully connected: input → hidden layers (ReLU, dropout) → classes.
    Mlp(MlpConfig),
    /// Conv 3×3 + batchnorm + ReLU + 2×2 max-pool + dropout per entry of `channels`, global
    /// average pool, linear head.
    Cnn(CnnConfig),
    /// A small causal char-level transformer (pre-LayerNorm blocks).
    Gpt(GptConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    pub hidden: Vec<Pos>,
    #[serde(default)]
    pub dropout: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnConfig {
    pub channels: Vec<Pos>,
    #[serde(default)]
    pub dropout: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub layers: Pos,
    pub heads: Pos,
    pub d_model: Pos,
    /// Context length in characters.
    pub context: Pos,
    #[serde(default)]
    pub dropout: f64,
}

impl ModelConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ModelConfig::Mlp(_) => "mlp",
            ModelConfig::Cnn(_) => "cnn",
            ModelConfig::Gpt(_) => "gpt",
        }
    }
}

/// The data (`data: {kind: synthetic, ...}`). Every kind holds out the last `val_fraction` of
/// its samples (default 0.1) for evaluation and the reference batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataConfig {
    /// Feature vectors and labels generated from the seed (a random linear teacher).
    Synthetic(SyntheticConfig),
    /// Images (`channels × size × size`) of class templates plus noise, from the seed.
    SyntheticImages(SyntheticImagesConfig),
    /// A UTF-8 text file, character level; without `path` an embedded public-domain text.
    Text(TextConfig),
    /// MNIST's IDX files (images `u8 N×H×W`, labels `u8 N`).
    MnistIdx(MnistConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    #[serde(default = "d_samples")]
    pub samples: Pos,
    #[serde(default = "d_features")]
    pub features: Pos,
    #[serde(default = "d_classes")]
    pub classes: Pos,
    #[serde(default = "d_val")]
    pub val_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticImagesConfig {
    #[serde(default = "d_img_samples")]
    pub samples: Pos,
    #[serde(default = "d_size")]
    pub size: Pos,
    #[serde(default = "d_one")]
    pub channels: Pos,
    #[serde(default = "d_classes")]
    pub classes: Pos,
    #[serde(default = "d_val")]
    pub val_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "d_val")]
    pub val_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MnistConfig {
    pub images: PathBuf,
    pub labels: PathBuf,
    #[serde(default = "d_val")]
    pub val_fraction: f64,
}

fn d_samples() -> Pos {
    Pos(4096)
}
fn d_img_samples() -> Pos {
    Pos(2048)
}
fn d_features() -> Pos {
    Pos(32)
}
fn d_classes() -> Pos {
    Pos(10)
}
fn d_size() -> Pos {
    Pos(16)
}
fn d_one() -> Pos {
    Pos(1)
}
fn d_val() -> f64 {
    0.1
}

impl DataConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            DataConfig::Synthetic(_) => "synthetic",
            DataConfig::SyntheticImages(_) => "synthetic-images",
            DataConfig::Text(_) => "text",
            DataConfig::MnistIdx(_) => "mnist-idx",
        }
    }

    pub fn val_fraction(&self) -> f64 {
        match self {
            DataConfig::Synthetic(c) => c.val_fraction,
            DataConfig::SyntheticImages(c) => c.val_fraction,
            DataConfig::Text(c) => c.val_fraction,
            DataConfig::MnistIdx(c) => c.val_fraction,
        }
    }

    /// The default data for a model kind (generated or embedded: no download).
    fn default_for(model: &ModelConfig) -> DataConfig {
        match model {
            ModelConfig::Mlp(_) => DataConfig::Synthetic(SyntheticConfig {
                samples: d_samples(),
                features: d_features(),
                classes: d_classes(),
                val_fraction: d_val(),
            }),
            ModelConfig::Cnn(_) => DataConfig::SyntheticImages(SyntheticImagesConfig {
                samples: d_img_samples(),
                size: d_size(),
                channels: d_one(),
                classes: d_classes(),
                val_fraction: d_val(),
            }),
            ModelConfig::Gpt(_) => DataConfig::Text(TextConfig {
                path: None,
                val_fraction: d_val(),
            }),
        }
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
    "val_loss".into()
}

/// The validated trainer config.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub seed: u64,
    pub device: DeviceChoice,
    pub threads: u32,
    pub deterministic: bool,
    pub precision: Precision,
    /// The loss scaler's settings (used with `precision: fp16` only).
    pub loss_scale: LossScaleConfig,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub batch_size: u64,
    pub epochs: Option<u64>,
    pub max_steps: Option<u64>,
    pub grad_accum: u64,
    pub grad_clip: Option<f64>,
    pub optimizer: OptimizerConfig,
    pub scheduler: SchedulerConfig,
    pub eval: Option<EvalConfig>,
    /// From `checkpoint.every_steps` / `checkpoint.every_seconds`.
    pub checkpoint_every_steps: Option<u64>,
    pub checkpoint_every_seconds: Option<u64>,
    /// `checkpoint.on_save_error: stop`.
    pub stop_on_save_error: bool,
    /// `checkpoint.async`: two-phase saves, persisted in the background.
    pub checkpoint_async: bool,
    /// `checkpoint.interval: auto`: the prior MTBF in seconds (`checkpoint.mtbf`).
    pub checkpoint_auto_mtbf: Option<f64>,
    /// `checkpoint.keep_best`, its monitor checked to be a metric the trainer records
    /// (`check_monitor`).
    pub keep_best: Option<Best>,
}

/// Split a `{kind: ..., ...}` mapping into its kind (one of `accepted`) and the other keys.
fn split_kind(key: &str, v: &Value, accepted: &[&str]) -> Result<(String, Value), ConfigError> {
    let list = accepted.join(", ");
    let Value::Mapping(m) = v else {
        return Err(err(
            key,
            format!(
                "expected a mapping such as {{kind: {}, ...}}, found {}",
                accepted[0],
                found(v)
            ),
        ));
    };
    let kind = match m.get("kind") {
        None => {
            return Err(err(
                format!("{key}.kind"),
                format!("missing; accepted: {list}"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(err(
                format!("{key}.kind"),
                format!("expected one of {list}, found {}", found(other)),
            ))
        }
    };
    if !accepted.contains(&kind.as_str()) {
        return Err(err(
            format!("{key}.kind"),
            format!("unknown kind {kind:?}; accepted: {list}"),
        ));
    }
    let mut rest = Mapping::new();
    for (k, val) in m {
        if k.as_str() != Some("kind") {
            rest.insert(k.clone(), val.clone());
        }
    }
    Ok((kind, Value::Mapping(rest)))
}

/// Deserialize `v` as `T`, naming `key` + the inner path in errors.
fn de<T: DeserializeOwned>(key: &str, v: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let full = if path == "." || path.is_empty() {
            key.to_owned()
        } else if path.starts_with('[') {
            format!("{key}{path}")
        } else {
            format!("{key}.{path}")
        };
        err(full, inner)
    })
}

/// A short description of a YAML value for errors.
fn found(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

fn check_dropout(key: &str, p: f64) -> Result<(), ConfigError> {
    if p.is_finite() && (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(err(
            key,
            format!("expected a probability in [0, 1), found {p}"),
        ))
    }
}

fn check_file(key: &str, p: &std::path::Path) -> Result<(), ConfigError> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(err(key, format!("{} is not a regular file", p.display()))),
        Err(e) => Err(err(key, format!("cannot read {}: {e}", p.display()))),
    }
}

fn parse_model(v: &Value) -> Result<ModelConfig, ConfigError> {
    let (kind, rest) = split_kind("model", v, &["mlp", "cnn", "gpt"])?;
    let m = match kind.as_str() {
        "mlp" => {
            let c: MlpConfig = de("model", rest)?;
            check_dropout("model.dropout", c.dropout)?;
            ModelConfig::Mlp(c)
        }
        "cnn" => {
            let c: CnnConfig = de("model", rest)?;
            check_dropout("model.dropout", c.dropout)?;
            if c.channels.is_empty() {
                return Err(err(
                    "model.channels",
                    "expected at least one conv layer, found []",
                ));
            }
            ModelConfig::Cnn(c)
        }
        _ => {
            let c: GptConfig = de("model", rest)?;
            check_dropout("model.dropout", c.dropout)?;
            if !c.d_model.0.is_multiple_of(c.heads.0) {
                return Err(err(
                    "model.d_model",
                    format!(
                        "{} is not divisible by model.heads ({}); accepted: a multiple of heads",
                        c.d_model.0, c.heads.0
                    ),
                ));
            }
            ModelConfig::Gpt(c)
        }
    };
    Ok(m)
}

fn parse_data(v: &Value, model: &ModelConfig) -> Result<DataConfig, ConfigError> {
    let (kind, rest) = split_kind(
        "data",
        v,
        &["synthetic", "synthetic-images", "text", "mnist-idx"],
    )?;
    let d = match kind.as_str() {
        "synthetic" => {
            let c: SyntheticConfig = de("data", rest)?;
            if c.classes.0 < 2 {
                return Err(err("data.classes", "expected at least 2 classes, found 1"));
            }
            DataConfig::Synthetic(c)
        }
        "synthetic-images" => {
            let c: SyntheticImagesConfig = de("data", rest)?;
            if c.classes.0 < 2 {
                return Err(err("data.classes", "expected at least 2 classes, found 1"));
            }
            DataConfig::SyntheticImages(c)
        }
        "text" => {
            let c: TextConfig = de("data", rest)?;
            if let Some(p) = &c.path {
                check_file("data.path", p)?;
            }
            DataConfig::Text(c)
        }
        _ => {
            let c: MnistConfig = de("data", rest)?;
            check_file("data.images", &c.images)?;
            check_file("data.labels", &c.labels)?;
            DataConfig::MnistIdx(c)
        }
    };
    let vf = d.val_fraction();
    if !(vf.is_finite() && (0.0..0.9).contains(&vf)) {
        return Err(err(
            "data.val_fraction",
            format!("expected a fraction in [0, 0.9), found {vf}"),
        ));
    }
    let ok = match (model, &d) {
        (ModelConfig::Gpt(_), DataConfig::Text(_)) => true,
        (ModelConfig::Gpt(_), _) | (_, DataConfig::Text(_)) => false,
        (ModelConfig::Cnn(_), DataConfig::Synthetic(_)) => false,
        _ => true,
    };
    if !ok {
        let accepted = match model {
            ModelConfig::Mlp(_) => "synthetic, synthetic-images, mnist-idx",
            ModelConfig::Cnn(_) => "synthetic-images, mnist-idx",
            ModelConfig::Gpt(_) => "text",
        };
        return Err(err(
            "data.kind",
            format!(
                "{} data cannot feed a {} model; accepted: {accepted}",
                d.kind(),
                model.kind()
            ),
        ));
    }
    Ok(d)
}

fn parse_optimizer(v: Option<&Value>) -> Result<OptimizerConfig, ConfigError> {
    let Some(v) = v else {
        return Ok(OptimizerConfig::Adam(AdamConfig::default()));
    };
    let (kind, rest) = split_kind("optimizer", v, &["sgd", "adam", "adamw"])?;
    let has_wd = matches!(&rest, Value::Mapping(m) if m.contains_key("weight_decay"));
    let c = match kind.as_str() {
        "sgd" => OptimizerConfig::Sgd(de::<SgdConfig>("optimizer", rest)?),
        "adam" => OptimizerConfig::Adam(de::<AdamConfig>("optimizer", rest)?),
        _ => {
            let mut c: AdamConfig = de("optimizer", rest)?;
            if !has_wd {
                // torch.optim.AdamW's default.
                c.weight_decay = AdamConfig::adamw().weight_decay;
            }
            OptimizerConfig::AdamW(c)
        }
    };
    c.validate().map_err(|e| err("optimizer", e.to_string()))?;
    Ok(c)
}

fn parse_scheduler(v: Option<&Value>) -> Result<SchedulerConfig, ConfigError> {
    let Some(v) = v else {
        return Ok(SchedulerConfig::Constant(ConstantConfig::default()));
    };
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

/// `checkpoint.keep_best.monitor` must be a metric the trainer records in the checkpoints it
/// could keep: the eval metric (recorded in the checkpoint of each eval step) or `loss` (the
/// training loss of the checkpoint's own step). `lr` is recorded too but is the schedule's value,
/// not a measure of the model: refused.
fn check_monitor(monitor: &str, eval: Option<&EvalConfig>) -> Result<(), ConfigError> {
    const KEY: &str = "checkpoint.keep_best.monitor";
    match eval {
        _ if monitor == "loss" => Ok(()),
        Some(e) if monitor == e.metric => Ok(()),
        Some(e) => Err(err(
            KEY,
            format!(
                "the built-in trainer never records {monitor:?}; accepted: {} (the eval metric, \
                 measured every eval.every_steps) or loss (the training loss of the checkpoint's \
                 step)",
                e.metric
            ),
        )),
        None if monitor == d_metric() => Err(err(
            KEY,
            format!(
                "{monitor} is measured only with eval; add eval: {{every_steps: N}}, or monitor \
                 loss (the training loss of the checkpoint's step)"
            ),
        )),
        None => Err(err(
            KEY,
            format!(
                "the built-in trainer never records {monitor:?}; accepted: loss (the training \
                 loss of the checkpoint's step), or {} with eval: {{every_steps: N}}",
                d_metric()
            ),
        )),
    }
}

fn positive(key: &str, v: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match v {
        Some(0) => Err(err(key, "expected a positive integer, found 0")),
        other => Ok(other),
    }
}

/// `device`: cpu (the default), cuda or auto.
fn parse_device(v: Option<&str>) -> Result<DeviceChoice, ConfigError> {
    match v {
        None => Ok(DeviceChoice::Cpu),
        Some(s) => de::<DeviceChoice>("device", Value::String(s.to_owned())).map_err(|_| {
            err(
                "device",
                format!("unknown device {s:?}; accepted: cpu, cuda, auto"),
            )
        }),
    }
}

/// `precision`: fp32 (default), bf16 or fp16.
fn parse_precision(v: Option<&str>) -> Result<Precision, ConfigError> {
    match v {
        None => Ok(Precision::Fp32),
        Some(s) => de::<Precision>("precision", Value::String(s.to_owned())).map_err(|_| {
            err(
                "precision",
                format!("unknown precision {s:?}; accepted: fp32, bf16, fp16"),
            )
        }),
    }
}

/// `loss_scale`: the fp16 scaler's settings, refused with any other precision.
fn parse_loss_scale(
    v: Option<&Value>,
    precision: Precision,
) -> Result<LossScaleConfig, ConfigError> {
    match v {
        None => Ok(LossScaleConfig::default()),
        Some(_) if precision != Precision::Fp16 => Err(err(
            "loss_scale",
            format!(
                "configures the fp16 loss scaler, but precision is {}; accepted: \
                 precision: fp16 with loss_scale, or no loss_scale",
                precision.name()
            ),
        )),
        Some(v) => {
            let c: LossScaleConfig = de("loss_scale", v.clone())?;
            c.validate()?;
            Ok(c)
        }
    }
}

/// `threads`: 1 to 1024, default 1.
fn parse_threads(v: Option<u32>) -> Result<u32, ConfigError> {
    match v {
        None => Ok(1),
        Some(0) => Err(err("threads", "expected a positive integer, found 0")),
        Some(n) if n > 1024 => Err(err(
            "threads",
            format!("expected at most 1024 threads, found {n}"),
        )),
        Some(n) => Ok(n),
    }
}

/// `model`: required.
fn parse_model_key(v: Option<&Value>) -> Result<ModelConfig, ConfigError> {
    match v {
        None => Err(err(
            "model",
            "missing; accepted: {kind: mlp, hidden: [..]}, {kind: cnn, channels: [..]}, \
             {kind: gpt, layers, heads, d_model, context}",
        )),
        Some(v) => parse_model(v),
    }
}

/// `batch_size`: 1 to 2^20, default 32.
fn parse_batch_size(v: Option<u64>) -> Result<u64, ConfigError> {
    let batch_size = positive("batch_size", v)?.unwrap_or(32);
    if batch_size > 1 << 20 {
        return Err(err(
            "batch_size",
            format!("expected at most {}, found {batch_size}", 1u64 << 20),
        ));
    }
    Ok(batch_size)
}

/// `epochs` and `max_steps`: each positive, at least one of them given.
fn parse_length(
    epochs: Option<u64>,
    max_steps: Option<u64>,
) -> Result<(Option<u64>, Option<u64>), ConfigError> {
    let epochs = positive("epochs", epochs)?;
    let max_steps = positive("max_steps", max_steps)?;
    if epochs.is_none() && max_steps.is_none() {
        return Err(err(
            "max_steps",
            "missing: give max_steps (optimizer steps) or epochs (passes over the data), or both",
        ));
    }
    Ok((epochs, max_steps))
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

/// `eval`: its metric one the trainer records, and held-out samples in `data` to compute it.
fn parse_eval(v: Option<&Value>, data: &DataConfig) -> Result<Option<EvalConfig>, ConfigError> {
    let Some(v) = v else {
        return Ok(None);
    };
    let e: EvalConfig = de("eval", v.clone())?;
    if e.metric != "val_loss" {
        return Err(err(
            "eval.metric",
            format!("unknown metric {:?}; accepted: val_loss", e.metric),
        ));
    }
    if data.val_fraction() == 0.0 {
        return Err(err(
            "data.val_fraction",
            "is 0, but eval needs held-out samples; accepted: a fraction in (0, 0.9)",
        ));
    }
    Ok(Some(e))
}

/// The keys that read the eval metric (`checkpoint.keep_best`'s monitor, the plateau
/// scheduler) need an `eval` that records it.
fn check_needs_eval(
    scheduler: &SchedulerConfig,
    keep_best: Option<&Best>,
    eval: Option<&EvalConfig>,
) -> Result<(), ConfigError> {
    if let Some(b) = keep_best {
        check_monitor(&b.monitor, eval)?;
    }
    if matches!(scheduler, SchedulerConfig::Plateau(_)) && eval.is_none() {
        return Err(err(
            "scheduler.kind",
            "plateau reduces the lr on the eval metric; add eval: {every_steps: N}",
        ));
    }
    Ok(())
}

/// `checkpoint.interval: auto`: the prior MTBF (`checkpoint.mtbf`, validated with the job).
fn auto_mtbf(ck: &CheckpointConfig) -> Option<f64> {
    (ck.interval == Some(Interval::Auto)).then(|| ck.mtbf_seconds().unwrap_or(DEFAULT_MTBF_SECONDS))
}

impl TrainConfig {
    /// Type and validate the trainer keys of `job`: one named step a key (or a pair of keys
    /// checked together), then the checks across keys.
    pub fn from_job(job: &JobConfig) -> Result<TrainConfig, ConfigError> {
        let device = parse_device(job.device.as_deref())?;
        let precision = parse_precision(job.precision.as_deref())?;
        let loss_scale = parse_loss_scale(job.loss_scale.as_ref(), precision)?;
        let threads = parse_threads(job.threads)?;
        let model = parse_model_key(job.model.as_ref())?;
        let data = match &job.data {
            None => DataConfig::default_for(&model),
            Some(v) => parse_data(v, &model)?,
        };
        let batch_size = parse_batch_size(job.batch_size)?;
        let (epochs, max_steps) = parse_length(job.epochs, job.max_steps)?;
        let grad_accum = positive("grad_accum", job.grad_accum)?.unwrap_or(1);
        let grad_clip = parse_grad_clip(job.grad_clip)?;
        let optimizer = parse_optimizer(job.optimizer.as_ref())?;
        let scheduler = parse_scheduler(job.scheduler.as_ref())?;
        let eval = parse_eval(job.eval.as_ref(), &data)?;
        check_needs_eval(&scheduler, job.checkpoint.keep_best.as_ref(), eval.as_ref())?;
        Ok(TrainConfig {
            seed: job.seed.unwrap_or(0),
            device,
            threads,
            deterministic: job.deterministic.unwrap_or(true),
            precision,
            loss_scale,
            model,
            data,
            batch_size,
            epochs,
            max_steps,
            grad_accum,
            grad_clip,
            optimizer,
            scheduler,
            eval,
            checkpoint_every_steps: job.checkpoint.every_steps,
            checkpoint_every_seconds: job.checkpoint.every_seconds,
            stop_on_save_error: job.checkpoint.on_save_error == OnSaveError::Stop,
            checkpoint_async: job.checkpoint.async_saves,
            checkpoint_auto_mtbf: auto_mtbf(&job.checkpoint),
            keep_best: job.checkpoint.keep_best.clone(),
        })
    }

    /// Whether `keep_best` monitors the eval metric, so that every eval step must be committed
    /// (the value belongs to the weights of that step).
    pub fn commits_at_eval(&self) -> bool {
        match (&self.keep_best, &self.eval) {
            (Some(b), Some(e)) => b.monitor == e.metric,
            _ => false,
        }
    }

    /// The keys that change what a run computes, as canonical JSON (sorted keys). Safe to change
    /// on resume, hence left out: `max_steps`, `epochs`, `eval.every_steps`, `threads` (checked
    /// on its own), the `checkpoint` policy and the job-level sections. `precision` appears only
    /// when it is not fp32 (and `loss_scale` only with fp16), so that checkpoints written before
    /// the key existed keep their hash and still resume.
    pub fn hashed(&self) -> serde_json::Value {
        let mut v = self.hashed_fp32();
        if let (Some(m), true) = (v.as_object_mut(), self.precision != Precision::Fp32) {
            m.insert("precision".into(), self.precision.name().into());
            if self.precision == Precision::Fp16 {
                m.insert("loss_scale".into(), to_json(&self.loss_scale));
            }
        }
        v
    }

    fn hashed_fp32(&self) -> serde_json::Value {
        serde_json::json!({
            "seed": self.seed,
            "device": to_json(&self.device),
            "deterministic": self.deterministic,
            "model": to_json(&self.model),
            "data": to_json(&self.data),
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "grad_clip": self.grad_clip,
            "optimizer": to_json(&self.optimizer),
            "scheduler": to_json(&self.scheduler),
            "eval": self.eval.as_ref().map(|e| serde_json::json!({"batches": e.batches.0, "metric": e.metric})),
        })
    }

    /// xxh3-128 of [`Self::hashed`], hex.
    pub fn hash(&self) -> String {
        let text = self.hashed().to_string();
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
    }
}

/// Serialize to a JSON value (our own config types cannot fail to serialize: no maps with
/// non-string keys).
fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// The leaf keys where two [`TrainConfig::hashed`] values differ: `model.dropout: 0.1 → 0.2`.
pub fn changed_keys(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value as J;
        match (a, b) {
            (J::Object(x), J::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let null = J::Null;
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: {a} → {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn parse(extra: &str) -> Result<TrainConfig, String> {
        let job = JobConfig::parse(&format!("name: t\n{extra}")).map_err(|e| e.to_string())?;
        TrainConfig::from_job(&job).map_err(|e| e.to_string())
    }

    const MLP: &str = "model: {kind: mlp, hidden: [8]}\nmax_steps: 5\n";

    #[test]
    fn defaults() {
        let c = parse(MLP).unwrap();
        assert_eq!(
            (c.seed, c.threads, c.deterministic, c.grad_accum),
            (0, 1, true, 1)
        );
        assert_eq!(c.device, DeviceChoice::Cpu);
        assert_eq!(c.data.kind(), "synthetic");
        assert_eq!(c.scheduler.kind(), "constant");
        let c = parse("model: {kind: gpt, layers: 1, heads: 2, d_model: 8, context: 8}\nepochs: 1\noptimizer: {kind: adamw}\n").unwrap();
        assert_eq!(c.data.kind(), "text");
        assert!(matches!(c.optimizer, OptimizerConfig::AdamW(ref a) if a.weight_decay == 1e-2));
    }

    #[test]
    fn errors_name_the_key_path() {
        let cases = [
            ("model: {kind: mlp, hidden: [8, -3]}\nmax_steps: 5\n", "model.hidden[1]: "),
            ("model: {kind: mlp, hidden: [8, 0]}\nmax_steps: 5\n", "positive integer"),
            ("model: {kind: mlp, hiden: [8]}\nmax_steps: 5\n", "model.hiden: unknown field `hiden`, expected `hidden` or `dropout`"),
            ("model: {kind: rnn}\nmax_steps: 5\n", "model.kind: unknown kind \"rnn\"; accepted: mlp, cnn, gpt"),
            ("model: {kind: mlp, hidden: [8], dropout: 1.5}\nmax_steps: 5\n", "model.dropout"),
            ("model: {kind: gpt, layers: 1, heads: 3, d_model: 8, context: 8}\nmax_steps: 5\n", "model.d_model"),
            (&format!("{MLP}batch_size: 0\n"), "batch_size: expected a positive integer, found 0"),
            (&format!("{MLP}data: {{kind: text}}\n"), "data.kind: text data cannot feed a mlp model"),
            ("model: {kind: gpt, layers: 1, heads: 1, d_model: 8, context: 8}\nmax_steps: 5\ndata: {kind: text, path: /nonexistent/x.txt}\n", "data.path: cannot read /nonexistent/x.txt"),
            (&format!("{MLP}optimizer: {{kind: adam, lr: fast}}\n"), "optimizer.lr: invalid type"),
            (&format!("{MLP}optimizer: {{kind: adam, betas: [0.9, 1.5]}}\n"), "optimizer: "),
            (&format!("{MLP}scheduler: {{kind: step}}\n"), "scheduler: missing field `step_size`"),
            (&format!("{MLP}scheduler: {{kind: plateau}}\n"), "scheduler.kind: plateau"),
            (&format!("{MLP}eval: {{every_steps: 5, metric: acc}}\n"), "eval.metric"),
            (&format!("{MLP}device: tpu\n"), "device: unknown device \"tpu\""),
            (&format!("{MLP}threads: 0\n"), "threads: "),
            (&format!("{MLP}precision: fp8\n"), "precision: unknown precision \"fp8\"; accepted: fp32, bf16, fp16"),
            (&format!("{MLP}loss_scale: {{init_scale: 1024}}\n"), "loss_scale: configures the fp16 loss scaler, but precision is fp32"),
            (&format!("{MLP}precision: fp16\nloss_scale: {{growth_factor: 0.5}}\n"), "loss_scale.growth_factor: expected a factor > 1, found 0.5"),
            (&format!("{MLP}precision: fp16\nloss_scale: {{backoff_factor: 1}}\n"), "loss_scale.backoff_factor: expected a factor in (0, 1)"),
            (&format!("{MLP}precision: fp16\nloss_scale: {{init_scale: 1e39}}\n"), "loss_scale.init_scale: expected a positive scale that float32 can hold"),
            (&format!("{MLP}precision: fp16\nloss_scale: {{growth_interval: 0}}\n"), "loss_scale.growth_interval: "),
            (&format!("{MLP}precision: fp16\nloss_scale: {{growth: 2}}\n"), "loss_scale.growth: unknown field"),
            ("model: {kind: mlp, hidden: [8]}\n", "max_steps: missing"),
            (&format!("{MLP}grad_clip: -1\n"), "grad_clip: "),
            (&format!("{MLP}eval: {{every_steps: 5}}\ncheckpoint: {{keep_best: {{monitor: acc, mode: max}}}}\n"), "checkpoint.keep_best.monitor: the built-in trainer never records \"acc\"; accepted: val_loss"),
            (&format!("{MLP}checkpoint: {{keep_best: {{monitor: lr, mode: min}}}}\n"), "checkpoint.keep_best.monitor: the built-in trainer never records \"lr\"; accepted: loss"),
            (&format!("{MLP}checkpoint: {{keep_best: {{monitor: val_loss, mode: min}}}}\n"), "checkpoint.keep_best.monitor: val_loss is measured only with eval"),
        ];
        for (yaml, want) in cases {
            let e = parse(yaml).unwrap_err();
            eprintln!("{e}");
            assert!(e.contains(want), "{yaml:?}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn hash_ignores_safe_keys_and_lists_changes() {
        let a = parse(MLP).unwrap();
        let b = parse("model: {kind: mlp, hidden: [8]}\nmax_steps: 50\nthreads: 2\ncheckpoint: {every_steps: 3}\n").unwrap();
        assert_eq!(a.hash(), b.hash());
        let c = parse("model: {kind: mlp, hidden: [8], dropout: 0.2}\nmax_steps: 5\nseed: 3\n")
            .unwrap();
        assert_ne!(a.hash(), c.hash());
        let ch = changed_keys(&a.hashed(), &c.hashed());
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert!(ch[0].starts_with("model.dropout: 0.0 → 0.2"), "{ch:?}");
        assert!(ch[1].starts_with("seed: 0 → 3"), "{ch:?}");
    }

    #[test]
    fn precision_changes_the_hash_but_fp32_keeps_the_old_one() {
        let a = parse(MLP).unwrap();
        assert_eq!(a.precision, Precision::Fp32);
        let explicit = parse(&format!("{MLP}precision: fp32\n")).unwrap();
        assert_eq!(a.hash(), explicit.hash());
        assert!(
            a.hashed().get("precision").is_none(),
            "fp32 hashes as before the key"
        );
        let bf = parse(&format!("{MLP}precision: bf16\n")).unwrap();
        let fp = parse(&format!("{MLP}precision: fp16\n")).unwrap();
        assert_eq!(fp.loss_scale, LossScaleConfig::default());
        assert_eq!(fp.loss_scale.growth_interval, Pos(2000));
        let fp_scaled = parse(&format!(
            "{MLP}precision: fp16\nloss_scale: {{init_scale: 1024}}\n"
        ))
        .unwrap();
        let hashes = [a.hash(), bf.hash(), fp.hash(), fp_scaled.hash()];
        let distinct: BTreeSet<&String> = hashes.iter().collect();
        assert_eq!(distinct.len(), 4, "{hashes:?}");
        assert_eq!(
            changed_keys(&a.hashed(), &bf.hashed()),
            ["precision: null → \"bf16\""]
        );
        assert_eq!(
            changed_keys(&fp.hashed(), &fp_scaled.hashed()),
            ["loss_scale.init_scale: 65536.0 → 1024.0"]
        );
    }
}
