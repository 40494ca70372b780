//! Mixed precision in the built-in trainer (`precision: bf16 | fp16`).
//!
//! - Interrupted = straight, per precision: `hpc-ckpt train` stopped by SIGUSR1 (final commit),
//!   by SIGTERM (final commit) and SIGKILLed (no final commit, steps redone), then finished, ends
//!   with model, optimizer and (fp16) loss-scaler files byte-identical to an uninterrupted run of
//!   the same precision, and every step's loss (and loss scale) identical. The fp16 run starts
//!   from a scale that overflows float16, so the scaler skips steps and backs off, and grows
//!   again (`growth_interval: 8`): the metrics must show both.
//! - Scaler parity: our [`GradScaler`] against `torch.amp.GradScaler("cpu")` on the same scaled
//!   gradients (some inf/NaN), via `tests/python/scaler_parity.py`: the scale and the growth
//!   tracker after every update, the skip decisions and the final parameters, bit for bit.
//! - `precision` is a key that changes results: resuming with another one is refused (exit 7),
//!   and an invalid value is a config error naming the key (exit 7).
//! - `device: cuda` where no CUDA device is visible: refused with exit 7, naming the key.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use hpc_ckpt::train::amp::GradScaler;
use hpc_ckpt::train::config::{LossScaleConfig, Pos};
use hpc_ckpt::train::ffi;
use hpc_ckpt::train::optim::{Optimizer, OptimizerConfig, SgdConfig};
use hpc_ckpt::train::tensors::{read_safetensors, to_tensor_data};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tch::Tensor;

const STEPS: u64 = 240;

/// A small mlp with dropout, AdamW, a warmup schedule and clipping; `precision` and the rest as
/// given.
fn config(name: &str, precision_keys: &str) -> String {
    format!(
        "name: {name}\nseed: 5\nthreads: 1\n{precision_keys}\
         model: {{kind: mlp, hidden: [256, 256], dropout: 0.1}}\n\
         data: {{kind: synthetic, samples: 4096, features: 64, classes: 10}}\n\
         batch_size: 64\nmax_steps: {STEPS}\ngrad_clip: 1.0\n\
         optimizer: {{kind: adamw, lr: 0.003}}\nscheduler: {{kind: cosine, warmup_steps: 20}}\n\
         checkpoint: {{every_steps: 20, keep_last: 2}}\n"
    )
}

/// fp16 from a scale of 1e9: the first backward passes overflow float16, so steps are skipped
/// and the scale backs off; every 8 finite steps it doubles again.
const FP16: &str = "precision: fp16\nloss_scale: {init_scale: 1.0e9, growth_interval: 8}\n";
const BF16: &str = "precision: bf16\n";

fn train(cfg: &Path, run: &Path) -> Command {
    let mut c = train_cmd(cfg, run);
    c.stderr(std::process::Stdio::null());
    c
}

fn commits(run: &Path) -> usize {
    commit_events(run).len()
}

/// Wait until `run` holds `n` commits while the training still runs.
fn wait_for_commits(run: &Path, child: &mut std::process::Child, n: usize, what: &str) {
    let t = Instant::now();
    while commits(run) < n {
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "{what}: training finished before the signal"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// step → the bits of each logged value of `key` in `run`'s metrics.jsonl, in file order.
fn metric(run: &Path, key: &str) -> BTreeMap<u64, Vec<u64>> {
    let mut m: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(s), Some(x)) = (v["step"].as_u64(), v["metrics"][key].as_f64()) {
            m.entry(s).or_default().push(x.to_bits());
        }
    }
    m
}

