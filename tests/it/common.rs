//! Shared helpers of the integration tests: the real binary, a seeded RNG, source dirs, the
//! store's invariants after a kill.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hpc_ckpt::storage::pointer::{self, Pointer};
use hpc_ckpt::storage::run_dir::RunDir;
use hpc_ckpt::storage::verify::verify_checkpoint;

/// `hpc-ckpt train --config CFG --run-dir RUN` outside Slurm (no `SLURM_JOB_ID`), stdout
/// discarded; stderr is the caller's to keep or drop.
pub fn train_cmd(cfg: &Path, run: &Path) -> Command {
    let mut c = cmd(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    c.env_remove("SLURM_JOB_ID")
        .stdout(std::process::Stdio::null());
    c
}

/// The journal's `checkpoint_committed` events of `run`, in order.
pub fn commit_events(run: &Path) -> Vec<serde_json::Value> {
    hpc_ckpt::storage::journal::read_all(run)
        .0
        .into_iter()
        .filter(|e| e["event"] == "checkpoint_committed")
        .collect()
}

/// The `hpc-ckpt` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hpc-ckpt"))
}

/// `hpc-ckpt ARGS…`, logs at warn so stderr stays small.
pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env("HPC_CKPT_LOG", "warn");
    c
}

pub fn run(args: &[&str]) -> Output {
    cmd(args).output().expect("run hpc-ckpt")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// splitmix64: small, seeded, reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Create `dir` with files of the given names and sizes (seeded content).
pub fn make_src(dir: &Path, files: &[(&str, usize)], seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng(seed);
    for (name, size) in files {
        std::fs::write(dir.join(name), rng.bytes(*size)).unwrap();
    }
}

/// The checkpoint name of a step.
pub fn ckpt(step: u64) -> String {
    format!("step-{step:012}")
}

/// Commit `src` as `step` into `run`, asserting success.
pub fn commit_ok(run: &Path, step: u64, src: &Path, extra: &[&str]) {
    let step_s = step.to_string();
    let mut args = vec![
        "commit",
        "--run-dir",
        run.to_str().unwrap(),
        "--step",
        &step_s,
    ];
    args.extend_from_slice(extra);
    args.push(src.to_str().unwrap());
    let o = run_args(&args);
    assert!(o.status.success(), "commit failed: {}", text(&o));
}

fn run_args(args: &[&str]) -> Output {
    run(args)
}

/// Copy a directory tree (regular files and dirs only).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = e.file_type().unwrap();
        let dest = to.join(e.file_name());
        if t.is_dir() {
            copy_tree(&e.path(), &dest);
        } else if t.is_file() {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The repository root (for scripts and the venv).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Start the project's local Slurm cluster (idempotent; left running for other tests, CI stops
/// it) and return its SLURM_CONF.
pub fn cluster() -> String {
    let o = Command::new(repo().join("sbatch/local-cluster.sh"))
        .arg("start")
        .output()
        .expect("run sbatch/local-cluster.sh start");
    assert!(
        o.status.success(),
        "local-cluster.sh start failed:\n{}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export SLURM_CONF="))
        .expect("local-cluster.sh start prints the SLURM_CONF export line")
        .trim_matches(['\'', '"'])
        .to_string()
}

/// The local cluster's two nodes as lanes for the tests that submit jobs. A test holds the lanes
/// its jobs run on (`take_lanes`) until the guard drops, so one test's exclusive job or its
/// preemptor (a job in the lane's high-priority partition) never meets another test's jobs, and
/// tests on different lanes run side by side. Lane 0 is the first node (partitions `low`/`high`),
/// lane 1 the second (`low2`/`high2`); both lanes are `wide`/`widehigh`
/// (`sbatch/local-cluster.sh`).
pub struct Lanes {
    held: Vec<usize>,
}

/// Which lanes are taken, and how many two-lane requests wait (one-lane requests let them go
/// first, so a two-node test does not wait for every one-node test to end).
struct LaneState {
    busy: [bool; 2],
    wide_waiting: usize,
}

static LANES: std::sync::Mutex<LaneState> = std::sync::Mutex::new(LaneState {
    busy: [false; 2],
    wide_waiting: 0,
});
static LANE_FREED: std::sync::Condvar = std::sync::Condvar::new();

/// Wait until `n` (1 or 2) lanes are free and take them.
pub fn take_lanes(n: usize) -> Lanes {
    assert!(
        n == 1 || n == 2,
        "the local cluster has 2 lanes, asked for {n}"
    );
    let mut st = LANES.lock().unwrap_or_else(|e| e.into_inner());
    if n == 2 {
        st.wide_waiting += 1;
    }
    loop {
        let free: Vec<usize> = (0..2).filter(|&i| !st.busy[i]).collect();
        if free.len() >= n && (n == 2 || st.wide_waiting == 0) {
            let held = free[..n].to_vec();
            for &i in &held {
                st.busy[i] = true;
            }
            if n == 2 {
                st.wide_waiting -= 1;
            }
            return Lanes { held };
        }
        st = LANE_FREED.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

impl Lanes {
    /// The partition a job on these lanes runs in, and the one whose jobs preempt it.
    pub fn partitions(&self) -> (&'static str, &'static str) {
        match self.held[..] {
            [0] => ("low", "high"),
            [1] => ("low2", "high2"),
            _ => ("wide", "widehigh"),
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        let mut st = LANES.lock().unwrap_or_else(|e| e.into_inner());
        for &i in &self.held {
            st.busy[i] = false;
        }
        LANE_FREED.notify_all();
    }
}

/// Run a Slurm client command against the local cluster.
pub fn slurm(conf: &str, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// The project venv's Python (`HPC_CKPT_PYTHON` overrides); set up by `tests/setup.sh`.
pub fn python() -> PathBuf {
    let p = std::env::var_os("HPC_CKPT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run tests/setup.sh --torch (the README's test command does)",
        p.display()
    );
    p
}

/// The store's promises after a writer was killed: every committed checkpoint verifies; the
/// pointer names one that verifies (or nothing, before the first commit), never goes back from
/// `last_step` (updated here), and lags the newest committed dir by at most an interrupted swap.
pub fn check_invariants(run: &Path, last_step: &mut Option<u64>, ctx: &str) {
    let dir = RunDir::new(run);
    // Every committed checkpoint verifies.
    for l in dir.list() {
        if let Err(f) = verify_checkpoint(&l.path) {
            panic!("{ctx}: committed {} does not verify: {f:?}", l.name);
        }
    }
    let newest = dir.list().last().map(|l| l.step);
    match pointer::read(run).unwrap_or_else(|f| panic!("{ctx}: pointer unreadable: {f}")) {
        Pointer::Absent => {
            assert!(
                last_step.is_none(),
                "{ctx}: pointer vanished after a commit"
            );
        }
        Pointer::Names(n) => {
            let step = hpc_ckpt::storage::manifest::parse_checkpoint_name(&n).unwrap();
            let p = dir.checkpoints_dir().join(&n);
            assert!(p.is_dir(), "{ctx}: pointer names missing {n}");
            verify_checkpoint(&p)
                .unwrap_or_else(|f| panic!("{ctx}: pointer target {n} corrupt: {f:?}"));
            if let Some(prev) = *last_step {
                assert!(
                    step >= prev,
                    "{ctx}: pointer went back from {prev} to {step}"
                );
            }
            // The pointer lags the newest committed dir by at most one interrupted swap.
            assert!(
                newest.is_some_and(|s| s >= step),
                "{ctx}: pointer ahead of checkpoints"
            );
            *last_step = Some(step);
        }
    }
}

/// The last `phase=` a writer logged at debug level (`startup` when none).
pub fn last_phase(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    s.lines()
        .rev()
        .find_map(|l| {
            let i = l.find("phase=")?;
            let rest = l[i + 6..].trim_start_matches('"');
            Some(rest.split(['"', ' ']).next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| "startup".into())
}

/// step → the loss bits of each of its lines in `run`'s metrics.jsonl, in file order (a redone
/// step has several; they must agree). A line torn by a kill mid-write is skipped, as every
/// reader does.
pub fn losses(run: &Path) -> std::collections::BTreeMap<u64, Vec<u64>> {
    let mut m: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(s), Some(l)) = (v["step"].as_u64(), v["metrics"]["loss"].as_f64()) {
            m.entry(s).or_default().push(l.to_bits());
        }
    }
    m
}
