//! The built-in trainer under real SIGKILLs: `hpc-ckpt train` is killed (no warning, no final
//! checkpoint) at seeded moments after some commits; each restart resumes from the last
//! committed checkpoint and redoes the lost steps; the run ends byte-identical to a straight one,
//! and every step's loss is identical in both runs (redone steps included).

use std::collections::BTreeMap;
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
    let mut c = cmd(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    c.env_remove("SLURM_JOB_ID")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

fn commits(run: &Path) -> usize {
    hpc_ckpt::storage::journal::read_all(run)
        .0
        .iter()
        .filter(|e| e["event"] == "checkpoint_committed")
        .count()
}

/// step → loss bits, the last line for each step (a redone step must repeat the same value).
fn losses(run: &Path) -> BTreeMap<u64, Vec<u64>> {
    let mut m: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let (Some(s), Some(l)) = (v["step"].as_u64(), v["metrics"]["loss"].as_f64()) {
            m.entry(s).or_default().push(l.to_bits());
        }
    }
    m
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
        let t = Instant::now();
        while commits(&run) < before + 2 {
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
}
