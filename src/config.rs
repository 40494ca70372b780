//! The job config (`job.yaml`): one file describes a training job for every command — what to
//! run, where its run dir is, how often to checkpoint and what to keep, when to requeue, and the
//! Slurm allocation to ask for.
//!
//! Parsing is strict: an unknown key, a wrong type or an impossible value is refused with the
//! key path (`checkpoint.keep_last`), what was found, and what is accepted. The trainer's own
//! sections (`model`, `data`, `optimizer`, `scheduler`, `eval`, …) are validated by the trainer.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sig::Sig;
use crate::storage::retention::{Best, Periodic, RetentionPolicy};

/// The default prior MTBF, `checkpoint.mtbf` (24 h): what `checkpoint.interval: auto` assumes
/// until the run has observed an unannounced interruption.
pub const DEFAULT_MTBF_SECONDS: f64 = 24.0 * 3600.0;

/// A config error: the file, the key path, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job name: letters, digits, `.`, `_`, `-` (used for the run dir and the Slurm job name).
    pub name: String,
    /// Run directory; default `runs/<name>` (relative paths are relative to the working dir).
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// The program `wrap` supervises when none is given after `--` (`["train"]` is the built-in
    /// trainer). Default: the built-in trainer.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub requeue: RequeueConfig,
    #[serde(default)]
    pub signals: SignalConfig,
    #[serde(default)]
    pub slurm: SlurmConfig,
    /// Skipped when default, so the frozen `config.yaml` of a 1-rank run reads as before.
    #[serde(default, skip_serializing_if = "DistributedConfig::is_default")]
    pub distributed: DistributedConfig,

    // The built-in trainer's keys (validated by the trainer, feature `torch`).
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub threads: Option<u32>,
    #[serde(default)]
    pub deterministic: Option<bool>,
    #[serde(default)]
    pub model: Option<serde_yaml::Value>,
    #[serde(default)]
    pub data: Option<serde_yaml::Value>,
    #[serde(default)]
    pub batch_size: Option<u64>,
    #[serde(default)]
    pub epochs: Option<u64>,
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default)]
    pub grad_accum: Option<u64>,
    #[serde(default)]
    pub grad_clip: Option<f64>,
    #[serde(default)]
    pub optimizer: Option<serde_yaml::Value>,
    #[serde(default)]
    pub scheduler: Option<serde_yaml::Value>,
    #[serde(default)]
    pub eval: Option<serde_yaml::Value>,
}

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Checkpoint every N optimizer steps (trainer) — a child decides its own cadence.
    #[serde(default)]
    pub every_steps: Option<u64>,
    /// Or every N seconds of training.
    #[serde(default)]
    pub every_seconds: Option<u64>,
    /// Keep the newest N checkpoints (≥ 1); omitted keeps everything.
    #[serde(default = "default_keep_last")]
    pub keep_last: Option<usize>,
    #[serde(default)]
    pub keep_best: Option<Best>,
    #[serde(default)]
    pub periodic: Option<Periodic>,
    #[serde(default)]
    pub milestones: Vec<u64>,
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
}

/// `checkpoint.interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    /// Chosen from data (see [`CheckpointConfig::interval`]).
    Auto,
}

fn default_keep_last() -> Option<usize> {
    Some(3)
}

fn default_async() -> bool {
    true
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_steps: None,
            every_seconds: None,
            keep_last: default_keep_last(),
            keep_best: None,
            periodic: None,
            milestones: Vec::new(),
            on_save_error: OnSaveError::Continue,
            interval: None,
            mtbf: None,
            async_saves: default_async(),
            allow_step_backwards: false,
        }
    }
}

impl CheckpointConfig {
    /// `mtbf` in seconds (the default when unset).
    pub fn mtbf_seconds(&self) -> Result<f64, String> {
        let Some(text) = &self.mtbf else {
            return Ok(DEFAULT_MTBF_SECONDS);
        };
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            format!(
                "checkpoint.mtbf: {text:?} is not a duration ({e}); accepted: e.g. 24h, 90m, 2days"
            )
        })?;
        if d.as_secs_f64() < 1.0 {
            return Err(format!("checkpoint.mtbf: {text:?} must be at least 1s"));
        }
        Ok(d.as_secs_f64())
    }

    pub fn retention(&self) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: self.keep_last,
            keep_best: self.keep_best.clone(),
            periodic: self.periodic.clone(),
            milestones: self.milestones.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequeueConfig {
    /// Stop requeueing after this many restarts of the job chain.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Stop after this many allocations in a row ended without a new checkpoint (crash loop).
    #[serde(default = "default_max_no_progress")]
    pub max_no_progress: u32,
}

