//! Benchmark: all-reduce of the gpt's gradients across 2 local ranks on the trainer's collective
//! engine (`hpc_ckpt::train::collective`, libtorch's c10d `ProcessGroupGloo`), against Python's
//! `torch.distributed` gloo `all_reduce` of the same sizes and a memcpy of the same bytes.
//!
//! ```text
//! cargo run --example bench_allreduce -- [--rounds 20] [--warm 3] \
//!     [--layers 4 --d-model 128 --heads 4 --context 64] [--python .venv/bin/python] [--json FILE]
//! ```
//!
//! (A debug build is enough: the time is spent inside libtorch's Gloo, which is optimised.)
//!
//! The model is built by the trainer's own code (`Model::build` on `examples/jobs/gpt.yaml`'s
//! model by default; `--layers 7 --d-model 768 --heads 12 --context 32` is `bench_saves`'s
//! 49.7M-parameter gpt), so the sizes are the real parameters'. Each of the 2 ranks (this
//! example re-run with `--rank`, 1 libtorch thread each) holds one f32 gradient per parameter
//! and one flat buffer of their total; per round, between barriers: one all-reduce per
//! parameter (`per-tensor`), then one of the flat buffer (`flat`). Rank 0's times; medians over
//! `--rounds` after `--warm` untimed rounds. `connect` is the time to join (store + Gloo
//! rendezvous). The Python ranks (`tests/bench/py_allreduce.py`) do the same with
//! `dist.all_reduce`; `memcpy` copies the flat buffer once in this process.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

use hpc_ckpt::config::JobConfig;
use hpc_ckpt::train::collective::{ConnectOptions, ProcessGroup, Rendezvous};
use hpc_ckpt::train::config::TrainConfig;
use hpc_ckpt::train::data::Dataset;
use hpc_ckpt::train::models::{named_parameters, Model};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the trainer's all-reduce of the gpt's gradients (2 local ranks)")]
struct Args {
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    #[arg(long, default_value_t = 3)]
    warm: usize,
    #[arg(long, default_value_t = 4)]
    layers: u64,
    #[arg(long, default_value_t = 128)]
    d_model: u64,
    #[arg(long, default_value_t = 4)]
    heads: u64,
    #[arg(long, default_value_t = 64)]
    context: u64,
    /// The Python with torch for the baseline (skipped when absent).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Save every raw sample here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run as this rank (of 2), TCP store on 127.0.0.1:PORT, sizes and output files.
    #[arg(long, hide = true, requires_all = ["port", "sizes", "out"])]
    rank: Option<usize>,
    #[arg(long, hide = true)]
    port: Option<u16>,
    #[arg(long, hide = true)]
    sizes: Option<PathBuf>,
    #[arg(long, hide = true)]
    out: Option<PathBuf>,
}

const WORLD: usize = 2;

fn main() -> Result<()> {
    let args = Args::parse();
    if args.rounds == 0 {
        bail!("--rounds must be >= 1");
    }
    tch::set_num_threads(1);
    if let Some(rank) = args.rank {
        return rank_main(&args, rank);
    }
    let sizes = gpt_sizes(&args)?;
    let total: i64 = sizes.iter().sum();
    let bytes = total as f64 * 4.0;
    eprintln!(
        "gpt: {} parameter tensors, {total} parameters, {:.1} MB of f32 gradients",
        sizes.len(),
        bytes / 1e6
    );
    let tmp = tempfile::tempdir()?;
    let sizes_file = tmp.path().join("sizes.json");
    fs::write(&sizes_file, serde_json::to_vec(&sizes)?)?;

    let exe = std::env::current_exe()?;
    let ours = run_ranks("ours", |rank, port, out| {
        let mut c = Command::new(&exe);
        c.args(["--rank", &rank.to_string(), "--port", &port.to_string()])
            .arg("--sizes")
            .arg(&sizes_file)
            .arg("--out")
            .arg(out)
            .args(["--rounds", &args.rounds.to_string()])
            .args(["--warm", &args.warm.to_string()]);
        c
    })?;
    let python = if args.python.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bench/py_allreduce.py");
        Some(run_ranks("python", |rank, port, out| {
            let mut c = Command::new(&args.python);
            c.arg(&script)
                .args([rank.to_string(), WORLD.to_string(), port.to_string()])
                .arg(&sizes_file)
                .args([args.rounds.to_string(), args.warm.to_string()])
                .arg(out);
            c
        })?)
    } else {
        eprintln!("{} not found: no Python baseline", args.python.display());
        None
    };
    let memcpy = {
        let src = Tensor::randn([total], (Kind::Float, Device::Cpu));
        let mut dst = Tensor::zeros([total], (Kind::Float, Device::Cpu));
        let mut v = Vec::new();
        for i in 0..args.warm + args.rounds {
            let t = Instant::now();
            dst.copy_(&src);
            if i >= args.warm {
                v.push(t.elapsed().as_secs_f64());
            }
        }
        v
    };

    println!(
        "all-reduce (sum) of the gpt's gradients, {WORLD} ranks on this machine, {} tensors, \
         {:.1} MB; median of {} rounds (ms) [min-max]",
        sizes.len(),
        bytes / 1e6,
        args.rounds
    );
    let row = |name: &str, v: &[f64]| {
        let m = median(v);
        println!(
            "  {name:<22} {:>9.3}  [{:.3}-{:.3}]  {:>6.2} GB/s",
            m * 1e3,
            min(v) * 1e3,
            max(v) * 1e3,
            bytes / m / 1e9
        );
    };
    let samples = |r: &Value, k: &str| -> Vec<f64> {
        r[k].as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    row("ours flat", &samples(&ours, "flat_s"));
    row("ours per-tensor", &samples(&ours, "per_tensor_s"));
    if let Some(py) = &python {
        row("python gloo flat", &samples(py, "flat_s"));
        row("python gloo per-tensor", &samples(py, "per_tensor_s"));
    }
    row("memcpy (1 copy)", &memcpy);
    println!(
        "  connect (join): ours {:.3} s{}",
        ours["connect_s"].as_f64().unwrap_or(f64::NAN),
        python
            .as_ref()
            .map(|p| format!(
                ", python init_process_group {:.3} s",
                p["connect_s"].as_f64().unwrap_or(f64::NAN)
            ))
            .unwrap_or_default()
    );
    if let Some(p) = &args.json {
        let raw = json!({"args": format!("{args:?}"), "sizes": sizes, "ours": ours,
                         "python": python, "memcpy_s": memcpy});
        fs::write(p, serde_json::to_vec_pretty(&raw)?)?;
        eprintln!("raw samples: {}", p.display());
    }
    Ok(())
}

