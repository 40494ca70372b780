//! Bit-exact resume of the built-in trainer (`hpc_ckpt::train::trainer::run`), on the CPU.
//!
//! For each model — mlp (dropout), cnn (batchnorm + dropout), gpt (dropout, AdamW, cosine with
//! warmup, grad_accum 2, grad_clip) — a straight run of N steps is compared with a run
//! interrupted at 3 seeded random steps (at least one mid-epoch) through the `stop` callback,
//! where one interruption is "SIGKILL-like": the checkpoint the stop wrote is discarded with the
//! pointer, so the next allocation resumes from an older periodic checkpoint and redoes work. The
//! final `model.safetensors`, `optimizer.safetensors` and `trainer_state.json` must be
//! byte-identical, and every step's loss in `metrics.jsonl` identical (redone steps included).
//! Also: extending a finished run by raising `max_steps` equals one longer run; config errors
//! name the key path; a resume with a changed config is refused with the changed keys.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use crate::common::Rng;
use hpc_ckpt::config::JobConfig;
use hpc_ckpt::storage::manifest::checkpoint_name;
use hpc_ckpt::storage::run_dir::holder;
use hpc_ckpt::storage::Store;
use hpc_ckpt::train::trainer::{run, Outcome, Resume, TrainError};

fn job(body: &str) -> JobConfig {
    JobConfig::parse(&format!("name: t\n{body}")).expect("test config parses")
}

fn open(dir: &Path, cfg: &JobConfig) -> Store {
    Store::open(dir, &holder(None), cfg.checkpoint.retention.clone()).expect("open store")
}

/// One allocation: open, load the latest checkpoint, train until `stop_at` (a global step).
fn allocation(dir: &Path, cfg: &JobConfig, stop_at: Option<u64>) -> Result<Outcome, TrainError> {
    let mut store = open(dir, cfg);
    let start = store.run_dir().resolve().chosen.map_or(0, |(l, _)| l.step);
    let calls = Cell::new(0u64);
    let stop = || {
        let at = start + calls.get();
        calls.set(calls.get() + 1);
        Some(at) == stop_at
    };
    run(cfg, &mut store, &Resume::Auto, &stop)
}

/// step → loss from metrics.jsonl; a step logged twice (redone work) must have the same loss.
fn losses(dir: &Path) -> BTreeMap<u64, u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("metrics line is JSON");
        let step = v["step"].as_u64().expect("step");
        let loss = v["metrics"]["loss"].as_f64().expect("loss").to_bits();
        if let Some(prev) = out.insert(step, loss) {
            assert_eq!(prev, loss, "step {step} redone with a different loss");
        }
    }
    out
}

const WEIGHTS: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];
const ALL: [&str; 3] = [
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
];

fn final_files(dir: &Path, step: u64, files: &[&str]) -> Vec<(String, Vec<u8>)> {
    let ck = dir.join("checkpoints").join(checkpoint_name(step));
    files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(ck.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            (f.to_string(), bytes)
        })
        .collect()
}

