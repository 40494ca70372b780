//! Benchmark: what a save costs training — foreground (`checkpoint.async: false`) against
//! two-phase (`async: true`) — and a child's checkpoint committed by copy against adoption.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench_saves -- --dir DIR \
//!     [--rounds 3] [--only train,ranks,child] [--json FILE] [--bin target/release/hpc-ckpt]
//!     [--layers 7 --d-model 768 --heads 12 --context 32 --batch 2 --threads 1]
//!     [--steps 40 --warm 4 --every 10] [--mtbf-hours 24] [--child-mib 1024]
//! ```
//!
//! `train`: the built-in trainer (`hpc_ckpt::train::trainer::run`, in this process, one run at a
//! time) trains a char-level gpt with AdamW (defaults: 49.7M parameters, 597 MB of model +
//! optimizer state) in these modes (`--modes`, default all four), interleaved, the order rotated
//! every round:
//! - `none`: no save before the end (the reference);
//! - `sync`: a save every `--every` steps, training waits for each commit;
//! - `async`: the same saves, two-phase;
//! - `control`: no save, but at the same steps (`--every`) the bench starts
//!   `nice -n 10 dd if=/dev/zero of=DIR/control.bin bs=4M conv=fsync` writing `--control-mb` MB
//!   (the checkpoint's size) in the background, the previous file deleted first, at most one in
//!   flight (a new one waits for the previous, as a save waits for the previous persist): what
//!   the kernel's page-cache copy and writeback of that many bytes cost training on this
//!   machine, with none of our code (copy, hashing, commit) involved. Its "commit" column is
//!   `dd`'s time.
//!
//! Per run: steps/s over steps `warm+1..=steps` from `metrics.jsonl` (wall clock between step ends:
//! everything the loop does between steps, saves included; the final save comes after the last
//! step and is not counted); from the journal, each periodic save's `stall_seconds` (training time
//! the save took: the commit for `sync`; wait + copy + reference loss for `async`) and `seconds`
//! (the commit, in the background for `async`). Medians over rounds. Derived: the overhead at
//! `--every` (steps/s of `none` ÷ the mode's − 1), the cost of one save (extra wall time over
//! `none` ÷ saves), and the overhead at the interval Daly's formula recommends for that stall and
//! an MTBF of `--mtbf-hours` (cost ÷ interval).
//!
//! `ranks`: the same job across 2 data-parallel ranks (`hpc-ckpt wrap --ranks 2 -- train`, the
//! release binary beside this example unless `--bin`; each rank computes half of every batch,
//! one Gloo all-reduce of the gradients a step) in the same three modes, interleaved. The ranks
//! journal no stall of their own, so it is read off `metrics.jsonl`: the gap between the line of
//! step S and of S+1 after each periodic save at S, less the median gap of the steps after no
//! save (what the save cost the training thread at that boundary and in the step that overlaps
//! its copy); overhead and steps/s as for `train`.
//!
//! `child`: a 1 GiB staged dir (`--child-mib`, 4 files) committed with `Store::commit` from
//! `Snapshot::from_dir` (`copy`, what `wrap` did before adoption) and `Snapshot::adopt_dir`
//! (`adopt`), with the staged files durable (`-synced`: the child fsynced, or wrote long before)
//! and just written (`-dirty`: their pages still to be written back, as after a `torch.save`),
//! and the reference `write`: writing the same bytes into a new file and fsyncing it (the disk's
//! own cost of one copy). Each method gets fresh staged files (written untimed, then `sync`
//! for `-synced`), timed from the commit's call to its return, outputs deleted and `sync`ed
//! before the next.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use hpc_ckpt::config::JobConfig;
use hpc_ckpt::storage::journal::read_all;
use hpc_ckpt::storage::run_dir::holder;
use hpc_ckpt::storage::{CommitMeta, RetentionPolicy, Snapshot, Store};
use hpc_ckpt::supervision::interval::daly;
use hpc_ckpt::train::trainer::{run, Resume};