/// The element counts of the gpt's parameters, from the trainer's model code.
fn gpt_sizes(args: &Args) -> Result<Vec<i64>> {
    let yaml = format!(
        "name: bench-allreduce\nseed: 1\n\
         model: {{kind: gpt, layers: {}, heads: {}, d_model: {}, context: {}}}\n\
         data: {{kind: text}}\nbatch_size: 1\nmax_steps: 1\n\
         optimizer: {{kind: adamw, lr: 0.0003}}\n",
        args.layers, args.heads, args.d_model, args.context
    );
    let job = JobConfig::parse(&yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tc = TrainConfig::from_job(&job).map_err(|e| anyhow::anyhow!("{e}"))?;
    let data = Dataset::load(&tc).map_err(|e| anyhow::anyhow!("{e}"))?;
    let vs = nn::VarStore::new(Device::Cpu);
    Model::build(&vs.root(), &tc.model, data.task()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(named_parameters(&vs)
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .collect())
}

/// Start WORLD ranks made by `cmd(rank, port, out)`, wait (10 min at most), return rank 0's JSON.
fn run_ranks(name: &str, cmd: impl Fn(usize, u16, &Path) -> Command) -> Result<Value> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("rank0.json");
    let mut children: Vec<Child> = (0..WORLD)
        .map(|r| cmd(r, port, &out).spawn())
        .collect::<Result<_, _>>()
        .with_context(|| format!("start the {name} ranks"))?;
    let t0 = Instant::now();
    for (r, c) in children.iter_mut().enumerate() {
        loop {
            if let Some(s) = c.try_wait()? {
                if !s.success() {
                    bail!("{name} rank {r} failed: {s}");
                }
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                let _ = c.kill();
                bail!("{name} rank {r} still running after 10 min");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let raw = fs::read(&out).with_context(|| format!("{name}: rank 0 wrote no result"))?;
    Ok(serde_json::from_slice(&raw)?)
}

fn rank_main(args: &Args, rank: usize) -> Result<()> {
    let sizes: Vec<i64> = serde_json::from_slice(&fs::read(args.sizes.as_ref().unwrap())?)?;
    let t0 = Instant::now();
    let mut pg = ProcessGroup::connect(&ConnectOptions {
        rank,
        world_size: WORLD,
        rendezvous: Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port: args.port.unwrap(),
        },
        timeout: Duration::from_secs(120),
        device_host: Some("127.0.0.1".into()),
    })?;
    let connect = t0.elapsed().as_secs_f64();
    tch::manual_seed(rank as i64);
    let mut grads: Vec<Tensor> = sizes
        .iter()
        .map(|&n| Tensor::randn([n], (Kind::Float, Device::Cpu)))
        .collect();
    let mut flat = Tensor::randn([sizes.iter().sum::<i64>()], (Kind::Float, Device::Cpu));
    let (mut per, mut fl) = (Vec::new(), Vec::new());
    for i in 0..args.warm + args.rounds {
        pg.barrier()?;
        let t = Instant::now();
        for g in &mut grads {
            pg.all_reduce_sum(g)?;
        }
        let a = t.elapsed().as_secs_f64();
        pg.barrier()?;
        let t = Instant::now();
        pg.all_reduce_sum(&mut flat)?;
        let b = t.elapsed().as_secs_f64();
        if i >= args.warm {
            per.push(a);
            fl.push(b);
        }
    }
    pg.barrier()?;
    if rank == 0 {
        let out = json!({"connect_s": connect, "per_tensor_s": per, "flat_s": fl});
        fs::write(args.out.as_ref().unwrap(), serde_json::to_vec(&out)?)?;
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
