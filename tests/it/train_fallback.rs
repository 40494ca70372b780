//! A checkpoint that verifies but does not restore is refused like one that does not verify
//! (issue 7, defect 4): the built-in trainer journals `checkpoint_refused` naming the file and the
//! reason, falls back to the next older checkpoint that verifies and restores, and ends
//! byte-identical to a run that never saw the damaged checkpoint. Only when none restores does it
//! fail, naming each checkpoint it tried.
//!
//! Every damaged checkpoint is a copy of one a real `hpc-ckpt train` run made, changed, then
//! committed with `hpc-ckpt commit` (so its checksums are valid). `hpc-ckpt commit` does not carry
//! the trainer's manifest `extra` (the reference loss), so the test copies it into the new
//! manifest (MANIFEST.json is not among the files it checksums); otherwise every case would be
//! refused for the missing reference loss instead of its own damage.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::journal_events as events;
use crate::common::*;
use serde_json::Value;
use tch::{Kind, Tensor};

const CONFIG: &str = "name: fallback\nseed: 5\nthreads: 1\n\
    model: {kind: mlp, hidden: [16], dropout: 0.1}\n\
    data: {kind: synthetic, samples: 400, features: 8, classes: 3}\n\
    batch_size: 16\nmax_steps: 30\noptimizer: {kind: adam, lr: 0.01}\n\
    checkpoint: {every_steps: 10, keep_last: 5}\n";

const FINAL: [&str; 3] = [
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
];

/// `hpc-ckpt train` of [`CONFIG`] into `run`, with its output.
fn train(cfg: &Path, run: &Path) -> Output {
    cmd(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ])
    .env_remove("SLURM_JOB_ID")
    .output()
    .expect("run hpc-ckpt train")
}

fn ckpt_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(ckpt(step))
}

/// A copy of a committed checkpoint's files, without its manifest (to change and commit).
fn files_of(run: &Path, step: u64, to: &Path) {
    copy_tree(&ckpt_dir(run, step), to);
    std::fs::remove_file(to.join("MANIFEST.json")).unwrap();
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("MANIFEST.json")).unwrap()).unwrap()
}

/// Commit `src` as `step` of `run` with `hpc-ckpt commit`, then give it the original
/// checkpoint's manifest `extra` (the reference loss), which `commit` does not record.
fn commit_damaged(run: &Path, step: u64, src: &Path, original: &Path) {
    commit_ok(run, step, src, &[]);
    let dir = ckpt_dir(run, step);
    let mut m = manifest(&dir);
    m["extra"] = manifest(original)["extra"].clone();
    std::fs::write(dir.join("MANIFEST.json"), serde_json::to_vec(&m).unwrap()).unwrap();
}

/// Rewrite one safetensors file of `src` through `f` (which may change, add or drop tensors).
fn edit_tensors(src: &Path, file: &str, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = src.join(file);
    let mut ts = Tensor::read_safetensors(&path).unwrap();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    f(&mut ts);
    Tensor::write_safetensors(&ts, &path).unwrap();
}

