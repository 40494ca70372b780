//! Command-line interface: clap definitions, and for each command a thin call into the layers.
//!
//! No logic lives here beyond turning arguments into calls and results into output and an exit
//! code ([`crate::exit_code`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::exit_code;
use crate::slurm::JobEnv;
use crate::status;
use crate::storage::retention::{Best, Periodic, RetentionPolicy};
use crate::storage::run_dir::{holder, verify_all, RunDir};
use crate::storage::verify::verify_checkpoint;
use crate::storage::{CommitMeta, Snapshot, StorageError, Store};
use crate::supervision::workload::{is_builtin, Workload};
#[cfg(feature = "torch")]
use crate::supervision::workload::{Failure, FailureKind, InProcess, InProcessEnd};

#[derive(Debug, Parser)]
#[command(
    name = "hpc-ckpt",
    version,
    about = "Preemption-proof deep-learning training on Slurm: complete, crash-safe checkpoints",
    long_about = "Preemption-proof deep-learning training on Slurm.\n\n\
        Every checkpoint is committed with write-to-temp + fsync + rename and a manifest of \
        checksums, so whatever instant a job is killed, `last_checkpoint` names a complete \
        checkpoint that verifies.\n\n\
        Logs go to stderr; set HPC_CKPT_LOG (e.g. `debug`, `hpc_ckpt=trace`) to change the level.",
    after_help = "Exit codes: 0 done, 1 error, 2 usage, 3 corrupt checkpoint found (train: no \
        checkpoint restores), 4 run dir locked by another writer, 5 not enough disk space, 6 \
        invalid input, 7 invalid job config (train: a resume refused for a changed config); \
        wrap/train: 10 requeued, 11 work left but no requeue possible here (run again), 12 \
        stopped by policy (a user's cancel, max_restarts, a failed save under on_save_error: \
        stop), 13 crash loop. Exits 3, 7 and 12 are never requeued. See the README."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Commit the files of SRC_DIR as checkpoint STEP of a run dir, with the full protocol.
    ///
    /// Copies every regular file of SRC_DIR into a fresh temp dir under RUN_DIR/checkpoints,
    /// checksumming as it writes, fsyncs each file, writes MANIFEST.json last, renames the dir to
    /// step-NNNNNNNNNNNN and points RUN_DIR/last_checkpoint at it atomically; then applies the
    /// retention flags. This is the primitive of the `wrap` child protocol, and imports
    /// checkpoints made by other tools. SRC_DIR is left untouched.
    Commit(CommitArgs),
    /// Verify one checkpoint directory, or every checkpoint of a run dir.
    ///
    /// Checks the manifest, each file's size and xxh3-128 checksum, that no file is missing,
    /// extra or a symlink, and every safetensors header. Prints one line per fault naming the
    /// file and the reason; exits 3 if anything fails.
    Verify(VerifyArgs),
    /// Show a run: resume point, checkpoints, disk use, temp dirs, recent events, warnings.
    ///
    /// Read-only (takes no lock). Verifies the checkpoint a resume would use; --verify checks all.
    Status(StatusArgs),
    /// Run a program under the supervisor: signals, grace period, commits, requeue.
    ///
    /// The program (after `--`) gets HPC_CKPT_RUN_DIR, HPC_CKPT_RESUME_FROM (the checkpoint to
    /// resume from; unset on a fresh start), HPC_CKPT_STAGING (an empty dir to write a checkpoint
    /// into), HPC_CKPT_COMMIT_REQUEST (write {"step": N, ...} there to have the staged files
    /// committed) and HPC_CKPT_SIGNAL (the signal it gets when it must checkpoint and exit). On
    /// the warning signal (USR1 by default) the program is asked to checkpoint; what it staged is
    /// committed; the job is requeued when work is left. See the README's "Child protocol".
    Wrap(WrapCliArgs),
    /// Train with the built-in tch trainer, in this process, under the supervisor.
    ///
    /// The same as `wrap --config FILE -- train`: models mlp / cnn / gpt, optimizers and
    /// schedulers with complete state, a checkpoint every `checkpoint.every_steps`, and on the
    /// warning signal a checkpoint at the next step boundary, a requeue and an exit. Resuming is
    /// exact: an interrupted run ends byte-identical to an uninterrupted one (CPU).
    #[cfg(feature = "torch")]
    Train(TrainArgs),
    /// Internal: start one rank of a multi-rank `wrap` job (run by srun or a torchrun-style
    /// launcher as `hpc-ckpt rank -- CMD`): sets HPC_CKPT_RANK, HPC_CKPT_STAGING and
    /// HPC_CKPT_COMMIT_REQUEST from SLURM_PROCID (or RANK), then execs CMD.
    #[command(hide = true)]
    Rank(RankArgs),
    /// Internal: one rank of the built-in trainer in a multi-rank job. `wrap -- train` (and
    /// `train`) start it N times when the job has N > 1 ranks; it reads the child protocol's
    /// variables (HPC_CKPT_RANK, HPC_CKPT_WORLD_SIZE, HPC_CKPT_STAGING, …) and joins its peers
    /// at MASTER_ADDR:MASTER_PORT.
    #[cfg(feature = "torch")]
    #[command(hide = true, name = "train-rank")]
    TrainRank(TrainRankArgs),
    /// Write the self-resubmitting sbatch script for a job config.
    ///
    /// Renders templates/auto_resume.sbatch from the config's `slurm:` section: the #SBATCH
    /// allocation, --requeue, --open-mode=append, --signal=B:<signals.warn>@<slurm.signal_lead>,
    /// the setup lines, and `exec hpc-ckpt wrap --config FILE`. Values are validated and quoted;
    /// the run dir is created (Slurm does not create the output file's directory). Then run
    /// `sbatch FILE`.
    Sbatch(SbatchArgs),
}

