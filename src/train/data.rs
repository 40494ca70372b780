//! The trainer's data: datasets held in memory as CPU tensors, split into a training part and a
//! held-out part, and a loader whose position is two integers.
//!
//! Guarantees:
//! - generated data (`synthetic`, `synthetic-images`) is a pure function of the config and the
//!   seed, drawn from a Rust PRNG (SplitMix64) — independent of libtorch's generators;
//! - the order of epoch `e` is a permutation derived from `(seed, e)` alone (the seed streams are
//!   listed in [`super::seeds`]), so a [`Position`] (`epoch`, `batch_in_epoch`) is the whole state
//!   of the loader: resume at a position yields the same micro-batches as an uninterrupted run
//!   (drop-last batching; an optimizer step may span the end of an epoch);
//! - [`Dataset::fingerprint`] hashes the bytes of the data, so a checkpoint can refuse a resume
//!   on different data;
//! - file errors (missing, not UTF-8, not IDX) name the config key of the file.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::config::{
    DataConfig, MnistConfig, ModelConfig, SyntheticConfig, SyntheticImagesConfig, TextConfig,
    TrainConfig,
};
use super::seeds::{data_seed, epoch_order_seed, SplitMix};
use crate::config::ConfigError;

/// A public-domain text (Lewis Carroll, *Alice's Adventures in Wonderland*, 1865, chapter 1),
/// the default data of the `gpt` model: it runs with no download.
pub const EMBEDDED_TEXT: &str = "\
Alice was beginning to get very tired of sitting by her sister on the bank, and of having \
nothing to do: once or twice she had peeped into the book her sister was reading, but it had no \
pictures or conversations in it, 'and what is the use of a book,' thought Alice 'without \
pictures or conversations?'

