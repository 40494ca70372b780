//! Optimizers with explicit, serializable state: SGD (momentum, dampening, Nesterov, weight
//! decay), Adam (optionally AMSGrad, L2 weight decay) and AdamW (decoupled weight decay), over tch
//! tensors.
//!
//! Guarantee: bit-exact with PyTorch 2.13's `torch.optim.{SGD, Adam, AdamW}` with
//! `foreach=False` (the single-tensor code path: `_single_tensor_sgd`, `_single_tensor_adam`),
//! op for op on the same libtorch, including Python's scalar arithmetic (`f64`, `pow` from libm),
//! `step` counted in `float32` as PyTorch's `state["step"]` tensor is, and per-parameter lazy state
//! (a parameter gets state on its first step with a gradient; parameters without a gradient are
//! skipped). The alpha/value scalars go through the C++ shim ([`super::ffi`]) because tch's
//! generated `add_`/`addcmul_`/`addcdiv_` drop them. `tests/optim_parity.rs` checks 0 differing
//! elements against torch.optim over 20 steps, and that save → load → continue equals a straight
//! run.
//!
//! The learning rate is an argument of every [`Optimizer::step`] (a scheduler owns it); the config's
//! `lr` is the base value a scheduler starts from.
//!
//! State: [`Optimizer::state_tensors`] names every tensor `<param>.<key>` with PyTorch's keys
//! (`step`, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`, `momentum_buffer`; `step` is a 0-dim
//! `float32` tensor, like PyTorch's), for `optimizer.safetensors`; [`Optimizer::meta`] is the
//! small serde part (kind, hyperparameters, parameter names) for a JSON file.
//! [`Optimizer::load_state`] checks everything against the live parameters and says which tensor
//! is missing, unexpected or mis-shaped.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::ffi::{self, ShimError};
use super::tensors::torch_message;

/// `torch.optim.SGD`'s hyperparameters (PyTorch's defaults).
pub use crate::config::trainer::optim::{AdamConfig, OptimizerConfig, SgdConfig};

/// Optimizer errors; each names the parameter or state tensor concerned.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("invalid optimizer config: {0}")]
    Config(String),
    #[error("optimizer parameter {name}: {reason}")]
    Param { name: String, reason: String },
    #[error("invalid learning rate {0} for this step (must be finite and >= 0)")]
    Lr(f64),
    #[error("optimizer step, parameter {param}: {source}")]
    Shim {
        param: String,
        #[source]
        source: ShimError,
    },
    #[error("optimizer {what}, parameter {param}: {message}")]
    Torch {
        what: &'static str,
        param: String,
        message: String,
    },
    #[error("optimizer state is for {saved}, but this optimizer is {current}")]
    KindMismatch { saved: String, current: String },
    #[error("optimizer state's parameters differ from the model's: {detail}")]
    ParamsMismatch { detail: String },
    #[error("optimizer state: tensor {name} is missing (parameter {param} has {kind} state)")]
    MissingState {
        name: String,
        param: String,
        kind: &'static str,
    },
    #[error("optimizer state: unexpected tensor {name} ({reason})")]
    UnexpectedState { name: String, reason: String },
    #[error("optimizer state: tensor {name} is {found}, expected {expected}")]
    BadState {
        name: String,
        found: String,
        expected: String,
    },
}

/// The serde half of the optimizer state (a small JSON file); the tensors are
/// [`Optimizer::state_tensors`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerMeta {
    /// Bumped when the meaning of the state changes.
    pub format_version: u32,
    pub config: OptimizerConfig,
    /// Parameter names, in optimizer order.
    pub params: Vec<String>,
    /// Parameters that have state (took at least one step), in optimizer order.
    pub with_state: Vec<String>,
}

/// Current [`OptimizerMeta::format_version`].
pub const STATE_FORMAT_VERSION: u32 = 1;

/// Per-parameter state, created lazily on the first step the parameter has a gradient.
enum ParamState {
    None,
    /// SGD: the buffer exists when momentum != 0.
    Sgd {
        momentum_buffer: Option<Tensor>,
    },
    Adam {
        /// PyTorch's `state["step"]`, a float32 tensor on the CPU: counted in f32 here, with the
        /// same rounding (`step_t += 1`).
        step: f32,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        max_exp_avg_sq: Option<Tensor>,
    },
}

