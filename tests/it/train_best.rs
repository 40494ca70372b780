//! `checkpoint.keep_best` with the built-in trainer (issue 7, defect 1): a checkpoint carries the
//! eval metric only when it was measured at that checkpoint's step; with `keep_best` the trainer
//! also commits at every eval step, so the checkpoint retention keeps as best holds the weights
//! that produced its value; `trainer_state.best` follows `keep_best.mode` and names that
//! checkpoint; a monitor the trainer never records is refused with its key path.

use std::collections::BTreeMap;
use std::path::Path;

use hpc_ckpt::config::JobConfig;
use hpc_ckpt::storage::pointer::{self, Pointer};
use hpc_ckpt::storage::retention::{Candidate, Role};
use hpc_ckpt::storage::run_dir::holder;
use hpc_ckpt::storage::verify::read_manifest;
use hpc_ckpt::storage::{RunDir, Store};
use hpc_ckpt::train::config::TrainConfig;
use hpc_ckpt::train::trainer::{run, Resume};

/// Eval every 15 steps, a checkpoint every 10: 15 and 45 are eval steps that are not
/// checkpoint steps, 50 (the end) is a checkpoint step with no eval.
fn body(mode: &str) -> String {
    format!(
        "name: t
seed: 7
model: {{kind: mlp, hidden: [16], dropout: 0.1}}
data: {{kind: synthetic, samples: 400, features: 8, classes: 3}}
batch_size: 16
max_steps: 50
optimizer: {{kind: adam, lr: 0.02}}
eval: {{every_steps: 15, batches: 2}}
checkpoint: {{every_steps: 10, keep_last: 2, keep_best: {{monitor: val_loss, mode: {mode}}}}}
"
    )
}

/// step → val_loss, as logged in metrics.jsonl.
fn evals(dir: &Path) -> BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v["metrics"]["val_loss"].as_f64()?))
        })
        .collect()
}

#[test]
fn the_best_checkpoint_holds_the_weights_its_metric_was_measured_on() {
    for mode in ["min", "max"] {
        let cfg = JobConfig::parse(&body(mode)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let policy = cfg.checkpoint.retention.clone();
        let mut store = Store::open(&dir, &holder(None), policy.clone()).unwrap();
        let out = run(&cfg, &mut store, &Resume::Auto, &|| false).unwrap();
        assert!(out.completed && out.last_step == 50, "{out:?}");
        drop(store);

        let logged = evals(&dir);
        assert_eq!(logged.keys().copied().collect::<Vec<_>>(), [15, 30, 45]);
        // No checkpoint carries an eval metric for a step where none was measured.
        let listed = RunDir::new(&dir).list();
        let mut cands = Vec::new();
        for l in &listed {
            let m = read_manifest(&l.path).unwrap();
            let v = m.metrics.get("val_loss").copied();
            if let Some(v) = v {
                assert_eq!(
                    logged.get(&l.step).map(|x| x.to_bits()),
                    Some(v.to_bits()),
                    "[{mode}] {} carries val_loss {v}, but metrics.jsonl logged {:?} at its step",
                    l.name,
                    logged.get(&l.step)
                );
            }
            cands.push(Candidate {
                name: l.name.clone(),
                step: l.step,
                metric: v,
            });
        }
        // The checkpoint retention keeps as best is an eval step's, holding that eval's value.
        let ptr = match pointer::read(&dir).unwrap() {
            Pointer::Names(n) => n,
            Pointer::Absent => panic!("no pointer"),
        };
        let roles = policy.roles(&cands, Some(&ptr));
        let best: Vec<&Candidate> = roles
            .iter()
            .filter(|(_, r)| r.contains(&Role::Best))
            .map(|(n, _)| cands.iter().find(|c| &c.name == n).unwrap())
            .collect();
        assert_eq!(best.len(), 1, "[{mode}] {roles:?}");
        let best = best[0];
        let want = logged
            .iter()
            .reduce(|a, b| {
                let better = if mode == "min" {
                    b.1 <= a.1
                } else {
                    b.1 >= a.1
                };
                if better {
                    b
                } else {
                    a
                }
            })
            .map(|(s, _)| *s)
            .unwrap();
        assert_eq!(best.step, want, "[{mode}] logged evals {logged:?}");
        // trainer_state.best of the final checkpoint agrees.
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                dir.join("checkpoints")
                    .join(&ptr)
                    .join("trainer_state.json"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            state["best"]["step"], best.step,
            "[{mode}] {}",
            state["best"]
        );
        assert_eq!(state["best"]["value"].as_f64(), best.metric);
    }
}

#[test]
fn a_monitor_the_trainer_never_records_is_refused() {
    let cases = [
        (
            body("max").replace("monitor: val_loss", "monitor: acc"),
            "acc",
        ),
        (
            body("min").replace("eval: {every_steps: 15, batches: 2}\n", ""),
            "val_loss",
        ),
    ];
    for (yaml, monitor) in cases {
        let e = TrainConfig::from_job(&JobConfig::parse(&yaml).unwrap())
            .expect_err(monitor)
            .to_string();
        assert!(
            e.starts_with("checkpoint.keep_best.monitor: ") && e.contains(monitor),
            "{e}"
        );
    }
    // The training loss is recorded in every checkpoint: accepted.
    let ok = body("min").replace("monitor: val_loss", "monitor: loss");
    TrainConfig::from_job(&JobConfig::parse(&ok).unwrap()).unwrap();
}