#[cfg(feature = "torch")]
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The job config (model, data, optimizer, scheduler, checkpoint policy, …).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The run directory (overrides the config's `run_dir`).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// `auto`: the newest checkpoint of the run dir that verifies, else a fresh start; `never`:
    /// a fresh start (refused when the run dir has checkpoints); or a checkpoint directory.
    #[arg(long, default_value = "auto", value_name = "auto|never|PATH")]
    pub resume: String,
}

#[derive(Debug, Args)]
pub struct SbatchArgs {
    /// The job config.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Where to write the script (default: stdout).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The hpc-ckpt the job runs (default: this binary's absolute path).
    #[arg(long, value_name = "PATH")]
    pub hpc_ckpt: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WrapCliArgs {
    /// The job config (run dir, checkpoint retention, requeue limits, signals).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The run directory (overrides the config's `run_dir`).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Ranks of the job (overrides `distributed.world_size`): outside Slurm the supervisor
    /// starts N copies of the program itself, inside a Slurm job one `srun` step of N tasks.
    /// Each rank gets HPC_CKPT_RANK, HPC_CKPT_WORLD_SIZE and its own staging dir and request.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub ranks: Option<u32>,
    /// The program and its arguments (default: the config's `command`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[cfg(feature = "torch")]
#[derive(Debug, Args)]
pub struct TrainRankArgs {
    /// The job config (default: the one `wrap` uses without --config, named after the run dir).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RankArgs {
    /// The rank's program and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The run directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub run_dir: PathBuf,
    /// Global step: the state after this many optimizer steps.
    #[arg(long)]
    pub step: u64,
    /// Epoch, recorded in the manifest.
    #[arg(long)]
    pub epoch: Option<u64>,
    /// A metric to record, as NAME=VALUE (repeatable); used by --keep-best.
    #[arg(long = "metric", value_name = "NAME=VALUE", value_parser = parse_metric)]
    pub metrics: Vec<(String, f64)>,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Print the commit report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Directory whose regular files become the checkpoint.
    #[arg(value_name = "SRC_DIR")]
    pub src_dir: PathBuf,
}

/// Retention flags: storage's one policy type, each key a flag (`Best`/`Periodic` parse their
/// flag spellings themselves). Without --keep-last nothing is ever deleted.
#[derive(Debug, Args, Default)]
pub struct RetentionArgs {
    /// Keep the newest N checkpoints (and those kept by the other rules); delete the rest.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Also keep the best checkpoint by a metric, e.g. `val_loss:min` or `acc:max`.
    #[arg(long, value_name = "METRIC:min|max")]
    pub keep_best: Option<Best>,
    /// Also keep checkpoints whose step is a multiple of N; `N:K` keeps only the newest K of them.
    #[arg(long, value_name = "N[:K]")]
    pub keep_every: Option<Periodic>,
    /// Keep the checkpoint of this step forever (repeatable).
    #[arg(long = "milestone", value_name = "STEP")]
    pub milestones: Vec<u64>,
}

impl RetentionArgs {
    pub fn policy(&self) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: self.keep_last,
            keep_best: self.keep_best.clone(),
            periodic: self.keep_every.clone(),
            milestones: self.milestones.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A checkpoint directory (step-NNNNNNNNNNNN) or a run dir.
    pub path: PathBuf,
    /// Print results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The run directory.
    #[arg(default_value = ".")]
    pub run_dir: PathBuf,
    /// Print the report as JSON (schema hpc-ckpt-status/1, see the README).
    #[arg(long)]
    pub json: bool,
    /// Verify every checkpoint (checksums of every file), not only the resume point.
    #[arg(long)]
    pub verify: bool,
    /// Also draw the loss and eval metric against the step, one colour per allocation, with
    /// each interruption and the redone steps marked, into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

fn parse_metric(s: &str) -> std::result::Result<(String, f64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    if k.is_empty() {
        return Err("metric name is empty".into());
    }
    let v: f64 = v
        .parse()
        .map_err(|_| format!("metric {k}: {v:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("metric {k}: {v} is not finite"));
    }
    Ok((k.to_string(), v))
}

/// Run a parsed command; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Commit(a) => commit(a),
        Command::Verify(a) => verify(a),
        Command::Status(a) => status_cmd(a),
        Command::Wrap(a) => wrap(a),
        #[cfg(feature = "torch")]
        Command::Train(a) => train(a),
        Command::Sbatch(a) => sbatch(a),
        Command::Rank(a) => Err(crate::supervision::ranks::exec_rank(&a.command)),
        #[cfg(feature = "torch")]
        Command::TrainRank(a) => train_rank(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            classify(&e)
        }
    }
}

/// Map an error to its documented exit code.
pub fn classify(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.downcast_ref::<crate::config::ConfigError>().is_some() {
            return exit_code::CONFIG;
        }
        if let Some(s) = cause.downcast_ref::<StorageError>() {
            return match s {
                StorageError::Locked { .. } => exit_code::LOCKED,
                _ if s.is_out_of_space() => exit_code::NO_SPACE,
                StorageError::Invalid(_) => exit_code::BAD_INPUT,
                StorageError::Corrupt { .. } | StorageError::NothingValid { .. } => {
                    exit_code::CORRUPT
                }
                _ => exit_code::FAILURE,
            };
        }
    }
    exit_code::FAILURE
}

fn commit(a: CommitArgs) -> Result<i32> {
    let job = JobEnv::from_env();
    let me = holder(job.as_ref().map(|j| j.job_id.clone()));
    let snapshot = Snapshot::from_dir(&a.src_dir)
        .with_context(|| format!("cannot commit {}", a.src_dir.display()))?;
    let mut store = Store::open(&a.run_dir, &me, a.retention.policy())
        .with_context(|| format!("cannot open run dir {}", a.run_dir.display()))?;
    let meta = CommitMeta {
        step: a.step,
        epoch: a.epoch,
        metrics: a.metrics.iter().cloned().collect::<BTreeMap<_, _>>(),
        job: job.map(|j| j.job_info()),
        ..Default::default()
    };
    let report = store
        .commit(&snapshot, &meta)
        .with_context(|| format!("checkpoint step {} was not committed", a.step))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"checkpoint": report.name, "step": report.step, "bytes": report.bytes,
                "seconds": report.seconds, "replaced": report.replaced, "deleted": report.deleted})
        );
    } else {
        println!(
            "committed {} ({}, {:.3} s){}",
            report.name,
            status::human_bytes(report.bytes),
            report.seconds,
            if report.deleted.is_empty() {
                String::new()
            } else {
                format!("; retention deleted {}", report.deleted.join(", "))
            }
        );
    }
    Ok(exit_code::SUCCESS)
}