/// Rewrite `trainer_state.json` of `src` through `f`.
fn edit_state(src: &Path, f: impl FnOnce(&mut Value)) {
    let path = src.join("trainer_state.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// One kind of damage: its name, the file the refusal must name, a word of the reason.
struct Damage {
    name: &'static str,
    file: &'static str,
    reason: &'static str,
    apply: fn(&Path),
}

fn damages() -> Vec<Damage> {
    vec![
        Damage {
            name: "tensor of the wrong shape",
            file: "model.safetensors",
            reason: "the model's is",
            apply: |s| {
                edit_tensors(s, "model.safetensors", |ts| {
                    let t = &ts[0].1;
                    ts[0].1 = t.narrow(0, 0, t.size()[0] - 1).contiguous();
                })
            },
        },
        Damage {
            name: "tensor of the wrong dtype",
            file: "model.safetensors",
            reason: "Double",
            apply: |s| {
                edit_tensors(s, "model.safetensors", |ts| {
                    ts[0].1 = ts[0].1.to_kind(Kind::Double)
                })
            },
        },
        Damage {
            name: "missing optimizer tensor",
            file: "optimizer.safetensors",
            reason: "is missing",
            apply: |s| edit_tensors(s, "optimizer.safetensors", |ts| drop(ts.remove(0))),
        },
        Damage {
            name: "NaN weights",
            file: "model.safetensors",
            reason: "reference loss",
            apply: |s| {
                edit_tensors(s, "model.safetensors", |ts| {
                    ts[0].1 = ts[0].1.full_like(f64::NAN)
                })
            },
        },
        Damage {
            name: "state step disagrees with the manifest",
            file: "trainer_state.json",
            reason: "manifest",
            apply: |s| edit_state(s, |v| v["global_step"] = 19.into()),
        },
        Damage {
            name: "RNG state of the wrong size",
            file: "trainer_state.json",
            reason: "rng",
            apply: |s| {
                edit_state(s, |v| {
                    let hex = v["rng"]["cpu_state"].as_str().unwrap()[..200].to_owned();
                    v["rng"]["cpu_state"] = hex.into();
                })
            },
        },
        Damage {
            name: "data position past the epoch",
            file: "trainer_state.json",
            reason: "past the end",
            apply: |s| edit_state(s, |v| v["batch_in_epoch"] = 1000.into()),
        },
        Damage {
            name: "trainer_state.json is not JSON",
            file: "trainer_state.json",
            reason: "JSON",
            apply: |s| std::fs::write(s.join("trainer_state.json"), b"{ not json").unwrap(),
        },
    ]
}

/// The journal's events named `event`.

#[test]
fn unrestorable_checkpoint_falls_back_and_ends_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("job.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let straight = tmp.path().join("straight");
    let o = train(&cfg, &straight);
    assert_eq!(o.status.code(), Some(0), "straight run: {}", text(&o));

    for (i, d) in damages().into_iter().enumerate() {
        let run = tmp.path().join(format!("case{i}"));
        copy_tree(&ckpt_dir(&straight, 10), &ckpt_dir(&run, 10));
        let src = tmp.path().join(format!("src{i}"));
        files_of(&straight, 20, &src);
        (d.apply)(&src);
        commit_damaged(&run, 20, &src, &ckpt_dir(&straight, 20));

        let o = train(&cfg, &run);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(0), "[{}] {out}", d.name);
        for f in FINAL {
            let a = std::fs::read(ckpt_dir(&straight, 30).join(f)).unwrap();
            let b = std::fs::read(ckpt_dir(&run, 30).join(f)).unwrap();
            assert!(a == b, "[{}] {f} differs from the straight run's", d.name);
        }

        // The refusal names the checkpoint, the file and the reason, in the journal and the log.
        let refused = events(&run, "checkpoint_refused");
        assert_eq!(refused.len(), 1, "[{}] {refused:?}", d.name);
        assert_eq!(refused[0]["checkpoint"], ckpt(20), "[{}]", d.name);
        let fault = &refused[0]["faults"][0];
        let want_file = format!("{}/{}", ckpt(20), d.file);
        assert_eq!(fault["file"], want_file.as_str(), "[{}] {fault}", d.name);
        let reason = fault["reason"].as_str().unwrap();
        assert!(reason.contains(d.reason), "[{}] reason: {reason}", d.name);
        let dir = ckpt_dir(&run, 20).display().to_string();
        assert!(
            out.lines()
                .any(|l| l.contains("ERROR") && l.contains(&dir) && l.contains(d.file)),
            "[{}] no ERROR line naming {dir} and {}:\n{out}",
            d.name,
            d.file
        );
        // It fell back to step 10, and only that checkpoint was loaded.
        let fallback = events(&run, "fallback");
        assert_eq!(fallback.len(), 1, "[{}] {fallback:?}", d.name);
        assert_eq!(fallback[0]["checkpoint"], ckpt(10));
        assert_eq!(fallback[0]["step"], 10);
        let loaded = events(&run, "checkpoint_loaded");
        assert_eq!(loaded.len(), 1, "[{}] {loaded:?}", d.name);
        assert_eq!(loaded[0]["checkpoint"], ckpt(10));
    }
}

#[test]
fn nothing_restores_names_every_checkpoint_tried() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("job.yaml");
    std::fs::write(&cfg, CONFIG.replace("max_steps: 30", "max_steps: 20")).unwrap();
    let straight = tmp.path().join("straight");
    let o = train(&cfg, &straight);
    assert_eq!(o.status.code(), Some(0), "straight run: {}", text(&o));

    // Step 10 with a missing optimizer tensor, step 20 whose RNG state has the wrong size.
    let run = tmp.path().join("run");
    let ds = damages();
    for (step, d) in [(10, &ds[2]), (20, &ds[5])] {
        let src = tmp.path().join(format!("src{step}"));
        files_of(&straight, step, &src);
        (d.apply)(&src);
        commit_damaged(&run, step, &src, &ckpt_dir(&straight, step));
    }
    let o = train(&cfg, &run);
    let out = text(&o);
    // Exit 3, decision stop: retrying cannot help, so no requeue (not 11).
    assert_eq!(o.status.code(), Some(3), "{out}");
    let failure = out
        .lines()
        .find(|l| l.contains("no checkpoint") && l.contains("restores"))
        .unwrap_or_else(|| panic!("no failure message naming the checkpoints:\n{out}"));
    for (step, file) in [(20, "trainer_state.json"), (10, "optimizer.safetensors")] {
        let named = format!("{}/{file}", ckpt(step));
        assert!(failure.contains(&named), "{named} not in: {failure}");
    }
    let refused: Vec<Value> = events(&run, "checkpoint_refused")
        .into_iter()
        .map(|e| e["checkpoint"].clone())
        .collect();
    assert_eq!(refused, vec![Value::from(ckpt(20)), Value::from(ckpt(10))]);
    assert!(events(&run, "checkpoint_loaded").is_empty());
    // Nothing was trained or committed over the refused checkpoints.
    assert_eq!(events(&run, "checkpoint_committed").len(), 2);
}