struct Param {
    name: String,
    /// Shares storage with the model's parameter (a shallow clone).
    tensor: Tensor,
    state: ParamState,
}

/// One optimizer over named parameters (one parameter group).
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<Param>,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("config", &self.config)
            .field(
                "params",
                &self.params.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn describe(t: &Tensor) -> String {
    format!("{:?} {:?}", t.kind(), t.size())
}

impl Optimizer {
    /// An optimizer over `params` (name, parameter), in this order. The tensors are shallow
    /// clones sharing storage with the model's parameters, updated in place by [`Self::step`].
    /// Names must be unique; parameters must be floating point.
    pub fn new(config: OptimizerConfig, params: Vec<(String, Tensor)>) -> Result<Self, OptimError> {
        config.validate().map_err(OptimError::Config)?;
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(params.len());
        for (name, t) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::Param {
                    name,
                    reason: "given twice".into(),
                });
            }
            if !t.defined() || !t.is_floating_point() {
                return Err(OptimError::Param {
                    reason: format!(
                        "not a floating-point tensor ({})",
                        if t.defined() {
                            describe(&t)
                        } else {
                            "undefined".into()
                        }
                    ),
                    name,
                });
            }
            out.push(Param {
                name,
                tensor: t.shallow_clone(),
                state: ParamState::None,
            });
        }
        Ok(Optimizer {
            config,
            params: out,
        })
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Parameter names, in optimizer order.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// `optimizer.zero_grad()` (PyTorch's default `set_to_none=True`): every `.grad` becomes
    /// undefined, so the next backward assigns rather than accumulates.
    pub fn zero_grad(&mut self) -> Result<(), OptimError> {
        for p in &mut self.params {
            ffi::set_grad(&mut p.tensor, None).map_err(|source| OptimError::Shim {
                param: p.name.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// One optimizer step with learning rate `lr`, reading each parameter's `.grad`; parameters
    /// whose grad is undefined are skipped (no state change), as in PyTorch. Runs without
    /// autograd recording.
    ///
    /// On an error (a libtorch error in some parameter's update) the parameters before it were
    /// updated and the rest were not: treat the model as unusable and resume from a checkpoint.
    pub fn step(&mut self, lr: f64) -> Result<(), OptimError> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(OptimError::Lr(lr));
        }
        let _no_grad = tch::no_grad_guard();
        let config = self.config.clone();
        for p in &mut self.params {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            let (tensor, state) = (&mut p.tensor, &mut p.state);
            let done = match &config {
                OptimizerConfig::Sgd(c) => sgd_update(c, lr, tensor, state, grad),
                OptimizerConfig::Adam(c) => adam_update(c, false, lr, tensor, state, grad),
                OptimizerConfig::AdamW(c) => adam_update(c, true, lr, tensor, state, grad),
            };
            done.map_err(|e| e.of_param(&p.name))?;
        }
        Ok(())
    }

    /// Every state tensor, named `<param>.<key>` (keys as in PyTorch's `optimizer.state[p]`), in
    /// parameter order. The tensors share storage with the live state (`step` is a fresh 0-dim
    /// `float32`): copy them (e.g. [`super::tensors::to_tensor_data`]) before the next step.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            let name = |key: &str| format!("{}.{key}", p.name);
            match &p.state {
                ParamState::None => {}
                ParamState::Sgd { momentum_buffer } => {
                    if let Some(b) = momentum_buffer {
                        out.push((name("momentum_buffer"), b.shallow_clone()));
                    }
                }
                ParamState::Adam {
                    step,
                    exp_avg,
                    exp_avg_sq,
                    max_exp_avg_sq,
                } => {
                    out.push((name("step"), Tensor::from(*step)));
                    out.push((name("exp_avg"), exp_avg.shallow_clone()));
                    out.push((name("exp_avg_sq"), exp_avg_sq.shallow_clone()));
                    if let Some(m) = max_exp_avg_sq {
                        out.push((name("max_exp_avg_sq"), m.shallow_clone()));
                    }
                }
            }
        }
        out
    }

    /// The serde half of the state (for a JSON file next to `optimizer.safetensors`).
    pub fn meta(&self) -> OptimizerMeta {
        OptimizerMeta {
            format_version: STATE_FORMAT_VERSION,
            config: self.config.clone(),
            params: self.params.iter().map(|p| p.name.clone()).collect(),
            with_state: self
                .params
                .iter()
                .filter(|p| !matches!(p.state, ParamState::None))
                .map(|p| p.name.clone())
                .collect(),
        }
    }

    /// Replace the whole state by a saved one: `meta` from [`Self::meta`] and the tensors of
    /// [`Self::state_tensors`] (e.g. read back from `optimizer.safetensors`). The optimizer kind
    /// and parameter names must match; every expected tensor must be present with the parameter's
    /// dtype and shape, and no other tensor may be given. Hyperparameters come from this
    /// optimizer's config (a change since the checkpoint is logged). Tensors are copied onto the
    /// parameters' devices. On error the current state is left unchanged.
    pub fn load_state(
        &mut self,
        meta: &OptimizerMeta,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<(), OptimError> {
        self.check_meta(meta)?;
        let with_state: BTreeSet<&str> = meta.with_state.iter().map(String::as_str).collect();
        let mut given = by_name(tensors)?;
        let mut new_states = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let state = if with_state.contains(p.name.as_str()) {
                self.load_param_state(p, &mut given)?
            } else {
                ParamState::None
            };
            new_states.push(state);
        }
        if let Some(name) = given.keys().next() {
            return Err(OptimError::UnexpectedState {
                name: name.clone(),
                reason: format!(
                    "no {} state of that name for the optimizer's parameters",
                    self.config.kind()
                ),
            });
        }
        for (p, s) in self.params.iter_mut().zip(new_states) {
            p.state = s;
        }
        Ok(())
    }

    /// The saved state fits this optimizer: a format this build reads, the same kind, the same
    /// parameters in the same order, state only for known parameters. Changed hyperparameters
    /// are logged (the current ones apply).
    fn check_meta(&self, meta: &OptimizerMeta) -> Result<(), OptimError> {
        if meta.format_version != STATE_FORMAT_VERSION {
            return Err(OptimError::Config(format!(
                "optimizer state format version {} is not supported (this build reads {})",
                meta.format_version, STATE_FORMAT_VERSION
            )));
        }
        if meta.config.kind() != self.config.kind() {
            return Err(OptimError::KindMismatch {
                saved: meta.config.kind().into(),
                current: self.config.kind().into(),
            });
        }
        if meta.config != self.config {
            tracing::warn!(
                saved = ?meta.config,
                current = ?self.config,
                "optimizer hyperparameters changed since the checkpoint; using the current ones"
            );
        }
        let names: Vec<&str> = self.param_names().collect();
        if meta
            .params
            .iter()
            .map(String::as_str)
            .ne(names.iter().copied())
        {
            let saved: BTreeSet<&str> = meta.params.iter().map(String::as_str).collect();
            let now: BTreeSet<&str> = names.iter().copied().collect();
            let missing: Vec<_> = now.difference(&saved).collect();
            let extra: Vec<_> = saved.difference(&now).collect();
            return Err(OptimError::ParamsMismatch {
                detail: if missing.is_empty() && extra.is_empty() {
                    "same names in a different order".into()
                } else {
                    format!("not in the checkpoint: {missing:?}; only in the checkpoint: {extra:?}")
                },
            });
        }
        if let Some(unknown) = meta
            .with_state
            .iter()
            .find(|n| !names.contains(&n.as_str()))
        {
            return Err(OptimError::ParamsMismatch {
                detail: format!("state listed for unknown parameter {unknown}"),
            });
        }
        Ok(())
    }

    fn load_param_state(
        &self,
        p: &Param,
        given: &mut BTreeMap<String, Tensor>,
    ) -> Result<ParamState, OptimError> {
        let kind = self.config.kind();
        let mut take = |key: &str| -> Result<Tensor, OptimError> {
            let name = format!("{}.{key}", p.name);
            let t = given
                .remove(&name)
                .ok_or_else(|| OptimError::MissingState {
                    name: name.clone(),
                    param: p.name.clone(),
                    kind,
                })?;
            Ok(t).and_then(|t| {
                if key == "step" {
                    check_step(&name, &t)?;
                    return Ok(t);
                }
                if t.kind() != p.tensor.kind() || t.size() != p.tensor.size() {
                    return Err(OptimError::BadState {
                        name,
                        found: describe(&t),
                        expected: describe(&p.tensor),
                    });
                }
                // A private copy on the parameter's device, never aliasing the caller's tensor.
                let torch = |e| OptimError::Torch {
                    what: "load_state",
                    param: p.name.clone(),
                    message: torch_message(&e),
                };
                let copy = p.tensor.f_empty_like().map_err(torch)?;
                let mut copy = copy.f_detach().map_err(torch)?;
                copy.f_copy_(&t).map_err(torch)?;
                Ok(copy)
            })
        };
        Ok(match &self.config {
            OptimizerConfig::Sgd(c) => ParamState::Sgd {
                momentum_buffer: if c.momentum != 0.0 {
                    Some(take("momentum_buffer")?)
                } else {
                    None
                },
            },
            OptimizerConfig::Adam(c) | OptimizerConfig::AdamW(c) => {
                let step = take("step")?.double_value(&[]) as f32;
                ParamState::Adam {
                    step,
                    exp_avg: take("exp_avg")?,
                    exp_avg_sq: take("exp_avg_sq")?,
                    max_exp_avg_sq: if c.amsgrad {
                        Some(take("max_exp_avg_sq")?)
                    } else {
                        None
                    },
                }
            }
        })
    }
}

