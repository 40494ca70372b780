//! The trainer's models on a tch [`nn::VarStore`]: an MLP, a small CNN (conv + batchnorm +
//! dropout) and a small char-level GPT.
//!
//! Guarantees: every tensor the model's output depends on — parameters *and* buffers (batchnorm
//! running statistics) — is a named variable of the var store (names like `layers.0.weight`,
//! `blocks.1.attn.qkv.weight`), so [`named_state`] is the complete model state for
//! `model.safetensors`. Building is deterministic given libtorch's seed (the trainer seeds
//! before [`Model::build`]). Randomness in the forward pass (dropout) draws from libtorch's default
//! generator only, which the trainer reseeds before every optimizer step.

use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

use super::config::{CnnConfig, GptConfig, MlpConfig, ModelConfig};
use super::data::Task;
use super::trainer::TrainError;

/// The model: one of the three architectures.
#[derive(Debug)]
pub enum Model {
    Mlp(Mlp),
    Cnn(Cnn),
    Gpt(Box<Gpt>),
}

#[derive(Debug)]
pub struct Mlp {
    layers: Vec<nn::Linear>,
    dropout: f64,
}

#[derive(Debug)]
pub struct Cnn {
    convs: Vec<nn::Conv2D>,
    bns: Vec<nn::BatchNorm>,
    head: nn::Linear,
    dropout: f64,
}

#[derive(Debug)]
struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    fc: nn::Linear,
    fc_proj: nn::Linear,
}

#[derive(Debug)]
pub struct Gpt {
    tok: nn::Embedding,
    pos: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    head: nn::Linear,
    heads: i64,
    d_model: i64,
    dropout: f64,
}

impl Model {
    /// Create the model's variables under `root` (drawing their initial values from libtorch's
    /// default generator, in the order each builder creates them).
    pub fn build(root: &nn::Path, cfg: &ModelConfig, task: &Task) -> Result<Model, TrainError> {
        match (cfg, task) {
            (ModelConfig::Mlp(c), Task::Classify { classes, input }) => {
                Ok(Self::mlp(root, c, input, *classes))
            }
            (ModelConfig::Cnn(c), Task::Classify { classes, input }) => {
                Self::cnn(root, c, input, *classes)
            }
            (ModelConfig::Gpt(c), Task::Lm { vocab, context }) => {
                Ok(Self::gpt(root, c, *vocab, *context))
            }
            (m, _) => Err(TrainError::Model(format!(
                "model.kind: {} does not fit this data",
                m.kind()
            ))),
        }
    }

