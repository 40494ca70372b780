//! Our optimizers (`hpc_ckpt::train::optim`) against PyTorch's `torch.optim`, bit for bit.
//!
//! `tests/python/optim_parity.py` creates a small model's parameters from a fixed seed and 20
//! steps of gradients, runs torch.optim (foreach=False, one intra-op thread) for each config below
//! with a per-step learning rate, and saves the final parameters and `optimizer.state`. We run the
//! same configs from the same bytes and require 0 differing elements in every parameter and
//! every state tensor. Then save → load → continue: 10 steps, a real checkpoint through the store
//! (`optimizer.safetensors` + `optimizer.json`), a fresh model and optimizer loaded from it, 10
//! more steps: byte-identical to 20 straight steps.
//!
//! Needs the project venv with torch (`tests/setup.sh --torch`); `HPC_CKPT_PYTHON` overrides the
//! interpreter. The benchmark (`bench_step_10m_params`, ignored by default) prints timings:
//! `cargo test --test it optim_parity::bench_step_10m_params -- --ignored --nocapture` (the work is in libtorch, and the
//! dev profile already optimises dependencies, tch included: release changes little).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::common::{python, repo};
use hpc_ckpt::storage::run_dir::holder;
use hpc_ckpt::storage::{CommitMeta, FileSource, RetentionPolicy, Snapshot, Store};
use hpc_ckpt::train::ffi;
use hpc_ckpt::train::optim::{AdamConfig, Optimizer, OptimizerConfig, OptimizerMeta, SgdConfig};
use hpc_ckpt::train::tensors::{read_safetensors, to_tensor_data};
use tch::Tensor;

const STEPS: usize = 20;
const PARAMS: [&str; 4] = ["enc.weight", "enc.bias", "head.weight", "head.bias"];

/// The configs both sides run, by id.
fn configs() -> BTreeMap<&'static str, OptimizerConfig> {
    let sgd = |c| OptimizerConfig::Sgd(c);
    BTreeMap::from([
        (
            "sgd_plain",
            sgd(SgdConfig {
                lr: 0.05,
                ..SgdConfig::default()
            }),
        ),
        (
            "sgd_nesterov_wd",
            sgd(SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                dampening: 0.0,
                nesterov: true,
                weight_decay: 1e-2,
            }),
        ),
        (
            "sgd_momentum_dampening",
            sgd(SgdConfig {
                lr: 0.03,
                momentum: 0.8,
                dampening: 0.3,
                nesterov: false,
                weight_decay: 0.0,
            }),
        ),
        (
            "adam",
            OptimizerConfig::Adam(AdamConfig {
                lr: 1e-2,
                ..AdamConfig::default()
            }),
        ),
        (
            "adam_wd",
            OptimizerConfig::Adam(AdamConfig {
                lr: 1e-2,
                betas: (0.8, 0.99),
                eps: 1e-6,
                weight_decay: 0.05,
                amsgrad: false,
            }),
        ),
        (
            "adam_amsgrad",
            OptimizerConfig::Adam(AdamConfig {
                lr: 1e-2,
                amsgrad: true,
                ..AdamConfig::default()
            }),
        ),
        (
            "adamw",
            OptimizerConfig::AdamW(AdamConfig {
                lr: 1e-2,
                weight_decay: 0.1,
                ..AdamConfig::adamw()
            }),
        ),
    ])
}

/// A scheduler's per-step learning rates: linear decay from the base lr.
fn lrs(c: &OptimizerConfig) -> Vec<f64> {
    (0..STEPS)
        .map(|k| c.lr() * (1.0 - k as f64 / 40.0))
        .collect()
}

struct Reference {
    init: BTreeMap<String, Tensor>,
    grads: BTreeMap<String, Tensor>,
    /// torch.optim's results by config id: `param.<name>` and `state.<name>.<key>`.
    torch: BTreeMap<String, BTreeMap<String, Tensor>>,
}