So she was considering in her own mind (as well as she could, for the hot day made her feel very \
sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the trouble of \
getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close by her.

There was nothing so very remarkable in that; nor did Alice think it so very much out of the way \
to hear the Rabbit say to itself, 'Oh dear! Oh dear! I shall be late!' (when she thought it over \
afterwards, it occurred to her that she ought to have wondered at this, but at the time it all \
seemed quite natural); but when the Rabbit actually took a watch out of its waistcoat-pocket, and \
looked at it, and then hurried on, Alice started to her feet, for it flashed across her mind that \
she had never before seen a rabbit with either a waistcoat-pocket, or a watch to take out of it, \
and burning with curiosity, she ran across the field after it, and fortunately was just in time \
to see it pop down a large rabbit-hole under the hedge.

In another moment down went Alice after it, never once considering how in the world she was to \
get out again.

The rabbit-hole went straight on like a tunnel for some way, and then dipped suddenly down, so \
suddenly that Alice had not a moment to think about stopping herself before she found herself \
falling down a very deep well.
";

/// The permutation of `0..n` used in epoch `epoch`.
pub fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<i64> {
    let mut r = SplitMix::new(epoch_order_seed(seed, epoch));
    let mut p: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = r.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// What the model is asked to do with the data.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Inputs of shape `input` (per sample) to one of `classes` labels.
    Classify { classes: i64, input: Vec<i64> },
    /// Next-character prediction over a vocabulary of `vocab` characters, windows of `context`.
    Lm { vocab: i64, context: i64 },
}

/// Training or held-out part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// A dataset in memory (CPU tensors).
#[derive(Debug)]
pub struct Dataset {
    task: Task,
    /// Classification: inputs `[N, ...]` (f32) and labels `[N]` (i64); the first `n_train` rows
    /// are the training part. Language modelling: `x` is the token stream `[L]` (i64), the first
    /// `n_train` tokens are training text; `y` is unused (empty).
    x: Tensor,
    y: Tensor,
    n_train: i64,
    n_total: i64,
    fingerprint: String,
    /// The vocabulary of a text dataset (index → char).
    pub vocab: Vec<char>,
}

fn cfg_err(key: &str, message: String) -> ConfigError {
    ConfigError::at(key, message)
}

fn hash_hex(parts: &[&[u8]]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    format!("{:032x}", h.digest128())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn split_count(n: usize, val_fraction: f64) -> usize {
    let n_val = (n as f64 * val_fraction).floor() as usize;
    n - n_val
}

impl Dataset {
    /// Build or read the dataset of `cfg`, and check it fits the run (held-out samples for
    /// eval, a batch's worth of training samples).
    pub fn load(cfg: &TrainConfig) -> Result<Dataset, ConfigError> {
        let vf = cfg.data.val_fraction();
        let seed = data_seed(cfg.seed);
        let ds = match &cfg.data {
            DataConfig::Synthetic(c) => Self::synthetic(c, seed, vf)?,
            DataConfig::SyntheticImages(c) => Self::synthetic_images(c, seed, vf)?,
            DataConfig::MnistIdx(c) => Self::mnist_idx(c, vf)?,
            DataConfig::Text(c) => Self::text(c, &cfg.model, vf)?,
        };
        ds.check_fits(cfg)?;
        Ok(ds)
    }

    /// `synthetic`: Gaussian features labelled by a random linear teacher (argmax of `x·W`).
    fn synthetic(c: &SyntheticConfig, seed: u64, vf: f64) -> Result<Dataset, ConfigError> {
        let (n, f, k) = (
            c.samples.0 as usize,
            c.features.0 as usize,
            c.classes.0 as usize,
        );
        if n.saturating_mul(f) > 1 << 28 {
            return Err(cfg_err(
                "data.samples",
                format!(
                    "{n} samples × {f} features is too large for synthetic data (max 2^28 values)"
                ),
            ));
        }
        let mut r = SplitMix::new(seed);
        let w: Vec<f64> = (0..f * k).map(|_| r.normal()).collect();
        let mut xs = Vec::with_capacity(n * f);
        let mut ys = Vec::with_capacity(n);
        for _ in 0..n {
            let row: Vec<f64> = (0..f).map(|_| r.normal()).collect();
            let mut best = (0usize, f64::NEG_INFINITY);
            for c in 0..k {
                let s: f64 = (0..f).map(|j| row[j] * w[j * k + c]).sum();
                if s > best.1 {
                    best = (c, s);
                }
            }
            xs.extend(row.iter().map(|&v| v as f32));
            ys.push(best.0 as i64);
        }
        Ok(Self::classification(xs, ys, vec![f as i64], k as i64, vf))
    }

    /// `synthetic_images`: one random template image per class plus Gaussian noise.
    fn synthetic_images(
        c: &SyntheticImagesConfig,
        seed: u64,
        vf: f64,
    ) -> Result<Dataset, ConfigError> {
        let (n, s, ch, k) = (
            c.samples.0 as usize,
            c.size.0 as usize,
            c.channels.0 as usize,
            c.classes.0 as usize,
        );
        let per = ch.saturating_mul(s).saturating_mul(s);
        if n.saturating_mul(per) > 1 << 28 || s > 4096 {
            return Err(cfg_err(
                "data.samples",
                format!(
                    "{n} images of {ch}×{s}×{s} is too large for synthetic data (max 2^28 values)"
                ),
            ));
        }
        let mut r = SplitMix::new(seed);
        let templates: Vec<f64> = (0..k * per).map(|_| r.normal()).collect();
        let mut xs = Vec::with_capacity(n * per);
        let mut ys = Vec::with_capacity(n);
        for _ in 0..n {
            let y = r.below(k as u64) as usize;
            let t = &templates[y * per..(y + 1) * per];
            xs.extend(t.iter().map(|&v| (v + r.normal()) as f32));
            ys.push(y as i64);
        }
        let shape = vec![ch as i64, s as i64, s as i64];
        Ok(Self::classification(xs, ys, shape, k as i64, vf))
    }

    /// `mnist`: IDX image and label files (N×H×W bytes, N digit labels), normalised as
    /// torchvision's MNIST transform does.
    fn mnist_idx(c: &MnistConfig, vf: f64) -> Result<Dataset, ConfigError> {
        let (idims, img) = read_idx("data.images", &c.images)?;
        let (ldims, lab) = read_idx("data.labels", &c.labels)?;
        if idims.len() != 3 {
            return Err(cfg_err(
                "data.images",
                format!(
                    "{}: expected an IDX file of N×H×W images, found {} dimensions",
                    c.images.display(),
                    idims.len()
                ),
            ));
        }
        if ldims.len() != 1 || ldims[0] != idims[0] {
            return Err(cfg_err(
                "data.labels",
                format!(
                    "{}: expected {} labels (one per image), found dimensions {ldims:?}",
                    c.labels.display(),
                    idims[0]
                ),
            ));
        }
        if let Some(bad) = lab.iter().find(|&&l| l > 9) {
            return Err(cfg_err(
                "data.labels",
                format!("{}: label {bad} is not a digit 0-9", c.labels.display()),
            ));
        }
        let xs: Vec<f32> = img
            .iter()
            .map(|&p| (p as f32 / 255.0 - 0.1307) / 0.3081)
            .collect();
        let ys: Vec<i64> = lab.iter().map(|&l| l as i64).collect();
        let shape = vec![1, idims[1] as i64, idims[2] as i64];
        let mut d = Self::classification(xs, ys, shape, 10, vf);
        d.fingerprint = hash_hex(&[&img, &lab]);
        Ok(d)
    }

    /// `text`: a character-level corpus (the embedded one, or `data.path`) for the gpt model.
    fn text(c: &TextConfig, model: &ModelConfig, vf: f64) -> Result<Dataset, ConfigError> {
        let text = match &c.path {
            None => EMBEDDED_TEXT.to_owned(),
            Some(p) => {
                let bytes = std::fs::read(p).map_err(|e| {
                    cfg_err("data.path", format!("cannot read {}: {e}", p.display()))
                })?;
                String::from_utf8(bytes).map_err(|e| {
                    cfg_err(
                        "data.path",
                        format!("{}: not UTF-8 text ({e})", p.display()),
                    )
                })?
            }
        };
        let context = match model {
            ModelConfig::Gpt(g) => g.context.0 as i64,
            _ => {
                return Err(cfg_err(
                    "data.kind",
                    "text data feeds the gpt model only".into(),
                ))
            }
        };
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let tokens: Vec<i64> = text
            .chars()
            .map(|ch| vocab.binary_search(&ch).unwrap_or(0) as i64)
            .collect();
        let n = tokens.len();
        let n_train = split_count(n, vf) as i64;
        let n_val_tokens = n as i64 - n_train;
        if n_train <= context || (vf > 0.0 && n_val_tokens <= context) {
            return Err(cfg_err(
                "data.path",
                format!(
                    "the text has {n} characters: too short for model.context {context} \
                     ({n_train} training and {n_val_tokens} held-out characters; each part needs more than the context)"
                ),
            ));
        }
        Ok(Dataset {
            task: Task::Lm {
                vocab: vocab.len() as i64,
                context,
            },
            x: Tensor::from_slice(&tokens),
            y: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            n_train,
            n_total: n as i64,
            fingerprint: hash_hex(&[text.as_bytes()]),
            vocab,
        })
    }

    /// The data fits the run: eval has held-out samples, a batch has training samples.
    fn check_fits(&self, cfg: &TrainConfig) -> Result<(), ConfigError> {
        if cfg.eval.is_some() && self.is_empty(Split::Val) {
            return Err(cfg_err(
                "data.val_fraction",
                format!(
                    "{} holds out no sample of this data, but eval needs some; accepted: a larger \
                     fraction or more samples",
                    cfg.data.val_fraction()
                ),
            ));
        }
        let n_train = self.len(Split::Train);
        if n_train < cfg.batch_size as i64 {
            return Err(cfg_err(
                "batch_size",
                format!(
                    "{} is larger than the {n_train} training samples of data; accepted: at most \
                     {n_train}",
                    cfg.batch_size
                ),
            ));
        }
        Ok(())
    }

    fn classification(
        xs: Vec<f32>,
        ys: Vec<i64>,
        input: Vec<i64>,
        classes: i64,
        vf: f64,
    ) -> Dataset {
        let n = ys.len();
        let mut shape = vec![n as i64];
        shape.extend(&input);
        let fingerprint = hash_hex(&[
            &f32_bytes(&xs),
            &ys.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        ]);
        Dataset {
            task: Task::Classify { classes, input },
            x: Tensor::from_slice(&xs).view(shape.as_slice()),
            y: Tensor::from_slice(&ys),
            n_train: split_count(n, vf) as i64,
            n_total: n as i64,
            fingerprint,
            vocab: Vec::new(),
        }
    }

    pub fn task(&self) -> &Task {
        &self.task
    }

    /// xxh3-128 of the data's bytes (hex).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Samples in a split (language modelling: window start positions).
    pub fn len(&self, split: Split) -> i64 {
        let (n, ctx) = match (split, &self.task) {
            (Split::Train, _) => (self.n_train, self.lm_context()),
            (Split::Val, _) => (self.n_total - self.n_train, self.lm_context()),
        };
        (n - ctx).max(0)
    }

    pub fn is_empty(&self, split: Split) -> bool {
        self.len(split) == 0
    }

    fn lm_context(&self) -> i64 {
        match self.task {
            Task::Lm { context, .. } => context,
            Task::Classify { .. } => 0,
        }
    }

    /// The inputs and targets of samples `idx` of `split`, on `device`.
    pub fn batch(&self, split: Split, idx: &[i64], device: Device) -> (Tensor, Tensor) {
        let offset = match split {
            Split::Train => 0,
            Split::Val => self.n_train,
        };
        let idx = Tensor::from_slice(idx) + offset;
        match self.task {
            Task::Classify { .. } => (
                self.x.index_select(0, &idx).to_device(device),
                self.y.index_select(0, &idx).to_device(device),
            ),
            Task::Lm { context, .. } => {
                let b = idx.size()[0];
                let pos = idx.unsqueeze(1)
                    + Tensor::arange(context + 1, (Kind::Int64, Device::Cpu)).unsqueeze(0);
                let w = self
                    .x
                    .index_select(0, &pos.view([-1]))
                    .view([b, context + 1]);
                (
                    w.narrow(1, 0, context).to_device(device),
                    w.narrow(1, 1, context).to_device(device),
                )
            }
        }
    }
}

/// Read an IDX file (`u8` data); `key` names the config key in errors.
fn read_idx(key: &str, path: &Path) -> Result<(Vec<usize>, Vec<u8>), ConfigError> {
    let e = |m: String| cfg_err(key, format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|x| e(format!("cannot read: {x}")))?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(e(
            "not an IDX file of unsigned bytes (magic 00 00 08 NDIM)".into()
        ));
    }
    let ndim = bytes[3] as usize;
    let head = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < head {
        return Err(e(format!("IDX header truncated ({ndim} dimensions)")));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(bytes.len() - head) {
        return Err(e(format!(
            "dimensions {dims:?} do not match the {} data bytes",
            bytes.len() - head
        )));
    }
    Ok((dims, bytes[head..].to_vec()))
}

/// Where the loader stands: the next micro-batch is batch `batch_in_epoch` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub epoch: u64,
    pub batch_in_epoch: u64,
}

/// Micro-batches of the training split in the order of the epoch permutations.
#[derive(Debug)]
pub struct Loader {
    seed: u64,
    n: usize,
    batch: usize,
    batches_per_epoch: u64,
    cached: Option<(u64, Vec<i64>)>,
}

impl Loader {
    pub fn new(seed: u64, data: &Dataset, batch: u64) -> Loader {
        let n = data.len(Split::Train) as usize;
        let batch = batch as usize;
        Loader {
            seed,
            n,
            batch,
            batches_per_epoch: (n / batch.max(1)) as u64,
            cached: None,
        }
    }

    /// Micro-batches per epoch (drop last).
    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    /// The sample indices at `pos`, then advance `pos` (into the next epoch at the end).
    pub fn next(&mut self, pos: &mut Position) -> Vec<i64> {
        if self.cached.as_ref().is_none_or(|(e, _)| *e != pos.epoch) {
            self.cached = Some((pos.epoch, permutation(self.seed, pos.epoch, self.n)));
        }
        let perm = self
            .cached
            .as_ref()
            .map(|(_, p)| p.as_slice())
            .unwrap_or(&[]);
        let start = pos.batch_in_epoch as usize * self.batch;
        let idx = perm[start..start + self.batch].to_vec();
        pos.batch_in_epoch += 1;
        if pos.batch_in_epoch >= self.batches_per_epoch {
            pos.epoch += 1;
            pos.batch_in_epoch = 0;
        }
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_stable_and_differ_by_epoch() {
        let a = permutation(7, 0, 100);
        assert_eq!(a, permutation(7, 0, 100));
        assert_ne!(a, permutation(7, 1, 100));
        assert_ne!(a, permutation(8, 0, 100));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<i64>>());
    }

    #[test]
    fn loader_resumes_at_a_position() {
        let cfg = {
            let job = crate::config::JobConfig::parse(
                "name: t\nmodel: {kind: mlp, hidden: [4]}\ndata: {kind: synthetic, samples: 110, features: 3, classes: 2}\nbatch_size: 10\nmax_steps: 5\n",
            )
            .unwrap();
            TrainConfig::from_job(&job).unwrap()
        };
        let d = Dataset::load(&cfg).unwrap();
        assert_eq!(d.len(Split::Train), 99);
        assert_eq!(d.len(Split::Val), 11);
        let mut l = Loader::new(1, &d, 10);
        assert_eq!(l.batches_per_epoch(), 9);
        let mut pos = Position::default();
        let straight: Vec<Vec<i64>> = (0..25).map(|_| l.next(&mut pos)).collect();
        assert_eq!(
            pos,
            Position {
                epoch: 2,
                batch_in_epoch: 7
            }
        );
        let mut pos = Position {
            epoch: 1,
            batch_in_epoch: 4,
        };
        let mut l2 = Loader::new(1, &d, 10);
        assert_eq!(l2.next(&mut pos), straight[13]);
        let (x, y) = d.batch(Split::Val, &[0, 10], Device::Cpu);
        assert_eq!((x.size(), y.size()), (vec![2, 3], vec![2]));
    }

    #[test]
    fn embedded_text_windows() {
        let job = crate::config::JobConfig::parse(
            "name: t\nmodel: {kind: gpt, layers: 1, heads: 1, d_model: 8, context: 16}\nbatch_size: 4\nmax_steps: 5\n",
        )
        .unwrap();
        let d = Dataset::load(&TrainConfig::from_job(&job).unwrap()).unwrap();
        let (x, y) = d.batch(Split::Train, &[0, 5], Device::Cpu);
        assert_eq!(x.size(), vec![2, 16]);
        assert!(x.narrow(1, 1, 15).equal(&y.narrow(1, 0, 15)));
        assert!(!d.is_empty(Split::Val));
    }
}
