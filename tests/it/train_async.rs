//! Two-phase saves of the built-in trainer (`checkpoint.async`), through the real binary:
//! - a checkpoint does not depend on the mode: async and sync runs of one job commit the same
//!   steps with the same file checksums, and the journal records each save's stall (and, for
//!   async saves, that they were persisted in the background);
//! - SIGKILLs of `hpc-ckpt train` landing while a background persist runs (≥ 200, seeded, spread
//!   over the persist's measured duration; the phase each hit is read from the writer's debug log)
//!   never break the store — after each, the pointer names a checkpoint that verifies and every
//!   committed checkpoint verifies — and the run, finished after all of them, ends byte-identical
//!   to a straight run with every step's loss (redone steps included) identical.
//!
//! Seed: `HPC_CKPT_TEST_SEED` (printed).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::*;
use hpc_ckpt::storage::run_dir::RunDir;
use hpc_ckpt::storage::verify::read_manifest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[test]
fn async_and_sync_saves_of_a_step_write_identical_files() {
    async_and_sync_saves_agree("", &[]);
}

/// fp16 with a scale that overflows at first: the loss scaler's state (which the next step
/// updates after the copy's fence) is saved alike by both modes, skipped steps included.
#[test]
fn async_and_sync_fp16_saves_write_identical_files_scaler_included() {
    async_and_sync_saves_agree(
        "precision: fp16\nloss_scale: {init_scale: 1.0e9, growth_interval: 4}\n",
        &["scaler.safetensors"],
    );
}

/// Run the same job with `checkpoint.async` true and false (plus `extra` keys): every
/// checkpoint's files (with `must_hold` among them) are identical in name, size and checksum.
fn async_and_sync_saves_agree(extra: &str, must_hold: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let job = |mode: bool| {
        let p = tmp.path().join(format!("job-{mode}.yaml"));
        let body = format!(
            "name: modes\nseed: 4\nthreads: 1\n{extra}\
             model: {{kind: mlp, hidden: [64, 32], dropout: 0.1}}\n\
             data: {{kind: synthetic, samples: 600, features: 16, classes: 5}}\n\
             batch_size: 16\nmax_steps: 47\noptimizer: {{kind: adamw, lr: 0.003}}\n\
             scheduler: {{kind: cosine, warmup_steps: 5}}\neval: {{every_steps: 10}}\n\
             checkpoint: {{every_steps: 3, keep_last: 100, async: {mode}, \
             keep_best: {{monitor: val_loss, mode: min}}}}\n"
        );
        std::fs::write(&p, body).unwrap();
        p
    };
    let mut runs = Vec::new();
    for mode in [true, false] {
        let run = tmp.path().join(format!("run-{mode}"));
        let o = train_cmd(&job(mode), &run).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        runs.push(run);
    }
    let listing = |run: &Path| -> BTreeMap<u64, Vec<(String, u64, String)>> {
        RunDir::new(run)
            .list()
            .into_iter()
            .map(|l| {
                let m = read_manifest(&l.path).unwrap();
                let files = m
                    .files
                    .iter()
                    .map(|f| (f.name.clone(), f.size, f.checksum.clone()))
                    .collect();
                (l.step, files)
            })
            .collect()
    };
    let (a, s) = (listing(&runs[0]), listing(&runs[1]));
    // Every third step, every eval step (keep_best) and the last.
    assert_eq!(a.len(), 15 + 3 + 1, "{:?}", a.keys());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        s.keys().collect::<Vec<_>>(),
        "the two modes committed different steps"
    );
    for (step, files) in &a {
        assert_eq!(
            files, &s[step],
            "step {step}: files differ between async and sync"
        );
        for name in must_hold {
            assert!(
                files.iter().any(|f| f.0 == *name),
                "step {step}: no {name} in {files:?}"
            );
        }
    }
    // The journal: every save's stall; async periodic saves persisted in the background, the
    // final one (the end) and every sync save in the foreground.
    let (ca, cs) = (commit_events(&runs[0]), commit_events(&runs[1]));
    assert_eq!(ca.len(), a.len());
    for c in ca.iter().chain(&cs) {
        assert!(c["stall_seconds"].as_f64().is_some(), "no stall in {c}");
    }
    let background =
        |cs: &[serde_json::Value]| cs.iter().filter(|c| c["background"] == true).count();
    assert_eq!(background(&ca), ca.len() - 1, "{ca:?}");
    assert_eq!(background(&cs), 0);
    for c in &cs {
        // A foreground save stalls for the whole commit.
        assert!(c["stall_seconds"].as_f64() >= c["seconds"].as_f64(), "{c}");
    }
}

