//! Two-phase saves of the built-in trainer's ranks (`wrap --ranks 2 -- train`,
//! `checkpoint.async`, `src/train/trainer/rank_save.rs`):
//!
//! - async and sync 2-rank saves write identical files (every checkpoint, checksum for
//!   checksum), and an async save's copy overlaps the next step while its commit is agreed and
//!   asked for only after it (rank 0's debug log, in order);
//! - a 2-rank run stopped by USR1, by TERM, by a SIGKILL of rank 0 while it stages in the
//!   background, and by a SIGKILL of the supervisor ends byte-identical to a straight 2-rank
//!   run, with the same loss at every step; the staging the SIGKILL cut short is never
//!   committed, the pointer names a checkpoint that verifies;
//! - fp16 across 2 ranks: a run stopped by USR1 ends byte-identical to a straight fp16 run,
//!   loss-scaler state included (the scale starts high enough to skip steps and back off).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::common::journal_events as events;
use crate::common::*;
use hpc_ckpt::storage::manifest::checkpoint_name;
use hpc_ckpt::storage::run_dir::RunDir;
use hpc_ckpt::storage::verify::read_manifest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A gpt big enough that staging rank 0's state takes a few milliseconds.
const GPT: &str = "name: ranks-async\nseed: 4\nthreads: 1\n\
    model: {kind: gpt, layers: 2, heads: 2, d_model: 64, context: 16, dropout: 0.1}\n\
    data: {kind: text}\nbatch_size: 8\ngrad_accum: 2\ngrad_clip: 1.0\nmax_steps: 120\n\
    optimizer: {kind: adamw, lr: 0.002}\nscheduler: {kind: cosine, warmup_steps: 10}\n\
    checkpoint: {every_steps: 10, keep_last: 3}\n";

/// fp16 from a scale of 1e9: the first steps overflow, are skipped and back off; the scale
/// grows again every 8 finite steps.
const FP16: &str = "name: ranks-fp16\nseed: 5\nthreads: 1\n\
    precision: fp16\nloss_scale: {init_scale: 1.0e9, growth_interval: 8}\n\
    model: {kind: mlp, hidden: [64, 64], dropout: 0.1}\n\
    data: {kind: synthetic, samples: 1024, features: 32, classes: 10}\n\
    batch_size: 32\nmax_steps: 80\ngrad_clip: 1.0\n\
    optimizer: {kind: adamw, lr: 0.003}\nscheduler: {kind: cosine, warmup_steps: 10}\n\
    checkpoint: {every_steps: 10, keep_last: 2}\n";

fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// `wrap --ranks 2 -- train` outside Slurm, stderr (rank 0's log at `log_level`) into `log`.
fn train(cfg: &Path, run: &Path, log: &Path, log_level: &str) -> Command {
    let mut c = ranks_train_cmd(cfg, run, 2);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    c.env("HPC_CKPT_LOG", log_level).stderr(log);
    c
}

fn committed_steps(run: &Path) -> Vec<u64> {
    commit_events(run)
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect()
}

fn exit_code(mut child: Child) -> i32 {
    child.wait().unwrap().code().unwrap_or(-1)
}

/// Wait (while `child` runs) until `done` holds.
fn wait_until(child: &mut Child, what: &str, done: impl Fn() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(120), "{what}: timed out");
        assert!(child.try_wait().unwrap().is_none(), "{what}: ended first");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The lines of `log` that say `message` at `step=N`, as the steps.
fn logged_steps(log: &str, message: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("step=").and_then(|s| s.parse().ok()))
        })
        .collect()
}

/// Every checkpoint of `run`: its files with their checksums.
fn checksums(run: &Path) -> Vec<(String, Vec<(String, String)>)> {
    RunDir::new(run)
        .list()
        .iter()
        .map(|l| {
            let m = read_manifest(&l.path).unwrap();
            let files = m.files.into_iter().map(|f| (f.name, f.checksum)).collect();
            (checkpoint_name(l.step), files)
        })
        .collect()
}

