//! Crash consistency: SIGKILL the real `hpc-ckpt commit` at ≥ 200 seeded random instants while it
//! commits checkpoints of 1 KiB to 64 MiB, and after every kill check the store's promises:
//! the pointer names a checkpoint that verifies (or nothing, before the first commit), every
//! committed checkpoint verifies, committed steps only grow, and the next writer removes every
//! temp entry. Half of the kills land at random instants of each commit's measured duration,
//! half as soon as the writer has begun a randomly chosen phase (write, fsync, manifest, rename,
//! pointer swap, retention) — under load, random instants alone fall mostly in process start-up;
//! the phase each kill hit is read from the writer's debug log and the spread is asserted.
//!
//! Seed: `HPC_CKPT_TEST_SEED` (printed). Process kills leave the page cache intact, so this tests
//! ordering and atomicity of the protocol, not the durability of fsync across power loss.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;
use hpc_ckpt::storage::run_dir::RunDir;

const KILLS: usize = 200;

/// The commit phases half of the kills aim at (the writer logs each at debug level).
const TARGETS: [&str; 6] = [
    "write",
    "fsync",
    "manifest",
    "rename",
    "pointer",
    "retention",
];

/// Wait until the writer's log says it began phase `phase` (or it ended, or 30 s passed).
fn wait_for_phase(log: &Path, phase: &str, child: &mut std::process::Child) {
    let (quoted, bare) = (format!("phase=\"{phase}\""), format!("phase={phase} "));
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) && child.try_wait().unwrap().is_none() {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        if s.contains(&quoted) || s.contains(&bare) {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn sigkill_at_random_instants_never_breaks_the_store() {
    let seed: u64 = std::env::var("HPC_CKPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261125);
    eprintln!("crash_consistency seed = {seed}");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let log = tmp.path().join("writer.log");

    // Sources from 1 KiB to 64 MiB, several files each.
    let specs: Vec<Vec<(&str, usize)>> = vec![
        vec![("state.json", 1 << 10)],
        vec![("model.bin", 256 << 10), ("state.json", 1 << 10)],
        vec![
            ("model.bin", 4 << 20),
            ("optimizer.bin", 8 << 20),
            ("state.json", 2 << 10),
        ],
        vec![
            ("model.bin", 16 << 20),
            ("optimizer.bin", 2 << 20),
            ("state.json", 1 << 10),
        ],
        vec![("model.bin", 64 << 20)],
        vec![
            ("model.bin", 32 << 20),
            ("optimizer.bin", 32 << 20),
            ("state.json", 4 << 10),
        ],
    ];
    let srcs: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = tmp.path().join(format!("src{i}"));
            make_src(&p, s, seed ^ i as u64);
            p
        })
        .collect();
    let retention = ["--keep-last", "2", "--keep-every", "7:2"];

    let spawn = |step: u64, src: &Path| {
        let mut c = cmd(&[
            "commit",
            "--run-dir",
            run.to_str().unwrap(),
            "--step",
            &step.to_string(),
        ]);
        c.args(retention)
            .arg(src)
            .env("HPC_CKPT_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        c.spawn().expect("spawn writer")
    };

    // Calibrate: how long an uninterrupted commit of each source takes here.
    let mut step = 0u64;
    let mut last_step = None;
    let mut durations = Vec::new();
    for src in &srcs {
        step += 1;
        let t = Instant::now();
        let st = spawn(step, src).wait().unwrap();
        assert!(
            st.success(),
            "calibration commit failed: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        durations.push(t.elapsed());
        check_invariants(&run, &mut last_step, "calibration");
    }
    eprintln!("uninterrupted commit durations: {durations:?}");

    let mut kills = 0;
    let mut completed = 0;
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    while kills < KILLS {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "test ran too long"
        );
        step += 1;
        let k = rng.below(srcs.len() as u64) as usize;
        let window = durations[k].mul_f64(1.3);
        let delay = window.mul_f64(rng.unit());
        let target = TARGETS[rng.below(TARGETS.len() as u64) as usize];
        let mut child = spawn(step, &srcs[k]);
        if rng.below(2) == 0 {
            // A random instant of the calibrated duration.
            std::thread::sleep(delay);
        } else {
            // Once the writer has begun phase `target`: every phase is hit whatever the load
            // (under load, random instants fall mostly in process start-up).
            wait_for_phase(&log, target, &mut child);
        }
        let killed = child.try_wait().unwrap().is_none();
        if killed {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        }
        let st = child.wait().unwrap();
        if killed && st.code().is_none() {
            kills += 1;
            *phases.entry(last_phase(&log)).or_default() += 1;
        } else {
            assert!(
                st.success(),
                "writer failed: {}",
                std::fs::read_to_string(&log).unwrap()
            );
            completed += 1;
        }
        check_invariants(
            &run,
            &mut last_step,
            &format!("after step {step} (kill #{kills})"),
        );

        // Every 10 kills, a writer runs to completion: it must clean every temp entry and
        // publish its step.
        if kills % 10 == 0 && killed {
            step += 1;
            let st = spawn(step, &srcs[0]).wait().unwrap();
            assert!(st.success(), "{}", std::fs::read_to_string(&log).unwrap());
            check_invariants(&run, &mut last_step, "after a clean commit");
            assert_eq!(last_step, Some(step));
            let temps = RunDir::new(&run).temp_entries();
            assert!(
                temps.is_empty(),
                "temp entries survived a writer's start: {temps:?}"
            );
        }
    }
    eprintln!("kills: {kills}, completed: {completed}, phases hit: {phases:?}");
    for p in ["write", "fsync"] {
        assert!(
            phases.contains_key(p),
            "no kill landed in phase {p}: {phases:?}"
        );
    }
    assert!(
        phases.len() >= 5,
        "kills landed in too few phases: {phases:?}"
    );
    // The final verify of the whole run dir through the CLI agrees.
    let o = crate::common::run(&["verify", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}
