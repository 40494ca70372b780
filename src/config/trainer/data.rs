//! The `data:` section: what the built-in trainer trains on (`synthetic`, `synthetic-images`,
//! `text`, `mnist-idx`) and the share held out for evaluation. [`DataConfig::parse`] checks the
//! section on its own; [`DataConfig::check_feeds`] (the data against the model) and
//! [`DataConfig::check_files`] (the files it names exist) run when the trainer is about to use it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::model::ModelConfig;
use super::value::{de, err, split_kind, Pos};
use crate::config::ConfigError;

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
    pub fn default_for(model: &ModelConfig) -> DataConfig {
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

fn check_file(key: &str, p: &std::path::Path) -> Result<(), ConfigError> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(err(key, format!("{} is not a regular file", p.display()))),
        Err(e) => Err(err(key, format!("cannot read {}: {e}", p.display()))),
    }
}

impl DataConfig {
    /// Type and check the `data:` section on its own (its kind, keys, classes and
    /// `val_fraction`).
    pub fn parse(v: &Value) -> Result<DataConfig, ConfigError> {
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
            "text" => DataConfig::Text(de("data", rest)?),
            _ => DataConfig::MnistIdx(de("data", rest)?),
        };
        let vf = d.val_fraction();
        if !(vf.is_finite() && (0.0..0.9).contains(&vf)) {
            return Err(err(
                "data.val_fraction",
                format!("expected a fraction in [0, 0.9), found {vf}"),
            ));
        }
        Ok(d)
    }

    /// The data can feed `model` (text feeds gpt, images cnn and mlp, vectors mlp).
    pub fn check_feeds(&self, model: &ModelConfig) -> Result<(), ConfigError> {
        let d = self;
        let ok = match (model, d) {
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
        Ok(())
    }

    /// The files the data names exist and are regular files.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        match self {
            DataConfig::Text(TextConfig { path: Some(p), .. }) => check_file("data.path", p),
            DataConfig::MnistIdx(c) => {
                check_file("data.images", &c.images)?;
                check_file("data.labels", &c.labels)
            }
            _ => Ok(()),
        }
    }
}
