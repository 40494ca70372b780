//! The built-in trainer under real SIGKILLs: `hpc-ckpt train` is killed (no warning, no final
//! checkpoint) at seeded moments after some commits; each restart resumes from the last
//! committed checkpoint and redoes the lost steps; the run ends byte-identical to a straight one,
//! and every step's loss is identical in both runs (redone steps included). `status` classifies
//! each kill as an unannounced interruption and counts the redone steps; a run interrupted once
//! by a warning and once by a kill, with a torn metrics line, is told and drawn by `status`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const CONFIG: &str = "name: kill\nseed: 11\nthreads: 1\n\
    model: {kind: gpt, layers: 1, heads: 2, d_model: 32, context: 16, dropout: 0.1}\n\
    data: {kind: text}\nbatch_size: 8\ngrad_accum: 2\ngrad_clip: 1.0\nmax_steps: 600\n\
    optimizer: {kind: adamw, lr: 0.002}\nscheduler: {kind: cosine, warmup_steps: 20}\n\
    checkpoint: {every_steps: 40, keep_last: 2}\n";

fn train(cfg: &Path, run: &Path) -> std::process::Command {
    let mut c = train_cmd(cfg, run);
    c.stderr(std::process::Stdio::null());
    c
}

fn commits(run: &Path) -> usize {
    commit_events(run).len()
}