/// Run the Python side once per test binary. (tch tensors are `Send` but not `Sync`, hence the
/// mutex.)
fn reference() -> MutexGuard<'static, Reference> {
    static REF: OnceLock<Mutex<Reference>> = OnceLock::new();
    REF.get_or_init(|| {
        let tmp = tempfile::Builder::new()
            .prefix("optim_parity-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let dir = tmp.path();
        let cfg: serde_json::Map<String, serde_json::Value> = configs()
            .iter()
            .map(|(id, c)| {
                (
                    id.to_string(),
                    serde_json::json!({"optimizer": c, "lrs": lrs(c)}),
                )
            })
            .collect();
        let cfg_path = dir.join("configs.json");
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let out = Command::new(python())
            .arg(repo().join("tests/python/optim_parity.py"))
            .arg("run")
            .arg(&cfg_path)
            .arg(dir)
            .output()
            .expect("run tests/python/optim_parity.py");
        assert!(
            out.status.success(),
            "optim_parity.py failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        let read = |f: &str| -> BTreeMap<String, Tensor> {
            read_safetensors(f, &std::fs::read(dir.join(f)).unwrap())
                .unwrap()
                .into_iter()
                .collect()
        };
        Mutex::new(Reference {
            init: read("init.safetensors"),
            grads: read("grads.safetensors"),
            torch: configs()
                .keys()
                .map(|id| (id.to_string(), read(&format!("{id}.safetensors"))))
                .collect(),
        })
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

/// Fresh leaf parameters with the given values, in `PARAMS` order.
fn params_from(values: &BTreeMap<String, Tensor>) -> Vec<(String, Tensor)> {
    PARAMS
        .iter()
        .map(|n| (n.to_string(), values[*n].copy().set_requires_grad(true)))
        .collect()
}

/// Steps `range` of the reference gradients, with the scheduled lrs.
fn run_steps(
    opt: &mut Optimizer,
    params: &mut [(String, Tensor)],
    grads: &BTreeMap<String, Tensor>,
    lrs: &[f64],
    range: std::ops::Range<usize>,
) {
    for k in range {
        for (name, p) in params.iter_mut() {
            let g = grads.get(&format!("{k}.{name}")).map(Tensor::copy);
            ffi::set_grad(p, g.as_ref()).unwrap();
        }
        opt.step(lrs[k]).unwrap();
    }
}

/// Final parameters (`param.<name>`) and state (`state.<name>.<key>`), as in the Python file.
fn result(opt: &Optimizer, params: &[(String, Tensor)]) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (n, p) in params {
        out.insert(format!("param.{n}"), p.detach().copy());
    }
    for (n, t) in opt.state_tensors() {
        out.insert(format!("state.{n}"), t.copy());
    }
    out
}

/// Every difference between two results: names, dtypes, shapes, and per tensor the number of
/// elements whose bytes differ.
fn differences(ours: &BTreeMap<String, Tensor>, theirs: &BTreeMap<String, Tensor>) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b): (Vec<_>, Vec<_>) = (ours.keys().collect(), theirs.keys().collect());
    if a != b {
        out.push(format!(
            "tensor names differ: ours {a:?}, torch.optim's {b:?}"
        ));
    }
    for (name, x) in ours {
        let Some(y) = theirs.get(name) else { continue };
        let (dx, dy) = (
            to_tensor_data(name, x).unwrap(),
            to_tensor_data(name, y).unwrap(),
        );
        if (dx.dtype, &dx.shape) != (dy.dtype, &dy.shape) {
            out.push(format!(
                "{name}: ours {:?} {:?}, torch.optim's {:?} {:?}",
                dx.dtype, dx.shape, dy.dtype, dy.shape
            ));
            continue;
        }
        let size = dx.dtype.size();
        let differing = dx
            .bytes
            .chunks(size)
            .zip(dy.bytes.chunks(size))
            .filter(|(p, q)| p != q)
            .count();
        if differing > 0 {
            let max_abs = (x - y).abs().max().double_value(&[]);
            out.push(format!(
                "{name}: {differing} of {} elements differ (max |diff| {max_abs:e})",
                dx.bytes.len() / size
            ));
        }
    }
    out
}

#[test]
fn twenty_steps_match_torch_optim_bit_for_bit() {
    tch::set_num_threads(1);
    let r = reference();
    let mut failures = Vec::new();
    for (id, cfg) in configs() {
        let mut params = params_from(&r.init);
        let mut opt = Optimizer::new(cfg.clone(), shallow(&params)).unwrap();
        run_steps(&mut opt, &mut params, &r.grads, &lrs(&cfg), 0..STEPS);
        let ours = result(&opt, &params);
        let theirs = &r.torch[id];
        assert!(
            theirs.len() > PARAMS.len() || id == "sgd_plain",
            "{id}: torch.optim saved no state"
        );
        let d = differences(&ours, theirs);
        let elements: i64 = ours.values().map(|t| t.numel() as i64).sum();
        eprintln!(
            "{id}: {} tensors, {elements} elements, {} differing tensors",
            ours.len(),
            d.len()
        );
        failures.extend(d.into_iter().map(|m| format!("{id}: {m}")));
    }
    assert!(failures.is_empty(), "differences:\n{}", failures.join("\n"));
}

