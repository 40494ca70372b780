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
//! optimizer state) in three modes, interleaved, the order rotated every round:
//! - `none`: no save before the end (the reference);
//! - `sync`: a save every `--every` steps, training waits for each commit;
//! - `async`: the same saves, two-phase.
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
}

const MODES: [&str; 3] = ["none", "sync", "async"];
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
}

fn job(args: &Args, mode: &str) -> Result<JobConfig> {
    JobConfig::parse(&job_yaml(args, mode)).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The job of `mode` (none, sync, async) as YAML.
fn job_yaml(args: &Args, mode: &str) -> String {
    let checkpoint = match mode {
        "none" => format!("{{every_steps: {}, keep_last: 1}}", args.steps + 1),
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
    let never = || false;
    run(&cfg, &mut store, &Resume::Never, &never).map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(store);
    let mut ts = BTreeMap::new();
    for line in fs::read_to_string(dir.join("metrics.jsonl"))?.lines() {
        let v: Value = serde_json::from_str(line)?;
        let t = humantime::parse_rfc3339(v["ts"].as_str().unwrap_or_default())?;
        ts.insert(v["step"].as_u64().unwrap_or(0), t);
    }
    let span = ts[&args.steps]
        .duration_since(ts[&args.warm])?
        .as_secs_f64();
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
        commits: periodic
            .iter()
            .filter_map(|e| e["seconds"].as_f64())
            .collect(),
        saves: saves_in_span,
        bytes,
    };
    fs::remove_dir_all(dir)?;
    Ok(r)
}

fn bench_train(args: &Args, dir: &Path) -> Result<Value> {
    let mut runs: BTreeMap<&str, Vec<TrainRun>> = BTreeMap::new();
    let started = Instant::now();
    for r in 0..args.rounds {
        let order: Vec<&str> = (0..MODES.len())
            .map(|i| MODES[(i + r) % MODES.len()])
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
    let med = |m: &str, f: &dyn Fn(&TrainRun) -> Vec<f64>| {
        let mut v: Vec<f64> = runs[m].iter().flat_map(f).collect();
        median(&mut v)
    };
    let sps = |m: &str| med(m, &|t| vec![t.steps_per_s]);
    let (none, sync, asy) = (sps("none"), sps("sync"), sps("async"));
    let step_s = 1.0 / none;
    let bytes = runs["sync"][0].bytes;
    let mtbf = args.mtbf_hours * 3600.0;
    println!(
        "\n### Saves of the built-in trainer: gpt {}x{} (context {}, batch {}, {} thread(s)), {:.0} MB \
         of model + AdamW state, a save every {} steps; medians of {} interleaved rounds ({:.0} s)\n",
        args.layers,
        args.d_model,
        args.context,
        args.batch,
        args.threads,
        bytes as f64 / 1e6,
        args.every,
        args.rounds,
        started.elapsed().as_secs_f64()
    );
    println!("| mode | steps/s | overhead at every {} steps | stall per save (s) | commit per save (s) | cost per save (s) | Daly interval (s) at MTBF {} h | overhead there |", args.every, args.mtbf_hours);
    println!("|---|---|---|---|---|---|---|---|");
    println!("| none (reference) | {none:.4} | – | – | – | – | – | – |");
    let mut out = json!({"step_seconds": step_s, "bytes": bytes});
    for (m, v) in [("sync", sync), ("async", asy)] {
        let stall = med(m, &|t| t.stalls.clone());
        let commit = med(m, &|t| t.commits.clone());
        // Extra wall time per save over the reference, over the same number of steps.
        let cost = med(m, &|t| {
            vec![(t.span - (args.steps - args.warm) as f64 * step_s) / t.saves.max(1) as f64]
        });
        let tau = daly(stall.max(1e-9), mtbf);
        println!(
            "| {m} | {v:.4} | {:+.1} % | {stall:.3} | {commit:.3} | {cost:.3} | {tau:.0} | {:.2} % |",
            (none / v - 1.0) * 100.0,
            cost.max(0.0) / tau * 100.0
        );
        out[m] = json!({"steps_per_s": v, "stall": stall, "commit": commit, "cost": cost,
            "daly_interval": tau});
    }
    let (ss, sa) = (
        med("sync", &|t| t.stalls.clone()),
        med("async", &|t| t.stalls.clone()),
    );
    println!(
        "\nasync stall / sync commit: {:.1} % (target ≤ 10 %)",
        sa / med("sync", &|t| t.commits.clone()) * 100.0
    );
    println!("sync stall {ss:.3} s, async stall {sa:.3} s, reference step {step_s:.3} s");
    out["raw"] = json!(runs
        .iter()
        .map(|(m, v)| (
            m.to_string(),
            v.iter()
                .map(|t| json!({"steps_per_s": t.steps_per_s, "stalls": t.stalls, "commits": t.commits}))
                .collect::<Vec<_>>()
        ))
        .collect::<BTreeMap<_, _>>());
    Ok(out)
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
        let order: Vec<&str> = (0..MODES.len())
            .map(|i| MODES[(i + r) % MODES.len()])
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
