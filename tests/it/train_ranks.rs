//! The built-in trainer across ranks, on this machine (`wrap --ranks 2 -- train`: two local
//! `hpc-ckpt train-rank` processes, c10d Gloo over TCP, one coordinated commit per checkpoint).
//! A 2-rank run stopped by the warning signal, by the warning to one rank alone (the supervisor
//! still sees work left) and then by a SIGKILL of one rank ends byte-identical to a straight
//! 2-rank run (gpt; cnn, whose batchnorm statistics rank 0 shares);
//! a 2-rank checkpoint resumes with 1 rank; configs that do not fit N ranks are refused before
//! anything starts. The Slurm versions (srun, 2 nodes) are in `slurm_e2e`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::journal_events as events;
use crate::common::*;
use hpc_ckpt::storage::manifest::checkpoint_name;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const GPT: &str = "name: ranks\nseed: 9\nthreads: 1\n\
    model: {kind: gpt, layers: 1, heads: 2, d_model: 32, context: 16, dropout: 0.1}\n\
    data: {kind: text}\nbatch_size: 8\ngrad_accum: 2\ngrad_clip: 1.0\nmax_steps: 160\n\
    optimizer: {kind: adamw, lr: 0.002}\nscheduler: {kind: cosine, warmup_steps: 10}\n\
    eval: {every_steps: 40, batches: 2}\ncheckpoint: {every_steps: 20}\n";

const CNN: &str = "name: ranks-cnn\nseed: 3\nthreads: 1\n\
    model: {kind: cnn, channels: [4, 8], dropout: 0.1}\n\
    data: {kind: synthetic-images, samples: 300, size: 8, classes: 3}\nbatch_size: 16\n\
    max_steps: 150\noptimizer: {kind: sgd, lr: 0.05, momentum: 0.9}\n\
    checkpoint: {every_steps: 15}\n";

/// The files of a 2-rank checkpoint of the built-in trainer.
const FILES: [&str; 5] = [
    "rank00000.model.safetensors",
    "rank00000.optimizer.safetensors",
    "rank00000.trainer_state.json",
    "rank00000.rank_state.json",
    "rank00001.rank_state.json",
];

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("job.yaml");
    std::fs::write(&p, body).unwrap();
    p
}

/// `wrap --ranks N --config CFG --run-dir RUN -- train`, outside Slurm (local ranks).
fn train(cfg: &Path, run: &Path, ranks: u32) -> std::process::Command {
    let mut c = ranks_train_cmd(cfg, run, ranks);
    c.stderr(std::process::Stdio::piped());
    c
}