    /// Linear layers from the flattened input through `hidden` to the classes.
    fn mlp(root: &nn::Path, c: &MlpConfig, input: &[i64], classes: i64) -> Model {
        let mut dims = vec![input.iter().product::<i64>()];
        dims.extend(c.hidden.iter().map(|h| h.0 as i64));
        dims.push(classes);
        let p = root / "layers";
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| nn::linear(&p / i, w[0], w[1], Default::default()))
            .collect();
        Model::Mlp(Mlp {
            layers,
            dropout: c.dropout,
        })
    }

    /// A conv + batchnorm block per entry of `channels`, then a linear head.
    fn cnn(
        root: &nn::Path,
        c: &CnnConfig,
        input: &[i64],
        classes: i64,
    ) -> Result<Model, TrainError> {
        if input.len() != 3 {
            return Err(TrainError::Model(format!(
                "model.kind: cnn needs image data (channels × height × width), found samples of shape {input:?}"
            )));
        }
        let mut in_ch = input[0];
        let (mut convs, mut bns) = (Vec::new(), Vec::new());
        let conv_cfg = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let bn_cfg = nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            ..Default::default()
        };
        for (i, ch) in c.channels.iter().enumerate() {
            let ch = ch.0 as i64;
            convs.push(nn::conv2d(root / "convs" / i, in_ch, ch, 3, conv_cfg));
            bns.push(nn::batch_norm2d(root / "bns" / i, ch, bn_cfg));
            in_ch = ch;
        }
        let head = nn::linear(root / "head", in_ch, classes, Default::default());
        Ok(Model::Cnn(Cnn {
            convs,
            bns,
            head,
            dropout: c.dropout,
        }))
    }

    /// Token and position embeddings, `layers` pre-LayerNorm blocks, a final norm and head.
    fn gpt(root: &nn::Path, c: &GptConfig, vocab: i64, context: i64) -> Model {
        let d = c.d_model.0 as i64;
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            ..Default::default()
        };
        let ln = || nn::LayerNormConfig::default();
        let blocks = (0..c.layers.0)
            .map(|i| {
                let b = root / "blocks" / i;
                Block {
                    ln1: nn::layer_norm(&b / "ln1", vec![d], ln()),
                    qkv: nn::linear(&b / "attn" / "qkv", d, 3 * d, Default::default()),
                    proj: nn::linear(&b / "attn" / "proj", d, d, Default::default()),
                    ln2: nn::layer_norm(&b / "ln2", vec![d], ln()),
                    fc: nn::linear(&b / "mlp" / "fc", d, 4 * d, Default::default()),
                    fc_proj: nn::linear(&b / "mlp" / "proj", 4 * d, d, Default::default()),
                }
            })
            .collect();
        Model::Gpt(Box::new(Gpt {
            tok: nn::embedding(root / "tok", vocab, d, emb),
            pos: nn::embedding(root / "pos", context, d, emb),
            blocks,
            ln_f: nn::layer_norm(root / "ln_f", vec![d], ln()),
            head: nn::linear(root / "head", d, vocab, Default::default()),
            heads: c.heads.0 as i64,
            d_model: d,
            dropout: c.dropout,
        }))
    }

    /// The logits for `xs` (`train` switches dropout on and batchnorm to batch statistics,
    /// updating its running statistics).
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Model::Mlp(m) => {
                let mut h = xs.flatten(1, -1);
                let last = m.layers.len() - 1;
                for (i, l) in m.layers.iter().enumerate() {
                    h = l.forward(&h);
                    if i < last {
                        h = h.relu().dropout(m.dropout, train);
                    }
                }
                h
            }
            Model::Cnn(m) => {
                let mut h = xs.shallow_clone();
                for (conv, bn) in m.convs.iter().zip(&m.bns) {
                    h = bn.forward_t(&conv.forward(&h), train).relu();
                    let size = h.size();
                    if size[2] >= 2 && size[3] >= 2 {
                        h = h.max_pool2d_default(2);
                    }
                    h = h.dropout(m.dropout, train);
                }
                let h = h.mean_dim(&[2i64, 3][..], false, Kind::Float);
                m.head.forward(&h)
            }
            Model::Gpt(m) => m.forward_t(xs, train),
        }
    }

    /// Mean cross-entropy of the model on `(xs, ys)`.
    pub fn loss(&self, xs: &Tensor, ys: &Tensor, train: bool) -> Tensor {
        let logits = self.forward_t(xs, train);
        match self {
            Model::Gpt(_) => {
                let v = logits.size()[2];
                logits
                    .view([-1, v])
                    .cross_entropy_for_logits(&ys.reshape([-1]))
            }
            _ => logits.cross_entropy_for_logits(ys),
        }
    }
}

impl Gpt {
    // `x = x + f(x)`, not `x += …`: an in-place add would overwrite a tensor autograd saved.
    #[allow(clippy::assign_op_pattern)]
    fn forward_t(&self, idx: &Tensor, train: bool) -> Tensor {
        let (b, t) = (idx.size()[0], idx.size()[1]);
        let (d, nh) = (self.d_model, self.heads);
        let dh = d / nh;
        let device = idx.device();
        let pos = Tensor::arange(t, (Kind::Int64, device));
        let mut x = (self.tok.forward(idx) + self.pos.forward(&pos)).dropout(self.dropout, train);
        let mask = Tensor::ones([t, t], (Kind::Bool, device)).triu(1);
        let scale = 1.0 / (dh as f64).sqrt();
        for blk in &self.blocks {
            let h = blk.ln1.forward(&x);
            let qkv = blk.qkv.forward(&h).split(d, 2);
            let heads = |z: &Tensor| z.view([b, t, nh, dh]).transpose(1, 2);
            let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
            let att = (q.matmul(&k.transpose(-2, -1)) * scale)
                .masked_fill(&mask, f64::NEG_INFINITY)
                .softmax(-1, Kind::Float)
                .dropout(self.dropout, train);
            let y = att.matmul(&v).transpose(1, 2).contiguous().view([b, t, d]);
            x = x + blk.proj.forward(&y).dropout(self.dropout, train);
            let h = blk.fc.forward(&blk.ln2.forward(&x)).gelu("none");
            x = x + blk.fc_proj.forward(&h).dropout(self.dropout, train);
        }
        self.head.forward(&self.ln_f.forward(&x))
    }
}

/// Every variable of the store (parameters and buffers), sorted by name.
pub fn named_state(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The trainable parameters (those that require grad), sorted by name.
pub fn named_parameters(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    named_state(vs)
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

/// Number of elements over all trainable parameters.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    named_parameters(vs)
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum()
}
