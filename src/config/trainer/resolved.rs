//! The built-in trainer's config, resolved: [`TrainConfig::from_job`] fills the defaults of the
//! trainer keys a [`JobConfig`] parsed (typed and checked there, once), and runs the checks the
//! built-in trainer needs across keys: `model` and a length are given, the data feeds the model
//! and its files exist, eval has held-out data, `keep_best` monitors a metric the trainer
//! records. [`TrainConfig::hashed`] is the canonical JSON of every key that changes the numbers a
//! run produces (all but the safe keys `max_steps`, `epochs`, `eval.every_steps`, `threads` and
//! the `checkpoint` policy), which a checkpoint records to refuse resuming a different job.

use serde::Serialize;

use super::data::DataConfig;
use super::model::ModelConfig;
use super::optim::{AdamConfig, OptimizerConfig};
use super::run::{DeviceChoice, EvalConfig, LossScaleConfig, Precision};
use super::sched::SchedulerConfig;
use super::value::err;
use crate::config::{
    CheckpointConfig, ConfigError, Interval, JobConfig, OnSaveError, DEFAULT_MTBF_SECONDS,
};
use crate::storage::retention::Best;

/// The validated trainer config.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub seed: u64,
    pub device: DeviceChoice,
    pub threads: u32,
    pub deterministic: bool,
    pub precision: Precision,
    /// The loss scaler's settings (used with `precision: fp16` only).
    pub loss_scale: LossScaleConfig,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub batch_size: u64,
    pub epochs: Option<u64>,
    pub max_steps: Option<u64>,
    pub grad_accum: u64,
    pub grad_clip: Option<f64>,
    pub optimizer: OptimizerConfig,
    pub scheduler: SchedulerConfig,
    pub eval: Option<EvalConfig>,
    /// From `checkpoint.every_steps` / `checkpoint.every_seconds`.
    pub checkpoint_every_steps: Option<u64>,
    pub checkpoint_every_seconds: Option<u64>,
    /// `checkpoint.on_save_error: stop`.
    pub stop_on_save_error: bool,
    /// `checkpoint.async`: two-phase saves, persisted in the background.
    pub checkpoint_async: bool,
    /// `checkpoint.interval: auto`: the prior MTBF in seconds (`checkpoint.mtbf`).
    pub checkpoint_auto_mtbf: Option<f64>,
    /// `checkpoint.keep_best`, its monitor checked to be a metric the trainer records
    /// (`check_monitor`).
    pub keep_best: Option<Best>,
}

/// `checkpoint.keep_best.monitor` must be a metric the trainer records in the checkpoints it
/// could keep: the eval metric (recorded in the checkpoint of each eval step) or `loss` (the
/// training loss of the checkpoint's own step). `lr` is recorded too but is the schedule's value,
/// not a measure of the model: refused.
fn check_monitor(monitor: &str, eval: Option<&EvalConfig>) -> Result<(), ConfigError> {
    const KEY: &str = "checkpoint.keep_best.monitor";
    match eval {
        _ if monitor == "loss" => Ok(()),
        Some(e) if monitor == e.metric => Ok(()),
        Some(e) => Err(err(
            KEY,
            format!(
                "the built-in trainer never records {monitor:?}; accepted: {} (the eval metric, \
                 measured every eval.every_steps) or loss (the training loss of the checkpoint's \
                 step)",
                e.metric
            ),
        )),
        None if monitor == EvalConfig::DEFAULT_METRIC => Err(err(
            KEY,
            format!(
                "{monitor} is measured only with eval; add eval: {{every_steps: N}}, or monitor \
                 loss (the training loss of the checkpoint's step)"
            ),
        )),
        None => Err(err(
            KEY,
            format!(
                "the built-in trainer never records {monitor:?}; accepted: loss (the training \
                 loss of the checkpoint's step), or {} with eval: {{every_steps: N}}",
                EvalConfig::DEFAULT_METRIC
            ),
        )),
    }
}

/// `eval` needs held-out samples in `data` to compute its metric.
fn check_eval_data(eval: Option<&EvalConfig>, data: &DataConfig) -> Result<(), ConfigError> {
    if eval.is_some() && data.val_fraction() == 0.0 {
        return Err(err(
            "data.val_fraction",
            "is 0, but eval needs held-out samples; accepted: a fraction in (0, 0.9)",
        ));
    }
    Ok(())
}

/// Why `batch_size` does not fit `world` ranks, if it does not.
pub fn world_fits(batch_size: u64, world: u32) -> Result<(), ConfigError> {
    if world > 1 && !batch_size.is_multiple_of(world as u64) {
        return Err(err(
            "batch_size",
            format!(
                "{batch_size} samples cannot be shared equally by {world} ranks (batch_size is \
                 the global batch; each rank computes batch_size / world_size of it): use a \
                 multiple of {world}"
            ),
        ));
    }
    Ok(())
}