#[test]
fn sigkilled_training_resumes_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("job.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let straight = tmp.path().join("straight");
    let st = train(&cfg, &straight).status().unwrap();
    assert_eq!(st.code(), Some(0));

    let run = tmp.path().join("killed");
    let mut rng = Rng(std::env::var("HPC_CKPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9));
    for round in 0..3 {
        let before = commits(&run);
        let mut child = train(&cfg, &run).spawn().unwrap();
        wait_for_commits(&run, &mut child, before + 2, round);
        std::thread::sleep(Duration::from_millis(rng.below(200)));
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
    }
    let st = train(&cfg, &run).status().unwrap();
    assert_eq!(st.code(), Some(0));
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(straight.join("checkpoints").join(ckpt(600)).join(f)).unwrap();
        let b = std::fs::read(run.join("checkpoints").join(ckpt(600)).join(f)).unwrap();
        assert!(a == b, "{f} differs after SIGKILLs");
    }
    let (ls, lk) = (losses(&straight), losses(&run));
    assert_eq!(ls.len(), 600);
    let mut redone = 0;
    for (step, seen) in &lk {
        for bits in seen {
            assert_eq!(Some(bits), ls[step].first(), "loss of step {step} differs");
        }
        redone += seen.len() - 1;
    }
    assert!(redone > 0, "the kills should have cost some redone steps");
    eprintln!("redone steps after 3 SIGKILLs: {redone}");
    // The journal shows three allocations that never said how they ended.
    let o = crate::common::run(&["status", "--json", run.to_str().unwrap()]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let silent = s["run"]["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["ending"].is_null())
        .count();
    assert_eq!(silent, 3);
    assert_eq!(s["run"]["state"], "done");
    // Each kill is an unannounced interruption, and the steps it lost are the steps redone.
    let allocs = s["run"]["allocations"].as_array().unwrap();
    let kinds: Vec<&str> = allocs
        .iter()
        .map(|a| a["interruption"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(kinds, ["unannounced", "unannounced", "unannounced", "-"]);
    let lost: u64 = allocs
        .iter()
        .map(|a| a["steps_lost"].as_u64().unwrap())
        .sum();
    assert_eq!(
        lost, redone as u64,
        "steps lost by the kills vs steps logged twice"
    );
    let g = &s["run"]["goodput"];
    assert_eq!(g["interruptions"]["unannounced"], 3);
    assert_eq!(g["lost_steps"], lost);
    let goodput = g["goodput"].as_f64().unwrap();
    assert!(goodput > 0.0 && goodput < 1.0, "{g}");
    assert!(
        g["badput_seconds"]["lost_work"].as_f64().unwrap() > 0.0,
        "{g}"
    );
}

/// One allocation stopped by a warning (SIGUSR1: final commit, announced), one SIGKILLed
/// (unannounced) whose last metrics line is torn, one that finishes: `status --json` classifies
/// both interruptions, the torn line is ended and skipped, and `status --plot` draws the three
/// allocations with both interruptions labelled.
#[test]
fn status_classifies_and_draws_a_warned_and_a_killed_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("job.yaml");
    std::fs::write(
        &cfg,
        CONFIG.replace("max_steps: 600", "max_steps: 400").replace(
            "name: kill",
            "name: plot\neval: {every_steps: 20, batches: 2}",
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    for (round, signal) in [Signal::SIGUSR1, Signal::SIGKILL].into_iter().enumerate() {
        let before = commits(&run);
        let mut child = train(&cfg, &run).spawn().unwrap();
        wait_for_commits(&run, &mut child, before + 2, round);
        std::thread::sleep(Duration::from_millis(100));
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        child.wait().unwrap();
    }
    // A kill in the middle of a metrics line.
    let metrics = run.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"ts\":\"2026-").unwrap();
    drop(f);
    let st = train(&cfg, &run).status().unwrap();
    assert_eq!(st.code(), Some(0));
    let logged = std::fs::read_to_string(&metrics).unwrap();
    let torn: Vec<&str> = logged
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        .collect();
    assert_eq!(torn, ["{\"ts\":\"2026-"], "the torn line stands alone");

    let o = crate::common::run(&["status", "--json", run.to_str().unwrap()]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let allocs = s["run"]["allocations"].as_array().unwrap();
    assert_eq!(allocs.len(), 3, "{s}");
    assert_eq!(allocs[0]["interruption"], "announced");
    assert_eq!(allocs[0]["steps_lost"], 0);
    assert_eq!(allocs[1]["interruption"], "unannounced");
    assert!(allocs[2]["interruption"].is_null());
    assert_eq!(
        allocs[1]["steps_lost"].as_u64().unwrap(),
        allocs[1]["reached_step"].as_u64().unwrap() - allocs[2]["resume_step"].as_u64().unwrap()
    );
    let g = &s["run"]["goodput"];
    assert_eq!(g["interruptions"]["announced"], 1);
    assert_eq!(g["interruptions"]["unannounced"], 1);
    assert!(
        g["badput_seconds"]["startup_restore"].as_f64().unwrap() > 0.0,
        "{g}"
    );
    assert!(g["badput_seconds"]["wait"].as_f64().unwrap() >= 0.0, "{g}");
    assert_eq!(s["metrics"]["unreadable_lines"], 1);
    assert_eq!(s["metrics"]["last_step"], 400);

    let svg = tmp.path().join("x.svg");
    let o = crate::common::run(&[
        "status",
        run.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Goodput:") && out.contains("  loss █"),
        "{out}"
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"), "{}", &picture[..80]);
    assert!(picture.trim_end().ends_with("</svg>"));
    assert!(picture.contains("announced @") && picture.contains("unannounced @"));
    // One line per allocation, in its own colour, in each panel (loss, val_loss).
    for c in ["#1F77B4", "#FF7F0E", "#2CA02C"] {
        let line = format!("stroke=\"{c}\" stroke-width=\"2\"");
        assert_eq!(picture.matches(&line).count(), 2, "{c}");
    }
    // No metrics: a clear error naming the file.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = crate::common::run(&[
        "status",
        empty.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("no metrics to plot"), "{}", text(&o));
}

/// Wait until `run` holds `n` commits, the training still running (round `round` of a test).
fn wait_for_commits(run: &Path, child: &mut std::process::Child, n: usize, round: usize) {
    let t = Instant::now();
    while commits(run) < n {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no progress in round {round}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "training finished before the kill in round {round}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