/// Straight run vs. one stopped by USR1, by TERM, and SIGKILLed, then finished.
/// Returns the temp dir (alive while the caller looks) and the straight run.
fn interrupted_equals_straight(
    name: &str,
    precision_keys: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let cfg = tmp.join("job.yaml");
    std::fs::write(&cfg, config(name, precision_keys)).unwrap();
    let straight = tmp.join("straight");
    assert_eq!(train(&cfg, &straight).status().unwrap().code(), Some(0));

    let run = tmp.join("interrupted");
    for (round, signal) in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGKILL]
        .into_iter()
        .enumerate()
    {
        let before = commits(&run);
        let mut child = train(&cfg, &run).spawn().unwrap();
        let what = format!("{name} round {round} ({signal})");
        // After a kill, one more commit so that the kill loses steps past it.
        let wait = if signal == Signal::SIGKILL { 2 } else { 1 };
        wait_for_commits(&run, &mut child, before + wait, &what);
        std::thread::sleep(Duration::from_millis(30));
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let st = child.wait().unwrap();
        // USR1: a warning, final commit, work left (outside Slurm: 11, run again to resume);
        // TERM: a cancel, final commit, not requeued (12); SIGKILL: no exit code at all.
        let want = match signal {
            Signal::SIGUSR1 => Some(11),
            Signal::SIGTERM => Some(12),
            _ => None,
        };
        assert_eq!(st.code(), want, "{what}");
    }
    assert_eq!(train(&cfg, &run).status().unwrap().code(), Some(0));

    let last = straight.join("checkpoints").join(ckpt(STEPS));
    let mut files = vec!["model.safetensors", "optimizer.safetensors"];
    if last.join("scaler.safetensors").exists() {
        files.push("scaler.safetensors");
    }
    for f in files {
        let a = std::fs::read(last.join(f)).unwrap();
        let b = std::fs::read(run.join("checkpoints").join(ckpt(STEPS)).join(f)).unwrap();
        assert!(a == b, "{name}: {f} differs after USR1, TERM and SIGKILL");
    }
    for key in ["loss", "loss_scale", "skipped_steps"] {
        let (s, i) = (metric(&straight, key), metric(&run, key));
        for (step, seen) in &i {
            for bits in seen {
                assert_eq!(
                    Some(bits),
                    s[step].first(),
                    "{name}: {key} of step {step} differs"
                );
            }
        }
    }
    let lost: usize = losses(&run).values().map(|v| v.len() - 1).sum();
    assert!(
        lost > 0,
        "{name}: the SIGKILL should have cost redone steps"
    );
    (dir, straight)
}

#[test]
fn bf16_resumes_byte_identical_after_usr1_term_and_sigkill() {
    let (_tmp, straight) = interrupted_equals_straight("bf16", BF16);
    let state = std::fs::read_to_string(
        straight
            .join("checkpoints")
            .join(ckpt(STEPS))
            .join("trainer_state.json"),
    )
    .unwrap();
    let st: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(st["config"]["precision"], "bf16");
    assert!(st.get("scaler").is_none(), "bf16 has no loss scaler");
    assert!(!straight
        .join("checkpoints")
        .join(ckpt(STEPS))
        .join("scaler.safetensors")
        .exists());
    // Weights stay float32 under autocast.
    let bytes = std::fs::read(
        straight
            .join("checkpoints")
            .join(ckpt(STEPS))
            .join("model.safetensors"),
    )
    .unwrap();
    for (n, t) in read_safetensors("model", &bytes).unwrap() {
        assert_eq!(t.kind(), tch::Kind::Float, "{n}");
    }
}