/// `epochs` and `max_steps`: at least one of them given.
fn check_length(epochs: Option<u64>, max_steps: Option<u64>) -> Result<(), ConfigError> {
    if epochs.is_none() && max_steps.is_none() {
        return Err(err(
            "max_steps",
            "missing: give max_steps (optimizer steps) or epochs (passes over the data), or both",
        ));
    }
    Ok(())
}

/// The data the trainer reads: `data`, checked against the model and for its files, else the
/// model's default (generated or embedded).
fn resolve_data(data: Option<&DataConfig>, model: &ModelConfig) -> Result<DataConfig, ConfigError> {
    let Some(d) = data else {
        return Ok(DataConfig::default_for(model));
    };
    d.check_feeds(model)?;
    d.check_files()?;
    Ok(d.clone())
}

/// The keys that read the eval metric (`checkpoint.keep_best`'s monitor, the plateau
/// scheduler) need an `eval` that records it.
fn check_needs_eval(
    scheduler: &SchedulerConfig,
    keep_best: Option<&Best>,
    eval: Option<&EvalConfig>,
) -> Result<(), ConfigError> {
    if let Some(b) = keep_best {
        check_monitor(&b.monitor, eval)?;
    }
    if matches!(scheduler, SchedulerConfig::Plateau(_)) && eval.is_none() {
        return Err(err(
            "scheduler.kind",
            "plateau reduces the lr on the eval metric; add eval: {every_steps: N}",
        ));
    }
    Ok(())
}

/// `checkpoint.interval: auto`: the prior MTBF (`checkpoint.mtbf`, validated with the job).
fn auto_mtbf(ck: &CheckpointConfig) -> Option<f64> {
    (ck.interval == Some(Interval::Auto)).then(|| ck.mtbf_seconds().unwrap_or(DEFAULT_MTBF_SECONDS))
}

impl TrainConfig {
    /// The built-in trainer's config of `job`: its trainer keys (typed and checked by the parse)
    /// with their defaults, and the checks across keys the trainer needs.
    pub fn from_job(job: &JobConfig) -> Result<TrainConfig, ConfigError> {
        let t = &job.trainer;
        let precision = t.precision.unwrap_or_default();
        let loss_scale = LossScaleConfig::resolve(t.loss_scale, precision)?;
        let model = t.model.clone().ok_or_else(|| {
            err(
                "model",
                format!("missing; accepted: {}", ModelConfig::ACCEPTED),
            )
        })?;
        let data = resolve_data(t.data.as_ref(), &model)?;
        check_length(t.epochs, t.max_steps)?;
        check_eval_data(t.eval.as_ref(), &data)?;
        let scheduler = t.scheduler.clone().unwrap_or_default();
        let keep_best = job.checkpoint.retention.keep_best.clone();
        check_needs_eval(&scheduler, keep_best.as_ref(), t.eval.as_ref())?;
        Ok(TrainConfig {
            seed: t.seed.unwrap_or(0),
            device: t.device.unwrap_or(DeviceChoice::Cpu),
            threads: t.threads.unwrap_or(1),
            deterministic: t.deterministic.unwrap_or(true),
            precision,
            loss_scale,
            model,
            data,
            batch_size: t.batch_size.unwrap_or(32),
            epochs: t.epochs,
            max_steps: t.max_steps,
            grad_accum: t.grad_accum.unwrap_or(1),
            grad_clip: t.grad_clip,
            optimizer: t
                .optimizer
                .clone()
                .unwrap_or_else(|| OptimizerConfig::Adam(AdamConfig::default())),
            scheduler,
            eval: t.eval.clone(),
            checkpoint_every_steps: job.checkpoint.every_steps,
            checkpoint_every_seconds: job.checkpoint.every_seconds,
            stop_on_save_error: job.checkpoint.on_save_error == OnSaveError::Stop,
            checkpoint_async: job.checkpoint.async_saves,
            checkpoint_auto_mtbf: auto_mtbf(&job.checkpoint),
            keep_best,
        })
    }

    /// Whether `keep_best` monitors the eval metric, so that every eval step must be committed
    /// (the value belongs to the weights of that step).
    pub fn commits_at_eval(&self) -> bool {
        match (&self.keep_best, &self.eval) {
            (Some(b), Some(e)) => b.monitor == e.metric,
            _ => false,
        }
    }

