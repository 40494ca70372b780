//! The `optimizer:` section: SGD, Adam or AdamW with `torch.optim`'s arguments and defaults,
//! each value checked as `torch.optim` checks it. The optimizers themselves are the trainer's
//! (`train::optim`).

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::value::{de, err, split_kind};
use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgdConfig {
    /// Base learning rate (the value a scheduler starts from; each step is given its own lr).
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

/// `torch.optim.Adam`'s / `AdamW`'s hyperparameters. Defaults are Adam's; AdamW's default
/// weight decay is 1e-2 ([`AdamConfig::adamw`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamConfig {
    /// Base learning rate (the value a scheduler starts from; each step is given its own lr).
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        }
    }
}

impl AdamConfig {
    /// `torch.optim.AdamW`'s defaults (weight decay 1e-2).
    pub fn adamw() -> Self {
        AdamConfig {
            weight_decay: 1e-2,
            ..AdamConfig::default()
        }
    }
}

/// Which optimizer, with its hyperparameters; as written in a job config
/// (`{kind: adamw, lr: 3e-4, weight_decay: 0.1}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    Sgd(SgdConfig),
    Adam(AdamConfig),
    /// Adam with decoupled weight decay (`param *= 1 - lr * weight_decay` before the update).
    #[serde(rename = "adamw")]
    AdamW(AdamConfig),
}

impl OptimizerConfig {
    /// `sgd`, `adam` or `adamw`.
    pub fn kind(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd(_) => "sgd",
            OptimizerConfig::Adam(_) => "adam",
            OptimizerConfig::AdamW(_) => "adamw",
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Sgd(c) => c.lr,
            OptimizerConfig::Adam(c) | OptimizerConfig::AdamW(c) => c.lr,
        }
    }

    /// The checks `torch.optim`'s constructors make, with the same meaning.
    /// Check the values as `torch.optim` does; the error names the kind and the value.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |what: String| Err(format!("{}: {what}", self.kind()));
        let nonneg = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "{}: invalid {name} {v} (must be finite and >= 0)",
                    self.kind()
                ))
            }
        };
        match self {
            OptimizerConfig::Sgd(c) => {
                nonneg("lr", c.lr)?;
                nonneg("momentum", c.momentum)?;
                nonneg("weight_decay", c.weight_decay)?;
                if !c.dampening.is_finite() {
                    return bad(format!("invalid dampening {}", c.dampening));
                }
                if c.nesterov && (c.momentum <= 0.0 || c.dampening != 0.0) {
                    return bad("nesterov momentum requires a momentum and zero dampening".into());
                }
            }
            OptimizerConfig::Adam(c) | OptimizerConfig::AdamW(c) => {
                nonneg("lr", c.lr)?;
                nonneg("eps", c.eps)?;
                nonneg("weight_decay", c.weight_decay)?;
                for (i, b) in [c.betas.0, c.betas.1].into_iter().enumerate() {
                    if !(0.0..1.0).contains(&b) {
                        return bad(format!("invalid beta parameter at index {i}: {b}"));
                    }
                }
            }
        }
        Ok(())
    }
}

impl OptimizerConfig {
    /// Type and check the `optimizer:` section (AdamW's `weight_decay` defaults to
    /// `torch.optim.AdamW`'s).
    pub fn parse(v: &Value) -> Result<OptimizerConfig, ConfigError> {
        let (kind, rest) = split_kind("optimizer", v, &["sgd", "adam", "adamw"])?;
        let has_wd = matches!(&rest, Value::Mapping(m) if m.contains_key("weight_decay"));
        let c = match kind.as_str() {
            "sgd" => OptimizerConfig::Sgd(de::<SgdConfig>("optimizer", rest)?),
            "adam" => OptimizerConfig::Adam(de::<AdamConfig>("optimizer", rest)?),
            _ => {
                let mut c: AdamConfig = de("optimizer", rest)?;
                if !has_wd {
                    c.weight_decay = AdamConfig::adamw().weight_decay;
                }
                OptimizerConfig::AdamW(c)
            }
        };
        c.validate().map_err(|e| err("optimizer", e))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked_like_torch_optim() {
        let sgd = |c| OptimizerConfig::Sgd(c).validate();
        assert!(sgd(SgdConfig {
            nesterov: true,
            momentum: 0.9,
            ..SgdConfig::default()
        })
        .is_ok());
        let e = sgd(SgdConfig {
            nesterov: true,
            ..SgdConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("nesterov"), "{e}");
        let e = OptimizerConfig::Adam(AdamConfig {
            betas: (0.9, 1.0),
            ..AdamConfig::default()
        })
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("beta parameter at index 1"), "{e}");
        let e = OptimizerConfig::AdamW(AdamConfig {
            lr: -1.0,
            ..AdamConfig::adamw()
        })
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("adamw: invalid lr -1"), "{e}");
    }

    #[test]
    fn config_reads_from_yaml() {
        let c: OptimizerConfig =
            serde_yaml::from_str("kind: adamw\nlr: 3.0e-4\nweight_decay: 0.1\n").unwrap();
        assert_eq!(
            c,
            OptimizerConfig::AdamW(AdamConfig {
                lr: 3e-4,
                weight_decay: 0.1,
                ..AdamConfig::default()
            })
        );
        let c: OptimizerConfig = serde_yaml::from_str("kind: sgd\nmomentum: 0.9\n").unwrap();
        assert_eq!(c.kind(), "sgd");
        assert!(serde_yaml::from_str::<OptimizerConfig>("kind: sgd\nmomentun: 0.9\n").is_err());
    }
}