/// ~19 MB a checkpoint (a 1.6M-parameter mlp with AdamW), a cheap step (batch 4), constant lr
/// so that `max_steps` can be lowered for the end of the run.
const KILL_JOB: &str = "name: akill\nseed: 5\nthreads: 1\n\
    model: {kind: mlp, hidden: [1024, 1024], dropout: 0.1}\n\
    data: {kind: synthetic, samples: 256, features: 512, classes: 10}\n\
    batch_size: 4\noptimizer: {kind: adamw, lr: 0.0005}\n\
    checkpoint: {every_steps: 3, keep_last: 2, async: true}\n";

/// Kills in all; two lanes (run dirs) take turns on the two cores, half each.
const KILLS: usize = 200;
const LANES: usize = 2;

/// The marker the trainer logs at debug level when it hands a save to the persister.
const HANDED_OVER: &str = "handing over to the persister";

fn job_with_steps(dir: &Path, steps: u64) -> std::path::PathBuf {
    let p = dir.join(format!("job-{steps}.yaml"));
    std::fs::write(&p, format!("{KILL_JOB}max_steps: {steps}\n")).unwrap();
    p
}

/// Spawn a training process logging at debug level into `log`.
fn spawn_logged(cfg: &Path, run: &Path, log: &Path) -> Child {
    train_cmd(cfg, run)
        .env("HPC_CKPT_LOG", "debug")
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Wait until `log` shows `n` hand-overs; false when the process ended first.
fn wait_for_hand_overs(child: &mut Child, log: &Path, n: usize) -> bool {
    let t = Instant::now();
    let mut text = String::new();
    let mut f = None;
    loop {
        if f.is_none() {
            f = std::fs::File::open(log).ok();
        }
        if let Some(f) = f.as_mut() {
            let _ = f.read_to_string(&mut text);
            if text.matches(HANDED_OVER).count() >= n {
                return true;
            }
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no save handed over within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Where a kill landed: `after` the last handed-over save was committed, else the persist's
/// last phase (`handed-over` before its first).
fn landed(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let Some(i) = s.rfind(HANDED_OVER) else {
        return "before".into();
    };
    let tail = &s[i..];
    if tail.contains("checkpoint committed") {
        return "after".into();
    }
    tail.lines()
        .rev()
        .find_map(|l| {
            let j = l.find("phase=")?;
            let rest = l[j + 6..].trim_start_matches('"');
            Some(rest.split(['"', ' ']).next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| "handed-over".into())
}

/// Seconds of the background persists the journal recorded, median (None before any).
fn median_persist(run: &Path) -> Option<Duration> {
    let mut s: Vec<f64> = commit_events(run)
        .iter()
        .filter(|c| c["background"] == true)
        .filter_map(|c| c["seconds"].as_f64())
        .collect();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).map(|&m| Duration::from_secs_f64(m))
}

/// step → every loss logged for it (a redone step logs again).
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

/// One lane: `kills` SIGKILLs of `hpc-ckpt train` on `run`, each at a seeded instant within 1.3×
/// the median persist after a save was handed over; the store's invariants after each. The first
/// process runs through three persists first (the median's first samples). Returns where each
/// kill landed and the pointer's step at the end.
fn kill_lane(dir: &Path, lane: usize, kills: usize, seed: u64) -> (BTreeMap<String, usize>, u64) {
    let mut rng = Rng(seed ^ (lane as u64).wrapping_mul(0x9E3779B97F4A7C15));
    let run = dir.join(format!("killed-{lane}"));
    let log = dir.join(format!("train-{lane}.log"));
    let endless = job_with_steps(dir, 1_000_000);
    let mut last_step = None;
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    for k in 0..kills {
        let mut child = spawn_logged(&endless, &run, &log);
        let first = if k == 0 { 4 } else { 1 };
        assert!(
            wait_for_hand_overs(&mut child, &log, first),
            "lane {lane}: training ended before a save: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        let window = median_persist(&run).unwrap_or(Duration::from_millis(200));
        std::thread::sleep(window.mul_f64(1.3 * rng.unit()));
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        let st = child.wait().unwrap();
        assert_eq!(
            st.code(),
            None,
            "lane {lane}: kill #{k} did not land: {st:?}"
        );
        *phases.entry(landed(&log)).or_default() += 1;
        check_invariants(
            &run,
            &mut last_step,
            &format!("lane {lane}, after kill #{k}"),
        );
    }
    let step = last_step.unwrap_or_else(|| panic!("lane {lane}: no persist ever completed"));
    (phases, step)
}

#[test]
fn sigkills_during_background_persists_keep_a_verified_pointer_and_resume_exactly() {
    let seed: u64 = std::env::var("HPC_CKPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261202);
    eprintln!("train_async seed = {seed}");
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let dir = tmp.path();
    let lanes: Vec<(BTreeMap<String, usize>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..LANES)
            .map(|lane| s.spawn(move || kill_lane(dir, lane, KILLS / LANES, seed)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    for (p, _) in &lanes {
        for (k, n) in p {
            *phases.entry(k.clone()).or_default() += n;
        }
    }
    let steps: Vec<u64> = lanes.iter().map(|(_, s)| *s).collect();
    eprintln!(
        "{KILLS} kills in {:?}; landed: {phases:?}; pointers at {steps:?}",
        started.elapsed()
    );
    let during: usize = phases
        .iter()
        .filter(|(p, _)| !matches!(p.as_str(), "after" | "before"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        during * 10 >= KILLS * 6,
        "too few kills landed during a persist: {phases:?}"
    );
    for p in ["write", "fsync"] {
        assert!(
            phases.contains_key(p),
            "no kill landed in phase {p}: {phases:?}"
        );
    }
    assert!(
        phases.len() >= 4,
        "kills landed in too few phases: {phases:?}"
    );

    // Finish each lane a few steps past the furthest pointer; compare with one straight run.
    let end = steps.iter().max().unwrap() + 5;
    let finish = job_with_steps(tmp.path(), end);
    let straight = tmp.path().join("straight");
    let o = train_cmd(&finish, &straight).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ls = losses(&straight);
    assert_eq!(ls.len() as u64, end);
    let last = ckpt(end);
    for lane in 0..LANES {
        let run = tmp.path().join(format!("killed-{lane}"));
        let o = train_cmd(&finish, &run).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        for f in ["model.safetensors", "optimizer.safetensors"] {
            let a = std::fs::read(straight.join("checkpoints").join(&last).join(f)).unwrap();
            let b = std::fs::read(run.join("checkpoints").join(&last).join(f)).unwrap();
            assert!(a == b, "lane {lane}: {f} differs after the kills");
        }
        let mut redone = 0;
        for (step, seen) in losses(&run).range(..=end) {
            for bits in seen {
                assert_eq!(
                    Some(bits),
                    ls[step].first(),
                    "lane {lane}: loss of step {step} differs"
                );
            }
            redone += seen.len() - 1;
        }
        eprintln!("lane {lane}: steps redone over the kills: {redone}");
    }
    eprintln!("whole test: {:?}", started.elapsed());
}

/// `checkpoint.interval: auto`: saves come at Daly's interval (here a tiny MTBF prior, so often),
/// and each commit journals the recommended and the actual interval and why.
/// (16000 steps: the run must outlast the first interval, 0.83 s for the assumed 1 s stall,
/// several times over on a fast machine; 4000 steps took 0.8 s here.)
#[test]
fn interval_auto_saves_at_the_recommended_interval_and_journals_why() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("job.yaml");
    std::fs::write(
        &cfg,
        "name: auto\nseed: 1\nthreads: 1\nmodel: {kind: mlp, hidden: [256]}\n\
         data: {kind: synthetic, samples: 512, features: 64, classes: 10}\n\
         batch_size: 16\nmax_steps: 16000\noptimizer: {kind: adamw, lr: 0.001}\n\
         checkpoint: {interval: auto, mtbf: 1s, keep_last: 2}\n",
    )
    .unwrap();
    let run = tmp.path().join("run");
    let o = train_cmd(&cfg, &run)
        .env("HPC_CKPT_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let log = text(&o);
    assert!(log.contains("checkpoint interval: auto"), "{log}");
    let cs = commit_events(&run);
    assert!(cs.len() >= 3, "a 1 s MTBF asks for frequent saves: {cs:?}");
    let first = &cs[0]["cadence"];
    assert!(
        first["reason"].as_str().unwrap().contains("assumed")
            && first["reason"]
                .as_str()
                .unwrap()
                .contains("checkpoint.mtbf prior"),
        "{first}"
    );
    for c in &cs[..cs.len() - 1] {
        let (rec, actual) = (
            c["cadence"]["recommended_seconds"].as_f64().unwrap(),
            c["cadence"]["actual_seconds"].as_f64().unwrap(),
        );
        assert!(actual >= rec, "saved before the interval was up: {c}");
    }
    // After the first save the stall is measured, no longer assumed.
    assert!(
        cs[1]["cadence"]["reason"]
            .as_str()
            .unwrap()
            .contains("median of the last"),
        "{}",
        cs[1]
    );
    // status states the newest commit's interval and why.
    let o = crate::common::run(&["status", run.to_str().unwrap()]);
    assert!(
        text(&o).contains("Save interval:") && text(&o).contains("median of the last"),
        "{}",
        text(&o)
    );
    let o = crate::common::run(&["status", "--json", run.to_str().unwrap()]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let last = cs.last().unwrap();
    assert_eq!(st["saves"]["interval"]["step"], last["step"], "{st}");
    assert_eq!(
        st["saves"]["interval"]["recommended_seconds"],
        last["cadence"]["recommended_seconds"]
    );
}

/// Phase 1 of an async save overlaps the next step: the save starts the copy and returns, the
/// copy is joined before the next optimizer update (`fence_copy`) and the snapshot handed over
/// after it; a sync save does all of it before returning. (That the bytes are those of the
/// saved step is `async_and_sync_saves_of_a_step_write_identical_files`.)
#[test]
fn an_async_saves_copy_overlaps_the_next_step_and_is_handed_over_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run_with = |mode: bool| {
        let cfg = tmp.path().join(format!("job-{mode}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "name: overlap\nseed: 2\nthreads: 1\n\
                 model: {{kind: cnn, channels: [4], dropout: 0.0}}\n\
                 data: {{kind: synthetic-images, samples: 64, size: 8, classes: 3}}\n\
                 batch_size: 8\nmax_steps: 7\noptimizer: {{kind: adam, lr: 0.001}}\n\
                 checkpoint: {{every_steps: 3, keep_last: 5, async: {mode}}}\n"
            ),
        )
        .unwrap();
        let run = tmp.path().join(format!("run-{mode}"));
        let o = train_cmd(&cfg, &run)
            .env("HPC_CKPT_LOG", "debug")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        (String::from_utf8_lossy(&o.stderr).into_owned(), run)
    };
    let (log, run) = run_with(true);
    let at = |needle: &str, step: u64| {
        log.lines()
            .position(|l| {
                l.contains(needle) && l.split(' ').any(|field| field == format!("step={step}"))
            })
            .unwrap_or_else(|| panic!("no {needle:?} for step {step} in:\n{log}"))
    };
    for step in [3, 6] {
        let started = at("state copy overlapping the next step", step);
        let fenced = at("state copied beside the training thread", step);
        let handed = at(HANDED_OVER, step);
        assert!(started < fenced && fenced < handed, "step {step}:\n{log}");
    }
    // The cnn's batchnorm statistics (updated by a train-mode forward) are copied at the save:
    // every checkpoint resumes (verify + reference loss) like the sync run's.
    let (sync_log, sync_run) = run_with(false);
    assert!(!sync_log.contains("state copy overlapping the next step"));
    let files = |run: &Path| -> Vec<Vec<(String, String)>> {
        RunDir::new(run)
            .list()
            .iter()
            .map(|l| {
                let m = read_manifest(&l.path).unwrap();
                m.files.into_iter().map(|f| (f.name, f.checksum)).collect()
            })
            .collect()
    };
    assert_eq!(files(&run), files(&sync_run));
}