fn verify(a: VerifyArgs) -> Result<i32> {
    let path = &a.path;
    anyhow::ensure!(path.is_dir(), "{} is not a directory", path.display());
    let results = if is_checkpoint_dir(path) {
        vec![(
            path.file_name().unwrap().to_string_lossy().into_owned(),
            verify_checkpoint(path),
        )]
    } else {
        let dir = RunDir::new(path);
        anyhow::ensure!(
            dir.checkpoints_dir().is_dir(),
            "{} is neither a checkpoint (step-NNNNNNNNNNNN with a MANIFEST.json) nor a run dir \
             (no checkpoints/ inside)",
            path.display()
        );
        verify_all(&dir)
    };
    let bad = results.iter().filter(|(_, r)| r.is_err()).count();
    if a.json {
        let items: Vec<_> = results
            .iter()
            .map(|(n, r)| match r {
                Ok(m) => serde_json::json!({"checkpoint": n, "ok": true, "step": m.step, "bytes": m.total_bytes()}),
                Err(f) => serde_json::json!({"checkpoint": n, "ok": false,
                    "faults": f.iter().map(|x| serde_json::json!({"file": x.file, "reason": x.reason})).collect::<Vec<_>>()}),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"ok": bad == 0, "checkpoints": items})
        );
    } else {
        for (n, r) in &results {
            match r {
                Ok(m) => println!(
                    "ok      {n} ({} files, {})",
                    m.files.len(),
                    status::human_bytes(m.total_bytes())
                ),
                Err(faults) => {
                    for f in faults {
                        println!("FAULT   {f}");
                    }
                }
            }
        }
        if results.is_empty() {
            println!("no checkpoints in {}", path.display());
        } else {
            println!("{} checked, {} failed", results.len(), bad);
        }
    }
    Ok(if bad == 0 {
        exit_code::SUCCESS
    } else {
        exit_code::CORRUPT
    })
}