#[test]
fn fp16_with_skipped_steps_resumes_byte_identical_after_usr1_term_and_sigkill() {
    let (_tmp, straight) = interrupted_equals_straight("fp16", FP16);
    // The scaler skipped steps and backed off from 1e9, and grew again.
    // The scale before step 1, then the scale after each step.
    let scales: Vec<f64> = std::iter::once(1.0e9)
        .chain(
            metric(&straight, "loss_scale")
                .values()
                .map(|v| f64::from_bits(v[0])),
        )
        .collect();
    let skipped = metric(&straight, "skipped_steps");
    let total_skipped = f64::from_bits(skipped[&STEPS][0]);
    assert!(total_skipped >= 10.0, "skipped {total_skipped}");
    assert_eq!(scales[1], 0.5e9, "backed off at step 1");
    assert!(
        scales.windows(2).any(|w| w[1] == 2.0 * w[0]),
        "the scale never grew"
    );
    assert!(
        scales.windows(2).filter(|w| w[1] == 0.5 * w[0]).count() as f64 == total_skipped,
        "every skip halves the scale, and nothing else does"
    );
    let dir = straight.join("checkpoints").join(ckpt(STEPS));
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(st["scaler"]["skipped_steps"].as_f64(), Some(total_skipped));
    let scaler: BTreeMap<String, Tensor> = read_safetensors(
        "scaler",
        &std::fs::read(dir.join("scaler.safetensors")).unwrap(),
    )
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(scaler["scale"].kind(), tch::Kind::Float);
    assert_eq!(scaler["growth_tracker"].kind(), tch::Kind::Int);
    assert_eq!(
        scaler["scale"].double_value(&[]),
        st["scaler"]["scale"].as_f64().unwrap()
    );
}

/// The configs both sides run, by id: (scaler config, SGD lr).
fn scaler_configs() -> BTreeMap<&'static str, (LossScaleConfig, f64)> {
    BTreeMap::from([
        (
            "default_ish",
            (
                LossScaleConfig {
                    init_scale: 1000.0, // not a power of two: 1/scale rounds
                    growth_factor: 2.0,
                    backoff_factor: 0.5,
                    growth_interval: Pos(3),
                },
                0.1,
            ),
        ),
        (
            "odd",
            (
                LossScaleConfig {
                    init_scale: 65536.0,
                    growth_factor: 3.0,
                    backoff_factor: 0.25,
                    growth_interval: Pos(2),
                },
                0.05,
            ),
        ),
    ])
}