#[derive(Parser, Debug)]
#[command(about = "Benchmark save stalls (sync vs two-phase) and child commits (copy vs adoption)")]
struct Args {
    /// Scratch directory on the file system to measure (outputs deleted between runs).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Comma list: train, ranks, child.
    #[arg(long, value_delimiter = ',', default_value = "train,ranks,child")]
    only: Vec<String>,
    /// The `hpc-ckpt` binary for `ranks` (default: `../hpc-ckpt` from this example's dir).
    #[arg(long)]
    bin: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    layers: u64,
    #[arg(long, default_value_t = 768)]
    d_model: u64,
    #[arg(long, default_value_t = 12)]
    heads: u64,
    #[arg(long, default_value_t = 32)]
    context: u64,
    #[arg(long, default_value_t = 2)]
    batch: u64,
    #[arg(long, default_value_t = 1)]
    threads: u32,
    #[arg(long, default_value_t = 40)]
    steps: u64,
    /// Steps before the timed span.
    #[arg(long, default_value_t = 4)]
    warm: u64,
    /// Save every N steps (sync and async).
    #[arg(long, default_value_t = 10)]
    every: u64,
    /// MTBF for the recommended interval (Daly).
    #[arg(long, default_value_t = 24.0)]
    mtbf_hours: f64,
    /// Size of the child's staged checkpoint, MiB (4 files).
    #[arg(long, default_value_t = 1024)]
    child_mib: usize,
    /// Save every raw sample here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Comma list of the train modes to run: none, sync, async, control (without `none`, the
    /// reference, only each mode's steps/s is printed: for profiling one mode).
    #[arg(long, value_delimiter = ',', default_value = "none,sync,async,control")]
    modes: Vec<String>,
    /// MB the `control` mode's `dd` writes at each save step (597: the default model's state).
    #[arg(long, default_value_t = 597)]
    control_mb: u64,
}

const MODES: [&str; 4] = ["none", "sync", "async", "control"];
const CHILD_METHODS: [&str; 5] = [
    "copy-synced",
    "adopt-synced",
    "copy-dirty",
    "adopt-dirty",
    "write",
];

fn main() -> Result<()> {
    let args = Args::parse();
    if args.rounds == 0 || args.every == 0 || args.warm >= args.steps {
        bail!("--rounds and --every must be >= 1, --warm below --steps");
    }
    fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = fs::canonicalize(&args.dir)?;
    let mut raw = json!({"args": format!("{args:?}")});
    if args.only.iter().any(|o| o == "train") {
        raw["train"] = bench_train(&args, &dir)?;
    }
    if args.only.iter().any(|o| o == "ranks") {
        raw["ranks"] = bench_ranks(&args, &dir)?;
    }
    if args.only.iter().any(|o| o == "child") {
        raw["child"] = bench_child(&args, &dir)?;
    }
    if let Some(p) = &args.json {
        fs::write(p, serde_json::to_vec_pretty(&raw)?)?;
        eprintln!("raw samples: {}", p.display());
    }
    Ok(())
}

// ---- train ----------------------------------------------------------------------------------

struct TrainRun {
    steps_per_s: f64,
    /// Wall seconds of the timed span.
    span: f64,
    stalls: Vec<f64>,
    commits: Vec<f64>,
    saves: usize,
    /// Bytes of one checkpoint.
    bytes: u64,
    /// CPU seconds per step of the training thread, and of the whole process (every thread:
    /// training, copy, persister, checksum), between the step boundaries `warm` and `steps - 1`
    /// (both saves inside): what the run cost in CPU, which other processes' load on the machine
    /// inflates much less than the wall clock.
    cpu_thread: f64,
    cpu_process: f64,
}