fn is_checkpoint_dir(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .and_then(crate::storage::manifest::parse_checkpoint_name)
        .is_some()
}

fn status_cmd(a: StatusArgs) -> Result<i32> {
    let report = status::inspect(&a.run_dir, a.verify)
        .with_context(|| format!("cannot read run dir {}", a.run_dir.display()))?;
    if a.json {
        println!("{}", status::render_json(&report)?);
    } else {
        print!("{}", status::render_text(&report));
    }
    if let Some(out) = &a.plot {
        let p = crate::plot::plot(&a.run_dir, out)?;
        eprintln!(
            "plot: {} ({} allocation(s), {} interruption(s), {} points)",
            out.display(),
            p.allocations,
            p.interruptions,
            p.points
        );
    }
    Ok(if a.verify && report.has_faults() {
        exit_code::CORRUPT
    } else {
        exit_code::SUCCESS
    })
}

fn wrap(a: WrapCliArgs) -> Result<i32> {
    let config = match &a.config {
        Some(p) => crate::config::JobConfig::load(p)?,
        None => {
            let Some(dir) = &a.run_dir else {
                anyhow::bail!("give --config FILE or --run-dir DIR");
            };
            config_named_after(dir)?
        }
    };
    let mut config = config;
    if let Some(n) = a.ranks {
        config.set_world_size(n).map_err(|e| {
            e.in_file(
                a.config
                    .as_ref()
                    .map_or("--ranks".into(), |p| p.display().to_string()),
            )
        })?;
    }
    let run_dir = a.run_dir.clone().unwrap_or_else(|| config.run_dir());
    let command = if a.command.is_empty() {
        config
            .command
            .clone()
            .unwrap_or_else(|| vec!["train".into()])
    } else {
        a.command.clone()
    };
    let workload = workload_of(command, &config, a.config.as_deref(), "auto")?;
    crate::supervision::wrap::run(crate::supervision::wrap::WrapArgs {
        config,
        run_dir,
        workload,
    })
}

/// The job config of `wrap --run-dir DIR` without --config: every default, named after DIR.
fn config_named_after(dir: &Path) -> Result<crate::config::JobConfig> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "run".into());
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(crate::config::JobConfig::parse(&format!("name: {name}\n"))?)
}

/// The typed workload of a command line: `train` is the built-in trainer (its config checked
/// before anything runs), anything else a program.
fn workload_of(
    command: Vec<String>,
    cfg: &crate::config::JobConfig,
    file: Option<&Path>,
    resume: &str,
) -> Result<Workload> {
    if !is_builtin(&command) {
        return Ok(Workload::Program(command));
    }
    builtin_trainer(cfg, file, resume)
}

