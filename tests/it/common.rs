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

/// `hpc-ckpt wrap --ranks N --config CFG --run-dir RUN -- train` outside Slurm (the built-in
/// trainer's N local ranks), stdout discarded; the caller says where stderr goes.
pub fn ranks_train_cmd(cfg: &Path, run: &Path, ranks: u32) -> Command {
    let ranks = ranks.to_string();
    let mut c = cmd(&[
        "wrap",
        "--ranks",
        &ranks,
        "--config",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--",
        "train",
    ]);
    c.env_remove("SLURM_JOB_ID")
        .stdout(std::process::Stdio::null());
    c
}

/// The journal's events named `name` of `run`, in order.
pub fn journal_events(run: &Path, name: &str) -> Vec<serde_json::Value> {
    hpc_ckpt::storage::journal::read_all(run)
        .0
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

/// The journal's `checkpoint_committed` events of `run`, in order.
pub fn commit_events(run: &Path) -> Vec<serde_json::Value> {
    journal_events(run, "checkpoint_committed")
}

/// The `hpc-ckpt` binary cargo built for these tests, or the one `HPC_CKPT_TEST_BIN` names.
///
/// `tests/ci.sh` builds the login-node binary (`--no-default-features`, no libtorch) first and
/// runs the suites that need no torch against a copy of it: the default build overwrites
/// `target/debug/hpc-ckpt-core` afterwards, and these suites start hpc-ckpt hundreds of times,
/// ~0.25 s of libtorch loading each with the default build.
pub fn bin() -> PathBuf {
    std::env::var_os("HPC_CKPT_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hpc-ckpt")))
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
///
/// A lane is free again only when no job is left on it: the guard's drop cancels what the test
/// left there (a test that failed or panicked mid-chain leaves its job running, requeueing,
/// preempting) and waits until Slurm has no such job any more; the next test on that node would
/// otherwise share it. When they do not go, the lanes stay taken and say why.
pub struct Lanes {
    held: Vec<usize>,
    pool: &'static LanePool,
    /// Empties the held lanes before they are free: `Ok` once no job is left on them.
    clear: ClearLanes,
}

/// What a `Lanes` guard runs on drop, given the lanes it held.
pub type ClearLanes = Box<dyn FnMut(&[usize]) -> Result<(), String> + Send>;

/// Which lanes are taken, which are broken (left jobs that did not go), and how many two-lane
/// requests wait (one-lane requests let them go first, so a two-node test does not wait for
/// every one-node test to end).
pub struct LanePool {
    state: std::sync::Mutex<LaneState>,
    freed: std::sync::Condvar,
}

struct LaneState {
    busy: [bool; 2],
    broken: [Option<String>; 2],
    wide_waiting: usize,
}