/// Start an allocation and wait until it has committed `n` checkpoints in all.
fn start_and_wait(cfg: &Path, run: &Path, n: usize) -> std::process::Child {
    let mut child = train(cfg, run, 2).spawn().unwrap();
    let t = Instant::now();
    while events(run, "checkpoint_committed").len() < n {
        assert!(t.elapsed() < Duration::from_secs(120), "no commit {n}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before commit {n}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

fn exit_of(child: std::process::Child) -> (i32, String) {
    let o = child.wait_with_output().unwrap();
    (o.status.code().unwrap_or(-1), text(&o))
}

/// step → loss bits (a redone step must repeat its loss).
fn losses(run: &Path) -> BTreeMap<u64, u64> {
    crate::common::losses(run)
        .into_iter()
        .map(|(step, all)| {
            assert!(
                all.iter().all(|l| *l == all[0]),
                "step {step} redone with another loss"
            );
            (step, all[0])
        })
        .collect()
}

fn final_checkpoint(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(checkpoint_name(step))
}

fn assert_same_files(a: &Path, b: &Path, files: &[&str]) {
    for f in files {
        let (x, y) = (std::fs::read(a.join(f)), std::fs::read(b.join(f)));
        let (x, y) = (
            x.unwrap_or_else(|e| panic!("{}: {e}", a.join(f).display())),
            y.unwrap_or_else(|e| panic!("{}: {e}", b.join(f).display())),
        );
        assert!(
            x == y,
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// A straight 2-rank run vs one stopped by USR1, then by a SIGKILL of rank 1, then finished.
fn straight_vs_interrupted(body: &str, total: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), body);
    let straight = tmp.path().join("straight");
    let (code, log) = exit_of(train(&cfg, &straight, 2).spawn().unwrap());
    assert_eq!(code, 0, "{log}");
    let done = final_checkpoint(&straight, total);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(done.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["extra"]["world_size"], 2, "{manifest}");
    assert!(
        manifest["extra"]["reference_loss_bits"].is_string(),
        "{manifest}"
    );
    let lines = losses(&straight);
    assert_eq!(
        lines.len() as u64,
        total,
        "one metrics line a step, from rank 0 only"
    );

    let run = tmp.path().join("interrupted");
    // 1. The warning signal to the supervisor: both ranks stop after the same step and commit.
    let child = start_and_wait(&cfg, &run, 2);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGUSR1).unwrap();
    let (code, log) = exit_of(child);
    assert_eq!(code, 11, "stopped with work left: {log}");
    let stopped = events(&run, "checkpoint_committed").last().unwrap()["step"]
        .as_u64()
        .unwrap();
    // 2. The warning signal to rank 1 alone (Slurm's `--signal` without `B:`): the ranks agree
    //    to stop, and the supervisor, which got no signal, still sees work left.
    let before = events(&run, "checkpoint_committed").len();
    let child = start_and_wait(&cfg, &run, before + 1);
    let pids = events(&run, "child_started").last().unwrap()["pids"].clone();
    let rank1 = pids[1].as_i64().expect("the ranks' pids are journaled") as i32;
    kill(Pid::from_raw(rank1), Signal::SIGUSR1).unwrap();
    let (code, log) = exit_of(child);
    assert_eq!(code, 11, "stopped by a rank's signal, work left: {log}");
    assert_eq!(
        events(&run, "allocation_end").last().unwrap()["ending"],
        "warning_signal",
        "{log}"
    );
    // 3. SIGKILL of rank 1: its peer is taken down, nothing half-committed, the next
    //    allocation resumes from the newest checkpoint and redoes the lost steps.
    let before = events(&run, "checkpoint_committed").len();
    let child = start_and_wait(&cfg, &run, before + 1);
    let pids = events(&run, "child_started").last().unwrap()["pids"].clone();
    let rank1 = pids[1].as_i64().expect("the ranks' pids are journaled") as i32;
    kill(Pid::from_raw(rank1), Signal::SIGKILL).unwrap();
    let (code, log) = exit_of(child);
    assert_ne!(code, 0, "a killed rank is not a success: {log}");
    // 4. To the end.
    let (code, log) = exit_of(train(&cfg, &run, 2).spawn().unwrap());
    assert_eq!(code, 0, "{log}");
    let resumed: Vec<u64> = events(&run, "child_started")
        .iter()
        .filter_map(|e| e["resume_step"].as_u64())
        .collect();
    assert!(
        resumed.contains(&stopped),
        "resumed from the stop's checkpoint: {resumed:?}"
    );
    assert_same_files(&done, &final_checkpoint(&run, total), &FILES);
    assert_eq!(
        losses(&run),
        lines,
        "every step's loss, redone steps included"
    );
}

#[test]
fn two_gpt_ranks_stopped_and_one_killed_end_byte_identical() {
    straight_vs_interrupted(GPT, 160);
}

#[test]
fn two_cnn_ranks_with_shared_batchnorm_statistics_end_byte_identical() {
    straight_vs_interrupted(CNN, 150);
}

#[test]
fn a_two_rank_checkpoint_resumes_with_one_rank_and_configs_that_do_not_fit_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), GPT);
    let run = tmp.path().join("run");
    let child = start_and_wait(&cfg, &run, 1);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGUSR1).unwrap();
    assert_eq!(exit_of(child).0, 11);
    // A changed learning rate: every rank refuses the checkpoint, and the supervisor stops with
    // exit 7 (the user's to fix) instead of requeueing into the same refusal.
    let other = tmp.path().join("changed");
    std::fs::create_dir_all(&other).unwrap();
    let changed = write_config(&other, &GPT.replace("lr: 0.002", "lr: 0.003"));
    let (code, log) = exit_of(train(&changed, &run, 2).spawn().unwrap());
    assert_eq!(code, 7, "{log}");
    assert!(log.contains("optimizer.lr"), "{log}");
    let end = events(&run, "allocation_end").pop().unwrap();
    assert_eq!(end["decision"], "stop", "{end}");
    // One rank (in-process) takes the replicated state of a 2-rank checkpoint, with a warning.
    let (code, log) = exit_of(train(&cfg, &run, 1).spawn().unwrap());
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("another world size"), "{log}");
    assert!(final_checkpoint(&run, 160)
        .join("model.safetensors")
        .is_file());

    // A global batch 2 ranks cannot share, and --resume other than auto: refused (exit 7).
    let odd = write_config(tmp.path(), &GPT.replace("batch_size: 8", "batch_size: 9"));
    let o = train(&odd, &tmp.path().join("odd"), 2).output().unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        text(&o).contains("batch_size") && text(&o).contains("multiple of 2"),
        "{}",
        text(&o)
    );
}