/// CPU seconds of `clock` (`CLOCK_THREAD_CPUTIME_ID` or `CLOCK_PROCESS_CPUTIME_ID`).
fn cpu_seconds(clock: nix::libc::clockid_t) -> f64 {
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { nix::libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn job(args: &Args, mode: &str) -> Result<JobConfig> {
    JobConfig::parse(&job_yaml(args, mode)).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The job of `mode` (none, sync, async) as YAML.
fn job_yaml(args: &Args, mode: &str) -> String {
    let checkpoint = match mode {
        "none" | "control" => format!("{{every_steps: {}, keep_last: 1}}", args.steps + 1),
        "sync" => format!(
            "{{every_steps: {}, keep_last: 1, async: false}}",
            args.every
        ),
        _ => format!("{{every_steps: {}, keep_last: 1, async: true}}", args.every),
    };
    format!(
        "name: bench-saves\nseed: 1\nthreads: {}\n\
         model: {{kind: gpt, layers: {}, heads: {}, d_model: {}, context: {}}}\n\
         data: {{kind: text}}\nbatch_size: {}\nmax_steps: {}\n\
         optimizer: {{kind: adamw, lr: 0.0003}}\ncheckpoint: {checkpoint}\n",
        args.threads, args.layers, args.heads, args.d_model, args.context, args.batch, args.steps
    )
}

fn train_once(args: &Args, dir: &Path, mode: &str) -> Result<TrainRun> {
    let cfg = job(args, mode)?;
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    nix::unistd::sync();
    let mut store = Store::open(dir, &holder(None), cfg.checkpoint.retention.clone())?;
    let control = (mode == "control").then(|| Control::new(args, dir));
    // (thread, process) CPU seconds at each step boundary (the i-th call: global step i).
    let cpu = std::cell::RefCell::new(Vec::new());
    let stop = || {
        cpu.borrow_mut().push((
            cpu_seconds(nix::libc::CLOCK_THREAD_CPUTIME_ID),
            cpu_seconds(nix::libc::CLOCK_PROCESS_CPUTIME_ID),
        ));
        if let Some(c) = &control {
            c.at_boundary();
        }
        false
    };
    run(&cfg, &mut store, &Resume::Never, &stop).map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(store);
    let control_writes = match control {
        Some(c) => c.finish()?,
        None => Vec::new(),
    };
    let ts = step_times(dir)?;
    let span = ts[&args.steps] - ts[&args.warm];
    let periodic: Vec<Value> = read_all(dir)
        .0
        .into_iter()
        .filter(|e| e["event"] == "checkpoint_committed")
        .filter(|e| e["step"].as_u64().is_some_and(|s| s < args.steps))
        .collect();
    let bytes = read_all(dir)
        .0
        .iter()
        .rev()
        .find(|e| e["event"] == "checkpoint_committed")
        .and_then(|e| e["bytes"].as_u64())
        .unwrap_or(0);
    let saves_in_span = periodic
        .iter()
        .filter(|e| e["step"].as_u64().is_some_and(|s| s > args.warm))
        .count();
    let r = TrainRun {
        steps_per_s: (args.steps - args.warm) as f64 / span,
        span,
        stalls: periodic
            .iter()
            .filter_map(|e| e["stall_seconds"].as_f64())
            .collect(),
        commits: if mode == "control" {
            control_writes
        } else {
            periodic
                .iter()
                .filter_map(|e| e["seconds"].as_f64())
                .collect()
        },
        cpu_thread: cpu_per_step(&cpu.borrow(), args, |c| c.0),
        cpu_process: cpu_per_step(&cpu.borrow(), args, |c| c.1),
        saves: if mode == "control" {
            (args.warm + 1..args.steps)
                .filter(|s| s % args.every == 0)
                .count()
        } else {
            saves_in_span
        },
        bytes,
    };
    fs::remove_dir_all(dir)?;
    Ok(r)
}

/// CPU seconds per step between the boundaries `warm` and `steps - 1` (see [`TrainRun`]).
fn cpu_per_step(cpu: &[(f64, f64)], args: &Args, f: impl Fn(&(f64, f64)) -> f64) -> f64 {
    let (a, b) = (args.warm as usize, args.steps as usize - 1);
    match (cpu.get(a), cpu.get(b)) {
        (Some(x), Some(y)) if b > a => (f(y) - f(x)) / (b - a) as f64,
        _ => f64::NAN,
    }
}

/// The `control` mode's background writer (see the module doc): called at every step boundary
/// (the trainer's `stop` callback: the i-th call is at global step i), it starts a `dd` at the
/// save steps, one at a time, and records how long each took.
struct Control {
    file: PathBuf,
    mb: u64,
    every: u64,
    steps: u64,
    calls: std::cell::Cell<u64>,
    in_flight: std::cell::RefCell<Option<std::thread::JoinHandle<Result<f64>>>>,
    seconds: std::cell::RefCell<Vec<f64>>,
}

impl Control {
    fn new(args: &Args, run_dir: &Path) -> Control {
        Control {
            file: run_dir.with_extension("control.bin"),
            mb: args.control_mb,
            every: args.every,
            steps: args.steps,
            calls: 0.into(),
            in_flight: None.into(),
            seconds: Vec::new().into(),
        }
    }

    fn at_boundary(&self) {
        let step = self.calls.get();
        self.calls.set(step + 1);
        if step == 0 || !step.is_multiple_of(self.every) || step >= self.steps {
            return;
        }
        if let Err(e) = self.wait() {
            eprintln!("control write failed: {e:#}");
        }
        let _ = fs::remove_file(&self.file);
        let (file, count) = (self.file.clone(), self.mb * 1_000_000 / (4 << 20));
        *self.in_flight.borrow_mut() = Some(std::thread::spawn(move || {
            let started = Instant::now();
            let status = std::process::Command::new("nice")
                .args([
                    "-n",
                    "10",
                    "dd",
                    "if=/dev/zero",
                    "bs=4M",
                    "conv=fsync",
                    "status=none",
                ])
                .arg(format!("of={}", file.display()))
                .arg(format!("count={count}"))
                .status()
                .context("run dd")?;
            if !status.success() {
                bail!("dd: {status}");
            }
            Ok(started.elapsed().as_secs_f64())
        }));
    }

    /// Wait for the write in flight, if any, and record its time.
    fn wait(&self) -> Result<()> {
        if let Some(h) = self.in_flight.borrow_mut().take() {
            let s = h
                .join()
                .map_err(|_| anyhow::anyhow!("dd thread panicked"))??;
            self.seconds.borrow_mut().push(s);
        }
        Ok(())
    }

    /// The time of each write (the last one waited for), its file removed.
    fn finish(self) -> Result<Vec<f64>> {
        self.wait()?;
        let _ = fs::remove_file(&self.file);
        Ok(self.seconds.into_inner())
    }
}

fn bench_train(args: &Args, dir: &Path) -> Result<Value> {
    let mut runs: BTreeMap<&str, Vec<TrainRun>> = BTreeMap::new();
    let started = Instant::now();
    let modes: Vec<&str> = MODES
        .into_iter()
        .filter(|m| args.modes.iter().any(|a| a == m))
        .collect();
    for r in 0..args.rounds {
        let order: Vec<&str> = (0..modes.len())
            .map(|i| modes[(i + r) % modes.len()])
            .collect();
        eprintln!("train round {}/{}: {order:?}", r + 1, args.rounds);
        for mode in order {
            let t = train_once(args, &dir.join(format!("train-{mode}")), mode)?;
            eprintln!(
                "    {mode:<6} {:.4} steps/s  stalls {:?}  commits {:?}",
                t.steps_per_s,
                rounded(&t.stalls),
                rounded(&t.commits)
            );
            runs.entry(mode).or_default().push(t);
        }
    }
    report(args, &runs, started.elapsed().as_secs_f64())
}

/// The table of the train modes (medians), the targets, and the raw samples as JSON.
fn report(args: &Args, runs: &BTreeMap<&str, Vec<TrainRun>>, seconds: f64) -> Result<Value> {
    let med = Medians(runs);
    if !runs.contains_key("none") {
        for m in runs.keys() {
            println!(
                "{m}: {:.4} steps/s (no reference run: no overhead)",
                med.sps(m)
            );
        }
        return Ok(json!({}));
    }
    let bytes = runs
        .values()
        .flatten()
        .map(|t| t.bytes)
        .find(|&b| b > 0)
        .unwrap_or(args.control_mb * 1_000_000);
    println!(
        "\n### Saves of the built-in trainer: gpt {}x{} (context {}, batch {}, {} thread(s)), {:.0} MB \
         of model + AdamW state, a save every {} steps; medians of {} interleaved rounds ({seconds:.0} s)\n",
        args.layers,
        args.d_model,
        args.context,
        args.batch,
        args.threads,
        bytes as f64 / 1e6,
        args.every,
        args.rounds,
    );
    let (none_thread, none_process) = med.cpu("none");
    println!("| mode | steps/s | overhead at every {} steps | stall per save (s) | commit per save (s) | cost per save (s) | Daly interval (s) at MTBF {} h | overhead there | training thread CPU s/step | process CPU s/step |", args.every, args.mtbf_hours);
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| none (reference) | {:.4} | – | – | – | – | – | – | {none_thread:.3} | {none_process:.3} |",
        med.sps("none")
    );
    let mut out = json!({"step_seconds": 1.0 / med.sps("none"), "bytes": bytes});
    for m in ["sync", "async", "control"]
        .into_iter()
        .filter(|m| runs.contains_key(m))
    {
        out[m] = row(args, &med, m);
    }
    if runs.contains_key("async") {
        targets(args, &med);
    }
    out["raw"] = json!(runs
        .iter()
        .map(|(m, v)| (m.to_string(), v.iter().map(raw).collect::<Vec<_>>()))
        .collect::<BTreeMap<_, _>>());
    Ok(out)
}

/// Medians over the rounds of each mode's runs.
struct Medians<'a>(&'a BTreeMap<&'a str, Vec<TrainRun>>);

impl Medians<'_> {
    fn of(&self, m: &str, f: &dyn Fn(&TrainRun) -> Vec<f64>) -> f64 {
        match self.0.get(m) {
            Some(r) => median(&mut r.iter().flat_map(f).collect::<Vec<f64>>()),
            None => f64::NAN,
        }
    }

    fn sps(&self, m: &str) -> f64 {
        self.of(m, &|t| vec![t.steps_per_s])
    }

    /// CPU seconds per step: (training thread, process).
    fn cpu(&self, m: &str) -> (f64, f64) {
        (
            self.of(m, &|t| vec![t.cpu_thread]),
            self.of(m, &|t| vec![t.cpu_process]),
        )
    }
}

/// Print the table row of mode `m` against the reference; its figures as JSON.
fn row(args: &Args, med: &Medians, m: &str) -> Value {
    let (none, v) = (med.sps("none"), med.sps(m));
    let stall = med.of(m, &|t| t.stalls.clone());
    let commit = med.of(m, &|t| t.commits.clone());
    // Extra wall time per save over the reference, over the same number of steps.
    let cost = med.of(m, &|t| {
        vec![(t.span - (args.steps - args.warm) as f64 / none) / t.saves.max(1) as f64]
    });
    let overhead = (none / v - 1.0) * 100.0;
    let ((ct, cp), (nt, np)) = (med.cpu(m), med.cpu("none"));
    let cpu_cols = format!(
        "{ct:.3} ({:+.1} %) | {cp:.3} ({:+.1} %)",
        (ct / nt - 1.0) * 100.0,
        (cp / np - 1.0) * 100.0
    );
    if m == "control" {
        println!("| control (no save; `dd` of {} MB + fsync at nice 10 at the save steps) | {v:.4} | {overhead:+.1} % | – | {commit:.3} (dd) | {cost:.3} | – | – | {cpu_cols} |", args.control_mb);
    } else {
        let tau = daly(stall.max(1e-9), args.mtbf_hours * 3600.0);
        println!(
            "| {m} | {v:.4} | {overhead:+.1} % | {stall:.3} | {commit:.3} | {cost:.3} | {tau:.0} | {:.2} % | {cpu_cols} |",
            cost.max(0.0) / tau * 100.0
        );
    }
    json!({"steps_per_s": v, "overhead_percent": overhead, "stall": stall, "commit": commit,
        "cost": cost, "cpu_thread": ct, "cpu_process": cp})
}

/// Print the async save against the targets (stall ≤ 5 % of the sync commit; overhead ≤ stall
/// share + 3 points), and against the control's overhead when it ran.
fn targets(args: &Args, med: &Medians) {
    let none = med.sps("none");
    let stall = med.of("async", &|t| t.stalls.clone());
    let sync = med.of("sync", &|t| t.commits.clone());
    let share = stall / (args.every as f64 / none) * 100.0;
    println!(
        "\nasync stall / sync commit: {:.1} % (target ≤ 5 %)",
        stall / sync * 100.0
    );
    println!(
        "async overhead {:+.1} % against the target stall share {share:.1} % + 3 points = {:.1} %",
        (none / med.sps("async") - 1.0) * 100.0,
        share + 3.0
    );
    if med.0.contains_key("control") {
        println!(
            "async overhead beyond the control's (what our code adds to the kernel's writeback): {:+.1} points",
            (none / med.sps("async") - none / med.sps("control")) * 100.0
        );
    }
    println!("reference step {:.3} s", 1.0 / none);
}

fn raw(t: &TrainRun) -> Value {
    json!({"steps_per_s": t.steps_per_s, "stalls": t.stalls, "commits": t.commits,
        "cpu_thread": t.cpu_thread, "cpu_process": t.cpu_process})
}

// ---- ranks ---------------------------------------------------------------------------------

struct RankRun {
    steps_per_s: f64,
    /// Per periodic save in the timed span: the gap after it less the median gap after none.
    stalls: Vec<f64>,
}

/// The timestamps of `metrics.jsonl`'s lines, by step, in seconds from the first.
fn step_times(dir: &Path) -> Result<BTreeMap<u64, f64>> {
    let mut ts = BTreeMap::new();
    let mut first = None;
    for line in fs::read_to_string(dir.join("metrics.jsonl"))?.lines() {
        let v: Value = serde_json::from_str(line)?;
        let t = humantime::parse_rfc3339(v["ts"].as_str().unwrap_or_default())?;
        let t0 = *first.get_or_insert(t);
        ts.insert(
            v["step"].as_u64().unwrap_or(0),
            t.duration_since(t0)?.as_secs_f64(),
        );
    }
    Ok(ts)
}

/// One 2-rank run of `mode` through `wrap --ranks 2 -- train`.
fn ranks_once(args: &Args, bin: &Path, dir: &Path, mode: &str) -> Result<RankRun> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let cfg = dir.with_extension("yaml");
    fs::write(&cfg, job_yaml(args, mode))?;
    nix::unistd::sync();
    let o = std::process::Command::new(bin)
        .args(["wrap", "--ranks", "2", "--config"])
        .arg(&cfg)
        .arg("--run-dir")
        .arg(dir)
        .args(["--", "train"])
        .env_remove("SLURM_JOB_ID")
        .env("HPC_CKPT_LOG", "warn")
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !o.status.success() {
        bail!("2 ranks, {mode}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let ts = step_times(dir)?;
    let gap = |s: u64| ts[&s] - ts[&(s - 1)];
    let saved = |s: u64| mode != "none" && (s - 1).is_multiple_of(args.every);
    let mut quiet: Vec<f64> = (args.warm + 1..=args.steps)
        .filter(|&s| !saved(s))
        .map(gap)
        .collect();
    let quiet = median(&mut quiet);
    let stalls = (args.warm + 1..=args.steps)
        .filter(|&s| saved(s))
        .map(|s| gap(s) - quiet)
        .collect();
    let r = RankRun {
        steps_per_s: (args.steps - args.warm) as f64 / (ts[&args.steps] - ts[&args.warm]),
        stalls,
    };
    fs::remove_dir_all(dir)?;
    fs::remove_file(&cfg)?;
    Ok(r)
}

/// The `train` job across 2 ranks in the three modes, interleaved; one table row per mode.
fn bench_ranks(args: &Args, dir: &Path) -> Result<Value> {
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("no target dir above this example")?
            .join("hpc-ckpt"),
    };
    let mut runs: BTreeMap<&str, Vec<RankRun>> = BTreeMap::new();
    for r in 0..args.rounds {
        // The control mode is the one-process bench's only.
        const RANK_MODES: [&str; 3] = ["none", "sync", "async"];
        let order: Vec<&str> = (0..RANK_MODES.len())
            .map(|i| RANK_MODES[(i + r) % RANK_MODES.len()])
            .collect();
        eprintln!("2-rank round {}/{}: {order:?}", r + 1, args.rounds);
        for mode in order {
            let t = ranks_once(args, &bin, &dir.join(format!("ranks-{mode}")), mode)?;
            eprintln!(
                "    {mode:<6} {:.4} steps/s  stalls {:?}",
                t.steps_per_s,
                rounded(&t.stalls)
            );
            runs.entry(mode).or_default().push(t);
        }
    }
    let med = |m: &str, f: &dyn Fn(&RankRun) -> Vec<f64>| {
        let mut v: Vec<f64> = runs[m].iter().flat_map(f).collect();
        median(&mut v)
    };
    let none = med("none", &|t| vec![t.steps_per_s]);
    println!(
        "\n### 2 ranks (`wrap --ranks 2 -- train`), the same job; medians of {} rounds\n",
        args.rounds
    );
    println!(
        "| 2 ranks | steps/s | overhead at every {} steps | stall per save (s, from step gaps) |",
        args.every
    );
    println!("|---|---|---|---|");
    println!("| none (reference) | {none:.4} | – | – |");
    let mut out = json!({});
    for m in ["sync", "async"] {
        let (v, stall) = (
            med(m, &|t| vec![t.steps_per_s]),
            med(m, &|t| t.stalls.clone()),
        );
        println!(
            "| {m} | {v:.4} | {:+.1} % | {stall:.3} |",
            (none / v - 1.0) * 100.0
        );
        out[m] = json!({"steps_per_s": v, "stall": stall});
    }
    out["none"] = json!({"steps_per_s": none});
    out["raw"] = json!(runs
        .iter()
        .map(|(m, v)| (
            m.to_string(),
            v.iter()
                .map(|t| json!({"steps_per_s": t.steps_per_s, "stalls": t.stalls}))
                .collect::<Vec<_>>()
        ))
        .collect::<BTreeMap<_, _>>());
    Ok(out)
}

// ---- child ----------------------------------------------------------------------------------

const CHILD_FILES: usize = 4;

/// Write the staged files (a pattern that differs per round) into `dir`.
fn stage(dir: &Path, mib: usize, round: usize) -> Result<()> {
    fs::create_dir_all(dir)?;
    let per = mib / CHILD_FILES;
    let chunk: Vec<u8> = (0..1usize << 20)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(round) >> 7) as u8)
        .collect();
    for f in 0..CHILD_FILES {
        let mut out = File::create(dir.join(format!("shard-{f}.bin")))?;
        for _ in 0..per {
            out.write_all(&chunk)?;
        }
    }
    Ok(())
}