impl LanePool {
    pub const fn new() -> Self {
        LanePool {
            state: std::sync::Mutex::new(LaneState {
                busy: [false; 2],
                broken: [None, None],
                wide_waiting: 0,
            }),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Wait until `n` (1 or 2) lanes are free and take them; `clear` empties them on drop.
    /// Panics when fewer than `n` lanes are left unbroken (waiting would never end).
    pub fn take(&'static self, n: usize, clear: ClearLanes) -> Lanes {
        assert!(
            n == 1 || n == 2,
            "the local cluster has 2 lanes, asked for {n}"
        );
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if n == 2 {
            st.wide_waiting += 1;
        }
        loop {
            let usable = st.broken.iter().filter(|b| b.is_none()).count();
            if usable < n {
                if n == 2 {
                    st.wide_waiting -= 1;
                }
                let why: Vec<String> = st.broken.iter().flatten().cloned().collect();
                drop(st);
                panic!("{n} lane(s) wanted, {usable} usable: {}", why.join("; "));
            }
            let free: Vec<usize> = (0..2)
                .filter(|&i| !st.busy[i] && st.broken[i].is_none())
                .collect();
            if free.len() >= n && (n == 2 || st.wide_waiting == 0) {
                let held = free[..n].to_vec();
                for &i in &held {
                    st.busy[i] = true;
                }
                if n == 2 {
                    st.wide_waiting -= 1;
                }
                return Lanes {
                    held,
                    pool: self,
                    clear,
                };
            }
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Default for LanePool {
    fn default() -> Self {
        Self::new()
    }
}

static SLURM_LANES: LanePool = LanePool::new();

/// Wait until `n` (1 or 2) lanes of the cluster at `conf` are free and take them.
pub fn take_lanes(conf: &str, n: usize) -> Lanes {
    let conf = conf.to_string();
    SLURM_LANES.take(n, Box::new(move |held| clear_lanes(&conf, held)))
}

/// The partitions whose jobs run on `held` lanes (`wide`/`widehigh` need both).
fn lane_partitions(held: &[usize]) -> Vec<&'static str> {
    let mut p = Vec::new();
    for &i in held {
        p.extend(if i == 0 {
            ["low", "high"]
        } else {
            ["low2", "high2"]
        });
    }
    if held.len() == 2 {
        p.extend(["wide", "widehigh"]);
    }
    p
}

/// Cancel every job left in the partitions of `held` and wait until Slurm lists none (pending,
/// running or completing: squeue's default states). After a passing test this finds nothing.
fn clear_lanes(conf: &str, held: &[usize]) -> Result<(), String> {
    let parts = lane_partitions(held).join(",");
    let left = || -> Result<Vec<String>, String> {
        let o = slurm(conf, "squeue", &["-h", "-p", &parts, "-o", "%i"]);
        if !o.status.success() {
            return Err(format!("squeue -p {parts}: {}", text(&o)));
        }
        Ok(String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect())
    };
    let mut jobs = left()?;
    if jobs.is_empty() {
        return Ok(());
    }
    eprintln!("lanes {held:?}: cancelling the jobs the test left there: {jobs:?}");
    // TERM, then KILL after the cluster's KillWait (15 s), then the epilog: well within this.
    let t = std::time::Instant::now();
    while !jobs.is_empty() {
        if t.elapsed() > std::time::Duration::from_secs(120) {
            return Err(format!(
                "lanes {held:?}: jobs {jobs:?} still in squeue 120 s after scancel"
            ));
        }
        let ids: Vec<&str> = jobs.iter().map(String::as_str).collect();
        slurm(conf, "scancel", &ids);
        std::thread::sleep(std::time::Duration::from_millis(500));
        jobs = left()?;
    }
    eprintln!("lanes {held:?}: empty after {:?}", t.elapsed());
    Ok(())
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
        let cleared = (self.clear)(&self.held);
        let mut st = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        for &i in &self.held {
            st.busy[i] = false;
            if let Err(e) = &cleared {
                st.broken[i] = Some(e.clone());
            }
        }
        drop(st);
        self.pool.freed.notify_all();
        if let Err(e) = cleared {
            // A test that passed but left jobs that do not go fails here (a second panic while
            // one unwinds would abort the harness).
            if !std::thread::panicking() {
                panic!("{e}");
            }
            eprintln!("{e}");
        }
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

/// The lane pool without a cluster: what a failed test's guard does before its lane is free.
mod lane_tests {
    use super::{ClearLanes, LanePool};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    use std::time::Duration;

    /// A failing test's lane is free only once its clear ran, and the clear ran while the test
    /// unwound, for the lane it held.
    #[test]
    fn a_failed_test_frees_its_lane_only_after_its_jobs_are_gone() {
        static POOL: LanePool = LanePool::new();
        let gone = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(None));
        let (taken, wait_taken) = mpsc::channel();
        let test = {
            let (gone, seen) = (gone.clone(), seen.clone());
            std::thread::spawn(move || {
                let clear: ClearLanes = Box::new(move |held| {
                    *seen.lock().unwrap() = Some((held.to_vec(), std::thread::panicking()));
                    // Cancelling and waiting for the jobs takes a while.
                    std::thread::sleep(Duration::from_millis(300));
                    gone.store(true, Ordering::SeqCst);
                    Ok(())
                });
                let _lanes = POOL.take(1, clear);
                taken.send(()).unwrap();
                panic!("a Slurm test fails while its job runs");
            })
        };
        wait_taken.recv().unwrap();
        // Both lanes: only once the failed test's lane is empty.
        let both = POOL.take(2, Box::new(|_| Ok(())));
        assert!(
            gone.load(Ordering::SeqCst),
            "the lane was free before its jobs were gone"
        );
        assert_eq!(*seen.lock().unwrap(), Some((vec![0], true)));
        assert_eq!(both.partitions(), ("wide", "widehigh"));
        assert!(test.join().is_err());
    }

    /// Jobs that do not go leave their lane taken: the other lane still serves one-lane tests,
    /// a two-lane test fails saying why instead of waiting for ever.
    #[test]
    fn a_lane_whose_jobs_do_not_go_stays_taken_and_says_why() {
        static POOL: LanePool = LanePool::new();
        let stuck = std::thread::spawn(|| {
            let _lanes = POOL.take(
                1,
                Box::new(|_| Err("job 7 still in squeue 120 s after scancel".into())),
            );
            panic!("a Slurm test fails");
        });
        assert!(stuck.join().is_err());
        let one = POOL.take(1, Box::new(|_| Ok(())));
        assert_eq!(one.partitions(), ("low2", "high2"));
        drop(one);
        let two = std::panic::catch_unwind(|| POOL.take(2, Box::new(|_| Ok(()))));
        let msg = two.err().and_then(|e| e.downcast::<String>().ok());
        assert!(
            msg.as_deref()
                .is_some_and(|m| m.contains("job 7 still in squeue")),
            "{msg:?}"
        );
    }
}