/// Without dropout, 2 ranks compute what 1 rank does, up to float rounding: the same loss at the
/// first step (the mean of the two shares' means is the global batch's mean) and the same loss
/// curve after (the averaged gradients are the global batch's) — so each rank trains on its own
/// share, and the gradients are averaged, not summed or taken from one rank.
#[test]
fn two_ranks_compute_what_one_rank_does_up_to_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    // SGD without clipping: an update proportional to the gradient (Adam's would hide a
    // gradient off by a constant factor).
    let body = GPT
        .replace("dropout: 0.1", "dropout: 0.0")
        .replace("max_steps: 160", "max_steps: 30")
        .replace("grad_clip: 1.0\n", "")
        .replace("{kind: adamw, lr: 0.002}", "{kind: sgd, lr: 0.5}");
    let cfg = write_config(tmp.path(), &body);
    let mut curves = Vec::new();
    for ranks in [1, 2] {
        let run = tmp.path().join(format!("r{ranks}"));
        let (code, log) = exit_of(train(&cfg, &run, ranks).spawn().unwrap());
        assert_eq!(code, 0, "{log}");
        let c: Vec<f64> = losses(&run).values().map(|b| f64::from_bits(*b)).collect();
        assert_eq!(c.len(), 30);
        curves.push(c);
    }
    let (one, two) = (&curves[0], &curves[1]);
    for (step, (a, b)) in one.iter().zip(two).enumerate() {
        let tol = if step == 0 { 1e-6 } else { 1e-3 };
        assert!(
            (a - b).abs() <= tol * a.abs(),
            "step {}: 1 rank {a}, 2 ranks {b}",
            step + 1
        );
    }
    assert!(one.first() > one.last(), "it trains: {one:?}");
}

/// The f32 values of tensor `name` in safetensors `bytes`.
fn f32s(bytes: &[u8], name: &str) -> Vec<f32> {
    let h = hpc_ckpt::storage::safetensors::parse_bytes(bytes).unwrap();
    let t = h.get(name).unwrap_or_else(|| panic!("no tensor {name}"));
    let at = (h.data_start + t.begin) as usize..(h.data_start + t.end) as usize;
    bytes[at]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Batchnorm's running mean after one step is the whole batch's with 2 ranks as with 1: the
/// ranks average their running statistics (rank 0's alone would be its half-batch's).
#[test]
fn two_ranks_keep_the_whole_batchs_running_mean() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        &CNN.replace("dropout: 0.1", "dropout: 0.0")
            .replace("max_steps: 150", "max_steps: 1"),
    );
    let mut means = Vec::new();
    for (ranks, file) in [(1, "model.safetensors"), (2, "rank00000.model.safetensors")] {
        let run = tmp.path().join(format!("r{ranks}"));
        let (code, log) = exit_of(train(&cfg, &run, ranks).spawn().unwrap());
        assert_eq!(code, 0, "{log}");
        let bytes = std::fs::read(final_checkpoint(&run, 1).join(file)).unwrap();
        means.push(f32s(&bytes, "bns.0.running_mean"));
    }
    assert!(means[0].iter().any(|m| m.abs() > 1e-4), "{:?}", means[0]);
    for (a, b) in means[0].iter().zip(&means[1]) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
            "{:?} vs {:?}",
            means[0],
            means[1]
        );
    }
}
