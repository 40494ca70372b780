//! The `slurm:` section: the allocation `hpc-ckpt sbatch` asks for. Every value that goes on an
//! `#SBATCH` line is checked here, and only here, to hold only what Slurm accepts there (refused,
//! never quoted: it ends up in a shell script): the plain values, the signal lead within Slurm's
//! limit, and `extra` options that do not set what the rendered script sets itself. The renderer
//! (`slurm::template`) runs these same checks ([`crate::config::JobConfig::validate`]) and writes
//! the values as they are.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The `slurm:` section: the allocation `hpc-ckpt sbatch` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    #[serde(default)]
    pub job_name: Option<String>,
    #[serde(default)]
    pub partition: Option<String>,
    /// Wall time as Slurm takes it: `MM`, `HH:MM:SS`, `D-HH:MM`, ….
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub nodes: Option<u32>,
    /// Tasks of the job: each is one rank (see `distributed`).
    #[serde(default)]
    pub ntasks: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntasks_per_node: Option<u32>,
    #[serde(default)]
    pub cpus_per_task: Option<u32>,
    /// Memory per node, e.g. `16G`, `4000M`.
    #[serde(default)]
    pub mem: Option<String>,
    /// GPUs per node, e.g. `1` or `a100:2`.
    #[serde(default)]
    pub gpus: Option<String>,
    /// GPUs per task (rank), e.g. `1` or `a100:1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_task: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub qos: Option<String>,
    /// Seconds before the end at which Slurm sends the warning signal (`--signal=B:SIG@LEAD`).
    #[serde(default = "default_lead")]
    pub signal_lead: u32,
    /// The job's output file (Slurm patterns allowed); default `<run_dir>/slurm-%j.out`.
    #[serde(default)]
    pub output: Option<String>,
    /// Extra `#SBATCH` options, e.g. `--constraint=a100` (each must start with `--`).
    #[serde(default)]
    pub extra: Vec<String>,
    /// Shell lines run before the supervisor, e.g. `module load cuda/12`.
    #[serde(default)]
    pub setup: Vec<String>,
}

/// Slurm's limit for the `@LEAD` of `--signal` (seconds).
pub const MAX_SIGNAL_LEAD: u32 = 65535;

/// Options that the rendered script sets itself; `slurm.extra` may not set them again.
const RESERVED: [&str; 17] = [
    "job-name",
    "partition",
    "time",
    "nodes",
    "ntasks",
    "ntasks-per-node",
    "cpus-per-task",
    "mem",
    "gpus",
    "gpus-per-task",
    "account",
    "qos",
    "output",
    "requeue",
    "no-requeue",
    "open-mode",
    "signal",
];

fn default_lead() -> u32 {
    120
}

impl Default for SlurmConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("empty slurm section parses")
    }
}

impl SlurmConfig {
    /// Every value of the section, each against what Slurm accepts on its `#SBATCH` line.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.check_words()?;
        self.check_counts_and_lists()
    }

    /// The text values (partition, time, memory, GPUs, account, QoS, output).
    fn check_words(&self) -> Result<(), ConfigError> {
        if let Some(v) = &self.job_name {
            check_word("slurm.job_name", v)?;
        }
        if let Some(v) = &self.partition {
            check_sbatch_value("slurm.partition", v, ",")?;
        }
        if let Some(v) = &self.time {
            check_sbatch_value("slurm.time", v, ":")?;
            if !v.chars().next().is_some_and(|c| c.is_ascii_digit())
                || v.chars().any(|c| c.is_ascii_alphabetic())
            {
                return Err(ConfigError::at(
                    "slurm.time",
                    format!(
                        "{v:?} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"
                    ),
                ));
            }
        }
        if let Some(v) = &self.mem {
            check_sbatch_value("slurm.mem", v, "")?;
            let digits = v.trim_end_matches(['K', 'M', 'G', 'T']);
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(ConfigError::at(
                    "slurm.mem",
                    format!("{v:?} is not a size like 4000M or 16G"),
                ));
            }
        }
        if let Some(v) = &self.gpus {
            check_sbatch_value("slurm.gpus", v, ":")?;
        }
        if let Some(v) = &self.gpus_per_task {
            check_sbatch_value("slurm.gpus_per_task", v, ":")?;
        }
        if let Some(v) = &self.account {
            check_sbatch_value("slurm.account", v, "")?;
        }
        if let Some(v) = &self.qos {
            check_sbatch_value("slurm.qos", v, "")?;
        }
        if let Some(v) = &self.output {
            check_sbatch_value("slurm.output", v, "/%")?;
        }
        Ok(())
    }

    /// The counts (each at least 1), the signal lead, `extra` and `setup`.
    fn check_counts_and_lists(&self) -> Result<(), ConfigError> {
        for (n, k) in [
            ("slurm.nodes", self.nodes),
            ("slurm.ntasks", self.ntasks),
            ("slurm.ntasks_per_node", self.ntasks_per_node),
            ("slurm.cpus_per_task", self.cpus_per_task),
        ] {
            if k == Some(0) {
                return Err(ConfigError::at(n, "must be at least 1"));
            }
        }
        if self.signal_lead > MAX_SIGNAL_LEAD {
            return Err(ConfigError::at(
                "slurm.signal_lead",
                format!(
                    "{} is more than Slurm's limit of {MAX_SIGNAL_LEAD} seconds",
                    self.signal_lead
                ),
            ));
        }
        for (i, e) in self.extra.iter().enumerate() {
            check_extra(&format!("slurm.extra[{i}]"), e)?;
        }
        for (i, s) in self.setup.iter().enumerate() {
            if s.contains('\n') || s.contains('\r') || s.contains('\0') {
                return Err(ConfigError::at(
                    format!("slurm.setup[{i}]"),
                    "one shell line per entry (no newlines)",
                ));
            }
        }
        Ok(())
    }
}

/// `slurm.extra[i]`: a long option of plain characters that does not set what the rendered
/// script sets from the config.
fn check_extra(key: &str, e: &str) -> Result<(), ConfigError> {
    let Some(option) = e.strip_prefix("--") else {
        return Err(ConfigError::at(
            key,
            format!("{e:?} must be a long option such as --constraint=a100"),
        ));
    };
    check_sbatch_value(key, option, "=:,/%")?;
    let name = option.split('=').next().unwrap_or_default();
    // sbatch also takes an unambiguous prefix of a long option (`--part=`).
    if let Some(r) = RESERVED
        .iter()
        .find(|r| name.len() >= 2 && r.starts_with(name))
    {
        return Err(ConfigError::at(
            key,
            format!(
                "{e:?} would set --{r}, which hpc-ckpt sets from the config (use the slurm \
                 section's own key; --requeue, --open-mode and --signal are always set)"
            ),
        ));
    }
    Ok(())
}

/// A plain word: letters, digits, `.`, `_`, `-` (no shell metacharacters, no spaces).
pub(super) fn check_word(key: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty() || v.len() > 200 {
        return Err(ConfigError::at(key, "must be 1 to 200 characters"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ConfigError::at(
            key,
            format!("{v:?} contains {c:?}; allowed are letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

/// Characters allowed in a value that goes on an `#SBATCH` line.
fn check_sbatch_value(key: &str, v: &str, extra: &str) -> Result<(), ConfigError> {
    if v.is_empty() {
        return Err(ConfigError::at(key, "must not be empty"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c) || extra.contains(*c)))
    {
        return Err(ConfigError::at(
            key,
            format!(
                "{v:?} contains {c:?}, which Slurm does not accept there (refused rather than \
                 quoted: it would end up in a shell script)"
            ),
        ));
    }
    Ok(())
}