/// `step` must be a 0-dim float32 tensor holding a whole number >= 1.
fn check_step(name: &str, t: &Tensor) -> Result<(), OptimError> {
    let bad = |found: String| OptimError::BadState {
        name: name.to_owned(),
        found,
        expected: "a 0-dim Float tensor holding a step count >= 1".into(),
    };
    if t.kind() != Kind::Float || !t.size().is_empty() {
        return Err(bad(describe(t)));
    }
    let v = t.double_value(&[]);
    if !(v.is_finite() && v >= 1.0 && v.fract() == 0.0) {
        return Err(bad(format!("the value {v}")));
    }
    Ok(())
}

/// A libtorch error inside one parameter's update; [`OptimError::of_param`] names the parameter.
impl From<ShimError> for OptimError {
    fn from(source: ShimError) -> Self {
        OptimError::Shim {
            param: String::new(),
            source,
        }
    }
}

impl From<tch::TchError> for OptimError {
    fn from(e: tch::TchError) -> Self {
        OptimError::Torch {
            what: "step",
            param: String::new(),
            message: torch_message(&e),
        }
    }
}

impl OptimError {
    /// The error of one parameter's update, with the parameter's name.
    fn of_param(mut self, name: &str) -> OptimError {
        if let OptimError::Shim { param, .. } | OptimError::Torch { param, .. } = &mut self {
            name.clone_into(param);
        }
        self
    }
}