fn default_max_restarts() -> u32 {
    50
}
fn default_max_no_progress() -> u32 {
    3
}

impl Default for RequeueConfig {
    fn default() -> Self {
        RequeueConfig {
            max_restarts: default_max_restarts(),
            max_no_progress: default_max_no_progress(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalConfig {
    /// The early warning Slurm sends (`--signal=B:<warn>@<lead>`): checkpoint, requeue, exit.
    #[serde(default = "default_warn")]
    pub warn: Sig,
    /// What `wrap` sends the child to ask for a checkpoint and exit.
    #[serde(default = "default_warn")]
    pub child: Sig,
    /// Seconds the child gets after the signal before TERM, then KILL.
    #[serde(default = "default_grace")]
    pub grace_seconds: u64,
}

fn default_warn() -> Sig {
    Sig::Usr1
}
fn default_grace() -> u64 {
    60
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            warn: default_warn(),
            child: default_warn(),
            grace_seconds: default_grace(),
        }
    }
}

/// How the ranks of a multi-rank job start (`distributed.launcher`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// `srun` inside a Slurm job, `local` outside one (a 1-rank job: the program alone, as ever).
    #[default]
    Auto,
    /// `srun --ntasks=N --kill-on-bad-exit=1 hpc-ckpt rank -- CMD`: one step of N tasks.
    Srun,
    /// The supervisor starts the N ranks itself on this machine (tests, one node, no Slurm).
    Local,
    /// The command is its own launcher (e.g. `torchrun`) and starts `hpc-ckpt rank -- …` per
    /// rank; the supervisor starts it once.
    Command,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Auto => "auto",
            Launcher::Srun => "srun",
            Launcher::Local => "local",
            Launcher::Command => "command",
        }
    }
}

/// The `distributed:` section: how many ranks the job has and how they start.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedConfig {
    /// Ranks of the job. Default: `slurm.ntasks`, else `slurm.nodes` × `slurm.ntasks_per_node`
    /// (1 per node), else 1.
    #[serde(default)]
    pub world_size: Option<u32>,
    #[serde(default)]
    pub launcher: Launcher,
    /// The program reshards per-rank (sharded) state itself: resuming a sharded checkpoint with
    /// another world size is allowed (it reads `HPC_CKPT_RESUME_WORLD_SIZE`). Off: refused.
    #[serde(default)]
    pub reshard: bool,
}

impl DistributedConfig {
    fn is_default(&self) -> bool {
        *self == DistributedConfig::default()
    }
}

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

fn default_lead() -> u32 {
    120
}

impl Default for SlurmConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("empty slurm section parses")
    }
}

impl JobConfig {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<JobConfig, ConfigError> {
        let err = |message: String| ConfigError {
            file: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(err)
    }

    /// Parse and validate YAML text; the error names the key path.
    pub fn parse(text: &str) -> Result<JobConfig, String> {
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: JobConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." || path.is_empty() {
                inner
            } else {
                format!("{path}: {inner}")
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        check_word("name", &self.name)?;
        if let Some(c) = &self.command {
            if c.is_empty() || c[0].is_empty() {
                return Err("command: must name a program, e.g. [python, train.py]".into());
            }
        }
        let ck = &self.checkpoint;
        if ck.every_steps == Some(0) {
            return Err("checkpoint.every_steps: must be at least 1".into());
        }
        if ck.every_seconds == Some(0) {
            return Err("checkpoint.every_seconds: must be at least 1".into());
        }
        if ck.interval == Some(Interval::Auto) {
            if let Some(k) = [
                ("every_steps", ck.every_steps),
                ("every_seconds", ck.every_seconds),
            ]
            .iter()
            .find_map(|(k, v)| v.map(|_| k))
            {
                return Err(format!(
                    "checkpoint.interval: auto chooses the save interval itself; remove                      checkpoint.{k}, or the interval to save on a fixed cadence"
                ));
            }
        }
        ck.mtbf_seconds()?;
        ck.retention()
            .validate()
            .map_err(|e| format!("checkpoint: {e}"))?;
        if self.requeue.max_no_progress == 0 {
            return Err("requeue.max_no_progress: must be at least 1".into());
        }
        self.slurm.validate()?;
        self.validate_world_size()
    }

    /// The ranks Slurm's options imply (`ntasks`, else `nodes` × `ntasks_per_node`), if any.
    fn slurm_tasks(&self) -> Option<u32> {
        let s = &self.slurm;
        s.ntasks.or_else(|| {
            let per_node = s.ntasks_per_node?;
            Some(s.nodes.unwrap_or(1).saturating_mul(per_node))
        })
    }