#[test]
fn scaler_matches_torch_grad_scaler() {
    tch::set_num_threads(1);
    let tmp = tempfile::Builder::new()
        .prefix("scaler_parity-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let dir = tmp.path();
    let cfg: serde_json::Map<String, serde_json::Value> = scaler_configs()
        .iter()
        .map(|(id, (c, lr))| {
            let v = serde_json::json!({"init_scale": c.init_scale, "growth_factor": c.growth_factor,
                "backoff_factor": c.backoff_factor, "growth_interval": c.growth_interval.0, "lr": lr});
            (id.to_string(), v)
        })
        .collect();
    std::fs::write(dir.join("configs.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = Command::new(python())
        .arg(repo().join("tests/python/scaler_parity.py"))
        .arg(dir.join("configs.json"))
        .arg(dir)
        .output()
        .expect("run tests/python/scaler_parity.py");
    assert!(
        out.status.success(),
        "scaler_parity.py failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| -> BTreeMap<String, Tensor> {
        read_safetensors(f, &std::fs::read(dir.join(f)).unwrap())
            .unwrap()
            .into_iter()
            .collect()
    };
    let (init, grads) = (read("init.safetensors"), read("grads.safetensors"));
    let names = ["enc.weight", "enc.bias", "head.weight"];
    for (id, (c, lr)) in scaler_configs() {
        let theirs = read(&format!("{id}.safetensors"));
        let steps = theirs["scale"].numel();
        let mut params: Vec<(String, Tensor)> = names
            .iter()
            .map(|n| (n.to_string(), init[*n].copy().set_requires_grad(true)))
            .collect();
        let shallow = params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let sgd = OptimizerConfig::Sgd(SgdConfig {
            lr,
            ..SgdConfig::default()
        });
        let mut opt = Optimizer::new(sgd, shallow).unwrap();
        let mut scaler = GradScaler::new(c, tch::Device::Cpu);
        let (mut scales, mut trackers, mut found) = (vec![], vec![], vec![]);
        for k in 0..steps {
            for (n, p) in params.iter_mut() {
                let g = grads[&format!("{k}.{n}")].copy();
                ffi::set_grad(p, Some(&g)).unwrap();
            }
            let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
            let found_inf = scaler.unscale(&tensors).unwrap();
            let skip = scaler.should_skip(&found_inf);
            if !skip {
                opt.step(lr).unwrap();
            }
            scaler.update(&found_inf).unwrap();
            scales.push(scaler.scale() as f32);
            trackers.push(scaler.growth_tracker() as i32);
            found.push(if skip { 1.0f32 } else { 0.0 });
        }
        let ours: BTreeMap<String, Tensor> = [
            ("scale".to_string(), Tensor::from_slice(&scales)),
            ("growth_tracker".to_string(), Tensor::from_slice(&trackers)),
            ("found_inf".to_string(), Tensor::from_slice(&found)),
        ]
        .into_iter()
        .chain(
            params
                .iter()
                .map(|(n, p)| (format!("param.{n}"), p.detach().copy())),
        )
        .collect();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{id}"
        );
        assert!(scaler.skipped_steps() >= 5, "{id}: the inf/NaN steps skip");
        for (name, x) in &ours {
            let (a, b) = (
                to_tensor_data(name, x).unwrap(),
                to_tensor_data(name, &theirs[name]).unwrap(),
            );
            assert_eq!(
                (a.dtype, &a.shape),
                (b.dtype, &b.shape),
                "{id}: {name} dtype/shape"
            );
            assert!(
                a.bytes == b.bytes,
                "{id}: {name} differs from torch.amp.GradScaler's:\nours   {x}\ntorch's {}",
                theirs[name]
            );
        }
    }
}

#[test]
fn changing_precision_is_refused_on_resume_and_bad_values_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = tmp.path().join("job.yaml");
    let short = |keys: &str| config("switch", keys).replace("max_steps: 240", "max_steps: 20");
    std::fs::write(&cfg, short("")).unwrap();
    assert_eq!(train(&cfg, &run).status().unwrap().code(), Some(0));
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            run.join("checkpoints")
                .join(ckpt(20))
                .join("trainer_state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // fp32 writes the state as before the key existed (older checkpoints read the same).
    for key in ["scaler", "cuda"] {
        assert!(st.get(key).is_none(), "fp32 state has no {key}");
    }
    assert!(st["config"].get("precision").is_none());
    assert!(st["rng"].get("cuda_states").is_none());

    for keys in [BF16, FP16] {
        std::fs::write(&cfg, short(keys).replace("max_steps: 20", "max_steps: 40")).unwrap();
        let o = train(&cfg, &run)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(7), "{keys}: {}", text(&o));
        let want = format!("precision: null → \"{}\"", &keys[11..15]);
        assert!(
            text(&o).contains(&want),
            "{keys}: want {want:?} in {}",
            text(&o)
        );
    }
    std::fs::write(&cfg, short("precision: fp8\n")).unwrap();
    let o = train(&cfg, &run)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        text(&o).contains("precision: unknown precision \"fp8\"; accepted: fp32, bf16, fp16"),
        "{}",
        text(&o)
    );
}

#[test]
fn cuda_without_a_visible_device_is_refused_with_exit_7() {
    if tch::Cuda::is_available() {
        eprintln!("a CUDA device is visible here: nothing to refuse");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("job.yaml");
    std::fs::write(&cfg, format!("{}device: cuda\n", config("cuda", BF16))).unwrap();
    let run = tmp.path().join("run");
    let o = train(&cfg, &run)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("device: cuda was asked for, but no CUDA device is visible"),
        "{msg}"
    );
    assert!(msg.contains("job.yaml"), "names the file: {msg}");
    assert!(
        !run.join("checkpoints").exists(),
        "nothing ran before the refusal"
    );
}