    /// The keys that change what a run computes, as canonical JSON (sorted keys). Safe to change
    /// on resume, hence left out: `max_steps`, `epochs`, `eval.every_steps`, `threads` (checked
    /// on its own), the `checkpoint` policy and the job-level sections. `precision` appears only
    /// when it is not fp32 (and `loss_scale` only with fp16), so that checkpoints written before
    /// the key existed keep their hash and still resume.
    pub fn hashed(&self) -> serde_json::Value {
        let mut v = self.hashed_fp32();
        if let (Some(m), true) = (v.as_object_mut(), self.precision != Precision::Fp32) {
            m.insert("precision".into(), self.precision.name().into());
            if self.precision == Precision::Fp16 {
                m.insert("loss_scale".into(), to_json(&self.loss_scale));
            }
        }
        v
    }

    fn hashed_fp32(&self) -> serde_json::Value {
        serde_json::json!({
            "seed": self.seed,
            "device": to_json(&self.device),
            "deterministic": self.deterministic,
            "model": to_json(&self.model),
            "data": to_json(&self.data),
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "grad_clip": self.grad_clip,
            "optimizer": to_json(&self.optimizer),
            "scheduler": to_json(&self.scheduler),
            "eval": self.eval.as_ref().map(|e| serde_json::json!({"batches": e.batches.0, "metric": e.metric})),
        })
    }

    /// xxh3-128 of [`Self::hashed`], hex.
    pub fn hash(&self) -> String {
        let text = self.hashed().to_string();
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
    }
}