    fn validate_world_size(&self) -> Result<(), String> {
        let d = &self.distributed;
        if d.world_size == Some(0) {
            return Err("distributed.world_size: must be at least 1".into());
        }
        if let (Some(w), Some(t)) = (d.world_size, self.slurm_tasks()) {
            if w != t {
                return Err(format!(
                    "distributed.world_size: {w} ranks, but the slurm section asks for {t} tasks \
                     (one rank per task): make them agree, or leave world_size out"
                ));
            }
        }
        if let (Some(n), Some(per)) = (self.slurm.ntasks, self.slurm.ntasks_per_node) {
            if n > per.saturating_mul(self.slurm.nodes.unwrap_or(u32::MAX)) {
                return Err(format!(
                    "slurm.ntasks: {n} tasks do not fit on {} node(s) × {per} tasks per node",
                    self.slurm.nodes.unwrap_or(1)
                ));
            }
        }
        if self.world_size() == 1 && d.launcher == Launcher::Command {
            return Err(
                "distributed.launcher: `command` starts ranks through the program's own \
                 launcher; set distributed.world_size to the number of ranks it starts"
                    .into(),
            );
        }
        Ok(())
    }

    /// Set the world size (`wrap --ranks N`), checked like the file's own.
    pub fn set_world_size(&mut self, n: u32) -> Result<(), String> {
        self.distributed.world_size = Some(n);
        self.validate_world_size()
            .map_err(|e| format!("--ranks {n}: {e}"))
    }

    /// The job's ranks: `distributed.world_size`, else what the slurm section implies, else 1.
    pub fn world_size(&self) -> u32 {
        self.distributed
            .world_size
            .or_else(|| self.slurm_tasks())
            .or(self.slurm.nodes)
            .unwrap_or(1)
    }

    /// The run directory (config's, else `runs/<name>`).
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }
}