fn shallow(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

/// Commit parameters and optimizer state as a checkpoint, the way the trainer will.
fn save(run: &Path, step: u64, opt: &Optimizer, params: &[(String, Tensor)]) {
    let mut store = Store::open(run, &holder(None), RetentionPolicy::default()).unwrap();
    let model = params
        .iter()
        .map(|(n, p)| to_tensor_data(n, p).unwrap())
        .collect();
    let state = opt
        .state_tensors()
        .iter()
        .map(|(n, t)| to_tensor_data(n, t).unwrap())
        .collect();
    let mut snap = Snapshot::new();
    snap.add(
        "model.safetensors",
        FileSource::Tensors {
            tensors: model,
            metadata: BTreeMap::new(),
        },
    )
    .add(
        "optimizer.safetensors",
        FileSource::Tensors {
            tensors: state,
            metadata: BTreeMap::new(),
        },
    )
    .add(
        "optimizer.json",
        FileSource::Bytes(serde_json::to_vec_pretty(&opt.meta()).unwrap().into()),
    );
    let meta = CommitMeta {
        step,
        ..CommitMeta::default()
    };
    store.commit(&snap, &meta).unwrap();
}

/// Load the latest checkpoint into a fresh model and optimizer.
fn load(run: &Path, cfg: &OptimizerConfig) -> (Optimizer, Vec<(String, Tensor)>) {
    let mut store = Store::open(run, &holder(None), RetentionPolicy::default()).unwrap();
    let loaded = store.load_latest().unwrap().expect("a checkpoint");
    let file = |n: &str| &loaded.files[n];
    let model: BTreeMap<String, Tensor> =
        read_safetensors("model.safetensors", file("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let params = params_from(&model);
    let meta: OptimizerMeta = serde_json::from_slice(file("optimizer.json")).unwrap();
    let state = read_safetensors("optimizer.safetensors", file("optimizer.safetensors")).unwrap();
    let mut opt = Optimizer::new(cfg.clone(), shallow(&params)).unwrap();
    opt.load_state(&meta, state).unwrap();
    (opt, params)
}

#[test]
fn save_load_continue_equals_straight_run() {
    tch::set_num_threads(1);
    let r = reference();
    let mut failures = Vec::new();
    for (id, cfg) in configs() {
        let lrs = lrs(&cfg);
        let mut params = params_from(&r.init);
        let mut opt = Optimizer::new(cfg.clone(), shallow(&params)).unwrap();
        run_steps(&mut opt, &mut params, &r.grads, &lrs, 0..STEPS);
        let straight = result(&opt, &params);

        let run = tempfile::tempdir().unwrap();
        let mut params = params_from(&r.init);
        let mut opt = Optimizer::new(cfg.clone(), shallow(&params)).unwrap();
        run_steps(&mut opt, &mut params, &r.grads, &lrs, 0..10);
        save(run.path(), 10, &opt, &params);
        drop((opt, params));
        let (mut opt, mut params) = load(run.path(), &cfg);
        run_steps(&mut opt, &mut params, &r.grads, &lrs, 10..STEPS);
        let resumed = result(&opt, &params);

        let d = differences(&resumed, &straight);
        eprintln!("{id}: resumed at step 10, {} differing tensors", d.len());
        failures.extend(d.into_iter().map(|m| format!("{id}: {m}")));
        // And still torch.optim's bytes.
        let d = differences(&resumed, &r.torch[id]);
        failures.extend(d.into_iter().map(|m| format!("{id} (vs torch.optim): {m}")));
    }
    assert!(failures.is_empty(), "differences:\n{}", failures.join("\n"));
}

/// Not a test: timings of our step vs torch.optim's on ~10M parameters (prints, asserts
/// nothing). `HPC_CKPT_BENCH_THREADS` sets the intra-op threads (default 1).
#[test]
#[ignore = "benchmark: cargo test --test it optim_parity::bench_step_10m_params -- --ignored --nocapture"]
fn bench_step_10m_params() {
    let threads: i32 = std::env::var("HPC_CKPT_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (n_params, steps) = (10_000_000usize, 15usize);
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let side = 1024i64;
    let n_mats = (n_params as i64 / (side * side + side)).max(1);
    let cfgs = [
        (
            "sgd_momentum",
            OptimizerConfig::Sgd(SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                ..SgdConfig::default()
            }),
        ),
        ("adam", OptimizerConfig::Adam(AdamConfig::default())),
        ("adamw", OptimizerConfig::AdamW(AdamConfig::adamw())),
    ];
    for (name, cfg) in cfgs {
        let mut params = Vec::new();
        for i in 0..n_mats {
            for (j, shape) in [vec![side, side], vec![side]].into_iter().enumerate() {
                let mut p = Tensor::randn(&shape, (tch::Kind::Float, tch::Device::Cpu))
                    .set_requires_grad(true);
                let g = Tensor::randn(&shape, (tch::Kind::Float, tch::Device::Cpu));
                ffi::set_grad(&mut p, Some(&g)).unwrap();
                params.push((format!("p{i}.{j}"), p));
            }
        }
        let total: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        let mut opt = Optimizer::new(cfg.clone(), shallow(&params)).unwrap();
        opt.step(cfg.lr()).unwrap(); // state initialisation outside the timing
        let mut times: Vec<f64> = (0..steps)
            .map(|_| {
                let t0 = Instant::now();
                opt.step(cfg.lr()).unwrap();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{{\"optimizer\": \"hpc-ckpt {name}\", \"params\": {total}, \"threads\": {threads}, \
             \"median_ms\": {:.2}, \"min_ms\": {:.2}}}",
            1000.0 * times[steps / 2],
            1000.0 * times[0]
        );
    }
    let out = Command::new(python())
        .arg(repo().join("tests/python/optim_parity.py"))
        .args([
            "bench",
            &n_params.to_string(),
            &steps.to_string(),
            &threads.to_string(),
        ])
        .output()
        .expect("run the Python benchmark");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}