/// `_single_tensor_sgd`'s body for one parameter (PyTorch 2.13, `maximize=False`).
fn sgd_update(
    c: &SgdConfig,
    lr: f64,
    param: &mut Tensor,
    state: &mut ParamState,
    grad: Tensor,
) -> Result<(), OptimError> {
    // grad = grad.add(param, alpha=weight_decay)
    let mut grad = if c.weight_decay != 0.0 {
        ffi::add(&grad, param, c.weight_decay)?
    } else {
        grad
    };
    if !matches!(*state, ParamState::Sgd { .. }) {
        // PyTorch records `momentum_buffer` (None until momentum creates it) for every stepped
        // parameter.
        *state = ParamState::Sgd {
            momentum_buffer: None,
        };
    }
    if c.momentum != 0.0 {
        let ParamState::Sgd {
            momentum_buffer: state,
        } = state
        else {
            unreachable!()
        };
        let buf = match state {
            // buf = grad.detach().clone()
            None => state.insert(grad.f_detach()?.copy()),
            // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            Some(buf) => {
                let _ = buf.f_mul_scalar_(c.momentum)?;
                ffi::add_(buf, &grad, 1.0 - c.dampening)?;
                buf
            }
        };
        grad = if c.nesterov {
            // grad = grad.add(buf, alpha=momentum)
            ffi::add(&grad, buf, c.momentum)?
        } else {
            buf.shallow_clone()
        };
    }
    // param.add_(grad, alpha=-lr)
    ffi::add_(param, &grad, -lr).map_err(OptimError::from)
}