fn sbatch(a: SbatchArgs) -> Result<i32> {
    let cfg = crate::config::JobConfig::load(&a.config)?;
    if cfg.command.as_deref().is_some_and(is_builtin) {
        // What the trainer would refuse on the compute node after the queue wait (no model, a
        // data file that is not there, a batch the ranks cannot share), refused here. These
        // checks need no torch: a login node's build makes them too.
        trainer_config(&cfg, &a.config.display().to_string())?;
    }
    let workdir = std::env::current_dir().context("current directory")?;
    let exe = match &a.hpc_ckpt {
        Some(p) => p.clone(),
        None => crate::supervision::launcher::exe().context("locate this binary")?,
    };
    let script = crate::slurm::template::render(&cfg, &a.config, &exe, &workdir)
        .map_err(|e| e.in_file(a.config.display()))?;
    let run_dir = workdir.join(cfg.run_dir());
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("create run dir {}", run_dir.display()))?;
    match &a.output {
        None => print!("{script}"),
        Some(out) => {
            crate::storage::fsutil::replace_file_durable(out, script.as_bytes())
                .with_context(|| format!("write {}", out.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))?;
            eprintln!(
                "wrote {} (run dir {}); submit it with: sbatch {}",
                out.display(),
                run_dir.display(),
                out.display()
            );
        }
    }
    Ok(exit_code::SUCCESS)
}

/// The built-in trainer's view of the job `cfg` (read from `named`), with every check that needs
/// no torch: a model given, data that feeds it and whose files exist, a length, a global batch
/// the job's ranks can share. `sbatch` makes them on the login node, before the queue wait;
/// `wrap -- train` and `train` before anything runs.
fn trainer_config(
    cfg: &crate::config::JobConfig,
    named: &str,
) -> Result<crate::config::trainer::TrainConfig, crate::config::ConfigError> {
    let tc = crate::config::trainer::TrainConfig::from_job(cfg).map_err(|e| e.in_file(named))?;
    crate::config::trainer::world_fits(tc.batch_size, cfg.world_size())
        .map_err(|e| e.in_file(named))?;
    Ok(tc)
}

/// The built-in trainer for `wrap -- train` / `train`, its config checked before anything runs:
/// in this process for one rank; for N ranks, N `hpc-ckpt train-rank` programs (each a child
/// of the protocol, started as the job's launcher says).
#[cfg(feature = "torch")]
fn builtin_trainer(
    cfg: &crate::config::JobConfig,
    file: Option<&Path>,
    resume: &str,
) -> Result<Workload> {
    let named = file
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "job config".into());
    let tc = trainer_config(cfg, &named)?;
    // Before anything starts CUDA (and while this process has one thread): cuBLAS reads it then.
    crate::train::trainer::set_cuda_determinism_env(&tc);
    if tc.device == crate::train::config::DeviceChoice::Cuda {
        crate::train::trainer::resolve_device(tc.device)
            .map_err(|e| crate::config::ConfigError::at("device", e.to_string()).in_file(&named))?;
    }
    let world = cfg.world_size();
    if world > 1 {
        if resume != "auto" {
            return Err(crate::config::ConfigError::whole(format!(
                "--resume {resume}: a job of {world} ranks resumes from the run dir's newest \
                 checkpoint that restores (--resume auto); to start over, use a new run dir"
            ))
            .in_file(&named)
            .into());
        }
        let exe =
            crate::supervision::launcher::exe().context("locate this binary for the ranks")?;
        let mut command = vec![exe.display().to_string(), "train-rank".into()];
        if let Some(f) = file {
            let f = std::fs::canonicalize(f).with_context(|| format!("{}", f.display()))?;
            command.extend(["--config".into(), f.display().to_string()]);
        }
        return Ok(Workload::TrainerRanks(command));
    }
    let resume = match resume {
        "auto" => crate::train::trainer::Resume::Auto,
        "never" => crate::train::trainer::Resume::Never,
        path => crate::train::trainer::Resume::From(PathBuf::from(path)),
    };
    Ok(Workload::InProcess(Box::new(Builtin {
        cfg: cfg.clone(),
        resume,
    })))
}