fn assert_same(a: &Path, b: &Path, step: u64, files: &[&str]) {
    for ((name, x), (_, y)) in final_files(a, step, files)
        .iter()
        .zip(final_files(b, step, files))
    {
        assert!(
            *x == y,
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Straight vs interrupted (3 stops, the second SIGKILL-like) for one config.
fn straight_vs_interrupted(body: &str, steps: u64, steps_per_epoch: u64, every: u64, seed: u64) {
    let cfg = job(body);
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let t0 = std::time::Instant::now();
    let out = allocation(&straight, &cfg, None).expect("straight run");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "straight: {steps} steps in {secs:.2}s ({:.1} steps/s)",
        steps as f64 / secs
    );
    assert!(out.completed && out.last_step == steps, "{out:?}");

    // Three distinct stop steps in 2..steps-1, at least one mid-epoch and one after a periodic
    // checkpoint (so the SIGKILL-like interruption has an older checkpoint to go back to).
    let mut rng = Rng(seed);
    let stops = loop {
        let mut s: Vec<u64> = (0..3).map(|_| 2 + rng.below(steps - 3)).collect();
        s.sort_unstable();
        s.dedup();
        if s.len() == 3 && s.iter().any(|x| x % steps_per_epoch != 0) && s[1] > every {
            break s;
        }
    };
    eprintln!(
        "stops at {stops:?}; the stop at {} is SIGKILL-like",
        stops[1]
    );
    let inter = tmp.path().join("interrupted");
    let mut allocations = 0;
    let mut next = 0;
    loop {
        allocations += 1;
        assert!(allocations < 10, "too many allocations");
        let target = stops.get(next).copied();
        let out = allocation(&inter, &cfg, target).expect("interrupted run");
        if out.completed {
            assert_eq!(next, stops.len(), "finished before every stop was hit");
            break;
        }
        assert_eq!(Some(out.last_step), target, "{out:?}");
        if next == 1 {
            // Lose everything since the last periodic checkpoint: the stop's own checkpoint and
            // the pointer to it vanish, as if the process had been killed before committing.
            let ck = inter
                .join("checkpoints")
                .join(checkpoint_name(out.last_step));
            // (When the stop step was itself a periodic checkpoint, this goes back a period.)
            std::fs::remove_dir_all(&ck).unwrap();
            std::fs::remove_file(inter.join("last_checkpoint")).unwrap();
            let mut store = open(&inter, &cfg);
            let back = store.load_latest().unwrap().map_or(0, |l| l.manifest.step);
            assert!(back < out.last_step, "resume point {back} is not older");
            eprintln!("SIGKILL-like: back from {} to {back}", out.last_step);
        }
        next += 1;
    }
    assert_same(&straight, &inter, steps, &ALL);
    let (a, b) = (losses(&straight), losses(&inter));
    assert_eq!(a.len() as u64, steps);
    assert_eq!(a, b, "per-step losses differ");
}

const MLP: &str = "
seed: 7
model: {kind: mlp, hidden: [32, 32], dropout: 0.2}
data: {kind: synthetic, samples: 600, features: 16, classes: 4}
batch_size: 16
optimizer: {kind: adam, lr: 0.01}
scheduler: {kind: step, step_size: 30, gamma: 0.5}
eval: {every_steps: 20, batches: 2}
checkpoint: {every_steps: 10, keep_last: 3}
";

#[test]
fn mlp_interrupted_equals_straight() {
    // 540 training samples / 16 = 33 micro-batches an epoch.
    straight_vs_interrupted(&format!("{MLP}max_steps: 80\n"), 80, 33, 10, 11);
}

#[test]
fn cnn_interrupted_equals_straight() {
    let body = "
seed: 3
model: {kind: cnn, channels: [4, 8], dropout: 0.1}
data: {kind: synthetic-images, samples: 300, size: 8, classes: 3}
batch_size: 16
max_steps: 60
optimizer: {kind: sgd, lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 0.0001}
scheduler: {kind: multistep, milestones: [20, 40], gamma: 0.5}
checkpoint: {every_steps: 10}
";
    // 270 / 16 = 16 micro-batches an epoch.
    straight_vs_interrupted(body, 60, 16, 10, 12);
}

#[test]
fn gpt_interrupted_equals_straight() {
    let body = "
seed: 5
model: {kind: gpt, layers: 2, heads: 2, d_model: 32, context: 16, dropout: 0.1}
data: {kind: text}
batch_size: 8
grad_accum: 2
grad_clip: 1.0
max_steps: 60
optimizer: {kind: adamw, lr: 0.003, weight_decay: 0.1}
scheduler: {kind: cosine, warmup_steps: 10}
eval: {every_steps: 15, batches: 2}
checkpoint: {every_steps: 10}
";
    // ~1700 training windows / 8 / 2: > 100 steps an epoch, so every stop is mid-epoch.
    straight_vs_interrupted(body, 60, 1_000_000, 10, 13);
}

#[test]
fn raising_max_steps_continues_like_one_longer_run() {
    let tmp = tempfile::tempdir().unwrap();
    let long = tmp.path().join("long");
    let out = allocation(&long, &job(&format!("{MLP}max_steps: 70\n")), None).unwrap();
    assert!(out.completed && out.last_step == 70);
    let ext = tmp.path().join("extended");
    let short = job(&format!("{MLP}max_steps: 45\n"));
    let out = allocation(&ext, &short, None).unwrap();
    assert!(out.completed && out.last_step == 45, "{out:?}");
    // Running the finished job again does nothing.
    let again = allocation(&ext, &short, None).unwrap();
    assert_eq!(
        again,
        Outcome {
            completed: true,
            commits: 0,
            last_step: 45
        }
    );
    let out = allocation(&ext, &job(&format!("{MLP}max_steps: 70\n")), None).unwrap();
    assert!(out.completed && out.last_step == 70, "{out:?}");
    // trainer_state.json differs by design: the scheduler's horizon stays the one the run
    // started with (45), which the step scheduler does not use.
    assert_same(&long, &ext, 70, &WEIGHTS);
    assert_eq!(losses(&long), losses(&ext));
}

#[test]
fn changed_config_and_threads_are_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let cfg = job(&format!("{MLP}max_steps: 15\n"));
    let out = allocation(&dir, &cfg, Some(12)).unwrap();
    assert!(!out.completed && out.last_step == 12);
    let changed = job(&format!(
        "{}max_steps: 15\n",
        MLP.replace("dropout: 0.2", "dropout: 0.3")
            .replace("lr: 0.01", "lr: 0.02")
    ));
    let e = allocation(&dir, &changed, None).unwrap_err().to_string();
    assert!(e.contains("step-000000000012"), "{e}");
    assert!(e.contains("model.dropout: 0.2 → 0.3"), "{e}");
    assert!(e.contains("optimizer.lr: 0.01 → 0.02"), "{e}");
    let threads = job(&format!("{MLP}max_steps: 15\nthreads: 2\n"));
    let e = allocation(&dir, &threads, None).unwrap_err().to_string();
    assert!(
        e.contains("threads: the checkpoint was made with 1 threads"),
        "{e}"
    );
    // Safe keys (max_steps, eval cadence, checkpoint policy) may change.
    let safe = job(&format!(
        "{}max_steps: 20\n",
        MLP.replace("every_steps: 20, batches", "every_steps: 5, batches")
            .replace(
                "every_steps: 10, keep_last: 3",
                "every_steps: 4, keep_last: 2"
            )
    ));
    let out = allocation(&dir, &safe, None).unwrap();
    assert!(out.completed && out.last_step == 20, "{out:?}");

    // A checkpoint whose model does not reproduce its recorded reference loss does not restore.
    // (MANIFEST.json is not among the files it checksums: edit its recorded value in place.)
    let manifest_path = dir.join("checkpoints/step-000000000020/MANIFEST.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let bits = manifest["extra"]["reference_loss_bits"].as_str().unwrap();
    let bits = u32::from_str_radix(bits.trim_start_matches("0x"), 16).unwrap();
    manifest["extra"]["reference_loss_bits"] = serde_json::json!(format!("{:#010x}", bits ^ 1));
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    // Asked for by path, it is the only candidate: nothing restores.
    let mut store = open(&dir, &safe);
    let from = Resume::From(manifest_path.parent().unwrap().to_path_buf());
    let e = run(&safe, &mut store, &from, &|| false).unwrap_err();
    assert!(matches!(e, TrainError::NothingRestores { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("step-000000000020/model.safetensors: the reference loss recomputed"),
        "{e}"
    );
    // Resuming automatically, it is refused and the run goes on from the checkpoint before it.
    let out = run(&safe, &mut store, &Resume::Auto, &|| false).unwrap();
    assert!(
        out.completed && out.last_step == 20 && out.commits == 1,
        "{out:?}"
    );
}

#[test]
fn example_jobs_are_valid_trainer_configs() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/jobs");
    for name in [
        "mlp.yaml",
        "cnn.yaml",
        "gpt.yaml",
        "gpt-2ranks.yaml",
        "gpt-cuda-bf16.yaml",
    ] {
        let cfg = JobConfig::load(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
        let tc = hpc_ckpt::train::config::TrainConfig::from_job(&cfg)
            .unwrap_or_else(|e| panic!("examples/jobs/{name}: {e}"));
        hpc_ckpt::train::trainer::world_fits(tc.batch_size, cfg.world_size())
            .unwrap_or_else(|e| panic!("examples/jobs/{name}: {}: {}", e.key, e.message));
    }
    let two = JobConfig::load(&dir.join("gpt-2ranks.yaml")).unwrap();
    assert_eq!(two.world_size(), 2);
}

#[test]
fn config_errors_name_the_key_path() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("model: {kind: mlp, hidden: [8], dropuot: 0.1}\nmax_steps: 3\n", "model.dropuot: unknown field"),
        ("model: {kind: mlp, hidden: [8, x]}\nmax_steps: 3\n", "model.hidden[1]: invalid type: string \"x\", expected a positive integer"),
        ("model: {kind: mlp, hidden: [8]}\nmax_steps: 3\nbatch_size: 0\n", "batch_size: expected a positive integer, found 0"),
        (
            "model: {kind: gpt, layers: 1, heads: 1, d_model: 8, context: 8}\nmax_steps: 3\ndata: {kind: text, path: /no/such/file.txt}\n",
            "data.path: cannot read /no/such/file.txt",
        ),
        ("model: {kind: mlp, hidden: [8]}\nmax_steps: 3\nbatch_size: 100000\n", "batch_size: 100000 is larger than the"),
        ("model: {kind: mlp, hidden: [8]}\nmax_steps: 3\ndevice: cuda\n", "device: cuda"),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        if body.contains("device: cuda") && tch::Cuda::is_available() {
            continue;
        }
        // Refused by the one parse of the file where a key alone is wrong, else when the
        // trainer starts (a file that is missing, the batch against the data).
        let e = match JobConfig::parse(&format!("name: t\n{body}")) {
            Err(e) => e.to_string(),
            Ok(cfg) => allocation(&tmp.path().join(format!("c{i}")), &cfg, None)
                .unwrap_err()
                .to_string(),
        };
        assert!(e.contains(want), "{body:?}: got {e:?}, want {want:?}");
    }
    // A wrong type at the top level is the job config's own error, with its path.
    let e = JobConfig::parse("name: t\nbatch_size: many\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("batch_size: "), "{e}");
}