/// `_single_tensor_adam`'s body for one parameter (PyTorch 2.13; `capturable=False`,
/// `differentiable=False`, `maximize=False`, real tensors); `decoupled` is AdamW.
fn adam_update(
    c: &AdamConfig,
    decoupled: bool,
    lr: f64,
    param: &mut Tensor,
    state: &mut ParamState,
    grad: Tensor,
) -> Result<(), OptimError> {
    if !matches!(*state, ParamState::Adam { .. }) {
        // Lazy state initialization: zeros_like(p, memory_format=torch.preserve_format).
        let zeros = || param.f_zeros_like().map_err(OptimError::from);
        *state = ParamState::Adam {
            step: 0.0,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
            max_exp_avg_sq: if c.amsgrad { Some(zeros()?) } else { None },
        };
    }
    let ParamState::Adam {
        step,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
    } = state
    else {
        unreachable!()
    };
    let (beta1, beta2) = c.betas;

    // step_t += 1 (a float32 tensor: the same rounding as f32 arithmetic)
    *step += 1.0;

    let mut grad = grad;
    if c.weight_decay != 0.0 {
        if decoupled {
            // param.mul_(1 - lr * weight_decay)
            let _ = param.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
        } else {
            // grad = grad.add(param, alpha=weight_decay)
            grad = ffi::add(&grad, param, c.weight_decay)?;
        }
    }

    // exp_avg.lerp_(grad, 1 - beta1)
    let _ = exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
    let _ = exp_avg_sq.f_mul_scalar_(beta2)?;
    ffi::addcmul_(exp_avg_sq, &grad, &grad, 1.0 - beta2)?;

    // step = _get_value(step_t): the float32 value as a Python float.
    let step = f64::from(*step);
    // Python float arithmetic: `**` is libm's pow, as f64::powf is.
    let bias_correction1 = 1.0 - beta1.powf(step);
    let bias_correction2 = 1.0 - beta2.powf(step);
    let step_size = lr / bias_correction1;
    // `bias_correction2**0.5` is pow(x, 0.5), not sqrt (they can differ in the last bit); the
    // black_box keeps LLVM from rewriting it as sqrt.
    let bias_correction2_sqrt = bias_correction2.powf(std::hint::black_box(0.5));

    let denom = if let Some(max) = max_exp_avg_sq {
        // torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
        let _ = max.f_maximum_out(max, exp_avg_sq)?;
        // (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        max.f_sqrt()?
    } else {
        // (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        exp_avg_sq.f_sqrt()?
    };
    let mut denom = denom.f_div_scalar(bias_correction2_sqrt)?;
    let _ = denom.f_add_scalar_(c.eps)?;
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    ffi::addcdiv_(param, exp_avg, &denom, -step_size).map_err(OptimError::from)
}

