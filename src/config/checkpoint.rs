//! The `checkpoint:` section: when to save (a fixed cadence, or `interval: auto` from data and
//! the prior MTBF), what to keep (the retention keys, parsed into storage's
//! [`RetentionPolicy`]), and what a failed save does.

use serde::{Deserialize, Serialize};

use super::trainer::value::de;
use super::ConfigError;
use crate::storage::retention::RetentionPolicy;

/// The default prior MTBF, `checkpoint.mtbf` (24 h): what `checkpoint.interval: auto` assumes
/// until the run has observed an unannounced interruption.
pub const DEFAULT_MTBF_SECONDS: f64 = 24.0 * 3600.0;

/// What to do when a save fails (disk full, I/O error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSaveError {
    /// Log, journal, keep training; the previous checkpoint stays the resume point.
    #[default]
    Continue,
    /// Stop the job without requeueing (exit code 12, decision `stop`, the failed save named).
    Stop,
}

/// The `checkpoint:` section. Its retention keys are storage's: serde leaves them (and any
/// unknown key) to [`CheckpointConfig::take_retention`], which the job's parse runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// Checkpoint every N optimizer steps (trainer) — a child decides its own cadence.
    #[serde(default)]
    pub every_steps: Option<u64>,
    /// Or every N seconds of training.
    #[serde(default)]
    pub every_seconds: Option<u64>,
    /// What to keep (`keep_last`, `keep_best`, `periodic`, `milestones`): declared once, by
    /// storage's policy type, which also checks them; written back into the section.
    #[serde(flatten, skip_deserializing)]
    pub retention: RetentionPolicy,
    #[serde(default)]
    pub on_save_error: OnSaveError,
    /// `auto`: the trainer chooses its save interval from data — Daly's optimum for the measured
    /// save stall and the run's mean time between unannounced interruptions (the journal's, else
    /// `mtbf`) — instead of `every_steps`/`every_seconds`.
    #[serde(default)]
    pub interval: Option<Interval>,
    /// The prior mean time between unannounced interruptions (killed, node lost, crashed: no
    /// final save) for `interval: auto`, used until the run has observed one of its own: a
    /// duration such as `24h`, `90m`, `2days`. Default 24h.
    #[serde(default)]
    pub mtbf: Option<String>,
    /// Two-phase saves (the built-in trainer): a save copies the state into host memory and
    /// training goes on while a background thread commits it; `false`: training waits for each
    /// commit. The bytes written are the same either way.
    #[serde(rename = "async", default = "default_async")]
    pub async_saves: bool,
    /// `wrap`: let a program commit a step older than the newest checkpoint (the pointer then
    /// moves back). Off by default: committed steps only grow, and a request for an older step
    /// (usually a program that restarted from scratch) is refused.
    #[serde(default)]
    pub allow_step_backwards: bool,
    /// The section's keys that are not its own fields, until [`Self::take_retention`] reads
    /// them as the retention policy (or refuses them). Empty once parsed.
    #[serde(flatten, skip_serializing)]
    other_keys: serde_yaml::Mapping,
}

/// The section's own keys (the fields above but the retention policy), for the error that
/// names an unknown key.
const OWN_KEYS: [&str; 7] = [
    "every_steps",
    "every_seconds",
    "on_save_error",
    "interval",
    "mtbf",
    "async",
    "allow_step_backwards",
];

/// `checkpoint.interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    /// Chosen from data (see [`CheckpointConfig::interval`]).
    Auto,
}

fn default_async() -> bool {
    true
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_steps: None,
            every_seconds: None,
            retention: RetentionPolicy::kept_by_default(),
            on_save_error: OnSaveError::Continue,
            interval: None,
            mtbf: None,
            async_saves: default_async(),
            allow_step_backwards: false,
            other_keys: Default::default(),
        }
    }
}

impl CheckpointConfig {
    /// `mtbf` in seconds (the default when unset).
    pub fn mtbf_seconds(&self) -> Result<f64, ConfigError> {
        let Some(text) = &self.mtbf else {
            return Ok(DEFAULT_MTBF_SECONDS);
        };
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            ConfigError::at(
                "checkpoint.mtbf",
                format!("{text:?} is not a duration ({e}); accepted: e.g. 24h, 90m, 2days"),
            )
        })?;
        if d.as_secs_f64() < 1.0 {
            return Err(ConfigError::at(
                "checkpoint.mtbf",
                format!("{text:?} must be at least 1s"),
            ));
        }
        Ok(d.as_secs_f64())
    }

    /// Read the keys serde left over as storage's retention policy, naming each refused key
    /// under `checkpoint` (a key neither the policy's nor the section's is refused with both
    /// lists). The job's parse runs it once, before [`Self::validate`].
    pub(super) fn take_retention(&mut self) -> Result<(), ConfigError> {
        let keys = std::mem::take(&mut self.other_keys);
        self.retention = de("checkpoint", serde_yaml::Value::Mapping(keys)).map_err(|e| {
            if !e.message.starts_with("unknown field") {
                return e;
            }
            let own = OWN_KEYS.join(", ");
            ConfigError {
                message: format!("{}, or one of the section's own: {own}", e.message),
                ..e
            }
        })?;
        Ok(())
    }

    /// The section's own checks (cadence, `interval: auto` against a fixed cadence, the MTBF,
    /// the retention policy), with key paths under `checkpoint`.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.every_steps == Some(0) {
            return Err(ConfigError::at(
                "checkpoint.every_steps",
                "must be at least 1",
            ));
        }
        if self.every_seconds == Some(0) {
            return Err(ConfigError::at(
                "checkpoint.every_seconds",
                "must be at least 1",
            ));
        }
        if self.interval == Some(Interval::Auto) {
            if let Some(k) = [
                ("every_steps", self.every_steps),
                ("every_seconds", self.every_seconds),
            ]
            .iter()
            .find_map(|(k, v)| v.map(|_| k))
            {
                return Err(ConfigError::at(
                    "checkpoint.interval",
                    format!(
                        "auto chooses the save interval itself; remove checkpoint.{k}, or the \
                         interval to save on a fixed cadence"
                    ),
                ));
            }
        }
        self.mtbf_seconds()?;
        self.retention
            .validate()
            .map_err(|e| ConfigError::whole(e).under("checkpoint"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_keys_are_the_sections_fields_but_retention() {
        let v = serde_yaml::to_value(CheckpointConfig::default()).unwrap();
        let keys: Vec<&str> = v
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(|k| k.as_str())
            .filter(|k| *k != "keep_last")
            .collect();
        assert_eq!(keys, OWN_KEYS);
    }
}