/// A plain word: letters, digits, `.`, `_`, `-` (no shell metacharacters, no spaces).
fn check_word(key: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 200 {
        return Err(format!("{key}: must be 1 to 200 characters"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{key}: {v:?} contains {c:?}; allowed are letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Characters allowed in a value that goes on an `#SBATCH` line.
fn check_sbatch_value(key: &str, v: &str, extra: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err(format!("{key}: must not be empty"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c) || extra.contains(*c)))
    {
        return Err(format!(
            "{key}: {v:?} contains {c:?}, which Slurm does not accept there (refused rather than \
             quoted: it would end up in a shell script)"
        ));
    }
    Ok(())
}

impl SlurmConfig {
    fn validate(&self) -> Result<(), String> {
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
                return Err(format!(
                    "slurm.time: {v:?} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"
                ));
            }
        }
        if let Some(v) = &self.mem {
            check_sbatch_value("slurm.mem", v, "")?;
            let digits = v.trim_end_matches(['K', 'M', 'G', 'T']);
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(format!("slurm.mem: {v:?} is not a size like 4000M or 16G"));
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
        for (n, k) in [
            ("slurm.nodes", self.nodes),
            ("slurm.ntasks", self.ntasks),
            ("slurm.ntasks_per_node", self.ntasks_per_node),
            ("slurm.cpus_per_task", self.cpus_per_task),
        ] {
            if k == Some(0) {
                return Err(format!("{n}: must be at least 1"));
            }
        }
        for (i, e) in self.extra.iter().enumerate() {
            let key = format!("slurm.extra[{i}]");
            if !e.starts_with("--") {
                return Err(format!(
                    "{key}: {e:?} must be a long option such as --constraint=a100"
                ));
            }
            check_sbatch_value(&key, &e[2..], "=:,/%")?;
        }
        for (i, s) in self.setup.iter().enumerate() {
            if s.contains('\n') || s.contains('\r') || s.contains('\0') {
                return Err(format!(
                    "slurm.setup[{i}]: one shell line per entry (no newlines)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_and_defaults() {
        let c = JobConfig::parse("name: demo\n").unwrap();
        assert_eq!(c.run_dir(), PathBuf::from("runs/demo"));
        assert_eq!(c.checkpoint.keep_last, Some(3));
        assert_eq!(c.requeue.max_no_progress, 3);
        assert_eq!(c.signals.warn, Sig::Usr1);
        assert_eq!(c.slurm.signal_lead, 120);
    }

    #[test]
    fn errors_name_the_key_path() {
        let e = JobConfig::parse("name: x\ncheckpoint:\n  keep_lst: 3\n").unwrap_err();
        assert!(e.contains("checkpoint") && e.contains("keep_lst"), "{e}");
        let e = JobConfig::parse("name: x\nrequeue:\n  max_restarts: lots\n").unwrap_err();
        assert!(e.contains("requeue.max_restarts"), "{e}");
        let e = JobConfig::parse("name: x\nslurm:\n  partition: 'x; rm -rf ~'\n").unwrap_err();
        assert!(
            e.contains("slurm.partition") && e.contains("refused"),
            "{e}"
        );
        let e = JobConfig::parse("name: 'a b'\n").unwrap_err();
        assert!(e.starts_with("name:"), "{e}");
        let e = JobConfig::parse("name: x\nsignals:\n  warn: KILL\n").unwrap_err();
        assert!(e.contains("signals.warn"), "{e}");
        let e = JobConfig::parse("name: x\ncheckpoint:\n  keep_last: 0\n").unwrap_err();
        assert!(e.contains("keep_last"), "{e}");
        let e = JobConfig::parse("name: x\nslurm:\n  extra: ['--x=$(reboot)']\n").unwrap_err();
        assert!(e.contains("slurm.extra[0]"), "{e}");
        let e = JobConfig::parse("name: x\nslurm:\n  time: 'soon'\n").unwrap_err();
        assert!(e.contains("slurm.time"), "{e}");
        let e = JobConfig::parse("name: x\ncheckpoint: {interval: often}\n").unwrap_err();
        assert!(e.contains("checkpoint.interval"), "{e}");
        let e = JobConfig::parse("name: x\ncheckpoint: {interval: auto, every_steps: 5}\n")
            .unwrap_err();
        assert!(
            e.contains("checkpoint.interval") && e.contains("every_steps"),
            "{e}"
        );
        let e = JobConfig::parse("name: x\ncheckpoint: {mtbf: soon}\n").unwrap_err();
        assert!(e.starts_with("checkpoint.mtbf"), "{e}");
    }

    #[test]
    fn interval_auto_and_its_mtbf_prior() {
        let c = JobConfig::parse("name: x\ncheckpoint: {interval: auto}\n").unwrap();
        assert_eq!(c.checkpoint.interval, Some(Interval::Auto));
        assert_eq!(c.checkpoint.mtbf_seconds().unwrap(), 86400.0);
        let c = JobConfig::parse("name: x\ncheckpoint: {interval: auto, mtbf: 90m}\n").unwrap();
        assert_eq!(c.checkpoint.mtbf_seconds().unwrap(), 5400.0);
    }

    #[test]
    fn world_size_comes_from_distributed_or_slurm_and_they_must_agree() {
        let ws = |y: &str| {
            JobConfig::parse(&format!("name: x\n{y}"))
                .unwrap()
                .world_size()
        };
        assert_eq!(ws(""), 1);
        assert_eq!(ws("distributed:\n  world_size: 3\n"), 3);
        assert_eq!(ws("slurm:\n  ntasks: 4\n"), 4);
        assert_eq!(
            ws("slurm:\n  nodes: 2\n"),
            2,
            "one task per node, as Slurm does"
        );
        assert_eq!(ws("slurm:\n  nodes: 2\n  ntasks_per_node: 3\n"), 6);
        assert_eq!(
            ws("slurm:\n  ntasks: 2\ndistributed:\n  world_size: 2\n  launcher: local\n"),
            2
        );
        let e = JobConfig::parse("name: x\nslurm:\n  ntasks: 2\ndistributed:\n  world_size: 3\n")
            .unwrap_err();
        assert!(
            e.contains("distributed.world_size") && e.contains("2 tasks"),
            "{e}"
        );
        let e = JobConfig::parse("name: x\ndistributed:\n  world_size: 0\n").unwrap_err();
        assert!(e.contains("distributed.world_size"), "{e}");
        let e = JobConfig::parse("name: x\ndistributed:\n  launcher: mpi\n").unwrap_err();
        assert!(e.contains("distributed.launcher"), "{e}");
        let e = JobConfig::parse("name: x\nslurm:\n  ntasks_per_node: 0\n").unwrap_err();
        assert!(e.contains("slurm.ntasks_per_node"), "{e}");
        let e =
            JobConfig::parse("name: x\nslurm:\n  nodes: 1\n  ntasks: 3\n  ntasks_per_node: 2\n")
                .unwrap_err();
        assert!(e.contains("slurm.ntasks"), "{e}");
        let e = JobConfig::parse("name: x\nslurm:\n  gpus_per_task: 'a b'\n").unwrap_err();
        assert!(e.contains("slurm.gpus_per_task"), "{e}");
    }
}