/// Every file of `run`'s checkpoint of `step` (the manifest aside) equals `straight`'s.
fn assert_same_final(straight: &Path, run: &Path, step: u64) {
    let (a, b) = (
        straight.join("checkpoints").join(checkpoint_name(step)),
        run.join("checkpoints").join(checkpoint_name(step)),
    );
    let m = read_manifest(&a).unwrap();
    assert!(m.files.len() >= 5, "{:?}", m.files);
    for f in &m.files {
        let (x, y) = (
            std::fs::read(a.join(&f.name)),
            std::fs::read(b.join(&f.name)),
        );
        assert!(
            x.unwrap() == y.unwrap_or_default(),
            "{} differs from the straight run's",
            f.name
        );
    }
}

/// step → the bits of every loss logged for it, the redone steps' included.
fn assert_same_losses(straight: &Path, run: &Path, total: u64) {
    let (ls, lr) = (losses(straight), losses(run));
    assert_eq!(ls.len() as u64, total);
    assert_eq!(lr.len() as u64, total);
    for (step, seen) in &lr {
        for bits in seen {
            assert_eq!(Some(bits), ls[step].first(), "loss of step {step} differs");
        }
    }
}

#[test]
fn async_and_sync_rank_saves_write_identical_files_and_the_copy_overlaps_the_next_step() {
    let tmp = tempfile::tempdir().unwrap();
    let body = GPT
        .replace("max_steps: 120", "max_steps: 30")
        .replace("keep_last: 3", "keep_last: 5");
    let run_with = |mode: bool| {
        let cfg = write_config(
            tmp.path(),
            &format!("job-{mode}.yaml"),
            &body.replace("keep_last: 5}", &format!("keep_last: 5, async: {mode}}}")),
        );
        let (run, log) = (
            tmp.path().join(format!("run-{mode}")),
            tmp.path().join(format!("log-{mode}")),
        );
        let child = train(&cfg, &run, &log, "debug").spawn().unwrap();
        let code = exit_code(child);
        let log = std::fs::read_to_string(&log).unwrap();
        assert_eq!(code, 0, "{log}");
        (run, log)
    };
    let (run, log) = run_with(true);
    let (sync_run, sync_log) = run_with(false);
    assert_eq!(checksums(&run), checksums(&sync_run));
    assert_eq!(checksums(&run).len(), 3, "steps 10, 20 and 30");
    assert!(!sync_log.contains("rank save:"), "{sync_log}");
    // Rank 0's log, in order: the copy starts at the save's boundary, the next step runs, the
    // staging starts after it, and only a later step's votes agree on the commit.
    let at = |message: &str, step: u64| {
        log.lines()
            .position(|l| l.contains(message) && l.split(' ').any(|f| f == format!("step={step}")))
            .unwrap_or_else(|| panic!("no {message:?} for step {step} in:\n{log}"))
    };
    for s in [10, 20] {
        let copy = at("rank save: state copy overlapping the next step", s);
        let next = at("loss=", s + 1);
        let staging = at("rank save: staging in the background", s);
        let agreed = at("rank save: every rank staged", s);
        assert!(
            copy < next && next < staging && staging < agreed,
            "step {s}:\n{log}"
        );
    }
    let mut agreed = logged_steps(&log, "rank save: every rank staged");
    agreed.dedup();
    assert_eq!(agreed, [10, 20], "the end's save (30) is a synchronous one");
}

