//! The job file as a whole: [`JobConfig`] — its top-level keys, the small sections the supervisor
//! reads (`requeue`, `signals`, `distributed`), and the checks that span sections (the world
//! size against the Slurm tasks). [`JobConfig::parse`] is the one parse of the file: serde types
//! every key (an unknown key, a wrong type: refused with its path), then each section validates
//! its own values where it is defined.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::slurm::check_word;
use super::trainer::TrainerKeys;
use super::{CheckpointConfig, ConfigError, SlurmConfig};
use crate::sig::Sig;

/// The job file, typed. Build it with [`JobConfig::parse`] or [`JobConfig::load`]: serde alone
/// leaves the trainer's keys untyped (and an unknown key unrefused) until the parse takes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

    /// The built-in trainer's keys (`seed`, `model`, `data`, …), typed and checked by
    /// [`super::trainer`]; written back at the top level, as the file has them.
    #[serde(flatten, skip_deserializing)]
    pub trainer: TrainerKeys,
    /// The top-level keys that are not the job's, as serde leaves them to [`JobConfig::parse`]:
    /// the trainer's, typed into `trainer`, or unknown, refused. Empty once parsed.
    #[serde(flatten, skip_serializing)]
    other_keys: serde_yaml::Mapping,
}

/// The job's own top-level keys (the fields above), for the error that names an unknown key.
const JOB_KEYS: [&str; 8] = [
    "name",
    "run_dir",
    "command",
    "checkpoint",
    "requeue",
    "signals",
    "slurm",
    "distributed",
];

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
    /// Seconds a forwarded stop signal waits, at most, for a program that has not said it is
    /// ready (its handlers not installed yet: a Python program still importing torch), counted
    /// from the program's start; never longer than half of `grace_seconds`.
    #[serde(default = "default_ready")]
    pub ready_seconds: u64,
}

