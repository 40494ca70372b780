//! The `model:` section: which network the built-in trainer builds (`mlp`, `cnn`, `gpt`) and
//! its sizes; [`ModelConfig::parse`] refuses an unknown kind or key, a size that is not a
//! positive integer, a dropout outside [0, 1) and a `d_model` the heads do not divide.

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::value::{de, err, split_kind, Pos};
use crate::config::ConfigError;

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

pub(super) fn check_dropout(key: &str, p: f64) -> Result<(), ConfigError> {
    if p.is_finite() && (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(err(
            key,
            format!("expected a probability in [0, 1), found {p}"),
        ))
    }
}

impl ModelConfig {
    /// What `model:` may say, for the error when it is missing.
    pub const ACCEPTED: &'static str = "{kind: mlp, hidden: [..]}, {kind: cnn, channels: [..]}, \
         {kind: gpt, layers, heads, d_model, context}";

    /// Type and check the `model:` section.
    pub fn parse(v: &Value) -> Result<ModelConfig, ConfigError> {
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
}