#[test]
fn async_ranks_stopped_by_usr1_term_and_sigkills_in_staging_and_of_the_supervisor_end_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "job.yaml", GPT);
    let straight = tmp.path().join("straight");
    let slog = tmp.path().join("straight.log");
    let child = train(&cfg, &straight, &slog, "info").spawn().unwrap();
    assert_eq!(exit_code(child), 0);

    let (run, log) = (tmp.path().join("run"), tmp.path().join("run.log"));
    let start = || train(&cfg, &run, &log, "debug").spawn().unwrap();
    // 1.–2. USR1, then TERM, to the supervisor after a commit: both ranks stop after the same
    // step and commit it.
    // (Exit 11 after USR1: work left, no requeue outside Slurm; a bare TERM is a stop.)
    for (sig, code) in [(Signal::SIGUSR1, Some(11)), (Signal::SIGTERM, None)] {
        let before = committed_steps(&run).len();
        let mut child = start();
        wait_until(&mut child, "a commit", || {
            committed_steps(&run).len() > before
        });
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let got = exit_code(child);
        assert!(code.is_none_or(|c| c == got), "{sig}: exit {got}");
        let stop = events(&run, "checkpoint_committed").pop().unwrap();
        assert!(committed_steps(&run).len() >= before + 2, "{sig}: {stop}");
    }
    // 3. SIGKILL of rank 0 as soon as it says it stages in the background.
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let staging = |l: &str| logged_steps(l, "rank save: staging in the background");
    let (seen, last_before) = (staging(&read()).len(), committed_steps(&run));
    let mut child = start();
    wait_until(&mut child, "a background staging", || {
        staging(&read()).len() > seen
    });
    let pids = events(&run, "child_started").last().unwrap()["pids"].clone();
    let rank0 = pids[0].as_i64().expect("the ranks' pids are journaled") as i32;
    kill(Pid::from_raw(rank0), Signal::SIGKILL).unwrap();
    let at_kill = read();
    assert_ne!(exit_code(child), 0, "a killed rank is not a success");
    let cut = *staging(&at_kill).last().unwrap();
    let agreed = logged_steps(&at_kill, "rank save: every rank staged").contains(&cut);
    eprintln!("rank 0 killed while staging step {cut} (agreed before the kill: {agreed})");
    if !agreed {
        assert!(
            !committed_steps(&run).contains(&cut),
            "step {cut} committed"
        );
    }
    let mut newest = None;
    check_invariants(&run, &mut newest, "after the kill in staging");
    assert!(committed_steps(&run).len() >= last_before.len());
    // 4. SIGKILL of the supervisor after a commit: its ranks die with it (PDEATHSIG).
    let before = committed_steps(&run).len();
    let mut child = start();
    wait_until(&mut child, "a commit", || {
        committed_steps(&run).len() > before
    });
    let pids = events(&run, "child_started").last().unwrap()["pids"].clone();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let _ = child.wait();
    for p in pids.as_array().unwrap() {
        let pid = Pid::from_raw(p.as_i64().unwrap() as i32);
        let t = Instant::now();
        while kill(pid, None).is_ok() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    check_invariants(&run, &mut newest, "after the supervisor's kill");
    // 5. To the end.
    let child = start();
    assert_eq!(exit_code(child), 0, "{}", read());
    assert_same_final(&straight, &run, 120);
    assert_same_losses(&straight, &run, 120);
    assert!(
        events(&run, "checkpoint_refused").is_empty(),
        "every resume point restored"
    );
}

#[test]
fn two_fp16_ranks_stopped_by_usr1_end_byte_identical_scaler_included() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "job.yaml", FP16);
    let straight = tmp.path().join("straight");
    let log = tmp.path().join("log");
    let child = train(&cfg, &straight, &log, "info").spawn().unwrap();
    assert_eq!(exit_code(child), 0);
    let run = tmp.path().join("run");
    let mut child = train(&cfg, &run, &log, "info").spawn().unwrap();
    wait_until(&mut child, "a commit", || !committed_steps(&run).is_empty());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGUSR1).unwrap();
    assert_eq!(exit_code(child), 11);
    let stopped = *committed_steps(&run).last().unwrap();
    assert!(stopped < 80, "stopped with work left");
    let child = train(&cfg, &run, &log, "info").spawn().unwrap();
    assert_eq!(exit_code(child), 0);
    let done = straight.join("checkpoints").join(checkpoint_name(80));
    assert!(done.join("rank00000.scaler.safetensors").is_file());
    assert_same_final(&straight, &run, 80);
    assert_same_losses(&straight, &run, 80);
    // The scaler skipped steps and backed off, in both runs alike.
    let skipped = |run: &Path| -> Vec<(u64, f64, f64)> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| {
                let m = &v["metrics"];
                (
                    v["step"].as_u64().unwrap(),
                    m["loss_scale"].as_f64().unwrap(),
                    m["skipped_steps"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (a, b) = (skipped(&straight), skipped(&run));
    assert!(a.last().unwrap().2 > 0.0, "the scaler skipped steps: {a:?}");
    assert!(a.last().unwrap().1 < 1.0e9, "and backed off: {a:?}");
    let b: std::collections::BTreeMap<u64, (f64, f64)> =
        b.into_iter().map(|(s, x, y)| (s, (x, y))).collect();
    for (s, x, y) in &a {
        assert_eq!(b[s], (*x, *y), "scale and skips at step {s}");
    }
}