/// The saved tensors by name; a name given twice is refused.
fn by_name(tensors: Vec<(String, Tensor)>) -> Result<BTreeMap<String, Tensor>, OptimError> {
    let mut given: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in tensors {
        if given.contains_key(&name) {
            return Err(OptimError::UnexpectedState {
                name,
                reason: "given twice".into(),
            });
        }
        given.insert(name, t);
    }
    Ok(given)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn params() -> Vec<(String, Tensor)> {
        vec![
            (
                "w".into(),
                Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25, 3.0, -0.75]).reshape([2, 3]),
            ),
            ("b".into(), Tensor::from_slice(&[0.1f32, -0.2])),
        ]
        .into_iter()
        .map(|(n, t)| (n, t.set_requires_grad(true)))
        .collect()
    }

    fn loss_backward(ps: &[(String, Tensor)]) {
        let loss = ps
            .iter()
            .map(|(_, t)| (t * t).sum(Kind::Float) + t.sin().sum(Kind::Float))
            .fold(Tensor::from(0.0f32), |a, b| a + b);
        loss.backward();
    }

    #[test]
    fn step_reads_grads_skips_params_without_one_and_zero_grad_clears() {
        let ps = params();
        let mut opt = Optimizer::new(
            OptimizerConfig::Adam(AdamConfig::default()),
            ps.clone_shallow(),
        )
        .unwrap();
        let w0 = ps[0].1.copy();
        // Only `w` gets a gradient.
        (&ps[0].1 * &ps[0].1).sum(Kind::Float).backward();
        opt.step(0.1).unwrap();
        assert!(
            !ps[0].1.equal(&w0),
            "w was updated in place through the shallow clone"
        );
        let names: Vec<_> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["w.step", "w.exp_avg", "w.exp_avg_sq"]);
        assert_eq!(opt.meta().with_state, ["w"]);
        opt.zero_grad().unwrap();
        assert!(!ps[0].1.grad().defined());
        loss_backward(&ps);
        opt.step(0.1).unwrap();
        let st = opt.state_tensors();
        assert_eq!(st[0].1.double_value(&[]), 2.0);
        assert_eq!(st[3].0, "b.step");
        assert_eq!(st[3].1.double_value(&[]), 1.0);
        assert!(matches!(opt.step(f64::NAN), Err(OptimError::Lr(_))));
    }

    trait CloneShallow {
        fn clone_shallow(&self) -> Self;
    }
    impl CloneShallow for Vec<(String, Tensor)> {
        fn clone_shallow(&self) -> Self {
            self.iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()
        }
    }

    #[test]
    fn load_state_names_what_is_wrong() {
        let ps = params();
        let cfg = OptimizerConfig::Sgd(SgdConfig {
            momentum: 0.9,
            ..SgdConfig::default()
        });
        let mut opt = Optimizer::new(cfg.clone(), ps.clone_shallow()).unwrap();
        loss_backward(&ps);
        opt.step(0.1).unwrap();
        let meta = opt.meta();
        let good = || opt.state_tensors();

        let mut fresh = Optimizer::new(cfg.clone(), params()).unwrap();
        let mut missing = good();
        missing.retain(|(n, _)| n != "b.momentum_buffer");
        let e = fresh.load_state(&meta, missing).unwrap_err();
        assert_eq!(
            e.to_string(),
            "optimizer state: tensor b.momentum_buffer is missing (parameter b has sgd state)"
        );

        let mut shaped = good();
        shaped[0].1 = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
        let e = fresh.load_state(&meta, shaped).unwrap_err();
        assert_eq!(
            e.to_string(),
            "optimizer state: tensor w.momentum_buffer is Float [3, 2], expected Float [2, 3]"
        );

        let mut extra = good();
        extra.push((
            "w.exp_avg".into(),
            Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
        ));
        let e = fresh.load_state(&meta, extra).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("optimizer state: unexpected tensor w.exp_avg"),
            "{e}"
        );

        let adam = Optimizer::new(OptimizerConfig::Adam(AdamConfig::default()), params());
        let e = adam.unwrap().load_state(&meta, good()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "optimizer state is for sgd, but this optimizer is adam"
        );

        let mut renamed = meta.clone();
        renamed.params[1] = "bias".into();
        let e = fresh.load_state(&renamed, good()).unwrap_err();
        assert!(
            e.to_string().contains("not in the checkpoint: [\"b\"]"),
            "{e}"
        );

        // Nothing was loaded by the failed attempts; a good load works and copies.
        assert!(fresh.state_tensors().is_empty());
        fresh.load_state(&meta, good()).unwrap();
        let (a, b) = (&fresh.state_tensors()[0].1, &opt.state_tensors()[0].1);
        assert!(a.equal(b));
        assert_ne!(a.data_ptr(), b.data_ptr(), "loaded state is a private copy");
    }

    #[test]
    fn adam_step_state_is_checked() {
        let ps = params();
        let cfg = OptimizerConfig::Adam(AdamConfig::default());
        let mut opt = Optimizer::new(cfg.clone(), ps.clone_shallow()).unwrap();
        loss_backward(&ps);
        opt.step(0.1).unwrap();
        let meta = opt.meta();
        let mut st = opt.state_tensors();
        st[0].1 = Tensor::from(1.5f32);
        let mut fresh = Optimizer::new(cfg, params()).unwrap();
        let e = fresh.load_state(&meta, st).unwrap_err();
        assert!(e.to_string().contains("w.step is the value 1.5"), "{e}");
        let json = serde_json::to_string(&meta).unwrap();
        let back: OptimizerMeta = serde_json::from_str(&json).unwrap();
        assert_eq!(back, meta);
        assert!(json.contains(r#""kind":"adam""#), "{json}");
    }
}