fn default_warn() -> Sig {
    Sig::Usr1
}
fn default_grace() -> u64 {
    60
}
fn default_ready() -> u64 {
    10
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            warn: default_warn(),
            child: default_warn(),
            grace_seconds: default_grace(),
            ready_seconds: default_ready(),
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

impl JobConfig {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<JobConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::whole(format!("cannot read: {e}")).in_file(path.display()))?;
        Self::parse(&text).map_err(|e| e.in_file(path.display()))
    }

    /// Parse and validate YAML text; the error names the key path. The one parse of the file:
    /// the job's keys are typed by serde, the trainer's by [`TrainerKeys::parse`], then each
    /// section's checks run.
    pub fn parse(text: &str) -> Result<JobConfig, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let mut cfg: JobConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." || path.is_empty() {
                ConfigError::whole(inner)
            } else {
                ConfigError::at(path, inner)
            }
        })?;
        cfg.checkpoint.take_retention()?;
        let others = std::mem::take(&mut cfg.other_keys);
        cfg.trainer = TrainerKeys::parse(&others, &JOB_KEYS)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every check of the file's values ([`JobConfig::parse`] runs it; so does the sbatch
    /// renderer, since a `JobConfig` can also be built or changed in code).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_word("name", &self.name)?;
        if let Some(c) = &self.command {
            if c.is_empty() || c[0].is_empty() {
                return Err(ConfigError::at(
                    "command",
                    "must name a program, e.g. [python, train.py]",
                ));
            }
        }
        self.checkpoint.validate()?;
        if self.requeue.max_no_progress == 0 {
            return Err(ConfigError::at(
                "requeue.max_no_progress",
                "must be at least 1",
            ));
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

    fn validate_world_size(&self) -> Result<(), ConfigError> {
        let d = &self.distributed;
        if d.world_size == Some(0) {
            return Err(ConfigError::at(
                "distributed.world_size",
                "must be at least 1",
            ));
        }
        if let (Some(w), Some(t)) = (d.world_size, self.slurm_tasks()) {
            if w != t {
                return Err(ConfigError::at(
                    "distributed.world_size",
                    format!(
                        "{w} ranks, but the slurm section asks for {t} tasks (one rank per \
                         task): make them agree, or leave world_size out"
                    ),
                ));
            }
        }
        if let (Some(n), Some(per)) = (self.slurm.ntasks, self.slurm.ntasks_per_node) {
            if n > per.saturating_mul(self.slurm.nodes.unwrap_or(u32::MAX)) {
                return Err(ConfigError::at(
                    "slurm.ntasks",
                    format!(
                        "{n} tasks do not fit on {} node(s) × {per} tasks per node",
                        self.slurm.nodes.unwrap_or(1)
                    ),
                ));
            }
        }
        if self.world_size() == 1 && d.launcher == Launcher::Command {
            return Err(ConfigError::at(
                "distributed.launcher",
                "`command` starts ranks through the program's own launcher; set \
                 distributed.world_size to the number of ranks it starts",
            ));
        }
        Ok(())
    }

    /// Set the world size (`wrap --ranks N`), checked like the file's own.
    pub fn set_world_size(&mut self, n: u32) -> Result<(), ConfigError> {
        self.distributed.world_size = Some(n);
        self.validate_world_size().map_err(|e| ConfigError {
            message: format!("--ranks {n}: {}: {}", e.key, e.message),
            key: String::new(),
            ..e
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Interval;
    use crate::storage::RetentionPolicy;

    /// The error `yaml` is refused with, as displayed.
    fn refused(yaml: &str) -> String {
        JobConfig::parse(yaml).unwrap_err().to_string()
    }

    #[test]
    fn minimal_and_defaults() {
        let c = JobConfig::parse("name: demo\n").unwrap();
        assert_eq!(c.run_dir(), PathBuf::from("runs/demo"));
        assert_eq!(c.checkpoint.retention.keep_last, Some(3));
        assert_eq!(c.requeue.max_no_progress, 3);
        assert_eq!(c.signals.warn, Sig::Usr1);
        assert_eq!(c.slurm.signal_lead, 120);
    }

    #[test]
    fn errors_name_the_key_path() {
        let e = refused("name: x\ncheckpoint:\n  keep_lst: 3\n");
        assert!(e.contains("checkpoint") && e.contains("keep_lst"), "{e}");
        let e = refused("name: x\nrequeue:\n  max_restarts: lots\n");
        assert!(e.contains("requeue.max_restarts"), "{e}");
        let e = refused("name: x\nslurm:\n  partition: 'x; rm -rf ~'\n");
        assert!(
            e.contains("slurm.partition") && e.contains("refused"),
            "{e}"
        );
        let e = refused("name: 'a b'\n");
        assert!(e.starts_with("name:"), "{e}");
        let e = refused("name: x\nsignals:\n  warn: KILL\n");
        assert!(e.contains("signals.warn"), "{e}");
        let e = refused("name: x\ncheckpoint:\n  keep_last: 0\n");
        assert!(e.contains("keep_last"), "{e}");
        let e = refused("name: x\nslurm:\n  extra: ['--x=$(reboot)']\n");
        assert!(e.contains("slurm.extra[0]"), "{e}");
        let e = refused("name: x\nslurm:\n  time: 'soon'\n");
        assert!(e.contains("slurm.time"), "{e}");
        let e = refused("name: x\ncheckpoint: {interval: often}\n");
        assert!(e.contains("checkpoint.interval"), "{e}");
        let e = refused("name: x\ncheckpoint: {interval: auto, every_steps: 5}\n");
        assert!(
            e.contains("checkpoint.interval") && e.contains("every_steps"),
            "{e}"
        );
        let e = refused("name: x\ncheckpoint: {mtbf: soon}\n");
        assert!(e.starts_with("checkpoint.mtbf"), "{e}");
    }

    #[test]
    fn trainer_keys_are_typed_with_the_file_and_written_back_as_given() {
        let yaml = "name: x\nseed: 3\nprecision: bf16\nmodel: {kind: gpt, layers: 1, heads: 2, \
                    d_model: 8, context: 8}\ndata: {kind: text}\noptimizer: {kind: adamw}\n\
                    scheduler: {kind: cosine, warmup_steps: 2}\neval: {every_steps: 5}\n\
                    max_steps: 9\n";
        let c = JobConfig::parse(yaml).unwrap();
        assert_eq!(c.trainer.seed, Some(3));
        assert_eq!(c.trainer.model.as_ref().map(|m| m.kind()), Some("gpt"));
        // The frozen copy of the run dir reads back as the same config.
        let frozen = serde_yaml::to_string(&c).unwrap();
        assert_eq!(JobConfig::parse(&frozen).unwrap(), c, "{frozen}");
        let bare = JobConfig::parse("name: x\n").unwrap();
        let frozen = serde_yaml::to_string(&bare).unwrap();
        assert!(!frozen.contains("model"), "{frozen}");
        assert_eq!(JobConfig::parse(&frozen).unwrap(), bare);
        // Checked at the parse, in every build: a login node's `sbatch` refuses it too.
        let e = refused("name: x\nmodel: {kind: rnn}\n");
        assert!(e.starts_with("model.kind: unknown kind \"rnn\""), "{e}");
        let e = refused("name: x\nmodle: {kind: mlp}\n");
        assert!(e.starts_with("modle: unknown field `modle`"), "{e}");
        assert!(e.contains("slurm") && e.contains("model"), "{e}");
        // JOB_KEYS names the job's fields, each once.
        let c = JobConfig::parse("name: x\ndistributed: {world_size: 2}\n").unwrap();
        let v = serde_yaml::to_value(&c).unwrap();
        let keys: Vec<&str> = v
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(|k| k.as_str())
            .collect();
        assert_eq!(keys, JOB_KEYS);
    }

    #[test]
    fn a_plain_scalar_is_text_where_the_job_takes_text() {
        let c =
            JobConfig::parse("name: 7\ncommand: [python, t.py, 3]\nslurm: {gpus: 1}\n").unwrap();
        assert_eq!(c.name, "7");
        assert_eq!(c.command.unwrap()[2], "3");
        assert_eq!(c.slurm.gpus.as_deref(), Some("1"));
    }

    #[test]
    fn retention_keys_read_into_storages_policy() {
        let c = JobConfig::parse("name: x\ncheckpoint: {keep_last: null, milestones: [7]}\n");
        let c = c.unwrap();
        assert_eq!(
            c.checkpoint.retention.keep_last, None,
            "null keeps everything"
        );
        assert_eq!(c.checkpoint.retention.milestones, [7]);
        let c = JobConfig::parse("name: x\ncheckpoint: {every_steps: 5}\n").unwrap();
        assert_eq!(c.checkpoint.retention, RetentionPolicy::kept_by_default());
        let frozen = serde_yaml::to_string(&c).unwrap();
        assert_eq!(JobConfig::parse(&frozen).unwrap(), c, "{frozen}");
        let cases = [
            (
                "{keep_lst: 3}",
                "checkpoint.keep_lst: unknown field `keep_lst`, expected one of `keep_last`",
            ),
            ("{keep_lst: 3}", "or one of the section's own: every_steps"),
            (
                "{keep_best: {monitor: l, mode: up}}",
                "checkpoint.keep_best.mode: unknown variant `up`, expected `min` or `max`",
            ),
            (
                "{periodic: {every: 0}}",
                "checkpoint: periodic.every must be at least 1",
            ),
            (
                "{milestones: x}",
                "checkpoint.milestones: invalid type: string \"x\", expected a sequence",
            ),
            (
                "{every_steps: x}",
                "checkpoint.every_steps: invalid type: string \"x\"",
            ),
        ];
        for (section, want) in cases {
            let e = refused(&format!("name: x\ncheckpoint: {section}\n"));
            assert!(e.contains(want), "{section}: got {e:?}, want {want:?}");
        }
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
        let e = refused("name: x\nslurm:\n  ntasks: 2\ndistributed:\n  world_size: 3\n");
        assert!(
            e.contains("distributed.world_size") && e.contains("2 tasks"),
            "{e}"
        );
        let e = refused("name: x\ndistributed:\n  world_size: 0\n");
        assert!(e.contains("distributed.world_size"), "{e}");
        let e = refused("name: x\ndistributed:\n  launcher: mpi\n");
        assert!(e.contains("distributed.launcher"), "{e}");
        let e = refused("name: x\nslurm:\n  ntasks_per_node: 0\n");
        assert!(e.contains("slurm.ntasks_per_node"), "{e}");
        let e = refused("name: x\nslurm:\n  nodes: 1\n  ntasks: 3\n  ntasks_per_node: 2\n");
        assert!(e.contains("slurm.ntasks"), "{e}");
        let e = refused("name: x\nslurm:\n  gpus_per_task: 'a b'\n");
        assert!(e.contains("slurm.gpus_per_task"), "{e}");
    }
}