fn bench_child(args: &Args, dir: &Path) -> Result<Value> {
    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let started = Instant::now();
    let bytes = (args.child_mib / CHILD_FILES * CHILD_FILES) as u64 * (1 << 20);
    for r in 0..args.rounds {
        let k = CHILD_METHODS.len();
        let order: Vec<&str> = (0..k).map(|i| CHILD_METHODS[(i + r) % k]).collect();
        eprintln!("child round {}/{}: {order:?}", r + 1, args.rounds);
        for m in order {
            let run = dir.join("child-run");
            if run.exists() {
                fs::remove_dir_all(&run)?;
            }
            nix::unistd::sync();
            let staging = run.join("staging").join("a0001");
            stage(&staging, args.child_mib, r)?;
            if m.ends_with("-synced") || m == "write" {
                nix::unistd::sync();
            }
            let seconds = if m == "write" {
                let src = fs::read(staging.join("shard-0.bin"))?;
                let t = Instant::now();
                let mut out = File::create(run.join("written.bin"))?;
                for _ in 0..CHILD_FILES {
                    out.write_all(&src)?;
                }
                out.sync_all()?;
                t.elapsed().as_secs_f64()
            } else {
                let mut store = Store::open(&run, &holder(None), RetentionPolicy::default())?;
                let snap = if m.starts_with("adopt") {
                    Snapshot::adopt_dir(&staging)?
                } else {
                    Snapshot::from_dir(&staging)?
                };
                let meta = CommitMeta {
                    step: 1,
                    ..CommitMeta::default()
                };
                let t = Instant::now();
                store.commit(&snap, &meta)?;
                t.elapsed().as_secs_f64()
            };
            eprintln!("    {m:<13} {seconds:8.3} s");
            samples.entry(m).or_default().push(seconds);
        }
    }
    fs::remove_dir_all(dir.join("child-run"))?;
    nix::unistd::sync();
    println!(
        "\n### A child's {:.2} GiB checkpoint ({CHILD_FILES} files) committed by copy and by adoption; \
         medians of {} interleaved rounds ({:.0} s)\n",
        bytes as f64 / (1u64 << 30) as f64,
        args.rounds,
        started.elapsed().as_secs_f64()
    );
    println!("| method | seconds | GiB/s | ÷ copy |");
    println!("|---|---|---|---|");
    let mut out = json!({"bytes": bytes});
    let meds: BTreeMap<&str, f64> = samples.iter_mut().map(|(k, v)| (*k, median(v))).collect();
    for m in CHILD_METHODS {
        let s = meds[m];
        let copy = if m.ends_with("-dirty") {
            meds["copy-dirty"]
        } else {
            meds["copy-synced"]
        };
        println!(
            "| {m} | {s:.3} | {:.2} | {:.2} |",
            bytes as f64 / (1u64 << 30) as f64 / s,
            s / copy
        );
        out[m] = json!({"median": s, "samples": samples[m]});
    }
    Ok(out)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
}