#[cfg(not(feature = "torch"))]
fn builtin_trainer(_: &crate::config::JobConfig, _: Option<&Path>, _: &str) -> Result<Workload> {
    anyhow::bail!(
        "`wrap -- train` runs the built-in trainer, which this build does not have (built \
         without the `torch` feature); wrap a program instead (e.g. `-- python train.py`)"
    )
}

/// Glue: the torch trainer as the supervisor's in-process loop.
#[cfg(feature = "torch")]
struct Builtin {
    cfg: crate::config::JobConfig,
    resume: crate::train::trainer::Resume,
}

#[cfg(feature = "torch")]
impl InProcess for Builtin {
    fn run(&mut self, store: &mut Store, stop: &dyn Fn() -> bool) -> Result<InProcessEnd, Failure> {
        // tch turns libtorch errors (CUDA out of memory, …) into panics: a crash, not an abort.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::train::trainer::run(&self.cfg, store, &self.resume, stop)
        }))
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Failure::new(FailureKind::Crash, format!("the trainer panicked: {msg}"))
        })?
        .map_err(|e| failure_of(e, &self.cfg))?;
        Ok(if out.completed {
            InProcessEnd::Completed
        } else {
            InProcessEnd::Stopped
        })
    }
}

/// The requeue policy's view of a trainer error. A failed save is a reason to stop only under
/// `on_save_error: stop`; otherwise (the final save of a stop or of the end) it is retried.
#[cfg(feature = "torch")]
fn failure_of(e: crate::train::trainer::TrainError, cfg: &crate::config::JobConfig) -> Failure {
    use crate::train::trainer::TrainError as E;
    let stop_on_save_error = cfg.checkpoint.on_save_error == crate::config::OnSaveError::Stop;
    let kind = match &e {
        // The config (or thread count, data, --resume) does not fit the run: the user's to fix.
        E::Config(_) | E::ConfigChanged { .. } | E::Resume { .. } | E::NoCuda(_) => {
            FailureKind::ConfigRefused
        }
        E::Save { .. } | E::Commit { .. } if stop_on_save_error => FailureKind::SaveFailed,
        E::Load(StorageError::NothingValid { .. } | StorageError::Corrupt { .. }) => {
            FailureKind::NothingRestores
        }
        E::NothingRestores { .. } => FailureKind::NothingRestores,
        _ => FailureKind::Crash,
    };
    Failure::new(kind, e.to_string())
}

/// One rank of the built-in trainer (see [`Command::TrainRank`]): exit 0 once its last state is
/// committed (training complete, or stopped by the signal); otherwise the exit code of the
/// failure's kind ([`FailureKind::exit_code`]: a refused config is 7, as in one process), which
/// the supervisor reads back for its decision.
#[cfg(feature = "torch")]
fn train_rank(a: TrainRankArgs) -> Result<i32> {
    let config = match &a.config {
        Some(p) => crate::config::JobConfig::load(p)?,
        None => {
            let dir = std::env::var_os("HPC_CKPT_RUN_DIR")
                .context("HPC_CKPT_RUN_DIR is not set: train-rank runs under `hpc-ckpt wrap`")?;
            config_named_after(Path::new(&dir))?
        }
    };
    if let Ok(tc) = crate::train::config::TrainConfig::from_job(&config) {
        // Before anything starts CUDA (run_rank refuses an invalid config itself).
        crate::train::trainer::set_cuda_determinism_env(&tc);
    }
    match crate::train::trainer::run_rank(&config) {
        Ok(out) => {
            tracing::debug!(completed = out.completed, step = out.last_step, "rank done");
            Ok(exit_code::SUCCESS)
        }
        Err(e) => {
            let f = failure_of(e, &config);
            let rank = std::env::var(crate::supervision::ranks::ENV_RANK).unwrap_or_default();
            eprintln!("error: rank {rank}: {f}");
            Ok(f.kind.exit_code())
        }
    }
}

#[cfg(feature = "torch")]
fn train(a: TrainArgs) -> Result<i32> {
    let config = crate::config::JobConfig::load(&a.config)?;
    let run_dir = a.run_dir.clone().unwrap_or_else(|| config.run_dir());
    let workload = workload_of(vec!["train".into()], &config, Some(&a.config), &a.resume)?;
    crate::supervision::wrap::run(crate::supervision::wrap::WrapArgs {
        config,
        run_dir,
        workload,
    })
}