/// Serialize to a JSON value (our own config types cannot fail to serialize: no maps with
/// non-string keys).
fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// The leaf keys where two [`TrainConfig::hashed`] values differ: `model.dropout: 0.1 → 0.2`.
pub fn changed_keys(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value as J;
        match (a, b) {
            (J::Object(x), J::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let null = J::Null;
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: {a} → {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::trainer::Pos;
    use std::collections::BTreeSet;

    fn parse(extra: &str) -> Result<TrainConfig, String> {
        let job = JobConfig::parse(&format!("name: t\n{extra}")).map_err(|e| e.to_string())?;
        TrainConfig::from_job(&job).map_err(|e| e.to_string())
    }

    const MLP: &str = "model: {kind: mlp, hidden: [8]}\nmax_steps: 5\n";

    #[test]
    fn defaults() {
        let c = parse(MLP).unwrap();
        assert_eq!(
            (c.seed, c.threads, c.deterministic, c.grad_accum),
            (0, 1, true, 1)
        );
        assert_eq!(c.device, DeviceChoice::Cpu);
        assert_eq!(c.data.kind(), "synthetic");
        assert_eq!(c.scheduler.kind(), "constant");
        let c = parse("model: {kind: gpt, layers: 1, heads: 2, d_model: 8, context: 8}\nepochs: 1\noptimizer: {kind: adamw}\n").unwrap();
        assert_eq!(c.data.kind(), "text");
        assert!(matches!(c.optimizer, OptimizerConfig::AdamW(ref a) if a.weight_decay == 1e-2));
    }

    #[test]
    fn errors_name_the_key_path() {
        let cases = [
            ("model: {kind: mlp, hidden: [8, -3]}\nmax_steps: 5\n", "model.hidden[1]: "),
            ("model: {kind: mlp, hidden: [8, 0]}\nmax_steps: 5\n", "positive integer"),
            ("model: {kind: mlp, hiden: [8]}\nmax_steps: 5\n", "model.hiden: unknown field `hiden`, expected `hidden` or `dropout`"),
            ("model: {kind: rnn}\nmax_steps: 5\n", "model.kind: unknown kind \"rnn\"; accepted: mlp, cnn, gpt"),
            ("model: {kind: mlp, hidden: [8], dropout: 1.5}\nmax_steps: 5\n", "model.dropout"),
            ("model: {kind: gpt, layers: 1, heads: 3, d_model: 8, context: 8}\nmax_steps: 5\n", "model.d_model"),
            (&format!("{MLP}batch_size: 0\n"), "batch_size: expected a positive integer, found 0"),
            (&format!("{MLP}data: {{kind: text}}\n"), "data.kind: text data cannot feed a mlp model"),
            ("model: {kind: gpt, layers: 1, heads: 1, d_model: 8, context: 8}\nmax_steps: 5\ndata: {kind: text, path: /nonexistent/x.txt}\n", "data.path: cannot read /nonexistent/x.txt"),
            (&format!("{MLP}optimizer: {{kind: adam, lr: fast}}\n"), "optimizer.lr: invalid type"),
            (&format!("{MLP}optimizer: {{kind: adam, betas: [0.9, 1.5]}}\n"), "optimizer: "),
            (&format!("{MLP}scheduler: {{kind: step}}\n"), "scheduler: missing field `step_size`"),
            (&format!("{MLP}scheduler: {{kind: plateau}}\n"), "scheduler.kind: plateau"),
            (&format!("{MLP}eval: {{every_steps: 5, metric: acc}}\n"), "eval.metric"),
            (&format!("{MLP}device: tpu\n"), "device: unknown device \"tpu\""),
            (&format!("{MLP}threads: 0\n"), "threads: "),
            (&format!("{MLP}precision: fp8\n"), "precision: unknown precision \"fp8\"; accepted: fp32, bf16, fp16"),
            (&format!("{MLP}loss_scale: {{init_scale: 1024}}\n"), "loss_scale: configures the fp16 loss scaler, but precision is fp32"),
            (&format!("{MLP}precision: fp16\nloss_scale: {{growth_factor: 0.5}}\n"), "loss_scale.growth_factor: expected a factor > 1, found 0.5"),
            (&format!("{MLP}precision: fp16\nloss_scale: {{backoff_factor: 1}}\n"), "loss_scale.backoff_factor: expected a factor in (0, 1)"),
            (&format!("{MLP}precision: fp16\nloss_scale: {{init_scale: 1e39}}\n"), "loss_scale.init_scale: expected a positive scale that float32 can hold"),
            (&format!("{MLP}precision: fp16\nloss_scale: {{growth_interval: 0}}\n"), "loss_scale.growth_interval: "),
            (&format!("{MLP}precision: fp16\nloss_scale: {{growth: 2}}\n"), "loss_scale.growth: unknown field"),
            ("model: {kind: mlp, hidden: [8]}\n", "max_steps: missing"),
            (&format!("{MLP}grad_clip: -1\n"), "grad_clip: "),
            (&format!("{MLP}eval: {{every_steps: 5}}\ncheckpoint: {{keep_best: {{monitor: acc, mode: max}}}}\n"), "checkpoint.keep_best.monitor: the built-in trainer never records \"acc\"; accepted: val_loss"),
            (&format!("{MLP}checkpoint: {{keep_best: {{monitor: lr, mode: min}}}}\n"), "checkpoint.keep_best.monitor: the built-in trainer never records \"lr\"; accepted: loss"),
            (&format!("{MLP}checkpoint: {{keep_best: {{monitor: val_loss, mode: min}}}}\n"), "checkpoint.keep_best.monitor: val_loss is measured only with eval"),
        ];
        for (yaml, want) in cases {
            let e = parse(yaml).unwrap_err();
            eprintln!("{e}");
            assert!(e.contains(want), "{yaml:?}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn hash_ignores_safe_keys_and_lists_changes() {
        let a = parse(MLP).unwrap();
        let b = parse("model: {kind: mlp, hidden: [8]}\nmax_steps: 50\nthreads: 2\ncheckpoint: {every_steps: 3}\n").unwrap();
        assert_eq!(a.hash(), b.hash());
        let c = parse("model: {kind: mlp, hidden: [8], dropout: 0.2}\nmax_steps: 5\nseed: 3\n")
            .unwrap();
        assert_ne!(a.hash(), c.hash());
        let ch = changed_keys(&a.hashed(), &c.hashed());
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert!(ch[0].starts_with("model.dropout: 0.0 → 0.2"), "{ch:?}");
        assert!(ch[1].starts_with("seed: 0 → 3"), "{ch:?}");
    }

    #[test]
    fn precision_changes_the_hash_but_fp32_keeps_the_old_one() {
        let a = parse(MLP).unwrap();
        assert_eq!(a.precision, Precision::Fp32);
        let explicit = parse(&format!("{MLP}precision: fp32\n")).unwrap();
        assert_eq!(a.hash(), explicit.hash());
        assert!(
            a.hashed().get("precision").is_none(),
            "fp32 hashes as before the key"
        );
        let bf = parse(&format!("{MLP}precision: bf16\n")).unwrap();
        let fp = parse(&format!("{MLP}precision: fp16\n")).unwrap();
        assert_eq!(fp.loss_scale, LossScaleConfig::default());
        assert_eq!(fp.loss_scale.growth_interval, Pos(2000));
        let fp_scaled = parse(&format!(
            "{MLP}precision: fp16\nloss_scale: {{init_scale: 1024}}\n"
        ))
        .unwrap();
        let hashes = [a.hash(), bf.hash(), fp.hash(), fp_scaled.hash()];
        let distinct: BTreeSet<&String> = hashes.iter().collect();
        assert_eq!(distinct.len(), 4, "{hashes:?}");
        assert_eq!(
            changed_keys(&a.hashed(), &bf.hashed()),
            ["precision: null → \"bf16\""]
        );
        assert_eq!(
            changed_keys(&fp.hashed(), &fp_scaled.hashed()),
            ["loss_scale.init_scale: 65536.0 → 1024.0"]
        );
    }
}
